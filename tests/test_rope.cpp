// Tests of rope.hpp: the (cos, sin) tables, the half-split and interleaved rotations, the
// RotaryEmbedding class, and their validation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

#include "attnforge/rope.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

constexpr double kPi = 3.14159265358979323846;
// Hand values of the angles used below (not computed by the library or by std::cos).
constexpr double kCos1 = 0.54030230586813971740;
constexpr double kSin1 = 0.84147098480789650665;
constexpr double kCos2 = -0.41614683654714238700;
constexpr double kSin2 = 0.90929742682568169540;

// With head_dim 4, freq = [1, theta^(-1/2)]; theta = 4 / pi^2 makes the second pair
// rotate by exactly pi/2 per position, so rotations are easy to write down by hand.
const double kQuarterTurnTheta = 4.0 / (kPi * kPi);

template <typename E>
void expect_invalid_argument(E&& call, const char* fragment) {
  test::expect_invalid(call, {fragment});
}

TEST(RopeTables, HaveMaxSeqLenRowsAndHalfHeadDimColumns) {
  const auto [cos, sin] = precompute_rope_frequencies<float>(10, 7);
  EXPECT_EQ(cos.dimension(0), 7);
  EXPECT_EQ(cos.dimension(1), 5);
  EXPECT_EQ(sin.dimension(0), 7);
  EXPECT_EQ(sin.dimension(1), 5);
}

TEST(RopeTables, PositionZeroIsTheIdentityRotation) {
  const auto [cos, sin] = precompute_rope_frequencies<float>(64, 3);
  for (Index i = 0; i < 32; ++i) {
    EXPECT_EQ(cos(0, i), 1.0f);
    EXPECT_EQ(sin(0, i), 0.0f);
  }
  const Tensor<float, 4> x = test::random_normal<float, 4>({2, 3, 1, 64}, 11);
  const ConstView<float, 2> cos0 = ConstView<float, 2>(cos).narrow(0, 0, 1);
  const ConstView<float, 2> sin0 = ConstView<float, 2>(sin).narrow(0, 0, 1);
  for (RopeStyle style : {RopeStyle::kHalfSplit, RopeStyle::kInterleaved}) {
    const Tensor<float, 4> out = apply_rope(x, cos0, sin0, style);
    EXPECT_TRUE(test::bitwise_equal(out, x));
  }
}

TEST(RopeTables, CosSquaredPlusSinSquaredIsOne) {
  const auto [cos, sin] = precompute_rope_frequencies<float>(64, 4096);
  double worst = 0.0;
  for (Index i = 0; i < cos.size(); ++i) {
    const double c = cos.data()[i];
    const double s = sin.data()[i];
    worst = std::max(worst, std::abs(c * c + s * s - 1.0));
  }
  // c and s are each rounded to float (relative 2^-24), so c^2 + s^2 is off by <= 2^-23.
  EXPECT_LE(worst, 1.2e-7);
}

TEST(RopeTables, FrequenciesFollowThetaPowerLaw) {
  // theta = 16, head_dim 4: freq = [16^0, 16^(-1/2)] = [1, 1/4]; at p = 2 the angles are 2, 1/2.
  const auto [cos, sin] = precompute_rope_frequencies<double>(4, 3, 16.0);
  constexpr double kCosHalf = 0.87758256189037271612;
  constexpr double kSinHalf = 0.47942553860420300027;
  EXPECT_NEAR(cos(2, 0), kCos2, 1e-15);
  EXPECT_NEAR(sin(2, 0), kSin2, 1e-15);
  EXPECT_NEAR(cos(2, 1), kCosHalf, 1e-15);
  EXPECT_NEAR(sin(2, 1), kSinHalf, 1e-15);
}

TEST(RopeTables, KnownAnglesGiveHandValues) {
  const auto [cos, sin] = precompute_rope_frequencies<double>(4, 3, kQuarterTurnTheta);
  // Double tables: only the rounding of pow() and of the angle (a few 1e-16) remains.
  constexpr double kTol = 1e-14;
  EXPECT_NEAR(cos(1, 0), kCos1, kTol);
  EXPECT_NEAR(sin(1, 0), kSin1, kTol);
  EXPECT_NEAR(cos(1, 1), 0.0, kTol);
  EXPECT_NEAR(sin(1, 1), 1.0, kTol);
  EXPECT_NEAR(cos(2, 0), kCos2, kTol);
  EXPECT_NEAR(sin(2, 0), kSin2, kTol);
  EXPECT_NEAR(cos(2, 1), -1.0, kTol);
  EXPECT_NEAR(sin(2, 1), 0.0, kTol);
}

TEST(RopeTables, FarPositionsAreAccurateToFloatRounding) {
  constexpr Index kHeadDim = 8;
  constexpr Index kFar = 100000;
  const auto [cos, sin] = precompute_rope_frequencies<float>(kHeadDim, kFar + 1);
  for (Index i = 0; i < kHeadDim / 2; ++i) {
    const double angle = static_cast<double>(kFar) * std::pow(10000.0, -2.0 * i / kHeadDim);
    // Rounding a value in [-1, 1] to float costs <= 2^-25 ~ 3e-8; angles formed in float
    // would be off by ~p * 6e-8 = 6e-3 here.
    EXPECT_NEAR(cos(kFar, i), std::cos(angle), 1e-7) << "i = " << i;
    EXPECT_NEAR(sin(kFar, i), std::sin(angle), 1e-7) << "i = " << i;
  }
}

TEST(ApplyRope, HalfSplitRotatesPairsJAndJPlusHalf) {
  const auto [cos, sin] = precompute_rope_frequencies<double>(4, 3, kQuarterTurnTheta);
  // Two tokens at absolute positions 1 and 2: rows [1, 3) of the tables.
  Tensor<double, 2> x(2, 4);
  x.setValues({{1, 2, 3, 4}, {1, 2, 3, 4}});
  const Tensor<double, 2> out = apply_rope(x, ConstView<double, 2>(cos).narrow(0, 1, 2),
                                           ConstView<double, 2>(sin).narrow(0, 1, 2));
  constexpr double kTol = 1e-14;
  // Position 1: pair (0, 2) turns by 1 rad, pair (1, 3) by pi/2.
  EXPECT_NEAR(out(0, 0), kCos1 - 3 * kSin1, kTol);
  EXPECT_NEAR(out(0, 2), 3 * kCos1 + kSin1, kTol);
  EXPECT_NEAR(out(0, 1), -4.0, kTol);
  EXPECT_NEAR(out(0, 3), 2.0, kTol);
  // Position 2: pair (0, 2) turns by 2 rad, pair (1, 3) by pi.
  EXPECT_NEAR(out(1, 0), kCos2 - 3 * kSin2, kTol);
  EXPECT_NEAR(out(1, 2), 3 * kCos2 + kSin2, kTol);
  EXPECT_NEAR(out(1, 1), -2.0, kTol);
  EXPECT_NEAR(out(1, 3), -4.0, kTol);
}

TEST(ApplyRope, InterleavedRotatesAdjacentPairs) {
  const auto [cos, sin] = precompute_rope_frequencies<double>(4, 3, kQuarterTurnTheta);
  Tensor<double, 2> x(1, 4);
  x.setValues({{1, 2, 3, 4}});
  const Tensor<double, 2> out =
      apply_rope(x, ConstView<double, 2>(cos).narrow(0, 1, 1),
                 ConstView<double, 2>(sin).narrow(0, 1, 1), RopeStyle::kInterleaved);
  constexpr double kTol = 1e-14;
  // Position 1: pair (0, 1) turns by 1 rad, pair (2, 3) by pi/2.
  EXPECT_NEAR(out(0, 0), kCos1 - 2 * kSin1, kTol);
  EXPECT_NEAR(out(0, 1), 2 * kCos1 + kSin1, kTol);
  EXPECT_NEAR(out(0, 2), -4.0, kTol);
  EXPECT_NEAR(out(0, 3), 3.0, kTol);
}

// Evaluates docs/design.md's formulas in double on the same (float) table values.
Tensor<double, 4> rope_formula(const Tensor<float, 4>& x, const Tensor<float, 2>& cos,
                               const Tensor<float, 2>& sin, RopeStyle style) {
  Tensor<double, 4> out(x.dimensions());
  const Index half = x.dimension(3) / 2;
  for (Index b = 0; b < x.dimension(0); ++b) {
    for (Index h = 0; h < x.dimension(1); ++h) {
      for (Index s = 0; s < x.dimension(2); ++s) {
        for (Index j = 0; j < half; ++j) {
          const Index lo = style == RopeStyle::kHalfSplit ? j : 2 * j;
          const Index hi = style == RopeStyle::kHalfSplit ? j + half : 2 * j + 1;
          const double c = cos(s, j), sn = sin(s, j);
          out(b, h, s, lo) = double{x(b, h, s, lo)} * c - double{x(b, h, s, hi)} * sn;
          out(b, h, s, hi) = double{x(b, h, s, hi)} * c + double{x(b, h, s, lo)} * sn;
        }
      }
    }
  }
  return out;
}

TEST(ApplyRope, MatchesSpecFormulaOnRandomInputsForBothStyles) {
  const auto [cos, sin] = precompute_rope_frequencies<float>(16, 9);
  const Tensor<float, 4> x = test::random_normal<float, 4>({2, 3, 9, 16}, 12);
  for (RopeStyle style : {RopeStyle::kHalfSplit, RopeStyle::kInterleaved}) {
    const Tensor<float, 4> out = apply_rope(x, cos, sin, style);
    // Two float products and a sum per element, |x| <~ 4: a few float ulps of 4.
    EXPECT_LE(test::max_abs_diff(out, rope_formula(x, cos, sin, style)), 2e-6);
  }
  // The two pairings differ, so a mix-up cannot pass both.
  EXPECT_GT(test::max_abs_diff(apply_rope(x, cos, sin, RopeStyle::kHalfSplit),
                               apply_rope(x, cos, sin, RopeStyle::kInterleaved)),
            0.1);
}

TEST(ApplyRope, PreservesTheNormOfEveryRotatedPair) {
  const auto [cos, sin] = precompute_rope_frequencies<float>(64, 50);
  const Tensor<float, 4> x = test::random_normal<float, 4>({1, 2, 50, 64}, 13);
  const Tensor<float, 4> out = apply_rope(x, cos, sin);
  double worst = 0.0;
  for (Index h = 0; h < 2; ++h) {
    for (Index s = 0; s < 50; ++s) {
      for (Index j = 0; j < 32; ++j) {
        const double before = std::hypot(x(0, h, s, j), x(0, h, s, j + 32));
        const double after = std::hypot(out(0, h, s, j), out(0, h, s, j + 32));
        worst = std::max(worst, std::abs(after - before) / std::max(before, 1e-3));
      }
    }
  }
  EXPECT_LE(worst, 1e-6);  // float rotation: a few ulps relative
}

TEST(ApplyRope, InPlaceOnTransposedViewRotatesEachRowByItsOwnPosition) {
  constexpr Index kB = 2, kS = 5, kH = 3, kD = 8;
  const auto [cos, sin] = precompute_rope_frequencies<float>(kD, kS);
  Tensor<float, 4> bshd = test::random_normal<float, 4>({kB, kS, kH, kD}, 14);
  const StridedView<float, 4> bhsd = StridedView<float, 4>(bshd).transpose(1, 2);
  const Tensor<float, 4> expected = apply_rope(bhsd.to_tensor(), cos, sin);
  apply_rope_inplace(bhsd, ConstView<float, 2>(cos), ConstView<float, 2>(sin));
  EXPECT_TRUE(test::bitwise_equal(bhsd.to_tensor(), expected));
}

TEST(ApplyRope, InPlaceTakesPlainTensorsAndMapsOfAnyRankFromTwoUp) {
  constexpr Index kS = 5, kD = 8;
  const auto [cos, sin] = precompute_rope_frequencies<float>(kD, kS);
  Tensor<float, 2> x2 = test::random_normal<float, 2>({kS, kD}, 16);
  Tensor<float, 3> x3 = test::random_normal<float, 3>({3, kS, kD}, 17);
  Tensor<float, 5> x5 = test::random_normal<float, 5>({2, 1, 3, kS, kD}, 18);
  const Tensor<float, 2> e2 = apply_rope(x2, cos, sin);
  const Tensor<float, 3> e3 = apply_rope(x3, cos, sin);
  const Tensor<float, 5> e5 = apply_rope(x5, cos, sin);
  // Rank 2 rows are positions 0..S-1: hand-check one pair against the formula.
  EXPECT_NEAR(e2(3, 1), x2(3, 1) * cos(3, 1) - x2(3, 5) * sin(3, 1), 1e-6);
  apply_rope_inplace(x2, cos, sin);
  apply_rope_inplace(x3, cos, sin);
  TensorMap<float, 5> map5(x5.data(), 2, 1, 3, kS, kD);
  apply_rope_inplace(map5, cos, sin);
  EXPECT_TRUE(test::bitwise_equal(x2, e2));
  EXPECT_TRUE(test::bitwise_equal(x3, e3));
  EXPECT_TRUE(test::bitwise_equal(x5, e5));
}

TEST(RotaryEmbedding, TablesEqualPrecomputedFrequencies) {
  const RotaryEmbedding<float> rope(32, 40, 500000.0);
  const auto [cos, sin] = precompute_rope_frequencies<float>(32, 40, 500000.0);
  EXPECT_EQ(rope.head_dim(), 32);
  EXPECT_EQ(rope.max_seq_len(), 40);
  EXPECT_TRUE(test::bitwise_equal(rope.cos(), cos));
  EXPECT_TRUE(test::bitwise_equal(rope.sin(), sin));
  EXPECT_EQ(rope.cos_rows(7, 3).data(), &rope.cos()(7, 0));
  EXPECT_EQ(rope.sin_rows(7, 3).dimension(0), 3);
}

TEST(RotaryEmbedding, ApplyAtStartPosEqualsApplyRopeWithTableRowsFromStartPos) {
  constexpr Index kStart = 11, kS = 6;
  for (RopeStyle style : {RopeStyle::kHalfSplit, RopeStyle::kInterleaved}) {
    const RotaryEmbedding<float> rope(16, 32, 10000.0, style);
    const Tensor<float, 4> x = test::random_normal<float, 4>({2, 3, kS, 16}, 15);
    const Tensor<float, 4> expected =
        apply_rope(x, rope.cos_rows(kStart, kS), rope.sin_rows(kStart, kS), style);

    Tensor<float, 4> in_place = x;
    rope.apply(in_place, kStart);
    EXPECT_TRUE(test::bitwise_equal(in_place, expected));

    Tensor<float, 4> out(x.dimensions());
    rope.apply(x, out, kStart);
    EXPECT_TRUE(test::bitwise_equal(out, expected));

    // And it is not the rotation at position 0.
    EXPECT_GT(test::max_abs_diff(expected,
                                 apply_rope(x, rope.cos_rows(0, kS), rope.sin_rows(0, kS), style)),
              0.1);
  }
}

TEST(RotaryEmbedding, ApplyTakesAnyRankFromTwoUpInPlaceAndIntoAnOutput) {
  constexpr Index kStart = 9, kS = 4, kD = 8;
  const RotaryEmbedding<float> rope(kD, 16);
  const Tensor<float, 4> x4 = test::random_normal<float, 4>({2, 3, kS, kD}, 19);
  Tensor<float, 4> expected = x4;
  rope.apply(expected, kStart);
  // (S, D): one head of one batch row.
  Tensor<float, 2> x2 = ConstView<float, 4>(x4).narrow(0, 1, 1).narrow(1, 2, 1).to_tensor().reshape(std::array<Index, 2>{kS, kD});
  rope.apply(x2, kStart);
  for (Index s = 0; s < kS; ++s) {
    for (Index d = 0; d < kD; ++d) EXPECT_EQ(x2(s, d), expected(1, 2, s, d));
  }
  // (B * H, S, D) and (B, 1, H, S, D): the same rows, reshaped.
  const Tensor<float, 3> x3 = x4.reshape(std::array<Index, 3>{6, kS, kD});
  Tensor<float, 3> out3(x3.dimensions());
  rope.apply(x3, out3, kStart);
  EXPECT_TRUE(test::bitwise_equal(Tensor<float, 4>(out3.reshape(x4.dimensions())), expected));
  Tensor<float, 5> x5 = x4.reshape(std::array<Index, 5>{2, 1, 3, kS, kD});
  rope.apply(x5, kStart);
  EXPECT_TRUE(test::bitwise_equal(Tensor<float, 4>(x5.reshape(x4.dimensions())), expected));
}

// KempnerForge forms the angles in float32 (freqs = 1 / theta^(2i/D) in float, then
// position * freq in float); these tables form them in double. The float angle is off by
// up to half an ulp of itself (2^-24 * position) plus the float frequency's rounding, so
// the two tables drift apart linearly in the position: measured ~5e-8 x position for
// D = 64 and ~8e-8 x position for D = 128 (2.4e-4 by position 4096), while these tables
// stay within float rounding of the exact rotation at any position (test above).
TEST(RopeTables, DriftFromFloat32AnglesGrowsLinearlyWithThePosition) {
  for (Index head_dim : {Index{64}, Index{128}}) {
    const auto [cos, sin] = precompute_rope_frequencies<float>(head_dim, 4097);
    double worst_ratio = 0.0, at_4096 = 0.0;
    for (Index p = 1; p <= 4096; ++p) {
      double row = 0.0;
      for (Index i = 0; i < head_dim / 2; ++i) {
        const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
        const float freq = 1.0f / std::pow(10000.0f, exponent);
        const float angle = static_cast<float>(p) * freq;
        row = std::max({row, std::abs(cos(p, i) - static_cast<double>(static_cast<float>(std::cos(double{angle})))),
                        std::abs(sin(p, i) - static_cast<double>(static_cast<float>(std::sin(double{angle}))))});
      }
      worst_ratio = std::max(worst_ratio, row / static_cast<double>(p));
      if (p > 3500) at_4096 = std::max(at_4096, row);
    }
    // Bound: half an ulp of the angle and one ulp of the frequency, 1.8e-7 x position.
    EXPECT_LE(worst_ratio, 1.8e-7) << "head_dim " << head_dim;
    // And it really is that large (the README once said ~1e-6 for thousands of positions).
    EXPECT_GE(at_4096, 1e-4) << "head_dim " << head_dim;
  }
}

TEST(RopeValidation, OddOrNonPositiveHeadDimIsRejected) {
  expect_invalid_argument([] { precompute_rope_frequencies<float>(7, 4); }, "head_dim");
  expect_invalid_argument([] { precompute_rope_frequencies<float>(0, 4); }, "head_dim");
  expect_invalid_argument([] { RotaryEmbedding<float>(9, 4); }, "head_dim");
  // References, not a structured binding: a C++17 lambda cannot capture one (clang).
  const auto tables = precompute_rope_frequencies<float>(4, 3);
  const Tensor<float, 2>& cos = tables.first;
  const Tensor<float, 2>& sin = tables.second;
  const Tensor<float, 2> x(3, 5);
  expect_invalid_argument([&] { apply_rope(x, cos, sin); }, "head_dim");
}

TEST(RopeValidation, BadMaxSeqLenOrThetaIsRejected) {
  expect_invalid_argument([] { precompute_rope_frequencies<float>(8, 0); }, "max_seq_len");
  expect_invalid_argument([] { precompute_rope_frequencies<float>(8, 4, 0.0); }, "theta");
  expect_invalid_argument([] { precompute_rope_frequencies<float>(8, 4, -1.0); }, "theta");
  expect_invalid_argument([] { precompute_rope_frequencies<float>(8, 4, std::nan("")); }, "theta");
}

TEST(RopeValidation, TableRowsMustEqualSequenceLength) {
  const auto tables = precompute_rope_frequencies<float>(8, 10);
  const Tensor<float, 2>& cos = tables.first;
  const Tensor<float, 2>& sin = tables.second;
  const Tensor<float, 3> x = test::random_normal<float, 3>({2, 4, 8}, 16);
  // Using the first 4 rows of a longer table would silently rotate as if at position 0.
  expect_invalid_argument([&] { apply_rope(x, cos, sin); }, "10 rows but x has sequence length 4");
  const ConstView<float, 2> cos4 = ConstView<float, 2>(cos).narrow(0, 0, 4);
  const ConstView<float, 2> sin3 = ConstView<float, 2>(sin).narrow(0, 0, 3);
  expect_invalid_argument([&] { apply_rope(x, cos4, sin3); }, "cos has 4 rows but sin has 3");
}

TEST(RopeValidation, TableColumnsMustBeHalfHeadDim) {
  const auto tables = precompute_rope_frequencies<float>(16, 4);  // 8 columns
  const Tensor<float, 2>& cos = tables.first;
  const Tensor<float, 2>& sin = tables.second;
  const Tensor<float, 3> x = test::random_normal<float, 3>({2, 4, 8}, 17);
  expect_invalid_argument([&] { apply_rope(x, cos, sin); }, "head_dim / 2 = 4 columns");
}

TEST(RopeValidation, PositionsBeyondTheTableAreRejectedAndXIsUntouched) {
  const RotaryEmbedding<float> rope(8, 10);
  Tensor<float, 4> x = test::random_normal<float, 4>({1, 2, 4, 8}, 18);
  const Tensor<float, 4> before = x;
  expect_invalid_argument([&] { rope.apply(x, 7); }, "positions [7, 11)");
  expect_invalid_argument([&] { rope.apply(x, -1); }, "max_seq_len 10");
  EXPECT_TRUE(test::bitwise_equal(x, before));
  EXPECT_NO_THROW(rope.apply(x, 6));  // [6, 10) fits exactly
  expect_invalid_argument([&] { rope.cos_rows(5, 6); }, "positions [5, 11)");
}

TEST(RopeValidation, RotaryEmbeddingRejectsXOfAnotherHeadDimOrOutOfAnotherShape) {
  const RotaryEmbedding<float> rope(8, 10);
  Tensor<float, 4> x = test::random_normal<float, 4>({1, 2, 4, 6}, 19);
  expect_invalid_argument([&] { rope.apply(x, 0); }, "expected head_dim 8");
  const Tensor<float, 4> x8 = test::random_normal<float, 4>({1, 2, 4, 8}, 20);
  Tensor<float, 4> out(1, 2, 5, 8);
  out.setConstant(3.0f);
  expect_invalid_argument([&] { rope.apply(x8, out, 0); }, "out has shape (1, 2, 5, 8)");
  EXPECT_EQ(test::max_abs_diff(out, Tensor<float, 4>(out.constant(3.0f))), 0.0);
}

}  // namespace
}  // namespace attnforge
