// Limoe<float> on the CUDA backend compiled once for the project's programs (the limoe command's --device cuda);
// built only with the CUDA part (limoe_instances_cuda in CMakeLists.txt). The model's code is the same template
// as on the CPU; its ops are the CUDA backend's, declared in backend/cuda_ops.hpp and linked from limoe_cuda.
#include "limoe/backend/cuda.hpp"
#include "limoe/model/model.hpp"

template class limoe::Limoe<float, limoe::ConfigRouter, limoe::moe::DefaultAuxLosses, limoe::Cuda>;
