// Zigzag sharding of a sequence over P ranks: the sequence is cut into 2P chunks and
// rank r holds chunks r and 2P-1-r, so under a causal mask every rank gets the same
// amount of work (an early chunk with little history paired with a late one with much).
#pragma once

#include <array>
#include <stdexcept>
#include <string>

#include "attnforge/tensor.hpp"

namespace attnforge::mpi {

struct ChunkRange {
  Index begin = 0;
  Index end = 0;
  Index size() const { return end - begin; }
};

// Chunk c of 2P over a sequence of length S; sizes differ by at most one when 2P does
// not divide S.
inline ChunkRange zigzag_chunk(Index seq_len, int ranks, int chunk) {
  const Index n_chunks = 2 * static_cast<Index>(ranks);
  return {seq_len * chunk / n_chunks, seq_len * (chunk + 1) / n_chunks};
}

// The two chunks rank r holds, in the order they are stored in its shard.
inline std::array<int, 2> zigzag_chunks_of(int ranks, int rank) {
  return {rank, 2 * ranks - 1 - rank};
}

inline Index zigzag_shard_len(Index seq_len, int ranks, int rank) {
  const auto chunks = zigzag_chunks_of(ranks, rank);
  return zigzag_chunk(seq_len, ranks, chunks[0]).size() +
         zigzag_chunk(seq_len, ranks, chunks[1]).size();
}

// Copies positions [begin, begin + len) of the sequence axis (axis Rank == 4 ? 2 : 1).
template <typename T, int Rank>
Tensor<T, Rank> slice_seq(const Tensor<T, Rank>& t, Index begin, Index len) {
  static_assert(Rank == 2 || Rank == 4, "sequence slices are of (B, S) or (B, H, S, D)");
  constexpr int kAxis = Rank == 4 ? 2 : 1;
  Eigen::array<Index, Rank> offsets;
  Eigen::array<Index, Rank> extents;
  for (int a = 0; a < Rank; ++a) {
    offsets[a] = 0;
    extents[a] = t.dimension(a);
  }
  offsets[kAxis] = begin;
  extents[kAxis] = len;
  return t.slice(offsets, extents);
}

// a then b along the sequence axis. Eigen's concatenate asserts on an empty operand,
// and chunks are empty when S < 2P.
template <typename T, int Rank>
Tensor<T, Rank> concat_seq(const Tensor<T, Rank>& a, const Tensor<T, Rank>& b) {
  constexpr int kAxis = Rank == 4 ? 2 : 1;
  Eigen::array<Index, Rank> dims = a.dimensions();
  dims[kAxis] = a.dimension(kAxis) + b.dimension(kAxis);
  Tensor<T, Rank> out(dims);
  if (a.size() == 0 && b.size() == 0) return out;
  if (a.size() == 0) return b;
  if (b.size() == 0) return a;
  return a.concatenate(b, kAxis);
}

// The shard of a full (B, S) or (B, H, S, D) tensor that rank `rank` of `ranks` holds.
template <typename T, int Rank>
Tensor<T, Rank> zigzag_shard(const Tensor<T, Rank>& full, int ranks, int rank) {
  const Index seq_len = full.dimension(Rank == 4 ? 2 : 1);
  if (ranks < 1 || rank < 0 || rank >= ranks) {
    throw std::invalid_argument("zigzag_shard: rank " + std::to_string(rank) +
                                " is not in [0, ranks = " + std::to_string(ranks) + ")");
  }
  const auto chunks = zigzag_chunks_of(ranks, rank);
  const ChunkRange a = zigzag_chunk(seq_len, ranks, chunks[0]);
  const ChunkRange b = zigzag_chunk(seq_len, ranks, chunks[1]);
  return concat_seq(slice_seq(full, a.begin, a.size()), slice_seq(full, b.begin, b.size()));
}

}  // namespace attnforge::mpi
