// The pieces of one ring step: the K/V block that travels (RingBlock), its
// nonblocking transfer (RingTransfer), and this rank's queries that attend to each
// visiting block pair by pair and keep the merged result (LocalQueries).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <vector>

#include "attnforge/mpi/lse_merge.hpp"
#include "attnforge/mpi/zigzag.hpp"
#include "attnforge/sdpa.hpp"

namespace attnforge::mpi {

// Per-rank masks of the ring prefill, both over this rank's shard (zigzag order).
struct RingMasks {
  Tensor<std::int64_t, 2> doc_ids;           // (B, S_shard) or empty: no documents
  Tensor<std::uint8_t, 2> key_padding_mask;  // (B, S_shard) or empty: every key allowed
};

// What one ring call measured, for the overlap fraction of the benchmark.
struct RingStats {
  double total_seconds = 0.0;
  double wait_seconds = 0.0;  // blocked in MPI_Waitall for a K/V block
  int pairs_computed = 0;
  int pairs_skipped = 0;
};

namespace detail {

// One rank's shard of keys and values with their per-key masks, as it travels.
template <typename T>
struct RingBlock {
  Tensor<T, 4> k;
  Tensor<T, 4> v;
  Tensor<std::int64_t, 2> doc_ids;           // empty when there are no documents
  Tensor<std::uint8_t, 2> key_padding_mask;  // empty when every key is allowed
  int owner = 0;

  static RingBlock own(const Tensor<T, 4>& k, const Tensor<T, 4>& v, const RingMasks& masks,
                       int rank) {
    return {k, v, masks.doc_ids, masks.key_padding_mask, rank};
  }

  // Shapes this block to receive the shard of `from`, sized like `like` otherwise.
  void resize_for(const RingBlock& like, Index seq_len, int ranks, int from,
                  const RingMasks& masks) {
    const Index len = zigzag_shard_len(seq_len, ranks, from);
    k.resize(like.k.dimension(0), like.k.dimension(1), len, like.k.dimension(3));
    v.resize(k.dimensions());
    if (masks.doc_ids.size() != 0) doc_ids.resize(like.k.dimension(0), len);
    if (masks.key_padding_mask.size() != 0) key_padding_mask.resize(like.k.dimension(0), len);
    owner = from;
  }
};

// The four nonblocking sends and receives of one ring step.
class RingTransfer {
 public:
  template <typename T>
  void post(RingBlock<T>& out, RingBlock<T>& in, int next, int prev, MPI_Comm comm) {
    exchange(out.k, in.k, next, prev, 0, comm);
    exchange(out.v, in.v, next, prev, 1, comm);
    exchange(out.doc_ids, in.doc_ids, next, prev, 2, comm);
    exchange(out.key_padding_mask, in.key_padding_mask, next, prev, 3, comm);
  }
  void wait() {
    if (!requests_.empty()) {
      MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
    }
    requests_.clear();
  }

 private:
  template <typename Tens>
  void exchange(Tens& out, Tens& in, int next, int prev, int tag, MPI_Comm comm) {
    if (out.size() == 0 && in.size() == 0) return;
    using S = typename Tens::Scalar;
    // Bytes, so any element type travels; blocks stay far below INT_MAX bytes per rank.
    const int out_bytes = static_cast<int>(out.size() * static_cast<Index>(sizeof(S)));
    const int in_bytes = static_cast<int>(in.size() * static_cast<Index>(sizeof(S)));
    requests_.emplace_back();
    MPI_Irecv(in.data(), in_bytes, MPI_BYTE, prev, tag, comm, &requests_.back());
    requests_.emplace_back();
    MPI_Isend(out.data(), out_bytes, MPI_BYTE, next, tag, comm, &requests_.back());
  }
  std::vector<MPI_Request> requests_;
};

// How a (query chunk, key chunk) pair is computed.
enum class PairKind { kSkip, kFull, kDiagonal, kMasked };

// Whether some batch row has a doc id in both column ranges; compares the [min, max]
// of each side, so it never skips a pair that shares a document, sorted ids or not.
inline bool doc_ranges_meet(const Tensor<std::int64_t, 2>& q_ids, ChunkRange q_cols,
                            const Tensor<std::int64_t, 2>& k_ids, ChunkRange k_cols) {
  for (Index b = 0; b < q_ids.dimension(0); ++b) {
    std::int64_t q_lo = std::numeric_limits<std::int64_t>::max();
    std::int64_t q_hi = std::numeric_limits<std::int64_t>::min();
    std::int64_t k_lo = q_lo;
    std::int64_t k_hi = q_hi;
    for (Index i = q_cols.begin; i < q_cols.end; ++i) {
      q_lo = std::min(q_lo, q_ids(b, i));
      q_hi = std::max(q_hi, q_ids(b, i));
    }
    for (Index j = k_cols.begin; j < k_cols.end; ++j) {
      k_lo = std::min(k_lo, k_ids(b, j));
      k_hi = std::max(k_hi, k_ids(b, j));
    }
    if (q_lo <= k_hi && k_lo <= q_hi) return true;
  }
  return false;
}

// Positional classification; q and k are global position ranges of the two chunks.
inline PairKind classify_pair(ChunkRange q, ChunkRange k, int q_chunk, int k_chunk,
                              const SdpaOptions& options) {
  if (q.size() == 0 || k.size() == 0) return PairKind::kSkip;
  if (q_chunk == k_chunk) return PairKind::kDiagonal;
  if (!options.causal) return PairKind::kFull;
  if (k_chunk > q_chunk) return PairKind::kSkip;
  if (options.window <= 0) return PairKind::kFull;
  if (q.begin - (k.end - 1) >= options.window) return PairKind::kSkip;
  if ((q.end - 1) - k.begin < options.window) return PairKind::kFull;
  return PairKind::kMasked;
}

// (1, 1, Lq, Lk) mask of a boundary pair of a sliding window: pos(i) - j < window.
inline Tensor<std::uint8_t, 4> window_pair_mask(ChunkRange q, ChunkRange k, Index window) {
  Tensor<std::uint8_t, 4> mask(1, 1, q.size(), k.size());
  for (Index i = 0; i < q.size(); ++i) {
    for (Index j = 0; j < k.size(); ++j) {
      const Index delta = (q.begin + i) - (k.begin + j);
      mask(0, 0, i, j) = static_cast<std::uint8_t>(delta >= 0 && delta < window);
    }
  }
  return mask;
}

}  // namespace detail
}  // namespace attnforge::mpi
