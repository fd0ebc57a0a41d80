// limoe/moe/top_k.hpp: each token's K largest gates, best first (semantics §3 step 3), the one formula the
// sequential router (moe/router.hpp) and the Thrust routing (moe/parallel_routing.hpp, host and device) share.
// Host-device code only: nvcc compiles this header for the GPU.
#pragma once

#include <cstdint>

#include "limoe/math/host_device.hpp"

namespace limoe::moe {

namespace detail {
// The K largest entries of g[0, E), best first; ties go to the lower expert index.
template <int KStatic, class T>
LIMOE_HD inline void select_top_k(const T* g, int E, int K, std::int32_t* out) {
  if constexpr (KStatic == 1) {
    int best = 0;
    for (int e = 1; e < E; ++e)
      if (g[e] > g[best]) best = e;
    out[0] = best;
  } else {
    const int k_n = KStatic > 0 ? KStatic : K;
    for (int k = 0; k < k_n; ++k) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int j = 0; j < k; ++j) taken |= out[j] == e;
        if (taken) continue;
        if (best < 0 || g[e] > g[best]) best = e;
      }
      out[k] = best;
    }
  }
}

}  // namespace detail

}  // namespace limoe::moe
