// limoe/backend/backend.hpp: the backend is a type. A backend tag names the memory space its ops work on
// (core/memory.hpp) and is the key under which each op's implementation is found (backend/ops.hpp: Ops<B, T>).
//
//   Ref   the naive reference: plain loops in the op's own words, one thread, no tiling. Slow; the yardstick.
//   Cpu   the CPU fast path: Eigen products, oneTBB threads, fixed chunking (results independent of threads).
//   Cuda  the CUDA backend (backend/cuda.hpp): kernels and cuBLAS on device memory
//
// The model, its blocks and the MoE layer are generic over the backend: Limoe<T, Router, Losses, Cpu> and the
// same with Ref differ only in which functions run. This header is light (no kernels): configs and user code
// may name a backend without pulling in the ops.
#pragma once

#include <concepts>
#include <string_view>

#include "limoe/core/memory.hpp"

namespace limoe {

struct Ref {
  using memory_space = HostSpace;
  static constexpr const char* name = "ref";
};

struct Cpu {
  using memory_space = HostSpace;
  static constexpr const char* name = "cpu";
};

template <class B>
concept Backend = MemorySpace<typename B::memory_space> && requires {
  { B::name } -> std::convertible_to<const char*>;
};

static_assert(Backend<Ref> && Backend<Cpu>);

// The memory space of backend B's tensors (a non-deduced context in a signature: B is named, never deduced).
template <class B>
using SpaceOf = typename B::memory_space;

// Each backend's op table: specialisations in backend/ops.hpp (Ref, Cpu) and the CUDA part (Cuda).
template <Backend B, class T>
struct Ops;

}  // namespace limoe
