// Checks the accuracy claims stated in detail/vec_math.hpp.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <limits>
#include <vector>

#include "attnforge/detail/vec_math.hpp"

namespace attnforge::detail {
namespace {

template <typename T>
std::vector<T> apply_exp2(const std::vector<T>& xs) {
  using Packet = packet_t<T>;
  constexpr int kSize = kPacketSize<T>;
  std::vector<T> in = xs;
  in.resize((xs.size() + kSize - 1) / kSize * kSize, T(0));
  std::vector<T> out(in.size());
  for (std::size_t i = 0; i < in.size(); i += kSize) {
    ei::pstoreu(out.data() + i, exp2(ei::ploadu<Packet>(in.data() + i)));
  }
  out.resize(xs.size());
  return out;
}

// Max relative error of exp2 against std::exp2 in long double over a dense grid of
// [lo, hi), in units of the type's epsilon (1 ulp of a value in [1, 2)).
template <typename T>
double exp2_max_error_ulp(double lo, double hi, int points) {
  std::vector<T> xs(static_cast<std::size_t>(points));
  for (int i = 0; i < points; ++i) xs[i] = static_cast<T>(lo + (hi - lo) * i / points);
  const std::vector<T> ys = apply_exp2(xs);
  double worst = 0;
  for (int i = 0; i < points; ++i) {
    const long double ref = std::exp2(static_cast<long double>(xs[i]));
    const double rel = static_cast<double>(std::fabs((ys[i] - ref) / ref));
    worst = std::max(worst, rel);
  }
  return worst / std::numeric_limits<T>::epsilon();
}

TEST(VecMath, Exp2FloatWithinOneUlpOverNormalRange) {
  EXPECT_LE(exp2_max_error_ulp<float>(-126.0, 128.0, 1 << 20), 1.0);
  // The softmax range, sampled densely.
  EXPECT_LE(exp2_max_error_ulp<float>(-30.0, 8.0, 1 << 20), 1.0);
}

TEST(VecMath, Exp2DoubleWithinOneUlpOverNormalRange) {
  EXPECT_LE(exp2_max_error_ulp<double>(-1022.0, 1024.0, 1 << 18), 1.0);
  EXPECT_LE(exp2_max_error_ulp<double>(-30.0, 8.0, 1 << 18), 1.0);
}

TEST(VecMath, Exp2IsExactAtIntegersAndZeroBelowRange) {
  const std::vector<float> xs{0.0f, 1.0f, -1.0f, 10.0f, -126.0f, 127.0f};
  const std::vector<float> ys = apply_exp2(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(ys[i], std::exp2(xs[i])) << xs[i];
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> flushed = apply_exp2(std::vector<float>{-126.5f, -200.0f, -inf});
  for (float y : flushed) EXPECT_EQ(y, 0.0f);  // masked scores (-inf) weigh exactly 0
  const std::vector<float> overflow = apply_exp2(std::vector<float>{128.0f, 1000.0f, inf});
  for (float y : overflow) EXPECT_EQ(y, inf);
  const std::vector<double> flushed_d =
      apply_exp2(std::vector<double>{-1022.5, -std::numeric_limits<double>::infinity()});
  for (double y : flushed_d) EXPECT_EQ(y, 0.0);
}

TEST(VecMath, TanhFloatWithinStatedAbsoluteError) {
  using Packet = packet_t<float>;
  constexpr int kSize = kPacketSize<float>;
  double worst = 0;
  alignas(64) float in[kSize];
  alignas(64) float out[kSize];
  for (int i = 0; i < 400000; i += kSize) {
    for (int l = 0; l < kSize; ++l) in[l] = -20.0f + 40.0f * static_cast<float>(i + l) / 400000.0f;
    ei::pstoreu(out, tanh(ei::ploadu<Packet>(in)));
    for (int l = 0; l < kSize; ++l) {
      worst = std::max(worst, std::abs(static_cast<double>(out[l]) - std::tanh(static_cast<double>(in[l]))));
    }
  }
  EXPECT_LE(worst, 1.5e-7);
  RecordProperty("max_abs_error", std::to_string(worst));
}

}  // namespace
}  // namespace attnforge::detail
