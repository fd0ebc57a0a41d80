// limoe/testing/gradcheck.hpp: central finite differences against analytic gradients, in double precision.
//
// Usage: fill an analytic gradient g for inputs x, then
//   auto r = limoe::testing::check_gradient(x, g, [&] { return loss(); });
//   CHECK(r.rel_error < 1e-7);
// The loss closure reads x (which the checker perturbs in place and restores). The error is
// ||g - g_fd|| / max(||g + g_fd||, tiny) as in mlpack's gradient checkers, plus the worst element.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string>

#include "limoe/core/rng.hpp"
#include "limoe/core/tensor.hpp"

namespace limoe::testing {

struct GradCheckResult {
  double rel_error = 0;   // ||g - g_fd|| / ||g + g_fd||
  double max_abs_error = 0;
  std::size_t worst = 0;  // index of the largest absolute difference
  double analytic_at_worst = 0, numeric_at_worst = 0;
  std::string str() const {
    return "rel_error=" + std::to_string(rel_error) + " max_abs_error=" + std::to_string(max_abs_error) +
           " at " + std::to_string(worst) + " (analytic " + std::to_string(analytic_at_worst) + ", numeric " +
           std::to_string(numeric_at_worst) + ")";
  }
};

template <class Loss>
GradCheckResult check_gradient(std::span<double> x, std::span<const double> analytic, Loss&& loss,
                               double h = 1e-6) {
  LIMOE_CHECK(x.size() == analytic.size(), "check_gradient: ", x.size(), " inputs but ", analytic.size(),
              " gradient entries");
  GradCheckResult r;
  double diff2 = 0, sum2 = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double lp = loss();
    x[i] = saved - h;
    const double lm = loss();
    x[i] = saved;
    const double numeric = (lp - lm) / (2 * h);
    const double d = analytic[i] - numeric;
    diff2 += d * d;
    sum2 += (analytic[i] + numeric) * (analytic[i] + numeric);
    if (std::abs(d) >= r.max_abs_error) {
      r.max_abs_error = std::abs(d);
      r.worst = i;
      r.analytic_at_worst = analytic[i];
      r.numeric_at_worst = numeric;
    }
  }
  r.rel_error = sum2 > 0 ? std::sqrt(diff2) / std::sqrt(sum2) : std::sqrt(diff2);
  return r;
}

template <class Loss>
GradCheckResult check_gradient(View<double> x, CView<double> analytic, Loss&& loss, double h = 1e-6) {
  return check_gradient(x.span(), analytic.span(), std::forward<Loss>(loss), h);
}

// Fills a tensor with N(0, scale^2) values from a counter-based stream (reproducible test inputs).
template <class T>
void fill_normal(View<T> v, std::uint64_t seed, double scale = 1.0) {
  const Rng rng(seed);
  for (index_t i = 0; i < v.numel(); ++i) v[i] = static_cast<T>(scale * rng.normal(0, static_cast<std::uint64_t>(i)));
}

// A tensor of N(0, scale^2) values (see fill_normal).
template <class T>
Tensor<T> randn(Shape s, std::uint64_t seed, double scale = 1.0) {
  Tensor<T> t(s);
  fill_normal(t.view(), seed, scale);
  return t;
}

// max |a - b| relative to the largest |b| (at least 1): how far a fast path is from its double reference.
template <class A>
double max_diff(const Tensor<A>& a, const Tensor<double>& b) {
  LIMOE_CHECK(a.numel() == b.numel(), "max_diff: sizes ", a.numel(), " and ", b.numel(), " differ");
  double worst = 0, scale = 1;
  for (index_t i = 0; i < a.numel(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return worst / scale;
}

// sum_i a[i] * b[i] in double: turns a vector output into a scalar loss with a random upstream gradient.
template <class T, class U>
double dot(CView<T> a, CView<U> b) {
  LIMOE_CHECK(a.numel() == b.numel(), "dot: sizes ", a.numel(), " and ", b.numel(), " differ");
  double s = 0;
  for (index_t i = 0; i < a.numel(); ++i) s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

}  // namespace limoe::testing
