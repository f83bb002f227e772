// The decode micro-kernels over a QInt8 cache on AVX-512 VNNI: key scores as int8 dot
// products (vpdpbusd, 64 products per instruction) against a quantized query, and the
// value products as int8 dot products against 16-bit quantized weights, with no
// dequantized copy of a block.
//
// Both read the cache's tiles of 16 positions (qint8.hpp), which the cache writes in the
// layouts below as positions are appended, so a step rearranges nothing.
//
// Scores: each query row is quantized per step like a cache row (kQInt8Group values per
// scale), so q . k = sum over groups of (q scale * k scale) * (integer dot of the group).
// A key tile holds its 16 keys' bytes 4 at a time (lane j = key j, 4 consecutive bytes
// per lane), so one vpdpbusd adds 4 products to each of 16 keys' sums against 4 broadcast
// query bytes, and a group's 8 of them leave 16 finished integer dot products: no
// horizontal sums. vpdpbusd multiplies unsigned by signed bytes; the tile holds the keys
// unsigned (plus 128), and the 128 * sum(q) this adds is subtracted by starting each
// group's accumulators at that correction.
//
// Values: each row's softmax weights times the value rows' group scales are rounded to
// 16-bit integers per block and group (quantize_value_weights). A value tile holds, per
// quad of keys, a lane of the 4 keys' bytes at each d: vpdpbusd then adds 4 keys' products
// per lane, once for the weights' high bytes and once for their low bytes. 16 bits rather
// than 8, because 8-bit weights add an error as large as the values' own quantization
// (docs/design.md, "Quantized caches").
//
// Like bf16_dot.hpp, these functions carry their own target attribute, so the library
// keeps compiling for any target; they are only called after `cpu_has_avx512_vnni()`
// (cpu_features.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attnforge/detail/simd.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/tensor.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(ATTNFORGE_NO_INT8_DOT)
#include <immintrin.h>
#define ATTNFORGE_INT8_DOT 1
#define ATTNFORGE_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define ATTNFORGE_INT8_DOT 0
#endif

namespace attnforge::detail {

inline constexpr bool kHasInt8DotKernel = ATTNFORGE_INT8_DOT != 0;

// Keys per call of the score kernel: one score per lane of a 512-bit float vector.
inline constexpr Index kInt8DotKeys = 16;
static_assert(kInt8DotKeys == kQInt8Tile, "a score call covers one tile of the cache");
// Keys of one decode block: sub-blocks of kInt8DotKeys whose value products are summed in
// integers before they join the float output (int8_value_products), so that conversion and
// the block's bookkeeping are paid once per kInt8DecodeKeys. The integer sums stay below
// 2^31 up to 128 keys.
inline constexpr Index kInt8DecodeKeys = 32;
inline constexpr Index kInt8SubBlocks = kInt8DecodeKeys / kInt8DotKeys;

// A query row quantized for the score kernel: its bytes in the QInt8 row layout, and per
// scale group the start of its accumulators and its scale.
struct Int8QueryRow {
  const QInt8* row;           // qint8_row_bytes(head_dim) bytes
  const std::int32_t* start;  // head_dim / kQInt8Group: -128 * (sum of the group's bytes)
};

// Bytes of one row's quantized value weights per 4 scale groups: 64 of high bytes, then 64
// of low bytes; dword 4 t + (g % 4) of each holds keys 4t ... 4t + 3 of group g.
inline constexpr Index kValueWeightBytesPer4Groups = 128;

// Bytes of one row's quantized value weights for `groups` scale groups.
constexpr Index value_weight_row_bytes(Index groups) {
  return (groups + 3) / 4 * kValueWeightBytesPer4Groups;
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

// Quantizes one (pre-scaled) query row into `row` and `start` (sized as Int8QueryRow says):
// the bytes and scales quantize_row gives, group by group in vectors (the same division,
// rounding in the current mode and clamp), since every decode work unit quantizes its rows.
// A last group of fewer than kQInt8Group values is read and written through masks.
ATTNFORGE_TARGET_VNNI inline void quantize_query_row(const float* q, Index head_dim, QInt8* row,
                                                     std::int32_t* start) {
  static_assert(kQInt8Group == 32, "a group is two vectors of 16 floats");
  const __m512 largest = _mm512_set1_ps(std::numeric_limits<float>::max());
  const __m512 top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kQInt8Group, ++g) {
    const Index n = std::min(kQInt8Group, head_dim - g0);
    const __mmask16 in[2] = {simd::first_lanes<__mmask16>(n), simd::first_lanes<__mmask16>(n - 16)};
    const __m512 x[2] = {_mm512_maskz_loadu_ps(in[0], q + g0),
                         _mm512_maskz_loadu_ps(in[1], q + g0 + 16)};
    const __m512 abs_x[2] = {_mm512_abs_ps(x[0]), _mm512_abs_ps(x[1])};
    // Not (|x| <= FLT_MAX): an infinity or a NaN, which makes the group's scale NaN.
    const bool finite = (_mm512_cmp_ps_mask(abs_x[0], largest, _CMP_NLE_UQ) |
                         _mm512_cmp_ps_mask(abs_x[1], largest, _CMP_NLE_UQ)) == 0;
    const float max_abs = finite ? _mm512_reduce_max_ps(_mm512_max_ps(abs_x[0], abs_x[1]))
                                 : std::numeric_limits<float>::quiet_NaN();
    const float scale = max_abs / 127.0f;
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m512 ratio =
          max_abs > 0.0f ? _mm512_div_ps(x[h], _mm512_set1_ps(max_abs)) : _mm512_setzero_ps();
      const __m512 rounded =
          _mm512_roundscale_ps(_mm512_mul_ps(ratio, top), _MM_FROUND_CUR_DIRECTION);
      const __m512i value = _mm512_cvtps_epi32(_mm512_min_ps(top, _mm512_max_ps(bottom, rounded)));
      sum = _mm512_add_epi32(sum, value);
      _mm_mask_storeu_epi8(row + g0 + 16 * h, in[h], _mm512_cvtepi32_epi8(value));
    }
    std::memcpy(row + qint8_scale_offset(head_dim) + g * Index{sizeof(float)}, &scale,
                sizeof(float));
    start[g] = -128 * _mm512_reduce_add_epi32(sum);
  }
}

// acc[b][r] += the products of word t (4 bytes of head_dim) of q_r with the 16 keys of
// each of NSub key tiles (int8_row_scores).
template <int R, int NSub>
ATTNFORGE_TARGET_VNNI EIGEN_ALWAYS_INLINE void int8_word_scores(const Int8QueryRow* q,
                                                                const std::uint8_t* keys,
                                                                Index tile_bytes, Index t,
                                                                __m512i (&acc)[NSub][R]) {
  __m512i k[NSub];
  ATTNFORGE_UNROLL
  for (int b = 0; b < NSub; ++b) k[b] = _mm512_loadu_si512(keys + b * tile_bytes + t * 64);
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    std::int32_t bytes;
    std::memcpy(&bytes, q[r].row + 4 * t, sizeof(bytes));
    const __m512i word = _mm512_set1_epi32(bytes);
    ATTNFORGE_UNROLL
    for (int b = 0; b < NSub; ++b) acc[b][r] = _mm512_dpbusd_epi32(acc[b][r], k[b], word);
  }
}

// score[b][r] += q_r . k_j over scale group g for the 16 keys of each of NSub key tiles
// (int8_row_scores): a whole group's kQInt8Group / 4 words (kPart false), or the `words`
// of a row's last group when it ends mid-group (the cache's rows end there too, so no
// byte past head_dim is read).
template <int R, int NSub, bool kPart>
ATTNFORGE_TARGET_VNNI EIGEN_ALWAYS_INLINE void int8_group_scores(
    const Int8QueryRow* q, const std::uint8_t* keys, Index tile_bytes, Index head_dim, Index g,
    Index words, __m512 (&score)[NSub][R], simd::LineStream& stream) {
  __m512i acc[NSub][R];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int b = 0; b < NSub; ++b) acc[b][r] = _mm512_set1_epi32(q[r].start[g]);
  }
  const Index t0 = g * kQInt8Group / 4;
  if constexpr (kPart) {
    for (Index t = t0; t < t0 + words; ++t) {
      stream.step();
      int8_word_scores<R, NSub>(q, keys, tile_bytes, t, acc);
    }
  } else {
    (void)words;
    ATTNFORGE_UNROLL
    for (Index t = t0; t < t0 + kQInt8Group / 4; ++t) {
      stream.step();
      int8_word_scores<R, NSub>(q, keys, tile_bytes, t, acc);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    const __m512 q_scale = _mm512_set1_ps(qint8_scale(q[r].row, head_dim, g));
    ATTNFORGE_UNROLL
    for (int b = 0; b < NSub; ++b) {
      const __m512 k_scale =
          _mm512_loadu_ps(keys + b * tile_bytes + qint8_tile_scale_at(head_dim, 0, g));
      score[b][r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[b][r]), q_scale), k_scale,
                                    score[b][r]);
    }
  }
}

// int8_group_scores for a row's last group when it ends mid-group, out of line for the
// reason int8_last_group_values gives.
template <int R, int NSub>
ATTNFORGE_TARGET_VNNI EIGEN_DONT_INLINE void int8_last_group_scores(
    const Int8QueryRow* q, const std::uint8_t* keys, Index tile_bytes, Index head_dim, Index g,
    Index words, __m512 (&score)[NSub][R], simd::LineStream& stream) {
  int8_group_scores<R, NSub, true>(q, keys, tile_bytes, head_dim, g, words, score, stream);
}

// out[r][16 b + j] = q_r . k_j for the 16 keys of each of NSub consecutive key tiles
// (qint8.hpp; tile b at tiles + b * tile_bytes; log2 units when q was scaled so), for R
// query rows at once: each key load serves every row and each broadcast query word every
// tile, and the R x NSub dependency chains interleave. R and NSub are fixed so the
// accumulators stay in registers. `ahead` steps once per 4 bytes of head_dim.
template <int R, int NSub>
ATTNFORGE_TARGET_VNNI inline void int8_row_scores(const Int8QueryRow* q, const QInt8* tiles,
                                                  Index tile_bytes, Index head_dim, float* out,
                                                  Index ldo, simd::LineStream& ahead) {
  simd::LineStream stream = ahead;  // a local, so its state stays in registers (simd.hpp)
  // The bytes of QInt8 objects, read by the vector loads (which may alias anything).
  const auto* keys = reinterpret_cast<const std::uint8_t*>(tiles);
  __m512 score[NSub][R];
  ATTNFORGE_UNROLL
  for (int b = 0; b < NSub; ++b) {
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) score[b][r] = _mm512_setzero_ps();
  }
  const Index whole = head_dim / kQInt8Group;
  for (Index g = 0; g < whole; ++g) {
    int8_group_scores<R, NSub, false>(q, keys, tile_bytes, head_dim, g, kQInt8Group / 4, score,
                                      stream);
  }
  if (const Index rest = head_dim % kQInt8Group; rest != 0)
    int8_last_group_scores<R, NSub>(q, keys, tile_bytes, head_dim, whole, rest / 4, score, stream);
  ATTNFORGE_UNROLL
  for (int b = 0; b < NSub; ++b) {
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo + b * kInt8DotKeys, score[b][r]);
  }
  ahead = stream;
}

// The lane-wise larger of a and b, NaN where either is NaN (_mm512_max_ps alone returns b
// where one of them is NaN).
ATTNFORGE_TARGET_VNNI inline __m512 max_keeping_nan(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a);
}

// The largest of 16 floats, NaN if any is NaN.
ATTNFORGE_TARGET_VNNI inline float max_or_nan(__m512 x) {
  if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q) != 0) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(x);
}

// The value products' weights of a block of NSub (<= kInt8SubBlocks) value tiles of 16
// keys: row r's weight of key j of tile b in scale group g is p[r][16 b + j] *
// v_scale[b][g][j] (p: row stride ldp; v_scale[b][g][j] the tile's scale, tile b at tiles +
// b * tile_bytes; keys outside keep[b] count as scale 0, since slots past the cache's length
// hold no key), written as a 16-bit integer w = round(p v_scale / unit[r][g]) with unit[r][g]
// = max p[r] * max v_scale[.][g] / 65535 over the whole block, split into its high and low
// bytes (layout above; sub-block b of row r at weights + r * ldw + b *
// value_weight_row_bytes(groups), groups = qint8_groups(head_dim)). One unit for the whole
// block lets the value products sum its sub-blocks in integers. A unit from the two maxima
// rather than the largest product costs a bit or two where they fall on different keys,
// against 16 bits, and needs rows + groups reductions instead of rows x groups. A NaN among
// a row's weights or a group's scales makes its unit NaN, so those outputs become NaN as a
// float cache's would.
template <int NSub>
ATTNFORGE_TARGET_VNNI inline void quantize_value_weights(const float* p, Index rows, Index ldp,
                                                         const QInt8* tiles, Index tile_bytes,
                                                         const __mmask16* keep, Index head_dim,
                                                         std::uint8_t* weights, Index ldw,
                                                         float* units) {
  static_assert(NSub >= 1 && NSub <= kInt8SubBlocks, "a block holds 1 ... kInt8SubBlocks");
  constexpr float kSteps = 65535.0f;
  const __m512i low_byte = _mm512_set1_epi16(255);
  const Index groups = qint8_groups(head_dim);
  const Index sub_weights = value_weight_row_bytes(groups);
  for (Index g0 = 0; g0 < groups; g0 += 4) {  // 4 groups at a time: one pack of 4 dwords
    // The scales, then v_scale / the group's max, in [0, 1]; 0 past groups, so those words
    // are 0.
    __m512 relative_scale[NSub][4];
    float group_max[4];
    for (int i = 0; i < 4; ++i) {
      for (int b = 0; b < NSub; ++b) {
        relative_scale[b][i] =
            g0 + i < groups
                ? _mm512_maskz_loadu_ps(
                      keep[b], tiles + b * tile_bytes + qint8_tile_scale_at(head_dim, 0, g0 + i))
                : _mm512_setzero_ps();
      }
      __m512 top = relative_scale[0][i];
      for (int b = 1; b < NSub; ++b) top = max_keeping_nan(top, relative_scale[b][i]);
      group_max[i] = max_or_nan(top);
      const __m512 inverse = _mm512_set1_ps(group_max[i] > 0.0f ? 1.0f / group_max[i] : 0.0f);
      for (int b = 0; b < NSub; ++b)
        relative_scale[b][i] = _mm512_mul_ps(relative_scale[b][i], inverse);
    }
    for (Index r = 0; r < rows; ++r) {
      __m512 top = _mm512_loadu_ps(p + r * ldp);
      for (int b = 1; b < NSub; ++b)
        top = max_keeping_nan(top, _mm512_loadu_ps(p + r * ldp + b * kInt8DotKeys));
      const float row_max = max_or_nan(top);
      const __m512 to_steps = _mm512_set1_ps(row_max > 0.0f ? kSteps / row_max : 0.0f);
      for (int i = 0; i < 4; ++i) {
        if (g0 + i < groups) units[r * groups + g0 + i] = row_max * group_max[i] / kSteps;
      }
      for (int b = 0; b < NSub; ++b) {
        const __m512 in_steps =
            _mm512_mul_ps(_mm512_loadu_ps(p + r * ldp + b * kInt8DotKeys), to_steps);
        __m512i steps[4];
        for (int i = 0; i < 4; ++i)
          steps[i] = _mm512_cvtps_epi32(_mm512_mul_ps(in_steps, relative_scale[b][i]));
        // Packs within 128-bit lanes, saturating to [0, 65535] (a NaN's INT_MIN to 0): lane t
        // of `words_01` holds keys 4 t ... 4 t + 3 of groups g0 + {0 1}, of `words_23` of
        // groups g0 + {2 3}; their bytes, packed again, put group g0 + i at dword i of lane t.
        const __m512i words_01 = _mm512_packus_epi32(steps[0], steps[1]);
        const __m512i words_23 = _mm512_packus_epi32(steps[2], steps[3]);
        std::uint8_t* to =
            weights + r * ldw + b * sub_weights + g0 / 4 * kValueWeightBytesPer4Groups;
        _mm512_storeu_si512(to, _mm512_packus_epi16(_mm512_srli_epi16(words_01, 8),
                                                    _mm512_srli_epi16(words_23, 8)));
        _mm512_storeu_si512(to + 64, _mm512_packus_epi16(_mm512_and_si512(words_01, low_byte),
                                                         _mm512_and_si512(words_23, low_byte)));
      }
    }
  }
}

// high[r][h] and low[r][h] += the products of the high and the low bytes of row r's
// 16-bit weights (w + r * ldw: dword 4 q for keys 4 q ... 4 q + 3, the low bytes 64 bytes
// on) with one scale group's 32 values of a value tile (qint8.hpp, `x` at the group's
// lanes of quad 0), 4 keys per vpdpbusd: accumulator h holds the group's values 16 h ...
// 16 h + 15. Each value packet is loaded once for both bytes of every row. kPart: a row's
// last group, which ends mid-group; its quads' bytes are read through the masks `in` (the
// next quad's bytes follow them), and only its first kHalves of 16 values are multiplied.
template <int R, bool kPart, int kHalves>
ATTNFORGE_TARGET_VNNI EIGEN_ALWAYS_INLINE void int8_weighted_quads(
    __m512i (&high)[R][2], __m512i (&low)[R][2], const std::int8_t* x, Index quad_bytes,
    const std::uint8_t* w, Index ldw, const __mmask64 (&in)[2]) {
  ATTNFORGE_UNROLL
  for (int t = 0; t < 4; ++t) {
    __m512i v[kHalves];
    ATTNFORGE_UNROLL
    for (int h = 0; h < kHalves; ++h) {
      const std::int8_t* from = x + t * quad_bytes + 64 * h;
      v[h] = kPart ? _mm512_maskz_loadu_epi8(in[h], from) : _mm512_loadu_si512(from);
    }
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      std::int32_t quad[2];
      std::memcpy(&quad[0], w + r * ldw + 16 * t, sizeof(quad[0]));
      std::memcpy(&quad[1], w + r * ldw + 64 + 16 * t, sizeof(quad[1]));
      const __m512i high_bytes = _mm512_set1_epi32(quad[0]);
      const __m512i low_bytes = _mm512_set1_epi32(quad[1]);
      ATTNFORGE_UNROLL
      for (int h = 0; h < kHalves; ++h) {
        high[r][h] = _mm512_dpbusd_epi32(high[r][h], high_bytes, v[h]);
        low[r][h] = _mm512_dpbusd_epi32(low[r][h], low_bytes, v[h]);
      }
    }
  }
}

// out[r][32 g + i] += the block's products for scale group g's n values (int8_value_products;
// n = kQInt8Group but in a row's last group when it ends mid-group, kPart, whose values and
// outputs are read and written through masks, and whose second 16 values are skipped
// when it has none: kHalves = 1).
template <int R, int NSub, bool kPart, int kHalves = 2>
ATTNFORGE_TARGET_VNNI EIGEN_ALWAYS_INLINE void int8_group_values(
    const std::uint8_t* weights, Index ldw, const float* units, const std::int8_t* values,
    Index tile_bytes, Index head_dim, Index g, Index n, float* out, Index ldo,
    simd::LineStream& stream) {
  static_assert(kHalves == 2 || (kPart && kHalves == 1), "a whole group has two halves");
  const Index groups = qint8_groups(head_dim), quad_bytes = 4 * head_dim;
  const Index sub_weights = value_weight_row_bytes(groups);
  const __mmask64 in[2] = {simd::first_lanes<__mmask64>(4 * n),
                           simd::first_lanes<__mmask64>(4 * n - 64)};
  const std::int8_t* x = values + 4 * g * kQInt8Group;
  const std::uint8_t* w = weights + g / 4 * kValueWeightBytesPer4Groups + g % 4 * 4;
  __m512i high[R][2], low[R][2];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int h = 0; h < 2; ++h) high[r][h] = low[r][h] = _mm512_setzero_si512();
  }
  ATTNFORGE_UNROLL
  for (int b = 0; b < NSub; ++b) {
    stream.step();
    int8_weighted_quads<R, kPart, kHalves>(high, low, x + b * tile_bytes, quad_bytes,
                                           w + b * sub_weights, ldw, in);
  }
  const __mmask16 out_lanes[2] = {simd::first_lanes<__mmask16>(n),
                                  simd::first_lanes<__mmask16>(n - 16)};
  for (int r = 0; r < R; ++r) {
    const __m512 unit = _mm512_set1_ps(units[r * groups + g]);
    float* o = out + r * ldo + g * kQInt8Group;
    for (int h = 0; h < kHalves; ++h) {
      const __m512 sum_h =
          _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(high[r][h], 8), low[r][h]));
      if constexpr (kPart) {
        _mm512_mask_storeu_ps(
            o + 16 * h, out_lanes[h],
            _mm512_fmadd_ps(sum_h, unit, _mm512_maskz_loadu_ps(out_lanes[h], o + 16 * h)));
      } else {
        _mm512_storeu_ps(o + 16 * h, _mm512_fmadd_ps(sum_h, unit, _mm512_loadu_ps(o + 16 * h)));
      }
    }
  }
}

// int8_group_values for a row's last group when it ends mid-group, out of line: inlined,
// the masked copies grew the kernels until GCC no longer inlined some row blocks of them
// (one row's value products, two rows' scores) into the block, also where no row ends
// mid-group.
template <int R, int NSub>
ATTNFORGE_TARGET_VNNI EIGEN_DONT_INLINE void int8_last_group_values(
    const std::uint8_t* weights, Index ldw, const float* units, const std::int8_t* values,
    Index tile_bytes, Index head_dim, Index g, Index n, float* out, Index ldo,
    simd::LineStream& stream) {
  if (n <= 16) {
    int8_group_values<R, NSub, true, 1>(weights, ldw, units, values, tile_bytes, head_dim, g, n,
                                        out, ldo, stream);
  } else {
    int8_group_values<R, NSub, true, 2>(weights, ldw, units, values, tile_bytes, head_dim, g, n,
                                        out, ldo, stream);
  }
}

// out[r][:] += sum_j w[r][j] * v_j[:] over a block of NSub value tiles (tile b at tiles + b *
// tile_bytes) for R rows (row stride ldo), as int8 dot products: per scale group g, the
// 16-bit weights of row r are row r of `weights` (row stride ldw, layout and tiles of
// quantize_value_weights) with their unit at units[r * groups + g]. vpdpbusd multiplies the
// unsigned weight bytes by the signed value bytes, 4 keys per lane, the high and the low
// bytes into separate accumulators over the whole block: the high sums shifted up 8 bits
// plus the low sums are each lane's exact integer sum (below 2^29 for kInt8DecodeKeys keys),
// converted to float and scaled by the unit once per block. `ahead` steps once per tile
// and group.
template <int R, int NSub>
ATTNFORGE_TARGET_VNNI inline void int8_value_products(const std::uint8_t* weights, Index ldw,
                                                      const float* units, const QInt8* tiles,
                                                      Index tile_bytes, Index head_dim, float* out,
                                                      Index ldo, simd::LineStream& ahead) {
  simd::LineStream stream = ahead;  // a local, so its state stays in registers (simd.hpp)
  // The bytes of QInt8 objects, read by the vector loads (which may alias anything).
  const auto* values = reinterpret_cast<const std::int8_t*>(tiles);
  const Index whole = head_dim / kQInt8Group;
  for (Index g = 0; g < whole; ++g) {
    int8_group_values<R, NSub, false>(weights, ldw, units, values, tile_bytes, head_dim, g,
                                      kQInt8Group, out, ldo, stream);
  }
  if (const Index rest = head_dim % kQInt8Group; rest != 0) {
    int8_last_group_values<R, NSub>(weights, ldw, units, values, tile_bytes, head_dim, whole, rest,
                                    out, ldo, stream);
  }
  ahead = stream;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // ATTNFORGE_INT8_DOT

}  // namespace attnforge::detail
