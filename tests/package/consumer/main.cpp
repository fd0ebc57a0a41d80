// The package test's consumer: uses the installed headers (tensors, the threaded gemm on oneTBB, errors) and,
// when present, the CUDA part, which must answer cleanly without a GPU.
#include <cstdio>
#include <limoe/limoe.hpp>
#include <string>
#include <vector>
#ifdef LIMOE_CONSUMER_CUDA
#include <limoe/cuda.hpp>
#endif

int main() {
  using limoe::Shape;
  using limoe::Tensor;
  // C[2, 2] = A[2, 3] B[3, 2]
  const auto a = Tensor<float>::from(Shape{2, 3}, {1, 2, 3, 4, 5, 6});
  const auto b = Tensor<float>::from(Shape{3, 2}, {7, 8, 9, 10, 11, 12});
  Tensor<float> c(Shape{2, 2});
  limoe::gemm(limoe::Trans::N, limoe::Trans::N, 2, 2, 3, 1.f, a.data(), 3, b.data(), 2, 0.f, c.data(), 2);
  const std::vector<float> expect{58, 64, 139, 154};
  for (int i = 0; i < 4; ++i) {
    if (c[i] != expect[static_cast<std::size_t>(i)]) {
      std::fprintf(stderr, "gemm: c[%d] = %g, expected %g\n", i, c[i], expect[static_cast<std::size_t>(i)]);
      return 1;
    }
  }
  // oneTBB through the library's thread pool.
  std::vector<int> hits(1000, 0);
  limoe::parallel_for(0, 1000, 10, [&](limoe::index_t begin, limoe::index_t end) {
    for (limoe::index_t i = begin; i < end; ++i) hits[static_cast<std::size_t>(i)] += 1;
  });
  for (int h : hits)
    if (h != 1) return 1;
  // Errors are limoe::Error and name both shapes.
  try {
    (void)c.view().reshape(Shape{3, 2});
    return 1;
  } catch (const limoe::Error& e) {
    if (std::string(e.what()).find("[2, 2]") == std::string::npos) return 1;
  }
#ifdef LIMOE_CONSUMER_CUDA
  const int devices = limoe::cuda::device_count();
  std::printf("limoe::cuda: %d device(s)%s%s\n", devices, devices ? "" : ": ",
              limoe::cuda::unavailable_reason().c_str());
  std::vector<float> x{1, 2}, y{3, 4};
  if (devices > 0) {
    limoe::cuda::saxpy(2.f, x, y);
    if (y != std::vector<float>{5, 8}) return 1;
  } else {
    try {
      limoe::cuda::saxpy(2.f, x, y);
      return 1;
    } catch (const limoe::Error&) {
    }
  }
#endif
  std::printf("limoe consumer: ok\n");
  return 0;
}
