// The plain reference of scaled-dot-product attention: one query row at a time, every
// score, max, exponential and sum in double. It is the baseline the fast kernels are
// tested and benchmarked against, and the path that returns attention probabilities.
// Memory per worker is O(Skv + D); no Sq x Skv matrix exists unless probabilities are
// requested (then the caller owns it).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attnforge/detail/parallel.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// q (B, H, Sq, D); k, v (B, Hkv, Skv, D); out (B, H, Sq, D). out, lse (B, H, Sq) and
// probs (B, H, Sq, Skv) are each optional (absent views are neither computed nor written).
template <typename T, typename KV, typename Acc>
void sdpa_reference(const ConstView<T, 4>& q, const ConstView<KV, 4>& k, const ConstView<KV, 4>& v,
                    const StridedView<T, 4>& out, const StridedView<Acc, 3>& lse,
                    const StridedView<Acc, 4>& probs, const SdpaParams& params, const Masks& masks,
                    const Eigen::ThreadPoolDevice* device) {
  const Index batch = q.dimension(0);
  const Index n_heads = q.dimension(1);
  const Index q_len = q.dimension(2);
  const Index head_dim = q.dimension(3);
  const Index n_kv_heads = k.dimension(1);
  const Index kv_len = k.dimension(2);
  const Index n_rep = n_heads / n_kv_heads;
  const double neg_inf = -std::numeric_limits<double>::infinity();

  struct Scratch {
    std::vector<double> scores;
    std::vector<char> allowed;
    std::vector<double> acc;
  };
  std::vector<Scratch> scratch(static_cast<std::size_t>(worker_count(device)));
  for (Scratch& s : scratch) {
    s.scores.resize(static_cast<std::size_t>(kv_len));
    s.allowed.resize(static_cast<std::size_t>(kv_len));
    s.acc.resize(static_cast<std::size_t>(head_dim));
  }

  parallel_for_items(device, batch * n_heads, [&](int worker, Index item) {
    Scratch& s = scratch[static_cast<std::size_t>(worker)];
    const Index b = item / n_heads;
    const Index h = item % n_heads;
    const Index kv_head = h / n_rep;  // repeat_interleave grouping
    const BatchMask mask = batch_mask(params.rules, masks, b, q_len, kv_len);
    for (Index i = 0; i < q_len; ++i) {
      const T* q_row = q.row(b, h, i);
      Index n_allowed = 0;
      for (Index j = 0; j < kv_len; ++j) {
        const bool ok = mask.allowed(i, j);
        s.allowed[j] = ok;
        n_allowed += ok;
      }
      // With Skv = 0 "attend to all keys" is the same empty softmax as kZeros.
      const bool attend_all =
          n_allowed == 0 && kv_len > 0 && params.empty_rows == EmptyRowPolicy::kAttendAll;
      double row_max = neg_inf;
      for (Index j = 0; j < kv_len; ++j) {
        if (!s.allowed[j] && !attend_all) continue;
        const KV* k_row = k.row(b, kv_head, j);
        double dot = 0.0;
        for (Index d = 0; d < head_dim; ++d) {
          dot += static_cast<double>(q_row[d]) * static_cast<double>(k_row[d]);
        }
        double score = params.scale * dot;
        if (params.softcap > 0.0) score = params.softcap * std::tanh(score / params.softcap);
        s.scores[j] = score;
        row_max = std::max(row_max, score);
      }
      if (n_allowed == 0 && !attend_all) {
        // Empty softmax: 0 output, lse = -inf (see EmptyRowPolicy::kZeros).
        if (out.has_value()) std::fill_n(out.row(b, h, i), head_dim, T(0));
        if (lse.has_value()) lse(b, h, i) = static_cast<Acc>(neg_inf);
        if (probs.has_value()) {
          for (Index j = 0; j < kv_len; ++j) probs(b, h, i, j) = Acc(0);
        }
        continue;
      }
      double row_sum = 0.0;
      std::fill(s.acc.begin(), s.acc.end(), 0.0);
      for (Index j = 0; j < kv_len; ++j) {
        if (!s.allowed[j] && !attend_all) continue;
        const double weight = std::exp(s.scores[j] - row_max);
        s.scores[j] = weight;
        row_sum += weight;
        if (!out.has_value()) continue;
        const KV* v_row = v.row(b, kv_head, j);
        for (Index d = 0; d < head_dim; ++d) s.acc[d] += weight * static_cast<double>(v_row[d]);
      }
      if (out.has_value()) {
        T* out_row = out.row(b, h, i);
        for (Index d = 0; d < head_dim; ++d) out_row[d] = static_cast<T>(s.acc[d] / row_sum);
      }
      if (lse.has_value()) lse(b, h, i) = static_cast<Acc>(row_max + std::log(row_sum));
      if (probs.has_value()) {
        for (Index j = 0; j < kv_len; ++j) {
          probs(b, h, i, j) =
              (s.allowed[j] || attend_all) ? static_cast<Acc>(s.scores[j] / row_sum) : Acc(0);
        }
      }
    }
  });
}

}  // namespace attnforge::detail
