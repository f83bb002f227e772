// The bf16 tile products of the prefill kernel on AVX512-BF16 (vdpbf16ps: two bf16
// products per float lane per instruction, twice the fp32 FMA rate).
//
// Operands are pairs of bf16 in one 32-bit lane: Qt as (Qt[2i][lane], Qt[2i+1][lane]),
// K as the pair (K[n][2i], K[n][2i+1]) that row-major storage already holds, P and V as
// pairs over consecutive keys. These functions carry their own target attribute, so the
// library keeps compiling for any x86-64 (or other) target; they are only called after
// the run-time check `cpu_has_avx512_bf16()`. Elsewhere `kHasBf16DotKernel` is false and
// bf16 tiles are converted to float instead.
#pragma once

#include <cstdint>
#include <cstring>

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

// Whether this CPU (and OS) runs AVX512-BF16; asked once.
inline bool cpu_has_avx512_bf16() {
#if ATTNFORGE_BF16_DOT
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// Whether the dot products beat converting bf16 tiles to float on this CPU, which is
// when vdpbf16ps issues at twice the fp32 FMA rate: AMD's AVX512-BF16 cores (Zen 4 and
// later) issue two per cycle; Intel's (Cooper Lake, Sapphire and Emerald Rapids) issue one
// next to two FMAs, so there the conversion path is the faster one. A fixed rule rather
// than a timing at start-up, so a program gives the same bits on every run.
inline bool cpu_prefers_bf16_dot() {
#if ATTNFORGE_BF16_DOT
  static const bool prefers = cpu_has_avx512_bf16() && __builtin_cpu_is("amd");
  return prefers;
#else
  return false;
#endif
}

#if ATTNFORGE_BF16_DOT

// A pair of bf16 (or any 32 bits) read without breaking strict aliasing.
ATTNFORGE_TARGET_BF16 inline __m512bh broadcast_pair(const void* p) {
  std::int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

// acc[r][c] += sum over the `pairs` pairs i of a(r, i) * b[i][c], where a(r, i) is the
// bf16 pair at a + r * a_row + i * a_pair (in bf16 elements) and b rows are `lanes`
// 32-bit pairs (C = lanes / 16 vectors); acc rows are `lanes` floats at out + r * lanes.
// Used as St = K Qt (a = K rows, pairs along D) and Ot += V^T Pt (a = paired V,
// pairs along keys).
template <int R, int C, bool kAccumulate>
ATTNFORGE_TARGET_BF16 inline void pair_dot_block(const std::uint16_t* a, Index a_row, Index a_pair,
                                                 const std::uint32_t* b, Index pairs, float* out) {
  constexpr int kLanes = 16 * C;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      acc[r][c] = kAccumulate ? _mm512_loadu_ps(out + r * kLanes + 16 * c) : _mm512_setzero_ps();
    }
  }
  for (Index i = 0; i < pairs; ++i) {
    __m512bh bv[C];
    for (int c = 0; c < C; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + i * kLanes + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = broadcast_pair(a + r * a_row + i * a_pair);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, bv[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * kLanes + 16 * c, acc[r][c]);
  }
}

// pairs[i][lane] = (bf16(p[2i][lane]), bf16(p[2i+1][lane])) for i < ceil(n_rows / 2), the
// missing row of an odd count being 0: the softmax weights as the right operand of
// Ot += V^T Pt. Round to nearest even.
ATTNFORGE_TARGET_BF16 inline void pair_rows_to_bf16(const float* p, Index n_rows, Index lanes,
                                                    std::uint32_t* pairs) {
  // vpermt2w index: output 16-bit element 2j takes element j of the first source (row
  // 2i), element 2j+1 element j of the second (row 2i+1).
  alignas(64) std::uint16_t index[32];
  for (int j = 0; j < 16; ++j) {
    index[2 * j] = static_cast<std::uint16_t>(j);
    index[2 * j + 1] = static_cast<std::uint16_t>(32 + j);
  }
  const __m512i idx = _mm512_loadu_si512(index);
  for (Index i = 0; 2 * i < n_rows; ++i) {
    for (Index lane = 0; lane < lanes; lane += 16) {
      const __m512 even = _mm512_loadu_ps(p + 2 * i * lanes + lane);
      const __m512 odd = 2 * i + 1 < n_rows ? _mm512_loadu_ps(p + (2 * i + 1) * lanes + lane)
                                            : _mm512_setzero_ps();
      const __m512i e = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(even));
      const __m512i o = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(odd));
      _mm512_storeu_si512(pairs + i * lanes + lane, _mm512_permutex2var_epi16(e, idx, o));
    }
  }
}

#endif  // ATTNFORGE_BF16_DOT

// qt[i][lane] = (q_lane[2i], q_lane[2i+1]) for i < head_dim / 2: the query rows of a
// tile as bf16 pairs, lanes along the row (0 for lanes whose row is null). A bit copy:
// the two bf16 of a pair are read as one 32-bit word (std::memcpy, so the rows keep their
// own type: reading them through a pointer of another type would break aliasing rules).
template <typename S>
void pair_query_rows(const S* const* rows, Index lanes, Index pairs, std::uint32_t* qt) {
  static_assert(sizeof(S) == 2, "pairs of 16-bit values");
  for (Index lane = 0; lane < lanes; ++lane) {
    const S* row = rows[lane];
    for (Index i = 0; i < pairs; ++i) {
      std::uint16_t pair[2] = {0, 0};
      if (row) std::memcpy(pair, row + 2 * i, sizeof(pair));
      qt[i * lanes + lane] =
          static_cast<std::uint32_t>(pair[0]) | (static_cast<std::uint32_t>(pair[1]) << 16);
    }
  }
}

// pairs[i][d] = (v[2i][d], v[2i+1][d]) for i < ceil(n_rows / 2) (0 past the last row):
// V rows regrouped so that one 32-bit broadcast holds two consecutive keys.
template <typename S>
void pair_value_rows(const S* v, Index ldv, Index n_rows, Index width, std::uint32_t* pairs) {
  static_assert(sizeof(S) == 2, "pairs of 16-bit values");
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
}

}  // namespace attnforge::detail
