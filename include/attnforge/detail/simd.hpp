// The SIMD seam: the one header that talks to Eigen's packet API (AVX-512, AVX2, SSE,
// NEON or scalar, whatever the compiler flags select). The kernels use only the names
// below, so what a packet operation means, and the accuracy of exp2 and tanh, is stated
// once, here. tests/test_simd.cpp checks every accuracy claim.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attnforge/detail/eigen.hpp"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // sum_each_of_16, which carries its own target attribute
#endif

#if defined(__clang__)
#define ATTNFORGE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTNFORGE_UNROLL _Pragma("GCC unroll 16")
#else
#define ATTNFORGE_UNROLL
#endif

// Eigen's packet types (__m512 ...) lose their alignment attribute as template
// arguments (PacketBlock<Packet16f, 16>, unpacket_traits<...>): harmless, and Eigen
// silences the same warning in its own headers. This header is where attnforge names
// them as template arguments, so it silences it here. (GCC 12's false-positive
// uninitialized warnings from the AVX-512 intrinsics are handled in eigen.hpp.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace attnforge::detail::simd {

namespace ei = Eigen::internal;

// The widest packet Eigen uses for T under the current compiler flags, and half of it.
template <typename T>
using Packet = typename ei::packet_traits<T>::type;
template <typename T>
using HalfPacket = typename ei::packet_traits<T>::half;
template <typename P>
using Scalar = typename ei::unpacket_traits<P>::type;
template <typename P>
inline constexpr int kSize = ei::unpacket_traits<P>::size;
template <typename T>
inline constexpr int kWidth = kSize<Packet<T>>;
template <typename T>
inline constexpr int kHalfWidth = kSize<HalfPacket<T>>;
// The full packet of T, or half of it.
template <typename T, bool kFull>
using PacketOfWidth = std::conditional_t<kFull, Packet<T>, HalfPacket<T>>;
// T itself, or a packet of T: code written once for one value or one value per lane.
template <typename T, bool kPacket>
using ScalarOrPacket = std::conditional_t<kPacket, Packet<T>, T>;
// Vector registers of the target: 32 with AVX-512, 16 with AVX2/SSE/NEON.
inline constexpr int kRegisters = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;

// Loads and stores: `_aligned` needs the address aligned to the packet.
template <typename P>
EIGEN_ALWAYS_INLINE P load(const Scalar<P>* from) {
  return ei::ploadu<P>(from);
}
template <typename P>
EIGEN_ALWAYS_INLINE P load_aligned(const Scalar<P>* from) {
  return ei::pload<P>(from);
}
template <typename P>
EIGEN_ALWAYS_INLINE void store(Scalar<P>* to, const P& x) {
  ei::pstoreu(to, x);
}
template <typename P>
EIGEN_ALWAYS_INLINE void store_aligned(Scalar<P>* to, const P& x) {
  ei::pstore(to, x);
}
// A store around the caches (a streaming store), for output a kernel writes once and
// does not read back: the core does not read each line in before overwriting it, and the
// caches keep the data that is reused. `to` must be aligned to the packet (see
// packet_aligned). Where the target has no such store for P, an aligned ordinary store.
// Streaming stores are weakly ordered: store_fence() before other threads read the data.
template <typename P>
EIGEN_ALWAYS_INLINE void store_streaming(Scalar<P>* to, const P& x) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<P, __m512>) {
    _mm512_stream_ps(to, x);
  } else
#endif
#if defined(EIGEN_VECTORIZE_AVX)
  if constexpr (std::is_same_v<P, __m256>) {
    _mm256_stream_ps(to, x);
  } else
#endif
#if defined(EIGEN_VECTORIZE_SSE)
  if constexpr (std::is_same_v<P, __m128>) {
    _mm_stream_ps(to, x);
  } else
#endif
  {
    ei::pstore(to, x);
  }
}
EIGEN_ALWAYS_INLINE void store_fence() {
#if defined(EIGEN_VECTORIZE_SSE)
  _mm_sfence();
#endif
}
template <typename P>
EIGEN_ALWAYS_INLINE bool packet_aligned(const Scalar<P>* at) {
  return reinterpret_cast<std::uintptr_t>(at) % sizeof(P) == 0;
}
template <typename P>
EIGEN_ALWAYS_INLINE P splat(Scalar<P> x) {
  return ei::pset1<P>(x);
}
template <typename P>
EIGEN_ALWAYS_INLINE P zero() {
  return ei::pset1<P>(Scalar<P>(0));
}

// Arithmetic, lane by lane. fma(a, b, c) = a * b + c (one rounding where the target fuses).
template <typename P>
EIGEN_ALWAYS_INLINE P fma(const P& a, const P& b, const P& c) {
  return ei::pmadd(a, b, c);
}
template <typename P>
EIGEN_ALWAYS_INLINE P add(const P& a, const P& b) {
  return ei::padd(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P sub(const P& a, const P& b) {
  return ei::psub(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P mul(const P& a, const P& b) {
  return ei::pmul(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P div(const P& a, const P& b) {
  return ei::pdiv(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P max(const P& a, const P& b) {
  return ei::pmax(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P min(const P& a, const P& b) {
  return ei::pmin(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P abs(const P& a) {
  return ei::pabs(a);
}

// Comparisons give a lane mask (all bits set where true), used by select and any.
template <typename P>
EIGEN_ALWAYS_INLINE P less(const P& a, const P& b) {
  return ei::pcmp_lt(a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE P equal(const P& a, const P& b) {
  return ei::pcmp_eq(a, b);
}
// mask ? a : b, lane by lane.
template <typename P>
EIGEN_ALWAYS_INLINE P select(const P& mask, const P& a, const P& b) {
  return ei::pselect(mask, a, b);
}
template <typename P>
EIGEN_ALWAYS_INLINE bool any(const P& mask) {
  return ei::predux_any(mask);
}

// Horizontal reductions.
template <typename P>
EIGEN_ALWAYS_INLINE Scalar<P> sum(const P& a) {
  return ei::predux(a);
}
template <typename P>
EIGEN_ALWAYS_INLINE Scalar<P> max_of(const P& a) {
  return ei::predux_max(a);
}
template <typename P>
EIGEN_ALWAYS_INLINE Scalar<P> first(const P& a) {
  return ei::pfirst(a);
}

// A square block of packets of T (full or half width), transposed in registers. The
// kernels name packets only as function template arguments (and these aliases): a packet
// type as a class template argument in their own code would trip -Wignored-attributes.
template <typename T>
using Block = ei::PacketBlock<Packet<T>, kWidth<T>>;
template <typename T>
using HalfBlock = ei::PacketBlock<HalfPacket<T>, kHalfWidth<T>>;
template <typename T, bool kFull>
using BlockOfWidth = std::conditional_t<kFull, Block<T>, HalfBlock<T>>;
template <typename PacketBlock>
EIGEN_ALWAYS_INLINE void transpose(PacketBlock& block) {
  ei::ptranspose(block);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The first n lanes (n clamped to [0, lanes]) of an AVX-512 mask type (__mmask16,
// __mmask32, __mmask64): the part of a vector that a row, a run or a block ending inside
// it holds.
template <typename Mask>
constexpr Mask first_lanes(Eigen::Index n) {
  constexpr Eigen::Index kLanes = 8 * sizeof(Mask);
  if (n >= kLanes) return static_cast<Mask>(~Mask{0});
  return n <= 0 ? Mask{0} : static_cast<Mask>((Mask{1} << n) - 1);
}

#define ATTNFORGE_SUM_EACH_OF_16 1
// Lane j of the result = the sum of the 16 lanes of acc[j]. A tree that adds while it
// shuffles (45 instructions) rather than a full 16 x 16 transpose followed by 15 adds.
// It carries its own target attribute so the AVX512-BF16 decode kernel can use it in a
// build for any x86-64; elsewhere it is reached only from AVX-512 builds.
__attribute__((target("avx512f"))) EIGEN_ALWAYS_INLINE __m512 sum_each_of_16(const __m512* acc) {
  __m512 pairs[8], quads[4], halves[2];
  // Per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] for keys a = 2k, b = 2k + 1.
  ATTNFORGE_UNROLL
  for (int k = 0; k < 8; ++k) {
    pairs[k] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * k], acc[2 * k + 1]),
                             _mm512_unpackhi_ps(acc[2 * k], acc[2 * k + 1]));
  }
  // Per 128-bit lane: keys 4m .. 4m + 3, each summed over that lane.
  ATTNFORGE_UNROLL
  for (int m = 0; m < 4; ++m) {
    const __m512d lo = _mm512_castps_pd(pairs[2 * m]), hi = _mm512_castps_pd(pairs[2 * m + 1]);
    quads[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  // Then across the four 128-bit lanes: even with odd lanes, twice.
  ATTNFORGE_UNROLL
  for (int h = 0; h < 2; ++h) {
    halves[h] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * h], quads[2 * h + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * h], quads[2 * h + 1], 0xdd));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}
#endif

// Lane j of the result = the sum of the lanes of block.packet[j]: the scores of a block of
// keys from one accumulator per key. Pairwise otherwise, so the adds form a tree of depth
// log2(S) rather than a chain of S - 1.
template <typename PacketBlock>
EIGEN_ALWAYS_INLINE auto sum_each(PacketBlock& block) {
#if defined(EIGEN_VECTORIZE_AVX512) && defined(ATTNFORGE_SUM_EACH_OF_16)
  if constexpr (std::is_same_v<decltype(block.packet[0]), __m512&>) {
    return sum_each_of_16(block.packet);
  } else
#endif
  {
    constexpr int kS = kSize<std::decay_t<decltype(block.packet[0])>>;
    ei::ptranspose(block);
    for (int width = kS / 2; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j)
        block.packet[j] = add(block.packet[j], block.packet[j + width]);
    }
    return block.packet[0];
  }
}

// When a prefetched line will be read, which picks the hint (see docs/design.md,
// "Decode streams the cache once"):
//   kNow:  right away and once, so it should displace as little as it can (prefetchnta);
//   kSoon: after the work in flight, so it must reach the innermost cache (prefetcht0);
//   kLater: after the work in flight and the next block's, so into L2 (prefetcht1), where
//           it leaves the L1's line-fill slots to the nearer requests.
enum class ReadAt { kNow, kSoon, kLater };

template <ReadAt kWhen>
EIGEN_ALWAYS_INLINE void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(address, 0, kWhen == ReadAt::kNow ? 0 : kWhen == ReadAt::kSoon ? 3 : 2);
#else
  (void)address;
#endif
}

// The cache lines of bytes [next, end), asked for (ReadAt::kSoon, or kLater for a stream
// that runs further ahead: `into_l2`) a few at a time: step() from inside a loop spreads
// the requests over its work, so the memory stays busy while the core computes. Asked for
// all at once, as many lines stall the core until the memory has served most of them. A
// function that steps it in a loop and need not be inlined into the stream's owner works
// on a local copy (and writes it back): a stream reached through a reference is reloaded
// and stored at every step, as the compiler cannot tell it from the data the loop writes.
struct LineStream {
  // Addresses as integers: a pointer may not be moved past its object, a request may.
  std::uintptr_t next = 0;        // the first line not asked for yet
  std::uintptr_t end = 0;         // one past the range's last line
  std::uintptr_t step_bytes = 0;  // lines per step, in bytes
  bool into_l2 = false;           // ReadAt::kLater instead of kSoon

  // The lines of `bytes` bytes from `first` (each starting at first + 64 i), spread over
  // about `steps` steps.
  static LineStream over(const void* first, std::ptrdiff_t bytes, std::ptrdiff_t steps,
                         bool into_l2 = false) {
    const std::ptrdiff_t lines = (bytes + kLineBytes - 1) / kLineBytes;
    const std::ptrdiff_t per_step = (lines + steps - 1) / std::max<std::ptrdiff_t>(steps, 1);
    const auto at = reinterpret_cast<std::uintptr_t>(first);
    return {at, at + static_cast<std::uintptr_t>(lines * kLineBytes),
            static_cast<std::uintptr_t>(per_step * kLineBytes), into_l2};
  }
  EIGEN_ALWAYS_INLINE void step() { steps(1); }
  // n steps at once: for a loop body that is unrolled (its steps would be n copies).
  EIGEN_ALWAYS_INLINE void steps(std::ptrdiff_t n) {
    ask_until(std::min(end, next + static_cast<std::uintptr_t>(n) * step_bytes));
  }
  // The lines the steps left, if there were fewer steps than planned.
  EIGEN_ALWAYS_INLINE void finish() { ask_until(end); }

  static constexpr std::ptrdiff_t kLineBytes = 64;

 private:
  EIGEN_ALWAYS_INLINE void ask_until(std::uintptr_t stop) {
    if (into_l2) {
      for (; next < stop; next += kLineBytes)
        prefetch<ReadAt::kLater>(reinterpret_cast<const void*>(next));
    } else {
      for (; next < stop; next += kLineBytes)
        prefetch<ReadAt::kSoon>(reinterpret_cast<const void*>(next));
    }
  }
};

// Reads a byte of each cache line of bytes [first, first + bytes), in address order. A
// run of such loads is what the hardware prefetchers follow, so a later pass that reads
// the range in another order (a transpose) finds it in cache. Prefetch instructions over
// the same lines measured no faster than no prefetch (docs/design.md, "The query pack
// reads its rows in address order first").
inline void touch_lines(const void* first, std::ptrdiff_t bytes) {
  if (bytes <= 0) return;
  const auto* p = static_cast<const volatile unsigned char*>(first);
  // Steps of a line from `first` reach every line but perhaps the last one.
  for (std::ptrdiff_t at = 0; at < bytes; at += LineStream::kLineBytes) (void)p[at];
  (void)p[bytes - 1];
}

// kSize<P> int8 values at `from` as a float packet (exact). A sign-extending load and one
// conversion where the target has them (AVX-512, AVX2, SSE4.1), lane by lane otherwise.
template <typename P>
EIGEN_ALWAYS_INLINE P widen_int8(const std::int8_t* from) {
  static_assert(std::is_same_v<Scalar<P>, float>, "widen_int8 gives float packets");
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (kSize<P> == 16) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from))));
  } else
#endif
#if defined(EIGEN_VECTORIZE_AVX2)
  if constexpr (kSize<P> == 8) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(from))));
  } else
#endif
#if defined(EIGEN_VECTORIZE_SSE4_1)
  if constexpr (kSize<P> == 4) {
    std::int32_t bytes;
    std::memcpy(&bytes, from, sizeof(bytes));
    return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bytes)));
  } else
#endif
  {
    alignas(64) float lanes[kSize<P>];
    for (int i = 0; i < kSize<P>; ++i) lanes[i] = static_cast<float>(from[i]);
    return ei::ploadu<P>(lanes);
  }
}

// Whether fp16 <-> float conversions run in hardware (F16C, 8 lanes per instruction, 16
// under AVX-512). Eigen 3.4 uses F16C only under clang (its test of the compiler is false
// for GCC) and converts lane by lane in software otherwise, so the seam does it here.
#if defined(__F16C__) && defined(EIGEN_VECTORIZE_SSE)
#define ATTNFORGE_F16C 1
// vcvtps2ph's rounding: to nearest even, as static_cast<Eigen::half> rounds.
inline constexpr int kToNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#else
#define ATTNFORGE_F16C 0
#endif

// x, held in a register from here on. A packet loaded once for several FMAs is otherwise
// often read again by each of them (the compiler folds the load into every FMA as a
// memory operand), which costs little on cores that load two 512-bit vectors per cycle
// but makes the loads, not the FMAs, the limit on cores that load one. Only in AVX-512
// builds, whose 32 vector registers hold the kernels' operands.
template <typename P>
EIGEN_ALWAYS_INLINE P in_register(P x) {
#if defined(EIGEN_VECTORIZE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  __asm__("" : "+v"(x));
#endif
  return x;
}

// kSize<P> values of S at `from` as a packet P: a plain load where S is P's scalar, else
// bf16 or fp16 widened to float (exact: every bf16 and fp16 value is a float). fp16 in
// hardware where the target has F16C, bf16 by Eigen's cast where its packet has P's
// lanes; lane by lane otherwise.
template <typename P, typename S>
EIGEN_ALWAYS_INLINE P load_as(const S* from) {
  if constexpr (std::is_same_v<S, Scalar<P>>) {
    return load<P>(from);
  } else {
    static_assert(std::is_same_v<Scalar<P>, float>, "load_as widens into float packets");
#if ATTNFORGE_F16C && defined(EIGEN_VECTORIZE_AVX512)
    if constexpr (std::is_same_v<S, Eigen::half> && kSize<P> == 16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
    }
#endif
#if ATTNFORGE_F16C && defined(EIGEN_VECTORIZE_AVX)
    if constexpr (std::is_same_v<S, Eigen::half> && kSize<P> == 8) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
    }
#endif
#if ATTNFORGE_F16C
    if constexpr (std::is_same_v<S, Eigen::half> && kSize<P> == 4) {
      return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(from)));
    }
#endif
    if constexpr (std::is_same_v<S, Eigen::bfloat16> && kSize<Packet<S>> == kSize<P>) {
      return ei::pcast<Packet<S>, P>(ei::ploadu<Packet<S>>(from));
    }
    alignas(64) float lanes[kSize<P>];
    for (int i = 0; i < kSize<P>; ++i) lanes[i] = static_cast<float>(from[i]);
    return ei::ploadu<P>(lanes);
  }
}

// out[k][i] = interleaved[4 i + k] for k < 4 and i < n: four byte streams interleaved a
// byte at a time, apart again. A byte shuffle per 16 (AVX2: 32) bytes where the target has
// one, byte by byte otherwise.
inline void deinterleave_4_bytes(const std::int8_t* interleaved, Eigen::Index n,
                                 std::int8_t* const (&out)[4]) {
  Eigen::Index i = 0;
#if defined(EIGEN_VECTORIZE_SSSE3)
  // Per 16 bytes (4 of each stream), stream k's 4 bytes to dword k.
  const __m128i by_stream = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
#if defined(EIGEN_VECTORIZE_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m256i x = _mm256_shuffle_epi8(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(interleaved + 4 * i)),
        _mm256_broadcastsi128_si256(by_stream));
    // Both halves' dword k side by side: stream k's 8 bytes in qword k.
    std::int64_t words[4];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words),
                        _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    for (int k = 0; k < 4; ++k) std::memcpy(out[k] + i, &words[k], sizeof(words[k]));
  }
#endif
  for (; i + 4 <= n; i += 4) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(interleaved + 4 * i));
    std::int32_t words[4];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(words), _mm_shuffle_epi8(x, by_stream));
    for (int k = 0; k < 4; ++k) std::memcpy(out[k] + i, &words[k], sizeof(words[k]));
  }
#endif
  for (; i < n; ++i) {
    for (int k = 0; k < 4; ++k) out[k][i] = interleaved[4 * i + k];
  }
}

// out[k][4 c + i] = src[c * stride + 4 k + i] ^ flip for k < 4, i < 4 and c < n_columns:
// the 4-byte words k of n_columns runs of 16 bytes, `stride` apart, gathered per k. A
// 4 x 4 transpose of words per 4 runs where the target has SSE2, byte by byte otherwise.
inline void gather_word_columns(const std::int8_t* src, Eigen::Index stride,
                                Eigen::Index n_columns, std::uint8_t flip,
                                std::int8_t* const (&out)[4]) {
  Eigen::Index c = 0;
#if defined(EIGEN_VECTORIZE_SSE2)
  const __m128i flip_bytes = _mm_set1_epi8(static_cast<char>(flip));
  for (; c + 4 <= n_columns; c += 4) {
    __m128i run[4];
    for (int j = 0; j < 4; ++j) {
      run[j] = _mm_xor_si128(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (c + j) * stride)), flip_bytes);
    }
    const __m128i low01 = _mm_unpacklo_epi32(run[0], run[1]);
    const __m128i low23 = _mm_unpacklo_epi32(run[2], run[3]);
    const __m128i high01 = _mm_unpackhi_epi32(run[0], run[1]);
    const __m128i high23 = _mm_unpackhi_epi32(run[2], run[3]);
    const __m128i word[4] = {
        _mm_unpacklo_epi64(low01, low23), _mm_unpackhi_epi64(low01, low23),
        _mm_unpacklo_epi64(high01, high23), _mm_unpackhi_epi64(high01, high23)};
    for (int k = 0; k < 4; ++k)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out[k] + 4 * c), word[k]);
  }
#endif
  for (; c < n_columns; ++c) {
    for (int k = 0; k < 4; ++k) {
      for (int i = 0; i < 4; ++i) {
        out[k][4 * c + i] =
            static_cast<std::int8_t>(static_cast<std::uint8_t>(src[c * stride + 4 * k + i]) ^ flip);
      }
    }
  }
}

// Stores the kSize<P> floats of x as values of S (float, Eigen::bfloat16 or Eigen::half),
// each finite value and infinity rounded to nearest even exactly as static_cast<S> rounds
// it, a NaN kept a NaN of its sign. Whole packets for bf16 under AVX-512 and for fp16 with
// F16C (ATTNFORGE_F16C); lane by lane otherwise.
template <typename S, typename P>
EIGEN_ALWAYS_INLINE void store_as(S* to, const P& x) {
  static_assert(std::is_same_v<Scalar<P>, float>, "store_as narrows float packets");
  if constexpr (std::is_same_v<S, float>) {
    store(to, x);
    return;
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<S, Eigen::bfloat16> && kSize<P> == 16) {
    // Eigen's scalar rounding (float_to_bfloat16_rtne), 16 lanes at a time: add 0x7fff
    // plus the lowest kept bit, keep the top half. (vcvtneps2bf16 would flush subnormals.)
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i high = _mm512_srli_epi32(bits, 16);
    const __m512i bias =
        _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16);
    const __m512i nan = _mm512_or_si512(_mm512_and_si512(high, _mm512_set1_epi32(0x8000)),
                                        _mm512_set1_epi32(0x7fc0));
    const __m512i out = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), nan, rounded);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_cvtepi32_epi16(out));
    return;
  }
#endif
#if ATTNFORGE_F16C && defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<S, Eigen::half> && kSize<P> == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm512_cvtps_ph(x, kToNearest));
    return;
  }
#endif
#if ATTNFORGE_F16C && defined(EIGEN_VECTORIZE_AVX)
  if constexpr (std::is_same_v<S, Eigen::half> && kSize<P> == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to), _mm256_cvtps_ph(x, kToNearest));
    return;
  }
#endif
#if ATTNFORGE_F16C
  if constexpr (std::is_same_v<S, Eigen::half> && kSize<P> == 4) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(to), _mm_cvtps_ph(x, kToNearest));
    return;
  }
#endif
  alignas(64) float lanes[kSize<P>];
  store(lanes, x);
  for (int i = 0; i < kSize<P>; ++i) to[i] = static_cast<S>(lanes[i]);
}

// Degree of the Taylor polynomial of 2^f = e^(f ln 2) on f in [-1/2, 1/2]. The
// truncation error is (ln2 / 2)^(n+1) / (n+1)! * sqrt(2): 7.3e-9 for float with n = 7
// (0.06 ulp), 4e-18 for double with n = 13, so the result is limited by rounding in
// Horner's scheme, not by the polynomial.
template <typename T>
inline constexpr int kExp2Degree = sizeof(T) == 4 ? 7 : 13;

// ln2^k / k!
constexpr double exp2_taylor_coefficient(int k) {
  double c = 1.0;
  for (int i = 1; i <= k; ++i) c *= 0.693147180559945309417232121458 / i;
  return c;
}

// exp2(x) for a packet.
//   float:  max relative error 1 ulp (1.2e-7) for x in [-126, 128);
//   double: max relative error 1 ulp (2.2e-16) for x in [-1022, 1024).
// A lower kDegree trades accuracy for speed where the result is rounded coarser next: for
// degree 4 the bound above is 5.9e-5, the largest error over [-1/2, 1/2] 5.6e-5.
// Below the normal range (x < -126, resp. -1022, including -inf) the result is exactly
// 0: softmax weights that small are below the precision of any sum they join, and
// exp2(-inf) == 0 is what masked scores rely on. Above the range the result is +inf.
// NaN gives an unspecified value (no trap, no out-of-range access).
template <typename P, int kDegree = kExp2Degree<Scalar<P>>>
EIGEN_ALWAYS_INLINE P exp2(const P& x) {
  using S = Scalar<P>;
  constexpr S kMaxExponent = S(std::numeric_limits<S>::max_exponent);      // 128
  constexpr S kMinExponent = S(std::numeric_limits<S>::min_exponent - 1);  // -126
  const P lo = splat<P>(kMinExponent);
  // Lanes below the range come out 0 whatever the polynomial gives them (the select at
  // the end), so the lower clamp only keeps their intermediate values tame. Where that
  // select is the zero-masking of the AVX-512 scale itself, they go in unclamped.
#if defined(EIGEN_VECTORIZE_AVX512)
  constexpr bool kMaskedScale = std::is_same_v<P, ei::Packet16f> || std::is_same_v<P, ei::Packet8d>;
#else
  constexpr bool kMaskedScale = false;
#endif
  const P clamped = ei::pmin(kMaskedScale ? x : ei::pmax(x, lo), splat<P>(kMaxExponent));
  const P n = ei::print(clamped);
  const P f = ei::psub(clamped, n);
  P poly = splat<P>(S(exp2_taylor_coefficient(kDegree)));
  for (int k = kDegree - 1; k >= 0; --k) {
    poly = ei::pmadd(poly, f, splat<P>(S(exp2_taylor_coefficient(k))));
  }
#if defined(EIGEN_VECTORIZE_AVX512)
  // poly * 2^n in one instruction: exact, like the multiplications below, and n = 128
  // still overflows to inf. The softmax's exp2 is a visible part of a tile's work, so
  // the flush below the range (the select at the end) is that instruction's
  // zero-masking, its compare left in a mask register (the generic select turns it into
  // a vector and back).
  if constexpr (std::is_same_v<P, ei::Packet16f>) {
    return _mm512_maskz_scalef_ps(
        static_cast<__mmask16>(~_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ)), poly, n);
  } else if constexpr (std::is_same_v<P, ei::Packet8d>) {
    return _mm512_maskz_scalef_pd(
        static_cast<__mmask8>(~_mm512_cmp_pd_mask(x, lo, _CMP_LT_OQ)), poly, n);
  } else
#endif
  {
    P result;
    if constexpr (std::is_same_v<S, float>) {
      // 2^n built directly in the exponent field; n = 128 (overflow) is split as
      // 2^(n-1) * 2 so the biased exponent stays representable.
      using PacketI = typename ei::unpacket_traits<P>::integer_packet;
      const P n_low = ei::pmin(n, splat<P>(kMaxExponent - 1));
      const PacketI biased = ei::pcast<P, PacketI>(ei::padd(n_low, splat<P>(127.0f)));
      const P two_n = ei::preinterpret<P>(ei::plogical_shift_left<23>(biased));
      result = ei::pmul(ei::pmul(poly, two_n), ei::padd(splat<P>(1.0f), ei::psub(n, n_low)));
    } else {
      result = ei::pldexp(poly, n);  // Eigen has no integer packet for double
    }
    // Flush everything below the normal range (and -inf) to exactly 0.
    return ei::pselect(ei::pcmp_lt(x, lo), zero<P>(), result);
  }
}

// tanh(x) for a packet, used by the logit softcap (s = c * tanh(s / c), so its absolute
// error is multiplied by c: it must be tight where Gemma-style caps of 30-50 apply).
//   float: max absolute error 1.5e-7 (checked by the test; Eigen's ptanh reaches 3.7e-7).
//     |x| < 1/2: the odd Taylor polynomial to x^15 (truncation < 5e-9);
//     otherwise 1 - 2 / (exp2(2|x| log2 e) + 1) with the sign of x, where the
//     sensitivity 2 / (e + 1)^2 <= 0.15 damps exp2's error.
//   double: std::tanh lane by lane.
template <typename P>
EIGEN_ALWAYS_INLINE P tanh(const P& x) {
  using S = Scalar<P>;
  if constexpr (std::is_same_v<S, float>) {
    constexpr float kTaylor[] = {-0.0014558343870513183f, 0.003592128036572481f,
                                 -0.008863235529902197f,  0.021869488536155203f,
                                 -0.05396825396825397f,   0.13333333333333333f,
                                 -0.3333333333333333f};
    const P x2 = ei::pmul(x, x);
    P poly = splat<P>(kTaylor[0]);
    for (int i = 1; i < 7; ++i) poly = ei::pmadd(poly, x2, splat<P>(kTaylor[i]));
    const P small = ei::pmadd(ei::pmul(poly, x2), x, x);
    // Beyond |x| = 9, 2 / (e + 1) < 2^-25 and the result rounds to +-1.
    const P a = ei::pmin(ei::pabs(x), splat<P>(9.0f));
    const P e = exp2(ei::pmul(a, splat<P>(2.8853900817779268f)));  // 2 log2(e)
    const P one = splat<P>(1.0f);
    const P large = ei::psub(one, ei::pdiv(splat<P>(2.0f), ei::padd(e, one)));
    const P signed_large = ei::pselect(ei::pcmp_lt(x, zero<P>()), ei::pnegate(large), large);
    return ei::pselect(ei::pcmp_lt(ei::pabs(x), splat<P>(0.5f)), small, signed_large);
  } else {
    alignas(64) S lanes[kSize<P>];
    ei::pstoreu(lanes, x);
    for (int i = 0; i < kSize<P>; ++i) lanes[i] = std::tanh(lanes[i]);
    return ei::ploadu<P>(lanes);
  }
}

}  // namespace attnforge::detail::simd

namespace attnforge::detail {

// dst[i] = static_cast<D>(src[i]) for i < n: the storage-to-compute conversion of
// bf16/fp16 tiles (exact: every bf16 and fp16 value is a float), and the rounding of
// float into a bf16/fp16 cache (to nearest even), a packet at a time (simd::load_as,
// simd::store_as); a copy where the types are the same (a float cache's rows, a bf16 tile
// gathered from runs).
template <typename S, typename D>
void convert(const S* src, D* dst, Eigen::Index n) {
  using PacketF = simd::Packet<float>;
  constexpr int kSize = simd::kSize<PacketF>;
  constexpr bool kSixteenBit = std::is_same_v<S, Eigen::bfloat16> ||
                               std::is_same_v<S, Eigen::half> ||
                               std::is_same_v<D, Eigen::bfloat16> || std::is_same_v<D, Eigen::half>;
  Eigen::Index i = 0;
  if constexpr (std::is_same_v<S, D>) {
    std::copy(src, src + n, dst);
    return;
  } else if constexpr (kSize > 1 && kSixteenBit && std::is_same_v<D, float>) {
    for (; i + kSize <= n; i += kSize) simd::store(dst + i, simd::load_as<PacketF>(src + i));
  } else if constexpr (kSize > 1 && kSixteenBit && std::is_same_v<S, float>) {
    for (; i + kSize <= n; i += kSize) simd::store_as(dst + i, simd::load<PacketF>(src + i));
  }
  for (; i < n; ++i) dst[i] = static_cast<D>(src[i]);
}

}  // namespace attnforge::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
