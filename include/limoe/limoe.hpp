// limoe/limoe.hpp: the umbrella header. `#include <limoe/limoe.hpp>` is all a CPU user needs.
#pragma once

#include "limoe/core/error.hpp"
#include "limoe/core/gemm.hpp"
#include "limoe/core/parallel.hpp"
#include "limoe/core/params.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"
