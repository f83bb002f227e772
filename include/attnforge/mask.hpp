// What may attend to what: causal (bottom-right aligned), sliding window, document ids
// and key padding. No Sq x Skv mask is ever built; each rule is evaluated from O(S) data.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "attnforge/tensor.hpp"

namespace attnforge {

// Document ids (B, S): int64 (a PyTorch LongTensor) or int32, read in place.
using DocIdView = EitherView<std::int64_t, std::int32_t, 2>;
// Key masks (B, S): bool or uint8_t (nonzero = may attend), read in place.
using KeyMaskView = EitherView<bool, std::uint8_t, 2>;

// Per-token mask data; every field is optional (a default view is "absent").
struct Masks {
  // (B, Sq) document id of each query. Key j is allowed for query i only when
  // doc_ids[b, i] == kv_doc_ids[b, j].
  DocIdView doc_ids;
  // (B, Skv) document id of each key; when absent, doc_ids is used for the keys too,
  // which needs Sq == Skv (the no-cache case).
  DocIdView kv_doc_ids;
  // (B, Skv), true (nonzero) = the key may be attended to.
  KeyMaskView key_padding_mask;
};

namespace detail {

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

inline DocIdRow doc_id_row(const DocIdView& ids, Index b) {
  if (!ids.has_value()) return {};
  return ids.visit([b](const auto& view) { return DocIdRow(view.row(b)); });
}

// Row b of a key mask as bytes: a bool and a uint8_t mask are both one byte per key,
// nonzero = allowed.
inline const unsigned char* key_mask_row(const KeyMaskView& mask, Index b) {
  if (!mask.has_value()) return nullptr;
  return mask.visit(
      [b](const auto& view) { return reinterpret_cast<const unsigned char*>(view.row(b)); });
}

// The mask of one batch row: the positional rules (causal, window) plus the per-token
// data. Query i sits at absolute position pos(i) = Skv - Sq + i (bottom-right
// alignment), so a decode step or a chunk on top of a filled cache sees every earlier key.
struct BatchMask {
  bool causal = false;
  Index window = 0;  // 0: no window
  Index q_offset = 0;  // Skv - Sq
  Index kv_len = 0;
  DocIdRow q_docs;
  DocIdRow kv_docs;
  const unsigned char* key_allowed = nullptr;

  Index position(Index i) const { return q_offset + i; }

  // Keys outside [key_begin(i), key_end(i)) are excluded by position alone.
  Index key_begin(Index i) const {
    return window > 0 ? std::clamp<Index>(position(i) - window + 1, 0, kv_len) : 0;
  }
  Index key_end(Index i) const {
    return causal ? std::clamp<Index>(position(i) + 1, 0, kv_len) : kv_len;
  }

  bool allowed(Index i, Index j) const {
    if (j < key_begin(i) || j >= key_end(i)) return false;
    if (q_docs.has_value() && q_docs[i] != kv_docs[j]) return false;
    if (key_allowed != nullptr && key_allowed[j] == 0) return false;
    return true;
  }
};

// Positional rules shared by all batch rows.
struct MaskRules {
  bool causal = false;
  Index window = 0;
};

inline BatchMask batch_mask(const MaskRules& rules, const Masks& masks, Index b, Index q_len,
                            Index kv_len) {
  BatchMask m;
  m.causal = rules.causal;
  m.window = rules.window;
  m.q_offset = kv_len - q_len;
  m.kv_len = kv_len;
  if (masks.doc_ids.has_value()) {
    m.q_docs = doc_id_row(masks.doc_ids, b);
    m.kv_docs = masks.kv_doc_ids.has_value() ? doc_id_row(masks.kv_doc_ids, b) : m.q_docs;
  }
  m.key_allowed = key_mask_row(masks.key_padding_mask, b);
  return m;
}

// Validates the mask inputs against (B, Sq, Skv).
inline void validate_masks(const char* where, const MaskRules& rules, const Masks& masks,
                           Index batch, Index q_len, Index kv_len) {
  if (rules.window < 0) {
    throw_invalid_argument(where, ": window must be >= 0 (0 = no window), got ", rules.window);
  }
  if (rules.causal && q_len > kv_len) {
    throw_invalid_argument(where, ": causal attention needs Sq <= Skv (bottom-right aligned), got Sq ",
                           q_len, " and Skv ", kv_len);
  }
  if (masks.doc_ids.has_value()) {
    check_shape(where, "doc_ids", masks.doc_ids, {batch, q_len}, "(B, Sq)");
    if (masks.kv_doc_ids.has_value()) {
      check_shape(where, "kv_doc_ids", masks.kv_doc_ids, {batch, kv_len}, "(B, Skv)");
    } else if (q_len != kv_len) {
      throw_invalid_argument(where, ": doc_ids ", shape_string(masks.doc_ids.dimensions()),
                             " cover the queries only, but Skv = ", kv_len, " != Sq = ", q_len,
                             "; pass kv_doc_ids (B, Skv) for the keys");
    }
  } else if (masks.kv_doc_ids.has_value()) {
    throw_invalid_argument(where, ": kv_doc_ids ", shape_string(masks.kv_doc_ids.dimensions()),
                           " given without doc_ids for the queries");
  }
  if (masks.key_padding_mask.has_value()) {
    check_shape(where, "key_padding_mask", masks.key_padding_mask, {batch, kv_len}, "(B, Skv)");
  }
}


// How a (query tile, key tile) pair relates to the mask: skipped entirely, computed
// with no per-element mask work, or computed and then masked element by element.
enum class TileClass : std::uint8_t { kEmpty, kFull, kPartial };

// Keys [first, last) of one key tile that some query of a query tile may see; empty when
// first >= last.
struct KeySpan {
  Index first;
  Index last;
};

// Classifies the tiles of an attention problem from O(B * (Sq + Skv)) metadata: the
// positional rules are arithmetic, documents are summarised per tile by their id range
// (two tiles whose ranges are disjoint cannot share a document, however the ids are
// ordered), padding by the count of allowed keys per key tile. Query tile qt covers
// query positions [qt * q_tile_positions, ...), key tile kt keys [kt * key_tile, ...).
//
// Each query tile also gets the one key interval outside which none of its queries may
// attend: the positional rules bound it, and so do documents when a row's key ids are
// sorted (packed documents): the keys whose id lies in the tile's query id range
// [min, max] are then one run, from the first key of id >= min to the last of id <= max,
// found by binary search. So a query tile visits only the key tiles of its own
// documents, and the cost of a packed row is what its documents cost, not O(S^2 / tiles).
// Unsorted or repeated ids keep the positional interval; the per-tile id ranges still
// make them correct.
class TilePlan {
 public:
  TilePlan() = default;

  void build(const MaskRules& rules, const Masks& masks, Index batch, Index q_len, Index kv_len,
             Index q_tile_positions, Index key_tile) {
    rules_ = rules;
    q_len_ = q_len;
    kv_len_ = kv_len;
    q_offset_ = kv_len - q_len;
    q_tile_positions_ = q_tile_positions;
    key_tile_ = key_tile;
    n_q_tiles_ = (q_len + q_tile_positions - 1) / q_tile_positions;
    n_key_tiles_ = (kv_len + key_tile - 1) / key_tile;
    has_docs_ = masks.doc_ids.has_value();
    has_padding_ = masks.key_padding_mask.has_value();
    q_docs_.clear();
    k_docs_.clear();
    allowed_keys_.clear();
    spans_.resize(static_cast<std::size_t>(batch * n_q_tiles_));
    for (Index qt = 0; qt < n_q_tiles_; ++qt) {
      const KeySpan span = positional_span(qt);
      for (Index b = 0; b < batch; ++b) {
        spans_[static_cast<std::size_t>(b * n_q_tiles_ + qt)] = span;
      }
    }
    if (has_docs_) {
      q_docs_.resize(static_cast<std::size_t>(batch * n_q_tiles_));
      k_docs_.resize(static_cast<std::size_t>(batch * n_key_tiles_));
      for (Index b = 0; b < batch; ++b) {
        const BatchMask m = batch_mask(rules, masks, b, q_len, kv_len);
        const std::size_t q_row = static_cast<std::size_t>(b * n_q_tiles_);
        summarise(m.q_docs, q_len, q_tile_positions, &q_docs_[q_row]);
        summarise(m.kv_docs, kv_len, key_tile,
                  &k_docs_[static_cast<std::size_t>(b * n_key_tiles_)]);
        m.kv_docs.visit([&](const auto* kv_docs) {
          if (!std::is_sorted(kv_docs, kv_docs + kv_len)) return;
          for (Index qt = 0; qt < n_q_tiles_; ++qt) {
            const DocRange& q = q_docs_[q_row + static_cast<std::size_t>(qt)];
            const Index doc_first = std::lower_bound(kv_docs, kv_docs + kv_len, q.min) - kv_docs;
            const Index doc_last = std::upper_bound(kv_docs, kv_docs + kv_len, q.max) - kv_docs;
            KeySpan& span = spans_[q_row + static_cast<std::size_t>(qt)];
            span = {std::max(span.first, doc_first), std::min(span.last, doc_last)};
          }
        });
      }
    }
    if (has_padding_) {
      allowed_keys_.assign(static_cast<std::size_t>(batch * n_key_tiles_), 0);
      for (Index b = 0; b < batch; ++b) {
        const unsigned char* allowed = key_mask_row(masks.key_padding_mask, b);
        for (Index j = 0; j < kv_len; ++j) {
          allowed_keys_[static_cast<std::size_t>(b * n_key_tiles_ + j / key_tile)] += allowed[j] != 0;
        }
      }
    }
  }

  Index q_tiles() const { return n_q_tiles_; }
  Index key_tiles() const { return n_key_tiles_; }
  Index q_tile_positions() const { return q_tile_positions_; }
  Index key_tile() const { return key_tile_; }

  // Key tiles [first, last) that the positional rules (causal, window) leave for qt, in
  // any batch row.
  std::pair<Index, Index> key_tile_range(Index qt) const { return tiles_of(positional_span(qt)); }

  // Key tiles [first, last) that query tile qt of batch row b may touch: the positional
  // range, narrowed to the tile's documents when the row's key ids are sorted. Every
  // tile in it intersects key_span(b, qt, kt).
  std::pair<Index, Index> key_tile_range(Index b, Index qt) const { return tiles_of(span(b, qt)); }

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
    const auto [p_first, p_last] = positions(qt);
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
    DocId min;
    DocId max;
  };

  std::pair<Index, Index> positions(Index qt) const {
    const Index p_first = qt * q_tile_positions_;
    return {p_first, std::min(q_len_, p_first + q_tile_positions_) - 1};
  }

  // Keys that the positional rules leave for some query of qt.
  KeySpan positional_span(Index qt) const {
    const auto [p_first, p_last] = positions(qt);
    KeySpan s{0, kv_len_};
    if (rules_.window > 0) {
      s.first = std::clamp<Index>(q_offset_ + p_first - rules_.window + 1, 0, kv_len_);
    }
    if (rules_.causal) s.last = std::clamp<Index>(q_offset_ + p_last + 1, 0, kv_len_);
    return s;
  }

  const KeySpan& span(Index b, Index qt) const {
    return spans_[static_cast<std::size_t>(b * n_q_tiles_ + qt)];
  }

  std::pair<Index, Index> tiles_of(const KeySpan& s) const {
    if (s.first >= s.last) return {0, 0};
    return {s.first / key_tile_, (s.last + key_tile_ - 1) / key_tile_};
  }

  static void summarise(const DocIdRow& row, Index len, Index tile, DocRange* out) {
    row.visit([&](const auto* ids) {
      for (Index first = 0, t = 0; first < len; first += tile, ++t) {
        const Index last = std::min(len, first + tile);
        const auto [lo, hi] = std::minmax_element(ids + first, ids + last);
        out[t] = DocRange{*lo, *hi};
      }
    });
  }

  MaskRules rules_;
  Index q_len_ = 0;
  Index kv_len_ = 0;
  Index q_offset_ = 0;
  Index q_tile_positions_ = 1;
  Index key_tile_ = 1;
  Index n_q_tiles_ = 0;
  Index n_key_tiles_ = 0;
  bool has_docs_ = false;
  bool has_padding_ = false;
  std::vector<DocRange> q_docs_;
  std::vector<DocRange> k_docs_;
  std::vector<Index> allowed_keys_;
  std::vector<KeySpan> spans_;  // per (b, qt): keys outside it are masked for every query
};

}  // namespace detail
}  // namespace attnforge
