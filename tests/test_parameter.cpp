// Tests of parameter.hpp: loading weights through a ParameterRef is a checked copy, so a
// state-dict entry of the wrong shape is an exception that changes nothing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>

#include "attnforge/attention.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

// The repro: a transposed wq (dim, H * D) instead of (H * D, dim). It used to be
// accepted, and the next forward read past the weight's buffer.
TEST(ParameterRef, TransposedWeightIsRejectedNamingTheWeightAndBothShapes) {
  Attention<float> attn(200, 4, 4, 80);
  const Tensor<float, 2> before = attn.wq().tensor();
  const Tensor<float, 2> transposed = test::random_uniform<float, 2>({200, 320}, 1);
  test::expect_invalid([&] { attn.wq() = transposed; },
                       {"Attention::wq has shape (320, 200) = (n_heads * head_dim, dim)",
                        "cannot assign a tensor of shape (200, 320)"});
  EXPECT_TRUE(test::bitwise_equal(attn.wq().tensor(), before));
  // The module still works, with its unchanged weights.
  const Tensor<float, 3> x = test::random_uniform<float, 3>({1, 3, 200}, 2);
  const RotaryEmbedding<float> rope(80, 8);
  EXPECT_NO_THROW(attn.forward(x, rope, 0));
}

TEST(ParameterRef, EveryWeightOfTheModuleChecksItsOwnShape) {
  Attention<float> attn(24, 4, 2, 6, /*qk_norm=*/true);
  const Tensor<float, 2> wrong2(5, 5);
  const Tensor<float, 1> wrong1(5);
  test::expect_invalid([&] { attn.wk() = wrong2; }, {"Attention::wk has shape (12, 24)"});
  test::expect_invalid([&] { attn.wv() = wrong2; }, {"Attention::wv has shape (12, 24)"});
  test::expect_invalid([&] { attn.wo() = wrong2; }, {"Attention::wo has shape (24, 24)"});
  test::expect_invalid([&] { attn.q_norm() = wrong1; }, {"Attention::q_norm has shape (6)"});
  test::expect_invalid([&] { attn.k_norm() = wrong1; }, {"Attention::k_norm has shape (6)"});
}

TEST(ParameterRef, RightShapesAreCopiedFromTensorsMapsViewsAndExpressions) {
  Attention<float> attn(8, 2, 2, 4);
  const Tensor<float, 2> w = test::random_uniform<float, 2>({8, 8}, 3);
  attn.wq() = w;
  EXPECT_TRUE(test::bitwise_equal(attn.wq().tensor(), w));
  EXPECT_NE(attn.wq().data(), w.data());  // a copy, not a binding
  // A checkpoint buffer with a row stride of 10 (a strided view) and a TensorMap.
  std::vector<float> padded(80, 0.0f);
  for (Index r = 0; r < 8; ++r) {
    for (Index c = 0; c < 8; ++c) padded[static_cast<std::size_t>(r * 10 + c)] = w(r, c) + 1.0f;
  }
  attn.wk() = ConstView<float, 2>(padded.data(), {8, 8}, {10, 1});
  for (Index r = 0; r < 8; ++r) {
    for (Index c = 0; c < 8; ++c) EXPECT_EQ(attn.wk()(r, c), w(r, c) + 1.0f);
  }
  attn.wv() = ConstTensorMap<float, 2>(w.data(), 8, 8);
  EXPECT_TRUE(test::bitwise_equal(attn.wv().tensor(), w));
  // An Eigen expression is evaluated, then checked.
  attn.wo() = attn.wq().tensor() * 2.0f;
  EXPECT_EQ(attn.wo()(3, 5), 2.0f * w(3, 5));
  test::expect_invalid([&] { attn.wo() = w.slice(std::array<Index, 2>{0, 0}, std::array<Index, 2>{4, 8}); },
                       {"Attention::wo has shape (8, 8)", "(4, 8)"});
  // Between two modules' references: a checked copy, never a rebinding.
  Attention<float> other(8, 2, 2, 4);
  other.wq() = attn.wq();
  EXPECT_TRUE(test::bitwise_equal(other.wq().tensor(), w));
  EXPECT_NE(other.wq().data(), attn.wq().data());
  Attention<float> wider(16, 2, 2, 4);
  test::expect_invalid([&] { wider.wq() = attn.wq(); }, {"Attention::wq has shape (8, 16)", "(8, 8)"});
}

TEST(ParameterRef, ElementAccessAndFillingKeepTheShape) {
  Attention<float> attn(8, 2, 1, 4);
  attn.wk().setConstant(0.5f);
  attn.wk()(1, 2) = -1.0f;
  EXPECT_EQ(attn.wk().dimensions(), (std::array<Index, 2>{4, 8}));
  EXPECT_EQ(attn.wk().tensor()(1, 2), -1.0f);
  EXPECT_EQ(attn.wk().tensor()(0, 0), 0.5f);
  attn.wk().setZero();
  EXPECT_EQ(test::max_abs(attn.wk().tensor()), 0.0);
  // A const module hands out read-only tensors.
  const Attention<float>& read_only = attn;
  EXPECT_EQ(read_only.wk().dimension(0), 4);
}

}  // namespace
}  // namespace attnforge
