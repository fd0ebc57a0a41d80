// limoe/dist/device_sum.hpp: the sum over ranks of a buffer that lives in a device's memory, done on the device
// (docs/distributed.md, "Gradients on a device").
//
// The same algorithm as dist::all_reduce_sum (comm.hpp) over a communicator whose collectives move memory of
// the buffer's space (NcclComm: CudaSpace): a reduce-scatter by all-to-all, each rank adding its chunk's copies
// in rank order 0, 1, ..., N-1 with the backend's own add (y += x, elementwise), and an all-gather. So the result
// is the same bits on every rank, in every run, and the same bits as the host path (float addition in the same
// order), and nothing crosses to host memory. `add` is the backend's add_into; the helper knows no backend.
#pragma once

#include <concepts>
#include <cstddef>
#include <type_traits>

#include "limoe/core/tensor.hpp"
#include "limoe/dist/comm.hpp"

namespace limoe::dist {

// In place: data = the sum over the ranks of data, added in rank order. `scratch` (grown here; reuse it across
// calls) holds the chunks in flight: about 1x data, 2x when the size does not split evenly over the ranks.
// add(x, y): y += x for two equal-shaped buffers of the space.
template <class T, class S, CommunicatorIn<S> C, class Add>
  requires std::invocable<Add&, CView<T, S>, View<T, S>>
void all_reduce_sum_in(C& comm, View<T, S> data, Tensor<T, S>& scratch, Add&& add) {
  static_assert(std::is_arithmetic_v<T>);
  const index_t P = comm.size();
  const index_t n = data.numel();
  if (P == 1 || n == 0) return;
  // Chunk c of P equal chunks (the last padded with zeros when the size does not split evenly) is summed by
  // rank c.
  const index_t chunk = (n + P - 1) / P;
  const bool even = chunk * P == n;
  const index_t padded = even ? 0 : P * chunk;
  const index_t need = padded + P * chunk + chunk;
  if (scratch.numel() < need) scratch.resize(Shape{need});
  const auto bytes = [](index_t k) { return static_cast<std::size_t>(k) * sizeof(T); };
  T* base = scratch.data();
  const T* send = data.data();  // [P, chunk]
  if (!even) {
    S::copy(base, data.data(), bytes(n));
    S::zero(base + n, bytes(padded - n));
    send = base;
  }
  T* recv = base + padded;       // [P, chunk]: every rank's copy of my chunk, later every rank's sum
  T* mine = recv + P * chunk;    // [chunk]: my chunk's sum, in rank order
  comm.all_to_all_bytes(send, recv, bytes(chunk));
  S::copy(mine, recv, bytes(chunk));
  for (index_t p = 1; p < P; ++p) add(CView<T, S>(recv + p * chunk, Shape{chunk}), View<T, S>(mine, Shape{chunk}));
  comm.all_gather_bytes(mine, recv, bytes(chunk));
  S::copy(data.data(), recv, bytes(n));
}

}  // namespace limoe::dist
