// Shared pieces of the benchmark binaries: inputs, thread pools, yardsticks measured
// in the same run (FMA peak, streaming read), and memory counters.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <attnforge/attnforge.hpp>
#include <attnforge/detail/huge_pages.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace attnforge::bench {

// data[0, n) = deterministic N(0, 1) values.
template <typename T>
void fill_random(T* data, Index n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < n; ++i) data[i] = static_cast<T>(normal(rng));
}

// Deterministic N(0, 1) tensor.
template <typename T, int Rank>
Tensor<T, Rank> random_tensor(const std::array<Index, Rank>& dims, unsigned seed) {
  Tensor<T, Rank> t(dims);
  fill_random(t.data(), t.size(), seed);
  return t;
}

// A benchmark row timed in real time (the pools' threads do the work) in `unit`.
template <typename Body>
void add(const std::string& name, benchmark::TimeUnit unit, Body body) {
  benchmark::RegisterBenchmark(name.c_str(), body)->UseRealTime()->Unit(unit);
}

// Rows that compare calls in turn: after one untimed call of each (which sizes its
// scratch), each iteration runs every call once, starting with the next one each time, and
// times each. Calls measured side by side share the machine's moment, so their ratios hold
// where the memory bandwidth of a shared host drifts between separate rows by more than a
// target's margin. Returns each call's times (seconds).
template <std::size_t N>
std::array<std::vector<double>, N> time_in_turns(
    benchmark::State& state, const std::array<std::function<void()>, N>& calls) {
  using Clock = std::chrono::steady_clock;
  for (const auto& call : calls) call();
  std::array<std::vector<double>, N> seconds;
  std::size_t first = 0;
  for (auto _ : state) {
    for (std::size_t k = 0; k < N; ++k) {
      const std::size_t c = (first + k) % N;
      const Clock::time_point start = Clock::now();
      calls[c]();
      benchmark::ClobberMemory();
      seconds[c].push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
    first = (first + 1) % N;
  }
  return seconds;
}

// The median over iterations of scale * a[i] / b[i]: a ratio of two calls timed in turn.
inline double median_ratio(const std::vector<double>& a, const std::vector<double>& b,
                           double scale = 1.0) {
  std::vector<double> ratio;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    ratio.push_back(scale * a[i] / b[i]);
  if (ratio.empty()) return 0.0;
  const auto middle = ratio.begin() + static_cast<std::ptrdiff_t>(ratio.size() / 2);
  std::nth_element(ratio.begin(), middle, ratio.end());
  return *middle;
}

// A pool per thread count, created once per process (pool start-up is not what we time).
inline const Eigen::ThreadPoolDevice* device_for(int threads) {
  if (threads <= 1) return nullptr;
  struct Pool {
    explicit Pool(int n) : pool(n), device(&pool, n) {}
    Eigen::ThreadPool pool;
    Eigen::ThreadPoolDevice device;
  };
  static std::vector<std::unique_ptr<Pool>> pools(16);
  auto& slot = pools[static_cast<std::size_t>(threads)];
  if (!slot) slot = std::make_unique<Pool>(threads);
  return &slot->device;
}

// Memory high-water mark of the process, in MiB. reset_peak_memory() sets it back to the
// current resident size (Linux: /proc/self/clear_refs), so the peak of one benchmark
// can be read after it. Returns -1 where unsupported.
inline void reset_peak_memory() {
  std::ofstream clear("/proc/self/clear_refs");
  if (clear) clear << "5";
}
inline double peak_memory_mib() {
  std::ifstream status("/proc/self/status");
  std::string key;
  while (status >> key) {
    if (key == "VmHWM:") {
      double kib = 0;
      status >> kib;
      return kib / 1024.0;
    }
    status.ignore(1 << 20, '\n');
  }
  return -1.0;
}

// The inputs build(key) makes, built on the first call for `key` and kept for the process,
// so rows of different shapes can take turns (--benchmark_enable_random_interleaving)
// without rebuilding them. One map per call site (each passes its own lambda type).
template <typename Key, typename Build>
auto& built_once(const Key& key, Build&& build) {
  using Inputs = decltype(build(key));
  static std::map<Key, std::unique_ptr<Inputs>> built;
  std::unique_ptr<Inputs>& inputs = built[key];
  if (!inputs) inputs = std::make_unique<Inputs>(build(key));
  return *inputs;
}

// The buffer a streaming yardstick reads: at least `floats` floats, of which it reads the
// first `floats`. The largest one asked for is kept (filling 1 GiB with random numbers
// takes longer than reading it many times), so rows of different sizes can take turns
// (--benchmark_enable_random_interleaving) without refilling it.
// Its pages are huge pages where the OS grants them, as a KVCache's are (kv_cache.hpp),
// so that the yardstick reads memory the way the caches it is compared with are read.
inline const Tensor<float, 1>& stream_buffer(Index floats) {
  static std::unique_ptr<Tensor<float, 1>> cached;
  if (!cached || cached->size() < floats) {
    cached.reset();
    cached = std::make_unique<Tensor<float, 1>>(floats);
    detail::advise_huge_pages(cached->data(), static_cast<std::size_t>(floats) * sizeof(float));
    fill_random(cached->data(), floats, 9);
  }
  return *cached;
}

// [data, data + bytes): memory a kernel reads.
struct MemorySpan {
  const char* data;
  std::size_t bytes;
};

// The rows [0, dimension(2)) of every (batch row, head) of a row view (a KVCache prefix,
// a PagedKVCache sequence's keys or values), row_bytes each.
template <typename View>
void add_row_spans(const View& view, std::size_t row_bytes, std::vector<MemorySpan>& spans) {
  for (Index b = 0; b < view.dimension(0); ++b) {
    for (Index h = 0; h < view.dimension(1); ++h) {
      for (Index p = 0; p < view.dimension(2); ++p)
        spans.push_back({reinterpret_cast<const char*>(view.row(b, h, p)), row_bytes});
    }
  }
}

// The memory of a cache's keys and values, scales included: what a decode over it reads.
template <typename KV>
std::size_t stored_row_bytes(Index head_dim) {
  return static_cast<std::size_t>(detail::stored_row_width<KV>(head_dim)) * sizeof(KV);
}
template <typename KV>
std::vector<MemorySpan> cache_spans(const KVPrefix<KV>& kv) {
  const std::size_t row_bytes = stored_row_bytes<KV>(kv.keys.dimension(3));
  std::vector<MemorySpan> spans;
  add_row_spans(kv.keys, row_bytes, spans);
  add_row_spans(kv.values, row_bytes, spans);
  return spans;
}
template <typename KV>
std::vector<MemorySpan> cache_spans(const PagedKVCache<KV>& cache, const std::vector<SeqId>& seqs) {
  const std::size_t row_bytes = stored_row_bytes<KV>(cache.head_dim());
  std::vector<MemorySpan> spans;
  for (SeqId id : seqs) {
    add_row_spans(cache.keys(id), row_bytes, spans);
    add_row_spans(cache.values(id), row_bytes, spans);
  }
  return spans;
}

// The sum of the 64-bit words of [data, data + bytes) (and of its trailing bytes): a read
// of every byte whatever type it holds, in integers, which no bit pattern slows down.
inline std::uint64_t sum_words(const char* data, std::size_t bytes) {
  std::uint64_t sum = 0;
  const std::size_t words = bytes / sizeof(std::uint64_t);
  for (std::size_t i = 0; i < words; ++i) {
    std::uint64_t word;
    std::memcpy(&word, data + i * sizeof word, sizeof word);
    sum += word;
  }
  for (std::size_t i = words * sizeof(std::uint64_t); i < bytes; ++i)
    sum += static_cast<unsigned char>(data[i]);
  return sum;
}

// A streaming read, ready to call: the yardstick of every memory-bound row, for rows that
// time it alone or in turn with others. It reads its memory in address order, neighbouring
// spans joined, in pieces of at most 1 MiB spread over the pool.
class StreamRead {
 public:
  // `bytes` of a buffer kept for the yardstick rows (stream_buffer).
  StreamRead(double bytes, int threads)
      : StreamRead(buffer_span(static_cast<std::size_t>(bytes)), threads) {}
  // The given memory: the very bytes a kernel reads, wherever the OS placed them. Buffers
  // of one process can stream at rates far apart (pages from different memory), so a
  // kernel is best judged against a read of its own memory.
  StreamRead(std::vector<MemorySpan> spans, int threads) : device_(device_for(threads)) {
    std::sort(spans.begin(), spans.end(),
              [](const MemorySpan& a, const MemorySpan& b) { return a.data < b.data; });
    constexpr std::size_t kPiece = std::size_t{1} << 20;
    for (const MemorySpan& span : spans) {
      MemorySpan rest = span;
      if (!pieces_.empty() && pieces_.back().data + pieces_.back().bytes == rest.data) {
        const std::size_t join = std::min(rest.bytes, kPiece - pieces_.back().bytes);
        pieces_.back().bytes += join;
        rest = {rest.data + join, rest.bytes - join};
      }
      for (; rest.bytes > 0;) {
        const std::size_t take = std::min(rest.bytes, kPiece);
        pieces_.push_back({rest.data, take});
        rest = {rest.data + take, rest.bytes - take};
      }
    }
    partial_.resize(pieces_.size());
  }

  void operator()() {
    detail::parallel_for_items(device_, static_cast<Index>(pieces_.size()), [&](int, Index i) {
      const MemorySpan& piece = pieces_[static_cast<std::size_t>(i)];
      partial_[static_cast<std::size_t>(i)] = sum_words(piece.data, piece.bytes);
    });
    benchmark::DoNotOptimize(std::accumulate(partial_.begin(), partial_.end(), std::uint64_t{0}));
  }

 private:
  static std::vector<MemorySpan> buffer_span(std::size_t bytes) {
    const Index floats = static_cast<Index>(bytes / sizeof(float));
    return {{reinterpret_cast<const char*>(stream_buffer(floats).data()), bytes}};
  }

  const Eigen::ThreadPoolDevice* device_;
  std::vector<MemorySpan> pieces_;
  std::vector<std::uint64_t> partial_;
};

// Keeps a packet in a register and opaque to the optimiser, without the store to
// memory that benchmark::DoNotOptimize would force on a vector.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ATTNFORGE_BENCH_OPAQUE(x) asm volatile("" : "+v"(x))
#elif defined(__GNUC__) && defined(__aarch64__)
#define ATTNFORGE_BENCH_OPAQUE(x) asm volatile("" : "+w"(x))
#else
#define ATTNFORGE_BENCH_OPAQUE(x) benchmark::DoNotOptimize(x)
#endif

// Twelve independent multiply-add chains on the widest packet: the FMA peak of this
// machine (12 chains cover a 4-6 cycle FMA latency at 2 FMAs per cycle). Named
// variables, not an array, so every chain lives in its own register.
inline double fma_chains(long iterations) {
  namespace simd = detail::simd;
  using Packet = simd::Packet<float>;
  const Packet a = simd::splat<Packet>(0.999999f);
  const Packet b = simd::splat<Packet>(1e-7f);
  Packet c0 = simd::splat<Packet>(1.00f), c1 = simd::splat<Packet>(1.01f), c2 = simd::splat<Packet>(1.02f),
         c3 = simd::splat<Packet>(1.03f), c4 = simd::splat<Packet>(1.04f), c5 = simd::splat<Packet>(1.05f),
         c6 = simd::splat<Packet>(1.06f), c7 = simd::splat<Packet>(1.07f), c8 = simd::splat<Packet>(1.08f),
         c9 = simd::splat<Packet>(1.09f), c10 = simd::splat<Packet>(1.10f), c11 = simd::splat<Packet>(1.11f);
  for (long it = 0; it < iterations; ++it) {
#define ATTNFORGE_BENCH_CHAIN(c) \
  c = simd::fma(c, a, b);        \
  ATTNFORGE_BENCH_OPAQUE(c);
    ATTNFORGE_BENCH_CHAIN(c0) ATTNFORGE_BENCH_CHAIN(c1) ATTNFORGE_BENCH_CHAIN(c2)
    ATTNFORGE_BENCH_CHAIN(c3) ATTNFORGE_BENCH_CHAIN(c4) ATTNFORGE_BENCH_CHAIN(c5)
    ATTNFORGE_BENCH_CHAIN(c6) ATTNFORGE_BENCH_CHAIN(c7) ATTNFORGE_BENCH_CHAIN(c8)
    ATTNFORGE_BENCH_CHAIN(c9) ATTNFORGE_BENCH_CHAIN(c10) ATTNFORGE_BENCH_CHAIN(c11)
#undef ATTNFORGE_BENCH_CHAIN
  }
  const Packet sum = simd::add(simd::add(simd::add(simd::add(c0, c1), simd::add(c2, c3)),
                                         simd::add(simd::add(c4, c5), simd::add(c6, c7))),
                               simd::add(simd::add(c8, c9), simd::add(c10, c11)));
  return static_cast<double>(simd::sum(sum));
}
inline constexpr int kFmaChains = 12;

inline void register_fma_peak() {
  for (int threads : {1, 2}) {
    const std::string name = "fma_peak/threads:" + std::to_string(threads);
    benchmark::RegisterBenchmark(name.c_str(), [threads](benchmark::State& state) {
      constexpr long kIterations = 1 << 22;
      constexpr double kFlops = 2.0 * kFmaChains * detail::simd::kWidth<float> * kIterations;
      for (auto _ : state) {
        std::vector<std::thread> workers;
        for (int t = 1; t < threads; ++t) workers.emplace_back([] { fma_chains(kIterations); });
        benchmark::DoNotOptimize(fma_chains(kIterations));
        for (auto& w : workers) w.join();
      }
      state.counters["GFLOP/s"] = benchmark::Counter(kFlops * threads * 1e-9 * state.iterations(),
                                                     benchmark::Counter::kIsRate);
    })->UseRealTime()->Unit(benchmark::kMillisecond);
  }
}

// Number of (query, key) pairs a causal mask allows for Sq queries over Skv keys.
inline double causal_pairs(Index q_len, Index kv_len) {
  const double offset = static_cast<double>(kv_len - q_len);
  const double n = static_cast<double>(q_len);
  return n * offset + n * (n + 1) / 2;
}

// The CPU's name as /proc/cpuinfo gives it, followed by its family and model numbers (a
// virtual machine may report only a generic name). Empty where /proc/cpuinfo has no
// "model name" line.
inline std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, name, family, model;
  const auto value = [&line] {
    const auto colon = line.find(':');
    return colon == std::string::npos || colon + 2 > line.size() ? std::string()
                                                                 : line.substr(colon + 2);
  };
  while (std::getline(cpuinfo, line) && line.find_first_not_of(" \t") != std::string::npos) {
    const std::string key = line.substr(0, line.find_first_of("\t:"));
    if (key == "model name") name = value();
    if (key == "cpu family") family = value();
    if (key == "model") model = value();
  }
  if (name.empty()) return name;
  if (!family.empty() && !model.empty()) name += " (family " + family + ", model " + model + ")";
  return name;
}

// The body of every benchmark binary's main, after it has registered its rows. The CPU's
// name goes into the context of the output (`cpu_model`), where scripts/plot_bench.py
// reads it.
inline int run_registered_benchmarks(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const std::string cpu = cpu_model();
  if (!cpu.empty()) benchmark::AddCustomContext("cpu_model", cpu);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace attnforge::bench
