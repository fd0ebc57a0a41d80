// limoe/math/host_device.hpp: LIMOE_HD marks a function for host and device. Under nvcc it is
// `__host__ __device__`; every other compiler sees nothing, so the formulas of limoe/math/ are plain C++ that
// g++ tests on the CPU and nvcc compiles into kernels unchanged.
// LIMOE_INLINE asks for a function to be inlined wherever it is called: the plain-arithmetic functions of
// math/plain.hpp, which a loop can vectorise only when their body is in it.
#pragma once

#if defined(__CUDACC__)
#define LIMOE_HD __host__ __device__
#define LIMOE_INLINE __forceinline__
#elif defined(__GNUC__)
#define LIMOE_HD
#define LIMOE_INLINE inline __attribute__((always_inline))
#else
#define LIMOE_HD
#define LIMOE_INLINE inline
#endif
