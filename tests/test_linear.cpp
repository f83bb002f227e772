// Tests of detail/linear.hpp, the projections of Attention: y = x W^T against a double
// brute force, inside and outside the streaming product's row range (2 ... 16 rows), with
// head and tail shapes (features not a multiple of the packet, outputs not a multiple of
// the chunk or of the weight rows a step holds), padded strides, and the same bits on any
// pool.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attnforge/detail/linear.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

struct LinearShape {
  Index rows, in_features, out_features;
};

// Runs linear over padded operands and checks every output against the double sum, with
// the bound of a sum of in_features products in T's accumulator type (Higham: n u sum
// |w x|, doubled for the final reduction of the lanes; bf16 and fp16 products are exact
// in float) plus, for a 16-bit T, the one rounding of the result into T, and that y's
// padding is not written. A 16-bit T summed in 16 bits would miss the bound by far.
template <typename T>
void check_linear(const LinearShape& s, const Eigen::ThreadPoolDevice* device) {
  const Index ldx = s.in_features + 3, ldw = s.in_features + 5, ldy = s.out_features + 2;
  std::mt19937 gen(static_cast<std::uint32_t>(s.rows * 131 + s.in_features * 7 + s.out_features));
  std::vector<T> x(static_cast<std::size_t>(s.rows * ldx)),
      w(static_cast<std::size_t>(s.out_features * ldw));
  for (T& e : x) e = static_cast<T>(2.0 * test::uniform01(gen) - 1.0);
  for (T& e : w) e = static_cast<T>(2.0 * test::uniform01(gen) - 1.0);
  const T sentinel = static_cast<T>(-12345.0);
  std::vector<T> y(static_cast<std::size_t>(s.rows * ldy), sentinel);
  detail::linear(x.data(), s.rows, s.in_features, ldx, w.data(), s.out_features, ldw, y.data(), ldy,
                 device);
  // Unit roundoffs from the digits (Eigen 3.4's numeric_limits<Eigen::half>::epsilon()
  // is 2^-13, not 2^-10).
  const double u = std::ldexp(1.0, -std::numeric_limits<acc_t<T>>::digits);
  const double u_out = std::ldexp(1.0, -std::numeric_limits<T>::digits);
  for (Index r = 0; r < s.rows; ++r) {
    for (Index o = 0; o < ldy; ++o) {
      const T got = y[static_cast<std::size_t>(r * ldy + o)];
      if (o >= s.out_features) {
        ASSERT_EQ(got, sentinel) << "padding written at row " << r << ", column " << o;
        continue;
      }
      double exact = 0.0, magnitude = 0.0;
      for (Index d = 0; d < s.in_features; ++d) {
        const double p = static_cast<double>(w[static_cast<std::size_t>(o * ldw + d)]) *
                         static_cast<double>(x[static_cast<std::size_t>(r * ldx + d)]);
        exact += p;
        magnitude += std::abs(p);
      }
      const double sum_bound = 2.0 * static_cast<double>(s.in_features) * u * magnitude;
      const double bound =
          sum_bound + (u_out > u ? u_out * (std::abs(exact) + sum_bound) : 0.0);
      ASSERT_LE(std::abs(static_cast<double>(got) - exact), bound)
          << "rows " << s.rows << ", in " << s.in_features << ", out " << s.out_features << ": y("
          << r << ", " << o << ")";
    }
  }
}

const LinearShape kLinearShapes[] = {
    {1, 64, 4},   {1, 37, 3},    {2, 130, 257}, {3, 16, 5},    {4, 128, 300}, {5, 33, 9},
    {7, 64, 513}, {8, 200, 260}, {9, 15, 6},    {16, 96, 258}, {17, 64, 260},  // past the streaming
                                                                               // limit: Eigen's
                                                                               // product
    {40, 31, 7},
};

TEST(Linear, MatchesDoubleSumFloat) {
  static_assert(detail::kStreamingLinearRows == 16, "kLinearShapes straddles the streaming range");
  for (const LinearShape& s : kLinearShapes) check_linear<float>(s, nullptr);
}

TEST(Linear, MatchesDoubleSumDouble) {
  for (const LinearShape& s : kLinearShapes) check_linear<double>(s, nullptr);
}

// bf16 and fp16 operands are multiplied and summed in float (widened_linear), on both
// sides of the streaming range.
TEST(Linear, MatchesDoubleSumBf16AndFp16InFloat) {
  for (const LinearShape& s : kLinearShapes) {
    check_linear<Eigen::bfloat16>(s, nullptr);
    check_linear<Eigen::half>(s, &test::pool_device(2));
  }
}

TEST(Linear, MatchesDoubleSumOnAPool) {
  for (const LinearShape& s : kLinearShapes) check_linear<float>(s, &test::pool_device(2));
}

// The chunks are fixed, so a pool gives the serial bits (for the streaming product too).
TEST(Linear, SameBitsOnAnyPool) {
  for (Index rows : {1, 3, 8, 16, 24}) {
    const Index in = 100, out = 600;
    std::mt19937 gen(static_cast<std::uint32_t>(rows));
    std::vector<float> x(static_cast<std::size_t>(rows * in)),
        w(static_cast<std::size_t>(out * in));
    for (float& e : x) e = static_cast<float>(test::uniform01(gen) - 0.5);
    for (float& e : w) e = static_cast<float>(test::uniform01(gen) - 0.5);
    std::vector<float> serial(static_cast<std::size_t>(rows * out)), pooled(serial.size());
    detail::linear(x.data(), rows, in, in, w.data(), out, in, serial.data(), out, nullptr);
    detail::linear(x.data(), rows, in, in, w.data(), out, in, pooled.data(), out,
                   &test::pool_device(2));
    EXPECT_EQ(serial, pooled) << rows << " rows";
  }
}

}  // namespace
}  // namespace attnforge
