// The stated accuracy of scaled-dot-product attention against the exact (double) result,
// as a function of the problem, for every SdpaPath and element type. README.md tabulates
// it; tests/test_accuracy.cpp enforces it per dtype and mask type; test_robustness.cpp
// and the fuzz target (tests/fuzz/) hold every output they check to it.
//
// Notation: u is the unit roundoff of the accumulator (2^-24 for float, 2^-53 for
// double); D = head_dim; N = the most keys any row may attend to; S = the largest score
// magnitude the kernel forms before the softmax, bounded by
//   S = scale * max_{i,j} sum_d |q[i,d] k[j,d]|   (the sum of |products|, not |<q, k>|)
//       + max |attn_bias| + max_h slope_h * Skv   (what the score biases add, if any).
//
// 1. Scores. A float score is D products summed by fused multiply-adds after q is
//    multiplied by scale (* log2(e), folded in by the kernels): gamma_(D+2) * S. The
//    exponent is taken of (score - running max), one more rounding of a value <= 2S
//    (a score bias adds one rounding of a value <= S), and the exp2 of simd.hpp adds 1 ulp (its
//    stated bound); the decode path's merge of chunk log-sum-exps adds two more roundings of values
//    <= S + log2(N). So every exponent is off by at most
//        delta = (D + 8) u S   (+ c (tanh_err + 4u) with a softcap c: tanh's stated error
//                                and the multiplications around it).
// 2. Softmax. Perturbing each exponent by at most delta changes each weight p_j by a
//    factor in [e^(-2 delta), e^(2 delta)] after normalisation, so the output
//    sum_j p_j v_j moves by at most (e^(2 delta) - 1) max|v|.
// 3. Sums. The weight sum and the N-term output sum of positive weights times values are
//    accumulated in the accumulator type: gamma_N each, relative to the weight sum, i.e.
//    N u max|v| each; the lazy rescales (at most one per key tile) and the final
//    division add at most N u more. Total (3N + 16) u max|v|, the 16 covering the
//    roundings of the final scaling and of the decode path's chunk merge.
// So, in units of max|v| (the output is a convex combination of value rows):
//        |out - exact| <= (e^(2 delta) - 1) + (3N + 16) u                        (E_out)
//        |lse - exact| <= delta + (N + 8) u + u |lse|                            (E_lse)
// kReference accumulates in double and rounds once to T: E_out = u_T + E_out(double).
// Against the double brute force (tests/test_util.hpp), which has the same error
// structure in double, a double result is held to twice the double bound.
//
// These are worst-case bounds (errors adding up in one direction); random inputs land
// 100-1000x below them (README.md lists both). They are what a caller can rely on.
//
// 4. Caches of reduced precision: float activations over a bf16/fp16 cache (rounded) or a
//    QInt8 cache (quantized, qint8.hpp). The cache holds k~ = k + dk and v~ = v + dv and
//    the kernels compute on those within E_out and E_lse of the problem on k~ and v~
//    (budget_inputs of the stored values; E_out in units of max|v~|). Against the exact
//    result on the ORIGINAL k and v:
//    - each score moves by at most delta_K = scale * max_ij sum_d |q[i,d]| |dk[j,d]| (a
//      softcap c tanh(s / c) is 1-Lipschitz, so it moves no more; biases, ALiBi slopes and
//      sinks are the same on both sides);
//    - by 2., the weights then move the output by at most (e^(2 delta_K) - 1) max|v~|;
//    - the values move it by at most max|dv| (the weights sum to at most 1);
//    - lse, a log-sum-exp of the scores, moves by at most delta_K.
//    With E_V = max|dv| / max|v| (so max|v~| <= (1 + E_V) max|v|), in units of max|v|:
//        |out - exact| <= (E_out + e^(2 delta_K) - 1)(1 + E_V) + E_V               (E_cache)
//        |lse - exact| <= E_lse + delta_K
//    Each |dx| is bounded from the original x (storage_error_bound):
//    - bf16 / fp16, round to nearest: |dx| <= u_T |x|, u_T = 2^-8 / 2^-11 (8 and 11
//      significant bits); fp16 below its smallest normal 2^-14 adds 2^-25 absolute (and
//      above 65504 it overflows: no bound).
//    - QInt8: x is stored as q s, s = m / 127 with m = max |x| over x's group of 32
//      values and q = x / s rounded to nearest: |dx| <= s / 2 = m / 254, times (1 + 2^-13)
//      for the float arithmetic of the quantization (q from x / m * 127, two roundings of a
//      value <= 127: 2^-16 of a step; s and q s rounded: 127 * 2^-24 of a step each), plus
//      2^-143 absolute where s is subnormal (2^-150 on s times |q| <= 127, and on q s).
//    For 16-bit caches this is u_T S-sized score shifts; for QInt8 delta_K is
//        scale * max_ij sum_g (m_jg / 254) sum_{d in g} |q[i,d]|,
//    the per-group form of the same sum.
//
// 5. The int8 dot-product decode path (Int8Kernel) quantizes each query row as well, as
//    a cache row (after the kernel's pre-scale): it computes on q~ = q + dq, k~ and v~
//    within E_out and E_lse of the problem on (q~, k~, v~), and against the original
//    inputs each score moves by at most
//        delta = scale * max_ij sum_d (|q~[i,d]| |dk[j,d]| + |dq[i,d]| |k[j,d]|)
//    (q~ k~ - q k = q~ dk + dq k), which takes delta_K's place in E_cache.
//    Its value products are int8 dot products too: in each block of K keys
//    (detail::kInt8DecodeKeys, 32), row i's weight of key j in group g, p_j s_jg (s_jg
//    the value row's scale), is rounded to a multiple of the unit u = P S_g / 65535
//    (P = max_j p_j of the block, S_g = max_j s_jg), an error of at most u / 2 (plus float
//    rounding of the product that is rounded, below 0.01 u). The value bytes are
//    |v~_jd| / s_jg <= 127, so one key moves the unnormalised output by at most
//    0.51 u 127 <= 0.51 P max|v~| / 65535, a block by K times that, and as each block's P
//    is one of the terms of the weight sum l, the normalised output moves by at most
//    K * 0.51 / 65535 max|v~| (2.5e-4 for K = 32): E_out on the stored values grows by that.
//
// 6. The bf16 dot-product decode path (Bf16Kernel, over a bf16 cache) rounds each query
//    row to bf16 (the scale multiplies the scores afterwards, so bf16 queries stay exact),
//    |dq| <= 2^-8 |q|, and 5. applies with that q~. It also rounds each softmax weight to
//    bf16 before it multiplies the values, while the weights' sum is taken before that
//    rounding: the output moves by at most 2^-8 sum_j p_j |v~_j| <= 2^-8 max|v~|, so E_out
//    on the stored values grows by 2^-8.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "attnforge/attnforge.hpp"
#include "test_util.hpp"

namespace attnforge::test {

struct AccuracyBudget {
  double out;  // max |out - exact| / max |v|
  double lse;  // max |lse - exact| (natural log units)
};

// The problem quantities the bound depends on.
struct BudgetInputs {
  Index head_dim = 1;
  Index max_keys = 0;        // N: most allowed keys of any row (Skv bounds it)
  double max_score = 0.0;    // S: scale * max_ij sum_d |q_id k_jd|
  double softcap = 0.0;      // c, 0 = off
  double max_abs_lse = 0.0;  // max |lse| of the exact result over non-empty rows
};

namespace budget_detail {

// E_out and E_lse of a computation whose accumulator has unit roundoff u.
inline AccuracyBudget bound(const BudgetInputs& in, double u, double tanh_err) {
  const double d = static_cast<double>(in.head_dim);
  const double n = static_cast<double>(in.max_keys);
  double delta = (d + 8.0) * u * in.max_score;
  if (in.softcap > 0.0) delta += in.softcap * (tanh_err + 4.0 * u);
  return {std::expm1(2.0 * delta) + (3.0 * n + 16.0) * u,
          delta + (n + 8.0) * u + u * in.max_abs_lse};
}

inline constexpr double kFloatU = 0x1.0p-24;
inline constexpr double kDoubleU = 0x1.0p-53;
// simd.hpp: float tanh max absolute error 1.5e-7; double uses std::tanh (1 ulp-ish,
// taken as 2u).
inline constexpr double kFloatTanhErr = 1.5e-7;
inline constexpr double kDoubleTanhErr = 2.0 * kDoubleU;

}  // namespace budget_detail

// The bound for element type T on `path`, against the exact result (the double brute
// force dense_sdpa).
template <typename T>
AccuracyBudget sdpa_budget(SdpaPath path, const BudgetInputs& in) {
  using budget_detail::bound;
  const AccuracyBudget in_double =
      bound(in, budget_detail::kDoubleU, budget_detail::kDoubleTanhErr);
  if constexpr (std::is_same_v<T, double>) {
    // The library's double error plus the brute force's own, of the same form.
    return {2.0 * in_double.out, 2.0 * in_double.lse};
  } else {
    static_assert(std::is_same_v<T, float>, "budgets are stated for float and double");
    if (path == SdpaPath::kReference) {
      // Double accumulation, one rounding of out (|out| <= max|v|) and of lse to float.
      return {budget_detail::kFloatU + 2.0 * in_double.out,
              budget_detail::kFloatU * std::max(1.0, in.max_abs_lse) + 2.0 * in_double.lse};
    }
    return bound(in, budget_detail::kFloatU, budget_detail::kFloatTanhErr);
  }
}

// S = scale * max over (b, h, i) and (b, h / n_rep, j) of sum_d |q k|: every pair, masked
// or not (an upper bound of the allowed pairs' maximum).
template <typename T>
double max_score_magnitude(const Tensor<T, 4>& q, const Tensor<T, 4>& k, double scale) {
  const Index batch = q.dimension(0), n_heads = q.dimension(1), q_len = q.dimension(2);
  const Index head_dim = q.dimension(3), n_kv_heads = k.dimension(1), kv_len = k.dimension(2);
  const Index n_rep = n_heads / std::max<Index>(1, n_kv_heads);
  // |q| and |k| once, in double; then the pairwise sums on contiguous rows.
  std::vector<double> abs_q(static_cast<std::size_t>(q.size())),
      abs_k(static_cast<std::size_t>(k.size()));
  for (Index i = 0; i < q.size(); ++i)
    abs_q[static_cast<std::size_t>(i)] = std::abs(static_cast<double>(q.data()[i]));
  for (Index i = 0; i < k.size(); ++i)
    abs_k[static_cast<std::size_t>(i)] = std::abs(static_cast<double>(k.data()[i]));
  double worst = 0.0;
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < n_heads; ++h) {
      const double* k_head = abs_k.data() + ((b * n_kv_heads + h / n_rep) * kv_len) * head_dim;
      for (Index i = 0; i < q_len; ++i) {
        const double* q_row = abs_q.data() + ((b * n_heads + h) * q_len + i) * head_dim;
        for (Index j = 0; j < kv_len; ++j) {
          const double* k_row = k_head + j * head_dim;
          double sum = 0.0;
          for (Index d = 0; d < head_dim; ++d) sum += q_row[d] * k_row[d];
          worst = std::max(worst, sum);
        }
      }
    }
  }
  return std::abs(scale) * worst;
}

// The BudgetInputs of a problem: N counted from the exact probabilities (rows with no
// allowed key count Skv under kAttendAll, 0 otherwise), max |lse| from the exact result.
template <typename T>
BudgetInputs budget_inputs(const Tensor<T, 4>& q, const Tensor<T, 4>& k, const DenseMasks& masks,
                           const DenseOptions& options, const DenseResult& exact) {
  BudgetInputs in;
  in.head_dim = q.dimension(3);
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.dimension(3))));
  // S: the scores' magnitude plus what the biases may add.
  double max_bias = 0.0;
  if (masks.attn_bias) {
    for (Index i = 0; i < masks.attn_bias->size(); ++i) {
      const double x = std::abs(static_cast<double>(masks.attn_bias->data()[i]));
      if (std::isfinite(x)) max_bias = std::max(max_bias, x);
    }
  }
  double max_slope = 0.0;
  for (double slope : options.alibi_slopes) max_slope = std::max(max_slope, std::abs(slope));
  const Index q_len = q.dimension(2), kv_len = k.dimension(2);
  in.max_score =
      max_score_magnitude(q, k, scale) + max_bias + max_slope * static_cast<double>(kv_len);
  in.softcap = options.softcap;
  // N: the allowed keys of each (b, h, i) by every rule.
  for (Index b = 0; b < q.dimension(0); ++b) {
    for (Index h = 0; h < q.dimension(1); ++h) {
      for (const std::vector<bool>& row : dense_allowed(masks, b, h, q_len, kv_len)) {
        Index n = std::count(row.begin(), row.end(), true);
        if (n == 0 && options.attend_all_when_empty) n = kv_len;
        in.max_keys = std::max(in.max_keys, n);
      }
    }
  }
  for (Index i = 0; i < exact.lse.size(); ++i) {
    const double l = exact.lse.data()[i];
    if (std::isfinite(l)) in.max_abs_lse = std::max(in.max_abs_lse, std::abs(l));
  }
  return in;
}

// The largest storage error (bf16/fp16 rounding, QInt8 quantization) of each element
// of x (..., D), from x alone; 0 for a float cache. See 4. above.
template <typename KV, int Rank>
Tensor<double, Rank> storage_error_bound(const Tensor<float, Rank>& x) {
  Tensor<double, Rank> bound(x.dimensions());
  const Index head_dim = x.dimension(Rank - 1);
  for (Index r = 0; r < x.size() / std::max<Index>(1, head_dim); ++r) {
    const float* row = x.data() + r * head_dim;
    double* out = bound.data() + r * head_dim;
    if constexpr (detail::is_qint8_v<KV>) {
      for (Index g0 = 0; g0 < head_dim; g0 += detail::kQInt8Group) {
        const Index end = std::min(head_dim, g0 + detail::kQInt8Group);
        double m = 0.0;
        for (Index d = g0; d < end; ++d) m = std::max(m, std::abs(static_cast<double>(row[d])));
        const double half_step = m / 254.0 * (1.0 + 0x1.0p-13) + 0x1.0p-143;
        for (Index d = g0; d < end; ++d) out[d] = half_step;
      }
    } else {
      for (Index d = 0; d < head_dim; ++d) {
        const double a = std::abs(static_cast<double>(row[d]));
        if constexpr (std::is_same_v<KV, Eigen::bfloat16>) {
          out[d] = 0x1.0p-8 * a;
        } else if constexpr (std::is_same_v<KV, Eigen::half>) {
          out[d] = 0x1.0p-11 * a + (a < 0x1.0p-14 ? 0x1.0p-25 : 0.0);
        } else {
          static_assert(std::is_same_v<KV, float>,
                        "bounds are stated for float, bf16, fp16, QInt8");
          out[d] = 0.0;
        }
      }
    }
  }
  return bound;
}

// E_cache and its lse bound (4. above): `on_stored` is the budget of the problem on the
// stored values, delta_k the largest score shift and value_error E_V.
inline AccuracyBudget reduced_cache_budget(const AccuracyBudget& on_stored, double delta_k,
                                           double value_error) {
  return {(on_stored.out + std::expm1(2.0 * delta_k)) * (1.0 + value_error) + value_error,
          on_stored.lse + delta_k};
}

// The bound of float activations q over a cache of storage type KV holding the original
// k and v (all (B, H|Hkv, S, D) float), against the exact result on the originals.
// `on_stored` is sdpa_budget<float>(path, budget_inputs of q and the stored k~, v~).
template <typename KV>
AccuracyBudget cache_budget(const AccuracyBudget& on_stored, const Tensor<float, 4>& q,
                            const Tensor<float, 4>& k, const Tensor<float, 4>& v, double scale) {
  // delta_K is max_score_magnitude with |dk| in place of |k|.
  const double delta_k = max_score_magnitude(to_double(q), storage_error_bound<KV>(k), scale);
  const double v_scale = max_abs(v);
  const double value_error = v_scale > 0.0 ? max_abs(storage_error_bound<KV>(v)) / v_scale : 0.0;
  return reduced_cache_budget(on_stored, delta_k, value_error);
}

// Whether a call of q_len queries per head (n_rep heads per KV head) takes the decode
// path, as SdpaPath picks it.
inline bool takes_decode_path(SdpaPath path, Index q_len, Index n_rep) {
  return path == SdpaPath::kDecode ||
         (path == SdpaPath::kAuto && detail::decode_applies<float>(q_len, n_rep));
}

// Whether a call with these options over a QInt8 cache scores with int8 dot products on
// quantized queries (5. above): the decode path where Int8Kernel takes the dot products on
// this CPU and build.
inline bool scores_by_int8_dot(SdpaPath path, Int8Kernel kernel, Index q_len, Index n_rep,
                               Index head_dim) {
  const bool decode = takes_decode_path(path, q_len, n_rep);
  SdpaOptions options;
  options.int8_kernel = kernel;
  return decode && detail::use_int8_dot<float, QInt8>("scores_by_int8_dot", options, head_dim);
}

// Whether a call with these options, float queries over a bf16 cache, multiplies with the
// bf16 dot products of the decode kernel (6. above).
inline bool decodes_by_bf16_dot(SdpaPath path, Bf16Kernel kernel, Index q_len, Index n_rep,
                                Index head_dim) {
  const bool decode = takes_decode_path(path, q_len, n_rep);
  SdpaOptions options;
  options.bf16_kernel = kernel;
  try {
    return decode && detail::simd::kWidth<float> == detail::kBf16DotKeys &&
           detail::use_bf16_dot<float, Eigen::bfloat16>("decodes_by_bf16_dot", options, head_dim,
                                                        /*decode=*/true);
  } catch (const std::invalid_argument&) {
    return false;  // kDotProduct where they cannot run: the call would throw
  }
}

// q~ (5. above): the query rows as the kernel multiplies them. Each row is scaled
// by the kernel's pre-scale c (scale * log2 e; scale alone under a softcap), passed through
// round_trip(scaled, head_dim, back) (quantized or rounded, and restored to float), and
// divided by c again (in double).
template <typename RoundTrip>
Tensor<double, 4> prescaled_round_trip(const Tensor<float, 4>& q, double scale, bool softcap,
                                       RoundTrip round_trip) {
  const Index head_dim = q.dimension(3), rows = head_dim > 0 ? q.size() / head_dim : 0;
  const float c = static_cast<float>(scale * (softcap ? 1.0 : detail::kLog2e));
  Tensor<double, 4> out(q.dimensions());
  std::vector<float> scaled(static_cast<std::size_t>(head_dim));
  std::vector<float> back(static_cast<std::size_t>(head_dim));
  for (Index r = 0; r < rows; ++r) {
    for (Index d = 0; d < head_dim; ++d)
      scaled[static_cast<std::size_t>(d)] = q.data()[r * head_dim + d] * c;
    round_trip(scaled.data(), head_dim, back.data());
    for (Index d = 0; d < head_dim; ++d)
      out.data()[r * head_dim + d] = static_cast<double>(back[static_cast<std::size_t>(d)]) / c;
  }
  return out;
}

// q~ of the int8 dot products (5.): each pre-scaled row quantized as a cache row.
inline Tensor<double, 4> quantized_queries(const Tensor<float, 4>& q, double scale, bool softcap) {
  std::vector<QInt8> row(static_cast<std::size_t>(detail::qint8_row_bytes(q.dimension(3))));
  return prescaled_round_trip(q, scale, softcap, [&](const float* x, Index n, float* back) {
    detail::quantize_row(x, n, row.data());
    detail::dequantize_row(row.data(), n, back);
  });
}

// q~ of the bf16 dot products (6.): each query rounded to bf16 (to nearest even).
inline Tensor<double, 4> bf16_rounded_queries(const Tensor<float, 4>& q) {
  return q.cast<Eigen::bfloat16>().cast<double>();
}

// The budget on the stored values of the bf16 dot-product decode (6.): the weights'
// rounding to bf16 added to E_out.
inline AccuracyBudget with_bf16_weights(AccuracyBudget on_stored) {
  on_stored.out += 0x1.0p-8;
  return on_stored;
}

// The budget of bf16 activations (queries and outputs) over a bf16 cache, on the float
// budget of the same bf16 values: the softmax weights' rounding to bf16 where the bf16 dot
// products take them (with_bf16_weights), the error of those weights' exp2 polynomial
// (5.6e-5 relative, detail/bf16_dot.hpp: at most twice that in out, which divides by row
// sums made of the same weights, and that much in lse), and out's own rounding to bf16
// (half an ulp, 2^-9 of |out| <= max |v|). lse stays float.
inline AccuracyBudget with_bf16_activations(AccuracyBudget on_rounded) {
  constexpr double kWeightExp2Err = 5.6e-5;
  AccuracyBudget budget = with_bf16_weights(on_rounded);
  budget.out += 2.0 * kWeightExp2Err + 0x1.0p-9;
  budget.lse += kWeightExp2Err;
  return budget;
}

// The budget on the stored values of the int8 dot-product decode (5.): the value
// weights' rounding to 16-bit integers added to E_out.
inline AccuracyBudget with_int8_value_weights(AccuracyBudget on_stored) {
  on_stored.out += static_cast<double>(detail::kInt8DecodeKeys) * 0.51 / 65535;
  return on_stored;
}

// E_cache of the int8 and bf16 dot-product decode paths (5., 6. above): q_quantized is q~
// (what the kernel multiplies), q, k, v the originals; `on_stored` the budget on (q~, k~, v~).
template <typename KV>
AccuracyBudget quantized_query_cache_budget(const AccuracyBudget& on_stored,
                                            const Tensor<double, 4>& q_quantized,
                                            const Tensor<float, 4>& q, const Tensor<float, 4>& k,
                                            const Tensor<float, 4>& v, double scale) {
  const Tensor<double, 4> dq = q_quantized - to_double(q);
  const double delta = max_score_magnitude(q_quantized, storage_error_bound<KV>(k), scale) +
                       max_score_magnitude(dq, to_double(k), scale);
  const double v_scale = max_abs(v);
  const double value_error = v_scale > 0.0 ? max_abs(storage_error_bound<KV>(v)) / v_scale : 0.0;
  return reduced_cache_budget(on_stored, delta, value_error);
}

}  // namespace attnforge::test
