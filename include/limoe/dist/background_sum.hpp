// limoe/dist/background_sum.hpp: sums over ranks, bucket by bucket, on a thread of their own, while the caller
// goes on computing: the data-parallel gradient sum overlapped with the backward pass (docs/distributed.md).
//
//   dist::BackgroundSum<dist::MpiComm, float> sum(comm);
//   sum.push(span_of_final_gradients);   // queued; summed in push order by the thread (dist::all_reduce_sum)
//   ...                                  // more backward, more pushes
//   sum.wait();                          // every pushed bucket summed on every rank; rethrows the thread's error
//
// Every rank must push the same buckets (sizes) in the same order: they are collectives. The sum of an element
// does not depend on how the buffer is cut into buckets (each element is added in rank order), so the result is
// bit for bit that of one all_reduce_sum over the whole buffer after the pass.
//
// While the thread is summing, the caller must not use the communicator (MPI_THREAD_SERIALIZED: calls from any
// thread, one at a time); `wait()` before the next collective of its own.
#pragma once

#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <mutex>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "limoe/dist/comm.hpp"

namespace limoe::dist {

// Whether the communicator may be called from a thread other than the one that made it (one thread at a time):
// `C::calls_from_any_thread()` where C says, else no.
template <class C>
bool calls_from_any_thread(const C& comm) {
  if constexpr (requires { { comm.calls_from_any_thread() } -> std::convertible_to<bool>; })
    return comm.calls_from_any_thread();
  else
    return false;
}

template <HostCommunicator C, class T>
class BackgroundSum {
 public:
  explicit BackgroundSum(C& comm) : comm_(comm) {}
  BackgroundSum(const BackgroundSum&) = delete;
  BackgroundSum& operator=(const BackgroundSum&) = delete;
  // Lets the thread finish what was pushed, then ends it. A rank unwinding from an error has pushed a prefix of
  // what the other ranks push (the same buckets in the same order), so those collectives complete and the rank
  // goes on to end the job (the command line's MPI_Abort), instead of waiting here for buckets it never pushed.
  ~BackgroundSum() {
    {
      std::unique_lock lock(mu_);
      stop_ = true;
    }
    work_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  void push(std::span<T> bucket) {
    if (bucket.empty()) return;
    {
      std::unique_lock lock(mu_);
      if (!thread_.joinable()) thread_ = std::thread([this] { run(); });
      queue_.push_back(bucket);
      ++pending_;
    }
    work_.notify_one();
  }

  // Blocks until every pushed bucket is summed; rethrows the first error the thread met (once).
  void wait() {
    std::unique_lock lock(mu_);
    done_.wait(lock, [&] { return pending_ == 0; });
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

  // Seconds the thread spent in sums since the last call (time hidden behind the caller's work, or not).
  double take_busy_seconds() {
    std::unique_lock lock(mu_);
    return std::exchange(busy_seconds_, 0.0);
  }

 private:
  void run() {
    std::unique_lock lock(mu_);
    for (;;) {
      work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and nothing left
      const std::span<T> bucket = queue_.front();
      queue_.pop_front();
      const bool skip = error_ != nullptr;  // after a failed collective the others would only wait
      lock.unlock();
      const auto t0 = std::chrono::steady_clock::now();
      std::exception_ptr err;
      if (!skip) {
        try {
          all_reduce_sum(comm_, bucket, scratch_);
        } catch (...) {
          err = std::current_exception();
        }
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      lock.lock();
      busy_seconds_ += s;
      if (err && !error_) error_ = err;
      if (--pending_ == 0) done_.notify_all();
    }
  }

  C& comm_;
  std::mutex mu_;
  std::condition_variable work_, done_;
  std::deque<std::span<T>> queue_;
  std::size_t pending_ = 0;  // pushed and not yet summed
  bool stop_ = false;
  std::exception_ptr error_;
  double busy_seconds_ = 0;
  std::vector<T> scratch_;  // the thread's own
  std::thread thread_;      // last: started on the first push, after every member it uses exists
};

}  // namespace limoe::dist
