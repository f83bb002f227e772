// Exact merge of attention partials computed over disjoint key ranges, by their
// log-sum-exp. Shared by the ring prefill and the sharded decode.
#pragma once

#include <cmath>
#include <limits>

#include "attnforge/sdpa.hpp"

namespace attnforge::mpi {

// Folds one partial row (out_p, lse_p) into the running row (out, lse). A row whose
// lse is -inf has no allowed key; merging only such rows leaves a zero row, the core's
// EmptyRowPolicy::kZeros result.
template <typename T, typename A>
inline void merge_lse_row(T* out, A& lse, const T* out_p, A lse_p, Index head_dim) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  if (lse_p == kNegInf) return;
  if (lse == kNegInf) {
    for (Index d = 0; d < head_dim; ++d) out[d] = out_p[d];
    lse = lse_p;
    return;
  }
  const A merged = std::max(lse, lse_p) + std::log1p(std::exp(-std::abs(lse - lse_p)));
  const A keep = std::exp(lse - merged);
  const A take = std::exp(lse_p - merged);
  for (Index d = 0; d < head_dim; ++d) {
    out[d] = static_cast<T>(keep * static_cast<A>(out[d]) + take * static_cast<A>(out_p[d]));
  }
  lse = merged;
}

// Folds a whole partial (B, H, Sq, D) / (B, H, Sq) into the accumulator of the same shape.
template <typename T>
inline void merge_partial(SdpaResult<T>& acc, const SdpaResult<T>& part) {
  const Index rows = acc.lse.size();
  const Index head_dim = acc.out.dimension(3);
  for (Index r = 0; r < rows; ++r) {
    merge_lse_row(acc.out.data() + r * head_dim, acc.lse.data()[r],
                  part.out.data() + r * head_dim, part.lse.data()[r], head_dim);
  }
}

// An accumulator with no keys yet: zero rows, lse -inf.
template <typename T>
inline SdpaResult<T> empty_partial(Index batch, Index heads, Index rows, Index head_dim) {
  SdpaResult<T> acc{Tensor<T, 4>(batch, heads, rows, head_dim),
                    Tensor<acc_t<T>, 3>(batch, heads, rows)};
  acc.out.setZero();
  acc.lse.setConstant(-std::numeric_limits<acc_t<T>>::infinity());
  return acc;
}

}  // namespace attnforge::mpi
