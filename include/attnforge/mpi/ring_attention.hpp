// Context-parallel (ring) causal prefill over MPI. Each rank holds the zigzag shard
// (zigzag.hpp) of q, k, v; the K/V shards travel around the ring, and each step's
// transfer is posted before, and waited for after, the local kernel, so it hides
// behind the computation when the kernel takes longer than the transfer.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnforge/mpi/lse_merge.hpp"
#include "attnforge/mpi/local_queries.hpp"
#include "attnforge/mpi/zigzag.hpp"
#include "attnforge/sdpa.hpp"

namespace attnforge::mpi {

namespace detail {

inline void check_ring_options(const SdpaOptions& options, Index heads) {
  if (!options.alibi_slopes.empty()) {
    // ALiBi needs global positions; the kernel only knows the positions inside a pair.
    throw std::invalid_argument("ring_attention: alibi_slopes are not supported (the "
                                "kernel sees pair-local positions)");
  }
  if (options.window > 0 && !options.causal) {
    throw std::invalid_argument("ring_attention: window = " + std::to_string(options.window) +
                                " needs causal = true");
  }
  if (!options.sinks.empty() && static_cast<Index>(options.sinks.size()) != heads) {
    throw std::invalid_argument("ring_attention: sinks has " +
                                std::to_string(options.sinks.size()) + " values, H = " +
                                std::to_string(heads));
  }
}

template <typename T>
void check_ring_inputs(const Tensor<T, 4>& q, const Tensor<T, 4>& k, const Tensor<T, 4>& v,
                       const RingMasks& masks, Index shard_len) {
  const auto shape = [](const auto& t) {
    std::string s = "(";
    for (int a = 0; a < t.NumDimensions; ++a) s += (a ? ", " : "") + std::to_string(t.dimension(a));
    return s + ")";
  };
  if (q.dimension(2) != shard_len || k.dimension(2) != shard_len ||
      v.dimension(2) != shard_len) {
    throw std::invalid_argument("ring_attention: q " + shape(q) + ", k " + shape(k) + ", v " +
                                shape(v) + " must hold this rank's zigzag shard of " +
                                std::to_string(shard_len) + " positions");
  }
  if (k.dimensions() != v.dimensions() || q.dimension(0) != k.dimension(0) ||
      q.dimension(3) != k.dimension(3) || k.dimension(1) == 0 ||
      q.dimension(1) % k.dimension(1) != 0) {
    throw std::invalid_argument("ring_attention: q " + shape(q) + ", k " + shape(k) + ", v " +
                                shape(v) + " are not (B, H, S, D), (B, Hkv, S, D) x2 "
                                "with Hkv dividing H");
  }
  if (masks.doc_ids.size() != 0 &&
      (masks.doc_ids.dimension(0) != q.dimension(0) || masks.doc_ids.dimension(1) != shard_len)) {
    throw std::invalid_argument("ring_attention: doc_ids " + shape(masks.doc_ids) +
                                " must be (B, S_shard) = (" + std::to_string(q.dimension(0)) +
                                ", " + std::to_string(shard_len) + ")");
  }
  if (masks.key_padding_mask.size() != 0 &&
      (masks.key_padding_mask.dimension(0) != q.dimension(0) ||
       masks.key_padding_mask.dimension(1) != shard_len)) {
    throw std::invalid_argument("ring_attention: key_padding_mask " +
                                shape(masks.key_padding_mask) + " must be (B, S_shard) = (" +
                                std::to_string(q.dimension(0)) + ", " +
                                std::to_string(shard_len) + ")");
  }
}

}  // namespace detail

// Causal (or full) attention of this rank's zigzag shard of queries over the whole
// sequence of seq_len positions. Returns (out, lse) over the shard, in shard order.
// The merge order of the partials is fixed by P, so results are deterministic.
template <typename T>
SdpaResult<T> ring_attention(const Tensor<T, 4>& q, const Tensor<T, 4>& k,
                             const Tensor<T, 4>& v, Index seq_len, MPI_Comm comm,
                             const SdpaOptions& options = {}, const RingMasks& masks = {},
                             RingStats* stats = nullptr) {
  int ranks = 1;
  int rank = 0;
  MPI_Comm_size(comm, &ranks);
  MPI_Comm_rank(comm, &rank);
  const Index shard_len = zigzag_shard_len(seq_len, ranks, rank);
  detail::check_ring_inputs(q, k, v, masks, shard_len);
  detail::check_ring_options(options, q.dimension(1));

  const double start = MPI_Wtime();
  RingStats local_stats;
  detail::LocalQueries<T> queries(q, masks, seq_len, ranks, rank);
  detail::RingBlock<T> current = detail::RingBlock<T>::own(k, v, masks, rank);
  detail::RingBlock<T> incoming;
  const int next = (rank + 1) % ranks;
  const int prev = (rank + ranks - 1) % ranks;
  for (int step = 0; step < ranks; ++step) {
    detail::RingTransfer transfer;
    if (step + 1 < ranks) {
      const int incoming_owner = (rank + ranks - step - 1) % ranks;
      incoming.resize_for(current, seq_len, ranks, incoming_owner, masks);
      transfer.post(current, incoming, next, prev, comm);
    }
    queries.attend(current, options, local_stats);
    const double wait_start = MPI_Wtime();
    transfer.wait();
    local_stats.wait_seconds += MPI_Wtime() - wait_start;
    if (step + 1 < ranks) std::swap(current, incoming);
  }
  local_stats.total_seconds = MPI_Wtime() - start;
  if (stats != nullptr) *stats = local_stats;
  return queries.result();
}

}  // namespace attnforge::mpi
