// The distributed results equal the single-process core result: ring prefill over the
// zigzag shards and decode over a position-sharded cache, for every mask kind the MPI
// component supports. Launched with mpiexec at several rank counts (CMakeLists.txt).
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnforge/mpi/attnforge_mpi.hpp"
#include "test_util.hpp"

namespace {

using attnforge::Index;
using attnforge::Masks;
using attnforge::SdpaOptions;
using attnforge::SdpaResult;
using attnforge::Tensor;
namespace mpi = attnforge::mpi;

struct Case {
  std::string name;
  Index batch, heads, kv_heads, seq, head_dim;
  SdpaOptions options;
  bool docs = false;
  bool padding = false;
};

// Each output is a convex combination of value rows in [-1, 1]; merging P partials in
// float adds a few float roundings per row over the one-pass kernel.
constexpr double kOutTol = 2e-5;
constexpr double kLseTol = 2e-5;

Tensor<std::int64_t, 2> sorted_doc_ids(Index batch, Index seq, std::uint32_t seed) {
  std::mt19937 gen(seed);
  Tensor<std::int64_t, 2> ids(batch, seq);
  for (Index b = 0; b < batch; ++b) {
    std::int64_t doc = 0;
    for (Index i = 0; i < seq; ++i) {
      if (i > 0 && gen() % 9 == 0) ++doc;
      ids(b, i) = doc;
    }
  }
  return ids;
}

// About one key in five masked out; batch row 1 (when present) has no key at all, so
// its rows are empty and must come back as zeros.
Tensor<std::uint8_t, 2> random_padding(Index batch, Index seq, std::uint32_t seed) {
  std::mt19937 gen(seed);
  Tensor<std::uint8_t, 2> pad(batch, seq);
  for (Index b = 0; b < batch; ++b) {
    for (Index i = 0; i < seq; ++i) pad(b, i) = static_cast<std::uint8_t>(b != 1 && gen() % 5 != 0);
  }
  return pad;
}

template <typename T, int Rank>
double max_abs_diff(const Tensor<T, Rank>& a, const Tensor<T, Rank>& b) {
  double worst = 0.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = a.data()[i];
    const double y = b.data()[i];
    if (std::isinf(x) || std::isinf(y)) {
      if (x != y) return attnforge::test::kInf;
      continue;
    }
    worst = std::max(worst, std::abs(x - y));
  }
  return worst;
}

bool run_ring_case(const Case& c, int ranks, int rank) {
  using attnforge::test::random_uniform;
  const auto q = random_uniform<float, 4>({c.batch, c.heads, c.seq, c.head_dim}, 11);
  const auto k = random_uniform<float, 4>({c.batch, c.kv_heads, c.seq, c.head_dim}, 12);
  const auto v = random_uniform<float, 4>({c.batch, c.kv_heads, c.seq, c.head_dim}, 13);
  Tensor<std::int64_t, 2> docs;
  Tensor<std::uint8_t, 2> pad;
  Masks full_masks;
  mpi::RingMasks shard_masks;
  if (c.docs) {
    docs = sorted_doc_ids(c.batch, c.seq, 14);
    full_masks.doc_ids = docs;
    shard_masks.doc_ids = mpi::zigzag_shard(docs, ranks, rank);
  }
  if (c.padding) {
    pad = random_padding(c.batch, c.seq, 15);
    full_masks.key_padding_mask = pad;
    shard_masks.key_padding_mask = mpi::zigzag_shard(pad, ranks, rank);
  }
  const SdpaResult<float> want =
      attnforge::scaled_dot_product_attention_with_lse(q, k, v, c.options, full_masks);
  const SdpaResult<float> got = mpi::ring_attention(
      mpi::zigzag_shard(q, ranks, rank), mpi::zigzag_shard(k, ranks, rank),
      mpi::zigzag_shard(v, ranks, rank), c.seq, MPI_COMM_WORLD, c.options, shard_masks);
  const Tensor<float, 4> want_out = mpi::zigzag_shard(want.out, ranks, rank);
  Tensor<float, 4> want_lse4 = want.lse.reshape(Eigen::array<Index, 4>{c.batch, c.heads, c.seq, 1});
  Tensor<float, 4> got_lse4 = got.lse.reshape(
      Eigen::array<Index, 4>{c.batch, c.heads, got.lse.dimension(2), 1});
  const double out_err = max_abs_diff(got.out, want_out);
  const double lse_err = max_abs_diff(got_lse4, Tensor<float, 4>(mpi::zigzag_shard(want_lse4, ranks, rank)));
  const bool ok = out_err <= kOutTol && lse_err <= kLseTol;
  if (!ok) {
    std::printf("FAIL ring %s P=%d rank %d: out err %g, lse err %g\n", c.name.c_str(), ranks,
                rank, out_err, lse_err);
  }
  return ok;
}

bool run_decode_case(const Case& c, int ranks, int rank) {
  using attnforge::test::random_uniform;
  const auto q = random_uniform<float, 4>({c.batch, c.heads, 1, c.head_dim}, 21);
  const auto k = random_uniform<float, 4>({c.batch, c.kv_heads, c.seq, c.head_dim}, 22);
  const auto v = random_uniform<float, 4>({c.batch, c.kv_heads, c.seq, c.head_dim}, 23);
  const Index begin = c.seq * rank / ranks;
  const Index len = c.seq * (rank + 1) / ranks - begin;
  Tensor<std::int64_t, 2> q_docs(c.batch, 1);
  Tensor<std::int64_t, 2> docs;
  Tensor<std::int64_t, 2> local_docs;
  Tensor<std::uint8_t, 2> pad;
  Tensor<std::uint8_t, 2> local_pad;
  Masks full_masks;
  Masks local_masks;
  if (c.docs) {
    docs = sorted_doc_ids(c.batch, c.seq, 24);
    for (Index b = 0; b < c.batch; ++b) q_docs(b, 0) = docs(b, c.seq - 1);
    local_docs = mpi::slice_seq(docs, begin, len);
    full_masks.doc_ids = q_docs;
    full_masks.kv_doc_ids = docs;
    local_masks.doc_ids = q_docs;
    local_masks.kv_doc_ids = local_docs;
  }
  if (c.padding) {
    pad = random_padding(c.batch, c.seq, 25);
    local_pad = mpi::slice_seq(pad, begin, len);
    full_masks.key_padding_mask = pad;
    local_masks.key_padding_mask = local_pad;
  }
  const SdpaResult<float> want =
      attnforge::scaled_dot_product_attention_with_lse(q, k, v, c.options, full_masks);
  const SdpaResult<float> got =
      mpi::sharded_decode(q, Tensor<float, 4>(mpi::slice_seq(k, begin, len)),
                          Tensor<float, 4>(mpi::slice_seq(v, begin, len)), MPI_COMM_WORLD,
                          c.options, local_masks);
  const double out_err = max_abs_diff(got.out, want.out);
  const double lse_err = max_abs_diff(got.lse, want.lse);
  const bool ok = out_err <= kOutTol && lse_err <= kLseTol;
  if (!ok) {
    std::printf("FAIL decode %s P=%d rank %d: out err %g, lse err %g\n", c.name.c_str(), ranks,
                rank, out_err, lse_err);
  }
  return ok;
}

SdpaOptions opts(bool causal, Index window = 0, double softcap = 0.0,
                 std::vector<double> sinks = {}) {
  SdpaOptions o;
  o.causal = causal;
  o.window = window;
  o.softcap = softcap;
  o.sinks = std::move(sinks);
  return o;
}

std::vector<Case> ring_cases() {
  return {
      {"mha_causal_uneven", 1, 2, 2, 37, 16, opts(true)},
      {"gqa_causal", 2, 4, 2, 64, 8, opts(true)},
      {"mqa_causal", 1, 4, 1, 50, 8, opts(true)},
      {"full_noncausal", 1, 2, 1, 30, 8, opts(false)},
      {"window7", 1, 2, 2, 45, 8, opts(true, 7)},
      {"window_large", 1, 2, 1, 45, 8, opts(true, 30)},
      {"doc_ids", 2, 2, 1, 53, 8, opts(true), true},
      {"padding_empty_rows", 2, 2, 2, 40, 8, opts(true), false, true},
      {"softcap", 1, 2, 2, 33, 8, opts(true, 0, 5.0)},
      {"sinks", 1, 2, 1, 36, 8, opts(true, 0, 0.0, {0.5, -1.0})},
      {"all_masks_gqa", 2, 4, 2, 61, 8, opts(true, 9, 4.0), true, true},
      {"seq_shorter_than_chunks", 1, 2, 2, 5, 8, opts(true)},
  };
}

std::vector<Case> decode_cases() {
  return {
      {"mha", 1, 2, 2, 41, 16, opts(false)},
      {"gqa", 2, 4, 2, 64, 8, opts(false)},
      {"mqa", 1, 4, 1, 50, 8, opts(false)},
      {"doc_ids", 2, 2, 1, 53, 8, opts(false), true},
      {"padding_empty_rows", 2, 2, 2, 40, 8, opts(false), false, true},
      {"softcap", 1, 2, 2, 33, 8, opts(false, 0, 5.0)},
      {"sinks", 1, 2, 1, 36, 8, opts(false, 0, 0.0, {0.5, -1.0})},
      {"cache_shorter_than_ranks", 1, 2, 2, 2, 8, opts(false)},
  };
}

struct TpCase {
  std::string name;
  Index dim, heads, kv_heads, head_dim;
};

// Prefill of 9 tokens through the caches, then two decode steps: the sum over ranks of
// the per-rank modules equals the one-process module. Rank counts that do not divide
// n_kv_heads must be refused with std::invalid_argument.
bool run_tensor_parallel_case(const TpCase& c, int ranks, int rank) {
  using attnforge::test::random_uniform;
  const double w_range = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const auto wq = random_uniform<float, 2>({c.heads * c.head_dim, c.dim}, 31, -w_range, w_range);
  const auto wk = random_uniform<float, 2>({c.kv_heads * c.head_dim, c.dim}, 32, -w_range, w_range);
  const auto wv = random_uniform<float, 2>({c.kv_heads * c.head_dim, c.dim}, 33, -w_range, w_range);
  const auto wo = random_uniform<float, 2>({c.dim, c.heads * c.head_dim}, 34, -w_range, w_range);
  if (c.kv_heads % ranks != 0) {
    try {
      mpi::TensorParallelAttention<float> tp(c.dim, c.heads, c.kv_heads, MPI_COMM_WORLD, c.head_dim);
    } catch (const std::invalid_argument&) {
      return true;
    }
    std::printf("FAIL tp %s P=%d: no std::invalid_argument for n_kv_heads %ld\n", c.name.c_str(),
                ranks, static_cast<long>(c.kv_heads));
    return false;
  }
  attnforge::Attention<float> whole(c.dim, c.heads, c.kv_heads, c.head_dim);
  whole.wq() = wq;
  whole.wk() = wk;
  whole.wv() = wv;
  whole.wo() = wo;
  mpi::TensorParallelAttention<float> tp(c.dim, c.heads, c.kv_heads, MPI_COMM_WORLD, c.head_dim);
  tp.load_full_weights(wq, wk, wv, wo);
  const attnforge::RotaryEmbedding<float> rope(c.head_dim, 16);
  attnforge::KVCache<float> whole_cache(2, 16, c.kv_heads, c.head_dim);
  attnforge::KVCache<float> my_cache(2, 16, c.kv_heads / ranks, c.head_dim);
  double worst = 0.0;
  Index pos = 0;
  for (const Index len : {Index{9}, Index{1}, Index{1}}) {
    const auto x = random_uniform<float, 3>({2, len, c.dim}, 40 + static_cast<std::uint32_t>(pos));
    const Tensor<float, 3> want = whole.forward(x, rope, pos, &whole_cache, Masks{});
    const Tensor<float, 3> got = tp.forward(x, rope, pos, &my_cache);
    worst = std::max(worst, max_abs_diff(got, want));
    pos += len;
  }
  // Sums of dim products of O(1 / sqrt(dim)) terms, reassociated across the ranks.
  const bool ok = worst <= 1e-5;
  if (!ok) std::printf("FAIL tp %s P=%d rank %d: err %g\n", c.name.c_str(), ranks, rank, worst);
  return ok;
}

std::vector<TpCase> tensor_parallel_cases() {
  return {{"mha", 48, 12, 12, 4}, {"gqa", 48, 24, 12, 4}, {"mqa", 32, 4, 1, 8}};
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int ranks = 1;
  int rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int failures = 0;
  int checks = 0;
  for (const Case& c : ring_cases()) {
    failures += run_ring_case(c, ranks, rank) ? 0 : 1;
    ++checks;
  }
  for (const Case& c : decode_cases()) {
    failures += run_decode_case(c, ranks, rank) ? 0 : 1;
    ++checks;
  }
  for (const TpCase& c : tensor_parallel_cases()) {
    failures += run_tensor_parallel_case(c, ranks, rank) ? 0 : 1;
    ++checks;
  }
  int total_failures = 0;
  MPI_Allreduce(&failures, &total_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("P=%d: %d ring, decode and tensor-parallel cases per rank, %d failures over all ranks\n", ranks,
                checks, total_failures);
  }
  MPI_Finalize();
  return total_failures == 0 ? 0 : 1;
}
