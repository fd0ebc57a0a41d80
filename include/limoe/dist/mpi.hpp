// limoe/dist/mpi.hpp: the MPI communicator (opt-in: link the CMake target limoe::mpi, which brings MPI).
//
//   limoe::dist::MpiSession mpi(argc, argv);      // MPI_Init_thread .. MPI_Finalize
//   limoe::dist::MpiComm world = mpi.world();
//   limoe::Trainer trainer(model, cfg, world);
//
// Every MPI call's status is checked (the communicator returns errors instead of aborting), and a failure is a
// limoe::Error naming the call. A rank that fails must end the job: `MpiSession::abort(message)` prints the
// message and calls MPI_Abort on the world, which ends every rank (none waits forever in a collective).
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <exception>
#include <cstddef>
#include <cstdio>
#include <string>
#include <utility>

#include "limoe/core/error.hpp"
#include "limoe/dist/comm.hpp"
#include "limoe/dist/launcher.hpp"

namespace limoe::dist {

namespace detail {
inline void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  ::limoe::fail("MPI: ", what, " failed: ", std::string(msg, static_cast<std::size_t>(len)));
}
inline int mpi_count(std::size_t n, const char* what) {
  LIMOE_CHECK(n <= static_cast<std::size_t>(INT_MAX), "MPI: ", what, " of ", n,
              " bytes per rank exceeds one message (2 GiB); split it into buckets");
  return static_cast<int>(n);
}
}  // namespace detail

class MpiComm {
 public:
  MpiComm() = default;
  // Wraps `comm` (not owned unless `owned`: split() results are freed with the last copy's owner).
  explicit MpiComm(MPI_Comm comm, bool owned = false) : comm_(comm), owned_(owned) {
    detail::mpi_check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    int level = MPI_THREAD_SINGLE;
    detail::mpi_check(MPI_Query_thread(&level), "MPI_Query_thread");
    any_thread_ = level >= MPI_THREAD_SERIALIZED;
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  MpiComm(MpiComm&& o) noexcept { *this = std::move(o); }
  MpiComm& operator=(MpiComm&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = o.comm_, owned_ = o.owned_, rank_ = o.rank_, size_ = o.size_, any_thread_ = o.any_thread_;
      o.comm_ = MPI_COMM_NULL, o.owned_ = false;
    }
    return *this;
  }
  ~MpiComm() { release(); }

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm handle() const { return comm_; }
  // MPI was initialised at MPI_THREAD_SERIALIZED or more: any thread may call it, one at a time (the trainer then
  // sums gradients on a thread of its own during the backward pass).
  bool calls_from_any_thread() const { return any_thread_; }

  void all_gather_bytes(const void* send, void* recv, std::size_t n) {
    const int c = detail::mpi_count(n, "all-gather");
    detail::mpi_check(MPI_Allgather(send, c, MPI_BYTE, recv, c, MPI_BYTE, comm_), "MPI_Allgather");
  }
  void all_to_all_bytes(const void* send, void* recv, std::size_t n) {
    const int c = detail::mpi_count(n, "all-to-all");
    detail::mpi_check(MPI_Alltoall(send, c, MPI_BYTE, recv, c, MPI_BYTE, comm_), "MPI_Alltoall");
  }
  void broadcast_bytes(void* data, std::size_t n, int root) {
    LIMOE_CHECK(root >= 0 && root < size_, "MpiComm::broadcast: root ", root, " is not a rank of ", size_);
    detail::mpi_check(MPI_Bcast(data, detail::mpi_count(n, "broadcast"), MPI_BYTE, root, comm_), "MPI_Bcast");
  }
  MpiComm split(int color, int key) const {
    MPI_Comm sub = MPI_COMM_NULL;
    detail::mpi_check(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
    return MpiComm(sub, true);
  }

 private:
  void release() {
    // Freeing is collective in the MPI standard: while an exception unwinds (this rank is failing and will end
    // the job), the handle is left to MPI_Abort instead of waiting for peers that may never come.
    if (owned_ && comm_ != MPI_COMM_NULL && std::uncaught_exceptions() == 0) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL, owned_ = false;
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owned_ = false;
  int rank_ = 0, size_ = 1;
  bool any_thread_ = false;
};
static_assert(Communicator<MpiComm>);

// MPI for the life of this object, at MPI_THREAD_SERIALIZED where the library provides it: the thread that made
// it and the trainer's gradient-sum thread call MPI, never at the same time (dist/background_sum.hpp); the pool's
// worker threads never do. A library providing only MPI_THREAD_FUNNELED still works: the gradient is then summed
// after the backward pass, on the calling thread.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv) {
    int inited = 0;
    MPI_Initialized(&inited);
    LIMOE_CHECK(!inited, "MpiSession: MPI is already initialised");
    int provided = 0;
    detail::mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
    LIMOE_CHECK(provided >= MPI_THREAD_FUNNELED, "MPI: the library provides thread level ", provided,
                ", limoe needs MPI_THREAD_FUNNELED");
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }

  MpiComm world() const { return MpiComm(MPI_COMM_WORLD); }

  // Ends every rank of the job: prints `message` (prefixed by this rank) and calls MPI_Abort. Never returns.
  [[noreturn]] static void abort(const std::string& message, int code = 1) {
    int rank = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    std::fprintf(stderr, "limoe: rank %d: %s\n", rank, message.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::abort();
  }

  // Whether this process was started by an MPI launcher (mpirun / mpiexec / srun with PMI): the command line
  // tool initialises MPI only then, so a plain run never touches it.
  static bool launched() { return launcher_processes() > 0; }
};

}  // namespace limoe::dist
