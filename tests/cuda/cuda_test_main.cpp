// The main of every CUDA test executable: runs doctest when a CUDA device is usable; otherwise checks that
// the no-device path is clean (0 devices, an empty list, limoe::Error with the CUDA error string instead of
// a crash) and exits 77, which CTest reports as skipped (SKIP_RETURN_CODE in tests/cuda/tests.cmake).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <limoe/cuda.hpp>
#include <string>
#include <vector>

namespace {
constexpr int kSkip = 77;

// Returns an empty string when the no-device behaviour is right, else what is wrong.
std::string check_no_device_path() {
  if (!limoe::cuda::devices().empty()) return "devices() is not empty although device_count() is 0";
  if (limoe::cuda::unavailable_reason().empty()) return "unavailable_reason() is empty without a device";
  std::vector<float> x(4, 1.f), y(4, 2.f);
  try {
    limoe::cuda::saxpy(2.f, x, y);
    return "saxpy did not throw without a device";
  } catch (const limoe::Error& e) {
    if (std::string(e.what()).find("CUDA") == std::string::npos)
      return std::string("saxpy's error does not name the CUDA error: ") + e.what();
  }
  const std::vector<std::int32_t> ids{2, 0, 1};
  try {
    (void)limoe::cuda::stable_sort_by_expert(ids);
    return "stable_sort_by_expert did not throw without a device";
  } catch (const limoe::Error&) {
  }
  if (y != std::vector<float>(4, 2.f)) return "saxpy changed y although it failed";
  return {};
}
}  // namespace

int main(int argc, char** argv) {
  if (limoe::cuda::device_count() == 0) {
    const std::string problem = check_no_device_path();
    if (!problem.empty()) {
      std::fprintf(stderr, "FAILED (no-device path): %s\n", problem.c_str());
      return 1;
    }
    std::printf("SKIPPED: no usable CUDA device (%s); the no-device path is clean\n",
                limoe::cuda::unavailable_reason().c_str());
    return kSkip;
  }
  for (const auto& d : limoe::cuda::devices())
    std::printf("CUDA device %d: %s, compute capability %d.%d, %zu MiB, %d SMs (runtime %d)\n", d.index,
                d.name.c_str(), d.major, d.minor, d.total_memory >> 20, d.multiprocessors,
                limoe::cuda::runtime_version());
  doctest::Context context(argc, argv);
  return context.run();
}
