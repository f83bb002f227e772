// KVCache: pre-allocated key/value storage for incremental decoding, optionally with the
// document id of every cached position (packed streams continued chunk by chunk).
#pragma once

#include <algorithm>
#include <stdexcept>

#include "attnforge/detail/huge_pages.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/qint8.hpp"
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
  // With record_doc_ids, every update also takes the document ids (B, new_len) of the new
  // positions, and doc_ids() returns those of the cached prefix: the keys' ids a packed
  // stream needs when it is continued through the cache (Attention::forward with doc_ids).
  KVCache(Index batch_size, Index max_seq_len, Index n_kv_heads, Index head_dim,
          bool record_doc_ids = false)
      : keys_(checked_dims(batch_size, max_seq_len, n_kv_heads, head_dim)),
        values_(keys_.dimensions()),
        head_dim_(head_dim),
        max_seq_len_(max_seq_len) {
    // Before the first touch, which decides the pages (see detail/huge_pages.hpp).
    detail::advise_huge_pages(keys_.data(), static_cast<std::size_t>(keys_.size()) * sizeof(T));
    detail::advise_huge_pages(values_.data(), static_cast<std::size_t>(values_.size()) * sizeof(T));
    keys_.setZero();
    values_.setZero();
    if (record_doc_ids) {
      doc_ids_ = Tensor<DocId, 2>(batch_size, max_seq_len);
      doc_ids_.setZero();
    }
  }

  Index batch_size() const { return keys_.dimension(0); }
  Index n_kv_heads() const { return keys_.dimension(1); }
  Index max_seq_len() const { return max_seq_len_; }
  Index head_dim() const { return head_dim_; }
  Index seq_len() const { return seq_len_; }
  bool records_doc_ids() const { return doc_ids_.size() > 0; }

  // Appends k_new, v_new (B, Hkv, new_len, D) at positions [seq_len, seq_len + new_len)
  // and returns the whole filled prefix. All checks run before the first write, so a
  // rejected update leaves the cache exactly as it was. A cache that records document
  // ids needs the overload below.
  KVPrefix<T> update(const ConstView<T, 4>& k_new, const ConstView<T, 4>& v_new) & {
    return update_from(k_new, v_new);
  }

  // As update(k_new, v_new), also recording doc_ids_new (B, new_len), the document id of
  // each new position. Only for a cache constructed with record_doc_ids.
  KVPrefix<T> update(const ConstView<T, 4>& k_new, const ConstView<T, 4>& v_new,
                     const DocIdView& doc_ids_new) & {
    return update_from(k_new, v_new, doc_ids_new);
  }

  // Mixed precision: a bf16/fp16 cache under float activations takes float keys and
  // values and rounds them as they are appended (half the memory and decode traffic); a
  // QInt8 cache quantizes them (see qint8.hpp: about a quarter of the memory).
  template <typename U = T, typename = std::enable_if_t<detail::is_reduced_storage_v<U>>>
  KVPrefix<T> update(const ConstView<float, 4>& k_new, const ConstView<float, 4>& v_new) & {
    return update_from(k_new, v_new);
  }
  template <typename U = T, typename = std::enable_if_t<detail::is_reduced_storage_v<U>>>
  KVPrefix<T> update(const ConstView<float, 4>& k_new, const ConstView<float, 4>& v_new,
                     const DocIdView& doc_ids_new) & {
    return update_from(k_new, v_new, doc_ids_new);
  }

  // The views below point into the cache's storage, so on a temporary cache they would
  // dangle: those calls do not compile (update() is &-qualified for the same reason).
  KVPrefix<T> prefix() const&& = delete;
  ConstView<DocId, 2> doc_ids() const&& = delete;
  const Tensor<T, 4>& key_storage() const&& = delete;
  const Tensor<T, 4>& value_storage() const&& = delete;
  const Tensor<DocId, 2>& doc_id_storage() const&& = delete;

  // The filled prefix without appending anything. (For QInt8, dimension 3 is head_dim
  // and each row's scales follow its values: stride(2) is the stored row width.)
  KVPrefix<T> prefix() const& { return {rows(keys_), rows(values_)}; }

  // The document ids (B, seq_len) of the cached positions, viewing the cache's storage;
  // absent (has_value() false) when the cache does not record them.
  ConstView<DocId, 2> doc_ids() const& {
    if (!records_doc_ids()) return {};
    return ConstView<DocId, 2>(doc_ids_).narrow(1, 0, seq_len_);
  }

  // Drops the positions from seq_len on, keeping [0, seq_len): e.g. the rejected tokens
  // of a speculative decoding step.
  void truncate(Index seq_len) {
    if (seq_len < 0 || seq_len > seq_len_) {
      detail::throw_invalid_argument("KVCache::truncate: seq_len ", seq_len, " is outside [0, ",
                                     seq_len_, "] (the cached length)");
    }
    seq_len_ = seq_len;
  }

  // Empties the cache for reuse; the storage is kept (and not cleared: positions past
  // seq_len, document ids included, are never read).
  void reset() { seq_len_ = 0; }

  // The whole pre-allocated storage (B, Hkv, max_seq_len, D); for QInt8 the last
  // dimension is the stored row (detail::qint8_row_bytes(D): values, then scales).
  const Tensor<T, 4>& key_storage() const& { return keys_; }
  const Tensor<T, 4>& value_storage() const& { return values_; }
  // (B, max_seq_len) with record_doc_ids; an empty tensor without.
  const Tensor<DocId, 2>& doc_id_storage() const& { return doc_ids_; }

 private:
  static constexpr const char* kUpdate = "KVCache::update";

  // Checks k_new and v_new and that they fit; returns new_len.
  template <typename S>
  Index check_update(const ConstView<S, 4>& k_new, const ConstView<S, 4>& v_new) const {
    const std::array<Index, 4> expected{batch_size(), n_kv_heads(), -1, head_dim()};
    detail::check_shape(kUpdate, "k_new", k_new, expected,
                        "(batch_size, n_kv_heads, new_len, head_dim)");
    detail::check_shape(kUpdate, "v_new", v_new, expected,
                        "(batch_size, n_kv_heads, new_len, head_dim)");
    const Index new_len = k_new.dimension(2);
    if (v_new.dimension(2) != new_len) {
      detail::throw_invalid_argument(
          kUpdate, ": k_new has shape ", detail::shape_string(k_new.dimensions()),
          " but v_new has shape ", detail::shape_string(v_new.dimensions()));
    }
    if (new_len > max_seq_len() - seq_len_) {
      std::ostringstream os;
      os << kUpdate << ": cache overflow: " << seq_len_ << " cached + " << new_len
         << " new positions exceed max_seq_len " << max_seq_len();
      throw std::length_error(os.str());
    }
    return new_len;
  }

  // Copies (converting, for float activations into a 16-bit cache: rounded to nearest
  // even) the new rows behind the cached ones.
  template <typename S>
  void append(const ConstView<S, 4>& k_new, const ConstView<S, 4>& v_new, Index new_len) {
    for (Index b = 0; b < batch_size(); ++b) {
      for (Index h = 0; h < n_kv_heads(); ++h) {
        for (Index s = 0; s < new_len; ++s) {
          detail::store_position<detail::QInt8Role::kKey>(k_new.row(b, h, s), head_dim(),
                                                          &keys_(b, h, 0, 0), seq_len_ + s);
          detail::store_position<detail::QInt8Role::kValue>(v_new.row(b, h, s), head_dim(),
                                                            &values_(b, h, 0, 0), seq_len_ + s);
        }
      }
    }
    seq_len_ += new_len;
  }

  // The appending half of the update overloads, whatever the input element type.
  template <typename S>
  KVPrefix<T> update_from(const ConstView<S, 4>& k_new, const ConstView<S, 4>& v_new) {
    static_assert(!detail::is_qint8_v<S>, "a QInt8 cache takes float keys and values");
    const Index new_len = check_update(k_new, v_new);
    if (records_doc_ids()) {
      detail::throw_invalid_argument(
          kUpdate, ": this cache records document ids; pass doc_ids_new (batch_size, new_len) = (",
          batch_size(), ", ", new_len, ") with k_new ", detail::shape_string(k_new.dimensions()));
    }
    append(k_new, v_new, new_len);
    return prefix();
  }

  template <typename S>
  KVPrefix<T> update_from(const ConstView<S, 4>& k_new, const ConstView<S, 4>& v_new,
                          const DocIdView& doc_ids_new) {
    static_assert(!detail::is_qint8_v<S>, "a QInt8 cache takes float keys and values");
    const Index new_len = check_update(k_new, v_new);
    if (!records_doc_ids()) {
      detail::throw_invalid_argument(
          kUpdate, ": doc_ids_new ", detail::shape_string(doc_ids_new.dimensions()),
          " given, but this cache does not record document ids (construct it with "
          "record_doc_ids = true)");
    }
    detail::check_shape(kUpdate, "doc_ids_new", doc_ids_new, {batch_size(), new_len},
                        "(batch_size, new_len)");
    for (Index b = 0; b < batch_size(); ++b) {
      doc_ids_new.visit(
          [&](const auto& ids) { std::copy_n(ids.row(b), new_len, &doc_ids_(b, seq_len_)); });
    }
    append(k_new, v_new, new_len);
    return prefix();
  }

  static std::array<Index, 4> checked_dims(Index batch_size, Index max_seq_len, Index n_kv_heads,
                                           Index head_dim) {
    if (batch_size <= 0 || max_seq_len <= 0 || n_kv_heads <= 0 || head_dim <= 0) {
      detail::throw_invalid_argument("KVCache: sizes must be positive, got batch_size ", batch_size,
                                     ", max_seq_len ", max_seq_len, ", n_kv_heads ", n_kv_heads,
                                     ", head_dim ", head_dim);
    }
    if constexpr (detail::is_qint8_v<T>) {
      detail::check_qint8_head_dim("KVCache", head_dim);
      // Whole tiles: the last one is read whole while it fills.
      return {batch_size, n_kv_heads, detail::qint8_whole_tiles(max_seq_len),
              detail::qint8_row_bytes(head_dim)};
    } else {
      return {batch_size, n_kv_heads, max_seq_len, head_dim};
    }
  }

  // The cached prefix of one of the storage tensors as a (B, Hkv, seq_len, head_dim) view.
  ConstView<T, 4> rows(const Tensor<T, 4>& storage) const {
    const Index width = storage.dimension(3), capacity = storage.dimension(2);
    return detail::cache_view<const T, 4>(
        storage.data(), {batch_size(), n_kv_heads(), seq_len_, head_dim_},
        {n_kv_heads() * capacity * width, capacity * width, width, 1});
  }

  Tensor<T, 4> keys_;
  Tensor<T, 4> values_;
  Index head_dim_;
  Index max_seq_len_;
  Tensor<DocId, 2> doc_ids_;  // (B, max_seq_len) with record_doc_ids, else empty
  Index seq_len_ = 0;
};

}  // namespace attnforge
