// Packed documents: does packing cost what the documents cost? fp32, B = 1, H = 32,
// Hkv = 8, D = 128, one thread, 8192 tokens in total, causal, all in one run:
//   dense     one document of 8192 tokens;
//   packed    64 documents of 128 tokens in one row, kept apart by doc_ids;
//   separate  the same 64 documents as a batch of 64 rows of 128 (no doc_ids): the
//             equal-work yardstick for `packed`;
//   mixed     documents of log-uniform lengths in [16, 2048] (fixed seed), packed;
//   metadata  building the tile plan of `mixed` alone (what the kernel knows about the
//             mask before its first FLOP).
//
//   bench_packed --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// GFLOP/s is the effective rate 4 * H * D * (allowed query-key pairs) / time: work on
// masked-out pairs never counts, so a kernel that computes across document borders and
// throws the result away shows up as a lower rate.
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace {

using attnforge::DocId;
using attnforge::Index;
using attnforge::Tensor;
namespace af = attnforge;
namespace bench = attnforge::bench;

constexpr Index kHeads = 32;
constexpr Index kKvHeads = 8;
constexpr Index kHeadDim = 128;
constexpr Index kTotal = 8192;
constexpr Index kMinDoc = 16;
constexpr Index kMaxDoc = 2048;
constexpr unsigned kMixedSeed = 5;

// One set of q, k, v, out for 8192 tokens (320 MiB), shared by every case: `separate`
// sees the same memory as 64 rows of 128 tokens.
struct Inputs {
  Tensor<float, 4> q = bench::random_tensor<float, 4>({1, kHeads, kTotal, kHeadDim}, 1);
  Tensor<float, 4> k = bench::random_tensor<float, 4>({1, kKvHeads, kTotal, kHeadDim}, 2);
  Tensor<float, 4> v = bench::random_tensor<float, 4>({1, kKvHeads, kTotal, kHeadDim}, 3);
  Tensor<float, 4> out = Tensor<float, 4>(1, kHeads, kTotal, kHeadDim);
};

Inputs& inputs() {
  static const auto in = std::make_unique<Inputs>();
  return *in;
}

// Document lengths of the mixed layout: log-uniform in [kMinDoc, kMaxDoc] (many short
// documents, a few long ones, as in real pre-training data), from a written-out mapping
// of mt19937 draws so every platform gets the same layout. The last document takes what
// is left; a draw that would leave fewer than kMinDoc tokens is shortened so the rest
// still forms a document of at least kMinDoc.
std::vector<Index> mixed_lengths() {
  std::mt19937 gen(kMixedSeed);
  const double log_ratio = std::log(static_cast<double>(kMaxDoc) / kMinDoc);
  std::vector<Index> lengths;
  for (Index remaining = kTotal; remaining > 0;) {
    const double u = static_cast<double>(gen()) * 0x1.0p-32;
    Index len = static_cast<Index>(std::lround(kMinDoc * std::exp(u * log_ratio)));
    if (len >= remaining || remaining < 2 * kMinDoc) {
      len = remaining;
    } else if (remaining - len < kMinDoc) {
      len = remaining - kMinDoc;
    }
    lengths.push_back(len);
    remaining -= len;
  }
  return lengths;
}

Tensor<DocId, 2> doc_ids_for(const std::vector<Index>& lengths) {
  Tensor<DocId, 2> ids(1, kTotal);
  Index pos = 0;
  for (std::size_t doc = 0; doc < lengths.size(); ++doc) {
    for (Index i = 0; i < lengths[doc]; ++i) ids(0, pos++) = static_cast<DocId>(doc);
  }
  return ids;
}

// Query-key pairs a causal mask allows inside the documents.
double allowed_pairs(const std::vector<Index>& lengths) {
  double pairs = 0;
  for (Index len : lengths) pairs += bench::causal_pairs(len, len);
  return pairs;
}

void set_flops_counter(benchmark::State& state, double pairs) {
  const double flops = 4.0 * kHeads * kHeadDim * pairs;
  state.counters["GFLOP/s"] = benchmark::Counter(
      flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

af::Sdpa<float> causal_sdpa() {
  af::SdpaOptions options;
  options.causal = true;
  options.path = af::SdpaPath::kFused;
  return af::Sdpa<float>(options, nullptr);
}

// One row of kTotal tokens; with `lengths` of more than one document, packed with doc_ids.
void run_row(benchmark::State& state, const std::vector<Index>& lengths) {
  Inputs& in = inputs();
  const Tensor<DocId, 2> ids = doc_ids_for(lengths);
  af::Masks masks;
  if (lengths.size() > 1) masks.doc_ids = ids;
  af::Sdpa<float> sdpa = causal_sdpa();
  sdpa(in.q, in.k, in.v, af::StridedView<float, 4>(in.out), masks);  // sizes the scratch once
  for (auto _ : state) {
    sdpa(in.q, in.k, in.v, af::StridedView<float, 4>(in.out), masks);
    benchmark::ClobberMemory();
  }
  set_flops_counter(state, allowed_pairs(lengths));
}

// The documents as a batch of separate rows, all of length doc_len.
void run_separate(benchmark::State& state, Index doc_len) {
  Inputs& in = inputs();
  const Index batch = kTotal / doc_len;
  const af::ConstView<float, 4> q(in.q.data(), {batch, kHeads, doc_len, kHeadDim});
  const af::ConstView<float, 4> k(in.k.data(), {batch, kKvHeads, doc_len, kHeadDim});
  const af::ConstView<float, 4> v(in.v.data(), {batch, kKvHeads, doc_len, kHeadDim});
  const af::StridedView<float, 4> out(in.out.data(), {batch, kHeads, doc_len, kHeadDim});
  af::Sdpa<float> sdpa = causal_sdpa();
  sdpa(q, k, v, out);
  for (auto _ : state) {
    sdpa(q, k, v, out);
    benchmark::ClobberMemory();
  }
  set_flops_counter(state,
                    allowed_pairs(std::vector<Index>(static_cast<std::size_t>(batch), doc_len)));
}

// The kernel's planning for a packed row: the tile plan, then the per-tile cost the
// work items are ordered by. No attention is computed.
void run_metadata(benchmark::State& state, const std::vector<Index>& lengths) {
  const Tensor<DocId, 2> ids = doc_ids_for(lengths);
  af::Masks masks;
  masks.doc_ids = ids;
  const af::detail::TileGeometry geo = af::detail::tile_geometry<float>(kHeads / kKvHeads);
  af::detail::TilePlan plan;
  for (auto _ : state) {
    const af::detail::MaskPolicy policy(af::detail::MaskRules{true, 0}, masks, 1, kHeads, kTotal,
                                        kTotal);
    plan.build(policy, geo.positions, geo.key_tile);
    Index cost = 0;
    for (Index qt = 0; qt < plan.q_tiles(); ++qt) cost += plan.active_key_tiles(0, qt);
    benchmark::DoNotOptimize(cost);
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(kTotal) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

void register_all() {
  const std::vector<Index> mixed = mixed_lengths();
  const std::string mixed_name = "/docs:" + std::to_string(mixed.size()) +
                                 "/len:" + std::to_string(kMinDoc) + "-" + std::to_string(kMaxDoc);
  const std::vector<Index> packed(64, 128);
  bench::add("dense/docs:1/len:" + std::to_string(kTotal), benchmark::kMillisecond,
             [](benchmark::State& s) { run_row(s, {kTotal}); });
  bench::add("packed/docs:64/len:128", benchmark::kMillisecond,
             [=](benchmark::State& s) { run_row(s, packed); });
  bench::add("separate/docs:64/len:128", benchmark::kMillisecond,
             [](benchmark::State& s) { run_separate(s, 128); });
  bench::add("mixed" + mixed_name, benchmark::kMillisecond,
             [=](benchmark::State& s) { run_row(s, mixed); });
  bench::add("metadata" + mixed_name, benchmark::kMicrosecond,
             [=](benchmark::State& s) { run_metadata(s, mixed); });
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return attnforge::bench::run_registered_benchmarks(argc, argv);
}
