// Attention over a PagedKVCache for a ragged batch: the new tokens of several sequences,
// packed as flash_attn_varlen_func packs them, each attending to its own sequence's
// cache. Decode steps (one token), chunked prefills and whole prompts mix in one call.
#pragma once

#include <vector>

#include "attnforge/detail/ragged_run.hpp"
#include "attnforge/detail/sdpa_reference.hpp"
#include "attnforge/paged_kv_cache.hpp"
#include "attnforge/sdpa.hpp"

namespace attnforge {

// T is the element type of q and out, KV the cache's storage type (bf16/fp16 under float
// activations, as in ScaledDotProductAttention). One instance per thread; it keeps its
// scratch between calls.
template <typename T, typename KV = T>
class PagedAttention {
 public:
  using Acc = acc_t<T>;
  using Compute = acc_t<T>;

  explicit PagedAttention(SdpaOptions options = {}, const Eigen::ThreadPoolDevice* device = nullptr)
      : options_(std::move(options)), device_(device) {}

  const SdpaOptions& options() const { return options_; }
  void set_options(const SdpaOptions& options) { options_ = options; }
  void set_device(const Eigen::ThreadPoolDevice* device) { device_ = device; }

  // q (total, H, D): the new tokens of batch.seqs, packed by batch.cu_seqlens. The cache
  // must already hold them as each sequence's last positions (append, then attend), so
  // with causal the queries of a sequence of length L with n new tokens sit at positions
  // L - n .. L - 1 (bottom-right alignment, per sequence). Writes out (total, H, D) and,
  // when given, lse (H, total), as flash_attn_varlen_func.
  // masks: empty, or one Masks per sequence, shaped for that sequence alone (B = 1,
  // Sq = its new tokens, Skv = its length). When a sequence has doc_ids but no
  // kv_doc_ids, the cache's recorded document ids are used for its keys.
  void operator()(const ConstView<T, 3>& q, const PagedKVCache<KV>& cache, const RaggedBatch& batch,
                  const StridedView<T, 3>& out, const std::vector<Masks>& masks = {},
                  const StridedView<Acc, 2>& lse = {}) {
    validate(q, cache, batch, out, masks, lse);
    build_problems(q, cache, batch, out, masks, lse);
    empty_rows_.clear();
    if (options_.path == SdpaPath::kReference || detail::simd::kWidth<Compute> == 1) {
      for (const Problem& pb : reference_) run_reference(pb, cache, batch, false);
      return;
    }
    detail::run_ragged(fused_, decode_, device_, workspace_, decode_workspace_, tuning_,
                       empty_rows_);
    if (detail::attends_all_when_empty(options_.empty_rows, 1)) {
      for (const auto& row : empty_rows_) attend_all(row, cache, batch);
    }
  }

  Tensor<T, 3> operator()(const ConstView<T, 3>& q, const PagedKVCache<KV>& cache,
                          const RaggedBatch& batch, const std::vector<Masks>& masks = {}) {
    Tensor<T, 3> out(q.dimensions());
    (*this)(q, cache, batch, StridedView<T, 3>(out), masks);
    return out;
  }

 private:
  using Rows = detail::PagedRows<const KV>;
  using Problem = detail::KernelProblem<T, KV, Rows>;
  static constexpr const char* kWhere = "PagedAttention";

  void validate(const ConstView<T, 3>& q, const PagedKVCache<KV>& cache, const RaggedBatch& batch,
                const StridedView<T, 3>& out, const std::vector<Masks>& masks,
                const StridedView<Acc, 2>& lse) {
    cache.check_batch(kWhere, batch);
    const Index n_heads = q.dimension(1), n_kv_heads = cache.n_kv_heads();
    detail::check_shape(kWhere, "q", q, {batch.total_tokens(), -1, cache.head_dim()},
                        "(total_tokens, H, head_dim)");
    if (n_heads <= 0 || n_heads % n_kv_heads != 0) {
      detail::throw_invalid_argument(kWhere, ": q has ", n_heads, " heads, not a multiple of the ",
                                     "cache's ", n_kv_heads, " KV heads (q ",
                                     detail::shape_string(q.dimensions()), ")");
    }
    if (q.stride(2) != 1)
      detail::throw_invalid_argument(kWhere, ": q needs a contiguous last dimension");
    detail::check_shape(kWhere, "out", out, q.dimensions(),
                        "q's shape (total_tokens, H, head_dim)");
    if (out.stride(2) != 1)
      detail::throw_invalid_argument(kWhere, ": out needs a contiguous last dimension");
    if (lse.has_value()) {
      detail::check_shape(kWhere, "lse", lse, {n_heads, batch.total_tokens()}, "(H, total_tokens)");
    }
    if (!masks.empty() && masks.size() != batch.seqs.size()) {
      detail::throw_invalid_argument(kWhere, ": ", masks.size(), " Masks given for ",
                                     batch.seqs.size(),
                                     " sequences; give one per sequence or none");
    }
    params_ = detail::resolve_options(kWhere, options_, cache.head_dim());
    params_.int8_dot = detail::use_int8_dot<T, KV>(kWhere, options_, cache.head_dim());
    detail::check_per_head_options(kWhere, options_, n_heads);
    masks_.assign(batch.seqs.size(), Masks{});
    kv_doc_ids_.resize(batch.seqs.size());
    for (Index s = 0; s < batch.size(); ++s) {
      const SeqId id = batch.seqs[static_cast<std::size_t>(s)];
      const Index len = cache.seq_len(id), n = batch.new_tokens(s);
      if (n > len) {
        detail::throw_invalid_argument(kWhere, ": sequence ", id, " has ", n,
                                       " new tokens but holds only ", len,
                                       " positions; append its keys and values first");
      }
      Masks& m = masks_[static_cast<std::size_t>(s)];
      if (!masks.empty()) m = masks[static_cast<std::size_t>(s)];
      if (m.doc_ids.has_value() && !m.kv_doc_ids.has_value() && cache.records_doc_ids()) {
        Tensor<DocId, 2>& ids = kv_doc_ids_[static_cast<std::size_t>(s)];
        ids = cache.gather_doc_ids(id).reshape(std::array<Index, 2>{1, len});
        m.kv_doc_ids = ids;
      }
      detail::validate_masks(kWhere, params_.rules, m, 1, n_heads, n, len);
    }
  }

  // The per-sequence problems: each is a B = 1 problem over the sequence's paged K/V, its
  // tokens of q and out seen as (1, H, n, D).
  void build_problems(const ConstView<T, 3>& q, const PagedKVCache<KV>& cache,
                      const RaggedBatch& batch, const StridedView<T, 3>& out,
                      const std::vector<Masks>& /*masks*/, const StridedView<Acc, 2>& lse) {
    fused_.clear();
    decode_.clear();
    reference_.clear();
    const Index n_heads = q.dimension(1), head_dim = q.dimension(2);
    const Index n_rep = n_heads / cache.n_kv_heads();
    for (Index s = 0; s < batch.size(); ++s) {
      const SeqId id = batch.seqs[static_cast<std::size_t>(s)];
      const Index n = batch.new_tokens(s), first = batch.first_token(s), len = cache.seq_len(id);
      if (n == 0) continue;
      detail::SdpaParams params = params_;
      params.rules.window = std::min(params.rules.window, std::max<Index>(len, 1));
      const bool decode =
          options_.path == SdpaPath::kDecode ||
          (options_.path == SdpaPath::kAuto && detail::decode_applies<Compute>(n, n_rep));
      params.bf16_dot = use_bf16_dot(head_dim, decode);
      const std::array<Index, 4> dims{1, n_heads, n, head_dim};
      Problem pb{
          ConstView<T, 4>(q.data() + first * q.stride(0), dims, {0, q.stride(1), q.stride(0), 1}),
          cache.keys(id),
          cache.values(id),
          StridedView<T, 4>(out.data() + first * out.stride(0), dims,
                            {0, out.stride(1), out.stride(0), 1}),
          lse.has_value() ? StridedView<Acc, 3>(lse.data() + first * lse.stride(1), {1, n_heads, n},
                                                {0, lse.stride(0), lse.stride(1)})
                          : StridedView<Acc, 3>{},
          params,
          s};
      const detail::MaskPolicy policy(params.rules, masks_[static_cast<std::size_t>(s)], 1, n_heads,
                                      n, len, params.alibi_slopes);
      auto& group = decode ? decode_ : fused_;
      group.problems.push_back(pb);
      group.policies.push_back(policy);
      reference_.push_back(pb);
    }
  }

  // The reference path reads a sequence's K/V gathered into a contiguous copy (it exists
  // to check the kernels, not to be fast). With `unmasked`, only row (h, i) of the problem
  // is redone attending to every key (the attend-all policy of empty rows).
  void run_reference(const Problem& pb, const PagedKVCache<KV>& cache, const RaggedBatch& batch,
                     bool /*unmasked*/) {
    const SeqId id = batch.seqs[static_cast<std::size_t>(pb.batch_offset)];
    const Tensor<KV, 3> k_rows = cache.gather_keys(id), v_rows = cache.gather_values(id);
    const ConstView<KV, 4> k = gathered(k_rows, pb.k), v = gathered(v_rows, pb.k);
    const detail::MaskPolicy policy(
        pb.params.rules, masks_[static_cast<std::size_t>(pb.batch_offset)], 1, pb.q.dimension(1),
        pb.q.dimension(2), k.dimension(2), pb.params.alibi_slopes);
    detail::sdpa_reference(pb.q, k, v, detail::ReferenceOutputs<T, Acc>{pb.out, pb.lse, {}},
                           pb.params, policy, device_);
  }

  // KempnerForge's guard for a row with no allowed key: it attends to every key of its
  // sequence with no mask and no bias (rare: redone on the reference path).
  void attend_all(const std::array<Index, 3>& row, const PagedKVCache<KV>& cache,
                  const RaggedBatch& batch) {
    const Index s = row[0], h = row[1], i = row[2];
    const Problem* found = nullptr;
    for (const Problem& pb : reference_) found = pb.batch_offset == s ? &pb : found;
    const Problem& pb = *found;
    const SeqId id = batch.seqs[static_cast<std::size_t>(s)];
    const Tensor<KV, 3> k_rows = cache.gather_keys(id), v_rows = cache.gather_values(id);
    const ConstView<KV, 4> k = gathered(k_rows, pb.k), v = gathered(v_rows, pb.k);
    detail::SdpaParams params = pb.params;
    params.rules = detail::MaskRules{};
    params.alibi_slopes = nullptr;
    params.sinks = options_.sinks.empty() ? nullptr : options_.sinks.data() + h;
    const Index kv_head = h / (pb.q.dimension(1) / cache.n_kv_heads());
    const auto one = [&](const auto& view, Index head) { return view.narrow(1, head, 1); };
    const detail::ReferenceOutputs<T, Acc> row_out{
        one(pb.out, h).narrow(2, i, 1),
        pb.lse.has_value() ? one(pb.lse, h).narrow(2, i, 1) : pb.lse,
        {}};
    const detail::MaskPolicy unmasked(params.rules, Masks{}, 1, 1, 1, k.dimension(2));
    detail::sdpa_reference(one(pb.q, h).narrow(2, i, 1), one(k, kv_head), one(v, kv_head), row_out,
                           params, unmasked, nullptr);
  }

  // A sequence's gathered copy (gather_keys / gather_values) seen as the (1, Hkv, seq_len,
  // head_dim) view of `rows`, its pool view.
  template <typename Rows>
  static ConstView<KV, 4> gathered(const Tensor<KV, 3>& copy, const Rows& rows) {
    const Index positions = copy.dimension(1), width = copy.dimension(2);
    return detail::cache_view<const KV, 4>(
        copy.data(), {1, copy.dimension(0), rows.dimension(2), rows.dimension(3)},
        {copy.dimension(0) * positions * width, positions * width, width, 1});
  }

  bool use_bf16_dot(Index head_dim, bool decode) const {
    return detail::use_bf16_dot<T, KV>(kWhere, options_, head_dim, decode);
  }

  SdpaOptions options_;
  const Eigen::ThreadPoolDevice* device_ = nullptr;
  detail::SdpaParams params_;
  std::vector<Masks> masks_;                  // per sequence, with recorded kv doc ids filled in
  std::vector<Tensor<DocId, 2>> kv_doc_ids_;  // per sequence, gathered from the cache
  detail::RaggedProblems<Problem> fused_, decode_;
  std::vector<Problem> reference_;  // every sequence with new tokens
  detail::KernelTuning tuning_;
  detail::KernelWorkspace<Compute> workspace_;
  detail::DecodeWorkspace<Compute> decode_workspace_;
  detail::EmptyRows empty_rows_;
};

}  // namespace attnforge
