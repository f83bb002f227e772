// Scaling of the MPI component against one rank: ring prefill (with the fraction of
// the K/V traffic hidden behind the kernel), sharded decode, tensor-parallel
// Attention::forward. Launch: scripts/mpirun.sh 2 build/release/bench/bench_mpi
// Every rank runs every benchmark in lockstep (fixed iteration counts, since the
// collectives need the same calls on all ranks); only rank 0 reports. Time is manual:
// from a barrier to the slowest rank's finish. "P:1" runs the whole problem on rank 0
// alone while the other ranks wait at the barrier.
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <algorithm>
#include <cstdint>
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

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// The communicator a benchmark runs on: the world, or rank 0 alone for "P:1".
MPI_Comm bench_comm(bool one_rank) { return one_rank ? MPI_COMM_SELF : MPI_COMM_WORLD; }

// Times one call on every rank that takes part, up to the slowest rank's finish.
template <typename Body>
void timed(benchmark::State& state, bool one_rank, Body&& body) {
  const bool active = !one_rank || world_rank() == 0;
  for (auto _ : state) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    if (active) body();
    double seconds = MPI_Wtime() - start;
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    state.SetIterationTime(seconds);
  }
}

// Args: S, one_rank. H = 32, Hkv = 8, D = 128, causal.
void ring_prefill(benchmark::State& state) {
  const Index seq = state.range(0);
  const bool one_rank = state.range(1) != 0;
  MPI_Comm comm = bench_comm(one_rank);
  int ranks = 1;
  int rank = 0;
  MPI_Comm_size(comm, &ranks);
  MPI_Comm_rank(comm, &rank);
  const Index shard = mpi::zigzag_shard_len(seq, ranks, rank);
  const auto q = random_tensor<4>({1, 32, shard, 128}, 1);
  const auto k = random_tensor<4>({1, 8, shard, 128}, 2);
  const auto v = random_tensor<4>({1, 8, shard, 128}, 3);
  attnforge::SdpaOptions options;
  options.causal = true;
  mpi::RingStats stats;
  double wait = 0.0;
  double total = 0.0;
  timed(state, one_rank, [&] {
    benchmark::DoNotOptimize(mpi::ring_attention(q, k, v, seq, comm, options, {}, &stats));
    wait += stats.wait_seconds;
    total += stats.total_seconds;
  });
  // Rank 0 reports; its share of waiting is typical (zigzag balances the work).
  state.counters["overlap"] = total > 0.0 ? 1.0 - wait / total : 1.0;
  state.counters["ranks"] = ranks;
}
BENCHMARK(ring_prefill)->ArgNames({"S", "P1"})->Args({16384, 1})->Args({16384, 0})
    ->Args({2048, 1})->Args({2048, 0})->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);

// Args: Skv, one_rank. One token, H = 32, Hkv = 8, D = 128.
void sharded_decode(benchmark::State& state) {
  const Index skv = state.range(0);
  const bool one_rank = state.range(1) != 0;
  MPI_Comm comm = bench_comm(one_rank);
  int ranks = 1;
  int rank = 0;
  MPI_Comm_size(comm, &ranks);
  MPI_Comm_rank(comm, &rank);
  const Index begin = skv * rank / ranks;
  const Index len = skv * (rank + 1) / ranks - begin;
  const auto q = random_tensor<4>({1, 32, 1, 128}, 1);
  const auto k = random_tensor<4>({1, 8, len, 128}, 2);
  const auto v = random_tensor<4>({1, 8, len, 128}, 3);
  timed(state, one_rank, [&] { benchmark::DoNotOptimize(mpi::sharded_decode(q, k, v, comm)); });
}
BENCHMARK(sharded_decode)->ArgNames({"Skv", "P1"})->Args({65536, 1})->Args({65536, 0})
    ->Iterations(20)->UseManualTime()->Unit(benchmark::kMillisecond);

// Args: S, one_rank. dim 4096, H = 32, Hkv = 8, prefill through a cache.
void tensor_parallel_forward(benchmark::State& state) {
  const Index seq = state.range(0);
  const bool one_rank = state.range(1) != 0;
  MPI_Comm comm = bench_comm(one_rank);
  int ranks = 1;
  MPI_Comm_size(comm, &ranks);
  constexpr Index kDim = 4096;
  mpi::TensorParallelAttention<float> tp(kDim, 32, 8, comm);
  tp.load_full_weights(random_tensor<2>({kDim, kDim}, 1), random_tensor<2>({1024, kDim}, 2),
                       random_tensor<2>({1024, kDim}, 3), random_tensor<2>({kDim, kDim}, 4));
  const attnforge::RotaryEmbedding<float> rope(128, seq);
  const auto x = random_tensor<3>({1, seq, kDim}, 5);
  timed(state, one_rank, [&] {
    attnforge::KVCache<float> cache(1, seq, 8 / ranks, 128);
    benchmark::DoNotOptimize(tp.forward(x, rope, 0, &cache));
  });
}
BENCHMARK(tensor_parallel_forward)->ArgNames({"S", "P1"})->Args({2048, 1})->Args({2048, 0})
    ->Args({256, 1})->Args({256, 0})->Iterations(1)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  benchmark::Initialize(&argc, argv);
  if (world_rank() == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    // Runs the same calls in the same order, reporting nothing.
    class Silent : public benchmark::BenchmarkReporter {
     public:
      bool ReportContext(const Context&) override { return true; }
      void ReportRuns(const std::vector<Run>&) override {}
    } silent;
    benchmark::RunSpecifiedBenchmarks(&silent);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
