// The 16 x 16 transpose of 32-bit lanes in AVX-512 registers, shared by the run-time
// dispatched kernels (bf16_dot.hpp, int8_dot.hpp). It carries the target attribute that
// is a subset of theirs, so it inlines into each of them, and the library keeps compiling
// for any target.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ATTNFORGE_AVX512_TRANSPOSE 1
#define ATTNFORGE_TARGET_AVX512F __attribute__((target("avx512f")))
#else
#define ATTNFORGE_AVX512_TRANSPOSE 0
#endif

namespace attnforge::detail {

#if ATTNFORGE_AVX512_TRANSPOSE

// GCC 12 reports the deliberately self-initialised placeholder inside its own AVX-512
// intrinsics (_mm512_undefined_*) as uninitialised once they are inlined into a function
// with a target attribute in a translation unit built without AVX-512. The report is
// false and lands on the consumer, so it is silenced for this function only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Transposes 16 rows of 16 32-bit lanes in place: v[i] lane j becomes v[j] lane i (64
// shuffles, the fewest for a register transpose of this size).
ATTNFORGE_TARGET_AVX512F inline void transpose_16x16(__m512i v[16]) {
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

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // ATTNFORGE_AVX512_TRANSPOSE

}  // namespace attnforge::detail
