// Limoe<float> under the bf16 mixed-precision policy (core/precision.hpp) compiled once; see limoe_float.cpp.
#include "limoe/model/model.hpp"

template class limoe::Limoe<float, limoe::ConfigRouter, limoe::moe::DefaultAuxLosses, limoe::Cpu, limoe::Bf16Mixed>;
