// limoe/eval/summary.hpp: the statistics of an experiment over seeds (docs/experiments.md): the mean and sample
// standard deviation of a metric per arm, and the paired difference of two arms over the seeds both ran, with
// its two-sided 95% Student-t interval.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <map>
#include <vector>

#include "limoe/core/error.hpp"

namespace limoe {

// The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1; the normal's 1.96 beyond 30, where
// the table's last entry is 2.042, within 4%).
inline double t_quantile_975(int df) {
  static constexpr std::array<double, 30> t{12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                                            2.201,  2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                                            2.080,  2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042};
  LIMOE_CHECK(df >= 1, "t_quantile_975: degrees of freedom must be >= 1, got ", df);
  return df <= 30 ? t[static_cast<std::size_t>(df - 1)] : 1.96;
}

struct MeanSd {
  std::size_t n = 0;
  double mean = 0, sd = 0;  // sd: the sample standard deviation (n - 1); 0 for one value
};

inline MeanSd mean_sd(const std::vector<double>& v) {
  MeanSd r;
  r.n = v.size();
  if (v.empty()) return r;
  for (double x : v) r.mean += x;
  r.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    double ss = 0;
    for (double x : v) ss += (x - r.mean) * (x - r.mean);
    r.sd = std::sqrt(ss / static_cast<double>(v.size() - 1));
  }
  return r;
}

// The paired difference arm - baseline over the seeds both have: its mean and 95% interval mean +- t * sd / sqrt(n)
// (defined for n >= 2; with one pair, lo = hi = the difference and `n` says so).
struct PairedDiff {
  std::size_t n = 0;
  double mean = 0, lo = 0, hi = 0;
  bool excludes_zero() const { return n >= 2 && (lo > 0 || hi < 0); }
};

inline PairedDiff paired_difference(const std::map<int, double>& arm, const std::map<int, double>& baseline) {
  std::vector<double> d;
  for (const auto& [seed, v] : arm)
    if (auto it = baseline.find(seed); it != baseline.end()) d.push_back(v - it->second);
  PairedDiff r;
  const MeanSd m = mean_sd(d);
  r.n = m.n;
  r.mean = m.mean;
  r.lo = r.hi = m.mean;
  if (m.n >= 2) {
    const double half = t_quantile_975(static_cast<int>(m.n) - 1) * m.sd / std::sqrt(static_cast<double>(m.n));
    r.lo = m.mean - half;
    r.hi = m.mean + half;
  }
  return r;
}

}  // namespace limoe
