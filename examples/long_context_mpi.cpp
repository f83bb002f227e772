// A long packed prompt (several documents) prefilled across MPI ranks with ring
// attention, then decoded token by token over the position-sharded KV cache each rank
// kept from the prefill. Random q/k/v stand in for a model's projections.
// Launch: scripts/mpirun.sh 2 build/release/examples/long_context_mpi [--quick]
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

#include "attnforge/mpi/attnforge_mpi.hpp"

namespace {

using attnforge::Index;
using attnforge::Tensor;
namespace mpi = attnforge::mpi;

template <int Rank>
Tensor<float, Rank> random_tensor(const Eigen::array<Index, Rank>& dims, std::uint32_t seed) {
  Tensor<float, Rank> t(dims);
  std::mt19937 gen(seed);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<float>(gen()) * 0x1.0p-32f - 0.5f;
  return t;
}

struct Config {
  Index seq = 32768;
  Index heads = 32;
  Index kv_heads = 8;
  Index head_dim = 128;
  Index decode_tokens = 64;
  Index doc_len = 4096;  // the prompt packs documents of this length
};

// Appends one position to a (1, Hkv, S, D) cache tensor.
Tensor<float, 4> append(const Tensor<float, 4>& cache, const Tensor<float, 4>& token) {
  return mpi::concat_seq(cache, token);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int ranks = 1;
  int rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  Config cfg;
  if (argc > 1 && std::strcmp(argv[1], "--quick") == 0) cfg = {2048, 8, 2, 64, 8, 512};

  // Every rank generates only its own shard of the prompt.
  const Index shard = mpi::zigzag_shard_len(cfg.seq, ranks, rank);
  const auto seed = static_cast<std::uint32_t>(rank * 3);
  const auto q = random_tensor<4>({1, cfg.heads, shard, cfg.head_dim}, seed + 1);
  Tensor<float, 4> k = random_tensor<4>({1, cfg.kv_heads, shard, cfg.head_dim}, seed + 2);
  Tensor<float, 4> v = random_tensor<4>({1, cfg.kv_heads, shard, cfg.head_dim}, seed + 3);
  Tensor<std::int64_t, 2> docs(1, cfg.seq);
  for (Index i = 0; i < cfg.seq; ++i) docs(0, i) = i / cfg.doc_len;
  mpi::RingMasks masks{mpi::zigzag_shard(docs, ranks, rank), {}};
  attnforge::SdpaOptions options;
  options.causal = true;

  MPI_Barrier(MPI_COMM_WORLD);
  const double prefill_start = MPI_Wtime();
  mpi::RingStats stats;
  const auto prefill = mpi::ring_attention(q, k, v, cfg.seq, MPI_COMM_WORLD, options, masks, &stats);
  MPI_Barrier(MPI_COMM_WORLD);
  const double prefill_seconds = MPI_Wtime() - prefill_start;

  // Decode continues the last document: new tokens go to the ranks in turn.
  const double decode_start = MPI_Wtime();
  for (Index t = 0; t < cfg.decode_tokens; ++t) {
    const auto token_seed = static_cast<std::uint32_t>(1000 + t);
    const auto q_new = random_tensor<4>({1, cfg.heads, 1, cfg.head_dim}, token_seed);
    if (t % ranks == rank) {
      k = append(k, random_tensor<4>({1, cfg.kv_heads, 1, cfg.head_dim}, token_seed + 1));
      v = append(v, random_tensor<4>({1, cfg.kv_heads, 1, cfg.head_dim}, token_seed + 2));
    }
    const auto out = mpi::sharded_decode(q_new, k, v, MPI_COMM_WORLD);
    if (out.out.size() == 0) return 1;
  }
  const double decode_seconds = MPI_Wtime() - decode_start;

  const double cache_mib = 2.0 * static_cast<double>(k.size()) * sizeof(float) / (1 << 20);
  const double activations_mib =
      static_cast<double>(q.size() + prefill.out.size()) * sizeof(float) / (1 << 20);
  for (int r = 0; r < ranks; ++r) {
    if (r == rank) {
      std::printf("rank %d: %ld prompt positions, KV cache %.1f MiB, q + out %.1f MiB, "
                  "ring wait %.1f%% of %.3f s\n",
                  rank, static_cast<long>(shard), cache_mib, activations_mib,
                  100.0 * stats.wait_seconds / stats.total_seconds, stats.total_seconds);
      std::fflush(stdout);
    }
    MPI_Barrier(MPI_COMM_WORLD);
  }
  if (rank == 0) {
    std::printf("P=%d S=%ld H=%ld Hkv=%ld D=%ld: prefill %.3f s (%.0f tokens/s), decode %ld "
                "tokens %.3f s (%.1f tokens/s)\n",
                ranks, static_cast<long>(cfg.seq), static_cast<long>(cfg.heads),
                static_cast<long>(cfg.kv_heads), static_cast<long>(cfg.head_dim), prefill_seconds,
                static_cast<double>(cfg.seq) / prefill_seconds,
                static_cast<long>(cfg.decode_tokens), decode_seconds,
                static_cast<double>(cfg.decode_tokens) / decode_seconds);
  }
  MPI_Finalize();
  return 0;
}
