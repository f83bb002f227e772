// y = x W^T for weights in torch.nn.Linear layout (out_features, in_features), split over
// the caller's pool in fixed column chunks: Eigen's matrix products for many rows of x,
// and a streaming product of our own for the few rows of a decode step.
#pragma once

#include <algorithm>
#include <type_traits>

#include "attnforge/detail/eigen.hpp"
#include "attnforge/detail/parallel.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// Output features per work item. Fixed, so every chunk is the same product whatever the
// thread count and the result is bit-identical across pool sizes.
inline constexpr Index kLinearChunk = 256;

// From 2 up to this many rows of x (a decode step's batch) take the streaming product: it
// reads each weight row from memory once and dots it with every row of x from cache. A
// decode step is bound by reading the weights, and Eigen's matrix product copies (packs)
// each chunk of them first, which for a handful of rows triples the weights' traffic.
// One row stays with Eigen's matrix-vector product, which streams the weights already
// and does so slightly faster.
inline constexpr Index kStreamingLinearRows = 16;

// Weight rows a streaming step holds, and the rows of x it dots them with: their product
// in accumulators plus the operands fit the register file.
inline constexpr int kStreamingOutputs = 4;
inline constexpr int kStreamingRows = simd::kRegisters >= 32 ? 4 : 2;

template <typename T>
inline constexpr bool kHasStreamingLinear = std::is_same_v<T, float> || std::is_same_v<T, double>;

// y[r][o] = x_r . w_o for O weight rows (w, row stride ldw) and R rows of x (x, row
// stride ldx), over n features; y has row stride ldy. `ahead` steps once per packet.
template <typename T, int O, int R>
EIGEN_ALWAYS_INLINE void streaming_dots(const T* x, Index ldx, const T* w, Index ldw, Index n, T* y,
                                        Index ldy, simd::LineStream& ahead) {
  using Packet = simd::Packet<T>;
  constexpr int kP = simd::kWidth<T>;
  Packet acc[O][R];
  ATTNFORGE_UNROLL
  for (int o = 0; o < O; ++o) {
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) acc[o][r] = simd::zero<Packet>();
  }
  Index d = 0;
  for (; d + kP <= n; d += kP) {
    ahead.step();
    Packet xv[R];
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) xv[r] = simd::load<Packet>(x + r * ldx + d);
    ATTNFORGE_UNROLL
    for (int o = 0; o < O; ++o) {
      const Packet wv = simd::load<Packet>(w + o * ldw + d);
      ATTNFORGE_UNROLL
      for (int r = 0; r < R; ++r) acc[o][r] = simd::fma(wv, xv[r], acc[o][r]);
    }
  }
  for (int o = 0; o < O; ++o) {
    for (int r = 0; r < R; ++r) {
      T sum = simd::sum(acc[o][r]);
      for (Index e = d; e < n; ++e) sum += w[o * ldw + e] * x[r * ldx + e];
      y[r * ldy + o] = sum;
    }
  }
}

// The rows of x in blocks of R, then R / 2, ... 1, against O weight rows.
template <typename T, int O, int R>
EIGEN_ALWAYS_INLINE void streaming_row_blocks(const T* x, Index n_rows, Index ldx, const T* w,
                                              Index ldw, Index n, T* y, Index ldy,
                                              simd::LineStream& ahead, Index first = 0) {
  for (; first + R <= n_rows; first += R)
    streaming_dots<T, O, R>(x + first * ldx, ldx, w, ldw, n, y + first * ldy, ldy, ahead);
  if constexpr (R > 1)
    streaming_row_blocks<T, O, R / 2>(x, n_rows, ldx, w, ldw, n, y, ldy, ahead, first);
}

// One chunk of `width` outputs of the streaming product: kStreamingOutputs weight rows at
// a time (they stay in L2 while every row block of x passes over them), then the rest one
// by one. While it works on some weight rows it asks for the next ones: the row blocks
// after the first read only from cache, and without the requests memory would idle
// through them.
template <typename T>
void streaming_linear_chunk(const T* x, Index n_rows, Index in_features, Index ldx, const T* w,
                            Index width, Index ldw, T* y, Index ldy) {
  const Index steps = (n_rows + kStreamingRows - 1) / kStreamingRows *
                      std::max<Index>(1, in_features / simd::kWidth<T>);
  const auto next_rows = [&](Index o, Index rows) {
    const Index n = std::min(rows, width - o);
    if (n <= 0) return simd::LineStream{};
    return simd::LineStream::over(w + o * ldw, ((n - 1) * ldw + in_features) * Index{sizeof(T)},
                                  steps, /*into_l2=*/true);
  };
  Index o = 0;
  for (; o + kStreamingOutputs <= width; o += kStreamingOutputs) {
    simd::LineStream ahead = next_rows(o + kStreamingOutputs, kStreamingOutputs);
    streaming_row_blocks<T, kStreamingOutputs, kStreamingRows>(x, n_rows, ldx, w + o * ldw, ldw,
                                                               in_features, y + o, ldy, ahead);
  }
  for (; o < width; ++o) {
    simd::LineStream ahead = next_rows(o + 1, 1);
    streaming_row_blocks<T, 1, kStreamingRows>(x, n_rows, ldx, w + o * ldw, ldw, in_features, y + o,
                                               ldy, ahead);
  }
}

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
    if constexpr (kHasStreamingLinear<T>) {
      if (n_rows > 1 && n_rows <= kStreamingLinearRows) {
        streaming_linear_chunk(x, n_rows, in_features, ldx, w + first * ldw, width, ldw, y + first,
                               ldy);
        return;
      }
    }
    const ConstMap x_rows(x, n_rows, in_features, Eigen::OuterStride<>(ldx));
    const ConstMap w_rows(w + first * ldw, width, in_features, Eigen::OuterStride<>(ldw));
    MutableMap y_cols(y + first, n_rows, width, Eigen::OuterStride<>(ldy));
    y_cols.noalias() = x_rows * w_rows.transpose();
  });
}

}  // namespace attnforge::detail
