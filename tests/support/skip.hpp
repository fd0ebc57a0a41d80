// tests/support/skip.hpp: honest skips. A test case whose data or optional library is missing calls
// LIMOE_SKIP("why") instead of passing silently; when every test case a test program ran was skipped, the
// program exits 77, which CTest reports as "Not Run (skipped)" (SKIP_RETURN_CODE 77 in tests/CMakeLists.txt).
#pragma once

#include <atomic>

namespace limoe_test {
inline std::atomic<int> skipped_test_cases{0};
}  // namespace limoe_test

// Prints "skipped: <why>" and leaves the test case.
#define LIMOE_SKIP(...)                           \
  do {                                            \
    MESSAGE("skipped: ", __VA_ARGS__);            \
    ++::limoe_test::skipped_test_cases;           \
    return;                                       \
  } while (0)
