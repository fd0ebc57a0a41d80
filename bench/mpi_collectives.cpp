// Times the collectives of expert- and data-parallel training on the ranks mpirun starts (one JSON line per
// collective and size, from rank 0): limoe's deterministic sum over ranks (dist::all_reduce_sum) against MPI's
// own MPI_Allreduce (the peer), and the equal-block all-to-all of the expert exchange. docs/scaling.md uses
// the figures to calibrate its model.
//
//   mpirun -np 2 build/bench/mpi_collectives [--repeats R]
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <limoe/dist/mpi.hpp>

namespace {
using clock_type = std::chrono::steady_clock;

template <class F>
double median_seconds(limoe::dist::MpiComm& comm, int repeats, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < repeats + 1; ++r) {
    MPI_Barrier(comm.handle());
    const auto t0 = clock_type::now();
    f();
    double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_MAX, comm.handle());  // the slowest rank's time
    if (r > 0) t.push_back(s);                                                 // the first call warms up
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  limoe::dist::MpiSession mpi(&argc, &argv);
  int repeats = 10;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--repeats") == 0) repeats = std::max(1, std::atoi(argv[i + 1]));
  limoe::dist::MpiComm comm = mpi.world();
  const int P = comm.size();
  std::vector<float> buf, scratch, out;
  for (std::size_t mib : {1, 4, 16, 64}) {
    const std::size_t n = mib * (std::size_t{1} << 20) / sizeof(float);
    buf.assign(n, 1.0f);
    out.assign(n, 0.0f);
    const double ours = median_seconds(comm, repeats, [&] { limoe::dist::all_reduce_sum(comm, std::span<float>(buf), scratch); });
    const double peer = median_seconds(comm, repeats, [&] {
      MPI_Allreduce(buf.data(), out.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, comm.handle());
    });
    std::vector<float> recv(n);
    const std::size_t block = n / static_cast<std::size_t>(P) * sizeof(float);
    const double a2a = median_seconds(comm, repeats, [&] { comm.all_to_all_bytes(buf.data(), recv.data(), block); });
    if (comm.rank() == 0) {
      const double bytes = static_cast<double>(n) * sizeof(float);
      std::printf("{\"collective\":\"all_reduce_sum\",\"impl\":\"limoe\",\"ranks\":%d,\"mib\":%zu,\"median_s\":%.6g,\"bus_gbs\":%.4g}\n",
                  P, mib, ours, 2.0 * (P - 1) / P * bytes / ours / 1e9);
      std::printf("{\"collective\":\"all_reduce_sum\",\"impl\":\"MPI_Allreduce\",\"ranks\":%d,\"mib\":%zu,\"median_s\":%.6g,\"bus_gbs\":%.4g}\n",
                  P, mib, peer, 2.0 * (P - 1) / P * bytes / peer / 1e9);
      std::printf("{\"collective\":\"all_to_all\",\"impl\":\"MPI_Alltoall\",\"ranks\":%d,\"mib\":%zu,\"median_s\":%.6g,\"bus_gbs\":%.4g}\n",
                  P, mib, a2a, (P - 1.0) / P * bytes / a2a / 1e9);
    }
  }
  return 0;
}
