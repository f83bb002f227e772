// Decode over a KV cache sharded by position across the ranks of a communicator: each
// rank attends the new queries to its own positions, then one MPI_Allgather of the
// partial (out, lse) lets every rank merge them exactly, in rank order.
#pragma once

#include <mpi.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnforge/mpi/lse_merge.hpp"
#include "attnforge/sdpa.hpp"

namespace attnforge::mpi {

namespace detail {

inline void check_decode_options(const SdpaOptions& options) {
  // Both need the global position of each key, which a shard does not know.
  if (options.window > 0) {
    throw std::invalid_argument("sharded_decode: window = " + std::to_string(options.window) +
                                " is not supported over a position-sharded cache");
  }
  if (!options.alibi_slopes.empty()) {
    throw std::invalid_argument("sharded_decode: alibi_slopes are not supported over a "
                                "position-sharded cache");
  }
}

}  // namespace detail

// q (B, H, Sq, D) the new tokens (every rank passes the same q); k, v (B, Hkv, S_local, D)
// this rank's positions, all before the new tokens (so causal masks nothing: pass
// causal = false). masks are over the local keys (kv_doc_ids, key_padding_mask).
// Sinks join the softmax once, on rank 0. Returns the merged (out, lse) on every rank.
template <typename T>
SdpaResult<T> sharded_decode(const Tensor<T, 4>& q, const Tensor<T, 4>& k, const Tensor<T, 4>& v,
                             MPI_Comm comm, const SdpaOptions& options = {},
                             const Masks& masks = {}) {
  detail::check_decode_options(options);
  int ranks = 1;
  int rank = 0;
  MPI_Comm_size(comm, &ranks);
  MPI_Comm_rank(comm, &rank);
  SdpaOptions local_options = options;
  local_options.causal = false;
  if (rank != 0) local_options.sinks.clear();
  SdpaResult<T> local =
      (k.dimension(2) == 0 && local_options.sinks.empty())
          ? empty_partial<T>(q.dimension(0), q.dimension(1), q.dimension(2), q.dimension(3))
          : scaled_dot_product_attention_with_lse(q, k, v, local_options, masks);

  const std::size_t out_bytes = static_cast<std::size_t>(local.out.size()) * sizeof(T);
  const std::size_t lse_bytes = static_cast<std::size_t>(local.lse.size()) * sizeof(acc_t<T>);
  const std::size_t part_bytes = out_bytes + lse_bytes;
  std::vector<unsigned char> mine(part_bytes);
  std::memcpy(mine.data(), local.out.data(), out_bytes);
  std::memcpy(mine.data() + out_bytes, local.lse.data(), lse_bytes);
  std::vector<unsigned char> all(part_bytes * static_cast<std::size_t>(ranks));
  MPI_Allgather(mine.data(), static_cast<int>(part_bytes), MPI_BYTE, all.data(),
                static_cast<int>(part_bytes), MPI_BYTE, comm);

  SdpaResult<T> merged =
      empty_partial<T>(q.dimension(0), q.dimension(1), q.dimension(2), q.dimension(3));
  for (int r = 0; r < ranks; ++r) {
    const unsigned char* part = all.data() + part_bytes * static_cast<std::size_t>(r);
    std::memcpy(local.out.data(), part, out_bytes);
    std::memcpy(local.lse.data(), part + out_bytes, lse_bytes);
    merge_partial(merged, local);
  }
  return merged;
}

}  // namespace attnforge::mpi
