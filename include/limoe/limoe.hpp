// limoe/limoe.hpp: the umbrella header. `#include <limoe/limoe.hpp>` brings the whole CPU library: tensors and
// the thread pool, the ops, the MoE layer, the model with its presets, checkpoints, training and evaluation.
// Not included here: the data sets (<limoe/data/data.hpp>, which may compile stb_image), the evaluation over
// data sets (<limoe/eval/evaluate.hpp>), the SentencePiece tokenizer (<limoe/data/sentencepiece.hpp>, optional
// component limoe::sentencepiece) and the CUDA part (<limoe/cuda.hpp>, linked from limoe::cuda).
#pragma once

#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/params.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/eval/metrics.hpp"
#include "limoe/io/safetensors.hpp"
#include "limoe/model/checkpoint.hpp"
#include "limoe/model/config.hpp"
#include "limoe/model/model.hpp"
#include "limoe/model/presets.hpp"
#include "limoe/model/variants.hpp"
#include "limoe/backend/backend.hpp"
#include "limoe/backend/ops.hpp"
#include "limoe/moe/moe.hpp"
#include "limoe/ops/ops.hpp"
#include "limoe/train/optimizer.hpp"
#include "limoe/train/trainer.hpp"
