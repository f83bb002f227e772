// How the kernels read the K or V rows of one sequence of a PagedKVCache: positions map
// through the sequence's block table to blocks of the pool, inside which the rows of one
// KV head are contiguous. It answers the same questions as a (1, Hkv, Skv, D) view
// (dimension, row, stride), plus how many rows from a position on are contiguous, so a
// kernel never reads across a block boundary with a single stride.
#pragma once

#include <limits>

#include "attnforge/qint8.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

template <typename T>
class PagedRows {
 public:
  using Scalar = std::remove_const_t<T>;

  PagedRows() = default;
  // pool: (n_blocks, Hkv, block_size, stored row), row-major; table: the sequence's blocks
  // in order.
  PagedRows(T* pool, const Index* table, Index block_size, Index n_kv_heads, Index head_dim,
            Index seq_len)
      : pool_(pool),
        table_(table),
        block_size_(block_size),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        row_width_(stored_row_width<Scalar>(head_dim)),
        seq_len_(seq_len) {}

  // As a (1, Hkv, seq_len, D) tensor.
  Index dimension(int i) const {
    switch (i) {
      case 0:
        return 1;
      case 1:
        return n_kv_heads_;
      case 2:
        return seq_len_;
      default:
        return head_dim_;
    }
  }
  std::array<Index, 4> dimensions() const { return {1, n_kv_heads_, seq_len_, head_dim_}; }
  // Only the row stride inside a block is uniform; the kernels use no other.
  Index stride(int i) const { return i == 3 ? 1 : row_width_; }
  bool has_value() const { return pool_ != nullptr; }
  Index block_size() const { return block_size_; }

  T* row(Index /*b*/, Index head, Index pos) const {
    const Index block = table_[pos / block_size_];
    return pool_ + ((block * n_kv_heads_ + head) * block_size_ + pos % block_size_) * row_width_;
  }

  // Rows [pos, pos + n) lie at row(pos) + r * stride(2) for n up to this.
  Index contiguous_rows(Index pos) const { return block_size_ - pos % block_size_; }

 private:
  T* pool_ = nullptr;
  const Index* table_ = nullptr;
  Index block_size_ = 1;
  Index n_kv_heads_ = 0;
  Index head_dim_ = 0;
  Index row_width_ = 0;  // elements per stored row: head_dim, or more for QInt8's scales
  Index seq_len_ = 0;
};

// A strided view is one run of rows per (batch row, head).
template <typename T, int Rank>
Index contiguous_rows(const StridedView<T, Rank>& view, Index pos) {
  return view.dimension(2) - pos;
}
template <typename T>
Index contiguous_rows(const PagedRows<T>& rows, Index pos) {
  return rows.contiguous_rows(pos);
}

// Whether a view's KV heads lie side by side block by block: in a PagedRows each pool block
// holds the runs of all heads back to back, so a reader that takes every head of a block
// before the next block reads memory front to back, where one head at a time would jump
// between short runs (the decode plans its blocks so: plan_decode_blocks).
template <typename View>
inline constexpr bool kHeadsShareBlocks = false;
template <typename T>
inline constexpr bool kHeadsShareBlocks<PagedRows<T>> = true;

// Whether every key tile of `key_tile` rows (starting at a multiple of it) is one run.
template <typename T, int Rank>
bool tiles_contiguous(const StridedView<T, Rank>& /*view*/, Index /*key_tile*/) {
  return true;
}
template <typename T>
bool tiles_contiguous(const PagedRows<T>& rows, Index key_tile) {
  return rows.block_size() % key_tile == 0;
}

}  // namespace attnforge::detail
