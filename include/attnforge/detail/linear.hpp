// y = x W^T for weights in torch.nn.Linear layout (out_features, in_features), split over
// the caller's pool in fixed column chunks: Eigen's matrix products for many rows of x,
// and a streaming product of our own for the few rows of a decode step. bf16 and fp16
// operands are multiplied in float (widened_linear).
#pragma once

#include <algorithm>
#include <type_traits>
#include <vector>

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
// 16-bit operands, which the products take widened to float: Eigen's own products of bf16
// and fp16 round every partial sum to 16 bits and run many times slower than float (under
// GCC with Eigen 3.4, each fp16 operation converts in software).
template <typename T>
inline constexpr bool kWidenedLinear =
    std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>;

// y[r][o] = x_r . w_o for O weight rows (w, row stride ldw; stored as W, read as C) and R
// rows of x (x, row stride ldx), over n features; y has row stride ldy. `ahead` steps once
// per packet.
template <typename W, int O, int R, typename C = acc_t<W>>
EIGEN_ALWAYS_INLINE void streaming_dots(const C* x, Index ldx, const W* w, Index ldw, Index n, C* y,
                                        Index ldy, simd::LineStream& ahead) {
  using Packet = simd::Packet<C>;
  constexpr int kP = simd::kWidth<C>;
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
      const Packet wv = simd::load_as<Packet>(w + o * ldw + d);
      ATTNFORGE_UNROLL
      for (int r = 0; r < R; ++r) acc[o][r] = simd::fma(wv, xv[r], acc[o][r]);
    }
  }
  for (int o = 0; o < O; ++o) {
    for (int r = 0; r < R; ++r) {
      C sum = simd::sum(acc[o][r]);
      for (Index e = d; e < n; ++e) sum += static_cast<C>(w[o * ldw + e]) * x[r * ldx + e];
      y[r * ldy + o] = sum;
    }
  }
}

// The rows of x in blocks of R, then R / 2, ... 1, against O weight rows.
template <typename W, int O, int R, typename C = acc_t<W>>
EIGEN_ALWAYS_INLINE void streaming_row_blocks(const C* x, Index n_rows, Index ldx, const W* w,
                                              Index ldw, Index n, C* y, Index ldy,
                                              simd::LineStream& ahead, Index first = 0) {
  for (; first + R <= n_rows; first += R)
    streaming_dots<W, O, R>(x + first * ldx, ldx, w, ldw, n, y + first * ldy, ldy, ahead);
  if constexpr (R > 1)
    streaming_row_blocks<W, O, R / 2>(x, n_rows, ldx, w, ldw, n, y, ldy, ahead, first);
}

// One chunk of `width` outputs of the streaming product: kStreamingOutputs weight rows at
// a time (they stay in L2 while every row block of x passes over them), then the rest one
// by one. With more than one row block it asks for the next weight rows while it works on
// some: the row blocks after the first read only from cache, and without the requests
// memory would idle through them. With one row block every weight load streams from
// memory, which the hardware prefetchers follow faster without the requests.
template <typename W, typename C = acc_t<W>>
void streaming_linear_chunk(const C* x, Index n_rows, Index in_features, Index ldx, const W* w,
                            Index width, Index ldw, C* y, Index ldy) {
  const Index steps = (n_rows + kStreamingRows - 1) / kStreamingRows *
                      std::max<Index>(1, in_features / simd::kWidth<C>);
  const bool one_row_block = n_rows <= kStreamingRows;
  const auto next_rows = [&](Index o, Index rows) {
    const Index n = std::min(rows, width - o);
    if (n <= 0 || one_row_block) return simd::LineStream{};
    return simd::LineStream::over(w + o * ldw, ((n - 1) * ldw + in_features) * Index{sizeof(W)},
                                  steps, /*into_l2=*/true);
  };
  Index o = 0;
  for (; o + kStreamingOutputs <= width; o += kStreamingOutputs) {
    simd::LineStream ahead = next_rows(o + kStreamingOutputs, kStreamingOutputs);
    streaming_row_blocks<W, kStreamingOutputs, kStreamingRows>(x, n_rows, ldx, w + o * ldw, ldw,
                                                               in_features, y + o, ldy, ahead);
  }
  for (; o < width; ++o) {
    simd::LineStream ahead = next_rows(o + 1, 1);
    streaming_row_blocks<W, 1, kStreamingRows>(x, n_rows, ldx, w + o * ldw, ldw, in_features, y + o,
                                               ldy, ahead);
  }
}

// linear() over bf16 or fp16 operands, in float: x widened once, then per chunk of
// outputs either the streaming product reading the 16-bit weights as they are (up to
// kStreamingLinearRows rows) or the chunk's weights widened into the worker's buffer for
// Eigen's float product; the float result rounded once into y. Each chunk is computed the
// same way whichever worker takes it.
template <typename T>
void widened_linear(const T* x, Index n_rows, Index in_features, Index ldx, const T* w,
                    Index out_features, Index ldw, T* y, Index ldy,
                    const Eigen::ThreadPoolDevice* device) {
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const auto size = [](Index n) { return static_cast<std::size_t>(n); };
  const bool streaming = n_rows <= kStreamingLinearRows;
  const Index n_chunks = (out_features + kLinearChunk - 1) / kLinearChunk;
  const auto workers = static_cast<std::size_t>(worker_count(device));
  std::vector<float> x_float(size(n_rows * in_features));
  for (Index r = 0; r < n_rows; ++r)
    convert(x + r * ldx, x_float.data() + r * in_features, in_features);
  std::vector<Matrix> y_chunk(workers), w_chunk(streaming ? 0 : workers);
  parallel_for_items(device, n_chunks, [&](int worker, Index chunk) {
    const Index first = chunk * kLinearChunk;
    const Index width = std::min(kLinearChunk, out_features - first);
    Matrix& y_float = y_chunk[static_cast<std::size_t>(worker)];
    y_float.resize(n_rows, width);
    if (streaming) {
      streaming_linear_chunk(x_float.data(), n_rows, in_features, in_features, w + first * ldw,
                             width, ldw, y_float.data(), width);
    } else {
      Matrix& w_float = w_chunk[static_cast<std::size_t>(worker)];
      w_float.resize(width, in_features);
      for (Index o = 0; o < width; ++o)
        convert(w + (first + o) * ldw, w_float.data() + o * in_features, in_features);
      const Eigen::Map<const Matrix> x_rows(x_float.data(), n_rows, in_features);
      y_float.noalias() = x_rows * w_float.transpose();
    }
    for (Index r = 0; r < n_rows; ++r)
      convert(y_float.data() + r * width, y + r * ldy + first, width);
  });
}

// linear() over float or double operands, in their own type.
template <typename T>
void native_linear(const T* x, Index n_rows, Index in_features, Index ldx, const T* w,
                   Index out_features, Index ldw, T* y, Index ldy,
                   const Eigen::ThreadPoolDevice* device) {
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

// x: n_rows rows of in_features, row stride ldx. w: (out_features, in_features), row
// stride ldw. y: n_rows rows of out_features, row stride ldy.
template <typename T>
void linear(const T* x, Index n_rows, Index in_features, Index ldx, const T* w, Index out_features,
            Index ldw, T* y, Index ldy, const Eigen::ThreadPoolDevice* device) {
  if constexpr (kWidenedLinear<T>) {
    widened_linear(x, n_rows, in_features, ldx, w, out_features, ldw, y, ldy, device);
  } else {
    native_linear(x, n_rows, in_features, ldx, w, out_features, ldw, y, ldy, device);
  }
}

}  // namespace attnforge::detail
