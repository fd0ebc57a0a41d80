// The CUDA part on a real device: the device query, the saxpy kernel against the CPU, and the Thrust dispatch
// sort against std::stable_sort, the shared formulas, the backend's LayerNorm kernels against Ref. Runs only where a
// GPU is present (the main skips otherwise).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <limoe/cuda.hpp>
#include <limoe/math/gelu.hpp>
#include <limoe/math/softmax.hpp>
#include <limoe/ops/layernorm.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <numeric>
#include <vector>

namespace {
// The reference: the stable permutation that groups assignments by expert id.
std::vector<std::int32_t> cpu_order(const std::vector<std::int32_t>& ids) {
  std::vector<std::int32_t> order(ids.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return ids[a] < ids[b]; });
  return order;
}
}  // namespace

TEST_CASE("device query reports every device with a compute capability") {
  const int n = limoe::cuda::device_count();
  REQUIRE(n > 0);
  const auto devs = limoe::cuda::devices();
  REQUIRE(static_cast<int>(devs.size()) == n);
  for (int i = 0; i < n; ++i) {
    CHECK(devs[i].index == i);
    CHECK(!devs[i].name.empty());
    CHECK(devs[i].major >= 7);  // CUDA 13 supports Turing (7.5) and newer
    CHECK(devs[i].total_memory > 0);
    CHECK(devs[i].multiprocessors > 0);
  }
  CHECK(limoe::cuda::unavailable_reason().empty());
  CHECK(limoe::cuda::runtime_version() >= 12000);
}

TEST_CASE("saxpy matches the CPU, for sizes around the block size and beyond one grid") {
  for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{255}, std::size_t{257}, std::size_t{1} << 20,
                        std::size_t{20000000}}) {
    std::vector<float> x(n), y(n), expect(n);
    for (std::size_t i = 0; i < n; ++i) {
      x[i] = static_cast<float>(i % 97) * 0.5f;
      y[i] = static_cast<float>(i % 13) - 6.f;
      expect[i] = 3.f * x[i] + y[i];  // exact in float for these small integers and halves
    }
    limoe::cuda::saxpy(3.f, x, y);
    CHECK(y == expect);
  }
}

TEST_CASE("saxpy rejects bad arguments with limoe::Error") {
  std::vector<float> x(3), y(4);
  CHECK_THROWS_WITH_AS(limoe::cuda::saxpy(1.f, x, y), doctest::Contains("x has 3 elements but y has 4"),
                       limoe::Error);
  std::vector<float> z(3);
  CHECK_THROWS_WITH_AS(limoe::cuda::saxpy(1.f, x, z, limoe::cuda::device_count()),
                       doctest::Contains("out of range"), limoe::Error);
  CHECK_THROWS_AS(limoe::cuda::saxpy(1.f, x, z, -1), limoe::Error);
}

TEST_CASE("stable_sort_by_expert is a stable grouping by expert id") {
  CHECK(limoe::cuda::stable_sort_by_expert(std::vector<std::int32_t>{}).empty());
  CHECK(limoe::cuda::stable_sort_by_expert(std::vector<std::int32_t>{5}) == std::vector<std::int32_t>{0});
  // Hand example: experts of 6 assignments; ties keep token order.
  const std::vector<std::int32_t> small{2, 0, 2, 1, 0, 2};
  CHECK(limoe::cuda::stable_sort_by_expert(small) == std::vector<std::int32_t>{1, 4, 3, 0, 2, 5});
  // Many ties (E = 8 experts), a size that needs several sort passes, and negative / large ids.
  for (std::size_t n : {std::size_t{1000}, std::size_t{1} << 20}) {
    std::vector<std::int32_t> ids(n);
    std::uint32_t s = 12345u;
    for (auto& v : ids) {
      s = s * 1664525u + 1013904223u;  // LCG: deterministic, no <random> distribution differences
      v = static_cast<std::int32_t>((s >> 16) % 8);
    }
    CHECK(limoe::cuda::stable_sort_by_expert(ids) == cpu_order(ids));
  }
  const std::vector<std::int32_t> wide{INT32_MAX, -3, 0, INT32_MIN, -3, INT32_MAX};
  CHECK(limoe::cuda::stable_sort_by_expert(wide) == cpu_order(wide));
}

TEST_CASE("the shared math formulas give the same values on the device as on the CPU") {
  const std::int64_t rows = 37, cols = 9;
  std::vector<float> x(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((static_cast<int>(i * 7919 % 201) - 100) * 0.05);
  const auto dev = limoe::cuda::math_rows(x, cols);
  std::vector<float> sm(x.size());
  for (std::int64_t r = 0; r < rows; ++r) limoe::math::softmax_row(x.data() + r * cols, cols, sm.data() + r * cols);
  for (std::size_t i = 0; i < x.size(); ++i) {
    CHECK(dev.softmax[i] == doctest::Approx(sm[i]).epsilon(1e-5));
    CHECK(dev.gelu[i] == doctest::Approx(limoe::math::gelu(limoe::GeluKind::Erf, x[i])).epsilon(1e-5));
    CHECK(dev.dgelu[i] == doctest::Approx(limoe::math::gelu_grad(limoe::GeluKind::Erf, x[i])).epsilon(1e-5));
  }
}

TEST_CASE("the CUDA backend's LayerNorm kernels on the device equal the Ref backend") {
  const std::int64_t rows = 6, D = 384;
  const auto x = limoe::testing::randn<float>(limoe::Shape{rows, D}, 1, 3.0);
  const auto g = limoe::testing::randn<float>(limoe::Shape{D}, 2), b = limoe::testing::randn<float>(limoe::Shape{D}, 3);
  const auto dy = limoe::testing::randn<float>(limoe::Shape{rows, D}, 4);
  const auto dev = limoe::cuda::layernorm_rows(x.cview().span(), g.cview().span(), b.cview().span(), dy.cview().span(), D, 1e-6f);
  limoe::Tensor<float> y(limoe::Shape{rows, D}), mean(limoe::Shape{rows}), rstd(limoe::Shape{rows}), dx(limoe::Shape{rows, D}),
      dg(limoe::Shape{D}), db(limoe::Shape{D});
  limoe::ref::layernorm_forward<float>(x.cview(), g.cview(), b.cview(), 1e-6f, y.view(), mean.view(), rstd.view());
  limoe::ref::layernorm_backward<float>(x.cview(), g.cview(), mean.cview(), rstd.cview(), dy.cview(), dx.view(), dg.view(),
                                        db.view());
  for (std::int64_t i = 0; i < rows * D; ++i) {
    CHECK(dev.y[static_cast<std::size_t>(i)] == doctest::Approx(y[i]).epsilon(1e-5));
    CHECK(dev.dx[static_cast<std::size_t>(i)] == doctest::Approx(dx[i]).epsilon(1e-4));
  }
  for (std::int64_t d = 0; d < D; ++d) {
    CHECK(dev.dg[static_cast<std::size_t>(d)] == doctest::Approx(dg[d]).epsilon(1e-4));
    CHECK(dev.db[static_cast<std::size_t>(d)] == doctest::Approx(db[d]).epsilon(1e-4));
  }
  CHECK_THROWS_AS(limoe::cuda::layernorm_rows(x.cview().span(), g.cview().span(), {}, dy.cview().span(), D + 1, 1e-6f),
                  limoe::Error);
}
