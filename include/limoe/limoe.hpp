// limoe/limoe.hpp: the umbrella header. `#include <limoe/limoe.hpp>` brings the whole CPU library: tensors and
// the thread pool, the ops, the MoE layer, the model with its presets, checkpoints, training and evaluation.
// The data sets (which may compile stb_image) are in <limoe/data/data.hpp>; the CUDA part is <limoe/cuda.hpp>,
// linked from limoe::cuda. Neither is included here.
#pragma once

#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/params.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/eval/evaluate.hpp"
#include "limoe/io/safetensors.hpp"
#include "limoe/model/checkpoint.hpp"
#include "limoe/model/config.hpp"
#include "limoe/model/model.hpp"
#include "limoe/model/presets.hpp"
#include "limoe/moe/moe.hpp"
#include "limoe/ops/ops.hpp"
#include "limoe/train/optimizer.hpp"
#include "limoe/train/trainer.hpp"
