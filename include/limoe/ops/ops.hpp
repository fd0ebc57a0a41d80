// limoe/ops/ops.hpp: every op (cpu:: fast path and ref:: naive twin) in one include.
#pragma once

#include "limoe/ops/attention.hpp"
#include "limoe/ops/contrastive.hpp"
#include "limoe/ops/embedding.hpp"
#include "limoe/ops/gelu.hpp"
#include "limoe/ops/l2norm.hpp"
#include "limoe/ops/layernorm.hpp"
#include "limoe/ops/linear.hpp"
#include "limoe/ops/pooling.hpp"
#include "limoe/ops/rows.hpp"
#include "limoe/ops/softmax.hpp"
