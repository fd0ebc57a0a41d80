// Core: tensors and views, errors, the counter-based generator, the matrix product against a naive loop.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <limoe/core/block_pool.hpp>
#include <limoe/core/profile.hpp>
#include <limoe/limoe.hpp>
#include <limoe/testing/gradcheck.hpp>
#include <new>
#include <set>
#include <utility>
#include <vector>

using namespace limoe;

TEST_CASE("shape and view checks name both shapes") {
  Tensor<float> t(Shape{2, 3});
  CHECK(t.numel() == 6);
  auto v = t.view().reshape(Shape{3, 2});
  CHECK(v.dim(0) == 3);
  CHECK_THROWS_WITH_AS(t.view().reshape(Shape{4, 2}), doctest::Contains("[2, 3]"), Error);
  CHECK_THROWS_AS(t.view().slice(1, 3), Error);
  CHECK_THROWS_WITH_AS(expect_shape(t.view(), Shape{3, 2}, "x"), doctest::Contains("expected shape [3, 2]"), Error);
  auto row1 = t.view()(1);
  row1[2] = 5.f;
  CHECK(t[5] == 5.f);
  CHECK(t.view().slice(1, 2).numel() == 3);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
}

namespace {
// A memory space the host may not touch (what a device space is), backed by host memory so the test can
// count what the tensor asks of it.
struct CountingOpaqueSpace {
  static constexpr bool host_accessible = false;
  static constexpr const char* name = "opaque";
  static inline int allocations = 0, frees = 0;
  static void* allocate(std::size_t bytes) {
    ++allocations;
    return HostSpace::allocate(bytes);
  }
  static void deallocate(void* p, std::size_t n) noexcept {
    ++frees;
    HostSpace::deallocate(p, n);
  }
  static void zero(void* p, std::size_t n) { HostSpace::zero(p, n); }
  static void copy(void* d, const void* s, std::size_t n) { HostSpace::copy(d, s, n); }
  static void upload(void* d, const void* s, std::size_t n) { HostSpace::copy(d, s, n); }
  static void download(void* d, const void* s, std::size_t n) { HostSpace::copy(d, s, n); }
};
template <class V>
concept HasElementAccess = requires(V v) { v[0]; };
}  // namespace

TEST_CASE("tensors: resize keeps elements and zero-fills new ones; growth is geometric; copies are deep") {
  Tensor<float> t(Shape{2, 3});
  for (index_t i = 0; i < 6; ++i) t[i] = static_cast<float>(i + 1);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
  t.resize(Shape{3, 3});  // grows: the first 6 kept, the new 3 zero
  for (index_t i = 0; i < 6; ++i) CHECK(t[i] == static_cast<float>(i + 1));
  for (index_t i = 6; i < 9; ++i) CHECK(t[i] == 0.0f);
  const float* at = t.data();
  t.resize(Shape{2});  // shrinks: the buffer stays
  CHECK(t.data() == at);
  t[1] = 7;
  t.resize(Shape{4});  // regrows within capacity: elements past the old size are zero again
  CHECK(t.data() == at);
  CHECK(t[1] == 7.0f);
  CHECK(t[2] == 0.0f);
  CHECK(t[3] == 0.0f);
  Tensor<float> c = t;  // deep copy
  c[0] = 42;
  CHECK(t[0] == 1.0f);
  Tensor<float> m = std::move(c);
  CHECK(m[0] == 42.0f);
  CHECK(c.numel() == 0);
  CHECK(c.data() == nullptr);

  // Growth past capacity at least doubles: 100 calls growing by one element reallocate a handful of times.
  CountingOpaqueSpace::allocations = CountingOpaqueSpace::frees = 0;
  {
    Tensor<float, CountingOpaqueSpace> g(Shape{16});
    for (index_t n = 17; n < 117; ++n) g.resize(Shape{n});
    CHECK(CountingOpaqueSpace::allocations <= 4);
    static_assert(!HasElementAccess<View<float, CountingOpaqueSpace>>, "no host access to an opaque space");
    static_assert(HasElementAccess<View<float>>);
    static_assert(MemorySpace<CountingOpaqueSpace>);
  }
  CHECK(CountingOpaqueSpace::frees == CountingOpaqueSpace::allocations);
}

TEST_CASE("rng: counter based, reproducible, well distributed") {
  Rng a(42), b(42), c(43);
  CHECK(a.normal(3, 7) == b.normal(3, 7));
  CHECK(a.normal(3, 7) != c.normal(3, 7));
  CHECK(a.normal(3, 7) != a.normal(3, 8));
  CHECK(a.normal(3, 7) != a.normal(4, 7));
  CHECK(a.derive(1).seed() != a.derive(2).seed());
  double s = 0, s2 = 0, u = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double x = a.normal(0, static_cast<std::uint64_t>(i));
    s += x;
    s2 += x * x;
    const double y = a.uniform(1, static_cast<std::uint64_t>(i));
    CHECK_UNARY(y > 0.0);
    CHECK_UNARY(y < 1.0);
    u += y;
  }
  CHECK(std::abs(s / n) < 0.01);
  CHECK(std::abs(s2 / n - 1.0) < 0.02);
  CHECK(std::abs(u / n - 0.5) < 0.005);
}

// normal()'s own log and cos (plain arithmetic, so a loop of draws vectorises and a GPU runs the same
// operations) against libm over (0, 1): a grid, the smallest and largest uniforms normal() can draw (2^-54 and
// 1 - 2^-54), the folding points of cos (1/4, 1/2, 3/4) and both sides of log's sqrt(2) split; then draws
// against Box-Muller on libm's log and cos for the same counters.
TEST_CASE("rng: normal()'s log and cos against libm, and its draws against libm's Box-Muller") {
  double log_err = 0, cos_err = 0;
  auto check_at = [&](double u) {
    log_err = std::max(log_err, std::abs(Rng::log_unit(u) - std::log(u)) / std::max(std::abs(std::log(u)), 1e-300));
    cos_err = std::max(cos_err, std::abs(Rng::cos_2pi(u) - std::cos(6.283185307179586476925 * u)));
  };
  for (int i = 0; i < 200000; ++i) check_at((i + 0.5) / 200000.0);
  for (double u : {0x1.0p-54, 1e-300, 1e-12, 0.25, 0.5, 0.75, 1.0 - 0x1.0p-54, 0.7071067811865475, 0.7071067811865476,
                   std::nextafter(0.25, 0.0), std::nextafter(0.25, 1.0), 1.0})
    check_at(u);
  CHECK(log_err < 1e-15);
  CHECK(cos_err < 2e-15);
  const Rng a(7);
  double d = 0;
  for (int i = 0; i < 100000; ++i) {
    const auto b = a.bits(2, static_cast<std::uint64_t>(i));
    const double u1 = ((std::uint64_t{b[0]} << 21 ^ b[1]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    const double u2 = ((std::uint64_t{b[2]} << 21 ^ b[3]) % (std::uint64_t{1} << 53) + 0.5) * 0x1.0p-53;
    const double want = std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
    d = std::max(d, std::abs(a.normal(2, static_cast<std::uint64_t>(i)) - want));
  }
  CHECK(d < 1e-14);
}

// math/plain.hpp's exp, log and erfc (plain arithmetic: a loop of them vectorises, a GPU runs the same
// operations) against libm: ulps for exp and log on log-uniform samples over their whole ranges, erfc's relative
// error on uniform samples over [-8, 26.2] (where it is at least 1e-300) and around the points where its
// formula changes hands (0, the mapping's centre 3.75, the clamp at 30); the edges: exp's flush to 0 and
// overflow to inf, erfc's limits, NaN passed through; and safe_log's floor.
TEST_CASE("math: plain exp, log and erfc against libm; safe_log's floor") {
  auto ulps = [](double a, double b) {
    std::int64_t ia = 0, ib = 0;
    std::memcpy(&ia, &a, sizeof a);
    std::memcpy(&ib, &b, sizeof b);
    return ia > ib ? ia - ib : ib - ia;
  };
  const Rng r(11);
  std::int64_t exp_ulp = 0, log_ulp = 0;
  double erfc_rel = 0;
  for (int i = 0; i < 400000; ++i) {
    const double u = r.uniform(1, static_cast<std::uint64_t>(i)), v = r.uniform(2, static_cast<std::uint64_t>(i));
    const double x = -708.0 + 1417.0 * u;
    exp_ulp = std::max(exp_ulp, ulps(math::plain_exp(x), std::exp(x)));
    const double y = std::exp(-707.0 + 1414.0 * v);  // positive normal doubles over their whole range
    log_ulp = std::max(log_ulp, ulps(math::plain_log(y), std::log(y)));
    const double z = -8.0 + 34.2 * u;
    erfc_rel = std::max(erfc_rel, std::abs(math::plain_erfc(z) - std::erfc(z)) / std::erfc(z));
  }
  for (double z : {0.0, -0.0, 1e-300, -1e-300, 3.75, std::nextafter(3.75, 0.0), 0.5, -0.5, 1.0, -1.0, 26.0, -26.0, -30.0})
    erfc_rel = std::max(erfc_rel, std::abs(math::plain_erfc(z) - std::erfc(z)) / std::erfc(z));
  for (double y : {1.0, std::nextafter(1.0, 2.0), std::nextafter(1.0, 0.0), 0.7071067811865475, 1.4142135623730951,
                   1.4142135623730954, 2.2250738585072014e-308, 1.7976931348623157e308})
    log_ulp = std::max(log_ulp, ulps(math::plain_log(y), std::log(y)));
  CHECK(exp_ulp <= 1);
  CHECK(log_ulp <= 2);
  CHECK(erfc_rel < 3e-15);
  CHECK(math::plain_exp(0.0) == 1.0);
  CHECK(math::plain_exp(-708.5) == 0.0);
  CHECK(math::plain_exp(-1e300) == 0.0);
  CHECK(std::isinf(math::plain_exp(709.5)));
  CHECK(std::isnan(math::plain_exp(std::nan(""))));
  CHECK(math::plain_erfc(26.7) == 0.0);
  CHECK(math::plain_erfc(1e300) == 0.0);
  CHECK(math::plain_erfc(INFINITY) == 0.0);
  CHECK(math::plain_erfc(-INFINITY) == 2.0);
  CHECK(math::plain_erfc(-1e300) == 2.0);
  CHECK(std::isnan(math::plain_erfc(std::nan(""))));
  // safe_log: log p above exp(-700), -700 at and below it (0 log 0 = 0 in the entropies), no NaN for 0 or -0.
  CHECK(math::safe_log(0.5) == math::plain_log(0.5));
  CHECK(math::safe_log(1e-300) == doctest::Approx(std::log(1e-300)).epsilon(1e-15));
  for (double p : {0.0, -0.0, 1e-310, 9.8e-305, -1.0}) CHECK(math::safe_log(p) == -700.0);
  CHECK(math::entropy(std::array<double, 3>{0.5, 0.5, 0.0}.data(), 3) == doctest::Approx(std::log(2.0)).epsilon(1e-15));
}

TEST_CASE("gemm: all transposes, beta, threads agree with a naive double loop") {
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (Trans ta : {Trans::N, Trans::T})
      for (Trans tb : {Trans::N, Trans::T}) {
        const index_t M = 70, N = 130, K = 300;
        Tensor<float> A(ta == Trans::N ? Shape{M, K} : Shape{K, M}), B(tb == Trans::N ? Shape{K, N} : Shape{N, K});
        Tensor<float> C(Shape{M, N});
        testing::fill_normal(A.view(), 1);
        testing::fill_normal(B.view(), 2);
        testing::fill_normal(C.view(), 3);
        Tensor<float> C0 = C;
        gemm<float>(ta, tb, M, N, K, 0.5f, A.data(), A.dim(1), B.data(), B.dim(1), 2.0f, C.data(), N);
        double worst = 0;
        for (index_t i = 0; i < M; ++i)
          for (index_t j = 0; j < N; ++j) {
            double acc = 0;
            for (index_t k = 0; k < K; ++k) {
              const double a = ta == Trans::N ? A[i * K + k] : A[k * M + i];
              const double b = tb == Trans::N ? B[k * N + j] : B[j * K + k];
              acc += a * b;
            }
            worst = std::max(worst, std::abs(0.5 * acc + 2.0 * C0[i * N + j] - C[i * N + j]));
          }
        CHECK(worst < 1e-3);
      }
  }
  set_num_threads(0);
}

// How gemm splits a product over the thread pool (detail::split_product): blocks that depend on the shape only,
// cover C once, and are whole rows where a long K makes a C of one block worth cutting (a weight gradient).
TEST_CASE("gemm's split: shape-only blocks that cover C once; a long-K product of one block cut into row blocks") {
  struct Block { index_t m0, m1, n0, n1; };
  auto blocks_of = [](index_t M, index_t N, index_t K) {
    std::vector<Block> out;
    std::mutex mu;
    detail::split_product(M, N, K, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
      const std::lock_guard<std::mutex> lock(mu);
      out.push_back({m0, m1, n0, n1});
    });
    std::sort(out.begin(), out.end(), [](const Block& a, const Block& b) { return a.m0 != b.m0 ? a.m0 < b.m0 : a.n0 < b.n0; });
    return out;
  };
  auto covers_once = [](const std::vector<Block>& b, index_t M, index_t N) {
    std::vector<int> seen(static_cast<std::size_t>(M * N), 0);
    for (const Block& x : b)
      for (index_t i = x.m0; i < x.m1; ++i)
        for (index_t j = x.n0; j < x.n1; ++j) ++seen[static_cast<std::size_t>(i * N + j)];
    return std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; });
  };
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    // B/32's attention weight gradient, dy^T x over 1,568 rows: 1.85 GFLOP in a C of one block, cut into 4 row
    // blocks of 192 whole rows (on one thread as on two).
    const auto wgrad = blocks_of(768, 768, 1568);
    CHECK(wgrad.size() == 4);
    for (const Block& b : wgrad) CHECK((b.n0 == 0 && b.n1 == 768 && b.m1 - b.m0 == 192));
    CHECK(covers_once(wgrad, 768, 768));
    // A C of one small block (B small: blocks of 256) and a C too short to cut: one call.
    CHECK(blocks_of(200, 200, 1000).size() == 1);
    CHECK(blocks_of(100, 768, 100000).size() == 1);
    // Tall products keep their blocks of rows (an even count), wide ones their blocks of columns.
    const auto tall = blocks_of(4096, 1536, 384);
    CHECK(tall.size() % 2 == 0);
    CHECK(covers_once(tall, 4096, 1536));
    const auto wide = blocks_of(300, 3000, 700);
    CHECK(wide.size() > 1);
    for (const Block& b : wide) CHECK((b.m0 == 0 && b.m1 == 300));
    CHECK(covers_once(wide, 300, 3000));
  }
  set_num_threads(0);
}

// gemm_nt_narrow (the router's logits): C = A B^T against a double loop, over widths and inner dimensions that
// leave every tail (K mod 16 and mod 8, N mod 8, M mod 3); and each row's bits the same computed alone, as a
// caller splitting M over threads would.
template <class T>
void check_gemm_nt_narrow(double tol) {
  const Rng r(5);
  for (index_t M : {1, 2, 3, 4, 7}) {
    for (index_t N : {1, 3, 8, 9, 17}) {
      for (index_t K : {1, 7, 8, 15, 16, 17, 33, 385}) {
        const index_t lda = K + 3, ldb = K + 1, ldc = N + 2;
        std::vector<T> A(static_cast<std::size_t>(M * lda)), B(static_cast<std::size_t>(N * ldb));
        std::vector<T> C(static_cast<std::size_t>(M * ldc), T(-7)), row(static_cast<std::size_t>(ldc), T(-7));
        for (std::size_t i = 0; i < A.size(); ++i) A[i] = static_cast<T>(r.normal(1, i));
        for (std::size_t i = 0; i < B.size(); ++i) B[i] = static_cast<T>(r.normal(2, i));
        gemm_nt_narrow<T>(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc);
        double err = 0;
        bool same_alone = true;
        for (index_t i = 0; i < M; ++i) {
          gemm_nt_narrow<T>(1, N, K, A.data() + i * lda, lda, B.data(), ldb, row.data(), ldc);
          for (index_t j = 0; j < N; ++j) {
            double want = 0, scale = 0;
            for (index_t k = 0; k < K; ++k) {
              want += static_cast<double>(A[i * lda + k]) * static_cast<double>(B[j * ldb + k]);
              scale += std::abs(static_cast<double>(A[i * lda + k]) * static_cast<double>(B[j * ldb + k]));
            }
            err = std::max(err, std::abs(static_cast<double>(C[i * ldc + j]) - want) / scale);
            same_alone = same_alone && row[j] == C[i * ldc + j];
          }
          CHECK(C[i * ldc + N] == T(-7));  // nothing written past N
        }
        INFO("M ", M, " N ", N, " K ", K);
        CHECK(err < tol);
        CHECK(same_alone);
      }
    }
  }
}

TEST_CASE("gemm_nt_narrow: against a double loop at every tail; a row's bits do not depend on the split") {
  check_gemm_nt_narrow<float>(1e-6);
  check_gemm_nt_narrow<double>(1e-14);
}

TEST_CASE("param store: names, flat buffers, errors") {
  ParamStore<float> ps;
  auto w = ps.add("a.weight", Shape{2, 3}, true);
  auto b = ps.add("a.bias", Shape{2}, false);
  CHECK_THROWS_AS(ps.add("a.bias", Shape{2}, false), Error);
  CHECK_THROWS_AS(ps.value(w), Error);
  ps.finalize();
  CHECK(ps.size() == 8);
  ps.value(b)[1] = 3.f;
  CHECK(ps.values()[7] == 3.f);
  CHECK(ps.get("a.weight").id == w.id);
  CHECK_THROWS_WITH_AS(ps.get("nope"), doctest::Contains("nope"), Error);
  // Gradients are allocated on first use (inference never pays for them), zeroed.
  CHECK_FALSE(ps.has_grads());
  CHECK_THROWS_WITH_AS(std::as_const(ps).grads(), doctest::Contains("no gradients yet"), Error);
  ps.grad(w)[0] += 2.f;
  CHECK(ps.has_grads());
  CHECK(std::as_const(ps).grads()[0] == 2.f);
  CHECK(std::as_const(ps).grads()[7] == 0.f);
  ps.zero_grad();
  CHECK(ps.grads()[0] == 0.f);
}

TEST_CASE("gradient checker: detects a wrong gradient") {
  std::vector<double> x{0.3, -1.2, 2.0};
  auto loss = [&] { return x[0] * x[0] + std::sin(x[1]) * x[2]; };
  std::vector<double> good{2 * x[0], std::cos(x[1]) * x[2], std::sin(x[1])};
  std::vector<double> bad = good;
  bad[2] *= 1.01;
  CHECK(testing::check_gradient(std::span<double>(x), std::span<const double>(good), loss).rel_error < 1e-8);
  CHECK(testing::check_gradient(std::span<double>(x), std::span<const double>(bad), loss).rel_error > 1e-4);
}

namespace {
// A raw allocator over host memory that counts, and fails once `budget` bytes are out.
struct CountingRaw {
  static inline std::size_t out = 0, budget = ~std::size_t{0};
  static inline int allocations = 0, releases = 0;
  static void* allocate(std::size_t bytes) noexcept {
    if (out + bytes > budget) return nullptr;
    out += bytes, ++allocations;
    return ::operator new(bytes, std::nothrow);
  }
  static void release(void* p, std::size_t bytes) noexcept {
    out -= bytes, ++releases;
    ::operator delete(p);
  }
};
}  // namespace

TEST_CASE("block pool: blocks are reused by size class, and the cache is returned when the space runs out") {
  using Pool = BlockPool<CountingRaw>;
  // Size classes: multiples of 512 bytes up to 1 MiB, then eight steps per power of two (at most 12.5% more).
  CHECK(Pool::size_class(1) == 512);
  CHECK(Pool::size_class(512) == 512);
  CHECK(Pool::size_class(513) == 1024);
  CHECK(Pool::size_class(std::size_t{1} << 20) == std::size_t{1} << 20);
  for (std::size_t b : {std::size_t{1048577}, std::size_t{3000000}, std::size_t{123456789}}) {
    const std::size_t c = Pool::size_class(b);
    CHECK(c >= b);
    CHECK(static_cast<double>(c) <= 1.125 * static_cast<double>(b) + 1);
  }
  {
    Pool pool;
    void* a = pool.allocate(1000);
    void* b = pool.allocate(5000);
    REQUIRE((a && b && a != b));
    CHECK(CountingRaw::allocations == 2);
    pool.deallocate(a, 1000);
    void* c = pool.allocate(900);  // the same class (1024): the cached block, no new allocation
    CHECK(c == a);
    CHECK(CountingRaw::allocations == 2);
    CHECK(pool.stats().hits == 1);
    void* d = pool.allocate(1000);  // its block is taken: a new one
    CHECK(d != a);
    CHECK(CountingRaw::allocations == 3);
    pool.deallocate(c, 900), pool.deallocate(d, 1000), pool.deallocate(b, 5000);
    CHECK(pool.stats().live_bytes == 0);
    CHECK(pool.stats().cached_bytes == 1024 + 1024 + 5120);
    // The space runs out: the cache goes back to it and the allocation succeeds.
    CountingRaw::budget = CountingRaw::out + 4096;
    void* big = pool.allocate(8000);
    CHECK(big != nullptr);
    CHECK(pool.stats().cached_bytes == 0);
    CHECK(CountingRaw::releases == 3);
    // Nothing left to return: the failure is reported (nullptr), not hidden.
    CHECK(pool.allocate(std::size_t{1} << 30) == nullptr);
    pool.deallocate(big, 8000);
    CountingRaw::budget = ~std::size_t{0};
  }
  CHECK(CountingRaw::out == 0);  // the pool's destructor returned every cached block
}

TEST_CASE("profile: a region's self time leaves out its inner regions; paths name the nesting; stop() ends early") {
  using namespace std::chrono_literals;
  profile::Profiler prof;
  double wall = 0;
  {
    profile::Session on(prof);
    const auto t0 = std::chrono::steady_clock::now();
    {
      profile::Region<HostSpace> outer("outer");
      std::this_thread::sleep_for(20ms);
      for (int i = 0; i < 2; ++i) {
        profile::Region<HostSpace> inner("inner");
        std::this_thread::sleep_for(15ms);
      }
      profile::Region<HostSpace> part("part");
      std::this_thread::sleep_for(5ms);
      part.stop();
      part.stop();  // a second stop records nothing more
      std::this_thread::sleep_for(5ms);  // after part ended: outer's own
    }
    wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  { profile::Region<HostSpace> after("after"); }  // no session: not recorded
  std::map<std::string, profile::RegionTotal> t;
  for (const auto& r : prof.totals()) t[r.path] = r;
  REQUIRE(t.size() == 3);
  CHECK(t["outer"].calls == 1);
  CHECK(t["outer/inner"].calls == 2);
  CHECK(t["outer/part"].calls == 1);
  CHECK(t["outer/inner"].seconds >= 0.030);
  CHECK(t["outer/part"].seconds >= 0.005);
  CHECK(t["outer"].seconds >= 0.025);  // its own 20 + 5 ms
  // Self times: the three add up to no more than the wall time (without the subtraction outer alone would
  // count the inner regions' 35 ms a second time).
  CHECK(t["outer"].seconds + t["outer/inner"].seconds + t["outer/part"].seconds <= wall);
  CHECK(prof.seconds() <= wall);
}
