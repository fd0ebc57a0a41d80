// limoe/core/profile.hpp: where a run's time goes, op by op (docs/profiling.md).
//
//   profile::Profiler prof;
//   {
//     profile::Session on(prof);   // records while it lives (one session at a time)
//     model.forward(images, texts, Mode::Eval);
//   }
//   for (const auto& r : prof.totals()) ...   // {path, calls, seconds}, largest first
//
// Every op called through a backend's op table (backend/op_table.hpp) is a region named after the op; the MoE
// layer, the model and the trainer add regions for their work outside the ops ("moe_forward", its "route",
// "losses", "statistics"; "bf16_weights", "optimizer"). A region opened inside another is recorded under the
// path "outer/inner", and each path gets its self time: its wall time less its inner regions'. So the paths'
// times add up to the time spent inside regions, and what a run spends outside them (host loops between ops,
// copies) is the difference to its wall time.
//
// On a device backend a region waits for the device at both ends (the memory space's synchronize()), so its
// time is the device's time for that region's work, not the host's time to queue it. This serialises the host
// with the device: profiled runs are slower than plain ones, and their figures say where the time goes, not
// how fast the run is. With no session active a region costs one relaxed atomic load.
//
// Light (no op code): the CUDA backend's nvcc-compiled sources include it through backend/op_table.hpp.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "limoe/core/error.hpp"

namespace limoe::profile {

struct RegionTotal {
  std::string path;        // "op", or "outer/inner" for a region opened inside another
  std::int64_t calls = 0;  // times the region was entered
  double seconds = 0;      // self time: wall time less the inner regions'
};

class Profiler {
 public:
  void add(const std::string& path, double seconds) {
    std::lock_guard<std::mutex> lock(mu_);
    RegionTotal& t = totals_[path];
    t.path = path;
    ++t.calls;
    t.seconds += seconds;
  }
  // Every path seen, largest self time first.
  std::vector<RegionTotal> totals() const {
    std::vector<RegionTotal> v;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const auto& [path, t] : totals_) v.push_back(t);
    }
    std::stable_sort(v.begin(), v.end(), [](const RegionTotal& a, const RegionTotal& b) { return a.seconds > b.seconds; });
    return v;
  }
  // The sum of every path's self time: the time spent inside regions.
  double seconds() const {
    std::lock_guard<std::mutex> lock(mu_);
    double s = 0;
    for (const auto& [path, t] : totals_) s += t.seconds;
    return s;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, RegionTotal> totals_;
};

namespace detail {
inline std::atomic<Profiler*> g_active{nullptr};
struct Frame {
  std::string path;
  std::chrono::steady_clock::time_point t0;
  double inner = 0;  // wall time of the regions opened inside this one
};
// The open regions of this thread, outermost first.
inline std::vector<Frame>& stack() {
  thread_local std::vector<Frame> s;
  return s;
}
}  // namespace detail

// Makes `p` the profiler that regions report to while the session lives. One session at a time.
class Session {
 public:
  explicit Session(Profiler& p) {
    Profiler* none = nullptr;
    LIMOE_CHECK(detail::g_active.compare_exchange_strong(none, &p), "profile::Session: another session is active");
  }
  ~Session() { detail::g_active.store(nullptr); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
};

// One timed region of work on memory space S (HostSpace: host work; a device space: the device's work, waited
// for at both ends). Ends at stop() or at the end of its scope; regions end in the reverse order of their start.
template <class S>
class Region {
 public:
  explicit Region(const char* name) : p_(detail::g_active.load(std::memory_order_relaxed)) {
    if (!p_) return;
    wait();
    auto& st = detail::stack();
    std::string path = st.empty() ? std::string(name) : st.back().path + "/" + name;
    st.push_back({std::move(path), std::chrono::steady_clock::now(), 0.0});
  }
  void stop() noexcept {
    if (!p_) return;
    Profiler* p = p_;
    p_ = nullptr;
    try {
      wait();
    } catch (...) {  // a failed device: the op's own error is the one to report
    }
    auto& st = detail::stack();
    if (st.empty()) return;
    detail::Frame f = std::move(st.back());
    st.pop_back();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - f.t0).count();
    if (!st.empty()) st.back().inner += wall;
    try {
      p->add(f.path, std::max(0.0, wall - f.inner));
    } catch (...) {  // out of memory for a new path: the region goes unrecorded
    }
  }
  ~Region() { stop(); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

 private:
  static void wait() {
    if constexpr (requires { S::synchronize(); }) S::synchronize();
  }
  Profiler* p_;
};

}  // namespace limoe::profile
