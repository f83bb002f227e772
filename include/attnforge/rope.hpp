// Rotary position embeddings: the (cos, sin) tables and their application to
// (..., S, D) tensors in the half-split (Llama / Hugging Face) or interleaved
// (Meta's original Llama, GPT-J) pairing.
#pragma once

#include <algorithm>
#include <cmath>
#include <utility>

#include "attnforge/tensor.hpp"

namespace attnforge {

enum class RopeStyle {
  kHalfSplit,    // pairs (j, j + D/2)
  kInterleaved,  // pairs (2j, 2j + 1)
};

// Returns (cos, sin), each (max_seq_len, head_dim / 2), with
// angle[p][i] = p * theta^(-2i / head_dim). The angle is formed in double and only
// then rounded to T: a float angle p * freq loses ~p * 6e-8 rad, which at p = 1e5 is
// already a visible error in the rotation.
template <typename T = float>
std::pair<Tensor<T, 2>, Tensor<T, 2>> precompute_rope_frequencies(Index head_dim, Index max_seq_len,
                                                                  double theta = 10000.0) {
  constexpr const char* kWhere = "precompute_rope_frequencies";
  if (head_dim <= 0 || head_dim % 2 != 0) {
    detail::throw_invalid_argument(kWhere, ": head_dim must be positive and even, got ", head_dim);
  }
  if (max_seq_len <= 0) {
    detail::throw_invalid_argument(kWhere, ": max_seq_len must be positive, got ", max_seq_len);
  }
  if (!(theta > 0.0) || !std::isfinite(theta)) {
    detail::throw_invalid_argument(kWhere, ": theta must be positive and finite, got ", theta);
  }
  const Index half = head_dim / 2;
  Tensor<T, 2> cos_table(max_seq_len, half);
  Tensor<T, 2> sin_table(max_seq_len, half);
  for (Index i = 0; i < half; ++i) {
    const double freq =
        std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    for (Index p = 0; p < max_seq_len; ++p) {
      const double angle = static_cast<double>(p) * freq;
      cos_table(p, i) = static_cast<T>(std::cos(angle));
      sin_table(p, i) = static_cast<T>(std::sin(angle));
    }
  }
  return {std::move(cos_table), std::move(sin_table)};
}

namespace detail {

inline void check_rope_tables(const char* where, Index seq_len, Index head_dim, Index cos_rows,
                              Index cos_cols, Index sin_rows, Index sin_cols) {
  if (head_dim % 2 != 0) {
    throw_invalid_argument(where, ": head_dim (last dimension of x) must be even, got ", head_dim);
  }
  if (cos_cols != head_dim / 2 || sin_cols != head_dim / 2) {
    throw_invalid_argument(where, ": cos/sin must have head_dim / 2 = ", head_dim / 2,
                           " columns, got cos (", cos_rows, ", ", cos_cols, ") and sin (", sin_rows,
                           ", ", sin_cols, ")");
  }
  if (cos_rows != sin_rows) {
    throw_invalid_argument(where, ": cos has ", cos_rows, " rows but sin has ", sin_rows);
  }
  // Exactly S rows: silently using the first S rows of a longer table would rotate a
  // decode step at position p0 as if it were at position 0.
  if (cos_rows != seq_len) {
    throw_invalid_argument(where, ": cos/sin have ", cos_rows, " rows but x has sequence length ",
                           seq_len, " (pass rows [start_pos, start_pos + S) of the full tables)");
  }
}

// Rotates one row of length 2 * half in place. cos_row/sin_row hold `half` entries.
// The rotation is computed in the accumulator type so bf16/fp16 storage rounds once.
template <typename T, typename TableT>
inline void rotate_row(T* x, const TableT* cos_row, const TableT* sin_row, Index half,
                       RopeStyle style) {
  using A = acc_t<T>;
  if (style == RopeStyle::kHalfSplit) {
    for (Index j = 0; j < half; ++j) {
      const A a = static_cast<A>(x[j]);
      const A b = static_cast<A>(x[j + half]);
      const A c = static_cast<A>(cos_row[j]);
      const A s = static_cast<A>(sin_row[j]);
      x[j] = static_cast<T>(a * c - b * s);
      x[j + half] = static_cast<T>(b * c + a * s);
    }
  } else {
    for (Index j = 0; j < half; ++j) {
      const A a = static_cast<A>(x[2 * j]);
      const A b = static_cast<A>(x[2 * j + 1]);
      const A c = static_cast<A>(cos_row[j]);
      const A s = static_cast<A>(sin_row[j]);
      x[2 * j] = static_cast<T>(a * c - b * s);
      x[2 * j + 1] = static_cast<T>(b * c + a * s);
    }
  }
}

}  // namespace detail

namespace detail {

// Rotates x (..., S, D) in place; row s of cos/sin is the rotation of row s of x.
template <typename T, int Rank, typename TableT>
void rotate_inplace(const char* where, const StridedView<T, Rank>& x,
                    const ConstView<TableT, 2>& cos, const ConstView<TableT, 2>& sin,
                    RopeStyle style) {
  static_assert(Rank >= 2, "apply_rope: x must be (..., S, D)");
  static_assert(!std::is_const_v<T>, "apply_rope_inplace needs a mutable x");
  const Index seq_len = x.dimension(Rank - 2);
  const Index head_dim = x.dimension(Rank - 1);
  check_rope_tables(where, seq_len, head_dim, cos.dimension(0), cos.dimension(1), sin.dimension(0),
                    sin.dimension(1));
  if (x.stride(Rank - 1) != 1 || cos.stride(1) != 1 || sin.stride(1) != 1) {
    throw_invalid_argument(where, ": x, cos and sin need a contiguous last dimension");
  }
  const Index half = head_dim / 2;
  // Every row of x is visited in row-major order; its position is its index along S.
  Index row_index = 0;
  x.for_each_row([&](T* row) {
    const Index s = row_index++ % seq_len;
    rotate_row(row, cos.row(s), sin.row(s), half, style);
  });
}

// A writable tensor argument for the in-place functions: an lvalue Tensor, a TensorMap
// over mutable memory or a mutable view, of rank >= 2. Rotating a temporary Tensor in
// place would lose the result, so it does not compile.
template <typename X>
inline constexpr bool is_rotatable_v =
    !(std::is_rvalue_reference_v<X&&> && is_owning_tensor_v<std::decay_t<X>>);

}  // namespace detail

// Rotates x (..., S, D) in place (a Tensor, a TensorMap or a mutable StridedView, any rank
// >= 2); row s of cos/sin (S, D/2) is the rotation of row s of x.
template <typename X, typename C, typename S, typename = mutable_view_of_t<X>>
void apply_rope_inplace(X&& x, const C& cos, const S& sin,
                        RopeStyle style = RopeStyle::kHalfSplit) {
  static_assert(detail::is_rotatable_v<X>,
                "apply_rope_inplace: x is a temporary Tensor; the rotation would be lost");
  detail::rotate_inplace("apply_rope", as_mutable_view(x), as_const_view(cos), as_const_view(sin),
                         style);
}

// Returns a rotated copy of x (..., S, D), as the Python apply_rope does.
template <typename X, typename C, typename S>
auto apply_rope(const X& x, const C& cos, const S& sin, RopeStyle style = RopeStyle::kHalfSplit) {
  const auto x_view = as_const_view(x);
  auto out = x_view.to_tensor();
  detail::rotate_inplace("apply_rope", as_mutable_view(out), as_const_view(cos), as_const_view(sin),
                         style);
  return out;
}

// Owns the rotation tables for positions [0, max_seq_len) and applies them at an
// absolute start position, which is what a decoder with a KV cache needs.
template <typename T>
class RotaryEmbedding {
 public:
  RotaryEmbedding(Index head_dim, Index max_seq_len, double theta = 10000.0,
                  RopeStyle style = RopeStyle::kHalfSplit)
      : head_dim_(head_dim), theta_(theta), style_(style) {
    auto tables = precompute_rope_frequencies<T>(head_dim, max_seq_len, theta);
    cos_ = std::move(tables.first);
    sin_ = std::move(tables.second);
  }

  Index head_dim() const { return head_dim_; }
  Index max_seq_len() const { return cos_.dimension(0); }
  double theta() const { return theta_; }
  RopeStyle style() const { return style_; }
  const Tensor<T, 2>& cos() const& { return cos_; }
  const Tensor<T, 2>& sin() const& { return sin_; }

  // Rows [start_pos, start_pos + length) of the tables, as views.
  ConstView<T, 2> cos_rows(Index start_pos, Index length) const& {
    check_range(start_pos, length);
    return ConstView<T, 2>(cos_).narrow(0, start_pos, length);
  }
  ConstView<T, 2> sin_rows(Index start_pos, Index length) const& {
    check_range(start_pos, length);
    return ConstView<T, 2>(sin_).narrow(0, start_pos, length);
  }
  // The tables of a temporary RotaryEmbedding would dangle.
  const Tensor<T, 2>& cos() const&& = delete;
  const Tensor<T, 2>& sin() const&& = delete;
  ConstView<T, 2> cos_rows(Index, Index) const&& = delete;
  ConstView<T, 2> sin_rows(Index, Index) const&& = delete;

  // Rotates x (..., S, head_dim) in place (any rank >= 2: e.g. (B, heads, S, D) or
  // (S, D)) for absolute positions [start_pos, start_pos + S).
  template <typename X, typename = mutable_view_of_t<X>>
  void apply(X&& x, Index start_pos = 0) const {
    static_assert(detail::is_rotatable_v<X>,
                  "RotaryEmbedding::apply: x is a temporary Tensor; the rotation would be lost");
    const auto view = as_mutable_view(x);
    check_head_dim(view.dimensions());
    const Index seq_len = view.dimension(static_cast<int>(view.dimensions().size()) - 2);
    detail::rotate_inplace("RotaryEmbedding::apply", view, cos_rows(start_pos, seq_len),
                           sin_rows(start_pos, seq_len), style_);
  }

  // Writes the rotation of x into out (the same shape, any rank >= 2).
  template <typename X, typename Out, typename = std::enable_if_t<view_traits<X>::valid>,
            typename = mutable_view_of_t<Out>>
  void apply(const X& x, Out&& out, Index start_pos = 0) const {
    const auto x_view = as_const_view(x);
    const auto out_view = as_mutable_view(out);
    static_assert(
        std::is_same_v<typename decltype(x_view)::Scalar, typename decltype(out_view)::Scalar> &&
            std::tuple_size_v<typename decltype(x_view)::Dims> ==
                std::tuple_size_v<typename decltype(out_view)::Dims>,
        "RotaryEmbedding::apply: x and out need the same element type and rank");
    if (x_view.dimensions() != out_view.dimensions()) {
      detail::throw_invalid_argument(
          "RotaryEmbedding::apply: out has shape ", detail::shape_string(out_view.dimensions()),
          " but x has shape ", detail::shape_string(x_view.dimensions()));
    }
    // Check before writing anything into out.
    check_head_dim(x_view.dimensions());
    constexpr int kRank = static_cast<int>(std::tuple_size_v<typename decltype(x_view)::Dims>);
    check_range(start_pos, x_view.dimension(kRank - 2));
    if (x_view.stride(kRank - 1) != 1) {
      detail::throw_invalid_argument("RotaryEmbedding::apply: x needs a contiguous last dimension");
    }
    const Index width = x_view.dimension(kRank - 1);
    x_view.for_each_row_index(
        [&](const auto& idx) { std::copy_n(x_view.row_at(idx), width, out_view.row_at(idx)); });
    apply(out_view, start_pos);
  }

 private:
  template <typename Dims>
  void check_head_dim(const Dims& dims) const {
    static_assert(std::tuple_size_v<Dims> >= 2, "RotaryEmbedding::apply: x must be (..., S, D)");
    if (dims[dims.size() - 1] != head_dim_) {
      detail::throw_invalid_argument("RotaryEmbedding::apply: x has shape ",
                                     detail::shape_string(dims), ", expected head_dim ", head_dim_,
                                     " in the last dimension");
    }
  }

  void check_range(Index start_pos, Index length) const {
    if (start_pos < 0 || length < 0 || start_pos + length > cos_.dimension(0)) {
      detail::throw_invalid_argument("RotaryEmbedding: positions [", start_pos, ", ",
                                     start_pos + length, ") exceed the table of max_seq_len ",
                                     cos_.dimension(0));
    }
  }

  Index head_dim_;
  double theta_;
  RopeStyle style_;
  Tensor<T, 2> cos_;
  Tensor<T, 2> sin_;
};

}  // namespace attnforge
