// Decode steps (Sq = 1) against a long KV cache, fp32, H = 32, Hkv = 8, D = 128: the
// decode kernel against the prefill kernel forced on the same inputs, the reference
// path, and a streaming read of as many bytes as the K/V cache holds, all in one run;
// the same keys and values in a bf16, an fp16 and a QInt8 cache (decode_bf16_cache,
// decode_fp16_cache, decode_int8_cache: GB/s counts the bytes each cache holds, scales
// included; the bf16 cache also with Bf16Kernel::kConvert, decode_bf16_convert, and the
// QInt8 cache with Int8Kernel::kDequantize, decode_int8_dequantize). Then a whole
// Attention::forward decode step at dim = 4096, with an fp32 and an int8 cache, against a
// streaming read of its bytes (weights + fp32 cache). decode_in_turns times the fp32,
// bf16, fp16 and int8 decodes, the stream and the fp32 decode with attention sinks of one
// shape in turn, for their ratios side by side (bench::time_in_turns); head_dims_in_turns
// times the fp32, bf16 and int8 decodes at head_dim 64, 80, 96 and 128 and the stream in
// turn.
//
//   bench_decode --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <array>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_util.hpp"

namespace {

using attnforge::Index;
using attnforge::Tensor;
namespace af = attnforge;
namespace bench = attnforge::bench;

constexpr Index kHeads = 32;
constexpr Index kKvHeads = 8;
constexpr Index kHeadDim = 128;
constexpr Index kModelDim = 4096;

struct DecodeInputs {
  Index batch = 0;
  Index kv_len = 0;
  std::unique_ptr<af::KVCache<float>> cache;
  std::unique_ptr<af::KVCache<Eigen::bfloat16>> bf16_cache;  // same keys and values, rounded
  std::unique_ptr<af::KVCache<af::QInt8>> int8_cache;        // and quantized
  std::unique_ptr<af::KVCache<Eigen::half>> fp16_cache;      // rounded, the issue's shapes only
  Tensor<float, 4> q, out;
};

// The shapes the issues set the reduced-precision targets for.
bool issue_shape(Index batch, Index kv_len) {
  return (batch == 1 && kv_len == 32768) || batch == 8;
}

// A cache filled to kv_len (one spare position, so its prefix is a strided view as in
// a real engine) and one query token per batch row; every shape's stay built (about 4 GB
// for all rows: bench::built_once).
DecodeInputs& decode_inputs(Index batch, Index kv_len) {
  return bench::built_once(std::pair{batch, kv_len}, [](const std::pair<Index, Index>& shape) {
    const auto [batch, kv_len] = shape;
    DecodeInputs in;
    in.batch = batch;
    in.kv_len = kv_len;
    in.cache = std::make_unique<af::KVCache<float>>(batch, kv_len + 1, kKvHeads, kHeadDim);
    const auto k = bench::random_tensor<float, 4>({batch, kKvHeads, kv_len, kHeadDim}, 2);
    const auto v = bench::random_tensor<float, 4>({batch, kKvHeads, kv_len, kHeadDim}, 3);
    in.cache->update(k, v);
    in.bf16_cache =
        std::make_unique<af::KVCache<Eigen::bfloat16>>(batch, kv_len + 1, kKvHeads, kHeadDim);
    in.bf16_cache->update(k, v);
    in.int8_cache = std::make_unique<af::KVCache<af::QInt8>>(batch, kv_len + 1, kKvHeads, kHeadDim);
    in.int8_cache->update(k, v);
    if (issue_shape(batch, kv_len)) {
      in.fp16_cache =
          std::make_unique<af::KVCache<Eigen::half>>(batch, kv_len + 1, kKvHeads, kHeadDim);
      in.fp16_cache->update(k, v);
    }
    in.q = bench::random_tensor<float, 4>({batch, kHeads, 1, kHeadDim}, 1);
    in.out = Tensor<float, 4>(batch, kHeads, 1, kHeadDim);
    return in;
  });
}

// Bytes of the keys and values of a KV cache of storage type KV.
template <typename KV = float>
double kv_bytes(Index batch, Index kv_len) {
  return 2.0 * static_cast<double>(batch * kKvHeads * kv_len) *
         static_cast<double>(af::detail::stored_row_width<KV>(kHeadDim)) * sizeof(KV);
}

// Bytes a decode step must move at least once: the four weight matrices and the K/V
// cache it attends over (fp32: what the step_bytes_yardstick streams).
double attention_step_bytes(Index batch, Index kv_len) {
  const double weights =
      2.0 * kModelDim * kHeads * kHeadDim + 2.0 * kModelDim * kKvHeads * kHeadDim;
  return weights * sizeof(float) + kv_bytes(batch, kv_len);
}

void set_bytes_counter(benchmark::State& state, double bytes) {
  state.counters["GB/s"] = benchmark::Counter(
      bytes * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

// Tokens decoded per second: one per batch row per step.
void set_tokens_counter(benchmark::State& state, Index batch) {
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(batch) * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate);
}

// `sinks`: one attention-sink logit per head (decode_sinks), which join the chunk merge.
void run_sdpa(benchmark::State& state, Index batch, Index kv_len, int threads, af::SdpaPath path,
              bool sinks = false) {
  DecodeInputs& in = decode_inputs(batch, kv_len);
  af::SdpaOptions options;
  options.causal = true;
  options.path = path;
  if (sinks) options.sinks.assign(kHeads, 0.5);
  af::Sdpa<float> sdpa(options, bench::device_for(threads));
  const af::KVPrefix<float> kv = in.cache->prefix();
  sdpa(in.q, kv.keys, kv.values, af::StridedView<float, 4>(in.out));
  for (auto _ : state) {
    sdpa(in.q, kv.keys, kv.values, af::StridedView<float, 4>(in.out));
    benchmark::ClobberMemory();
  }
  set_bytes_counter(state, kv_bytes(batch, kv_len));
  set_tokens_counter(state, batch);
}

// Float queries over a bf16, fp16 or QInt8 cache of the same keys and values (mixed
// precision).
template <typename KV>
void run_reduced_cache(benchmark::State& state, Index batch, Index kv_len, int threads,
                       af::Int8Kernel int8_kernel = af::Int8Kernel::kAuto,
                       af::Bf16Kernel bf16_kernel = af::Bf16Kernel::kAuto) {
  DecodeInputs& in = decode_inputs(batch, kv_len);
  af::SdpaOptions options;
  options.causal = true;
  options.int8_kernel = int8_kernel;
  options.bf16_kernel = bf16_kernel;
  af::Sdpa<float, KV> sdpa(options, bench::device_for(threads));
  af::KVPrefix<KV> kv;
  if constexpr (std::is_same_v<KV, af::QInt8>) {
    kv = in.int8_cache->prefix();
  } else if constexpr (std::is_same_v<KV, Eigen::half>) {
    kv = in.fp16_cache->prefix();
  } else {
    kv = in.bf16_cache->prefix();
  }
  sdpa(in.q, kv.keys, kv.values, af::StridedView<float, 4>(in.out));
  for (auto _ : state) {
    sdpa(in.q, kv.keys, kv.values, af::StridedView<float, 4>(in.out));
    benchmark::ClobberMemory();
  }
  set_bytes_counter(state, kv_bytes<KV>(batch, kv_len));
  set_tokens_counter(state, batch);
}

void run_stream(benchmark::State& state, double bytes, int threads) {
  bench::StreamRead read(bytes, threads);
  for (auto _ : state) read();
  set_bytes_counter(state, bytes);
}

// The fp32, bf16-cache, int8-cache and fp16-cache decodes, the stream yardstick, the fp32 decode
// with attention sinks and streaming reads of the fp32 and int8 caches' own memory, of one shape,
// timed in turn (bench::time_in_turns), for the ratios the separate rows above give, measured side
// by side: fp32/stream (the fp32 decode's bytes rate over the stream's), bf16/fp32, int8/fp32,
// fp16/fp32 and sinks/fp32 (tokens/s over the fp32 decode's), int8_bytes/stream (the int8 cache's
// bytes rate, scales included, over the stream's), and fp32/cache_stream and int8/cache_stream:
// each decode's rate over a read of the very bytes it reads, which takes out how fast the memory
// the OS gave each buffer is.
void run_decode_in_turns(benchmark::State& state, Index batch, Index kv_len, int threads) {
  DecodeInputs& in = decode_inputs(batch, kv_len);
  af::SdpaOptions options;
  options.causal = true;
  af::Sdpa<float> fp32(options, bench::device_for(threads));
  af::Sdpa<float, Eigen::bfloat16> bf16(options, bench::device_for(threads));
  af::Sdpa<float, af::QInt8> int8(options, bench::device_for(threads));
  af::Sdpa<float, Eigen::half> fp16(options, bench::device_for(threads));
  af::SdpaOptions sink_options = options;
  sink_options.sinks.assign(kHeads, 0.5);
  af::Sdpa<float> fp32_sinks(sink_options, bench::device_for(threads));
  const af::KVPrefix<float> fp32_kv = in.cache->prefix();
  const af::KVPrefix<Eigen::bfloat16> bf16_kv = in.bf16_cache->prefix();
  const af::KVPrefix<af::QInt8> int8_kv = in.int8_cache->prefix();
  const af::KVPrefix<Eigen::half> fp16_kv = in.fp16_cache->prefix();
  const af::StridedView<float, 4> out(in.out);
  bench::StreamRead read(kv_bytes(batch, kv_len), threads);
  bench::StreamRead read_fp32_cache(bench::cache_spans(fp32_kv), threads);
  bench::StreamRead read_int8_cache(bench::cache_spans(int8_kv), threads);
  const std::array<std::function<void()>, 8> calls = {
      [&] { fp32(in.q, fp32_kv.keys, fp32_kv.values, out); },
      [&] { bf16(in.q, bf16_kv.keys, bf16_kv.values, out); },
      [&] { int8(in.q, int8_kv.keys, int8_kv.values, out); },
      [&] { read(); },
      [&] { fp32_sinks(in.q, fp32_kv.keys, fp32_kv.values, out); },
      [&] { read_fp32_cache(); },
      [&] { read_int8_cache(); },
      [&] { fp16(in.q, fp16_kv.keys, fp16_kv.values, out); }};
  const auto seconds = bench::time_in_turns(state, calls);
  state.counters["fp32/stream"] = bench::median_ratio(seconds[3], seconds[0]);
  state.counters["bf16/fp32"] = bench::median_ratio(seconds[0], seconds[1]);
  state.counters["int8/fp32"] = bench::median_ratio(seconds[0], seconds[2]);
  state.counters["fp16/fp32"] = bench::median_ratio(seconds[0], seconds[7]);
  state.counters["int8_bytes/stream"] = bench::median_ratio(
      seconds[3], seconds[2], kv_bytes<af::QInt8>(batch, kv_len) / kv_bytes(batch, kv_len));
  state.counters["sinks/fp32"] = bench::median_ratio(seconds[0], seconds[4]);
  state.counters["fp32/cache_stream"] = bench::median_ratio(seconds[5], seconds[0]);
  state.counters["int8/cache_stream"] = bench::median_ratio(seconds[6], seconds[2]);
}

// The fp32, bf16 and QInt8 caches of the decode shape at another head_dim (other models:
// 64, 80, 96), built once; at kHeadDim the decode rows' own caches.
struct HeadDimCaches {
  af::KVCache<float>* fp32 = nullptr;
  af::KVCache<Eigen::bfloat16>* bf16 = nullptr;
  af::KVCache<af::QInt8>* int8 = nullptr;
};

HeadDimCaches head_dim_caches(Index head_dim, Index batch, Index kv_len) {
  if (head_dim == kHeadDim) {
    DecodeInputs& in = decode_inputs(batch, kv_len);
    return {in.cache.get(), in.bf16_cache.get(), in.int8_cache.get()};
  }
  using Key = std::array<Index, 3>;
  using Caches =
      std::tuple<std::unique_ptr<af::KVCache<float>>, std::unique_ptr<af::KVCache<Eigen::bfloat16>>,
                 std::unique_ptr<af::KVCache<af::QInt8>>>;
  Caches& built = bench::built_once(Key{head_dim, batch, kv_len}, [](const Key& at) {
    const auto [head_dim, batch, kv_len] = at;
    Caches caches{
        std::make_unique<af::KVCache<float>>(batch, kv_len + 1, kKvHeads, head_dim),
        std::make_unique<af::KVCache<Eigen::bfloat16>>(batch, kv_len + 1, kKvHeads, head_dim),
        std::make_unique<af::KVCache<af::QInt8>>(batch, kv_len + 1, kKvHeads, head_dim)};
    const auto k = bench::random_tensor<float, 4>({batch, kKvHeads, kv_len, head_dim}, 2);
    const auto v = bench::random_tensor<float, 4>({batch, kKvHeads, kv_len, head_dim}, 3);
    std::get<0>(caches)->update(k, v);
    std::get<1>(caches)->update(k, v);
    std::get<2>(caches)->update(k, v);
    return caches;
  });
  return {std::get<0>(built).get(), std::get<1>(built).get(), std::get<2>(built).get()};
}

// The fp32, bf16 and int8 decodes at head_dim 64, 80, 96 and 128 and the stream yardstick
// (as many bytes as the head_dim 128 fp32 cache holds), timed in turn: Dd/stream is the
// fp32 decode's bytes rate at head_dim d over the stream's, bf16_Dd/fp32 and int8_Dd/fp32
// the bf16 and int8 decodes' tokens/s over the fp32 one's at the same head_dim, so each
// head_dim is measured against the same memory in the same minutes (80 ends mid scale
// group and is no multiple of the bf16 dot products' 32 values, 96 has three groups).
void run_head_dims_in_turns(benchmark::State& state, Index batch, Index kv_len, int threads) {
  constexpr std::array<Index, 4> kHeadDims = {64, 80, 96, kHeadDim};
  constexpr std::size_t kN = kHeadDims.size();
  af::SdpaOptions options;
  options.causal = true;
  af::Sdpa<float> sdpa(options, bench::device_for(threads));
  af::Sdpa<float, Eigen::bfloat16> sdpa_bf16(options, bench::device_for(threads));
  af::Sdpa<float, af::QInt8> sdpa_int8(options, bench::device_for(threads));
  std::array<std::function<void()>, 3 * kN + 1> calls;
  std::array<Tensor<float, 4>, kN> q, out;
  for (std::size_t i = 0; i < kN; ++i) {
    const Index d = kHeadDims[i];
    q[i] = bench::random_tensor<float, 4>({batch, kHeads, 1, d}, 1);
    out[i] = Tensor<float, 4>(batch, kHeads, 1, d);
    const HeadDimCaches caches = head_dim_caches(d, batch, kv_len);
    const af::KVPrefix<float> kv = caches.fp32->prefix();
    const af::KVPrefix<Eigen::bfloat16> kv_bf16 = caches.bf16->prefix();
    const af::KVPrefix<af::QInt8> kv_int8 = caches.int8->prefix();
    calls[i] = [&, i, kv] { sdpa(q[i], kv.keys, kv.values, af::StridedView<float, 4>(out[i])); };
    calls[kN + i] = [&, i, kv_bf16] {
      sdpa_bf16(q[i], kv_bf16.keys, kv_bf16.values, af::StridedView<float, 4>(out[i]));
    };
    calls[2 * kN + i] = [&, i, kv_int8] {
      sdpa_int8(q[i], kv_int8.keys, kv_int8.values, af::StridedView<float, 4>(out[i]));
    };
  }
  bench::StreamRead read(kv_bytes(batch, kv_len), threads);
  calls.back() = [&] { read(); };
  const auto seconds = bench::time_in_turns(state, calls);
  for (std::size_t i = 0; i < kN; ++i) {
    const std::string d = std::to_string(kHeadDims[i]);
    const double bytes = static_cast<double>(kHeadDims[i]) / static_cast<double>(kHeadDim);
    state.counters["D" + d + "/stream"] = bench::median_ratio(seconds.back(), seconds[i], bytes);
    state.counters["bf16_D" + d + "/fp32"] = bench::median_ratio(seconds[i], seconds[kN + i]);
    state.counters["int8_D" + d + "/fp32"] = bench::median_ratio(seconds[i], seconds[2 * kN + i]);
  }
}

// One decode token per batch row through Attention::forward at dim 4096 with a cache (of
// storage type CacheT) of kv_len - 1 positions: four projections (matrix-vector products
// for B = 1, the weights read once for all rows) plus attention over kv_len keys.
template <typename CacheT>
void run_attention_step(benchmark::State& state, Index batch, Index kv_len, int threads) {
  af::Attention<float> attention(kModelDim, kHeads, kKvHeads);
  attention.reset_parameters(7);
  attention.set_device(bench::device_for(threads));
  af::RotaryEmbedding<float> rope(kHeadDim, kv_len);
  af::KVCache<CacheT> cache(batch, kv_len, kKvHeads, kHeadDim);
  {
    const auto k = bench::random_tensor<float, 4>({batch, kKvHeads, kv_len - 1, kHeadDim}, 2);
    cache.update(k, k);
  }
  const auto x = bench::random_tensor<float, 3>({batch, 1, kModelDim}, 4);
  Tensor<float, 3> out(batch, 1, kModelDim);
  for (auto _ : state) {
    cache.truncate(kv_len - 1);
    attention.forward_into(x, rope.cos_rows(kv_len - 1, 1), rope.sin_rows(kv_len - 1, 1),
                           af::StridedView<float, 3>(out), &cache);
    benchmark::ClobberMemory();
  }
  set_tokens_counter(state, batch);
  set_bytes_counter(state, attention_step_bytes(batch, kv_len));
}

std::string shape(Index batch, Index kv_len) {
  return "/Skv:" + std::to_string(kv_len) + "/B:" + std::to_string(batch);
}

void register_all() {
  // B = 1 over Skv = 1024 ... 131072 is the sweep that scripts/plot_bench.py draws.
  const std::pair<Index, Index> shapes[] = {{1, 1024},  {1, 4096},   {1, 16384}, {1, 32768},
                                            {1, 65536}, {1, 131072}, {8, 4096}};
  // Copies, not structured bindings: C++17 lets no lambda capture a binding.
  for (const auto& batch_and_len : shapes) {
    const Index batch = batch_and_len.first, kv_len = batch_and_len.second;
    for (int threads : {1, 2}) {
      const std::string suffix = shape(batch, kv_len) + "/threads:" + std::to_string(threads);
      const std::pair<const char*, af::SdpaPath> paths[] = {
          {"decode", af::SdpaPath::kAuto}, {"prefill_forced", af::SdpaPath::kFused}};
      for (const auto& name_and_path : paths) {
        const std::string name = name_and_path.first;
        const af::SdpaPath path = name_and_path.second;
        bench::add(name + suffix, benchmark::kMicrosecond,
                   [=](benchmark::State& s) { run_sdpa(s, batch, kv_len, threads, path); });
      }
      if (issue_shape(batch, kv_len)) {
        bench::add("decode_bf16_cache" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
          run_reduced_cache<Eigen::bfloat16>(s, batch, kv_len, threads);
        });
        // The same cache widened to float for the float kernel (no bf16 dot products).
        bench::add(
            "decode_bf16_convert" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
              run_reduced_cache<Eigen::bfloat16>(s, batch, kv_len, threads, af::Int8Kernel::kAuto,
                                                 af::Bf16Kernel::kConvert);
            });
        // An fp16 cache: widened to float for the float kernel (F16C where the CPU has it).
        bench::add("decode_fp16_cache" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
          run_reduced_cache<Eigen::half>(s, batch, kv_len, threads);
        });
        bench::add("decode_int8_cache" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
          run_reduced_cache<af::QInt8>(s, batch, kv_len, threads);
        });
        // The same cache with the keys dequantized and scored in float (no int8 dot products).
        bench::add(
            "decode_int8_dequantize" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
              run_reduced_cache<af::QInt8>(s, batch, kv_len, threads, af::Int8Kernel::kDequantize);
            });
      }
      if (issue_shape(batch, kv_len)) {
        bench::add("decode_in_turns" + suffix, benchmark::kMicrosecond,
                   [=](benchmark::State& s) { run_decode_in_turns(s, batch, kv_len, threads); });
      }
      if (batch == 1 && kv_len == 32768) {
        bench::add("head_dims_in_turns" + suffix, benchmark::kMicrosecond,
                   [=](benchmark::State& s) { run_head_dims_in_turns(s, batch, kv_len, threads); });
        bench::add("decode_sinks" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
          run_sdpa(s, batch, kv_len, threads, af::SdpaPath::kAuto, /*sinks=*/true);
        });
      }
      bench::add("stream_yardstick" + suffix, benchmark::kMicrosecond,
                 [=](benchmark::State& s) { run_stream(s, kv_bytes(batch, kv_len), threads); });
    }
    bench::add(
        "reference" + shape(batch, kv_len), benchmark::kMicrosecond,
        [=](benchmark::State& s) { run_sdpa(s, batch, kv_len, 1, af::SdpaPath::kReference); });
  }
  // Whole steps at the decode shapes above where the cache outweighs the projections
  // (Skv 32768; B 8 x 4096), and at Skv 4096, where the fp32 weights are most of the bytes.
  const std::pair<Index, Index> step_shapes[] = {{1, 4096}, {1, 32768}, {8, 4096}};
  for (const auto& batch_and_len : step_shapes) {
    const Index batch = batch_and_len.first, kv_len = batch_and_len.second;
    for (int threads : {1, 2}) {
      const std::string suffix =
          "/dim:4096" + shape(batch, kv_len) + "/threads:" + std::to_string(threads);
      bench::add("attention_step" + suffix, benchmark::kMicrosecond, [=](benchmark::State& s) {
        run_attention_step<float>(s, batch, kv_len, threads);
      });
      bench::add(
          "attention_step_int8_cache" + suffix, benchmark::kMicrosecond,
          [=](benchmark::State& s) { run_attention_step<af::QInt8>(s, batch, kv_len, threads); });
      bench::add("step_bytes_yardstick" + suffix, benchmark::kMicrosecond,
                 [=](benchmark::State& s) {
                   run_stream(s, attention_step_bytes(batch, kv_len), threads);
                 });
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return attnforge::bench::run_registered_benchmarks(argc, argv);
}
