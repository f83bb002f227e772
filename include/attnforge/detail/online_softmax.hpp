// The online softmax shared by every SDPA path: the running statistics of a row, their
// lazy rescale, and the finalisation of a row (output scale, log-sum-exp, attention
// sinks, rows with no allowed key). Scores are in log2 units (scale * log2(e) folded in),
// so every exponential is an exp2.
#pragma once

#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnforge/detail/simd.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

inline constexpr double kLog2e = 1.4426950408889634074;

// The running statistics of one softmax row (V a scalar) or of one row per SIMD lane
// (kAlongLanes: V a packet). Weights are exp2(score - base()); `ref` is a lazily moved running max:
// it only moves (and the sum and the caller's output accumulator are rescaled by the returned
// factor) when a new max exceeds it by more than kRescaleThreshold. Weights thus stay <= 2^8 and
// cannot overflow, the rescale pass over the output is rare after the first keys, and since the
// output and the sum share the reference, the result is the exact softmax either way. A row that
// has seen no allowed key has ref = -inf; its exponentials are taken relative to 0 instead, so
// exp2(-inf - 0) = 0 and no -inf - (-inf) = NaN arises.
template <typename T, bool kAlongLanes = false>
struct SoftmaxStats {
  using V = simd::ScalarOrPacket<T, kAlongLanes>;
  static constexpr T kRescaleThreshold = T(8);
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  V ref;
  V sum;

  static SoftmaxStats start() {
    if constexpr (!kAlongLanes) {
      return {kNegInf, T(0)};
    } else {
      return {simd::splat<V>(kNegInf), simd::zero<V>()};
    }
  }

  V base() const {
    if constexpr (!kAlongLanes) {
      return ref == kNegInf ? T(0) : ref;
    } else {
      return simd::select(simd::equal(ref, simd::splat<V>(kNegInf)), simd::zero<V>(), ref);
    }
  }

  // Takes the max of the next scores into account. Returns whether the reference moved
  // (in any lane); then `alpha` is the factor for the output accumulator (1 in lanes
  // that did not move), and the sum is already rescaled.
  bool observe(const V& new_max, V& alpha) {
    if constexpr (!kAlongLanes) {
      if (!(new_max > ref + kRescaleThreshold)) return false;
      alpha = ref == kNegInf ? T(0) : std::exp2(ref - new_max);
      ref = new_max;
      sum *= alpha;
      return true;
    } else {
      const V moves = simd::less(simd::add(ref, simd::splat<V>(kRescaleThreshold)), new_max);
      if (!simd::any(moves)) return false;
      const V old_ref = ref;
      ref = simd::select(moves, new_max, old_ref);
      alpha = simd::exp2(simd::sub(old_ref, base()));
      sum = simd::mul(sum, alpha);
      return true;
    }
  }

  // The weight function w(s) = exp2(s - base()) for packets P of scores of these rows (V
  // a packet) or of keys of this row (V a scalar), with the base taken once for a block;
  // the caller adds the weights to `sum`. kDegree: simd::exp2's.
  template <typename P, int kDegree = simd::kExp2Degree<simd::Scalar<P>>>
  auto weights() const {
    P shift;
    if constexpr (!kAlongLanes) {
      shift = simd::splat<P>(base());
    } else {
      shift = base();
    }
    return [shift](const P& scores) { return simd::exp2<P, kDegree>(simd::sub(scores, shift)); };
  }
};

// One row whose scores arrive a packet of keys at a time (the decode): SoftmaxStats, with
// a packet tested against the threshold lane by lane before it is reduced to its max, and
// the weights summed lane-wise until the reference moves or the row ends. A packet that
// leaves the reference where it is (almost every one after the first) then costs no
// horizontal operation, where a max and a sum per packet would chain two reductions.
template <typename T>
struct KeyPacketSoftmax {
  using Packet = simd::Packet<T>;
  SoftmaxStats<T> stats;
  Packet pending;  // the weights' lane sums not yet in stats.sum

  static KeyPacketSoftmax start() { return {SoftmaxStats<T>::start(), simd::zero<Packet>()}; }

  // SoftmaxStats::observe for the max of a packet of scores.
  bool observe(const Packet& scores, T& alpha) {
    const Packet bar = simd::splat<Packet>(stats.ref + SoftmaxStats<T>::kRescaleThreshold);
    if (!simd::any(simd::less(bar, scores))) return false;
    stats.sum += simd::sum(pending);
    pending = simd::zero<Packet>();
    return stats.observe(simd::max_of(scores), alpha);
  }

  // The weights of a packet of scores, counted into the sum.
  Packet weights(const Packet& scores) {
    const Packet w = stats.template weights<Packet>()(scores);
    pending = simd::add(pending, w);
    return w;
  }

  T sum() const { return stats.sum + simd::sum(pending); }
};

// log2(sum_c 2^lse2[c * stride] + 2^sink2) for n partial results (lse2 in log2 units;
// -inf for a part with no allowed key) and an attention sink logit (-inf: none). Each
// part then weighs 2^(lse2[c] - result). NaN sticks: a NaN part makes the result NaN.
template <typename T>
T merge_lse2(const T* lse2, Index n, Index stride, T sink2) {
  T top = sink2;
  for (Index c = 0; c < n; ++c) {
    const T x = lse2[c * stride];
    if (std::isnan(x) || x > top) top = x;
  }
  if (top == -std::numeric_limits<T>::infinity() || std::isnan(top)) return top;
  T total = std::exp2(sink2 - top);
  for (Index c = 0; c < n; ++c) total += std::exp2(lse2[c * stride] - top);
  return top + std::log2(total);
}

// The end of one row: what multiplies its output accumulator, and its log-sum-exp.
struct RowEnd {
  double out_scale;  // 0 for a row with no allowed key
  double lse2;       // log2 units; -inf for no allowed key (without a sink)
  bool empty;        // no allowed key (the EmptyRowPolicy applies)
  double lse() const { return lse2 / kLog2e; }  // natural log, as returned to callers
};

// Finishes a row from its statistics (ref, sum in log2 units; the accumulator holds
// sum_j 2^(s_j - base) v_j) and the row's sink logit in log2 units (-inf: none).
// Only sum == 0 means no allowed key: a NaN sum (a NaN or infinite score) is not an
// empty row, it keeps out and lse NaN so that a merge of partial results cannot drop it.
// An empty row gives output 0 and lse -inf (kZeros: 0 is the additive identity that
// merges correctly with other partial results, where NaN would poison them); with a
// sink it is the softmax over the sink alone: output 0, lse = the sink.
inline RowEnd finish_row(double ref, double sum, double sink2) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const bool empty = sum == 0.0;
  const double keys_lse2 = empty ? kNegInf : (ref == kNegInf ? 0.0 : ref) + std::log2(sum);
  // Without a sink a finite log-sum-exp merges with nothing: it is the row's own, with
  // weight 1 (what the merge below computes, without its exponentials).
  if (sink2 == kNegInf && std::isfinite(keys_lse2)) return {1.0 / sum, keys_lse2, false};
  const double lse2 = merge_lse2(&keys_lse2, 1, 1, sink2);
  const double out_scale = empty ? 0.0 : std::exp2(keys_lse2 - lse2) / sum;
  return {out_scale, lse2, empty};
}

// The sink logit of head h in log2 units, -inf without sinks.
inline double sink_log2(const double* sinks, Index h) {
  return sinks != nullptr ? sinks[h] * kLog2e : -std::numeric_limits<double>::infinity();
}

// Rows (b, h, i) with no allowed key, collected for EmptyRowPolicy::kAttendAll, which
// redoes them attending to every key (KempnerForge's guard). With Skv = 0 there is
// nothing to attend to, and the row keeps the kZeros result.
using EmptyRows = std::vector<std::array<Index, 3>>;

inline bool attends_all_when_empty(EmptyRowPolicy policy, Index kv_len) {
  return policy == EmptyRowPolicy::kAttendAll && kv_len > 0;
}

}  // namespace attnforge::detail
