// The bf16 products on AVX512-BF16 (vdpbf16ps: two bf16 products per float lane per
// instruction, twice the fp32 FMA rate): the prefill kernel's tile products, and below
// them the decode kernel's micro-kernels over a bf16 cache.
//
// Prefill operands are pairs of bf16 in one 32-bit lane: Qt as (Qt[2i][lane],
// Qt[2i+1][lane]), K as the pair (K[n][2i], K[n][2i+1]) that row-major storage already
// holds, P and V as pairs over consecutive keys. These functions carry their own target attribute,
// so the library keeps compiling for any x86-64 (or other) target; they are only called after the
// run-time check `cpu_has_avx512_bf16()` (cpu_features.hpp). Elsewhere `kHasBf16DotKernel` is false
// and bf16 tiles are converted to float instead.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attnforge/detail/avx512_transpose.hpp"
#include "attnforge/detail/cpu_features.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/tensor.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(ATTNFORGE_NO_BF16_DOT)
#include <immintrin.h>
#define ATTNFORGE_BF16_DOT 1
#define ATTNFORGE_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#else
#define ATTNFORGE_BF16_DOT 0
#endif

namespace attnforge::detail {

inline constexpr bool kHasBf16DotKernel = ATTNFORGE_BF16_DOT != 0;

// The decode kernel's block (the keys of one float packet of scores in an AVX-512 build)
// and the head dims one vdpbf16ps takes (micro-kernels below).
inline constexpr Index kBf16DotKeys = 16;
inline constexpr Index kBf16DotChunk = 32;

// Degree of the exp2 (simd::exp2) of the prefill's softmax weights, which are rounded to
// bf16 (relative error up to 2^-9) before the value products: its error, 5.6e-5, is 1/35
// of that rounding, and the row sums it also feeds are applied to bf16 outputs.
inline constexpr int kBf16WeightExp2Degree = 4;

// Whether a decode with Compute over a KVScalar cache can take the bf16 dot products: by
// its types (float compute over bf16 keys and values, the kernels compiled in, an AVX-512
// build, where a block of scores is one float packet), and then by head_dim (a multiple of
// kBf16DotChunk). The CPU and Bf16Kernel are asked at run time (use_bf16_dot in sdpa.hpp).
template <typename Compute, typename KVScalar>
inline constexpr bool kBf16DotDecodeTypes = (std::is_same_v<Compute, float> &&
                                             std::is_same_v<KVScalar, Eigen::bfloat16> &&
                                             kHasBf16DotKernel &&
                                             simd::kWidth<float> == kBf16DotKeys);

template <typename Compute, typename KVScalar>
constexpr bool bf16_dot_decode_fits(Index head_dim) {
  return kBf16DotDecodeTypes<Compute, KVScalar> && head_dim % kBf16DotChunk == 0;
}

#if ATTNFORGE_BF16_DOT

// A pair of bf16 (or any 32 bits) read without breaking strict aliasing.
ATTNFORGE_TARGET_BF16 inline __m512bh broadcast_pair(const void* p) {
  std::int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

// acc[r][c] = sum over the `pairs` pairs i of a(r, i) * b[i][c], where a(r, i) is the
// bf16 pair at a + r * a_row + i * a_pair (in bf16 elements) and b rows are `lanes`
// 32-bit pairs (C = lanes / 16 vectors); acc rows are `lanes` floats at out + r * lanes,
// added to with kAccumulate, else overwritten with out_scale * acc (the multiply done in
// registers, not in a pass over the tile). Used as St = K Qt (a = K rows, pairs along D)
// and Ot += V^T Pt (a = paired V, pairs along keys).
template <int R, int C, bool kAccumulate>
ATTNFORGE_TARGET_BF16 inline void pair_dot_block(const std::uint16_t* a, Index a_row, Index a_pair,
                                                 const std::uint32_t* b, Index pairs, float* out,
                                                 float out_scale = 1.0f) {
  constexpr int kLanes = 16 * C;
  __m512 acc[R][C];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) {
      acc[r][c] = kAccumulate ? _mm512_loadu_ps(out + r * kLanes + 16 * c) : _mm512_setzero_ps();
    }
  }
  for (Index i = 0; i < pairs; ++i) {
    __m512bh bv[C];
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + i * kLanes + 16 * c);
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512bh av = broadcast_pair(a + r * a_row + i * a_pair);
      ATTNFORGE_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, bv[c]);
    }
  }
  const __m512 scale = _mm512_set1_ps(out_scale);
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) {
      _mm512_storeu_ps(out + r * kLanes + 16 * c,
                       kAccumulate ? acc[r][c] : _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

// A vpermw / vpermt2w index that interleaves two runs of 16 16-bit elements: output
// element 2j takes element first + j, element 2j + 1 element second + j (for vpermt2w,
// elements 32 ... 63 are those of the second source).
ATTNFORGE_TARGET_BF16 inline __m512i interleave_index(int first, int second) {
  alignas(64) std::uint16_t index[32];
  for (int j = 0; j < 16; ++j) {
    index[2 * j] = static_cast<std::uint16_t>(first + j);
    index[2 * j + 1] = static_cast<std::uint16_t>(second + j);
  }
  return _mm512_load_si512(index);
}

// pair_value_rows (below) for 16-bit rows, 32 elements of a row pair per step: two
// vpermt2w give the 32 pairs, where the generic loop widens and shifts each element.
// Key tiles are paired once per work item that reads them, several times per tile.
ATTNFORGE_TARGET_BF16 inline void pair_16bit_rows(const std::uint16_t* v, Index ldv,
                                                  Index n_rows, Index width,
                                                  std::uint32_t* pairs) {
  const __m512i low = interleave_index(0, 32), high = interleave_index(16, 48);
  for (Index i = 0; 2 * i < n_rows; ++i) {
    const std::uint16_t* even = v + 2 * i * ldv;
    const std::uint16_t* odd = 2 * i + 1 < n_rows ? even + ldv : nullptr;
    std::uint32_t* to = pairs + i * width;
    for (Index d = 0; d < width; d += 32) {
      const Index left = width - d;
      const __mmask32 in = simd::first_lanes<__mmask32>(left);
      const __m512i e = _mm512_maskz_loadu_epi16(in, even + d);
      const __m512i o = odd != nullptr ? _mm512_maskz_loadu_epi16(in, odd + d)
                                       : _mm512_setzero_si512();
      // Pair j of the low (high) 16 exists where element j (16 + j) was loaded.
      _mm512_mask_storeu_epi32(to + d, static_cast<__mmask16>(in),
                               _mm512_permutex2var_epi16(e, low, o));
      _mm512_mask_storeu_epi32(to + d + 16, static_cast<__mmask16>(in >> 16),
                               _mm512_permutex2var_epi16(e, high, o));
    }
  }
}

// pair_query_rows (below) for lanes a multiple of 16: per 16 lanes and 16 pairs, the
// rows' 64-byte runs transposed in registers (a null row reads as zeros, the last
// pairs % 16 by masked loads and stores). Once per query tile, where the generic loop
// moves each pair by itself.
ATTNFORGE_TARGET_BF16 inline void transpose_pair_rows(const void* const* rows, Index lanes,
                                                      Index pairs, std::uint32_t* qt) {
  for (Index l0 = 0; l0 < lanes; l0 += 16) {
    for (Index i0 = 0; i0 < pairs; i0 += 16) {
      const Index left = pairs - i0;
      const __mmask16 in = simd::first_lanes<__mmask16>(left);
      __m512i v[16];
      for (int j = 0; j < 16; ++j) {
        const auto* row = static_cast<const std::uint32_t*>(rows[l0 + j]);
        v[j] = row != nullptr ? _mm512_maskz_loadu_epi32(in, row + i0) : _mm512_setzero_si512();
      }
      transpose_16x16(v);
      for (Index t = 0; t < std::min<Index>(left, 16); ++t)
        _mm512_storeu_si512(qt + (i0 + t) * lanes + l0, v[t]);
    }
  }
}

// pairs[i][lane] = (bf16(p[2i][lane]), bf16(p[2i+1][lane])) for i < ceil(n_rows / 2), the
// missing row of an odd count being 0: the softmax weights as the right operand of
// Ot += V^T Pt. Round to nearest even.
ATTNFORGE_TARGET_BF16 inline void pair_rows_to_bf16(const float* p, Index n_rows, Index lanes,
                                                    std::uint32_t* pairs) {
  // One conversion rounds both rows (row 2i to the low 16 bf16 elements, row 2i+1 to the
  // high 16), one vpermw interleaves them.
  const __m512i idx = interleave_index(0, 16);
  for (Index i = 0; 2 * i < n_rows; ++i) {
    for (Index lane = 0; lane < lanes; lane += 16) {
      const __m512 even = _mm512_loadu_ps(p + 2 * i * lanes + lane);
      const __m512 odd = 2 * i + 1 < n_rows ? _mm512_loadu_ps(p + (2 * i + 1) * lanes + lane)
                                            : _mm512_setzero_ps();
      _mm512_storeu_si512(pairs + i * lanes + lane,
                          _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(odd, even)));
    }
  }
}

// The decode kernel over a bf16 cache (float compute) with the same dot products: the
// block is kBf16DotKeys keys, head_dim a multiple of kBf16DotChunk.
//   scores: the query row rounded to bf16 once per step (exact for bf16 queries; the
//           scale multiplies the scores); per key, head_dim / 32 vdpbf16ps against the
//           key row as stored (pairs along head_dim), one accumulator per key, summed
//           across lanes by simd::sum_each_of_16;
//   values: the softmax weights rounded to bf16 pairs over consecutive keys; two value
//           rows interleaved 16 bits at a time (vpunpck[lh]wd) form the matching pairs
//           of keys, so one vdpbf16ps adds two keys' terms to 16 outputs. The interleave
//           works within 128-bit lanes, so the accumulators hold each 32 outputs in a
//           fixed order, undone once per step by unpermute_bf16_decode_row.

ATTNFORGE_TARGET_BF16 inline __m512i load_bf16_chunk(const void* p) {
  return _mm512_loadu_si512(p);
}

// out[0, n) = x[0, n) rounded to bf16 (to nearest even); n a multiple of 16.
ATTNFORGE_TARGET_BF16 inline void round_to_bf16(const float* x, Index n, std::uint16_t* out) {
  for (Index i = 0; i < n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  }
}

// scores[j] = scale * (q . key_j) for the 16 keys at rows[j] (bf16, head_dim values
// each); q is the query row in bf16. Each key row is read front to back before the next,
// as the hardware prefetchers like; `ahead` steps once per key (simd::LineStream).
template <int kChunks>
ATTNFORGE_TARGET_BF16 EIGEN_ALWAYS_INLINE void bf16_score_pass(const std::uint16_t* q,
                                                               const void* const* rows, Index d0,
                                                               __m512* acc,
                                                               simd::LineStream& ahead) {
  __m512bh qv[kChunks];
  ATTNFORGE_UNROLL
  for (int c = 0; c < kChunks; ++c) qv[c] = (__m512bh)load_bf16_chunk(q + d0 + c * kBf16DotChunk);
  ATTNFORGE_UNROLL
  for (int j = 0; j < kBf16DotKeys; ++j) {
    ahead.step();
    const auto* row = static_cast<const std::uint16_t*>(rows[j]) + d0;
    ATTNFORGE_UNROLL
    for (int c = 0; c < kChunks; ++c)
      acc[j] = _mm512_dpbf16_ps(acc[j], qv[c], (__m512bh)load_bf16_chunk(row + c * kBf16DotChunk));
  }
}

ATTNFORGE_TARGET_BF16 inline void bf16_key_scores(const std::uint16_t* q, const void* const* rows,
                                                  Index head_dim, float scale, float* scores,
                                                  simd::LineStream& ahead) {
  __m512 acc[kBf16DotKeys];
  ATTNFORGE_UNROLL
  for (int j = 0; j < kBf16DotKeys; ++j) acc[j] = _mm512_setzero_ps();
  simd::LineStream stream = ahead;  // a local, so its state stays in registers (simd.hpp)
  Index d = 0;
  for (; d + 8 * kBf16DotChunk <= head_dim; d += 8 * kBf16DotChunk)
    bf16_score_pass<8>(q, rows, d, acc, stream);
  if (d + 4 * kBf16DotChunk <= head_dim)
    bf16_score_pass<4>(q, rows, d, acc, stream), d += 4 * kBf16DotChunk;
  if (d + 2 * kBf16DotChunk <= head_dim)
    bf16_score_pass<2>(q, rows, d, acc, stream), d += 2 * kBf16DotChunk;
  if (d + kBf16DotChunk <= head_dim) bf16_score_pass<1>(q, rows, d, acc, stream);
  ahead = stream;
  _mm512_storeu_ps(scores, _mm512_mul_ps(simd::sum_each_of_16(acc), _mm512_set1_ps(scale)));
}

// out[r] += sum over keys j < 2 * pairs of weights[r][j] * v_j for R rows (row stride
// ldo, in the order of unpermute_bf16_decode_row), where weight_pairs[r][i] holds the
// bf16 weights of keys 2i and 2i + 1 and rows[j] the value rows (a row of zeros past the
// block's last key). head_dim values at a time in chunks of C * 32. `ahead` steps once
// per pair of keys.
template <int R, int C>
ATTNFORGE_TARGET_BF16 EIGEN_ALWAYS_INLINE void bf16_value_chunk(const std::uint32_t* weight_pairs,
                                                                const void* const* rows,
                                                                Index pairs, Index d0, float* out,
                                                                Index ldo,
                                                                simd::LineStream& ahead) {
  __m512 acc[R][2 * C];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < 2 * C; ++c) acc[r][c] = _mm512_loadu_ps(out + r * ldo + d0 + 16 * c);
  }
  for (Index i = 0; i < pairs; ++i) {
    ahead.step();
    const auto* even = static_cast<const std::uint16_t*>(rows[2 * i]) + d0;
    const auto* odd = static_cast<const std::uint16_t*>(rows[2 * i + 1]) + d0;
    __m512bh v[2 * C];
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) {
      const __m512i e = load_bf16_chunk(even + c * kBf16DotChunk);
      const __m512i o = load_bf16_chunk(odd + c * kBf16DotChunk);
      v[2 * c] = (__m512bh)_mm512_unpacklo_epi16(e, o);
      v[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(e, o);
    }
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(weight_pairs[r * 8 + i]));
      ATTNFORGE_UNROLL
      for (int c = 0; c < 2 * C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], v[c], w);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < 2 * C; ++c) _mm512_storeu_ps(out + r * ldo + d0 + 16 * c, acc[r][c]);
  }
}

template <int R>
ATTNFORGE_TARGET_BF16 inline void bf16_accumulate_values(const std::uint32_t* weight_pairs,
                                                         const void* const* rows, Index pairs,
                                                         Index head_dim, float* out, Index ldo,
                                                         simd::LineStream& ahead) {
  constexpr int kC = R >= 4 ? 2 : 4;  // 16 accumulators
  simd::LineStream stream = ahead;    // a local, so its state stays in registers (simd.hpp)
  Index d = 0;
  for (; d + kC * kBf16DotChunk <= head_dim; d += kC * kBf16DotChunk)
    bf16_value_chunk<R, kC>(weight_pairs, rows, pairs, d, out, ldo, stream);
  for (; d < head_dim; d += kBf16DotChunk)
    bf16_value_chunk<R, 1>(weight_pairs, rows, pairs, d, out, ldo, stream);
  ahead = stream;
}

// weight_pairs[r][i] = (bf16(w[r][2i]), bf16(w[r][2i + 1])) for the 16 weights of each of
// n_rows rows (row stride 16): consecutive bf16 already are those pairs.
ATTNFORGE_TARGET_BF16 inline void pair_decode_weights(const float* weights, Index n_rows,
                                                      std::uint32_t* weight_pairs) {
  for (Index r = 0; r < n_rows; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(weight_pairs + r * 8),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(weights + r * 16)));
  }
}

#endif  // ATTNFORGE_BF16_DOT

// dst[d] = scale * src[p(d)] for d < head_dim: an output row of the bf16 decode kernel
// back in head_dim order. Within each 32 outputs, vpunpcklwd put outputs 8L + k
// (k < 4) of 128-bit lane L into lane 4L + k of the first accumulator, vpunpckhwd put
// 8L + 4 + k into lane 4L + k of the second.
inline void unpermute_bf16_decode_row(const float* src, Index head_dim, float scale, float* dst) {
  for (Index d = 0; d < head_dim; ++d) {
    const Index chunk = d / 32, lane = d % 32 / 8, k = d % 8;
    dst[d] = scale * src[chunk * 32 + (k < 4 ? 0 : 16) + 4 * lane + k % 4];
  }
}

// qt[i][lane] = (q_lane[2i], q_lane[2i+1]) for i < head_dim / 2: the query rows of a
// tile as bf16 pairs, lanes along the row (0 for lanes whose row is null). A bit copy:
// the two bf16 of a pair are one 32-bit word, so this is a transpose of 32-bit words.
template <typename S>
void pair_query_rows(const S* const* rows, Index lanes, Index pairs, std::uint32_t* qt) {
  static_assert(sizeof(S) == 2, "pairs of 16-bit values");
#if ATTNFORGE_BF16_DOT
  // As pair_value_rows: called only by the dot-product kernel, and the rows are read by
  // vector loads only.
  transpose_pair_rows(reinterpret_cast<const void* const*>(rows), lanes, pairs, qt);
#else
  for (Index lane = 0; lane < lanes; ++lane) {
    const S* row = rows[lane];
    for (Index i = 0; i < pairs; ++i) {
      // std::memcpy, so the rows keep their own type (a read through a pointer of another
      // type would break aliasing rules).
      std::uint16_t pair[2] = {0, 0};
      if (row) std::memcpy(pair, row + 2 * i, sizeof(pair));
      qt[i * lanes + lane] =
          static_cast<std::uint32_t>(pair[0]) | (static_cast<std::uint32_t>(pair[1]) << 16);
    }
  }
#endif
}

// pairs[i][d] = (v[2i][d], v[2i+1][d]) for i < ceil(n_rows / 2) (0 past the last row):
// V rows regrouped so that one 32-bit broadcast holds two consecutive keys.
template <typename S>
void pair_value_rows(const S* v, Index ldv, Index n_rows, Index width, std::uint32_t* pairs) {
  static_assert(sizeof(S) == 2, "pairs of 16-bit values");
#if ATTNFORGE_BF16_DOT
  // Only the dot-product kernel pairs rows, and only after cpu_has_avx512_bf16(). The
  // rows are read by vector loads only, which may read any type.
  pair_16bit_rows(reinterpret_cast<const std::uint16_t*>(v), ldv, n_rows, width, pairs);
#else
  const auto bits = [](const S& x) {
    std::uint16_t b;
    std::memcpy(&b, &x, sizeof(b));
    return static_cast<std::uint32_t>(b);
  };
  for (Index i = 0; 2 * i < n_rows; ++i) {
    const S* even = v + 2 * i * ldv;
    const S* odd = 2 * i + 1 < n_rows ? v + (2 * i + 1) * ldv : nullptr;
    for (Index d = 0; d < width; ++d) {
      pairs[i * width + d] = bits(even[d]) | ((odd ? bits(odd[d]) : 0u) << 16);
    }
  }
#endif
}

}  // namespace attnforge::detail
