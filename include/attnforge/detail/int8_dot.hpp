// The decode micro-kernels over a QInt8 cache on AVX-512 VNNI: key scores as int8 dot
// products (vpdpbusd, 64 products per instruction) against a quantized query, and the
// value pass widening int8 straight into the FMAs, with no dequantized copy of a block.
//
// Scores: each query row is quantized per step like a cache row (kQInt8Group values per
// scale), so q . k = sum over groups of (q scale * k scale) * (integer dot of the group).
// A block of 16 keys is transposed once into the dot products' layout (lane j = key j,
// 4 consecutive bytes per lane), so one vpdpbusd adds 4 products to each of 16 keys'
// sums against 4 broadcast query bytes, and a group's 8 of them leave 16 finished integer
// dot products: no horizontal sums. vpdpbusd multiplies unsigned by signed bytes; the
// keys are made unsigned by adding 128 (an xor of the sign bit), and the 128 * sum(q)
// this adds is subtracted by starting each group's accumulators at that correction.
//
// Like bf16_dot.hpp, these functions carry their own target attribute, so the library
// keeps compiling for any target; they are only called after `cpu_has_avx512_vnni()`
// (cpu_features.hpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "attnforge/detail/simd.hpp"
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

// A query row quantized for the score kernel: its bytes in the QInt8 row layout, and per
// scale group the start of its accumulators and its scale.
struct Int8QueryRow {
  const QInt8* row;           // qint8_row_bytes(head_dim) bytes
  const std::int32_t* start;  // head_dim / kQInt8Group: -128 * (sum of the group's bytes)
};

// Quantizes one (pre-scaled) query row into `row` and `start` (sized as Int8QueryRow says).
inline void quantize_query_row(const float* q, Index head_dim, QInt8* row, std::int32_t* start) {
  quantize_row(q, head_dim, row);
  for (Index g = 0; g < head_dim / kQInt8Group; ++g) {
    std::int32_t sum = 0;
    for (Index d = g * kQInt8Group; d < (g + 1) * kQInt8Group; ++d)
      sum += static_cast<std::int8_t>(row[d]);
    start[g] = -128 * sum;
  }
}

#if ATTNFORGE_INT8_DOT

// GCC 12 reports the deliberately self-initialised placeholder inside its own AVX-512
// intrinsics (_mm512_undefined_*) as uninitialised once they are inlined into a function
// with a target attribute in a translation unit built without AVX-512. The report is
// false and lands on the consumer, so it is silenced for these kernels only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Transposes 16 rows of 16 int32 in place: v[i] lane j becomes v[j] lane i.
ATTNFORGE_TARGET_VNNI inline void transpose_16x16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit block of v[i] now holds 4 consecutive columns of 4 rows: rows 4 (i / 4)
  // ... + 3 within the block, columns 4 * block + {0 1 2 3} in the order i % 4 picks.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(v[i], v[i + 4], _MM_SHUFFLE(2, 0, 2, 0));
    t[i + 4] = _mm512_shuffle_i32x4(v[i], v[i + 4], _MM_SHUFFLE(3, 1, 3, 1));
    t[i + 8] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], _MM_SHUFFLE(2, 0, 2, 0));
    t[i + 12] = _mm512_shuffle_i32x4(v[i + 8], v[i + 12], _MM_SHUFFLE(3, 1, 3, 1));
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], _MM_SHUFFLE(2, 0, 2, 0));
    v[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], _MM_SHUFFLE(3, 1, 3, 1));
    v[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], _MM_SHUFFLE(2, 0, 2, 0));
    v[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// The block's 16 keys in the dot products' layout, once for every row: `keys` holds, for
// each 4-byte column t of head_dim, the 16 keys' bytes [4t, 4t + 4) made unsigned (lane j =
// key j), and `scales` the keys' scales per group (16 per group).
ATTNFORGE_TARGET_VNNI inline void prepare_int8_keys(const QInt8* const* rows, Index head_dim,
                                                    std::uint8_t* keys, float* scales,
                                                    simd::LineStream& ahead) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  simd::LineStream stream = ahead;  // a local, so its state stays in registers (simd.hpp)
  for (Index c = 0; c < head_dim; c += kInt8DotChunk) {
    __m512i v[16];
    for (int j = 0; j < 16; ++j) {
      stream.step();
      v[j] = _mm512_xor_si512(_mm512_loadu_si512(rows[j] + c), sign);
    }
    transpose_16x16(v);
    for (int t = 0; t < 16; ++t) _mm512_storeu_si512(keys + (c + 4 * t) * 16, v[t]);
  }
  ahead = stream;
  for (Index g = 0; g < head_dim / kQInt8Group; ++g) {
    for (int j = 0; j < 16; ++j) scales[g * 16 + j] = qint8_scale(rows[j], head_dim, g);
  }
}

// out[r][0, 16) = q_r . k_j for the 16 prepared keys (log2 units when q was scaled so),
// for R query rows at once: each key load serves every row, and the R dependency chains
// interleave. R is fixed so the accumulators stay in registers.
template <int R>
ATTNFORGE_TARGET_VNNI inline void int8_row_scores(const Int8QueryRow* q, const std::uint8_t* keys,
                                                  const float* key_scales, Index head_dim,
                                                  float* out, Index ldo) {
  __m512 score[R];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) score[r] = _mm512_setzero_ps();
  for (Index g = 0; g < head_dim / kQInt8Group; ++g) {
    __m512i acc[R];
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) acc[r] = _mm512_set1_epi32(q[r].start[g]);
    const Index t0 = g * kQInt8Group / 4;
    ATTNFORGE_UNROLL
    for (Index t = t0; t < t0 + kQInt8Group / 4; ++t) {
      const __m512i k = _mm512_loadu_si512(keys + t * 64);
      ATTNFORGE_UNROLL
      for (int r = 0; r < R; ++r) {
        std::int32_t bytes;
        std::memcpy(&bytes, q[r].row + 4 * t, sizeof(bytes));
        acc[r] = _mm512_dpbusd_epi32(acc[r], k, _mm512_set1_epi32(bytes));
      }
    }
    const __m512 k_scale = _mm512_loadu_ps(key_scales + g * 16);
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 q_scale = _mm512_set1_ps(qint8_scale(q[r].row, head_dim, g));
      score[r] =
          _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[r]), q_scale), k_scale, score[r]);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, score[r]);
}

// out[r][:] += sum_j weights[g][r][j] * v_j[:] over the n_keys value rows of a block for R
// rows (row stride ldo), where g is the scale group of the element: the weights are
// already multiplied by each key's group scales, so the int8 values widen straight into
// the FMAs. `weights` holds, per scale group (stride ldg), 16 keys of each row: the R
// rows' weights of a key then lie at fixed offsets from one pointer per group, which the
// loop keeps in registers (with a pointer per row it ran out of them).
template <int R>
ATTNFORGE_TARGET_VNNI inline void int8_accumulate_values(const float* weights, Index ldg,
                                                         const QInt8* const* rows, Index n_keys,
                                                         Index head_dim, float* out, Index ldo,
                                                         simd::LineStream& ahead) {
  simd::LineStream stream = ahead;  // a local, so its state stays in registers (simd.hpp)
  for (Index d = 0; d < head_dim; d += kInt8DotChunk) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(out + r * ldo + d + 16 * c);
    }
    const Index g = d / kQInt8Group;
    for (Index j = 0; j < n_keys; ++j) {
      stream.step();
      const auto* bytes = reinterpret_cast<const std::int8_t*>(rows[j]) + d;
      __m512 v[4];
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * c))));
      }
      const float* w_low = weights + g * ldg + j;
      const float* w_high = w_low + ldg;
      for (int r = 0; r < R; ++r) {
        const __m512 low = _mm512_set1_ps(w_low[r * 16]);
        const __m512 high = _mm512_set1_ps(w_high[r * 16]);
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
  ahead = stream;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // ATTNFORGE_INT8_DOT

}  // namespace attnforge::detail
