// Vectorized math on Eigen packets (AVX-512, AVX2, SSE, NEON, or scalar), with the
// accuracy each function guarantees. tests/test_vec_math.cpp checks every claim.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <type_traits>

// Eigen's packet types (__m512 ...) lose their alignment attribute as template
// arguments (PacketBlock<Packet16f, 16>, unpacket_traits<...>); harmless here, and Eigen
// silences the same warning in its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace attnforge::detail {

namespace ei = Eigen::internal;

// The widest packet Eigen uses for T under the current compiler flags.
template <typename T>
using packet_t = typename ei::packet_traits<T>::type;
template <typename T>
inline constexpr int kPacketSize = ei::unpacket_traits<packet_t<T>>::size;

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
// Below the normal range (x < -126, resp. -1022, including -inf) the result is exactly
// 0: softmax weights that small are below the precision of any sum they join, and
// exp2(-inf) == 0 is what masked scores rely on. Above the range the result is +inf.
// NaN gives an unspecified value (no trap, no out-of-range access).
template <typename Packet>
EIGEN_STRONG_INLINE Packet exp2(const Packet& x) {
  using Scalar = typename ei::unpacket_traits<Packet>::type;
  constexpr Scalar kMaxExponent = Scalar(std::numeric_limits<Scalar>::max_exponent);  // 128
  constexpr Scalar kMinExponent = Scalar(std::numeric_limits<Scalar>::min_exponent - 1);  // -126
  const Packet lo = ei::pset1<Packet>(kMinExponent);
  const Packet clamped = ei::pmin(ei::pmax(x, lo), ei::pset1<Packet>(kMaxExponent));
  const Packet n = ei::print(clamped);
  const Packet f = ei::psub(clamped, n);
  Packet poly = ei::pset1<Packet>(Scalar(exp2_taylor_coefficient(kExp2Degree<Scalar>)));
  for (int k = kExp2Degree<Scalar> - 1; k >= 0; --k) {
    poly = ei::pmadd(poly, f, ei::pset1<Packet>(Scalar(exp2_taylor_coefficient(k))));
  }
  Packet result;
  if constexpr (std::is_same_v<Scalar, float>) {
    // 2^n built directly in the exponent field; n = 128 (overflow) is split as
    // 2^(n-1) * 2 so the biased exponent stays representable.
    using PacketI = typename ei::unpacket_traits<Packet>::integer_packet;
    const Packet n_low = ei::pmin(n, ei::pset1<Packet>(kMaxExponent - 1));
    const PacketI biased = ei::pcast<Packet, PacketI>(ei::padd(n_low, ei::pset1<Packet>(127.0f)));
    const Packet two_n = ei::preinterpret<Packet>(ei::plogical_shift_left<23>(biased));
    result = ei::pmul(ei::pmul(poly, two_n), ei::padd(ei::pset1<Packet>(1.0f), ei::psub(n, n_low)));
  } else {
    result = ei::pldexp(poly, n);  // Eigen has no integer packet for double
  }
  // Flush everything below the normal range (and -inf) to exactly 0.
  return ei::pselect(ei::pcmp_lt(x, lo), ei::pzero(x), result);
}

// tanh(x) for a packet, used by the logit softcap (s = c * tanh(s / c), so its absolute
// error is multiplied by c: it must be tight where Gemma-style caps of 30-50 apply).
//   float: max absolute error 1.5e-7 (checked by the test; Eigen's ptanh reaches 3.7e-7).
//     |x| < 1/2: the odd Taylor polynomial to x^15 (truncation < 5e-9);
//     otherwise 1 - 2 / (exp2(2|x| log2 e) + 1) with the sign of x, where the
//     sensitivity 2 / (e + 1)^2 <= 0.15 damps exp2's error.
//   double: std::tanh lane by lane.
template <typename Packet>
EIGEN_STRONG_INLINE Packet tanh(const Packet& x) {
  using Scalar = typename ei::unpacket_traits<Packet>::type;
  if constexpr (std::is_same_v<Scalar, float>) {
    constexpr float kTaylor[] = {-0.0014558343870513183f, 0.003592128036572481f,
                                 -0.008863235529902197f, 0.021869488536155203f,
                                 -0.05396825396825397f, 0.13333333333333333f,
                                 -0.3333333333333333f};
    const Packet x2 = ei::pmul(x, x);
    Packet poly = ei::pset1<Packet>(kTaylor[0]);
    for (int i = 1; i < 7; ++i) poly = ei::pmadd(poly, x2, ei::pset1<Packet>(kTaylor[i]));
    const Packet small = ei::pmadd(ei::pmul(poly, x2), x, x);
    // Beyond |x| = 9, 2 / (e + 1) < 2^-25 and the result rounds to +-1.
    const Packet a = ei::pmin(ei::pabs(x), ei::pset1<Packet>(9.0f));
    const Packet e = exp2(ei::pmul(a, ei::pset1<Packet>(2.8853900817779268f)));  // 2 log2(e)
    const Packet one = ei::pset1<Packet>(1.0f);
    const Packet large = ei::psub(one, ei::pdiv(ei::pset1<Packet>(2.0f), ei::padd(e, one)));
    const Packet signed_large = ei::pselect(ei::pcmp_lt(x, ei::pzero(x)), ei::pnegate(large), large);
    return ei::pselect(ei::pcmp_lt(ei::pabs(x), ei::pset1<Packet>(0.5f)), small, signed_large);
  } else {
    constexpr int kSize = ei::unpacket_traits<Packet>::size;
    alignas(64) Scalar lanes[kSize];
    ei::pstoreu(lanes, x);
    for (int i = 0; i < kSize; ++i) lanes[i] = std::tanh(lanes[i]);
    return ei::ploadu<Packet>(lanes);
  }
}

// dst[i] = static_cast<D>(src[i]) for i < n: the storage-to-compute conversion of
// bf16/fp16 tiles (exact: every bf16 and fp16 value is a float), vectorised where
// Eigen has the packet cast.
template <typename S, typename D>
void convert(const S* src, D* dst, Eigen::Index n) {
  Eigen::Index i = 0;
  if constexpr (std::is_same_v<D, float> &&
                (std::is_same_v<S, Eigen::bfloat16> || std::is_same_v<S, Eigen::half>)) {
    using PacketS = packet_t<S>;
    using PacketD = packet_t<float>;
    constexpr int kSize = ei::unpacket_traits<PacketS>::size;
    if constexpr (kSize > 1 && kSize == ei::unpacket_traits<PacketD>::size) {
      for (; i + kSize <= n; i += kSize) ei::pstoreu(dst + i, ei::pcast<PacketS, PacketD>(ei::ploadu<PacketS>(src + i)));
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<D>(src[i]);
}

}  // namespace attnforge::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
