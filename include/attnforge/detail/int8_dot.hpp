// The decode micro-kernels over a QInt8 cache on AVX-512 VNNI: key scores as int8 dot
// products (vpdpbusd, 64 products per instruction) against a quantized query, and the
// value pass widening int8 straight into the FMAs, with no dequantized copy of a block.
//
// Scores: each query row is quantized per step like a cache row (kQInt8Group values per
// scale), so q . k = sum over groups of (q scale * k scale) * (integer dot of the group).
// vpdpbusd multiplies unsigned by signed bytes; the keys are made unsigned by adding 128
// (an xor of the sign bit), and the 128 * sum(q) this adds is subtracted by starting each
// accumulator at the query's correction. A group of 32 values is 8 int32 lanes, so one
// 64-byte load covers two groups, whose scales are applied per lane before the 16 lanes
// of every key are summed by one transpose-add tree per 16 keys.
//
// Like bf16_dot.hpp, these functions carry their own target attribute, so the library
// keeps compiling for any target; they are only called after `cpu_has_avx512_vnni()`.
#pragma once

#include <cstdint>
#include <cstring>

#include "attnforge/qint8.hpp"
#include "attnforge/tensor.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(ATTNFORGE_NO_INT8_DOT)
#include <immintrin.h>
#define ATTNFORGE_INT8_DOT 1
#define ATTNFORGE_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#else
#define ATTNFORGE_INT8_DOT 0
#endif

namespace attnforge::detail {

inline constexpr bool kHasInt8DotKernel = ATTNFORGE_INT8_DOT != 0;

// Keys per call of the score kernel: one score per lane of a 512-bit float vector.
inline constexpr Index kInt8DotKeys = 16;
// Bytes of head_dim one vpdpbusd covers: two scale groups.
inline constexpr Index kInt8DotChunk = 64;
static_assert(kInt8DotChunk == 2 * kQInt8Group, "a 64-byte chunk holds two scale groups");

// Whether this CPU (and OS) runs AVX-512 VNNI; asked once.
inline bool cpu_has_avx512_vnni() {
#if ATTNFORGE_INT8_DOT
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
#else
  return false;
#endif
}

// A query row quantized for the score kernel: its bytes in the QInt8 row layout, the
// per-lane start of its accumulators, and its group scales spread over the lanes of each
// 64-byte chunk.
struct Int8QueryRow {
  const QInt8* row;              // qint8_row_bytes(head_dim) bytes
  const std::int32_t* start;     // head_dim / 4 lanes: -128 * (sum of the lane's 4 bytes)
  const float* scale_lanes;      // head_dim / 4 lanes: the scale of the lane's group
};

// Quantizes one (pre-scaled) query row into `row`, `start` and `scale_lanes` (sized as
// Int8QueryRow says). head_dim is a multiple of kInt8DotChunk.
inline void quantize_query_row(const float* q, Index head_dim, QInt8* row, std::int32_t* start,
                               float* scale_lanes) {
  quantize_row(q, head_dim, row);
  for (Index lane = 0; lane < head_dim / 4; ++lane) {
    std::int32_t sum = 0;
    for (Index e = 4 * lane; e < 4 * lane + 4; ++e) sum += static_cast<std::int8_t>(row[e]);
    start[lane] = -128 * sum;
    scale_lanes[lane] = qint8_scale(row, head_dim, 4 * lane / kQInt8Group);
  }
}

#if ATTNFORGE_INT8_DOT

// The 16 lane sums of v[0..15] as one vector (lane j = sum of v[j]): pairs, then quads
// within each 128-bit block, then across blocks. 15 shuffle-pair-and-add steps.
ATTNFORGE_TARGET_VNNI inline __m512 sum_lanes_of_16(__m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k) {
    w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                         _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  }
  for (int m = 0; m < 4; ++m) {
    x[m] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * m], w[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // x[m]: lane p of 128-bit block b holds key 4m + p summed over block b.
  for (int n = 0; n < 2; ++n) {
    y[n] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * n], x[2 * n + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x[2 * n], x[2 * n + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Keys made unsigned and their scales spread over lanes, once per block for every row:
// `keys` (kInt8DotKeys x head_dim bytes) and `scales` (kInt8DotKeys x head_dim / 4).
ATTNFORGE_TARGET_VNNI inline void prepare_int8_keys(const QInt8* const* rows, Index head_dim,
                                                    std::uint8_t* keys, float* scales) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const Index lanes = head_dim / 4;
  for (Index j = 0; j < kInt8DotKeys; ++j) {
    const QInt8* row = rows[j];
    for (Index c = 0; c < head_dim; c += kInt8DotChunk) {
      const __m512i k = _mm512_loadu_si512(row + c);
      _mm512_storeu_si512(keys + j * head_dim + c, _mm512_xor_si512(k, sign));
      const Index g = c / kQInt8Group;
      const __m512 low = _mm512_set1_ps(qint8_scale(row, head_dim, g));
      const __m512 high = _mm512_set1_ps(qint8_scale(row, head_dim, g + 1));
      _mm512_storeu_ps(scales + j * lanes + c / 4, _mm512_mask_blend_ps(0xFF00, low, high));
    }
  }
}

// out[0, 16) = q . k_j for the 16 prepared keys (log2 units when q was scaled so).
ATTNFORGE_TARGET_VNNI inline void int8_row_scores(const Int8QueryRow& q, const std::uint8_t* keys,
                                                  const float* key_scales, Index head_dim,
                                                  float* out) {
  const Index lanes = head_dim / 4;
  __m512 acc[16];
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  const auto* q_bytes = reinterpret_cast<const std::int8_t*>(q.row);
  for (Index c = 0; c < head_dim; c += kInt8DotChunk) {
    const __m512i qv = _mm512_loadu_si512(q_bytes + c);
    const __m512i start = _mm512_loadu_si512(q.start + c / 4);
    const __m512 q_scale = _mm512_loadu_ps(q.scale_lanes + c / 4);
    for (int j = 0; j < 16; ++j) {
      const __m512i dot =
          _mm512_dpbusd_epi32(start, _mm512_loadu_si512(keys + j * head_dim + c), qv);
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), q_scale);
      acc[j] = _mm512_fmadd_ps(scaled, _mm512_loadu_ps(key_scales + j * lanes + c / 4), acc[j]);
    }
  }
  _mm512_storeu_ps(out, sum_lanes_of_16(acc));
}

// out[r][:] += sum_j weights[r][g][j] * v_j[:] over the n_keys value rows of a block for R
// rows (row stride ldo), where g is the scale group of the element: the weights are
// already multiplied by each key's group scales, so the int8 values widen straight into
// the FMAs. `weights` holds, per row, head_dim / kQInt8Group groups of 16 keys.
template <int R>
ATTNFORGE_TARGET_VNNI inline void int8_accumulate_values(const float* weights, const QInt8* const* rows,
                                                         Index n_keys, Index head_dim, float* out,
                                                         Index ldo) {
  const Index groups = head_dim / kQInt8Group;
  for (Index d = 0; d < head_dim; d += kInt8DotChunk) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(out + r * ldo + d + 16 * c);
    }
    const Index g = d / kQInt8Group;
    for (Index j = 0; j < n_keys; ++j) {
      const auto* bytes = reinterpret_cast<const std::int8_t*>(rows[j]) + d;
      __m512 v[4];
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * c))));
      }
      for (int r = 0; r < R; ++r) {
        const float* w = weights + r * groups * 16;
        const __m512 low = _mm512_set1_ps(w[g * 16 + j]);
        const __m512 high = _mm512_set1_ps(w[(g + 1) * 16 + j]);
        acc[r][0] = _mm512_fmadd_ps(low, v[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(low, v[1], acc[r][1]);
        acc[r][2] = _mm512_fmadd_ps(high, v[2], acc[r][2]);
        acc[r][3] = _mm512_fmadd_ps(high, v[3], acc[r][3]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * ldo + d + 16 * c, acc[r][c]);
    }
  }
}

#endif  // ATTNFORGE_INT8_DOT

}  // namespace attnforge::detail
