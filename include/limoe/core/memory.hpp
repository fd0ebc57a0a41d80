// limoe/core/memory.hpp: memory spaces. Where a tensor's bytes live, and how to allocate, zero and copy them.
//
// A memory space is a type with static allocate / deallocate / zero / copy (within the space), upload (host
// memory -> the space) and download (the space -> host memory), and a flag that says whether host code may read
// and write its elements. Tensors, views and the parameter store carry their
// space as a template parameter (core/tensor.hpp, core/params.hpp); a backend names the space its ops work on
// (backend/backend.hpp). HostSpace is the one every CPU backend uses; the CUDA backend adds a device space whose
// allocate is cudaMalloc and whose views have no element access on the host.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstring>
#include <new>

namespace limoe {

template <class S>
concept MemorySpace = requires(void* p, const void* q, std::size_t n) {
  { S::host_accessible } -> std::convertible_to<bool>;
  { S::name } -> std::convertible_to<const char*>;
  { S::allocate(n) } -> std::same_as<void*>;
  S::deallocate(p, n);
  S::zero(p, n);
  S::copy(p, q, n);
  S::upload(p, q, n);
  S::download(p, q, n);
};

// Ordinary host memory, 64-byte aligned (one cache line; full AVX-512 vectors).
struct HostSpace {
  static constexpr bool host_accessible = true;
  static constexpr const char* name = "host";
  static constexpr std::size_t kAlign = 64;
  static void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t{kAlign}); }
  static void deallocate(void* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{kAlign}); }
  static void zero(void* p, std::size_t bytes) { std::memset(p, 0, bytes); }
  static void copy(void* dst, const void* src, std::size_t bytes) { std::memcpy(dst, src, bytes); }
  static void upload(void* dst, const void* host_src, std::size_t bytes) { std::memcpy(dst, host_src, bytes); }
  static void download(void* host_dst, const void* src, std::size_t bytes) { std::memcpy(host_dst, src, bytes); }
};

static_assert(MemorySpace<HostSpace>);

}  // namespace limoe
