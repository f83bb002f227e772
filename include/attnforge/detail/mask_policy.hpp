// The mask policy: the one encoding of what may attend to what and of what is added to
// the scores, read by every SDPA path. It answers the questions the paths ask:
//   - is key j allowed for query i of head h, and what is added to its score
//     (BatchMask::allowed, BatchMask::score_bias: the reference path, per element);
//   - which keys can a range of queries see at all (BatchMask::key_span: the decode
//     path per batch row, the tile plan per query tile);
//   - which rows of a run of positions see key j by position (BatchMask::rows_seeing:
//     the fused kernel's lane interval);
//   - which (query tile, key tile) pairs are empty, full or partial, and which keys of a
//     tile matter (TilePlan: the fused kernel).
// Adding a mask kind means adding it here (and to Masks and its validation); the kernels
// apply it through these questions. docs/design.md describes the semantics.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "attnforge/mask.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// One batch row of document ids, whichever integer type holds them. The kernels read
// an id per key only on tiles that a document boundary crosses, where the (perfectly
// predicted) type branch costs nothing next to the scores.
class DocIdRow {
 public:
  DocIdRow() = default;
  explicit DocIdRow(const std::int64_t* ids) : wide_(ids) {}
  explicit DocIdRow(const std::int32_t* ids) : narrow_(ids) {}

  bool has_value() const { return wide_ != nullptr || narrow_ != nullptr; }
  DocId operator[](Index j) const { return narrow_ != nullptr ? DocId(narrow_[j]) : wide_[j]; }
  // f(pointer) with the row's own pointer type, for the algorithms over whole rows.
  template <typename F>
  decltype(auto) visit(F&& f) const {
    return narrow_ != nullptr ? f(narrow_) : f(wide_);
  }

 private:
  const std::int64_t* wide_ = nullptr;
  const std::int32_t* narrow_ = nullptr;
};

// Keys [first, last); empty when first >= last.
struct KeySpan {
  Index first;
  Index last;
};

// The mask of one batch row. Query i sits at absolute position pos(i) = Skv - Sq + i
// (bottom-right alignment), so a decode step or a chunk on top of a filled cache sees
// every earlier key. Element data (attn_mask, attn_bias) are (H, Sq, Skv) views, with
// stride 0 along a broadcast head dimension.
struct BatchMask {
  bool causal = false;
  Index window = 0;    // 0: no window
  Index q_offset = 0;  // Skv - Sq
  Index kv_len = 0;
  DocIdRow q_docs;
  DocIdRow kv_docs;
  bool kv_docs_sorted = false;  // packed documents: ids never decrease along the keys
  const unsigned char* key_allowed = nullptr;
  StridedView<const unsigned char, 3> attn_mask;
  ConstView<float, 3> attn_bias;
  const double* alibi_slopes = nullptr;  // (H)

  Index position(Index i) const { return q_offset + i; }
  // Whether the element data hold a row per head (else every head reads the same rows).
  bool attn_mask_per_head() const { return attn_mask.has_value() && attn_mask.stride(0) != 0; }
  bool attn_bias_per_head() const { return attn_bias.has_value() && attn_bias.stride(0) != 0; }

  // Keys outside [key_begin(i), key_end(i)) are excluded by position alone.
  Index key_begin(Index i) const {
    return window > 0 ? std::clamp<Index>(position(i) - window + 1, 0, kv_len) : 0;
  }
  Index key_end(Index i) const {
    return causal ? std::clamp<Index>(position(i) + 1, 0, kv_len) : kv_len;
  }

  // Rows [lo, hi) of the n rows starting at row p0 that may see key j by position: the
  // rules are monotone in the position, so they form one interval.
  std::pair<Index, Index> rows_seeing(Index j, Index p0, Index n) const {
    const Index lo = causal ? std::clamp<Index>(j - q_offset - p0, 0, n) : 0;
    const Index hi = window > 0 ? std::clamp<Index>(j - q_offset + window - p0, 0, n) : n;
    return {std::min(lo, hi), hi};
  }

  // The rules, one predicate each; allowed() is their conjunction, and the fused kernel
  // applies the same predicates lane by lane.
  bool positions_allow(Index i, Index j) const { return j >= key_begin(i) && j < key_end(i); }
  bool documents_allow(DocId query_doc, Index j) const {
    return !q_docs.has_value() || query_doc == kv_docs[j];
  }
  bool padding_allows(Index j) const { return key_allowed == nullptr || key_allowed[j] != 0; }
  // attn_mask and a -inf attn_bias, given the rows of one (head, query) (null: absent).
  static bool elements_allow(const unsigned char* mask_row, const float* bias_row, Index j) {
    return (mask_row == nullptr || mask_row[j] != 0) &&
           (bias_row == nullptr || bias_row[j] != -std::numeric_limits<float>::infinity());
  }
  const unsigned char* mask_row(Index h, Index i) const {
    return attn_mask.has_value() ? attn_mask.row(h, i) : nullptr;
  }
  const float* bias_row(Index h, Index i) const {
    return attn_bias.has_value() ? attn_bias.row(h, i) : nullptr;
  }

  // The rules that are the same for every head (position, documents, padding).
  bool allowed(Index i, Index j) const {
    return positions_allow(i, j) && documents_allow(q_docs.has_value() ? q_docs[i] : 0, j) &&
           padding_allows(j);
  }
  bool allowed(Index h, Index i, Index j) const {
    return allowed(i, j) && elements_allow(mask_row(h, i), bias_row(h, i), j);
  }

  // ALiBi's bias -slope_h * (pos(i) - j), as slope_h * (j - pos(i)): the key offset is
  // an exact integer, so the product has one rounding however long the sequence.
  double alibi_slope(Index h) const { return alibi_slopes != nullptr ? alibi_slopes[h] : 0.0; }
  // What is added to the (scaled, softcapped) score of an allowed pair, in natural-log
  // units: attn_bias and ALiBi.
  double score_bias(Index h, Index i, Index j) const {
    const double bias = attn_bias.has_value() ? static_cast<double>(attn_bias(h, i, j)) : 0.0;
    return bias + alibi_slope(h) * static_cast<double>(j - position(i));
  }
  bool has_element_mask() const { return attn_mask.has_value() || attn_bias.has_value(); }

  // Keys [first, last) outside which every query in rows [i_first, i_last] is masked:
  // the union of their positional ranges, narrowed to their documents when the key ids
  // are sorted (packed documents: the keys of ids [min, max] are then one run, found by
  // binary search, so the cost of a packed row is what its documents cost).
  KeySpan key_span(Index i_first, Index i_last, DocId q_min, DocId q_max) const {
    KeySpan span{key_begin(i_first), key_end(i_last)};
    if (!q_docs.has_value() || !kv_docs_sorted || span.first >= span.last) return span;
    kv_docs.visit([&](const auto* ids) {
      span.first = std::max(span.first,
                            static_cast<Index>(std::lower_bound(ids, ids + kv_len, q_min) - ids));
      span.last =
          std::min(span.last, static_cast<Index>(std::upper_bound(ids, ids + kv_len, q_max) - ids));
    });
    return span;
  }
  // Whether, inside key_span(..., q_min, q_max), a key may still be excluded by anything
  // but its position: padding, element masks, or documents, unless the span resolved
  // them (sorted key ids and a single query document: every key inside has it).
  bool excludes_inside_span(DocId q_min, DocId q_max) const {
    const bool documents = q_docs.has_value() && !(kv_docs_sorted && q_min == q_max);
    return documents || key_allowed != nullptr || has_element_mask();
  }
  // The documents [min, max] of queries [i_first, i_last] (0, 0 without documents).
  std::pair<DocId, DocId> query_documents(Index i_first, Index i_last) const {
    if (!q_docs.has_value()) return {0, 0};
    return q_docs.visit([&](const auto* ids) {
      const auto [lo, hi] = std::minmax_element(ids + i_first, ids + i_last + 1);
      return std::pair<DocId, DocId>(*lo, *hi);
    });
  }
};

// The mask of a whole call, validated: builds each batch row's BatchMask.
class MaskPolicy {
 public:
  MaskPolicy(const MaskRules& rules, const Masks& masks, Index batch, Index n_heads, Index q_len,
             Index kv_len, const double* alibi_slopes = nullptr)
      : rules_(rules),
        masks_(masks),
        batch_(batch),
        n_heads_(n_heads),
        q_len_(q_len),
        kv_len_(kv_len),
        alibi_slopes_(alibi_slopes) {
    kv_docs_sorted_.assign(static_cast<std::size_t>(batch), false);
    if (!masks.doc_ids.has_value()) return;
    for (Index b = 0; b < batch; ++b) {
      const DocIdRow kv = key_documents(b);
      kv_docs_sorted_[static_cast<std::size_t>(b)] =
          kv.visit([&](const auto* ids) { return std::is_sorted(ids, ids + kv_len); });
    }
  }

  Index batch() const { return batch_; }
  Index n_heads() const { return n_heads_; }
  Index q_len() const { return q_len_; }
  Index kv_len() const { return kv_len_; }
  const MaskRules& rules() const { return rules_; }

  bool has_documents() const { return masks_.doc_ids.has_value(); }
  bool has_padding() const { return masks_.key_padding_mask.has_value(); }
  bool has_attn_mask() const { return masks_.attn_mask.has_value(); }
  bool has_bias() const { return masks_.attn_bias.has_value(); }
  bool has_alibi() const { return alibi_slopes_ != nullptr; }
  // Whether some pair may be excluded by anything but position (the kernels then check
  // elements in partial tiles), and whether anything is added to the scores.
  bool masks_elements() const {
    return has_documents() || has_padding() || has_attn_mask() || has_bias();
  }
  bool biases_scores() const { return has_bias() || has_alibi(); }

  BatchMask row(Index b) const {
    BatchMask m;
    m.causal = rules_.causal;
    m.window = rules_.window;
    m.q_offset = kv_len_ - q_len_;
    m.kv_len = kv_len_;
    if (masks_.doc_ids.has_value()) {
      m.q_docs = doc_row(masks_.doc_ids, b);
      m.kv_docs = key_documents(b);
      m.kv_docs_sorted = kv_docs_sorted_[static_cast<std::size_t>(b)];
    }
    if (masks_.key_padding_mask.has_value()) {
      m.key_allowed = masks_.key_padding_mask.visit(
          [b](const auto& view) { return reinterpret_cast<const unsigned char*>(view.row(b)); });
    }
    if (masks_.attn_mask.has_value()) {
      m.attn_mask = masks_.attn_mask.visit([&](const auto& view) {
        const auto bytes = reinterpret_cast<const unsigned char*>(view.data());
        return heads_of(
            StridedView<const unsigned char, 4>(bytes, view.dimensions(), view.strides()), b);
      });
    }
    if (masks_.attn_bias.has_value()) m.attn_bias = heads_of(masks_.attn_bias, b);
    m.alibi_slopes = alibi_slopes_;
    return m;
  }

 private:
  static DocIdRow doc_row(const DocIdView& ids, Index b) {
    return ids.visit([b](const auto& view) { return DocIdRow(view.row(b)); });
  }
  DocIdRow key_documents(Index b) const {
    return doc_row(masks_.kv_doc_ids.has_value() ? masks_.kv_doc_ids : masks_.doc_ids, b);
  }

  // The (H, Sq, Skv) slice of batch row b of a (B|1, H|1, Sq, Skv) view, broadcast
  // dimensions of size 1 read with stride 0.
  template <typename T>
  StridedView<T, 3> heads_of(const StridedView<T, 4>& view, Index b) const {
    const Index b_offset = view.dimension(0) == 1 ? 0 : b * view.stride(0);
    const Index head_stride = view.dimension(1) == 1 ? 0 : view.stride(1);
    return StridedView<T, 3>(view.data() + b_offset, {n_heads_, q_len_, kv_len_},
                             {head_stride, view.stride(2), view.stride(3)});
  }

  MaskRules rules_;
  Masks masks_;
  Index batch_, n_heads_, q_len_, kv_len_;
  const double* alibi_slopes_;
  std::vector<bool> kv_docs_sorted_;
};

// How a (query tile, key tile) pair relates to the mask: skipped entirely, computed
// with no per-element mask work, or computed and then masked element by element.
enum class TileClass : std::uint8_t { kEmpty, kFull, kPartial };

// Classifies the tiles of an attention problem for the fused kernel. Query tile qt
// covers query positions [qt * q_tile_positions, ...), key tile kt keys
// [kt * key_tile, ...). The positional rules are arithmetic; documents are summarised
// per tile by their id range (two tiles whose ranges are disjoint cannot share a
// document, however the ids are ordered), padding by the count of allowed keys per key
// tile, element masks by the count of open (allowed, bias > -inf) entries per pair of
// tiles over all heads. Each query tile also gets its key span (BatchMask::key_span), so
// it visits only the key tiles of its own documents. Metadata is O(B * (Sq + Skv)),
// plus one pass over an element mask when there is one.
class TilePlan {
 public:
  void build(const MaskPolicy& policy, Index q_tile_positions, Index key_tile) {
    q_len_ = policy.q_len();
    kv_len_ = policy.kv_len();
    q_tile_positions_ = q_tile_positions;
    key_tile_ = key_tile;
    n_q_tiles_ = (q_len_ + q_tile_positions - 1) / q_tile_positions;
    n_key_tiles_ = (kv_len_ + key_tile - 1) / key_tile;
    rules_ = policy.rules();
    q_offset_ = kv_len_ - q_len_;
    const Index batch = policy.batch();
    has_docs_ = policy.has_documents();
    has_padding_ = policy.has_padding();
    has_elements_ = policy.has_attn_mask() || policy.has_bias();
    spans_.resize(static_cast<std::size_t>(batch * n_q_tiles_));
    q_docs_.assign(has_docs_ ? static_cast<std::size_t>(batch * n_q_tiles_) : 0, {});
    k_docs_.assign(has_docs_ ? static_cast<std::size_t>(batch * n_key_tiles_) : 0, {});
    allowed_keys_.assign(has_padding_ ? static_cast<std::size_t>(batch * n_key_tiles_) : 0, 0);
    open_elements_.assign(
        has_elements_ ? static_cast<std::size_t>(batch * n_q_tiles_ * n_key_tiles_) : 0, 0);
    n_heads_ = policy.n_heads();
    for (Index b = 0; b < batch; ++b) summarise_row(b, policy.row(b));
  }

  Index q_tiles() const { return n_q_tiles_; }
  Index key_tiles() const { return n_key_tiles_; }

  // Key tiles [first, last) that query tile qt of batch row b may touch: every tile in
  // it intersects key_span(b, qt, kt).
  std::pair<Index, Index> key_tile_range(Index b, Index qt) const {
    const KeySpan& s = span(b, qt);
    if (s.first >= s.last) return {0, 0};
    return {s.first / key_tile_, (s.last + key_tile_ - 1) / key_tile_};
  }

  // The keys of key tile kt that some query of query tile qt in row b may see (a subset
  // of the tile, never empty for kt in key_tile_range(b, qt)). The kernel computes only
  // these, so a document shorter than a key tile, or the causal diagonal, does not pay
  // for the whole tile; the keys trimmed off are masked keys, so the result is unchanged.
  KeySpan key_span(Index b, Index qt, Index kt) const {
    const KeySpan& s = span(b, qt);
    const Index tile_first = kt * key_tile_;
    return {std::max(s.first, tile_first), std::min(s.last, tile_first + key_tile_)};
  }

  TileClass classify(Index b, Index qt, Index kt) const {
    const Index p_first = qt * q_tile_positions_;
    const Index p_last = std::min(q_len_, p_first + q_tile_positions_) - 1;
    const Index k_first = kt * key_tile_;
    const Index k_last = std::min(kv_len_, k_first + key_tile_) - 1;
    bool partial = false;
    if (rules_.causal) {
      if (k_first > q_offset_ + p_last) return TileClass::kEmpty;
      partial |= k_last > q_offset_ + p_first;
    }
    if (rules_.window > 0) {
      if (k_last < q_offset_ + p_first - rules_.window + 1) return TileClass::kEmpty;
      partial |= k_first < q_offset_ + p_last - rules_.window + 1;
    }
    if (has_docs_) {
      const DocRange& q = q_docs_[static_cast<std::size_t>(b * n_q_tiles_ + qt)];
      const DocRange& k = k_docs_[static_cast<std::size_t>(b * n_key_tiles_ + kt)];
      if (q.max < k.min || k.max < q.min) return TileClass::kEmpty;
      partial |= !(q.min == q.max && k.min == k.max);
    }
    if (has_padding_) {
      const Index allowed = allowed_keys_[static_cast<std::size_t>(b * n_key_tiles_ + kt)];
      if (allowed == 0) return TileClass::kEmpty;
      partial |= allowed != k_last - k_first + 1;
    }
    if (has_elements_) {
      const Index open =
          open_elements_[static_cast<std::size_t>((b * n_q_tiles_ + qt) * n_key_tiles_ + kt)];
      if (open == 0) return TileClass::kEmpty;
      partial |= open != n_heads_ * (p_last - p_first + 1) * (k_last - k_first + 1);
    }
    return partial ? TileClass::kPartial : TileClass::kFull;
  }

  // Number of key tiles that query tile qt of batch row b computes (its cost).
  Index active_key_tiles(Index b, Index qt) const {
    const auto [first, last] = key_tile_range(b, qt);
    Index n = 0;
    for (Index kt = first; kt < last; ++kt) n += classify(b, qt, kt) != TileClass::kEmpty;
    return n;
  }

 private:
  struct DocRange {
    DocId min = 0;
    DocId max = 0;
  };

  const KeySpan& span(Index b, Index qt) const {
    return spans_[static_cast<std::size_t>(b * n_q_tiles_ + qt)];
  }

  void summarise_row(Index b, const BatchMask& m) {
    for (Index qt = 0; qt < n_q_tiles_; ++qt) {
      const Index p_first = qt * q_tile_positions_;
      const Index p_last = std::min(q_len_, p_first + q_tile_positions_) - 1;
      const auto [q_min, q_max] = m.query_documents(p_first, p_last);
      if (has_docs_) q_docs_[static_cast<std::size_t>(b * n_q_tiles_ + qt)] = {q_min, q_max};
      spans_[static_cast<std::size_t>(b * n_q_tiles_ + qt)] =
          m.key_span(p_first, p_last, q_min, q_max);
    }
    if (has_docs_) {
      m.kv_docs.visit([&](const auto* ids) {
        for (Index kt = 0; kt < n_key_tiles_; ++kt) {
          const auto [lo, hi] = std::minmax_element(ids + kt * key_tile_,
                                                    ids + std::min(kv_len_, (kt + 1) * key_tile_));
          k_docs_[static_cast<std::size_t>(b * n_key_tiles_ + kt)] = {*lo, *hi};
        }
      });
    }
    if (has_padding_) {
      for (Index j = 0; j < kv_len_; ++j) {
        allowed_keys_[static_cast<std::size_t>(b * n_key_tiles_ + j / key_tile_)] +=
            m.key_allowed[j] != 0;
      }
    }
    if (has_elements_) count_open_elements(b, m);
  }

  // Open (allowed, bias > -inf) entries of the element mask per pair of tiles, over all
  // heads, in one pass over the mask (over one head when every head reads the same
  // data); and each query tile's span narrowed to its first and last open key, so the
  // kernel neither visits the key tiles the mask closes nor computes closed keys at the
  // edges of the ones it opens (a causal pattern given as a mask is trimmed as causal is).
  void count_open_elements(Index b, const BatchMask& m) {
    const bool per_head = m.attn_mask_per_head() || m.attn_bias_per_head();
    const Index heads = per_head ? n_heads_ : 1;
    const Index weight = per_head ? 1 : n_heads_;
    std::vector<KeySpan> open(static_cast<std::size_t>(n_q_tiles_), KeySpan{kv_len_, 0});
    for (Index h = 0; h < heads; ++h) {
      for (Index i = 0; i < q_len_; ++i) {
        const Index qt = i / q_tile_positions_;
        Index* counts = &open_elements_[static_cast<std::size_t>((b * n_q_tiles_ + qt) * n_key_tiles_)];
        const KeySpan row = count_open_row(m.mask_row(h, i), m.bias_row(h, i), weight, counts);
        KeySpan& tile = open[static_cast<std::size_t>(qt)];
        tile = {std::min(tile.first, row.first), std::max(tile.last, row.last)};
      }
    }
    for (Index qt = 0; qt < n_q_tiles_; ++qt) {
      KeySpan& span = spans_[static_cast<std::size_t>(b * n_q_tiles_ + qt)];
      const KeySpan& tile = open[static_cast<std::size_t>(qt)];
      span = {std::max(span.first, tile.first), std::min(span.last, tile.last)};
    }
  }

  // Adds a row's open entries to its key tiles' counts (times `weight`); returns its
  // first and last + 1 open key (an empty span when none is open).
  KeySpan count_open_row(const unsigned char* mask, const float* bias, Index weight, Index* counts) const {
    KeySpan open{kv_len_, 0};
    for (Index kt = 0; kt < n_key_tiles_; ++kt) {
      const Index first = kt * key_tile_, last = std::min(kv_len_, first + key_tile_);
      Index n = 0;
      if (bias == nullptr) {
        for (Index j = first; j < last; ++j) n += mask[j] != 0;  // the common case, vectorised
      } else {
        for (Index j = first; j < last; ++j) n += BatchMask::elements_allow(mask, bias, j);
      }
      counts[kt] += n * weight;
      if (n == 0) continue;
      if (open.first == kv_len_) {
        open.first = first;
        while (!BatchMask::elements_allow(mask, bias, open.first)) ++open.first;
      }
      open.last = last;
      while (!BatchMask::elements_allow(mask, bias, open.last - 1)) --open.last;
    }
    return open;
  }

  MaskRules rules_;
  Index q_len_ = 0, kv_len_ = 0, q_offset_ = 0, n_heads_ = 0;
  Index q_tile_positions_ = 1, key_tile_ = 1;
  Index n_q_tiles_ = 0, n_key_tiles_ = 0;
  bool has_docs_ = false, has_padding_ = false, has_elements_ = false;
  std::vector<DocRange> q_docs_;      // per (b, qt)
  std::vector<DocRange> k_docs_;      // per (b, kt)
  std::vector<Index> allowed_keys_;   // per (b, kt)
  std::vector<Index> open_elements_;  // per (b, qt, kt)
  std::vector<KeySpan> spans_;        // per (b, qt): keys outside it are masked for every query
};

}  // namespace attnforge::detail
