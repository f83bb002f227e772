// RMSNorm (KempnerForge's norm.py, Llama style): y = x / sqrt(mean(x^2) + eps) * weight
// over the last dimension. The Attention module's QK-norm is this function.
#pragma once

#include <cmath>
#include <utility>

#include "attnforge/parameter.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge {

namespace detail {

inline void check_norm_eps(const char* where, double eps) {
  if (!(eps > 0.0) || !std::isfinite(eps)) {
    throw_invalid_argument(where, ": eps must be positive and finite, got ", eps);
  }
}

// Normalises every innermost row of x in place. The mean, the inverse root and the
// products are taken in acc_t<T> (float for bf16/fp16, as norm.py's x.float()), and each
// output is rounded to T once.
template <typename T, int Rank, typename W>
void rms_norm_rows(const StridedView<T, Rank>& x, const W* weight, double eps) {
  using Acc = acc_t<T>;
  const Index width = x.dimension(Rank - 1);
  x.for_each_row([&](T* row) {
    Acc sum_sq = 0;
    for (Index d = 0; d < width; ++d) sum_sq += static_cast<Acc>(row[d]) * static_cast<Acc>(row[d]);
    const Acc inv_rms =
        Acc(1) / std::sqrt(sum_sq / static_cast<Acc>(width) + static_cast<Acc>(eps));
    for (Index d = 0; d < width; ++d) {
      row[d] = static_cast<T>(static_cast<Acc>(row[d]) * inv_rms * static_cast<Acc>(weight[d]));
    }
  });
}

// Checks x (..., D) against weight (D); nothing is written before this passes.
template <typename T, int Rank>
void check_rms_norm(const char* where, const StridedView<T, Rank>& x,
                    const ConstView<std::remove_const_t<T>, 1>& weight, double eps) {
  static_assert(Rank >= 1, "rms_norm: x needs at least one dimension");
  check_norm_eps(where, eps);
  check_shape(where, "weight", weight, {-1}, "(D)");
  typename StridedView<T, Rank>::Dims expected;
  expected.fill(-1);
  expected[Rank - 1] = weight.dimension(0);
  check_shape(where, "x", x, expected, "(..., D) with D = weight's size");
}

}  // namespace detail

// Returns rms_norm of x (..., D) with weight (D): a Tensor of x's shape and type. x and
// weight may be Tensors, TensorMaps or views.
template <typename X, typename W,
          typename = std::enable_if_t<view_traits<X>::valid && view_traits<W>::rank == 1>>
Tensor<typename view_traits<X>::scalar, view_traits<X>::rank> rms_norm(const X& x, const W& weight,
                                                                       double eps = 1e-5) {
  using T = typename view_traits<X>::scalar;
  static_assert(std::is_same_v<typename view_traits<W>::scalar, T>,
                "rms_norm: weight must have x's element type");
  const auto x_view = as_const_view(x);
  const auto w_view = as_const_view(weight);
  detail::check_rms_norm("rms_norm", x_view, w_view, eps);
  auto out = x_view.to_tensor();
  detail::rms_norm_rows(StridedView<T, view_traits<X>::rank>(out), w_view.data(), eps);
  return out;
}

// The module: owns its weight (dim), initialised to ones as in norm.py.
template <typename T>
class RMSNorm {
 public:
  explicit RMSNorm(Index dim, double eps = 1e-5) : weight_(checked_dim(dim)), eps_(eps) {
    detail::check_norm_eps("RMSNorm", eps);
    weight_.setConstant(T(1));
  }

  Index dim() const { return weight_.dimension(0); }
  double eps() const { return eps_; }
  // The weight, for loading a state dict (a shape-checked reference, see ParameterRef).
  ParameterRef<T, 1> weight() & { return {weight_, "RMSNorm::weight", "(dim)"}; }
  const Tensor<T, 1>& weight() const& { return weight_; }
  void weight() && = delete;  // a reference into a temporary module would dangle

  // x (..., dim) -> normalised copy of the same shape.
  template <typename X, typename = std::enable_if_t<view_traits<X>::valid>>
  Tensor<T, view_traits<X>::rank> forward(const X& x) const {
    return rms_norm(x, weight_, eps_);
  }
  // Normalises x (..., dim) in place (a Tensor, a TensorMap or a mutable view).
  template <typename X, typename = mutable_view_of_t<X>>
  void forward_inplace(X&& x) const {
    static_assert(std::is_lvalue_reference_v<X> || !detail::is_owning_tensor_v<std::decay_t<X>>,
                  "RMSNorm::forward_inplace: a temporary Tensor would be normalised and discarded");
    const auto view = as_mutable_view(x);
    detail::check_rms_norm("RMSNorm::forward_inplace", view, ConstView<T, 1>(weight_), eps_);
    detail::rms_norm_rows(view, weight_.data(), eps_);
  }

 private:
  static Index checked_dim(Index dim) {
    if (dim <= 0) detail::throw_invalid_argument("RMSNorm: dim must be positive, got ", dim);
    return dim;
  }

  Tensor<T, 1> weight_;
  double eps_;
};

}  // namespace attnforge
