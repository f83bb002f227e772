// KVCache: pre-allocated key/value storage for incremental decoding.
#pragma once

#include <algorithm>
#include <stdexcept>

#include "attnforge/tensor.hpp"

namespace attnforge {

// The filled prefix of a cache: keys and values (B, Hkv, seq_len, D), viewing the
// cache's own storage (no copy). Valid until the cache is destroyed; later updates
// append behind it without moving it.
template <typename T>
struct KVPrefix {
  ConstView<T, 4> keys;
  ConstView<T, 4> values;
};

template <typename T>
class KVCache {
 public:
  KVCache(Index batch_size, Index max_seq_len, Index n_kv_heads, Index head_dim)
      : keys_(checked_dims(batch_size, max_seq_len, n_kv_heads, head_dim)),
        values_(keys_.dimensions()) {
    keys_.setZero();
    values_.setZero();
  }

  Index batch_size() const { return keys_.dimension(0); }
  Index n_kv_heads() const { return keys_.dimension(1); }
  Index max_seq_len() const { return keys_.dimension(2); }
  Index head_dim() const { return keys_.dimension(3); }
  Index seq_len() const { return seq_len_; }

  // Appends k_new, v_new (B, Hkv, new_len, D) at positions [seq_len, seq_len + new_len)
  // and returns the whole filled prefix. All checks run before the first write, so a
  // rejected update leaves the cache exactly as it was.
  KVPrefix<T> update(const ConstView<T, 4>& k_new, const ConstView<T, 4>& v_new) {
    constexpr const char* kWhere = "KVCache::update";
    const std::array<Index, 4> expected{batch_size(), n_kv_heads(), -1, head_dim()};
    detail::check_shape(kWhere, "k_new", k_new, expected, "(batch_size, n_kv_heads, new_len, head_dim)");
    detail::check_shape(kWhere, "v_new", v_new, expected, "(batch_size, n_kv_heads, new_len, head_dim)");
    const Index new_len = k_new.dimension(2);
    if (v_new.dimension(2) != new_len) {
      detail::throw_invalid_argument(kWhere, ": k_new has shape ",
                                     detail::shape_string(k_new.dimensions()), " but v_new has shape ",
                                     detail::shape_string(v_new.dimensions()));
    }
    if (new_len > max_seq_len() - seq_len_) {
      std::ostringstream os;
      os << kWhere << ": cache overflow: " << seq_len_ << " cached + " << new_len
         << " new positions exceed max_seq_len " << max_seq_len();
      throw std::length_error(os.str());
    }
    for (Index b = 0; b < batch_size(); ++b) {
      for (Index h = 0; h < n_kv_heads(); ++h) {
        for (Index s = 0; s < new_len; ++s) {
          std::copy_n(k_new.row(b, h, s), head_dim(), &keys_(b, h, seq_len_ + s, 0));
          std::copy_n(v_new.row(b, h, s), head_dim(), &values_(b, h, seq_len_ + s, 0));
        }
      }
    }
    seq_len_ += new_len;
    return prefix();
  }

  // The filled prefix without appending anything.
  KVPrefix<T> prefix() const {
    return {ConstView<T, 4>(keys_).narrow(2, 0, seq_len_),
            ConstView<T, 4>(values_).narrow(2, 0, seq_len_)};
  }

  // Drops the positions from seq_len on, keeping [0, seq_len): e.g. the rejected tokens
  // of a speculative decoding step.
  void truncate(Index seq_len) {
    if (seq_len < 0 || seq_len > seq_len_) {
      detail::throw_invalid_argument("KVCache::truncate: seq_len ", seq_len,
                                     " is outside [0, ", seq_len_, "] (the cached length)");
    }
    seq_len_ = seq_len;
  }

  // Empties the cache for reuse; the storage is kept (and not cleared: positions past
  // seq_len are never read).
  void reset() { seq_len_ = 0; }

  // The whole pre-allocated storage (B, Hkv, max_seq_len, D).
  const Tensor<T, 4>& key_storage() const { return keys_; }
  const Tensor<T, 4>& value_storage() const { return values_; }

 private:
  static std::array<Index, 4> checked_dims(Index batch_size, Index max_seq_len, Index n_kv_heads,
                                           Index head_dim) {
    if (batch_size <= 0 || max_seq_len <= 0 || n_kv_heads <= 0 || head_dim <= 0) {
      detail::throw_invalid_argument("KVCache: sizes must be positive, got batch_size ", batch_size,
                                     ", max_seq_len ", max_seq_len, ", n_kv_heads ", n_kv_heads,
                                     ", head_dim ", head_dim);
    }
    return {batch_size, n_kv_heads, max_seq_len, head_dim};
  }

  Tensor<T, 4> keys_;
  Tensor<T, 4> values_;
  Index seq_len_ = 0;
};

}  // namespace attnforge
