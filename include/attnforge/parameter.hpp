// ParameterRef: how a module hands out one of its weight tensors for loading. The shape
// is the module's, so assigning through the reference is a checked copy: a transposed or
// mis-sized state-dict entry is an exception naming the weight and both shapes, never a
// later out-of-bounds read.
#pragma once

#include <array>
#include <utility>

#include "attnforge/tensor.hpp"

namespace attnforge {

template <typename T, int Rank>
class ParameterRef {
 public:
  using Scalar = T;
  using Dims = std::array<Index, Rank>;

  // `name` names the weight in messages (e.g. "Attention::wq"), `layout` is its symbolic
  // shape (e.g. "(n_heads * head_dim, dim)"); both must be string literals.
  ParameterRef(Tensor<T, Rank>& value, const char* name, const char* layout)
      : value_(&value), name_(name), layout_(layout) {}

  // Copies `source` (a Tensor, TensorMap or view of T) into the weight. Throws
  // std::invalid_argument, leaving the weight unchanged, when the shapes differ.
  template <typename X,
            typename = std::enable_if_t<view_traits<X>::rank == Rank &&
                                        std::is_same_v<typename view_traits<X>::scalar, T>>>
  const ParameterRef& operator=(const X& source) const {
    const ConstView<T, Rank> view = as_const_view(source);
    check(view.dimensions());
    if (view.data() == value_->data()) return *this;
    T* dst = value_->data();
    view.for_each_row([&](const T* row) {
      for (Index d = 0; d < view.dimension(Rank - 1); ++d) *dst++ = row[d];
    });
    return *this;
  }

  // Assigns an Eigen tensor expression (e.g. `attn.wq() = attn.wq().tensor() * 2.0f`),
  // evaluated first so that its shape is checked before anything is written.
  template <typename Derived>
  const ParameterRef& operator=(
      const Eigen::TensorBase<Derived, Eigen::ReadOnlyAccessors>& expression) const {
    Tensor<T, Rank> value = expression;
    return *this = value;
  }

  // Between two references: copies the contents (checked), as the weights' own
  // assignment would; it never rebinds.
  const ParameterRef& operator=(const ParameterRef& other) const { return *this = other.tensor(); }
  ParameterRef(const ParameterRef&) = default;

  const Tensor<T, Rank>& tensor() const { return *value_; }
  operator ConstView<T, Rank>() const { return ConstView<T, Rank>(*value_); }  // NOLINT

  // Element access and filling keep the shape, so they stay open.
  T* data() const { return value_->data(); }
  Index size() const { return value_->size(); }
  Index dimension(int i) const { return value_->dimension(i); }
  Dims dimensions() const {
    Dims dims{};
    for (int i = 0; i < Rank; ++i) dims[static_cast<std::size_t>(i)] = value_->dimension(i);
    return dims;
  }
  template <typename... Ix>
  T& operator()(Ix... ix) const {
    return (*value_)(ix...);
  }
  void setZero() const { value_->setZero(); }
  void setConstant(const T& value) const { value_->setConstant(value); }

 private:
  void check(const Dims& dims) const {
    if (dims != dimensions()) {
      detail::throw_invalid_argument(name_, " has shape ", detail::shape_string(dimensions()),
                                     " = ", layout_, "; cannot assign a tensor of shape ",
                                     detail::shape_string(dims));
    }
  }

  Tensor<T, Rank>* value_;
  const char* name_;
  const char* layout_;
};

// A ParameterRef is accepted wherever a read-only tensor argument is.
template <typename T, int Rank>
ConstView<T, Rank> as_const_view(const ParameterRef<T, Rank>& p) {
  return p;
}

}  // namespace attnforge
