// The plain reference of scaled-dot-product attention: one query row at a time, every
// score, max, exponential and sum in double, through the same mask policy and row
// finalisation as the fast kernels. It is the baseline the kernels are tested and
// benchmarked against, and the path that returns attention probabilities. Memory per
// worker is O(Skv + D); no Sq x Skv matrix exists unless probabilities are requested
// (then the caller owns it).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attnforge/detail/mask_policy.hpp"
#include "attnforge/detail/online_softmax.hpp"
#include "attnforge/detail/parallel.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// Where one reference call writes: out, lse (B, H, Sq) and probs (B, H, Sq, Skv) are
// each optional (absent views are neither computed nor written).
template <typename T, typename Acc>
struct ReferenceOutputs {
  StridedView<T, 4> out;
  StridedView<Acc, 3> lse;
  StridedView<Acc, 4> probs;
};

// One query row (b, h, i): scores (log2 units) of its allowed keys in `scores`, then its
// softmax and outputs.
template <typename T, typename KV, typename Acc>
void reference_row(const ConstView<T, 4>& q, const ConstView<KV, 4>& k, const ConstView<KV, 4>& v,
                   const ReferenceOutputs<T, Acc>& outputs, const SdpaParams& params,
                   const BatchMask& mask, Index b, Index h, Index i, std::vector<double>& scores,
                   std::vector<double>& acc, std::vector<double>& kv_row) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const Index kv_len = k.dimension(2), head_dim = q.dimension(3);
  const Index kv_head = h / (q.dimension(1) / k.dimension(1));  // repeat_interleave grouping
  Index n_allowed = 0;
  for (Index j = 0; j < kv_len; ++j) n_allowed += mask.allowed(h, i, j);
  // KempnerForge's guard: a row with no allowed key attends to every key, unmasked.
  const bool attend_all = n_allowed == 0 && attends_all_when_empty(params.empty_rows, kv_len);
  const T* q_row = q.row(b, h, i);
  double row_max = kNegInf;
  for (Index j = 0; j < kv_len; ++j) {
    scores[static_cast<std::size_t>(j)] = kNegInf;
    if (!attend_all && !mask.allowed(h, i, j)) continue;
    load_position<QInt8Role::kKey>(k, b, kv_head, j, kv_row.data());
    double dot = 0.0;
    for (Index d = 0; d < head_dim; ++d)
      dot += static_cast<double>(q_row[d]) * kv_row[static_cast<std::size_t>(d)];
    double score = params.scale * dot;
    if (params.softcap > 0.0) score = params.softcap * std::tanh(score / params.softcap);
    if (!attend_all) score += mask.score_bias(h, i, j);
    scores[static_cast<std::size_t>(j)] = score * kLog2e;
    row_max = std::max(row_max, scores[static_cast<std::size_t>(j)]);
  }
  double row_sum = 0.0;
  std::fill(acc.begin(), acc.end(), 0.0);
  for (Index j = 0; j < kv_len; ++j) {
    if (!attend_all && !mask.allowed(h, i, j)) continue;
    double& weight = scores[static_cast<std::size_t>(j)];
    weight = std::exp2(weight - row_max);
    row_sum += weight;
    if (!outputs.out.has_value()) continue;
    load_position<QInt8Role::kValue>(v, b, kv_head, j, kv_row.data());
    for (Index d = 0; d < head_dim; ++d)
      acc[static_cast<std::size_t>(d)] += weight * kv_row[static_cast<std::size_t>(d)];
  }
  const RowEnd end = finish_row(row_max, n_allowed == 0 && !attend_all ? 0.0 : row_sum,
                                sink_log2(params.sinks, h));
  if (outputs.out.has_value()) {
    T* out_row = outputs.out.row(b, h, i);
    for (Index d = 0; d < head_dim; ++d)
      out_row[d] = static_cast<T>(acc[static_cast<std::size_t>(d)] * end.out_scale);
  }
  if (outputs.lse.has_value()) outputs.lse(b, h, i) = static_cast<Acc>(end.lse());
  if (outputs.probs.has_value()) {
    for (Index j = 0; j < kv_len; ++j) {
      const bool used = attend_all || mask.allowed(h, i, j);
      outputs.probs(b, h, i, j) =
          used ? static_cast<Acc>(scores[static_cast<std::size_t>(j)] * end.out_scale) : Acc(0);
    }
  }
}

// q (B, H, Sq, D); k, v (B, Hkv, Skv, D).
template <typename T, typename KV, typename Acc>
void sdpa_reference(const ConstView<T, 4>& q, const ConstView<KV, 4>& k, const ConstView<KV, 4>& v,
                    const ReferenceOutputs<T, Acc>& outputs, const SdpaParams& params,
                    const MaskPolicy& policy, const Eigen::ThreadPoolDevice* device) {
  const Index n_heads = q.dimension(1);
  struct Scratch {
    std::vector<double> scores;
    std::vector<double> acc;
    std::vector<double> kv_row;  // one K or V row, converted or dequantized
  };
  std::vector<Scratch> scratch(static_cast<std::size_t>(worker_count(device)));
  for (Scratch& s : scratch) {
    s.scores.resize(static_cast<std::size_t>(k.dimension(2)));
    s.acc.resize(static_cast<std::size_t>(q.dimension(3)));
    s.kv_row.resize(static_cast<std::size_t>(q.dimension(3)));
  }
  parallel_for_items(device, q.dimension(0) * n_heads, [&](int worker, Index item) {
    Scratch& s = scratch[static_cast<std::size_t>(worker)];
    const Index b = item / n_heads, h = item % n_heads;
    const BatchMask mask = policy.row(b);
    for (Index i = 0; i < q.dimension(2); ++i)
      reference_row(q, k, v, outputs, params, mask, b, h, i, s.scores, s.acc, s.kv_row);
  });
}

}  // namespace attnforge::detail
