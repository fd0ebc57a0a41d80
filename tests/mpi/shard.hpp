// tests/mpi/shard.hpp: what the MPI test programs share: a rank's rows of a whole batch.
#pragma once

#include <limoe/core/tensor.hpp>

namespace limoe::testing {

// Rows [first, first + n) of t along its first dimension (a rank's shard of the step's batch).
template <class U>
CView<U> rows(const Tensor<U>& t, index_t first, index_t n) {
  Shape s = t.shape();
  const index_t per = t.numel() / s[0];
  s[0] = n;
  return CView<U>(t.data() + first * per, s);
}

}  // namespace limoe::testing
