// QInt8: the int8 storage format of a quantized KV cache under float activations
// (KVCache<QInt8>, PagedKVCache<QInt8>), and the row conversions every path uses to
// read and write cache rows of any storage type. See docs/design.md, "Quantized caches".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attnforge/detail/simd.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge {

// One element of a quantized row. A row of head_dim values is stored as head_dim int8
// values q, padded to a multiple of 4 bytes, then one float scale s per group of
// kQInt8Group consecutive values: value = q * s, with s = max |x| / 127 over the group
// (symmetric, round to nearest). Groups rather than one scale per row, because keys
// carry a few channels of much larger magnitude than the rest (after RoPE too): one
// scale per row would spend the 8 bits on those and leave the others a handful of
// levels. A distinct type, so a quantized row is never read as plain int8.
enum class QInt8 : std::int8_t {};

namespace detail {

inline constexpr Index kQInt8Group = 32;

constexpr Index qint8_groups(Index head_dim) {
  return (head_dim + kQInt8Group - 1) / kQInt8Group;
}
// Byte offset of a row's scales: after its values, rounded up so they are 4-aligned.
constexpr Index qint8_scale_offset(Index head_dim) { return (head_dim + 3) / 4 * 4; }
// Bytes of one stored row: values, padding, scales.
constexpr Index qint8_row_bytes(Index head_dim) {
  return qint8_scale_offset(head_dim) + static_cast<Index>(sizeof(float)) * qint8_groups(head_dim);
}

// A QInt8 cache's head_dim is a multiple of 4, so its rows have no padding, and a view
// narrowed in the head dimension can never pass for stored rows (a narrowed head_dim
// that is also a multiple of 4 has a shorter stored row than the stride it keeps).
inline void check_qint8_head_dim(const char* where, Index head_dim) {
  if (head_dim % 4 != 0) {
    throw_invalid_argument(where, ": a QInt8 cache needs head_dim a multiple of 4, got ",
                           head_dim);
  }
}

template <typename T>
inline constexpr bool is_qint8_v = std::is_same_v<std::remove_const_t<T>, QInt8>;

// Storage types that take float activations and compute in float: bf16 and fp16
// (rounded) and QInt8 (quantized).
template <typename T>
inline constexpr bool is_reduced_storage_v = is_16bit_float_v<T> || is_qint8_v<T>;

// Elements of storage type T per row of head_dim values.
template <typename T>
constexpr Index stored_row_width(Index head_dim) {
  if constexpr (is_qint8_v<T>) {
    return qint8_row_bytes(head_dim);
  } else {
    return head_dim;
  }
}

// Scale g of a quantized row (memcpy: the bytes are QInt8 objects).
inline float qint8_scale(const QInt8* row, Index head_dim, Index g) {
  float scale;
  std::memcpy(&scale, row + qint8_scale_offset(head_dim) + g * Index{sizeof(float)}, sizeof(float));
  return scale;
}

// Quantizes src[0, head_dim) into one stored row at dst. Non-finite inputs give a
// non-finite scale (NaN or inf on read, as a float cache would hold), never an
// out-of-range conversion.
template <typename S>
void quantize_row(const S* src, Index head_dim, QInt8* dst) {
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    const Index end = std::min(head_dim, g0 + kQInt8Group);
    float max_abs = 0.0f;
    bool finite = true;
    for (Index d = g0; d < end; ++d) {
      const float x = std::abs(static_cast<float>(src[d]));
      finite &= x <= std::numeric_limits<float>::max();  // false for inf and NaN
      max_abs = std::max(max_abs, x);
    }
    if (!finite) max_abs = std::numeric_limits<float>::quiet_NaN();
    const float scale = max_abs / 127.0f;
    for (Index d = g0; d < end; ++d) {
      // x / max_abs lies in [-1, 1]; x * (127 / max_abs) would not: for a group whose
      // max_abs is below 127 / FLT_MAX (~3.7e-37), 127 / max_abs is inf, and every value
      // became +-127 (a zero NaN, then -127). A NaN max_abs gives 0 (the scale is NaN).
      const float ratio = max_abs > 0.0f ? static_cast<float>(src[d]) / max_abs : 0.0f;
      // Clamped before the conversion; std::max returns its first argument for a NaN.
      const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(ratio * 127.0f)));
      dst[d] = static_cast<QInt8>(static_cast<std::int8_t>(q));
    }
    std::memcpy(dst + qint8_scale_offset(head_dim) + g * Index{sizeof(float)}, &scale,
                sizeof(float));
  }
  // The padding between values and scales is written too, so a row's bytes are defined.
  for (Index d = head_dim; d < qint8_scale_offset(head_dim); ++d) dst[d] = QInt8{0};
}

// dst[d] = q[d] * scale of its group, for d < head_dim: the float product, so every path
// (the double reference too) reads the same dequantized value.
template <typename D>
void dequantize_row(const QInt8* row, Index head_dim, D* dst) {
  using Packet = simd::Packet<float>;
  constexpr int kP = simd::kWidth<float>;
  // The bytes of QInt8 objects, read by the vector loads (which may alias anything).
  const auto* values = reinterpret_cast<const std::int8_t*>(row);
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    const Index end = std::min(head_dim, g0 + kQInt8Group);
    const float scale = qint8_scale(row, head_dim, g);
    Index d = g0;
    if constexpr (std::is_same_v<D, float> && kP > 1) {
      const Packet scale_p = simd::splat<Packet>(scale);
      for (; d + kP <= end; d += kP)
        simd::store(dst + d, simd::mul(simd::widen_int8<Packet>(values + d), scale_p));
    }
    for (; d < end; ++d)
      dst[d] = static_cast<D>(static_cast<float>(static_cast<std::int8_t>(row[d])) * scale);
  }
}

// Reads one stored row of head_dim values as D: the conversion of bf16/fp16 (exact), the
// dequantization of QInt8, a copy otherwise.
template <typename S, typename D>
void load_row(const S* row, Index head_dim, D* dst) {
  if constexpr (is_qint8_v<S>) {
    dequantize_row(row, head_dim, dst);
  } else {
    convert(row, dst, head_dim);
  }
}

// Writes head_dim values into one stored row: rounded into bf16/fp16, quantized into
// QInt8, copied otherwise.
template <typename S, typename D>
void store_row(const S* src, Index head_dim, D* row) {
  if constexpr (is_qint8_v<D>) {
    quantize_row(src, head_dim, row);
  } else {
    convert(src, row, head_dim);
  }
}

}  // namespace detail
}  // namespace attnforge
