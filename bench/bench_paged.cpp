// Paged KV cache: what reading K/V through block tables, and batching ragged sequences
// into one call, cost against the contiguous paths doing the same work. fp32, H = 32,
// Hkv = 8, D = 128, causal (bottom-right per sequence), all in one run:
//   decode            one query token per sequence over a contiguous KVCache (Sdpa, the
//                     existing decode path): the yardstick of paged_decode;
//   paged_decode      the same shapes and the same keys and values in a PagedKVCache of
//                     block_size 16, 64 or 256, through PagedAttention;
//   paged_in_turns    decode and paged_decode of one shape timed in turn, each iteration
//                     running both: the median of contiguous time / paged time, robust to
//                     the bandwidth drifting between separate rows on a shared host;
//   paged_in_turns_bf16, paged_in_turns_int8  the same at B 1 x 32768 over a bf16 and an
//                     int8 (QInt8) cache, float queries (the pools' other formats);
//   ragged_decode     16 sequences of log-uniform lengths in [256, 32768] (fixed seed),
//                     one new token each, one call;
//   stream_yardstick  a streaming read of as many bytes as the K/V of a decode shape or
//                     of ragged_decode (the decode kernel's own ratio to it, contiguous,
//                     tells paging's cost from the kernel's);
//   mixed_step        one call: 4 sequences prefilling a 512-token chunk on top of 2048
//                     cached positions, and 28 sequences decoding over 4096;
//   mixed_parts       the same two groups as two calls, one after the other (both timed);
//   ragged_prefill    8 fresh sequences of 128 ... 2048 new tokens (a geometric spread),
//                     one call;
//   prefill_separate  the same 8 through the contiguous fused Sdpa, one call per sequence:
//                     the fused kernel's rate on the same work, which ragged_prefill is
//                     judged against (it charges paging and batching together);
//   prefill_separate_paged  the same 8 as 8 PagedAttention calls (batching alone);
//   ragged_in_turns, mixed_in_turns, ragged_prefill_in_turns  ragged_decode against
//                     stream_yardstick, mixed_step against mixed_parts, ragged_prefill against
//                     prefill_separate, timed in turn as paged_in_turns is;
//   bf16_prefill_in_turns  2048 new tokens, bf16 activations over a bf16 pool of block 16 or
//                     64, against Sdpa over contiguous bf16 keys and values, timed in turn;
//   fork_memory       8 forks of a 4096-token prompt: block counts as counters.
//
//   bench_paged --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// PagedAttention reads the new tokens' keys and values from the cache, so they must be
// appended before the call. Every row appends once, in its setup, and then times the
// attention call alone, again and again over the same cache: the new positions simply
// stay in it. An engine would append and then attend each step; the append (a copy of
// the new tokens' K/V) is not what these rows measure.
//
// Keys and values repeat with a period of 4096 positions (two fixed random tables), so
// filling a gigabyte of cache takes a copy, not a gigabyte of random numbers; the
// decode kernels' cost does not depend on the values. Sequences are filled block by
// block in turn, as decode steps would fill them (the pool's placement keeps each one's
// blocks side by side all the same: detail/free_blocks.hpp).
//
// GB/s = bytes of K and V read / time. GFLOP/s = 4 * H * D * (allowed query-key pairs) /
// time. tokens/s = new tokens (query rows) / time.
#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.hpp"

namespace {

using attnforge::Index;
using attnforge::RaggedBatch;
using attnforge::SeqId;
using attnforge::Tensor;
namespace af = attnforge;
namespace bench = attnforge::bench;

constexpr Index kHeads = 32;
constexpr Index kKvHeads = 8;
constexpr Index kHeadDim = 128;
constexpr Index kPeriod = 4096;  // positions after which the keys and values repeat
constexpr double kTokenBytes = 2.0 * kKvHeads * kHeadDim * sizeof(float);  // K and V

// The keys and values of positions [0, kPeriod), (Hkv, kPeriod, D) each.
struct KvSource {
  Tensor<float, 3> k = bench::random_tensor<float, 3>({kKvHeads, kPeriod, kHeadDim}, 2);
  Tensor<float, 3> v = bench::random_tensor<float, 3>({kKvHeads, kPeriod, kHeadDim}, 3);

  // Positions [first, first + n) as (Hkv, n, D); the range may not wrap the period.
  af::ConstView<float, 3> keys(Index first, Index n) const { return rows(k, first, n); }
  af::ConstView<float, 3> values(Index first, Index n) const { return rows(v, first, n); }

 private:
  static af::ConstView<float, 3> rows(const Tensor<float, 3>& t, Index first, Index n) {
    return af::ConstView<float, 3>(t).narrow(1, first % kPeriod, n);
  }
};

const KvSource& kv_source() {
  static const auto source = std::make_unique<KvSource>();
  return *source;
}

// A paged cache (storage S) holding sequences of the given lengths (block tables exactly
// as large as needed), filled one block per sequence in turn.
template <typename S>
struct PagedSetOf {
  std::unique_ptr<af::PagedKVCache<S>> cache;
  std::vector<SeqId> seqs;
};
using PagedSet = PagedSetOf<float>;

template <typename S = float>
PagedSetOf<S> paged_set(const std::vector<Index>& lengths, Index block_size) {
  Index n_blocks = 0;
  for (Index len : lengths) n_blocks += (len + block_size - 1) / block_size;
  PagedSetOf<S> set;
  set.cache = std::make_unique<af::PagedKVCache<S>>(n_blocks, block_size, kKvHeads, kHeadDim);
  for (std::size_t s = 0; s < lengths.size(); ++s) set.seqs.push_back(set.cache->add_sequence());
  const KvSource& src = kv_source();
  for (bool more = true; more;) {
    more = false;
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      const Index len = set.cache->seq_len(set.seqs[s]);
      const Index n = std::min(block_size - len % block_size, lengths[s] - len);
      if (n <= 0) continue;
      set.cache->append(set.seqs[s], src.keys(len, n), src.values(len, n));
      more = more || len + n < lengths[s];
    }
  }
  return set;
}

// The batch of `new_tokens[s]` new tokens of each sequence, packed in order.
RaggedBatch ragged_batch(const std::vector<SeqId>& seqs, const std::vector<Index>& new_tokens) {
  RaggedBatch batch{seqs, {0}};
  for (Index n : new_tokens) batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n);
  return batch;
}

template <typename T = float, typename KV = T>
af::PagedAttention<T, KV> causal_paged(int threads) {
  af::SdpaOptions options;
  options.causal = true;
  return af::PagedAttention<T, KV>(options, bench::device_for(threads));
}

template <typename T = float, typename KV = T>
af::Sdpa<T, KV> causal_sdpa(int threads) {
  af::SdpaOptions options;
  options.causal = true;
  return af::Sdpa<T, KV>(options, bench::device_for(threads));
}

double total(const std::vector<Index>& values) {
  double sum = 0;
  for (Index v : values) sum += static_cast<double>(v);
  return sum;
}

void set_rate(benchmark::State& state, const char* name, double per_iteration) {
  state.counters[name] = benchmark::Counter(per_iteration * static_cast<double>(state.iterations()),
                                            benchmark::Counter::kIsRate);
}

// Calls `call` once (which sizes its scratch), then once per iteration.
void time_each_iteration(benchmark::State& state, const std::function<void()>& call) {
  call();
  for (auto _ : state) {
    call();
    benchmark::ClobberMemory();
  }
}

// ---- Decode: contiguous against paged ------------------------------------------------

struct DecodeInputs {
  Index batch = 0;
  Index kv_len = 0;
  Tensor<float, 4> q, out;  // (B, H, 1, D), the same memory as the packed (B, H, D)
  std::unique_ptr<af::KVCache<float>> contiguous;
  std::map<Index, PagedSet> paged;  // by block size
};

// One query token per batch row over kv_len cached positions (the token's own position
// included). The contiguous cache has one spare position, so its prefix is a strided view
// as in a real engine. Every shape's caches, paged ones of every block size, stay built
// (about 2 GB in all: bench::built_once).
DecodeInputs& decode_inputs(Index batch, Index kv_len) {
  return bench::built_once(std::pair{batch, kv_len}, [](const std::pair<Index, Index>& shape) {
    DecodeInputs in;
    in.batch = shape.first;
    in.kv_len = shape.second;
    in.q = bench::random_tensor<float, 4>({in.batch, kHeads, 1, kHeadDim}, 1);
    in.out = Tensor<float, 4>(in.batch, kHeads, 1, kHeadDim);
    return in;
  });
}

// A contiguous cache (storage S) of kv_len positions per batch row, and one spare.
template <typename S>
std::unique_ptr<af::KVCache<S>> filled_cache(Index batch, Index kv_len) {
  auto cache = std::make_unique<af::KVCache<S>>(batch, kv_len + 1, kKvHeads, kHeadDim);
  const KvSource& src = kv_source();
  for (Index p = 0; p < kv_len; p += kPeriod) {
    const Index n = std::min(kPeriod, kv_len - p);
    // Every batch row gets the same keys (batch stride 0), as in the paged cache.
    const auto rows = [&](const af::ConstView<float, 3>& one) {
      return af::ConstView<float, 4>(one.data(), {batch, kKvHeads, n, kHeadDim},
                                     {0, one.stride(0), one.stride(1), 1});
    };
    cache->update(rows(src.keys(p, n)), rows(src.values(p, n)));
  }
  return cache;
}

const af::KVCache<float>& contiguous_cache(DecodeInputs& in) {
  if (!in.contiguous) in.contiguous = filled_cache<float>(in.batch, in.kv_len);
  return *in.contiguous;
}

const PagedSet& decode_paged(DecodeInputs& in, Index block_size) {
  PagedSet& set = in.paged[block_size];
  if (!set.cache) {
    set = paged_set(std::vector<Index>(static_cast<std::size_t>(in.batch), in.kv_len), block_size);
  }
  return set;
}

// One decode step of a shape, ready to call: Sdpa over the contiguous KVCache, or
// PagedAttention over the PagedKVCache of one block size (one new token per sequence).
struct ContiguousDecodeStep {
  DecodeInputs& in;
  af::KVPrefix<float> kv;
  af::Sdpa<float> sdpa;
  void operator()() { sdpa(in.q, kv.keys, kv.values, af::StridedView<float, 4>(in.out)); }
};
ContiguousDecodeStep contiguous_decode_step(DecodeInputs& in, int threads) {
  return {in, contiguous_cache(in).prefix(), causal_sdpa(threads)};
}

struct PagedDecodeStep {
  const PagedSet& set;
  RaggedBatch step;
  af::ConstView<float, 3> q;
  af::StridedView<float, 3> out;
  af::PagedAttention<float> attention;
  void operator()() { attention(q, *set.cache, step, out); }
};
PagedDecodeStep paged_decode_step(DecodeInputs& in, Index block_size, int threads) {
  const PagedSet& set = decode_paged(in, block_size);
  return {set, ragged_batch(set.seqs, std::vector<Index>(set.seqs.size(), 1)),
          af::ConstView<float, 3>(in.q.data(), {in.batch, kHeads, kHeadDim}),
          af::StridedView<float, 3>(in.out.data(), {in.batch, kHeads, kHeadDim}),
          causal_paged(threads)};
}

void run_decode(benchmark::State& state, Index batch, Index kv_len, int threads) {
  ContiguousDecodeStep decode = contiguous_decode_step(decode_inputs(batch, kv_len), threads);
  time_each_iteration(state, [&] { decode(); });
  set_rate(state, "GB/s", kTokenBytes * static_cast<double>(batch * kv_len) * 1e-9);
}

void run_paged_decode(benchmark::State& state, Index batch, Index kv_len, Index block_size,
                      int threads) {
  PagedDecodeStep decode = paged_decode_step(decode_inputs(batch, kv_len), block_size, threads);
  time_each_iteration(state, [&] { decode(); });
  set_rate(state, "GB/s", kTokenBytes * static_cast<double>(batch * kv_len) * 1e-9);
}

// A contiguous and a paged call timed in turn: sets paged/contiguous, the median over
// iterations of contiguous time / paged time (the paged rate as a fraction of the
// contiguous one), and returns the paged call's times.
std::vector<double> time_paged_against_contiguous(benchmark::State& state,
                                                  const std::function<void()>& contiguous,
                                                  const std::function<void()>& paged) {
  const auto seconds = bench::time_in_turns<2>(state, {contiguous, paged});
  state.counters["paged/contiguous"] = bench::median_ratio(seconds[0], seconds[1]);
  return seconds[1];
}

// A contiguous and a paged decode timed in turn with streaming reads of the memory each
// one reads (bench::StreamRead over `cache` and `pool`): paged/contiguous as above, and
// contiguous/cache_stream and paged/pool_stream, each decode's rate as a fraction of a read
// of its own bytes. Buffers of one process can stream at rates far apart, so the two
// decodes' rates can differ by how fast their memory is as well as by their kernels;
// the last two ratios take that out.
void time_decodes_in_turns(benchmark::State& state, const std::function<void()>& contiguous,
                           const std::function<void()>& paged, std::vector<bench::MemorySpan> cache,
                           std::vector<bench::MemorySpan> pool, int threads) {
  bench::StreamRead read_cache(std::move(cache), threads);
  bench::StreamRead read_pool(std::move(pool), threads);
  const auto seconds = bench::time_in_turns<4>(
      state, {contiguous, paged, [&] { read_cache(); }, [&] { read_pool(); }});
  state.counters["paged/contiguous"] = bench::median_ratio(seconds[0], seconds[1]);
  state.counters["contiguous/cache_stream"] = bench::median_ratio(seconds[2], seconds[0]);
  state.counters["paged/pool_stream"] = bench::median_ratio(seconds[3], seconds[1]);
}

// The paged and the contiguous decode of one shape timed in turn.
void run_paged_in_turns(benchmark::State& state, Index batch, Index kv_len, Index block_size,
                        int threads) {
  DecodeInputs& in = decode_inputs(batch, kv_len);
  ContiguousDecodeStep contiguous = contiguous_decode_step(in, threads);
  PagedDecodeStep paged = paged_decode_step(in, block_size, threads);
  time_decodes_in_turns(
      state, [&] { contiguous(); }, [&] { paged(); }, bench::cache_spans(contiguous.kv),
      bench::cache_spans(*paged.set.cache, paged.set.seqs), threads);
}

// paged_in_turns for a bf16 or int8 cache (storage S, float queries) at B 1 x
// kFormatKvLen: its caches, built on first use and kept.
constexpr Index kFormatKvLen = 32768;

template <typename S>
struct FormatDecodeInputs {
  std::unique_ptr<af::KVCache<S>> contiguous = filled_cache<S>(1, kFormatKvLen);
  std::map<Index, PagedSetOf<S>> paged;  // by block size
};

template <typename S>
void run_paged_in_turns_as(benchmark::State& state, Index block_size, int threads) {
  static const auto formats = std::make_unique<FormatDecodeInputs<S>>();
  PagedSetOf<S>& set = formats->paged[block_size];
  if (!set.cache) set = paged_set<S>({kFormatKvLen}, block_size);
  DecodeInputs& in = decode_inputs(1, kFormatKvLen);
  af::Sdpa<float, S> sdpa = causal_sdpa<float, S>(threads);
  af::PagedAttention<float, S> attention = causal_paged<float, S>(threads);
  const af::KVPrefix<S> kv = formats->contiguous->prefix();
  const RaggedBatch step = ragged_batch(set.seqs, {1});
  const af::ConstView<float, 3> q(in.q.data(), {1, kHeads, kHeadDim});
  const af::StridedView<float, 3> out(in.out.data(), {1, kHeads, kHeadDim});
  time_decodes_in_turns(
      state, [&] { sdpa(in.q, kv.keys, kv.values, af::StridedView<float, 4>(in.out)); },
      [&] { attention(q, *set.cache, step, out); }, bench::cache_spans(kv),
      bench::cache_spans(*set.cache, set.seqs), threads);
}

// ---- Ragged decode -------------------------------------------------------------------

constexpr Index kRaggedSeqs = 16;
constexpr Index kRaggedMin = 256;
constexpr Index kRaggedMax = 32768;
constexpr Index kRaggedBlock = 64;
constexpr unsigned kRaggedSeed = 13;

// Log-uniform in [kRaggedMin, kRaggedMax], from a written-out mapping of mt19937 draws
// so every platform gets the same lengths.
std::vector<Index> ragged_lengths() {
  std::mt19937 gen(kRaggedSeed);
  const double log_ratio = std::log(static_cast<double>(kRaggedMax) / kRaggedMin);
  std::vector<Index> lengths;
  for (Index s = 0; s < kRaggedSeqs; ++s) {
    const double u = static_cast<double>(gen()) * 0x1.0p-32;
    lengths.push_back(static_cast<Index>(std::lround(kRaggedMin * std::exp(u * log_ratio))));
  }
  return lengths;
}

struct RaggedDecodeInputs {
  std::vector<Index> lengths = ragged_lengths();
  PagedSet set = paged_set(lengths, kRaggedBlock);
  Tensor<float, 3> q = bench::random_tensor<float, 3>({kRaggedSeqs, kHeads, kHeadDim}, 1);
  Tensor<float, 3> out = Tensor<float, 3>(kRaggedSeqs, kHeads, kHeadDim);
};

RaggedDecodeInputs& ragged_decode_inputs() {
  static const auto in = std::make_unique<RaggedDecodeInputs>();
  return *in;
}

double ragged_decode_bytes() { return kTokenBytes * total(ragged_lengths()); }

// One decode step of every ragged sequence, ready to call.
struct RaggedDecodeStep {
  RaggedDecodeInputs& in;
  RaggedBatch step;
  af::PagedAttention<float> attention;
  void operator()() { attention(in.q, *in.set.cache, step, in.out); }
};
RaggedDecodeStep ragged_decode_step(int threads) {
  RaggedDecodeInputs& in = ragged_decode_inputs();
  return {in,
          ragged_batch(in.set.seqs, std::vector<Index>(static_cast<std::size_t>(kRaggedSeqs), 1)),
          causal_paged(threads)};
}

void run_ragged_decode(benchmark::State& state, int threads) {
  RaggedDecodeStep decode = ragged_decode_step(threads);
  time_each_iteration(state, [&] { decode(); });
  set_rate(state, "GB/s", ragged_decode_bytes() * 1e-9);
}

// The ragged decode, a streaming read of as many bytes of the yardstick's buffer and one
// of the pool memory the decode reads, timed in turn: ragged/stream and ragged/pool_stream
// are the medians over iterations of stream time / ragged time (the ragged decode's rate
// as a fraction of each stream's).
void run_ragged_in_turns(benchmark::State& state, int threads) {
  RaggedDecodeStep decode = ragged_decode_step(threads);
  bench::StreamRead read(ragged_decode_bytes(), threads);
  bench::StreamRead read_pool(bench::cache_spans(*decode.in.set.cache, decode.in.set.seqs),
                              threads);
  const auto seconds =
      bench::time_in_turns<3>(state, {[&] { read(); }, [&] { decode(); }, [&] { read_pool(); }});
  state.counters["ragged/stream"] = bench::median_ratio(seconds[0], seconds[1]);
  state.counters["ragged/pool_stream"] = bench::median_ratio(seconds[2], seconds[1]);
}

void run_stream(benchmark::State& state, double bytes, int threads) {
  bench::StreamRead read(bytes, threads);
  time_each_iteration(state, [&] { read(); });
  set_rate(state, "GB/s", bytes * 1e-9);
}

// ---- Mixed step: chunked prefills and decodes ----------------------------------------

constexpr Index kMixedPrefills = 4;
constexpr Index kMixedChunk = 512;
constexpr Index kMixedCached = 2048;
constexpr Index kMixedDecodes = 28;
constexpr Index kMixedDecodeLen = 4096;
constexpr Index kMixedBlock = 64;

// The prefilling sequences come first in the packed batch, then the decoding ones; q and
// out of each group are a contiguous range of the packed tokens.
struct MixedInputs {
  std::vector<Index> lengths, new_tokens;
  PagedSet set;
  RaggedBatch all, prefills, decodes;
  Tensor<float, 3> q, out;

  MixedInputs() {
    for (Index s = 0; s < kMixedPrefills; ++s) {
      lengths.push_back(kMixedCached + kMixedChunk);
      new_tokens.push_back(kMixedChunk);
    }
    for (Index s = 0; s < kMixedDecodes; ++s) {
      lengths.push_back(kMixedDecodeLen);
      new_tokens.push_back(1);
    }
    set = paged_set(lengths, kMixedBlock);
    const auto split = set.seqs.begin() + kMixedPrefills;
    const auto split_new = new_tokens.begin() + kMixedPrefills;
    all = ragged_batch(set.seqs, new_tokens);
    prefills = ragged_batch({set.seqs.begin(), split}, {new_tokens.begin(), split_new});
    decodes = ragged_batch({split, set.seqs.end()}, {split_new, new_tokens.end()});
    q = bench::random_tensor<float, 3>({all.total_tokens(), kHeads, kHeadDim}, 1);
    out = Tensor<float, 3>(q.dimensions());
  }

  // Packed tokens [first, first + n) of q / out.
  af::ConstView<float, 3> q_rows(Index first, Index n) const {
    return af::ConstView<float, 3>(q).narrow(0, first, n);
  }
  af::StridedView<float, 3> out_rows(Index first, Index n) {
    return af::StridedView<float, 3>(out).narrow(0, first, n);
  }
};

MixedInputs& mixed_inputs() {
  static const auto in = std::make_unique<MixedInputs>();
  return *in;
}

// The whole mixed step as one call, ready to call.
struct MixedStep {
  MixedInputs& in;
  af::PagedAttention<float> attention;
  void operator()() { attention(in.q, *in.set.cache, in.all, in.out); }
};

// The two groups as two calls, each on its own PagedAttention (as two engines' steps
// would be), so neither call re-sizes the other's scratch.
struct MixedParts {
  MixedInputs& in;
  af::PagedAttention<float> prefill, decode;
  af::ConstView<float, 3> q_prefill = in.q_rows(0, in.prefills.total_tokens());
  af::ConstView<float, 3> q_decode =
      in.q_rows(in.prefills.total_tokens(), in.decodes.total_tokens());
  af::StridedView<float, 3> out_prefill = in.out_rows(0, in.prefills.total_tokens());
  af::StridedView<float, 3> out_decode =
      in.out_rows(in.prefills.total_tokens(), in.decodes.total_tokens());
  void operator()() {
    prefill(q_prefill, *in.set.cache, in.prefills, out_prefill);
    decode(q_decode, *in.set.cache, in.decodes, out_decode);
  }
};

void run_mixed_step(benchmark::State& state, int threads) {
  MixedStep step{mixed_inputs(), causal_paged(threads)};
  time_each_iteration(state, [&] { step(); });
  set_rate(state, "tokens/s", static_cast<double>(step.in.all.total_tokens()));
}

void run_mixed_parts(benchmark::State& state, int threads) {
  MixedParts parts{mixed_inputs(), causal_paged(threads), causal_paged(threads)};
  time_each_iteration(state, [&] { parts(); });
  set_rate(state, "tokens/s", static_cast<double>(parts.in.all.total_tokens()));
}

// The mixed step and its two parts timed in turn: mixed/parts is the median over
// iterations of the step's time / the parts' time.
void run_mixed_in_turns(benchmark::State& state, int threads) {
  MixedStep step{mixed_inputs(), causal_paged(threads)};
  MixedParts parts{mixed_inputs(), causal_paged(threads), causal_paged(threads)};
  const auto seconds = bench::time_in_turns<2>(state, {[&] { parts(); }, [&] { step(); }});
  state.counters["mixed/parts"] = bench::median_ratio(seconds[1], seconds[0]);
}

// ---- Ragged prefill ------------------------------------------------------------------

constexpr Index kPrefillSeqs = 8;
constexpr Index kPrefillMin = 128;
constexpr Index kPrefillMax = 2048;
constexpr Index kPrefillBlock = 64;

// kPrefillMin * r^s for s = 0 .. 7 with r^7 = kPrefillMax / kPrefillMin, rounded.
std::vector<Index> prefill_lengths() {
  const double ratio =
      std::pow(static_cast<double>(kPrefillMax) / kPrefillMin, 1.0 / (kPrefillSeqs - 1));
  std::vector<Index> lengths;
  for (Index s = 0; s < kPrefillSeqs; ++s) {
    lengths.push_back(static_cast<Index>(std::lround(kPrefillMin * std::pow(ratio, s))));
  }
  return lengths;
}

// Fresh sequences: the cache holds exactly their new tokens. Sequence s's keys and values
// are positions [0, n_s) of the source, for the paged cache and the contiguous calls alike.
struct PrefillInputs {
  std::vector<Index> lengths = prefill_lengths();
  PagedSet set = paged_set(lengths, kPrefillBlock);
  RaggedBatch batch = ragged_batch(set.seqs, lengths);
  Tensor<float, 3> q = bench::random_tensor<float, 3>({batch.total_tokens(), kHeads, kHeadDim}, 1);
  Tensor<float, 3> out = Tensor<float, 3>(q.dimensions());

  // Sequence s's tokens of a packed (total, H, D) tensor, as the (1, H, n, D) view the
  // paged kernels build of them.
  template <typename S>
  af::StridedView<S, 4> sequence_view(const af::StridedView<S, 3>& packed, Index s) const {
    const Index first = batch.first_token(s), n = batch.new_tokens(s);
    return af::StridedView<S, 4>(packed.data() + first * packed.stride(0), {1, kHeads, n, kHeadDim},
                                 {0, packed.stride(1), packed.stride(0), 1});
  }
};

PrefillInputs& prefill_inputs() {
  static const auto in = std::make_unique<PrefillInputs>();
  return *in;
}

double prefill_pairs() {
  double pairs = 0;
  for (Index n : prefill_lengths()) pairs += bench::causal_pairs(n, n);
  return pairs;
}

void set_prefill_flops(benchmark::State& state) {
  set_rate(state, "GFLOP/s", 4.0 * kHeads * kHeadDim * prefill_pairs() * 1e-9);
}

// The 8 sequences' prefill as one ragged call, ready to call.
struct RaggedPrefill {
  PrefillInputs& in;
  af::PagedAttention<float> attention;
  void operator()() { attention(in.q, *in.set.cache, in.batch, in.out); }
};

// The same 8 through the contiguous fused Sdpa, one call per sequence, ready to call.
struct SeparatePrefills {
  struct Call {
    af::ConstView<float, 4> q, k, v;
    af::StridedView<float, 4> out;
  };
  std::vector<Call> calls;
  af::Sdpa<float> sdpa;
  void operator()() {
    for (const Call& c : calls) sdpa(c.q, c.k, c.v, c.out);
  }
};
SeparatePrefills separate_prefills(int threads) {
  PrefillInputs& in = prefill_inputs();
  SeparatePrefills made{{}, causal_sdpa(threads)};
  const KvSource& src = kv_source();
  const auto batch_of_one = [](const af::ConstView<float, 3>& rows) {
    return af::ConstView<float, 4>(rows.data(), {1, kKvHeads, rows.dimension(1), kHeadDim},
                                   {0, rows.stride(0), rows.stride(1), 1});
  };
  for (Index s = 0; s < kPrefillSeqs; ++s) {
    const Index n = in.batch.new_tokens(s);
    made.calls.push_back({in.sequence_view(af::ConstView<float, 3>(in.q), s),
                          batch_of_one(src.keys(0, n)), batch_of_one(src.values(0, n)),
                          in.sequence_view(af::StridedView<float, 3>(in.out), s)});
  }
  return made;
}

void run_ragged_prefill(benchmark::State& state, int threads) {
  RaggedPrefill prefill{prefill_inputs(), causal_paged(threads)};
  time_each_iteration(state, [&] { prefill(); });
  set_prefill_flops(state);
}

void run_prefill_separate(benchmark::State& state, int threads) {
  SeparatePrefills prefills = separate_prefills(threads);
  time_each_iteration(state, [&] { prefills(); });
  set_prefill_flops(state);
}

// The ragged prefill and the separate contiguous calls timed in turn: ragged/separate is
// the median over iterations of the separate calls' time / the ragged call's time (the
// ragged rate as a fraction of the fused kernel's on the same work).
void run_ragged_prefill_in_turns(benchmark::State& state, int threads) {
  RaggedPrefill prefill{prefill_inputs(), causal_paged(threads)};
  SeparatePrefills prefills = separate_prefills(threads);
  const auto seconds = bench::time_in_turns<2>(state, {[&] { prefills(); }, [&] { prefill(); }});
  state.counters["ragged/separate"] = bench::median_ratio(seconds[0], seconds[1]);
}

void run_prefill_separate_paged(benchmark::State& state, int threads) {
  PrefillInputs& in = prefill_inputs();
  struct Call {
    RaggedBatch one;
    af::ConstView<float, 3> q;
    af::StridedView<float, 3> out;
  };
  std::vector<Call> calls;
  for (Index s = 0; s < kPrefillSeqs; ++s) {
    const Index first = in.batch.first_token(s), n = in.batch.new_tokens(s);
    calls.push_back({ragged_batch({in.set.seqs[static_cast<std::size_t>(s)]}, {n}),
                     af::ConstView<float, 3>(in.q).narrow(0, first, n),
                     af::StridedView<float, 3>(in.out).narrow(0, first, n)});
  }
  af::PagedAttention<float> attention = causal_paged(threads);
  time_each_iteration(state, [&] {
    for (const Call& c : calls) attention(c.q, *in.set.cache, c.one, c.out);
  });
  set_prefill_flops(state);
}

// ---- bf16 prefill over a bf16 pool ---------------------------------------------------

// One sequence of kBf16PrefillLen new tokens, bf16 activations over a bf16 pool (the fused
// kernel's AVX512-BF16 dot products where the CPU has them), and Sdpa over contiguous
// copies of the same keys and values, timed in turn. The pool's runs of 16 rows split
// every key tile, whose keys the kernel then copies and whose values it pairs run by run.
// GFLOP/s counts the causal pairs, as the rows above.
constexpr Index kBf16PrefillLen = 2048;

struct Bf16PrefillInputs {
  using BF = Eigen::bfloat16;
  PagedSetOf<BF> set;
  Tensor<BF, 4> q, k, v, out;  // (1, H or Hkv, L, D); the paged call sees q and out packed
};

void run_bf16_prefill_in_turns(benchmark::State& state, Index block_size, int threads) {
  using BF = Eigen::bfloat16;
  constexpr Index kLen = kBf16PrefillLen;
  Bf16PrefillInputs& in = bench::built_once(block_size, [](Index block) {
    Bf16PrefillInputs made;
    made.set = paged_set<BF>({kLen}, block);
    const std::array<Index, 4> kv_dims{1, kKvHeads, kLen, kHeadDim};
    made.k = made.set.cache->gather_keys(made.set.seqs[0]).reshape(kv_dims);
    made.v = made.set.cache->gather_values(made.set.seqs[0]).reshape(kv_dims);
    made.q = bench::random_tensor<float, 4>({1, kHeads, kLen, kHeadDim}, 4).cast<BF>();
    made.out = Tensor<BF, 4>(1, kHeads, kLen, kHeadDim);
    return made;
  });
  af::Sdpa<BF> sdpa = causal_sdpa<BF>(threads);
  af::PagedAttention<BF> attention = causal_paged<BF>(threads);
  const RaggedBatch batch = ragged_batch(in.set.seqs, {kLen});
  // (1, H, L, D) seen as the packed (L, H, D).
  const std::array<Index, 3> packed{kLen, kHeads, kHeadDim}, strides{kHeadDim, kLen * kHeadDim, 1};
  const af::ConstView<BF, 3> q(in.q.data(), packed, strides);
  const af::StridedView<BF, 3> out(in.out.data(), packed, strides);
  const std::vector<double> paged_seconds = time_paged_against_contiguous(
      state, [&] { sdpa(in.q, in.k, in.v, af::StridedView<BF, 4>(in.out)); },
      [&] { attention(q, *in.set.cache, batch, out); });
  // The paged rate: the median over iterations of flops / the paged call's time.
  const double flops = 4.0 * kHeads * kHeadDim * static_cast<double>(kLen * (kLen + 1) / 2);
  const std::vector<double> work(paged_seconds.size(), flops * 1e-9);
  state.counters["paged_GFLOP/s"] = bench::median_ratio(work, paged_seconds);
}

// ---- Fork memory ---------------------------------------------------------------------

constexpr Index kPrompt = 4096;
constexpr Index kForks = 8;

// Parallel sampling: a prompt is prefilled once, forked kForks times, and each fork
// appends its first sampled token. Times one such round (forks, appends, frees); the
// counters are block counts of one round:
//   blocks_prompt           the prompt alone;
//   blocks_forked           prompt + forks, right after forking (all blocks shared);
//   blocks_in_use           after every fork appended its token (a private block each
//                           once the prompt fills its last block, else a copy of it);
//   blocks_without_sharing  what the prompt and forks would hold without sharing;
//   in_use_per_prompt       blocks_in_use / blocks_prompt.
void run_fork_memory(benchmark::State& state, Index block_size) {
  const Index prompt_blocks = (kPrompt + block_size - 1) / block_size;
  af::PagedKVCache<float> cache(prompt_blocks + 2 * kForks, block_size, kKvHeads, kHeadDim);
  const SeqId prompt = cache.add_sequence();
  const KvSource& src = kv_source();
  for (Index p = 0; p < kPrompt; p += kPeriod) {
    const Index n = std::min(kPeriod, kPrompt - p);
    cache.append(prompt, src.keys(p, n), src.values(p, n));
  }
  const auto token_k = src.keys(kPrompt, 1), token_v = src.values(kPrompt, 1);
  std::vector<SeqId> forks;
  Index forked = 0, in_use = 0, without_sharing = 0;
  for (auto _ : state) {
    forks.clear();
    for (Index f = 0; f < kForks; ++f) forks.push_back(cache.fork(prompt));
    forked = cache.blocks_in_use();
    for (SeqId id : forks) cache.append(id, token_k, token_v);
    in_use = cache.blocks_in_use();
    without_sharing = cache.blocks_without_sharing();
    for (SeqId id : forks) cache.free_sequence(id);
  }
  state.counters["blocks_prompt"] = static_cast<double>(prompt_blocks);
  state.counters["blocks_forked"] = static_cast<double>(forked);
  state.counters["blocks_in_use"] = static_cast<double>(in_use);
  state.counters["blocks_without_sharing"] = static_cast<double>(without_sharing);
  state.counters["in_use_per_prompt"] =
      static_cast<double>(in_use) / static_cast<double>(prompt_blocks);
}

// ---- Registration --------------------------------------------------------------------

void register_all() {
  const std::pair<Index, Index> decode_shapes[] = {{1, 32768}, {8, 4096}};
  // Copies, not structured bindings: C++17 lets no lambda capture a binding.
  for (const auto& batch_and_len : decode_shapes) {
    const Index batch = batch_and_len.first, kv_len = batch_and_len.second;
    const std::string shape = "/Skv:" + std::to_string(kv_len) + "/B:" + std::to_string(batch);
    for (int threads : {1, 2}) {
      bench::add("decode" + shape + "/threads:" + std::to_string(threads), benchmark::kMicrosecond,
                 [=](benchmark::State& s) { run_decode(s, batch, kv_len, threads); });
      bench::add("stream_yardstick" + shape + "/threads:" + std::to_string(threads),
                 benchmark::kMicrosecond, [=](benchmark::State& s) {
                   run_stream(s, kTokenBytes * static_cast<double>(batch * kv_len), threads);
                 });
    }
    for (Index block : {16, 64, 256}) {
      for (int threads : {1, 2}) {
        bench::add("paged_decode" + shape + "/block:" + std::to_string(block) +
                       "/threads:" + std::to_string(threads),
                   benchmark::kMicrosecond, [=](benchmark::State& s) {
                     run_paged_decode(s, batch, kv_len, block, threads);
                   });
        bench::add("paged_in_turns" + shape + "/block:" + std::to_string(block) +
                       "/threads:" + std::to_string(threads),
                   benchmark::kMicrosecond, [=](benchmark::State& s) {
                     run_paged_in_turns(s, batch, kv_len, block, threads);
                   });
      }
    }
  }
  for (Index block : {16, 64}) {
    for (int threads : {1, 2}) {
      const std::string rest = "/Skv:" + std::to_string(kFormatKvLen) +
                               "/B:1/block:" + std::to_string(block) +
                               "/threads:" + std::to_string(threads);
      bench::add("paged_in_turns_bf16" + rest, benchmark::kMicrosecond, [=](benchmark::State& s) {
        run_paged_in_turns_as<Eigen::bfloat16>(s, block, threads);
      });
      bench::add("paged_in_turns_int8" + rest, benchmark::kMicrosecond,
                 [=](benchmark::State& s) { run_paged_in_turns_as<af::QInt8>(s, block, threads); });
    }
  }
  for (int threads : {1, 2}) {
    const std::string t = "/threads:" + std::to_string(threads);
    const std::string seqs = "/seqs:" + std::to_string(kRaggedSeqs);
    bench::add("ragged_decode" + seqs + "/block:" + std::to_string(kRaggedBlock) + t,
               benchmark::kMicrosecond,
               [=](benchmark::State& s) { run_ragged_decode(s, threads); });
    bench::add("stream_yardstick" + seqs + t, benchmark::kMicrosecond,
               [=](benchmark::State& s) { run_stream(s, ragged_decode_bytes(), threads); });
    bench::add("ragged_in_turns" + seqs + "/block:" + std::to_string(kRaggedBlock) + t,
               benchmark::kMicrosecond,
               [=](benchmark::State& s) { run_ragged_in_turns(s, threads); });
  }
  const std::string mixed =
      "/prefill:" + std::to_string(kMixedPrefills) + "x" + std::to_string(kMixedChunk) + "+" +
      std::to_string(kMixedCached) + "/decode:" + std::to_string(kMixedDecodes) + "x" +
      std::to_string(kMixedDecodeLen) + "/block:" + std::to_string(kMixedBlock);
  for (int threads : {1, 2}) {
    const std::string t = "/threads:" + std::to_string(threads);
    bench::add("mixed_step" + mixed + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_mixed_step(s, threads); });
    bench::add("mixed_parts" + mixed + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_mixed_parts(s, threads); });
    bench::add("mixed_in_turns" + mixed + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_mixed_in_turns(s, threads); });
  }
  const std::string prefill = "/seqs:" + std::to_string(kPrefillSeqs) +
                              "/len:" + std::to_string(kPrefillMin) + "-" +
                              std::to_string(kPrefillMax);
  const std::string block = "/block:" + std::to_string(kPrefillBlock);
  for (int threads : {1, 2}) {
    const std::string t = "/threads:" + std::to_string(threads);
    bench::add("ragged_prefill" + prefill + block + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_ragged_prefill(s, threads); });
    bench::add("prefill_separate" + prefill + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_prefill_separate(s, threads); });
    bench::add("prefill_separate_paged" + prefill + block + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_prefill_separate_paged(s, threads); });
    bench::add("ragged_prefill_in_turns" + prefill + block + t, benchmark::kMillisecond,
               [=](benchmark::State& s) { run_ragged_prefill_in_turns(s, threads); });
  }
  for (Index block : {16, 64}) {
    for (int threads : {1, 2}) {
      bench::add("bf16_prefill_in_turns/S:" + std::to_string(kBf16PrefillLen) +
                     "/block:" + std::to_string(block) + "/threads:" + std::to_string(threads),
                 benchmark::kMillisecond,
                 [=](benchmark::State& s) { run_bf16_prefill_in_turns(s, block, threads); });
    }
  }
  for (Index block_size : {16, 64, 256}) {
    bench::add("fork_memory/prompt:" + std::to_string(kPrompt) +
                   "/forks:" + std::to_string(kForks) + "/block:" + std::to_string(block_size),
               benchmark::kMicrosecond,
               [=](benchmark::State& s) { run_fork_memory(s, block_size); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return attnforge::bench::run_registered_benchmarks(argc, argv);
}
