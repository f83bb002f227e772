// Tensor vocabulary of attnforge: Eigen tensor aliases (always RowMajor, PyTorch's
// order), a non-owning strided view that every entry point accepts, the accumulator
// type per element type, and the helpers that build validation messages.
#pragma once

#include <array>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "attnforge/detail/eigen.hpp"

namespace attnforge {

using Index = Eigen::Index;
// Document ids are int64 so a PyTorch LongTensor maps onto them without a copy.
using DocId = std::int64_t;

template <typename T, int Rank>
using Tensor = Eigen::Tensor<T, Rank, Eigen::RowMajor, Index>;
template <typename T, int Rank>
using TensorMap = Eigen::TensorMap<Eigen::Tensor<T, Rank, Eigen::RowMajor, Index>>;
template <typename T, int Rank>
using ConstTensorMap = Eigen::TensorMap<const Eigen::Tensor<T, Rank, Eigen::RowMajor, Index>>;

// Scores, softmax statistics and output accumulators use at least float, and double
// for double tensors (docs/design.md, "Precision").
template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<std::remove_const_t<T>>::type;

// The element of a quantized KV cache (qint8.hpp).
enum class QInt8 : std::int8_t;

namespace detail {
template <typename T>
inline constexpr bool is_qint8_v = std::is_same_v<std::remove_const_t<T>, QInt8>;

// QInt8 bytes are a cache's tiles of kQInt8Tile positions (qint8.hpp), read a whole tile
// at a time, so a QInt8 view is made only by a cache (with this tag), and narrowed in
// positions only at a tile: a view of other bytes would be read past its end.
struct QInt8Tiles {};
inline constexpr Index kQInt8Tile = 16;

// bf16 and fp16: storage types that compute in float.
template <typename T>
inline constexpr bool is_16bit_float_v =
    std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>;
}  // namespace detail

// A non-owning view of a row-major tensor whose innermost dimension is contiguous and
// whose outer dimensions may have any stride. It is what lets the library read a
// KVCache prefix, a (B, S, H, D) projection seen as (B, H, S, D), or an engine's own
// buffer without copying. `T` may be const. A default-constructed view is "absent"
// (used for optional inputs such as masks).
template <typename T, int Rank>
class StridedView {
  static_assert(Rank >= 1, "StridedView needs at least one dimension");

 public:
  using Scalar = std::remove_const_t<T>;
  using Dims = std::array<Index, Rank>;

  StridedView() = default;

  template <typename U = Scalar, typename = std::enable_if_t<!detail::is_qint8_v<U>>>
  StridedView(T* data, const Dims& dims, const Dims& strides)
      : data_(data), dims_(dims), strides_(strides) {}

  template <typename U = Scalar, typename = std::enable_if_t<!detail::is_qint8_v<U>>>
  StridedView(T* data, const Dims& dims) : data_(data), dims_(dims), strides_(row_major(dims)) {}

  // A cache's view of its QInt8 tiles (see detail::QInt8Tiles).
  template <typename U = Scalar, typename = std::enable_if_t<detail::is_qint8_v<U>>>
  StridedView(detail::QInt8Tiles, T* data, const Dims& dims, const Dims& strides)
      : data_(data), dims_(dims), strides_(strides) {}

  // Implicit from Eigen tensors and maps (RowMajor only: a ColMajor tensor does not
  // convert, so a layout mistake is a compile error rather than wrong numbers).
  template <typename U,
            typename = std::enable_if_t<std::is_convertible_v<U*, T*> && !detail::is_qint8_v<U>>>
  StridedView(Eigen::Tensor<U, Rank, Eigen::RowMajor, Index>& t)  // NOLINT(runtime/explicit)
      : StridedView(t.data(), to_dims(t.dimensions())) {}

  template <typename U, typename = std::enable_if_t<
                            std::is_const_v<T> && std::is_same_v<std::remove_const_t<U>, Scalar> &&
                            !detail::is_qint8_v<U>>>
  StridedView(const Eigen::Tensor<U, Rank, Eigen::RowMajor, Index>& t)  // NOLINT(runtime/explicit)
      : StridedView(t.data(), to_dims(t.dimensions())) {}

  // A view of a temporary tensor would dangle as soon as the statement ends (e.g.
  // `masks.doc_ids = make_ids();`), so binding one is a compile error: keep the tensor
  // in a named variable that outlives the view.
  template <typename U>
  StridedView(const Eigen::Tensor<U, Rank, Eigen::RowMajor, Index>&& t) = delete;

  template <typename PlainT,
            typename = std::enable_if_t<
                PlainT::NumIndices == Rank&& static_cast<int>(PlainT::Layout) ==
                    static_cast<int>(Eigen::RowMajor) &&
                std::is_convertible_v<decltype(std::declval<Eigen::TensorMap<PlainT>&>().data()),
                                      T*> &&
                !detail::is_qint8_v<Scalar>>>
  StridedView(const Eigen::TensorMap<PlainT>& m)  // NOLINT(runtime/explicit)
      : StridedView(m.data(), to_dims(m.dimensions())) {}

  // Mutable view -> const view.
  template <typename U, typename = std::enable_if_t<std::is_const_v<T> &&
                                                    std::is_same_v<U, std::remove_const_t<T>>>>
  StridedView(const StridedView<U, Rank>& other)  // NOLINT(runtime/explicit)
      : data_(other.data()), dims_(other.dimensions()), strides_(other.strides()) {}

  T* data() const { return data_; }
  const Dims& dimensions() const { return dims_; }
  const Dims& strides() const { return strides_; }
  Index dimension(int i) const { return dims_[static_cast<std::size_t>(i)]; }
  Index stride(int i) const { return strides_[static_cast<std::size_t>(i)]; }
  bool has_value() const { return data_ != nullptr; }
  Index size() const {
    Index n = 1;
    for (Index d : dims_) n *= d;
    return n;
  }
  bool is_contiguous() const { return strides_ == row_major(dims_); }

  template <typename... Ix>
  T& operator()(Ix... ix) const {
    static_assert(sizeof...(Ix) == Rank, "wrong number of indices");
    const std::array<Index, Rank> idx{static_cast<Index>(ix)...};
    Index off = 0;
    for (int i = 0; i < Rank; ++i) off += idx[i] * strides_[i];
    return data_[off];
  }

  // Pointer to the innermost row at the given outer index (Rank - 1 indices).
  template <typename... Ix>
  T* row(Ix... ix) const {
    static_assert(sizeof...(Ix) == Rank - 1, "row() takes all but the last index");
    const std::array<Index, Rank - 1> idx{static_cast<Index>(ix)...};
    Index off = 0;
    for (int i = 0; i < Rank - 1; ++i) off += idx[i] * strides_[i];
    return data_ + off;
  }

  // Sub-range [start, start + length) of dimension `dim`, as torch.narrow.
  StridedView narrow(int dim, Index start, Index length) const {
    if (detail::is_qint8_v<T> && dim == Rank - 2 && start % detail::kQInt8Tile != 0) {
      std::ostringstream os;
      os << "StridedView::narrow: a QInt8 view narrows its positions (dimension " << dim
         << ") only from a multiple of " << detail::kQInt8Tile << ", got start " << start;
      throw std::invalid_argument(os.str());
    }
    StridedView out = *this;
    out.data_ = data_ + start * strides_[dim];
    out.dims_[dim] = length;
    return out;
  }

  // The same memory with two dimensions exchanged (no copy), as torch.transpose.
  StridedView transpose(int a, int b) const {
    StridedView out = *this;
    std::swap(out.dims_[a], out.dims_[b]);
    std::swap(out.strides_[a], out.strides_[b]);
    return out;
  }

  // Copies the viewed elements into a new contiguous tensor.
  Tensor<Scalar, Rank> to_tensor() const {
    Tensor<Scalar, Rank> out(dims_);
    Scalar* dst = out.data();
    for_each_row([&](T* src) {
      for (Index d = 0; d < dims_[Rank - 1]; ++d) *dst++ = src[d];
    });
    return out;
  }

  using OuterIndex = std::array<Index, Rank - 1>;

  // Pointer to the innermost row at an outer index.
  T* row_at(const OuterIndex& idx) const {
    Index off = 0;
    for (int i = 0; i < Rank - 1; ++i) off += idx[i] * strides_[i];
    return data_ + off;
  }

  // Calls f(outer_index) for every innermost row, in row-major order.
  template <typename F>
  void for_each_row_index(F&& f) const {
    if (size() == 0) return;
    OuterIndex idx{};
    for (;;) {
      f(static_cast<const OuterIndex&>(idx));
      int i = Rank - 2;
      for (; i >= 0; --i) {
        if (++idx[i] < dims_[i]) break;
        idx[i] = 0;
      }
      if (i < 0) return;
    }
  }

  // Calls f(row_pointer) for every innermost row, in row-major order.
  template <typename F>
  void for_each_row(F&& f) const {
    for_each_row_index([&](const OuterIndex& idx) { f(row_at(idx)); });
  }

  static Dims row_major(const Dims& dims) {
    Dims s{};
    Index acc = 1;
    for (int i = Rank - 1; i >= 0; --i) {
      s[i] = acc;
      acc *= dims[i];
    }
    return s;
  }

 private:
  template <typename EigenDims>
  static Dims to_dims(const EigenDims& d) {
    Dims out{};
    for (int i = 0; i < Rank; ++i) out[i] = static_cast<Index>(d[i]);
    return out;
  }

  T* data_ = nullptr;
  Dims dims_{};
  Dims strides_{};
};

template <typename T, int Rank>
using ConstView = StridedView<const T, Rank>;

namespace detail {
// A cache's view of its own storage: for QInt8, of its tiles (QInt8Tiles).
template <typename T, int Rank>
StridedView<T, Rank> cache_view(T* data, const std::array<Index, Rank>& dims,
                                const std::array<Index, Rank>& strides) {
  if constexpr (is_qint8_v<T>) {
    return StridedView<T, Rank>(QInt8Tiles{}, data, dims, strides);
  } else {
    return StridedView<T, Rank>(data, dims, strides);
  }
}
}  // namespace detail

// Turns any accepted tensor argument (Tensor, TensorMap, StridedView) into a const view,
// so the free functions can deduce the element type from their arguments.
template <typename T, int Rank>
ConstView<T, Rank> as_const_view(const Eigen::Tensor<T, Rank, Eigen::RowMajor, Index>& t) {
  return ConstView<T, Rank>(t);
}
// A view of a temporary would dangle (see StridedView).
template <typename T, int Rank>
ConstView<T, Rank> as_const_view(const Eigen::Tensor<T, Rank, Eigen::RowMajor, Index>&& t) = delete;
template <typename PlainT, typename = std::enable_if_t<static_cast<int>(PlainT::Layout) ==
                                                       static_cast<int>(Eigen::RowMajor)>>
ConstView<std::remove_const_t<typename PlainT::Scalar>, PlainT::NumIndices> as_const_view(
    const Eigen::TensorMap<PlainT>& m) {
  return ConstView<std::remove_const_t<typename PlainT::Scalar>, PlainT::NumIndices>(m);
}
template <typename T, int Rank>
ConstView<std::remove_const_t<T>, Rank> as_const_view(const StridedView<T, Rank>& v) {
  return v;
}

template <typename X>
using view_of_t = decltype(as_const_view(std::declval<const X&>()));

// Whether X is an accepted tensor argument, and its view type when it is; usable in
// SFINAE (a ColMajor tensor or a non-tensor just makes `valid` false).
template <typename X, typename = void>
struct view_traits {
  static constexpr bool valid = false;
  static constexpr int rank = -1;
};
template <typename X>
struct view_traits<X, std::void_t<view_of_t<X>>> {
  using view = view_of_t<X>;
  using scalar = typename view::Scalar;
  static constexpr bool valid = true;
  static constexpr int rank = static_cast<int>(std::tuple_size_v<typename view::Dims>);
};

// Turns a writable tensor argument (a Tensor lvalue, a TensorMap over non-const memory, a
// mutable StridedView) into a mutable view, for the functions that work in place. A
// temporary Tensor does not convert: writing into it in place would be lost.
template <typename T, int Rank>
StridedView<T, Rank> as_mutable_view(Eigen::Tensor<T, Rank, Eigen::RowMajor, Index>& t) {
  return StridedView<T, Rank>(t);
}
template <typename PlainT, typename = std::enable_if_t<static_cast<int>(PlainT::Layout) ==
                                                           static_cast<int>(Eigen::RowMajor) &&
                                                       !std::is_const_v<PlainT>>>
StridedView<typename PlainT::Scalar, PlainT::NumIndices> as_mutable_view(
    const Eigen::TensorMap<PlainT>& m) {
  return StridedView<typename PlainT::Scalar, PlainT::NumIndices>(m.data(), [&] {
    typename StridedView<typename PlainT::Scalar, PlainT::NumIndices>::Dims dims{};
    for (int i = 0; i < PlainT::NumIndices; ++i) dims[i] = static_cast<Index>(m.dimension(i));
    return dims;
  }());
}
template <typename T, int Rank, typename = std::enable_if_t<!std::is_const_v<T>>>
StridedView<T, Rank> as_mutable_view(const StridedView<T, Rank>& v) {
  return v;
}

template <typename X>
using mutable_view_of_t = decltype(as_mutable_view(std::declval<X&>()));

namespace detail {
template <typename X>
inline constexpr bool is_owning_tensor_v = false;
template <typename S, int R, int O, typename I>
inline constexpr bool is_owning_tensor_v<Eigen::Tensor<S, R, O, I>> = true;
}  // namespace detail

// A read-only view of per-token data that a caller may hold in either of two element
// types (document ids as int64 or int32, masks as bool or uint8), read in place: engines
// keep whichever their framework produced, and converting would cost a copy per call.
// It accepts the same arguments as ConstView (Tensors, TensorMaps, views) of A or B;
// default-constructed it is absent.
template <typename A, typename B, int Rank>
class EitherView {
 public:
  using Dims = std::array<Index, Rank>;

  EitherView() = default;
  template <typename X,
            typename = std::enable_if_t<view_traits<X>::rank == Rank &&
                                        (std::is_same_v<typename view_traits<X>::scalar, A> ||
                                         std::is_same_v<typename view_traits<X>::scalar, B>)>>
  EitherView(const X& x) {  // NOLINT(runtime/explicit)
    if constexpr (std::is_same_v<typename view_traits<X>::scalar, A>) {
      a_ = as_const_view(x);
    } else {
      b_ = as_const_view(x);
    }
  }
  // A view of a temporary would dangle (see StridedView).
  template <typename X, typename = std::enable_if_t<detail::is_owning_tensor_v<X>>>
  EitherView(const X&& x) = delete;

  bool has_value() const { return a_.has_value() || b_.has_value(); }
  const Dims& dimensions() const { return b_.has_value() ? b_.dimensions() : a_.dimensions(); }
  Index dimension(int i) const { return dimensions()[static_cast<std::size_t>(i)]; }
  Index size() const { return b_.has_value() ? b_.size() : a_.size(); }

  // f(view) with the view of the type actually held (f is called with the A view when
  // the whole thing is absent).
  template <typename F>
  decltype(auto) visit(F&& f) const {
    return b_.has_value() ? f(b_) : f(a_);
  }

 private:
  ConstView<A, Rank> a_;
  ConstView<B, Rank> b_;
};

namespace detail {

template <typename Dims>
std::string shape_string(const Dims& dims) {
  std::ostringstream os;
  os << '(';
  for (std::size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  os << ')';
  return os.str();
}

template <typename... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

// Checks that `view` has the expected sizes; -1 in `expected` accepts any size.
// `where` is the entry point, `name` the argument, `layout` its symbolic shape.
template <typename T, int Rank>
void check_shape(const char* where, const char* name, const StridedView<T, Rank>& view,
                 const typename StridedView<T, Rank>::Dims& expected, const char* layout) {
  if (!view.has_value() && view.size() != 0) {
    throw_invalid_argument(where, ": ", name, " is missing (expected ", layout, ")");
  }
  for (int i = 0; i < Rank; ++i) {
    if (expected[i] >= 0 && view.dimension(i) != expected[i]) {
      throw_invalid_argument(where, ": ", name, " has shape ", shape_string(view.dimensions()),
                             ", expected ", layout, " = ", shape_string(expected),
                             " (-1: any size)");
    }
  }
  if (view.stride(Rank - 1) != 1) {
    throw_invalid_argument(where, ": ", name, " must have a contiguous last dimension, got stride ",
                           view.stride(Rank - 1));
  }
}

// The same check for data held as either of two types.
template <typename A, typename B, int Rank>
void check_shape(const char* where, const char* name, const EitherView<A, B, Rank>& view,
                 const std::array<Index, Rank>& expected, const char* layout) {
  view.visit([&](const auto& v) { check_shape(where, name, v, expected, layout); });
}

}  // namespace detail
}  // namespace attnforge
