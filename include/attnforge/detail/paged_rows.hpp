// How the kernels read the K or V rows of one sequence of a PagedKVCache: positions map
// through the sequence's block table to blocks of the pool, inside which one KV head's
// keys and values take turns in runs of paged_run_rows. It answers the same questions as
// a (1, Hkv, Skv, D) view (dimension, row, stride), plus how many rows from a position on
// are contiguous, so a kernel never reads across a run's end with a single stride.
#pragma once

#include <algorithm>
#include <limits>

#include "attnforge/detail/int8_dot.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// Rows of a head's keys that lie side by side in a pool block before as many of its values,
// then the next run of each: one decode block of keys (16, the widest float packet; 32 on
// the int8 path, kInt8DecodeKeys), so a decode step, which reads a block's keys and then
// its values, reads a pool block front to back, one stream where keys and values apart
// would be two. Runs shrink to 16 where the block size is no multiple.
template <typename T>
constexpr Index paged_run_rows(Index block_size) {
  constexpr Index kRun = is_qint8_v<T> ? kInt8DecodeKeys : 16;
  return block_size % kRun == 0 ? kRun : 16;
}

template <typename T>
class PagedRows {
 public:
  using Scalar = std::remove_const_t<T>;

  PagedRows() = default;
  // pool: the first key (or value) row of block 0, head 0; a head's block_size keys and
  // values take 2 x block_size rows, in runs of run_rows keys then run_rows values, and a
  // block holds n_kv_heads of them. table: the sequence's blocks in order.
  PagedRows(T* pool, const Index* table, Index block_size, Index run_rows, Index n_kv_heads,
            Index head_dim, Index seq_len)
      : pool_(pool),
        table_(table),
        block_size_(block_size),
        run_rows_(run_rows),
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
    const Index slot = pos % block_size_;
    return pool_ + ((block * n_kv_heads_ + head) * 2 * block_size_ +
                    slot / run_rows_ * 2 * run_rows_ + slot % run_rows_) *
                       row_width_;
  }

  // Rows [pos, pos + n) lie at row(pos) + r * stride(2) for n up to this.
  Index contiguous_rows(Index pos) const { return run_rows_ - pos % run_rows_; }
  Index run_rows() const { return run_rows_; }
  // Rows from pos to the end of its pool block.
  Index block_rows(Index pos) const { return block_size_ - pos % block_size_; }

 private:
  T* pool_ = nullptr;
  const Index* table_ = nullptr;
  Index block_size_ = 1;
  Index run_rows_ = 1;
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

// Calls f(offset, n_rows) for each run of contiguous rows that rows [first, first + n)
// span, in order (offset from first).
template <typename View, typename F>
void for_each_run(const View& view, Index first, Index n, F&& f) {
  for (Index offset = 0, rows = 0; offset < n; offset += rows) {
    rows = std::min(n - offset, contiguous_rows(view, first + offset));
    f(offset, rows);
  }
}

// Rows from pos on that lie in one stretch of memory with the other heads' same rows: to
// the end of a pool block; for a strided view, its one run.
template <typename T, int Rank>
Index block_rows(const StridedView<T, Rank>& view, Index pos) {
  return contiguous_rows(view, pos);
}
template <typename T>
Index block_rows(const PagedRows<T>& rows, Index pos) {
  return rows.block_rows(pos);
}

// Whether a view's KV heads lie side by side block by block: in a PagedRows each pool block
// holds all heads' rows back to back, so a reader that takes every head of a block before
// the next block reads memory front to back, where one head at a time would jump between
// short runs (the decode plans its blocks so: plan_decode_blocks).
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
  return rows.run_rows() % key_tile == 0;
}

}  // namespace attnforge::detail
