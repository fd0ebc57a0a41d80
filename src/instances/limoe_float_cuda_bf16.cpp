// Limoe<float> on the CUDA backend under the bf16 policy (the limoe command's --device cuda --precision bf16),
// compiled once; see limoe_float_cuda.cpp.
#include "limoe/backend/cuda.hpp"
#include "limoe/model/model.hpp"

template class limoe::Limoe<float, limoe::ConfigRouter, limoe::moe::DefaultAuxLosses, limoe::Cuda, limoe::Bf16Mixed>;
