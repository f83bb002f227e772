// What may attend to what, as the caller states it: the per-token and per-element mask
// data of one call (Masks), and its validation. How the kernels read it is
// detail/mask_policy.hpp; docs/design.md states the semantics.
#pragma once

#include <cstdint>

#include "attnforge/tensor.hpp"

namespace attnforge {

// Document ids (B, S): int64 (a PyTorch LongTensor) or int32, read in place.
using DocIdView = EitherView<std::int64_t, std::int32_t, 2>;
// Key masks (B, S): bool or uint8_t (nonzero = may attend), read in place.
using KeyMaskView = EitherView<bool, std::uint8_t, 2>;
// Element masks (B|1, H|1, Sq, Skv): bool or uint8_t (nonzero = may attend).
using AttnMaskView = EitherView<bool, std::uint8_t, 4>;

// The mask data of one call; every field is optional (a default view is "absent"), and
// a key is allowed for a query only when every given field allows it (together with the
// options' causal and window rules).
struct Masks {
  // (B, Sq) document id of each query. Key j is allowed for query i only when
  // doc_ids[b, i] == kv_doc_ids[b, j].
  DocIdView doc_ids;
  // (B, Skv) document id of each key; when absent, doc_ids is used for the keys too,
  // which needs Sq == Skv (the no-cache case).
  DocIdView kv_doc_ids;
  // (B, Skv), true (nonzero) = the key may be attended to.
  KeyMaskView key_padding_mask;
  // (B|1, H|1, Sq, Skv), true (nonzero) = query i may attend to key j: PyTorch SDPA's
  // boolean attn_mask. A dimension of size 1 is broadcast.
  AttnMaskView attn_mask;
  // (B|1, H|1, Sq, Skv), added to the scores after scaling and softcap: PyTorch SDPA's
  // float attn_mask (ALiBi tables, relative-position biases). -inf excludes the key.
  ConstView<float, 4> attn_bias;
};

namespace detail {

// Positional rules shared by all batch rows.
struct MaskRules {
  bool causal = false;
  Index window = 0;  // 0: no window
};

// Checks an element-wise (B|1, H|1, Sq, Skv) mask or bias.
template <typename View>
void check_broadcastable(const char* where, const char* name, const View& view, Index batch,
                         Index n_heads, Index q_len, Index kv_len) {
  const auto dims = view.dimensions();
  const bool ok = (dims[0] == batch || dims[0] == 1) && (dims[1] == n_heads || dims[1] == 1) &&
                  dims[2] == q_len && dims[3] == kv_len;
  if (!ok) {
    throw_invalid_argument(where, ": ", name, " has shape ", shape_string(dims),
                           ", expected (B|1, H|1, Sq, Skv) with (B, H, Sq, Skv) = ",
                           shape_string(std::array<Index, 4>{batch, n_heads, q_len, kv_len}));
  }
  check_shape(where, name, view, {-1, -1, q_len, kv_len}, "(B|1, H|1, Sq, Skv)");
}

// Validates the mask inputs against (B, H, Sq, Skv).
inline void validate_masks(const char* where, const MaskRules& rules, const Masks& masks,
                           Index batch, Index n_heads, Index q_len, Index kv_len) {
  if (rules.window < 0) {
    throw_invalid_argument(where, ": window must be >= 0 (0 = no window), got ", rules.window);
  }
  if (rules.causal && q_len > kv_len) {
    throw_invalid_argument(where,
                           ": causal attention needs Sq <= Skv (bottom-right aligned), got Sq ",
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
  if (masks.attn_mask.has_value()) {
    masks.attn_mask.visit([&](const auto& view) {
      check_broadcastable(where, "attn_mask", view, batch, n_heads, q_len, kv_len);
    });
  }
  if (masks.attn_bias.has_value()) {
    check_broadcastable(where, "attn_bias", masks.attn_bias, batch, n_heads, q_len, kv_len);
  }
}

}  // namespace detail
}  // namespace attnforge
