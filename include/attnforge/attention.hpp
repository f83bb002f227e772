// Attention: the KempnerForge module. q/k/v/o projections, optional QK-norm, RoPE,
// an optional KV cache and causal (bottom-right) SDPA with GQA, doc_ids and padding;
// for serving, the same module over a ragged batch of sequences in a PagedKVCache.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attnforge/detail/linear.hpp"
#include "attnforge/kv_cache.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/norm.hpp"
#include "attnforge/paged_attention.hpp"
#include "attnforge/paged_kv_cache.hpp"
#include "attnforge/parameter.hpp"
#include "attnforge/rope.hpp"
#include "attnforge/sdpa.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge {

// Read-only views of the parameters, torch.nn.Linear layout (out_features, in_features).
template <typename T>
struct AttentionWeights {
  ConstView<T, 2> wq;      // (H * D, dim)
  ConstView<T, 2> wk;      // (Hkv * D, dim)
  ConstView<T, 2> wv;      // (Hkv * D, dim)
  ConstView<T, 2> wo;      // (dim, H * D)
  ConstView<T, 1> q_norm;  // (D), only with qk_norm
  ConstView<T, 1> k_norm;  // (D), only with qk_norm
};

template <typename T>
class Attention {
 public:
  using Acc = acc_t<T>;
  // A bf16/fp16/QInt8 cache under float activations (the one mixed-precision combination).
  template <typename CacheT>
  using enable_if_mixed_t = std::enable_if_t<detail::is_mixed_precision_v<T, CacheT>>;

  // head_dim = 0 means dim / n_heads.
  Attention(Index dim, Index n_heads, Index n_kv_heads, Index head_dim = 0, bool qk_norm = false,
            double norm_eps = 1e-5)
      : dim_(dim),
        n_heads_(n_heads),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim == 0 && n_heads > 0 ? dim / n_heads : head_dim),
        qk_norm_(qk_norm),
        norm_eps_(norm_eps) {
    constexpr const char* kWhere = "Attention";
    if (dim <= 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim_ <= 0) {
      detail::throw_invalid_argument(kWhere, ": sizes must be positive, got dim ", dim,
                                     ", n_heads ", n_heads, ", n_kv_heads ", n_kv_heads,
                                     ", head_dim ", head_dim_);
    }
    if (n_heads % n_kv_heads != 0) {
      detail::throw_invalid_argument(kWhere, ": n_heads ", n_heads,
                                     " is not a multiple of n_kv_heads ", n_kv_heads);
    }
    if (head_dim_ % 2 != 0) {
      detail::throw_invalid_argument(kWhere, ": head_dim must be even for RoPE, got ", head_dim_);
    }
    if (!(norm_eps > 0.0) || !std::isfinite(norm_eps)) {
      detail::throw_invalid_argument(kWhere, ": norm_eps must be positive, got ", norm_eps);
    }
    wq_ = Tensor<T, 2>(n_heads_ * head_dim_, dim_);
    wk_ = Tensor<T, 2>(n_kv_heads_ * head_dim_, dim_);
    wv_ = Tensor<T, 2>(n_kv_heads_ * head_dim_, dim_);
    wo_ = Tensor<T, 2>(dim_, n_heads_ * head_dim_);
    q_norm_ = Tensor<T, 1>(head_dim_);
    k_norm_ = Tensor<T, 1>(head_dim_);
    q_norm_.setConstant(T(1));
    k_norm_.setConstant(T(1));
    reset_parameters(0);
  }

  Index dim() const { return dim_; }
  Index n_heads() const { return n_heads_; }
  Index n_kv_heads() const { return n_kv_heads_; }
  Index head_dim() const { return head_dim_; }
  Index n_rep() const { return n_heads_ / n_kv_heads_; }
  bool qk_norm() const { return qk_norm_; }
  double norm_eps() const { return norm_eps_; }

  // The module's own parameters, to fill from a state dict: `attn.wq() = tensor;` copies
  // after checking the shape (std::invalid_argument naming the weight otherwise; see
  // ParameterRef). Writing them has no effect while external weights are bound (see
  // bind_weights). On a const module they are read-only tensors.
  ParameterRef<T, 2> wq() & { return {wq_, "Attention::wq", "(n_heads * head_dim, dim)"}; }
  ParameterRef<T, 2> wk() & { return {wk_, "Attention::wk", "(n_kv_heads * head_dim, dim)"}; }
  ParameterRef<T, 2> wv() & { return {wv_, "Attention::wv", "(n_kv_heads * head_dim, dim)"}; }
  ParameterRef<T, 2> wo() & { return {wo_, "Attention::wo", "(dim, n_heads * head_dim)"}; }
  ParameterRef<T, 1> q_norm() & { return {q_norm_, "Attention::q_norm", "(head_dim)"}; }
  ParameterRef<T, 1> k_norm() & { return {k_norm_, "Attention::k_norm", "(head_dim)"}; }
  const Tensor<T, 2>& wq() const& { return wq_; }
  const Tensor<T, 2>& wk() const& { return wk_; }
  const Tensor<T, 2>& wv() const& { return wv_; }
  const Tensor<T, 2>& wo() const& { return wo_; }
  const Tensor<T, 1>& q_norm() const& { return q_norm_; }
  const Tensor<T, 1>& k_norm() const& { return k_norm_; }
  // A reference into a temporary module would dangle.
  void wq() && = delete;
  void wk() && = delete;
  void wv() && = delete;
  void wo() && = delete;
  void q_norm() && = delete;
  void k_norm() && = delete;

  // torch.nn.Linear's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), from a
  // portable generator (same weights on every platform for a seed); norms set to 1.
  void reset_parameters(std::uint64_t seed) {
    std::uint64_t state = seed;
    for (Tensor<T, 2>* w : {&wq_, &wk_, &wv_, &wo_}) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(w->dimension(1)));
      for (Index i = 0; i < w->size(); ++i) {
        w->data()[i] = static_cast<T>((2.0 * uniform01(state) - 1.0) * bound);
      }
    }
    q_norm_.setConstant(T(1));
    k_norm_.setConstant(T(1));
  }

  // Uses caller-owned parameters (e.g. a memory-mapped checkpoint) without copying.
  // They must outlive the module's use of them. q_norm/k_norm may be absent (= ones)
  // and are ignored without qk_norm.
  void bind_weights(const AttentionWeights<T>& weights) {
    constexpr const char* kWhere = "Attention::bind_weights";
    const Index q_width = n_heads_ * head_dim_;
    const Index kv_width = n_kv_heads_ * head_dim_;
    detail::check_shape(kWhere, "wq", weights.wq, {q_width, dim_}, "(n_heads * head_dim, dim)");
    detail::check_shape(kWhere, "wk", weights.wk, {kv_width, dim_}, "(n_kv_heads * head_dim, dim)");
    detail::check_shape(kWhere, "wv", weights.wv, {kv_width, dim_}, "(n_kv_heads * head_dim, dim)");
    detail::check_shape(kWhere, "wo", weights.wo, {dim_, q_width}, "(dim, n_heads * head_dim)");
    for (const auto* norm : {&weights.q_norm, &weights.k_norm}) {
      if (norm->has_value()) {
        detail::check_shape(kWhere, norm == &weights.q_norm ? "q_norm" : "k_norm", *norm,
                            {head_dim_}, "(head_dim)");
      }
    }
    external_ = weights;
  }
  // Returns to the module's own parameters.
  void unbind_weights() { external_.reset(); }

  // Views of the weights in use (bound or own); valid while the module lives.
  AttentionWeights<T> weights() const&& = delete;  // would dangle
  AttentionWeights<T> weights() const& {
    if (external_) {
      AttentionWeights<T> w = *external_;
      if (!w.q_norm.has_value()) w.q_norm = ConstView<T, 1>(q_norm_);
      if (!w.k_norm.has_value()) w.k_norm = ConstView<T, 1>(k_norm_);
      return w;
    }
    return {wq_, wk_, wv_, wo_, q_norm_, k_norm_};
  }

  RopeStyle rope_style() const { return rope_style_; }
  void set_rope_style(RopeStyle style) { rope_style_ = style; }
  const Eigen::ThreadPoolDevice* device() const { return device_; }
  void set_device(const Eigen::ThreadPoolDevice* device) { device_ = device; }

  // x (B, S, dim) -> (B, S, dim). rope_cos/rope_sin are the (S, head_dim / 2) rows of
  // the tables for the absolute positions of x's tokens. With a kv_cache, this step's
  // keys and values are appended and attention runs over the whole cached prefix.
  // doc_ids (B, S) are the documents of x's tokens; with a kv_cache they need a cache
  // that records document ids, which then appends them too: a query sees the cached and
  // new keys of its own document up to its position, so a packed stream can be fed in
  // chunks of any size (a document may start mid-chunk) and gives the one-shot result.
  //
  // The cache holds T, or bf16/fp16 under float activations (mixed precision: keys and
  // values are rounded as they are appended, attention computes in float).
  Tensor<T, 3> forward(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                       const ConstView<T, 2>& rope_sin, KVCache<T>* kv_cache = nullptr,
                       const DocIdView& doc_ids = {}, const KeyMaskView& key_padding_mask = {}) {
    return forward_tables(x, rope_cos, rope_sin, kv_cache, token_masks(doc_ids, key_padding_mask));
  }
  template <typename CacheT, typename = enable_if_mixed_t<CacheT>>
  Tensor<T, 3> forward(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                       const ConstView<T, 2>& rope_sin, KVCache<CacheT>* kv_cache,
                       const DocIdView& doc_ids = {}, const KeyMaskView& key_padding_mask = {}) {
    return forward_tables(x, rope_cos, rope_sin, kv_cache, token_masks(doc_ids, key_padding_mask));
  }

  // As forward, rotating with `rope` at absolute positions [start_pos, start_pos + S).
  Tensor<T, 3> forward(const ConstView<T, 3>& x, const RotaryEmbedding<T>& rope, Index start_pos,
                       KVCache<T>* kv_cache = nullptr, const DocIdView& doc_ids = {},
                       const KeyMaskView& key_padding_mask = {}) {
    return forward_rope(x, rope, start_pos, kv_cache, token_masks(doc_ids, key_padding_mask));
  }
  template <typename CacheT, typename = enable_if_mixed_t<CacheT>>
  Tensor<T, 3> forward(const ConstView<T, 3>& x, const RotaryEmbedding<T>& rope, Index start_pos,
                       KVCache<CacheT>* kv_cache, const DocIdView& doc_ids = {},
                       const KeyMaskView& key_padding_mask = {}) {
    return forward_rope(x, rope, start_pos, kv_cache, token_masks(doc_ids, key_padding_mask));
  }

  // As forward, with every mask kind: masks.doc_ids (B, S) and key_padding_mask (B, Skv)
  // as above, attn_mask and attn_bias (B|1, H|1, S, Skv) with Skv = cached + S. The keys'
  // document ids are the cache's (or doc_ids without a cache), so masks.kv_doc_ids must be
  // absent. ALiBi slopes and sinks are per-head options (set_sdpa_options).
  Tensor<T, 3> forward(const ConstView<T, 3>& x, const RotaryEmbedding<T>& rope, Index start_pos,
                       KVCache<T>* kv_cache, const Masks& masks) {
    return forward_rope(x, rope, start_pos, kv_cache, masks);
  }
  template <typename CacheT, typename = enable_if_mixed_t<CacheT>>
  Tensor<T, 3> forward(const ConstView<T, 3>& x, const RotaryEmbedding<T>& rope, Index start_pos,
                       KVCache<CacheT>* kv_cache, const Masks& masks) {
    return forward_rope(x, rope, start_pos, kv_cache, masks);
  }

  // forward() writing into a caller-owned out (B, S, dim).
  void forward_into(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                    const ConstView<T, 2>& rope_sin, const StridedView<T, 3>& out,
                    KVCache<T>* kv_cache = nullptr, const DocIdView& doc_ids = {},
                    const KeyMaskView& key_padding_mask = {}) {
    forward_impl(x, rope_cos, rope_sin, out, kv_cache, token_masks(doc_ids, key_padding_mask));
  }
  template <typename CacheT, typename = enable_if_mixed_t<CacheT>>
  void forward_into(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                    const ConstView<T, 2>& rope_sin, const StridedView<T, 3>& out,
                    KVCache<CacheT>* kv_cache, const DocIdView& doc_ids = {},
                    const KeyMaskView& key_padding_mask = {}) {
    forward_impl(x, rope_cos, rope_sin, out, kv_cache, token_masks(doc_ids, key_padding_mask));
  }
  void forward_into(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                    const ConstView<T, 2>& rope_sin, const StridedView<T, 3>& out,
                    KVCache<T>* kv_cache, const Masks& masks) {
    forward_impl(x, rope_cos, rope_sin, out, kv_cache, masks);
  }
  template <typename CacheT, typename = enable_if_mixed_t<CacheT>>
  void forward_into(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                    const ConstView<T, 2>& rope_sin, const StridedView<T, 3>& out,
                    KVCache<CacheT>* kv_cache, const Masks& masks) {
    forward_impl(x, rope_cos, rope_sin, out, kv_cache, masks);
  }

  // Serving: x (total, dim) holds the new tokens of several sequences of a PagedKVCache,
  // packed by batch.cu_seqlens as flash_attn_varlen_func packs them; decode steps (one
  // token), prefill chunks and whole prompts mix in one call. Sequence s's n tokens are
  // rotated by `rope` at its own positions [len, len + n), len being what the cache held
  // for it before the call (so a step can never be rotated at the wrong position),
  // appended to it, and attend causally (bottom-right) to all of its positions.
  // doc_ids (1, total) are the tokens' documents, needed exactly when the cache records
  // them; a query then sees the keys of its own document. masks: none, or one Masks per
  // sequence shaped for that sequence alone (B = 1, Sq = n, Skv = len + n), without doc
  // ids (they come from doc_ids and the cache). Returns (total, dim). The cache holds T,
  // or bf16/fp16 under float activations. Every check runs before the cache changes; an
  // append the pool has no blocks for throws std::length_error, changing nothing.
  template <typename CacheT>
  Tensor<T, 2> forward(const ConstView<T, 2>& x, const RotaryEmbedding<T>& rope,
                       PagedKVCache<CacheT>& cache, const RaggedBatch& batch,
                       const DocIdView& doc_ids = {}, const std::vector<Masks>& masks = {}) {
    Tensor<T, 2> out(x.dimension(0), dim_);
    forward_into(x, rope, StridedView<T, 2>(out), cache, batch, doc_ids, masks);
    return out;
  }

  // The ragged forward() writing into a caller-owned out (total, dim).
  template <typename CacheT>
  void forward_into(const ConstView<T, 2>& x, const RotaryEmbedding<T>& rope,
                    const StridedView<T, 2>& out, PagedKVCache<CacheT>& cache,
                    const RaggedBatch& batch, const DocIdView& doc_ids = {},
                    const std::vector<Masks>& masks = {}) {
    static_assert(std::is_same_v<CacheT, T> || detail::is_mixed_precision_v<T, CacheT>,
                  "the cache holds T, or bf16/fp16/QInt8 under float activations");
    validate_ragged_forward(x, rope, out, cache, batch, doc_ids, masks);
    const Index total = batch.total_tokens();
    if (total == 0) return;
    const Index kv_width = n_kv_heads_ * head_dim_;
    const AttentionWeights<T> w = weights();
    project_qkv(x.data(), total, x.stride(0), w);

    // Each sequence's rows rotated at its own positions.
    for (Index s = 0; s < batch.size(); ++s) {
      const Index n = batch.new_tokens(s), first = batch.first_token(s);
      if (n == 0) continue;
      const Index start = cache.seq_len(batch.seqs[static_cast<std::size_t>(s)]);
      const ConstView<T, 2> cos = rope.cos_rows(start, n), sin = rope.sin_rows(start, n);
      apply_rope_inplace(heads_view(q_buf_.data() + first * n_heads_ * head_dim_, 1, n, n_heads_),
                         cos, sin, rope.style());
      apply_rope_inplace(heads_view(k_buf_.data() + first * kv_width, 1, n, n_kv_heads_), cos, sin,
                         rope.style());
    }

    // (total, heads, D) storage seen as the cache's (Hkv, total, D) and the kernel's
    // (total, H, D).
    const ConstView<T, 3> k =
        ConstView<T, 3>(k_buf_.data(), {total, n_kv_heads_, head_dim_}).transpose(0, 1);
    const ConstView<T, 3> v =
        ConstView<T, 3>(v_buf_.data(), {total, n_kv_heads_, head_dim_}).transpose(0, 1);
    cache.append(batch, k, v, doc_ids);

    std::vector<Masks>& seq_masks = ragged_masks_;
    seq_masks.assign(static_cast<std::size_t>(batch.size()), Masks{});
    for (Index s = 0; s < batch.size(); ++s) {
      Masks& m = seq_masks[static_cast<std::size_t>(s)];
      if (!masks.empty()) m = masks[static_cast<std::size_t>(s)];
      if (doc_ids.has_value()) {
        m.doc_ids = doc_ids.visit([&](const auto& ids) {
          return DocIdView(ids.narrow(1, batch.first_token(s), batch.new_tokens(s)));
        });
      }
    }
    auto& paged = paged_attention<CacheT>();
    paged(ConstView<T, 3>(q_buf_.data(), {total, n_heads_, head_dim_}), cache, batch,
          StridedView<T, 3>(o_buf_.data(), {total, n_heads_, head_dim_}), seq_masks);
    project_out(total, out.data(), out.stride(0), w);
  }

 private:
  static Masks token_masks(const DocIdView& doc_ids, const KeyMaskView& key_padding_mask) {
    Masks masks;
    masks.doc_ids = doc_ids;
    masks.key_padding_mask = key_padding_mask;
    return masks;
  }

  template <typename CacheT>
  Tensor<T, 3> forward_tables(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                              const ConstView<T, 2>& rope_sin, KVCache<CacheT>* kv_cache,
                              const Masks& masks) {
    Tensor<T, 3> out(x.dimension(0), x.dimension(1), dim_);
    forward_impl(x, rope_cos, rope_sin, StridedView<T, 3>(out), kv_cache, masks);
    return out;
  }

  template <typename CacheT>
  Tensor<T, 3> forward_rope(const ConstView<T, 3>& x, const RotaryEmbedding<T>& rope,
                            Index start_pos, KVCache<CacheT>* kv_cache, const Masks& masks) {
    if (rope.head_dim() != head_dim_) {
      detail::throw_invalid_argument("Attention::forward: rope has head_dim ", rope.head_dim(),
                                     " but the module has head_dim ", head_dim_);
    }
    const RopeStyle saved = rope_style_;
    rope_style_ = rope.style();
    const Index seq_len = x.dimension(1);
    try {
      Tensor<T, 3> out = forward_tables(x, rope.cos_rows(start_pos, seq_len),
                                        rope.sin_rows(start_pos, seq_len), kv_cache, masks);
      rope_style_ = saved;
      return out;
    } catch (...) {
      rope_style_ = saved;
      throw;
    }
  }

  template <typename CacheT>
  void forward_impl(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                    const ConstView<T, 2>& rope_sin, const StridedView<T, 3>& out,
                    KVCache<CacheT>* kv_cache, const Masks& call_masks) {
    static_assert(std::is_same_v<CacheT, T> || detail::is_mixed_precision_v<T, CacheT>,
                  "the cache holds T, or bf16/fp16/QInt8 under float activations");
    const Index batch = x.dimension(0);
    const Index seq_len = x.dimension(1);
    validate_forward(x, rope_cos, rope_sin, out, kv_cache, call_masks);
    const AttentionWeights<T> w = weights();
    const Index q_width = n_heads_ * head_dim_;
    const Index rows = batch * seq_len;

    // 1. Projections into (B, S, heads, D) buffers, 2. QK-norm.
    const ConstView<T, 3> x_rows = contiguous_rows(x);
    project_qkv(x_rows.data(), rows, x_rows.stride(1), w);

    // (B, S, heads, D) storage seen as (B, heads, S, D): transposes are free.
    const StridedView<T, 4> q = heads_view(q_buf_.data(), batch, seq_len, n_heads_);
    const StridedView<T, 4> k = heads_view(k_buf_.data(), batch, seq_len, n_kv_heads_);
    const StridedView<T, 4> v = heads_view(v_buf_.data(), batch, seq_len, n_kv_heads_);

    // 3. RoPE.
    apply_rope_inplace(q, rope_cos, rope_sin, rope_style_);
    apply_rope_inplace(k, rope_cos, rope_sin, rope_style_);

    // 4. Cache, 5. SDPA (always causal, bottom-right aligned).
    Masks masks = call_masks;
    const DocIdView& doc_ids = call_masks.doc_ids;
    const StridedView<T, 4> o = heads_view(o_buf_.data(), batch, seq_len, n_heads_);
    if (kv_cache != nullptr) {
      const KVPrefix<CacheT> prefix =
          doc_ids.has_value() ? kv_cache->update(k, v, doc_ids) : kv_cache->update(k, v);
      if (doc_ids.has_value()) masks.kv_doc_ids = kv_cache->doc_ids();
      causal_sdpa<CacheT>()(q, prefix.keys, prefix.values, o, masks);
    } else {
      causal_sdpa<T>()(q, k, v, o, masks);
    }

    // 6. (B, S, H * D) -> out = o wo^T.
    if (out.stride(0) == seq_len * out.stride(1)) {
      project_out(rows, out.data(), out.stride(1), w);
    } else {
      for (Index b = 0; b < batch; ++b) {
        detail::linear(o_buf_.data() + b * seq_len * q_width, seq_len, q_width, q_width,
                       w.wo.data(), dim_, w.wo.stride(0), out.row(b, 0), out.stride(1), device_);
      }
    }
  }

  // x's rows (rows, dim) of row stride ldx -> q_buf_ (rows, H, D), k_buf_, v_buf_
  // (rows, Hkv, D), QK-normed when the module has qk_norm; sizes o_buf_ (rows, H, D).
  void project_qkv(const T* x, Index rows, Index ldx, const AttentionWeights<T>& w) {
    const Index q_width = n_heads_ * head_dim_;
    const Index kv_width = n_kv_heads_ * head_dim_;
    q_buf_.resize(static_cast<std::size_t>(rows * q_width));
    k_buf_.resize(static_cast<std::size_t>(rows * kv_width));
    v_buf_.resize(static_cast<std::size_t>(rows * kv_width));
    o_buf_.resize(static_cast<std::size_t>(rows * q_width));
    detail::linear(x, rows, dim_, ldx, w.wq.data(), q_width, w.wq.stride(0), q_buf_.data(),
                   q_width, device_);
    detail::linear(x, rows, dim_, ldx, w.wk.data(), kv_width, w.wk.stride(0), k_buf_.data(),
                   kv_width, device_);
    detail::linear(x, rows, dim_, ldx, w.wv.data(), kv_width, w.wv.stride(0), v_buf_.data(),
                   kv_width, device_);
    if (qk_norm_) {
      detail::rms_norm_rows(StridedView<T, 2>(q_buf_.data(), {rows * n_heads_, head_dim_}),
                            w.q_norm.data(), norm_eps_);
      detail::rms_norm_rows(StridedView<T, 2>(k_buf_.data(), {rows * n_kv_heads_, head_dim_}),
                            w.k_norm.data(), norm_eps_);
    }
  }

  // o_buf_ (rows, H * D) -> out = o wo^T, rows of stride ldo.
  void project_out(Index rows, T* out, Index ldo, const AttentionWeights<T>& w) {
    const Index q_width = n_heads_ * head_dim_;
    detail::linear(o_buf_.data(), rows, q_width, q_width, w.wo.data(), dim_, w.wo.stride(0), out,
                   ldo, device_);
  }

 public:
  // Options of the inner SDPA: softcap, window, empty-row policy, path, scale. Lets a
  // model use e.g. Gemma's logit softcap or a sliding window. The module is always causal,
  // as KempnerForge's is, so options.causal must be true (std::invalid_argument
  // otherwise, rather than ignoring it); invalid values are rejected here, before
  // anything changes.
  void set_sdpa_options(const SdpaOptions& options) {
    constexpr const char* kWhere = "Attention::set_sdpa_options";
    if (!options.causal) {
      detail::throw_invalid_argument(
          kWhere,
          ": options.causal is false, but Attention is always causal (bottom-right "
          "aligned); set causal = true, or call scaled_dot_product_attention for "
          "non-causal attention");
    }
    detail::resolve_options(kWhere, options, head_dim_);
    detail::check_per_head_options(kWhere, options, n_heads_);
    sdpa_options_ = options;
  }
  const SdpaOptions& sdpa_options() const { return sdpa_options_; }

 private:
  template <typename CacheT>
  void validate_forward(const ConstView<T, 3>& x, const ConstView<T, 2>& rope_cos,
                        const ConstView<T, 2>& rope_sin, const StridedView<T, 3>& out,
                        const KVCache<CacheT>* kv_cache, const Masks& call_masks) const {
    constexpr const char* kWhere = "Attention::forward";
    const DocIdView& doc_ids = call_masks.doc_ids;
    if (call_masks.kv_doc_ids.has_value()) {
      detail::throw_invalid_argument(
          kWhere, ": masks.kv_doc_ids ", detail::shape_string(call_masks.kv_doc_ids.dimensions()),
          " must be absent: the keys' document ids are the cache's (or doc_ids "
          "without a cache)");
    }
    detail::check_shape(kWhere, "x", x, {-1, -1, dim_}, "(B, S, dim)");
    const Index batch = x.dimension(0);
    const Index seq_len = x.dimension(1);
    detail::check_shape(kWhere, "out", out, {batch, seq_len, dim_}, "(B, S, dim)");
    detail::check_shape(kWhere, "rope_cos", rope_cos, {seq_len, head_dim_ / 2},
                        "(S, head_dim / 2)");
    detail::check_shape(kWhere, "rope_sin", rope_sin, {seq_len, head_dim_ / 2},
                        "(S, head_dim / 2)");
    Index kv_len = seq_len;
    if (kv_cache != nullptr) {
      if (kv_cache->batch_size() != batch || kv_cache->n_kv_heads() != n_kv_heads_ ||
          kv_cache->head_dim() != head_dim_) {
        detail::throw_invalid_argument(kWhere, ": kv_cache holds (batch_size ",
                                       kv_cache->batch_size(), ", n_kv_heads ",
                                       kv_cache->n_kv_heads(), ", head_dim ", kv_cache->head_dim(),
                                       ") but x ", detail::shape_string(x.dimensions()), " needs (",
                                       batch, ", ", n_kv_heads_, ", ", head_dim_, ")");
      }
      if (seq_len > kv_cache->max_seq_len() - kv_cache->seq_len()) {
        std::ostringstream os;
        os << kWhere << ": cache overflow: " << kv_cache->seq_len() << " cached + " << seq_len
           << " new positions exceed max_seq_len " << kv_cache->max_seq_len();
        throw std::length_error(os.str());
      }
      kv_len += kv_cache->seq_len();
      if (doc_ids.has_value() && !kv_cache->records_doc_ids()) {
        detail::throw_invalid_argument(
            kWhere, ": doc_ids ", detail::shape_string(doc_ids.dimensions()),
            " together with a kv_cache needs a cache that records document ids (KVCache(..., "
            "record_doc_ids = true)); this cache does not");
      }
      if (!doc_ids.has_value() && kv_cache->records_doc_ids()) {
        detail::throw_invalid_argument(
            kWhere, ": kv_cache records document ids, so doc_ids (B, S) = (", batch, ", ", seq_len,
            ") are needed for x ", detail::shape_string(x.dimensions()));
      }
    }
    // The SDPA options too: nothing may fail after the cache has been appended to.
    detail::resolve_options(kWhere, sdpa_options_, head_dim_);
    // kDotProduct's checks, which do not depend on the path (the answer is not used).
    detail::use_bf16_dot<T, CacheT>(kWhere, sdpa_options_, head_dim_, /*decode=*/false);
    detail::use_int8_dot<T, CacheT>(kWhere, sdpa_options_, head_dim_);
    Masks masks = call_masks;
    if (kv_cache != nullptr && doc_ids.has_value()) {
      masks.doc_ids = DocIdView();
      // The keys' ids will be the cache's after the update: (B, Skv) by construction.
      detail::check_shape(kWhere, "doc_ids", doc_ids, {batch, seq_len}, "(B, Sq)");
    }
    detail::check_per_head_options(kWhere, sdpa_options_, n_heads_);
    detail::validate_masks(kWhere, detail::MaskRules{true, sdpa_options_.window}, masks, batch,
                           n_heads_, seq_len, kv_len);
  }

  template <typename CacheT>
  void validate_ragged_forward(const ConstView<T, 2>& x, const RotaryEmbedding<T>& rope,
                               const StridedView<T, 2>& out, const PagedKVCache<CacheT>& cache,
                               const RaggedBatch& batch, const DocIdView& doc_ids,
                               const std::vector<Masks>& masks) const {
    constexpr const char* kWhere = "Attention::forward (ragged)";
    cache.check_batch(kWhere, batch);
    const Index total = batch.total_tokens();
    detail::check_shape(kWhere, "x", x, {total, dim_}, "(total_tokens, dim)");
    if (x.stride(1) != 1) {
      detail::throw_invalid_argument(kWhere, ": x needs a contiguous last dimension");
    }
    detail::check_shape(kWhere, "out", out, {total, dim_}, "(total_tokens, dim)");
    if (out.stride(1) != 1) {
      detail::throw_invalid_argument(kWhere, ": out needs a contiguous last dimension");
    }
    if (rope.head_dim() != head_dim_) {
      detail::throw_invalid_argument(kWhere, ": rope has head_dim ", rope.head_dim(),
                                     " but the module has head_dim ", head_dim_);
    }
    if (cache.n_kv_heads() != n_kv_heads_ || cache.head_dim() != head_dim_) {
      detail::throw_invalid_argument(kWhere, ": cache holds (n_kv_heads ", cache.n_kv_heads(),
                                     ", head_dim ", cache.head_dim(), ") but the module needs (",
                                     n_kv_heads_, ", ", head_dim_, ")");
    }
    if (doc_ids.has_value() != cache.records_doc_ids()) {
      detail::throw_invalid_argument(
          kWhere, cache.records_doc_ids()
                      ? ": the cache records document ids, so doc_ids (1, total_tokens) are needed"
                      : ": doc_ids need a cache that records document ids (PagedKVCache(..., "
                        "record_doc_ids = true)); this cache does not");
    }
    if (doc_ids.has_value()) {
      detail::check_shape(kWhere, "doc_ids", doc_ids, {1, total}, "(1, total_tokens)");
    }
    if (!masks.empty() && masks.size() != batch.seqs.size()) {
      detail::throw_invalid_argument(kWhere, ": ", masks.size(), " Masks given for ",
                                     batch.seqs.size(),
                                     " sequences; give one per sequence or none");
    }
    // Nothing may fail after the cache has been appended to.
    detail::resolve_options(kWhere, sdpa_options_, head_dim_);
    // kDotProduct's checks, which do not depend on the path (the answer is not used).
    detail::use_bf16_dot<T, CacheT>(kWhere, sdpa_options_, head_dim_, /*decode=*/false);
    detail::use_int8_dot<T, CacheT>(kWhere, sdpa_options_, head_dim_);
    detail::check_per_head_options(kWhere, sdpa_options_, n_heads_);
    for (Index s = 0; s < batch.size(); ++s) {
      const Index n = batch.new_tokens(s);
      const Index len = cache.seq_len(batch.seqs[static_cast<std::size_t>(s)]);
      if (len + n > rope.max_seq_len()) {
        detail::throw_invalid_argument(kWhere, ": sequence ", batch.seqs[static_cast<std::size_t>(s)],
                                       " would reach position ", len + n - 1,
                                       ", past the rope table of max_seq_len ", rope.max_seq_len());
      }
      if (masks.empty()) continue;
      const Masks& m = masks[static_cast<std::size_t>(s)];
      if (m.doc_ids.has_value() || m.kv_doc_ids.has_value()) {
        detail::throw_invalid_argument(
            kWhere, ": masks[", s, "] has doc_ids or kv_doc_ids; pass the tokens' documents as "
            "doc_ids (1, total_tokens), the keys' come from the cache");
      }
      // The keys this sequence will attend to: what it holds plus its new tokens.
      detail::validate_masks(kWhere, detail::MaskRules{true, sdpa_options_.window}, m, 1, n_heads_,
                             n, len + n);
    }
  }

  // x with rows [b, s] addressable as one (B * S, dim) matrix of row stride stride(1).
  ConstView<T, 3> contiguous_rows(const ConstView<T, 3>& x) {
    if (x.stride(0) == x.dimension(1) * x.stride(1) || x.dimension(0) == 1) return x;
    x_buf_ = x.to_tensor();
    return ConstView<T, 3>(x_buf_);
  }

  StridedView<T, 4> heads_view(T* data, Index batch, Index seq_len, Index heads) const {
    return StridedView<T, 4>(data, {batch, seq_len, heads, head_dim_}).transpose(1, 2);
  }

  // splitmix64, mapped to [0, 1) with 53 random bits.
  static double uniform01(std::uint64_t& state) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) * 0x1.0p-53;
  }

  Index dim_;
  Index n_heads_;
  Index n_kv_heads_;
  Index head_dim_;
  bool qk_norm_;
  double norm_eps_;
  RopeStyle rope_style_ = RopeStyle::kHalfSplit;
  const Eigen::ThreadPoolDevice* device_ = nullptr;

  Tensor<T, 2> wq_, wk_, wv_, wo_;
  Tensor<T, 1> q_norm_, k_norm_;
  std::optional<AttentionWeights<T>> external_;

  // An inner operator with the module's options (always causal) and device.
  template <typename Op>
  Op& configured(Op& op) {
    op.set_options(sdpa_options_);
    op.set_device(device_);
    return op;
  }
  // The inner SDPA for the cache's element type (each keeps its own scratch).
  template <typename KV>
  ScaledDotProductAttention<T, KV>& causal_sdpa() {
    return configured(std::get<ScaledDotProductAttention<T, KV>>(sdpas_));
  }

  SdpaOptions sdpa_options_ = causal_options();
  static SdpaOptions causal_options() {
    SdpaOptions options;
    options.causal = true;
    return options;
  }
  std::conditional_t<
      std::is_same_v<T, float>,
      std::tuple<ScaledDotProductAttention<T>, ScaledDotProductAttention<T, Eigen::bfloat16>,
                 ScaledDotProductAttention<T, Eigen::half>, ScaledDotProductAttention<T, QInt8>>,
      std::tuple<ScaledDotProductAttention<T>>>
      sdpas_;
  // The paged attention for the cache's element type (each keeps its own scratch).
  template <typename KV>
  PagedAttention<T, KV>& paged_attention() {
    return configured(std::get<PagedAttention<T, KV>>(paged_attentions_));
  }
  std::conditional_t<std::is_same_v<T, float>,
                     std::tuple<PagedAttention<T>, PagedAttention<T, Eigen::bfloat16>,
                                PagedAttention<T, Eigen::half>, PagedAttention<T, QInt8>>,
                     std::tuple<PagedAttention<T>>>
      paged_attentions_;
  std::vector<Masks> ragged_masks_;
  std::vector<T> q_buf_, k_buf_, v_buf_, o_buf_;
  Tensor<T, 3> x_buf_;
};

}  // namespace attnforge
