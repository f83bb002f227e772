// Tests of tensor.hpp: StridedView (construction, narrow, transpose, copies) and the
// validation helpers' messages.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <numeric>
#include <type_traits>
#include <vector>

#include "attnforge/tensor.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

// ---- Compile-time: ranks and layouts are part of the type. ----
static_assert(std::is_constructible_v<StridedView<const float, 4>, Tensor<float, 4>&>);
static_assert(std::is_constructible_v<StridedView<const float, 4>, const Tensor<float, 4>&>);
static_assert(std::is_constructible_v<StridedView<float, 4>, Tensor<float, 4>&>);
static_assert(!std::is_constructible_v<StridedView<const float, 4>, Tensor<float, 3>&>,
              "a rank-3 tensor must not convert to a rank-4 view");
static_assert(!std::is_constructible_v<StridedView<const float, 4>,
                                       Eigen::Tensor<float, 4, Eigen::ColMajor, Index>&>,
              "a ColMajor tensor must not convert (layout mistakes are compile errors)");
static_assert(!std::is_constructible_v<StridedView<float, 4>, const Tensor<float, 4>&>,
              "a mutable view must not be made from a const tensor");
static_assert(!std::is_constructible_v<StridedView<const float, 4>, Tensor<double, 4>&>,
              "element types must match");
static_assert(!std::is_constructible_v<StridedView<float, 2>, ConstTensorMap<float, 2>>,
              "a mutable view must not be made from a map of const memory");
static_assert(std::is_constructible_v<StridedView<const float, 2>, StridedView<float, 2>>);
static_assert(!std::is_constructible_v<StridedView<float, 2>, StridedView<const float, 2>>,
              "const views must not silently become mutable");

TEST(StridedView, DefaultConstructedViewIsAbsent) {
  const StridedView<const float, 2> view;
  EXPECT_FALSE(view.has_value());
  EXPECT_EQ(view.data(), nullptr);
  EXPECT_EQ(view.size(), 0);
}

TEST(StridedView, FromTensorIsContiguousRowMajorOverTheSameMemory) {
  Tensor<float, 3> t = test::random_uniform<float, 3>({2, 3, 5}, 1);
  const StridedView<float, 3> view(t);
  EXPECT_TRUE(view.has_value());
  EXPECT_EQ(view.data(), t.data());
  EXPECT_EQ(view.dimensions(), (std::array<Index, 3>{2, 3, 5}));
  EXPECT_EQ(view.strides(), (std::array<Index, 3>{15, 5, 1}));
  EXPECT_TRUE(view.is_contiguous());
  EXPECT_EQ(view.size(), 30);
  for (Index a = 0; a < 2; ++a) {
    for (Index b = 0; b < 3; ++b) {
      for (Index c = 0; c < 5; ++c) EXPECT_EQ(&view(a, b, c), &t(a, b, c));
    }
  }
  // Writes through a mutable view reach the tensor.
  view(1, 2, 4) = 42.0f;
  EXPECT_EQ(t(1, 2, 4), 42.0f);
  EXPECT_EQ(view.row(1, 2), &t(1, 2, 0));
}

TEST(StridedView, FromTensorMapViewsCallerMemoryWithoutCopy) {
  std::vector<double> buffer(24);
  std::iota(buffer.begin(), buffer.end(), 0.0);
  const TensorMap<double, 3> map(buffer.data(), 2, 3, 4);
  const StridedView<const double, 3> view(map);
  EXPECT_EQ(view.data(), buffer.data());
  EXPECT_EQ(view.strides(), (std::array<Index, 3>{12, 4, 1}));
  EXPECT_EQ(view(1, 2, 3), 23.0);

  const ConstTensorMap<double, 2> const_map(buffer.data(), 6, 4);
  const ConstView<double, 2> const_view(const_map);
  EXPECT_EQ(const_view.data(), buffer.data());
  EXPECT_EQ(const_view(5, 1), 21.0);
}

TEST(StridedView, MutableViewConvertsToConstViewOfTheSameElements) {
  Tensor<float, 2> t = test::random_uniform<float, 2>({3, 4}, 2);
  const StridedView<float, 2> mutable_view = StridedView<float, 2>(t).transpose(0, 1);
  const ConstView<float, 2> const_view = mutable_view;
  EXPECT_EQ(const_view.data(), mutable_view.data());
  EXPECT_EQ(const_view.dimensions(), mutable_view.dimensions());
  EXPECT_EQ(const_view.strides(), mutable_view.strides());
}

TEST(StridedView, NarrowSelectsASubrangeWithoutCopy) {
  Tensor<float, 3> t = test::random_uniform<float, 3>({2, 7, 4}, 3);
  const ConstView<float, 3> view(t);
  const ConstView<float, 3> part = view.narrow(1, 2, 3);
  EXPECT_EQ(part.dimensions(), (std::array<Index, 3>{2, 3, 4}));
  EXPECT_EQ(part.strides(), view.strides());
  EXPECT_EQ(part.data(), &t(0, 2, 0));
  EXPECT_FALSE(part.is_contiguous());
  for (Index a = 0; a < 2; ++a) {
    for (Index s = 0; s < 3; ++s) {
      for (Index d = 0; d < 4; ++d) EXPECT_EQ(&part(a, s, d), &t(a, s + 2, d));
    }
  }
}

TEST(StridedView, TransposeExchangesDimensionsAndStrides) {
  Tensor<float, 4> t = test::random_uniform<float, 4>({2, 5, 3, 4}, 4);  // (B, S, H, D)
  const ConstView<float, 4> bhsd = ConstView<float, 4>(t).transpose(1, 2);
  EXPECT_EQ(bhsd.dimensions(), (std::array<Index, 4>{2, 3, 5, 4}));
  EXPECT_EQ(bhsd.strides(), (std::array<Index, 4>{60, 4, 12, 1}));
  EXPECT_EQ(bhsd.stride(3), 1);
  for (Index b = 0; b < 2; ++b) {
    for (Index h = 0; h < 3; ++h) {
      for (Index s = 0; s < 5; ++s) {
        for (Index d = 0; d < 4; ++d) EXPECT_EQ(&bhsd(b, h, s, d), &t(b, s, h, d));
      }
    }
  }
}

TEST(StridedView, ToTensorCopiesTheViewedElementsInRowMajorOrder) {
  Tensor<float, 4> t = test::random_uniform<float, 4>({2, 5, 3, 4}, 5);
  const ConstView<float, 4> view = ConstView<float, 4>(t).transpose(1, 2).narrow(2, 1, 3);
  const Tensor<float, 4> copy = view.to_tensor();
  ASSERT_EQ(copy.dimension(0), 2);
  ASSERT_EQ(copy.dimension(1), 3);
  ASSERT_EQ(copy.dimension(2), 3);
  ASSERT_EQ(copy.dimension(3), 4);
  EXPECT_NE(copy.data(), t.data());
  for (Index b = 0; b < 2; ++b) {
    for (Index h = 0; h < 3; ++h) {
      for (Index s = 0; s < 3; ++s) {
        for (Index d = 0; d < 4; ++d) EXPECT_EQ(copy(b, h, s, d), t(b, s + 1, h, d));
      }
    }
  }
}

TEST(StridedView, ForEachRowVisitsInnermostRowsInRowMajorOrder) {
  Tensor<int, 3> t(2, 3, 2);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<int>(i);
  const ConstView<int, 3> view = ConstView<int, 3>(t).transpose(0, 1);  // (3, 2, 2)
  std::vector<const int*> rows;
  view.for_each_row([&](const int* row) { rows.push_back(row); });
  ASSERT_EQ(rows.size(), 6u);
  std::size_t n = 0;
  for (Index a = 0; a < 3; ++a) {
    for (Index b = 0; b < 2; ++b) EXPECT_EQ(rows[n++], &t(b, a, 0));
  }
}

// A TensorMap of the wrong rank or of ColMajor layout is rejected only by a static_assert
// inside the constructor body, so the type trait still reports it as constructible and
// overload sets over StridedView of different ranks become ambiguous. The check belongs in
// the constructor's enable_if, as it is for Eigen::Tensor.
TEST(StridedView, TensorMapOfWrongRankOrLayoutIsNotConstructibleByTypeTraits) {
  EXPECT_FALSE((std::is_constructible_v<StridedView<const float, 4>, TensorMap<float, 3>>));
  EXPECT_FALSE((std::is_constructible_v<StridedView<const float, 4>,
                                        Eigen::TensorMap<Eigen::Tensor<float, 4>>>));
}

TEST(CheckShape, AcceptsMatchingShapeAndWildcards) {
  Tensor<float, 3> t(2, 3, 4);
  EXPECT_NO_THROW(detail::check_shape("f", "x", ConstView<float, 3>(t), {2, 3, 4}, "(B, S, D)"));
  EXPECT_NO_THROW(detail::check_shape("f", "x", ConstView<float, 3>(t), {-1, -1, 4}, "(B, S, D)"));
}

TEST(CheckShape, MessageNamesEntryPointArgumentAndBothShapes) {
  Tensor<float, 3> t(2, 3, 5);
  test::expect_invalid(
      [&] {
        detail::check_shape("my_function", "x", ConstView<float, 3>(t), {2, -1, 4}, "(B, S, D)");
      },
      {"my_function: x has shape (2, 3, 5)", "(B, S, D) = (2, -1, 4)"});
}

TEST(CheckShape, RejectsNonContiguousLastDimension) {
  Tensor<float, 2> t(4, 4);
  const ConstView<float, 2> column_major = ConstView<float, 2>(t).transpose(0, 1);
  test::expect_invalid(
      [&] {
        detail::check_shape("f", "weights", column_major, {4, 4}, "(out, in)");
      },
      {"f: weights must have a contiguous last dimension"});
}

TEST(CheckShape, ShapeStringListsDimensionsInParentheses) {
  EXPECT_EQ(detail::shape_string(std::array<Index, 4>{1, 32, 7, 128}), "(1, 32, 7, 128)");
  EXPECT_EQ(detail::shape_string(std::array<Index, 1>{5}), "(5)");
}

}  // namespace
}  // namespace attnforge
