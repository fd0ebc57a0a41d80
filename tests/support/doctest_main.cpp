// tests/support/doctest_main.cpp: the doctest main of every test program. It runs doctest as usual and exits
// 77 (CTest: skipped) when every test case that ran called LIMOE_SKIP, so a test whose data or library is
// missing is counted as skipped, not passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "support/skip.hpp"

namespace {
std::atomic<int> started_test_cases{0};

// Counts the test cases that start (a listener: the normal console reporter still prints everything).
struct StartCounter : doctest::IReporter {
  explicit StartCounter(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData&) override { ++started_test_cases; }
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};
}  // namespace

REGISTER_LISTENER("limoe_start_counter", 1, StartCounter);

int main(int argc, char** argv) {
  doctest::Context ctx(argc, argv);
  const int res = ctx.run();
  if (ctx.shouldExit()) return res;
  const int started = started_test_cases.load(), skipped = limoe_test::skipped_test_cases.load();
  if (res == 0 && started > 0 && skipped >= started) {
    std::printf("SKIPPED: all %d test case(s) of this program were skipped (see the \"skipped:\" lines above)\n",
                started);
    return 77;
  }
  return res;
}
