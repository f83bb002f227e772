// Tests of norm.hpp: RMSNorm and rms_norm against hand values and a double computation
// of norm.py's formula, in place and as a copy, any rank, and their validation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

#include "attnforge/norm.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

// y = x / sqrt(mean(x^2) + eps) * w in double, row by row over the last dimension.
template <typename T, int Rank>
Tensor<double, Rank> rms_norm_formula(const Tensor<T, Rank>& x, const Tensor<T, 1>& w, double eps) {
  Tensor<double, Rank> y(x.dimensions());
  const Index width = x.dimension(Rank - 1);
  for (Index r = 0; r < x.size() / width; ++r) {
    double mean_sq = 0.0;
    for (Index d = 0; d < width; ++d) mean_sq += std::pow(static_cast<double>(x.data()[r * width + d]), 2);
    mean_sq /= static_cast<double>(width);
    for (Index d = 0; d < width; ++d) {
      y.data()[r * width + d] = static_cast<double>(x.data()[r * width + d]) /
                                std::sqrt(mean_sq + eps) * static_cast<double>(w(d));
    }
  }
  return y;
}

TEST(RmsNorm, HandComputedRow) {
  // x = (3, 4): mean(x^2) = 12.5; with eps = 0.5, sqrt(13) normalises it.
  Tensor<double, 1> x(2);
  x.setValues({3.0, 4.0});
  Tensor<double, 1> w(2);
  w.setValues({1.0, 2.0});
  const Tensor<double, 1> y = rms_norm(x, w, 0.5);
  EXPECT_DOUBLE_EQ(y(0), 3.0 / std::sqrt(13.0));
  EXPECT_DOUBLE_EQ(y(1), 8.0 / std::sqrt(13.0));
}

TEST(RmsNorm, MatchesTheFormulaForEveryRankInPlaceAndAsACopy) {
  RMSNorm<float> norm(16, 1e-6);
  EXPECT_EQ(norm.dim(), 16);
  EXPECT_EQ(norm.eps(), 1e-6);
  EXPECT_EQ(norm.weight().tensor()(7), 1.0f);  // ones, as norm.py initialises it
  norm.weight() = test::random_uniform<float, 1>({16}, 1, 0.5, 1.5);
  const Tensor<float, 2> x2 = test::random_normal<float, 2>({5, 16}, 2);
  const Tensor<float, 4> x4 = test::random_normal<float, 4>({2, 3, 5, 16}, 3);
  const Tensor<float, 1> w = norm.weight().tensor();
  // Float: a mean of 16 squares, a root and two products: a few ulps of |y| <~ 4.
  EXPECT_LE(test::max_abs_diff(norm.forward(x2), rms_norm_formula(x2, w, 1e-6)), 4e-6);
  EXPECT_LE(test::max_abs_diff(norm.forward(x4), rms_norm_formula(x4, w, 1e-6)), 4e-6);
  Tensor<float, 4> in_place = x4;
  norm.forward_inplace(in_place);
  EXPECT_TRUE(test::bitwise_equal(in_place, norm.forward(x4)));
  // A strided view normalises its own rows only.
  Tensor<float, 4> bshd = x4;
  const StridedView<float, 4> view = StridedView<float, 4>(bshd).transpose(1, 2);
  const Tensor<float, 4> expected = norm.forward(view.to_tensor());
  norm.forward_inplace(view);
  EXPECT_TRUE(test::bitwise_equal(view.to_tensor(), expected));
}

TEST(RmsNorm, Bfloat16IsComputedInFloatAndRoundedOnce) {
  using bfloat16 = Eigen::bfloat16;
  const Tensor<float, 2> xf = test::random_normal<float, 2>({4, 32}, 4);
  Tensor<bfloat16, 2> x(4, 32);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<bfloat16>(xf.data()[i]);
  RMSNorm<bfloat16> norm(32);
  const Tensor<bfloat16, 2> y = norm.forward(x);
  const Tensor<double, 2> exact = rms_norm_formula(x, norm.weight().tensor(), 1e-5);
  // One rounding to bf16: at most 2^-8 relative (8 significant bits), plus float's error.
  for (Index i = 0; i < y.size(); ++i) {
    const double e = exact.data()[i];
    EXPECT_LE(std::abs(static_cast<double>(y.data()[i]) - e), std::abs(e) * (0x1p-8 + 1e-6)) << i;
  }
}

TEST(RmsNormValidation, BadEpsDimOrShapesAreRejectedAndXIsUntouched) {
  test::expect_invalid([] { RMSNorm<float> norm(0); }, {"RMSNorm: dim must be positive, got 0"});
  test::expect_invalid([] { RMSNorm<float> norm(4, 0.0); }, {"RMSNorm: eps must be positive"});
  test::expect_invalid([] { RMSNorm<float> norm(4, std::nan("")); }, {"eps must be positive"});
  RMSNorm<float> norm(8);
  Tensor<float, 3> x = test::random_normal<float, 3>({2, 3, 6}, 5);
  const Tensor<float, 3> before = x;
  test::expect_invalid([&] { norm.forward_inplace(x); },
                       {"RMSNorm::forward_inplace: x has shape (2, 3, 6)", "(..., D)"});
  EXPECT_TRUE(test::bitwise_equal(x, before));
  test::expect_invalid([&] { norm.forward(x); }, {"rms_norm: x has shape (2, 3, 6)"});
  const Tensor<float, 1> w(6);
  test::expect_invalid([&] { rms_norm(x, w, -1.0); }, {"rms_norm: eps must be positive"});
  test::expect_invalid([&] { norm.weight() = w; }, {"RMSNorm::weight has shape (8)", "(6)"});
}

}  // namespace
}  // namespace attnforge
