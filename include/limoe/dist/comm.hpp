// limoe/dist/comm.hpp: a communicator as a type (docs/distributed.md).
//
// A communicator joins the ranks of one job. The library needs four blocking primitives from it, all on
// bytes, all collective (every rank of the communicator calls them in the same order):
//
//   all_gather_bytes(send, recv, n)      rank r's n bytes land at recv + r * n on every rank
//   all_to_all_bytes(send, recv, n)      block p of send (n bytes) goes to rank p; block p of recv came from p
//   broadcast_bytes(data, n, root)       root's n bytes on every rank
//   split(color, key)                    a communicator of the ranks with the same color, ordered by key
//
// and everything else is written once on top of them, here: the sum over ranks (all_reduce_sum) is a
// reduce-scatter by all-to-all, a sum in rank order 0, 1, ..., N-1 of each rank's chunk, and an all-gather, so
// it is bandwidth-optimal (each rank sends and receives 2 (N-1)/N of the buffer) and its result does not depend
// on timing or on the transport's reduction algorithm: a run is reproducible, and every rank holds the same
// bits afterwards. `SingleProcess` (the default, needs nothing) and `dist::MpiComm` (dist/mpi.hpp, opt-in
// target limoe::mpi) satisfy the concept.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/memory.hpp"

namespace limoe::dist {

template <class C>
concept Communicator = requires(C& c, const C& cc, const void* s, void* r, std::size_t n, int i) {
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  c.all_gather_bytes(s, r, n);
  c.all_to_all_bytes(s, r, n);
  c.broadcast_bytes(r, n, i);
  { c.split(i, i) } -> std::same_as<C>;
};

// The memory a communicator's collectives read and write: `C::memory_space` where C names one (NcclComm:
// device memory), else host memory. The trainer requires its model's space; the host-side helpers below, host.
template <class C>
struct comm_space {
  using type = HostSpace;
};
template <class C>
  requires requires { typename C::memory_space; }
struct comm_space<C> {
  using type = typename C::memory_space;
};
template <class C>
using comm_memory_space = typename comm_space<C>::type;
template <class C>
concept HostCommunicator = Communicator<C> && comm_memory_space<C>::host_accessible;

// One process: every collective is a copy.
class SingleProcess {
 public:
  int rank() const { return 0; }
  int size() const { return 1; }
  void all_gather_bytes(const void* send, void* recv, std::size_t n) { copy(send, recv, n); }
  void all_to_all_bytes(const void* send, void* recv, std::size_t n) { copy(send, recv, n); }
  void broadcast_bytes(void*, std::size_t, int root) {
    LIMOE_CHECK(root == 0, "SingleProcess::broadcast: root ", root, " does not exist (one rank)");
  }
  SingleProcess split(int, int) const { return {}; }
  bool calls_from_any_thread() const { return true; }

 private:
  static void copy(const void* s, void* r, std::size_t n) {
    if (n > 0 && s != r) std::memmove(r, s, n);
  }
};
static_assert(Communicator<SingleProcess>);

// A communicator whose collectives read and write memory of space S.
template <class C, class S>
concept CommunicatorIn = Communicator<C> && std::is_same_v<comm_memory_space<C>, S>;

// Any communicator over memory of space S behind one type (a program that picks single-process or MPI at run
// time, like the `limoe` command line, compiles one trainer; a device model's expert exchange holds an NcclComm
// as BasicAnyComm<CudaSpace>). One virtual call per collective; the collectives are the cost.
template <class S>
class BasicAnyComm {
 public:
  using memory_space = S;
  BasicAnyComm()
    requires std::is_same_v<S, HostSpace>
      : BasicAnyComm(SingleProcess{}) {}
  template <class C>
    requires CommunicatorIn<C, S> && (!std::is_same_v<std::remove_cvref_t<C>, BasicAnyComm>)
  BasicAnyComm(C comm) : self_(std::make_unique<Model<C>>(std::move(comm))) {}

  int rank() const { return self_->rank(); }
  int size() const { return self_->size(); }
  void all_gather_bytes(const void* s, void* r, std::size_t n) { self_->all_gather_bytes(s, r, n); }
  void all_to_all_bytes(const void* s, void* r, std::size_t n) { self_->all_to_all_bytes(s, r, n); }
  void broadcast_bytes(void* d, std::size_t n, int root) { self_->broadcast_bytes(d, n, root); }
  BasicAnyComm split(int color, int key) const { return self_->split(color, key); }
  // Whether the wrapped communicator may be called from any one thread at a time (dist/background_sum.hpp).
  bool calls_from_any_thread() const { return self_->calls_from_any_thread(); }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual int rank() const = 0;
    virtual int size() const = 0;
    virtual void all_gather_bytes(const void*, void*, std::size_t) = 0;
    virtual void all_to_all_bytes(const void*, void*, std::size_t) = 0;
    virtual void broadcast_bytes(void*, std::size_t, int) = 0;
    virtual BasicAnyComm split(int, int) const = 0;
    virtual bool calls_from_any_thread() const = 0;
  };
  template <class C>
  struct Model final : Concept {
    explicit Model(C c) : comm(std::move(c)) {}
    int rank() const override { return comm.rank(); }
    int size() const override { return comm.size(); }
    void all_gather_bytes(const void* s, void* r, std::size_t n) override { comm.all_gather_bytes(s, r, n); }
    void all_to_all_bytes(const void* s, void* r, std::size_t n) override { comm.all_to_all_bytes(s, r, n); }
    void broadcast_bytes(void* d, std::size_t n, int root) override { comm.broadcast_bytes(d, n, root); }
    BasicAnyComm split(int color, int key) const override { return BasicAnyComm(comm.split(color, key)); }
    bool calls_from_any_thread() const override {
      if constexpr (requires { { comm.calls_from_any_thread() } -> std::convertible_to<bool>; })
        return comm.calls_from_any_thread();
      else
        return false;
    }
    C comm;
  };
  std::unique_ptr<Concept> self_;
};
// Any host communicator (single process, MPI).
using AnyComm = BasicAnyComm<HostSpace>;
static_assert(Communicator<AnyComm>);
static_assert(HostCommunicator<AnyComm>);

// ---- typed collectives, written once for every communicator ----------------------------------------------

// all[r * local.size() + i] = rank r's local[i]; `all` has size() * local.size() elements.
template <Communicator C, class T>
void all_gather(C& comm, std::span<const T> local, std::span<T> all) {
  static_assert(std::is_trivially_copyable_v<T>);
  LIMOE_CHECK(all.size() == local.size() * static_cast<std::size_t>(comm.size()), "dist::all_gather: the result has ",
              all.size(), " elements for ", comm.size(), " ranks of ", local.size());
  comm.all_gather_bytes(local.data(), all.data(), local.size_bytes());
}

// Root's `data` on every rank.
template <Communicator C, class T>
void broadcast(C& comm, std::span<T> data, int root = 0) {
  static_assert(std::is_trivially_copyable_v<T>);
  comm.broadcast_bytes(data.data(), data.size_bytes(), root);
}

// In place: data = sum over ranks of data, added in rank order (deterministic, identical on every rank).
// `scratch` (grown here, reuse it across calls) holds the chunks in flight: about 1x data (2x when the size
// does not split evenly over the ranks).
template <HostCommunicator C, class T>
void all_reduce_sum(C& comm, std::span<T> data, std::vector<T>& scratch) {
  static_assert(std::is_arithmetic_v<T>);
  const std::size_t P = static_cast<std::size_t>(comm.size());
  if (P == 1 || data.empty()) return;
  // Chunk c (of P equal chunks; the last padded with zeros when the size does not split evenly) is reduced by
  // rank c.
  const std::size_t chunk = (data.size() + P - 1) / P;
  const bool even = chunk * P == data.size();
  const std::size_t padded = even ? 0 : P * chunk;
  if (scratch.size() < padded + P * chunk + chunk) scratch.resize(padded + P * chunk + chunk);
  const T* send = data.data();  // [P, chunk]
  if (!even) {
    std::copy(data.begin(), data.end(), scratch.begin());
    std::fill(scratch.begin() + static_cast<std::ptrdiff_t>(data.size()), scratch.begin() + static_cast<std::ptrdiff_t>(padded), T(0));
    send = scratch.data();
  }
  T* recv = scratch.data() + padded;            // [P, chunk]: every rank's copy of my chunk, then all sums
  T* mine = scratch.data() + padded + P * chunk;  // [chunk]: my chunk's sum, in rank order
  comm.all_to_all_bytes(send, recv, chunk * sizeof(T));
  std::copy(recv, recv + chunk, mine);
  for (std::size_t p = 1; p < P; ++p)
    for (std::size_t i = 0; i < chunk; ++i) mine[i] += recv[p * chunk + i];
  comm.all_gather_bytes(mine, recv, chunk * sizeof(T));
  std::copy(recv, recv + data.size(), data.begin());
}
template <HostCommunicator C, class T>
void all_reduce_sum(C& comm, std::span<T> data) {
  std::vector<T> scratch;
  all_reduce_sum(comm, data, scratch);
}
template <HostCommunicator C>
double all_reduce_sum(C& comm, double v) {
  all_reduce_sum(comm, std::span<double>(&v, 1));
  return v;
}

// The largest value over ranks (agreement on a flag or a count).
template <HostCommunicator C, class T>
T all_reduce_max(C& comm, T v) {
  std::vector<T> all(static_cast<std::size_t>(comm.size()));
  all_gather(comm, std::span<const T>(&v, 1), std::span<T>(all));
  return *std::max_element(all.begin(), all.end());
}

}  // namespace limoe::dist
