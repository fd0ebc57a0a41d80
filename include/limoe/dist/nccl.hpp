// limoe/dist/nccl.hpp: the NCCL communicator for GPUs, bootstrapped over MPI (opt-in: link the CMake target
// limoe::nccl, built where MPI, the CUDA Toolkit and NCCL are found).
//
//   limoe::dist::MpiSession mpi(&argc, &argv);
//   limoe::dist::MpiComm world = mpi.world();
//   limoe::dist::NcclComm gpus(world, /*device=*/world.rank() % device_count);
//
// It satisfies dist::Communicator over DEVICE memory: every pointer given to its collectives is a device
// pointer on its device (memory_space = CudaSpace). Each collective is enqueued on the communicator's stream
// after the work already queued on the legacy default stream (where the CUDA backend's kernels and cuBLAS run:
// an event, no host wait), and waited for (the concept's collectives are blocking), so the backend's next work
// sees its result. The typed helpers dist::all_gather and dist::broadcast work on device spans;
// dist::all_reduce_sum_in (dist/device_sum.hpp) sums on the device, and Trainer::sum_gradients_with(NcclComm)
// sums a device model's gradient through it. dist::all_reduce_sum and all_reduce_max, which add on the host,
// and AnyComm take host communicators only: a compile-time error here (dist::BasicAnyComm<CudaSpace> holds it;
// the trainer gives a device model's expert exchange one, split from the communicator sum_gradients_with got). Every NCCL and CUDA status is checked: a
// failure is a limoe::Error naming the call.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <exception>
#include <string>
#include <utility>

#include "limoe/core/cuda_space.hpp"
#include "limoe/core/error.hpp"
#include "limoe/dist/comm.hpp"
#include "limoe/dist/mpi.hpp"

namespace limoe::dist {

namespace detail {
inline void nccl_check(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) ::limoe::fail("NCCL: ", what, " failed: ", ncclGetErrorString(r));
}
inline void cuda_check(cudaError_t r, const char* what) {
  if (r != cudaSuccess) ::limoe::fail("CUDA: ", what, " failed: ", cudaGetErrorString(r));
}
}  // namespace detail

class NcclComm {
 public:
  using memory_space = CudaSpace;  // its collectives move device memory
  // Collective over `mpi`: rank 0 draws the NCCL id, MPI broadcasts it, every rank joins with its `device`.
  NcclComm(MpiComm& mpi, int device) : device_(device) {
    // Every rank checks its device and rank 0 draws the id; all agree before joining, so a failure on one rank
    // is an error on every rank instead of the others waiting in ncclCommInitRank.
    int count = 0;
    const bool have = cudaGetDeviceCount(&count) == cudaSuccess && device >= 0 && device < count;
    ncclUniqueId id{};
    const bool drawn = mpi.rank() != 0 || ncclGetUniqueId(&id) == ncclSuccess;
    const int bad = all_reduce_max(mpi, (have ? 0 : 1) + (drawn ? 0 : 2));
    LIMOE_CHECK(have, "NcclComm: device ", device, " does not exist on rank ", mpi.rank(), " (", count, " devices)");
    LIMOE_CHECK(bad == 0, "NcclComm: ", (bad & 2) ? "rank 0 could not draw the NCCL id" : "a device is missing on "
                "another rank", "; no communicator was made");
    mpi.broadcast_bytes(&id, sizeof id, 0);
    detail::cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    detail::cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    detail::cuda_check(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
    detail::nccl_check(ncclCommInitRank(&comm_, mpi.size(), id, mpi.rank()), "ncclCommInitRank");
    fill_rank();
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;
  NcclComm(NcclComm&& o) noexcept { *this = std::move(o); }
  NcclComm& operator=(NcclComm&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = std::exchange(o.comm_, nullptr);
      stream_ = std::exchange(o.stream_, nullptr);
      ready_ = std::exchange(o.ready_, nullptr);
      device_ = o.device_, rank_ = o.rank_, size_ = o.size_;
    }
    return *this;
  }
  ~NcclComm() { release(); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  ncclComm_t handle() const { return comm_; }

  void all_gather_bytes(const void* send, void* recv, std::size_t n) {
    select();
    detail::nccl_check(ncclAllGather(send, recv, n, ncclUint8, comm_, stream_), "ncclAllGather");
    wait();
  }
  void all_to_all_bytes(const void* send, void* recv, std::size_t n) {
    select();
    detail::nccl_check(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      detail::nccl_check(ncclSend(static_cast<const char*>(send) + p * n, n, ncclUint8, p, comm_, stream_), "ncclSend");
      detail::nccl_check(ncclRecv(static_cast<char*>(recv) + p * n, n, ncclUint8, p, comm_, stream_), "ncclRecv");
    }
    detail::nccl_check(ncclGroupEnd(), "ncclGroupEnd");
    wait();
  }
  void broadcast_bytes(void* data, std::size_t n, int root) {
    LIMOE_CHECK(root >= 0 && root < size_, "NcclComm::broadcast: root ", root, " is not a rank of ", size_);
    select();
    detail::nccl_check(ncclBroadcast(data, data, n, ncclUint8, root, comm_, stream_), "ncclBroadcast");
    wait();
  }
  NcclComm split(int color, int key) const {
    NcclComm out;
    out.device_ = device_;
    detail::cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    detail::cuda_check(cudaStreamCreateWithFlags(&out.stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    detail::cuda_check(cudaEventCreateWithFlags(&out.ready_, cudaEventDisableTiming), "cudaEventCreate");
    detail::nccl_check(ncclCommSplit(comm_, color, key, &out.comm_, nullptr), "ncclCommSplit");
    out.fill_rank();
    return out;
  }

 private:
  NcclComm() = default;
  void fill_rank() {
    detail::nccl_check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    detail::nccl_check(ncclCommCount(comm_, &size_), "ncclCommCount");
  }
  // Before each collective: its device, and its stream after the default stream's queued work.
  void select() const {
    detail::cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    detail::cuda_check(cudaEventRecord(ready_, cudaStreamLegacy), "cudaEventRecord");
    detail::cuda_check(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent");
  }
  void wait() const { detail::cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
  void release() {
    if (comm_ != nullptr && std::uncaught_exceptions() == 0) ncclCommDestroy(comm_);  // as MpiComm: not while failing
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    comm_ = nullptr, stream_ = nullptr, ready_ = nullptr;
  }
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;  // recorded on the default stream before each collective
  int device_ = 0, rank_ = 0, size_ = 1;
};
static_assert(Communicator<NcclComm>);

}  // namespace limoe::dist
