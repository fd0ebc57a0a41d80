// Conan test_package: the installed headers compile and the dependencies link (Eigen gemm, oneTBB pool).
#include <cstdio>
#include <limoe/limoe.hpp>

int main() {
  const auto a = limoe::Tensor<float>::from(limoe::Shape{2, 2}, {1, 2, 3, 4});
  limoe::Tensor<float> c(limoe::Shape{2, 2});
  limoe::gemm(limoe::Trans::N, limoe::Trans::T, 2, 2, 2, 1.f, a.data(), 2, a.data(), 2, 0.f, c.data(), 2);
  std::printf("limoe test_package: c = [%g %g; %g %g], %d threads\n", c[0], c[1], c[2], c[3], limoe::num_threads());
  return c[0] == 5.f && c[3] == 25.f ? 0 : 1;
}
