// One parallel region over the sequences of a ragged batch: those with many new tokens
// run the fused kernel, those with few (decode steps) the decode kernel, and all their
// work items share one queue, fused items (most expensive first) ahead of decode items,
// so a mixed step of chunked prefills and decodes keeps every worker busy until the end.
#pragma once

#include "attnforge/detail/sdpa_decode.hpp"
#include "attnforge/detail/sdpa_kernel.hpp"

namespace attnforge::detail {

template <typename P>
struct RaggedProblems {
  std::vector<P> problems;
  std::vector<MaskPolicy> policies;

  void clear() {
    problems.clear();
    policies.clear();
  }
  Index size() const { return static_cast<Index>(problems.size()); }
  bool masked() const {
    return std::any_of(policies.begin(), policies.end(),
                       [](const MaskPolicy& p) { return p.masks_elements(); });
  }
  bool biased() const {
    return std::any_of(policies.begin(), policies.end(),
                       [](const MaskPolicy& p) { return p.biases_scores(); });
  }
};

// Runs `fused` and `decode` (problems of one call: same heads, head_dim, options and K/V
// layout). Empty rows of both are appended to `empty_rows`.
template <typename P>
void run_ragged(const RaggedProblems<P>& fused, const RaggedProblems<P>& decode,
                const Eigen::ThreadPoolDevice* device, KernelWorkspace<typename P::Compute>& kws,
                DecodeWorkspace<typename P::Compute>& dws, const KernelTuning& tuning,
                EmptyRows& empty_rows) {
  // A batch whose sequences have no new tokens (decode steps of none) has no problem to
  // take the common options from, and nothing to compute.
  if (fused.size() == 0 && decode.size() == 0) return;
  const int workers = worker_count(device);
  FusedRun run{};
  if (fused.size() > 0) {
    run = prepare_fused(fused.problems.data(), fused.policies.data(), fused.size(), workers, kws,
                        tuning);
  }
  const Index decode_units = decode.size() > 0
                                 ? prepare_decode(decode.problems.data(), decode.policies.data(),
                                                  decode.size(), workers, dws, tuning)
                                 : 0;
  const P& any = fused.size() > 0 ? fused.problems[0] : decode.problems[0];
  dispatch_features(
      [&](auto features) {
        using F = decltype(features);
        parallel_for_items(device, run.items + decode_units, [&](int worker, Index item) {
          if (item < run.items) {
            fused_item<P, F>(fused.problems.data(), fused.policies.data(), run, kws, worker, item);
          } else {  // the decode kernel ignores F::kBf16Dot: it computes in float
            run_decode_unit<P, F>(decode.problems.data(), decode.policies.data(), dws, worker,
                                  item - run.items);
          }
        });
      },
      any.params.softcap > 0.0, fused.masked() || decode.masked(),
      fused.biased() || decode.biased(), run.bf16_dot);
  if (decode_units > 0) {
    merge_decode(decode.problems.data(), decode.policies.data(), decode.size(), dws, empty_rows);
  }
  if (fused.size() > 0) {
    for (const auto& worker : kws.workers)
      empty_rows.insert(empty_rows.end(), worker.empty_rows.begin(), worker.empty_rows.end());
  }
}

}  // namespace attnforge::detail
