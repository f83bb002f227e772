// y = x W^T for weights in torch.nn.Linear layout (out_features, in_features), on
// Eigen's matrix products, split over the caller's pool in fixed column chunks.
#pragma once

#include "attnforge/detail/eigen.hpp"
#include "attnforge/detail/parallel.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// Output features per work item. Fixed, so every chunk is the same Eigen product
// whatever the thread count and the result is bit-identical across pool sizes.
inline constexpr Index kLinearChunk = 256;

// x: n_rows rows of in_features, row stride ldx. w: (out_features, in_features), row
// stride ldw. y: n_rows rows of out_features, row stride ldy.
template <typename T>
void linear(const T* x, Index n_rows, Index in_features, Index ldx, const T* w, Index out_features,
            Index ldw, T* y, Index ldy, const Eigen::ThreadPoolDevice* device) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstMap = Eigen::Map<const Matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  using MutableMap = Eigen::Map<Matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  const Index n_chunks = (out_features + kLinearChunk - 1) / kLinearChunk;
  parallel_for_items(device, n_chunks, [&](int /*worker*/, Index chunk) {
    const Index first = chunk * kLinearChunk;
    const Index width = std::min(kLinearChunk, out_features - first);
    const ConstMap x_rows(x, n_rows, in_features, Eigen::OuterStride<>(ldx));
    const ConstMap w_rows(w + first * ldw, width, in_features, Eigen::OuterStride<>(ldw));
    MutableMap y_cols(y + first, n_rows, width, Eigen::OuterStride<>(ldy));
    y_cols.noalias() = x_rows * w_rows.transpose();
  });
}

}  // namespace attnforge::detail
