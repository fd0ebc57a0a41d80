// The NCCL communicator (label "cuda": scripts/gpu-check runs it under mpirun where a GPU is lent). Every
// collective of the communicator concept on device buffers, against the values each rank put in; a rank count
// of 1 and more alike. Without a CUDA device it prints one line and exits 77 (skipped).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <vector>

#include <limoe/dist/nccl.hpp>

using namespace limoe;

// Device memory: the host-side sums and the type-erased host communicator refuse it at compile time.
static_assert(dist::Communicator<dist::NcclComm>);
static_assert(!dist::HostCommunicator<dist::NcclComm>);
static_assert(!std::is_constructible_v<dist::AnyComm, dist::NcclComm>);
static_assert(dist::HostCommunicator<dist::MpiComm> && dist::HostCommunicator<dist::SingleProcess>);

namespace {
int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// A device copy of `host`, freed with the object.
struct DeviceBuffer {
  void* p = nullptr;
  std::size_t bytes = 0;
  template <class T>
  explicit DeviceBuffer(const std::vector<T>& host) : bytes(host.size() * sizeof(T)) {
    dist::detail::cuda_check(cudaMalloc(&p, bytes), "cudaMalloc");
    dist::detail::cuda_check(cudaMemcpy(p, host.data(), bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  ~DeviceBuffer() { cudaFree(p); }
  template <class T>
  std::vector<T> host() const {
    std::vector<T> out(bytes / sizeof(T));
    dist::detail::cuda_check(cudaMemcpy(out.data(), p, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
    return out;
  }
};
}  // namespace

TEST_CASE("NCCL: all-gather, all-to-all, broadcast and split on device buffers") {
  dist::MpiComm world(MPI_COMM_WORLD);
  dist::NcclComm gpus(world, world.rank() % device_count());
  const int P = gpus.size(), me = gpus.rank();
  CHECK(P == world.size());
  CHECK(me == world.rank());
  const int n = 1000;
  std::vector<float> mine(n), all(static_cast<std::size_t>(n) * P, 0.f);
  for (int i = 0; i < n; ++i) mine[i] = static_cast<float>(me * 10000 + i);
  DeviceBuffer d_mine(mine), d_all(all);
  dist::all_gather(gpus, std::span<const float>(static_cast<const float*>(d_mine.p), n),
                   std::span<float>(static_cast<float*>(d_all.p), all.size()));
  const auto got = d_all.host<float>();
  bool ok = true;
  for (int r = 0; r < P; ++r)
    for (int i = 0; i < n; ++i) ok &= got[static_cast<std::size_t>(r * n + i)] == static_cast<float>(r * 10000 + i);
  CHECK(ok);
  // All-to-all: block p of rank r holds r * 100 + p; rank r receives block r of every p.
  std::vector<std::int32_t> send(static_cast<std::size_t>(P) * 4), recv(send.size(), -1);
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < 4; ++i) send[static_cast<std::size_t>(p * 4 + i)] = me * 100 + p;
  DeviceBuffer d_send(send), d_recv(recv);
  gpus.all_to_all_bytes(d_send.p, d_recv.p, 4 * sizeof(std::int32_t));
  const auto r2 = d_recv.host<std::int32_t>();
  ok = true;
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < 4; ++i) ok &= r2[static_cast<std::size_t>(p * 4 + i)] == p * 100 + me;
  CHECK(ok);
  std::vector<double> b{me == P - 1 ? 2.5 : 0.0};
  DeviceBuffer d_b(b);
  gpus.broadcast_bytes(d_b.p, sizeof(double), P - 1);
  CHECK(d_b.host<double>()[0] == 2.5);
  dist::NcclComm half = gpus.split(me % 2, me);
  CHECK(half.size() == (P + 1 - me % 2) / 2);
  CHECK(half.rank() == me / 2);
  CHECK_THROWS_WITH_AS(gpus.broadcast_bytes(d_b.p, 8, P), doctest::Contains("is not a rank"), Error);
}

int main(int argc, char** argv) {
  dist::MpiSession mpi(&argc, &argv);
  if (device_count() == 0) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    std::printf("skipped: no CUDA device (%s); the NCCL communicator needs one\n",
                e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
