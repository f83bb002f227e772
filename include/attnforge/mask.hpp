// What may attend to what: causal (bottom-right aligned), sliding window, document ids
// and key padding. No Sq x Skv mask is ever built; each rule is evaluated from O(S) data.
#pragma once

#include <algorithm>

#include "attnforge/tensor.hpp"

namespace attnforge {

// Per-token mask data; every field is optional (a default view is "absent").
struct Masks {
  // (B, Sq) document id of each query. Key j is allowed for query i only when
  // doc_ids[b, i] == kv_doc_ids[b, j].
  ConstView<DocId, 2> doc_ids;
  // (B, Skv) document id of each key; when absent, doc_ids is used for the keys too,
  // which needs Sq == Skv (the no-cache case).
  ConstView<DocId, 2> kv_doc_ids;
  // (B, Skv), true = the key may be attended to.
  ConstView<bool, 2> key_padding_mask;
};

namespace detail {

// The mask of one batch row: the positional rules (causal, window) plus the per-token
// data. Query i sits at absolute position pos(i) = Skv - Sq + i (bottom-right
// alignment), so a decode step or a chunk on top of a filled cache sees every earlier key.
struct BatchMask {
  bool causal = false;
  Index window = 0;  // 0: no window
  Index q_offset = 0;  // Skv - Sq
  Index kv_len = 0;
  const DocId* q_docs = nullptr;
  const DocId* kv_docs = nullptr;
  const bool* key_allowed = nullptr;

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
    if (q_docs != nullptr && q_docs[i] != kv_docs[j]) return false;
    if (key_allowed != nullptr && !key_allowed[j]) return false;
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
    m.q_docs = masks.doc_ids.row(b);
    m.kv_docs = masks.kv_doc_ids.has_value() ? masks.kv_doc_ids.row(b) : m.q_docs;
  }
  if (masks.key_padding_mask.has_value()) m.key_allowed = masks.key_padding_mask.row(b);
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

}  // namespace detail
}  // namespace attnforge
