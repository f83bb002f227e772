// QInt8: the int8 storage format of a quantized KV cache under float activations
// (KVCache<QInt8>, PagedKVCache<QInt8>): its rows and tiles, and the position reads and
// writes every path uses for a cache of any storage type. See docs/design.md, "Quantized
// caches".
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

constexpr Index qint8_groups(Index head_dim) { return (head_dim + kQInt8Group - 1) / kQInt8Group; }
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
    throw_invalid_argument(where, ": a QInt8 cache needs head_dim a multiple of 4, got ", head_dim);
  }
}

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

// dst[d] = q[d] * scale for the n values of one group: the float product, so every path
// (the double reference too) reads the same dequantized value.
template <typename D>
void dequantize_group(const std::int8_t* q, Index n, float scale, D* dst) {
  using Packet = simd::Packet<float>;
  constexpr int kP = simd::kWidth<float>;
  Index d = 0;
  if constexpr (std::is_same_v<D, float> && kP > 1) {
    const Packet scale_p = simd::splat<Packet>(scale);
    for (; d + kP <= n; d += kP)
      simd::store(dst + d, simd::mul(simd::widen_int8<Packet>(q + d), scale_p));
  }
  for (; d < n; ++d) dst[d] = static_cast<D>(static_cast<float>(q[d]) * scale);
}

// dst[d] = q[d] * scale of its group, for d < head_dim.
template <typename D>
void dequantize_row(const QInt8* row, Index head_dim, D* dst) {
  // The bytes of QInt8 objects, read by the vector loads (which may alias anything).
  const auto* values = reinterpret_cast<const std::int8_t*>(row);
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    dequantize_group(values + g0, std::min(kQInt8Group, head_dim - g0),
                     qint8_scale(row, head_dim, g), dst + g0);
  }
}

// A QInt8 cache stores each KV head's positions in tiles of kQInt8Tile: the 16 quantized
// rows of positions 16 i ... 16 i + 15 rearranged, in the same bytes (16 rows' worth,
// where row 16 i would start), into the layouts the int8 decode kernels read
// (int8_dot.hpp), so no step rearranges them again. Keys and values differ:
//   keys:   byte 64 t + 4 s + i = value 4 t + i of position s, plus 128 (unsigned, as
//           vpdpbusd takes it): a lane of 4 bytes per position, 16 lanes per 4 values;
//   values: byte 4 head_dim q + 4 d + k = value d of position 4 q + k: per quad of
//           positions, a lane of their 4 bytes per value d, in d's order;
// then, for both, the float scale of group g of position s at float 16 g + s after the
// 16 head_dim value bytes. Slots past a cache's length hold what was last written there.
// See docs/design.md, "Quantized caches".
enum class QInt8Role { kKey, kValue };

// Bytes of one tile.
constexpr Index qint8_tile_bytes(Index head_dim) { return kQInt8Tile * qint8_row_bytes(head_dim); }

// Positions rounded up to whole tiles: what a cache holds room for.
constexpr Index qint8_whole_tiles(Index positions) {
  return (positions + kQInt8Tile - 1) / kQInt8Tile * kQInt8Tile;
}

// Offset in a tile of the scale of group g of position `slot` (g = 0, slot = 0: where the
// scales start, the 16 head_dim value bytes in).
constexpr Index qint8_tile_scale_at(Index head_dim, Index slot, Index g) {
  return kQInt8Tile * head_dim + (g * kQInt8Tile + slot) * Index{sizeof(float)};
}

// Offset in a tile of value d of position `slot`.
template <QInt8Role kRole>
constexpr Index qint8_tile_value_at(Index head_dim, Index slot, Index d) {
  if constexpr (kRole == QInt8Role::kKey) {
    return (d / 4) * (4 * kQInt8Tile) + 4 * slot + d % 4;
  } else {
    return (slot / 4) * (4 * head_dim) + 4 * d + slot % 4;
  }
}

// Scale of group g of position `slot` of a tile.
inline float qint8_tile_scale(const QInt8* tile, Index head_dim, Index slot, Index g) {
  float scale;
  std::memcpy(&scale, tile + qint8_tile_scale_at(head_dim, slot, g), sizeof(float));
  return scale;
}

// The keys' offset of 128, as an xor of the sign bit (int8 q + 128 = uint8 q ^ 0x80).
template <QInt8Role kRole>
constexpr std::uint8_t qint8_tile_bias() {
  return kRole == QInt8Role::kKey ? 0x80 : 0x00;
}

// Quantizes src[0, head_dim) (as quantize_row, a group at a time) into position `slot` of
// a tile.
template <QInt8Role kRole, typename S>
void store_tile_slot(const S* src, Index head_dim, QInt8* tile, Index slot) {
  QInt8 group[qint8_row_bytes(kQInt8Group)];  // one group's values, then its scale
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    const Index n = std::min(kQInt8Group, head_dim - g0);  // a multiple of 4
    quantize_row(src + g0, n, group);
    for (Index d = 0; d < n; ++d) {
      const auto byte = static_cast<std::uint8_t>(group[d]) ^ qint8_tile_bias<kRole>();
      tile[qint8_tile_value_at<kRole>(head_dim, slot, g0 + d)] = static_cast<QInt8>(byte);
    }
    const float scale = qint8_scale(group, n, 0);
    std::memcpy(tile + qint8_tile_scale_at(head_dim, slot, g), &scale, sizeof(float));
  }
}

// dst[d] = value d of position `slot` of a tile, dequantized as dequantize_row does: the
// slot's bytes gathered into d's order a group at a time, then dequantize_group.
template <QInt8Role kRole, typename D>
void load_tile_slot(const QInt8* tile, Index head_dim, Index slot, D* dst) {
  std::int8_t q[kQInt8Group];
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    const Index n = std::min(kQInt8Group, head_dim - g0);  // a multiple of 4
    if constexpr (kRole == QInt8Role::kKey) {
      for (Index d = 0; d < n; d += 4) {  // 4 values of the slot lie side by side
        std::uint32_t word;
        std::memcpy(&word, tile + qint8_tile_value_at<kRole>(head_dim, slot, g0 + d), sizeof word);
        word ^= 0x01010101u * qint8_tile_bias<kRole>();  // the bias in each byte
        std::memcpy(q + d, &word, sizeof word);
      }
    } else {
      for (Index d = 0; d < n; ++d) {
        q[d] = static_cast<std::int8_t>(tile[qint8_tile_value_at<kRole>(head_dim, slot, g0 + d)]);
      }
    }
    dequantize_group(q, n, qint8_tile_scale(tile, head_dim, slot, g), dst + g0);
  }
}

// Positions 4 quad ... 4 quad + 3 of a tile as 4 rows of dst (row stride ld), dequantized
// as load_tile_slot does, a group of each at a time: in a key tile the quad's 4-byte words
// of each 4 values lie side by side, in a value tile its values interleaved a byte each.
template <QInt8Role kRole, typename D>
void load_tile_quad(const QInt8* tile, Index head_dim, Index quad, D* dst, Index ld) {
  std::int8_t q[4][kQInt8Group];
  std::int8_t* const rows[4] = {q[0], q[1], q[2], q[3]};
  // The bytes of QInt8 objects, read by the vector loads (which may alias anything).
  const auto* bytes = reinterpret_cast<const std::int8_t*>(tile);
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    const Index n = std::min(kQInt8Group, head_dim - g0);  // a multiple of 4
    const Index first = qint8_tile_value_at<kRole>(head_dim, 4 * quad, g0);
    if constexpr (kRole == QInt8Role::kKey) {
      simd::gather_word_columns(bytes + first, 4 * kQInt8Tile, n / 4, qint8_tile_bias<kRole>(),
                                rows);
    } else {
      simd::deinterleave_4_bytes(bytes + first, n, rows);
    }
    for (Index k = 0; k < 4; ++k) {
      dequantize_group(q[k], n, qint8_tile_scale(tile, head_dim, 4 * quad + k, g),
                       dst + k * ld + g0);
    }
  }
}

// Reads position j of (batch row b, KV head `head`) of a view of a cache's rows (a
// (B, Hkv, S, head_dim) view or a paged sequence) as D. A QInt8 view holds tiles from its
// position 0 on, as every cache's view does (a tile's 16 rows are contiguous there).
template <QInt8Role kRole, typename Rows, typename D>
void load_position(const Rows& view, Index b, Index head, Index j, D* dst) {
  const Index head_dim = view.dimension(3);
  if constexpr (is_qint8_v<typename Rows::Scalar>) {
    load_tile_slot<kRole>(view.row(b, head, j - j % kQInt8Tile), head_dim, j % kQInt8Tile, dst);
  } else {
    convert(view.row(b, head, j), dst, head_dim);
  }
}

// Positions [first, first + n) of (b, head) as rows of dst (row stride head_dim), as
// load_position reads them; a QInt8 tile's whole quads of positions at once.
template <QInt8Role kRole, typename Rows, typename D>
void load_positions(const Rows& view, Index b, Index head, Index first, Index n, D* dst) {
  const Index head_dim = view.dimension(3);
  for (Index j = first; j < first + n;) {
    D* row = dst + (j - first) * head_dim;
    if constexpr (is_qint8_v<typename Rows::Scalar>) {
      if (j % 4 == 0 && j + 4 <= first + n) {
        const Index slot = j % kQInt8Tile;
        load_tile_quad<kRole>(view.row(b, head, j - slot), head_dim, slot / 4, row, head_dim);
        j += 4;
        continue;
      }
    }
    load_position<kRole>(view, b, head, j, row);
    ++j;
  }
}

// Writes head_dim values as position j of a run of rows stored from `first` on (row j at
// first + j * stored_row_width<D>(head_dim); for QInt8 the run starts at a tile): rounded
// into bf16/fp16, quantized into QInt8's tile, copied otherwise.
template <QInt8Role kRole, typename S, typename D>
void store_position(const S* src, Index head_dim, D* first, Index j) {
  if constexpr (is_qint8_v<D>) {
    store_tile_slot<kRole>(src, head_dim, first + (j - j % kQInt8Tile) * qint8_row_bytes(head_dim),
                           j % kQInt8Tile);
  } else {
    convert(src, first + j * head_dim, head_dim);
  }
}

}  // namespace detail
}  // namespace attnforge
