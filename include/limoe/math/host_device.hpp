// limoe/math/host_device.hpp: LIMOE_HD marks a function for host and device. Under nvcc it is
// `__host__ __device__`; every other compiler sees nothing, so the formulas of limoe/math/ are plain C++ that
// g++ tests on the CPU and nvcc compiles into kernels unchanged.
#pragma once

#if defined(__CUDACC__)
#define LIMOE_HD __host__ __device__
#else
#define LIMOE_HD
#endif
