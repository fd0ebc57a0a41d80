// limoe/moe/expert_parallel.hpp: the expert MLPs of a MoE layer sharded over the ranks of an expert-parallel
// group (docs/distributed.md, "Expert parallel").
//
// Rank q of a group of P holds experts [q Ex, (q + 1) Ex), Ex = E / P, and routes its own tokens with the full
// router (replicated). After the dispatch plan, the rows of the experts of rank q (one contiguous range of the
// plan: experts are consecutive) travel to rank q in one all-to-all; rank q runs its experts on the rows of every
// source (for each expert: source 0's rows, then source 1's, ..., each in its plan order), and a second
// all-to-all brings the outputs back. Backward sends the output gradients the same way and returns the input
// gradients; the expert weight gradients stay with their owner.
//
// Blocks have one size for every (source, expert): the largest row count in the group, exchanged first (an
// all-gather of one number). Under a capacity bound that is at most groups x C; in no-drop mode it is the
// largest expert load. Padding rows are sent but never computed.
//
// On any memory space S: the rows, blocks and expert activations live in the backend's memory (a device's on
// the CUDA backend), the row counts and offsets on the host (the dispatch plan's offsets are read back once per
// exchange, as the CUDA experts do anyway). The counts go over a host communicator (MPI); the blocks go over a
// communicator of the blocks' own memory where one is given (`blocks_comm`: NcclComm on a GPU, device to
// device), else through a host copy on each side of the host communicator's all-to-all (staged, as the
// data-parallel gradient without a device communicator).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "limoe/backend/ops.hpp"
#include "limoe/core/error.hpp"
#include "limoe/core/tensor.hpp"
#include "limoe/dist/comm.hpp"
#include "limoe/moe/ops.hpp"

namespace limoe::moe {

// One MoE layer's exchange state: keep one per layer (forward leaves what backward needs).
template <class T, class S = HostSpace>
struct ExpertExchange {
  dist::AnyComm* comm = nullptr;  // the expert-parallel group; rank q holds experts [q Ex, (q + 1) Ex)
  // The same group over memory of space S (a device's), for the blocks; null: staged through host copies.
  dist::BasicAnyComm<S>* blocks_comm = nullptr;
  int experts = 0;                // E, all experts of the layer

  // ---- state of the last forward ----
  int P = 1, Ex = 0;
  index_t D = 0, M = 0, cmax = 0;
  std::vector<std::int64_t> send_counts, recv_counts;  // [P * Ex]: rows for (peer, its expert j) / from (source, my j)
  std::vector<index_t> plan_offsets, local_offsets;     // the layer's plan's [E + 1] and my experts' [Ex + 1] (host)
  BasicDispatchPlan<S> local;                          // my experts' rows, E = Ex (offsets only: what the experts read)
  Tensor<T, S> send, recv;                             // [P, Ex, cmax, D] padded blocks
  Tensor<T, S> xl, hpre, h, yl, dyl, dh, dxl;          // my experts' rows: [A_l, D], [A_l, M], [A_l, M], [A_l, D] ...
  Tensor<T> staged_send, staged_recv;                  // host copies of send / recv (S not host-readable)
  ExpertScratch scratch;

  int shards() const { return comm ? comm->size() : 1; }
  int shard() const { return comm ? comm->rank() : 0; }
};

namespace detail {

// n rows of D values from src to dst, both in the exchange's memory space.
template <class T, class S>
void ep_copy_rows(T* dst, const T* src, index_t n, index_t D) {
  if (n > 0) S::copy(dst, src, static_cast<std::size_t>(n * D) * sizeof(T));
}
// rows of plan expert (q Ex + j) <-> block (q, j) of the padded [P, Ex, cmax, D] buffer (to_blocks: pack for
// sending, `rows` only read; else unpack what came back into `rows`).
template <class T, class S>
void ep_move(const ExpertExchange<T, S>& ex, T* rows, T* blocks, bool to_blocks) {
  const index_t D = ex.D, C = ex.cmax;
  const auto& off = ex.plan_offsets;
  for (int q = 0; q < ex.P; ++q)
    for (int j = 0; j < ex.Ex; ++j) {
      const std::size_t e = static_cast<std::size_t>(q * ex.Ex + j);
      T* block = blocks + ((static_cast<index_t>(q) * ex.Ex + j) * C) * D;
      T* r = rows + off[e] * D;
      const index_t n = off[e + 1] - off[e];
      if (to_blocks) ep_copy_rows<T, S>(block, r, n, D);
      else ep_copy_rows<T, S>(r, block, n, D);
    }
}
// received blocks (source s, my expert j) <-> my experts' rows (expert j: source 0's rows, source 1's, ...).
template <class T, class S>
void ep_compact(const ExpertExchange<T, S>& ex, T* blocks, T* local_rows, bool to_rows) {
  const index_t D = ex.D, C = ex.cmax;
  for (int j = 0; j < ex.Ex; ++j) {
    index_t r = ex.local_offsets[static_cast<std::size_t>(j)];
    for (int s = 0; s < ex.P; ++s) {
      const index_t n = ex.recv_counts[static_cast<std::size_t>(s * ex.Ex + j)];
      T* block = blocks + ((static_cast<index_t>(s) * ex.Ex + j) * C) * D;
      if (to_rows) ep_copy_rows<T, S>(local_rows + r * D, block, n, D);
      else ep_copy_rows<T, S>(block, local_rows + r * D, n, D);
      r += n;
    }
  }
}
// send -> recv over the group: directly where the host can read S or a communicator of S is given, else
// through host copies.
template <class T, class S>
void ep_exchange(ExpertExchange<T, S>& ex) {
  const std::size_t bytes = static_cast<std::size_t>(ex.Ex * ex.cmax * ex.D) * sizeof(T);
  if constexpr (S::host_accessible) {
    ex.comm->all_to_all_bytes(ex.send.data(), ex.recv.data(), bytes);
  } else if (ex.blocks_comm != nullptr) {
    ex.blocks_comm->all_to_all_bytes(ex.send.data(), ex.recv.data(), bytes);
  } else {
    ex.staged_send.resize(ex.send.shape());
    ex.staged_recv.resize(ex.recv.shape());
    copy_to_host<T, S>(ex.send.cview(), ex.staged_send.view());
    ex.comm->all_to_all_bytes(ex.staged_send.data(), ex.staged_recv.data(), bytes);
    copy_from_host<T, S>(ex.staged_recv.cview(), ex.recv.view());
  }
}
// The plan's [E + 1] offsets on the host.
template <class S>
void ep_plan_offsets(const BasicDispatchPlan<S>& plan, std::vector<index_t>& off) {
  off.resize(static_cast<std::size_t>(plan.E + 1));
  if constexpr (S::host_accessible) {
    for (int e = 0; e <= plan.E; ++e) off[static_cast<std::size_t>(e)] = plan.offsets[e];
  } else {  // a packed plan on a device keeps them on the host too (moe/plan.hpp): nothing is read back
    LIMOE_CHECK(plan.host_offsets.size() == off.size(), "expert parallel: the dispatch plan has no host copy of its ",
                "offsets (a packed plan from the backend's make_dispatch_plan has one)");
    off = plan.host_offsets;
  }
}

}  // namespace detail

// Forward of the sharded experts: xe [A, D] in `plan` order (all E experts) -> ye [A, D]. `w` holds this rank's
// Ex experts ([Ex, M, D] ...). Collective over ex.comm.
template <class T, Backend BackendT, PrecisionPolicy Prec = Fp32, class S = SpaceOf<BackendT>>
void expert_parallel_forward(ExpertExchange<T, S>& ex, const BasicDispatchPlan<S>& plan, const ExpertWeights<T, S>& w,
                             GeluKind gelu, CView<T, S> xe, View<T, S> ye, const Prec& prec = {}) {
  LIMOE_CHECK(ex.comm != nullptr, "expert parallel: no expert-parallel communicator");
  const int P = ex.comm->size(), E = plan.E;
  LIMOE_CHECK(E % P == 0, "expert parallel: ", E, " experts do not split over ", P, " ranks");
  ex.P = P, ex.Ex = E / P, ex.D = xe.dim(1), ex.M = w.fc1_w.dim(1);
  const index_t D = ex.D, M = ex.M;
  // 1. How many rows go to each (peer, expert); the largest count in the group sizes every block.
  detail::ep_plan_offsets(plan, ex.plan_offsets);
  ex.send_counts.assign(static_cast<std::size_t>(E), 0);
  ex.recv_counts.assign(static_cast<std::size_t>(E), 0);
  for (std::size_t e = 0; e < static_cast<std::size_t>(E); ++e) ex.send_counts[e] = ex.plan_offsets[e + 1] - ex.plan_offsets[e];
  ex.comm->all_to_all_bytes(ex.send_counts.data(), ex.recv_counts.data(), static_cast<std::size_t>(ex.Ex) * sizeof(std::int64_t));
  std::int64_t mine = 0;
  for (auto c : ex.send_counts) mine = std::max(mine, c);
  ex.cmax = dist::all_reduce_max(*ex.comm, mine);
  // 2. My experts' plan: expert j owns the rows of every source, in source order.
  ex.local_offsets.assign(static_cast<std::size_t>(ex.Ex + 1), 0);
  for (std::size_t j = 0; j < static_cast<std::size_t>(ex.Ex); ++j) {
    index_t n = 0;
    for (std::size_t s = 0; s < static_cast<std::size_t>(P); ++s) n += ex.recv_counts[s * static_cast<std::size_t>(ex.Ex) + j];
    ex.local_offsets[j + 1] = ex.local_offsets[j] + n;
  }
  const index_t Al = ex.local_offsets.back();
  ex.local.E = ex.Ex, ex.local.K = plan.K, ex.local.N = 0, ex.local.A = Al;
  ex.local.offsets.resize(Shape{ex.Ex + 1});
  copy_from_host<index_t, S>(CView<index_t>(ex.local_offsets.data(), Shape{ex.Ex + 1}), ex.local.offsets.view());
  if constexpr (!S::host_accessible) ex.local.host_offsets = ex.local_offsets;
  LIMOE_CHECK(static_cast<double>(ex.Ex) * static_cast<double>(ex.cmax) * static_cast<double>(D) * sizeof(T) < 2147483648.0,
              "expert parallel: an exchange block of ", ex.Ex, " experts x ", ex.cmax, " rows x ", D,
              " values exceeds one message (2 GiB); fewer tokens per rank, a capacity factor, or more expert parts");
  // 3. Rows out, my experts' rows in, the expert MLPs, outputs back.
  const Shape blocks{static_cast<index_t>(P) * ex.Ex * ex.cmax, D};
  ex.send.resize(blocks);
  ex.recv.resize(blocks);
  detail::ep_move<T, S>(ex, const_cast<T*>(xe.data()), ex.send.data(), true);
  detail::ep_exchange(ex);
  ex.xl.resize(Shape{Al, D});
  ex.hpre.resize(Shape{Al, M});
  ex.h.resize(Shape{Al, M});
  ex.yl.resize(Shape{Al, D});
  detail::ep_compact<T, S>(ex, ex.recv.data(), ex.xl.data(), true);
  Ops<BackendT, T>::expert_mlp_forward(ex.local, w, gelu, ex.xl.cview(), ex.hpre.view(), ex.h.view(), ex.yl.view(),
                                       ex.scratch, prec);
  detail::ep_compact<T, S>(ex, ex.send.data(), ex.yl.data(), false);  // outputs back to their sources' blocks
  detail::ep_exchange(ex);
  detail::ep_move<T, S>(ex, ye.data(), ex.recv.data(), false);
}

// Backward: dye [A, D] in plan order -> dxe [A, D] (empty: skipped here, but the exchange still runs on every
// rank: it is collective); this rank's expert weight gradients accumulate into g.
template <class T, Backend BackendT, PrecisionPolicy Prec = Fp32, class S = SpaceOf<BackendT>>
void expert_parallel_backward(ExpertExchange<T, S>& ex, const BasicDispatchPlan<S>& plan, const ExpertWeights<T, S>& w,
                              GeluKind gelu, CView<T, S> dye, View<T, S> dxe, const ExpertGrads<T, S>& g,
                              const Prec& prec = {}) {
  LIMOE_CHECK(ex.comm != nullptr && ex.P == ex.comm->size() && plan.E == ex.P * ex.Ex,
              "expert parallel: backward without its forward");
  std::vector<index_t> off;
  detail::ep_plan_offsets(plan, off);
  for (std::size_t e = 0; e < static_cast<std::size_t>(plan.E); ++e)
    LIMOE_CHECK(off[e + 1] - off[e] == ex.send_counts[e] && off[e] == ex.plan_offsets[e], "expert parallel: the dispatch "
                "plan is not the one this exchange's last forward sent (expert ", e, "); run backward after its own forward");
  const index_t D = ex.D, M = ex.M, Al = ex.local.A;
  detail::ep_move<T, S>(ex, const_cast<T*>(dye.data()), ex.send.data(), true);
  detail::ep_exchange(ex);
  ex.dyl.resize(Shape{Al, D});
  ex.dh.resize(Shape{Al, M});
  ex.dxl.resize(Shape{Al, D});
  detail::ep_compact<T, S>(ex, ex.recv.data(), ex.dyl.data(), true);
  Ops<BackendT, T>::expert_mlp_backward(ex.local, w, gelu, ex.xl.cview(), ex.hpre.cview(), ex.h.cview(),
                                        ex.dyl.cview(), ex.dh.view(), ex.dxl.view(), g, ex.scratch, prec);
  detail::ep_compact<T, S>(ex, ex.send.data(), ex.dxl.data(), false);
  detail::ep_exchange(ex);
  if (!dxe.empty()) detail::ep_move<T, S>(ex, dxe.data(), ex.recv.data(), false);
}

}  // namespace limoe::moe
