// Prefill attention (Sq = Skv = S, causal), fp32, B = 1, H = 32, Hkv = 8: the fused
// kernel against the reference path, a materialised-scores Eigen baseline, an Eigen
// GEMM of one head's Q K^T shape and the FMA peak, all in the same run.
//
//   bench_prefill --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
//
// Every row reports GFLOP/s; for attention rows it is the effective rate
// 4 * H * D * (allowed query-key pairs) / time, so masked-out work never counts.
#include <cmath>
#include <limits>
#include <memory>

#include "bench_util.hpp"

namespace {

using attnforge::Index;
using attnforge::Tensor;
namespace af = attnforge;
namespace bench = attnforge::bench;

constexpr Index kHeads = 32;
constexpr Index kKvHeads = 8;

struct Inputs {
  Index seq_len = 0;
  Index head_dim = 0;
  Tensor<float, 4> q, k, v, out;
};

// Inputs of the current shape, kept between benchmarks of the same shape (S = 8192 is
// 320 MiB of q, k, v and out).
Inputs& inputs_for(Index seq_len, Index head_dim) {
  static std::unique_ptr<Inputs> cached;
  if (!cached || cached->seq_len != seq_len || cached->head_dim != head_dim) {
    cached.reset();
    cached = std::make_unique<Inputs>();
    cached->seq_len = seq_len;
    cached->head_dim = head_dim;
    cached->q = bench::random_tensor<float, 4>({1, kHeads, seq_len, head_dim}, 1);
    cached->k = bench::random_tensor<float, 4>({1, kKvHeads, seq_len, head_dim}, 2);
    cached->v = bench::random_tensor<float, 4>({1, kKvHeads, seq_len, head_dim}, 3);
    cached->out = Tensor<float, 4>(1, kHeads, seq_len, head_dim);
  }
  return *cached;
}

double inputs_mib(const Inputs& in) {
  return static_cast<double>(in.q.size() + in.k.size() + in.v.size() + in.out.size()) *
         sizeof(float) / (1024.0 * 1024.0);
}

void set_attention_counters(benchmark::State& state, Index seq_len, Index head_dim) {
  const double flops =
      4.0 * kHeads * static_cast<double>(head_dim) * bench::causal_pairs(seq_len, seq_len);
  state.counters["GFLOP/s"] = benchmark::Counter(
      flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void run_sdpa(benchmark::State& state, Index seq_len, Index head_dim, int threads,
              af::SdpaPath path) {
  Inputs& in = inputs_for(seq_len, head_dim);
  af::SdpaOptions options;
  options.causal = true;
  options.path = path;
  af::Sdpa<float> sdpa(options, bench::device_for(threads));
  sdpa(in.q, in.k, in.v, af::StridedView<float, 4>(in.out));  // sizes the scratch once
  bench::reset_peak_memory();
  for (auto _ : state) {
    sdpa(in.q, in.k, in.v, af::StridedView<float, 4>(in.out));
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, seq_len, head_dim);
  state.counters["peak_MiB"] = bench::peak_memory_mib();
  state.counters["inputs_MiB"] = inputs_mib(in);
}

// The new mask kinds on the causal prefill, each against the plain `fused` row (same
// GFLOP/s definition: allowed pairs only):
//   fused_bool_mask  causal attention inside 4 packed documents of S / 4, given as a
//                    (1, 1, S, S) boolean attn_mask (no causal option, no doc ids);
//   fused_doc_ids    the same pattern as causal + doc_ids, what the mask is judged against
//                    for its own cost (short documents cost more per pair than one long one);
//   fused_alibi      causal with ALiBi slopes 2^(-8 h / H) on every head.
// masks_in_turns times the plain causal call and the three above in turn
// (bench::time_in_turns), for their rate ratios measured side by side.
enum class MaskRow { kCausal, kBoolMask, kDocIds, kAlibi };

// One fused call of a MaskRow over the inputs of its shape, and the pairs it may attend.
class MaskedPrefill {
 public:
  MaskedPrefill(Inputs& in, int threads, MaskRow row)
      : in_(in), out_(in.out), sdpa_(options_for(row), bench::device_for(threads)) {
    const Index seq_len = in.seq_len;
    const Index doc = seq_len / 4;
    pairs_ = bench::causal_pairs(seq_len, seq_len);
    if (row == MaskRow::kBoolMask) {
      mask_ = Tensor<bool, 4>(1, 1, seq_len, seq_len);
      for (Index i = 0; i < seq_len; ++i) {
        for (Index j = 0; j < seq_len; ++j) mask_(0, 0, i, j) = j <= i && j / doc == i / doc;
      }
      masks_.attn_mask = mask_;
      pairs_ = 4.0 * bench::causal_pairs(doc, doc);
    } else if (row == MaskRow::kDocIds) {
      doc_ids_ = Tensor<af::DocId, 2>(1, seq_len);
      for (Index j = 0; j < seq_len; ++j) doc_ids_(0, j) = j / doc;
      masks_.doc_ids = doc_ids_;
      pairs_ = 4.0 * bench::causal_pairs(doc, doc);
    }
  }
  MaskedPrefill(const MaskedPrefill&) = delete;
  MaskedPrefill& operator=(const MaskedPrefill&) = delete;

  void operator()() { sdpa_(in_.q, in_.k, in_.v, out_, masks_); }
  double flops() const { return 4.0 * kHeads * static_cast<double>(in_.head_dim) * pairs_; }

 private:
  static af::SdpaOptions options_for(MaskRow row) {
    af::SdpaOptions options;
    options.path = af::SdpaPath::kFused;
    options.causal = row != MaskRow::kBoolMask;  // the bool mask carries causality itself
    if (row == MaskRow::kAlibi) {
      for (Index h = 1; h <= kHeads; ++h) {
        options.alibi_slopes.push_back(std::exp2(-8.0 * static_cast<double>(h) / kHeads));
      }
    }
    return options;
  }

  Inputs& in_;
  af::StridedView<float, 4> out_;
  af::Sdpa<float> sdpa_;
  Tensor<bool, 4> mask_;
  Tensor<af::DocId, 2> doc_ids_;
  af::Masks masks_;
  double pairs_ = 0.0;
};

void run_mask_row(benchmark::State& state, Index seq_len, Index head_dim, int threads,
                  MaskRow row) {
  MaskedPrefill call(inputs_for(seq_len, head_dim), threads, row);
  call();
  for (auto _ : state) {
    call();
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      call.flops() * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void run_masks_in_turns(benchmark::State& state, Index seq_len, Index head_dim, int threads) {
  Inputs& in = inputs_for(seq_len, head_dim);
  MaskedPrefill causal(in, threads, MaskRow::kCausal);
  MaskedPrefill bool_mask(in, threads, MaskRow::kBoolMask);
  MaskedPrefill doc_ids(in, threads, MaskRow::kDocIds);
  MaskedPrefill alibi(in, threads, MaskRow::kAlibi);
  const auto seconds = bench::time_in_turns<4>(
      state, {[&] { causal(); }, [&] { bool_mask(); }, [&] { doc_ids(); }, [&] { alibi(); }});
  // Rate ratio = (flops_x / t_x) / (flops_causal / t_causal).
  const auto rate_ratio = [&](std::size_t k, const MaskedPrefill& row) {
    return bench::median_ratio(seconds[0], seconds[k], row.flops() / causal.flops());
  };
  state.counters["bool_mask/fused"] = rate_ratio(1, bool_mask);
  state.counters["doc_ids/fused"] = rate_ratio(2, doc_ids);
  state.counters["alibi/fused"] = rate_ratio(3, alibi);
}

// What a user would write with Eigen alone: per head, the full S x S score matrix by
// an Eigen product, the causal mask, a row softmax, then the product with V.
void run_eigen_naive(benchmark::State& state, Index seq_len, Index head_dim) {
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ConstMap = Eigen::Map<const Matrix>;
  Inputs& in = inputs_for(seq_len, head_dim);
  const Index n_rep = kHeads / kKvHeads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const Index head_size = seq_len * head_dim;
  Matrix scores(seq_len, seq_len);
  bench::reset_peak_memory();
  for (auto _ : state) {
    for (Index h = 0; h < kHeads; ++h) {
      const ConstMap q(in.q.data() + h * head_size, seq_len, head_dim);
      const ConstMap k(in.k.data() + (h / n_rep) * head_size, seq_len, head_dim);
      const ConstMap v(in.v.data() + (h / n_rep) * head_size, seq_len, head_dim);
      Eigen::Map<Matrix> out(in.out.data() + h * head_size, seq_len, head_dim);
      scores.noalias() = q * k.transpose();
      scores *= scale;
      for (Index i = 0; i < seq_len; ++i) {
        auto row = scores.row(i);
        row.tail(seq_len - i - 1).setConstant(-std::numeric_limits<float>::infinity());
        const float row_max = row.maxCoeff();
        row = (row.array() - row_max).exp().matrix();
        row /= row.sum();
      }
      out.noalias() = scores * v;
    }
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, seq_len, head_dim);
  state.counters["peak_MiB"] = bench::peak_memory_mib();
  state.counters["inputs_MiB"] = inputs_mib(in);
}

// One head's Q K^T shape (S x D by D x S) as a plain Eigen GEMM: the "just call GEMM"
// yardstick. GFLOP/s here are real FLOPs, 2 * S * S * D.
void run_gemm_yardstick(benchmark::State& state, Index seq_len, Index head_dim) {
  using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Inputs& in = inputs_for(seq_len, head_dim);
  const Eigen::Map<const Matrix> q(in.q.data(), seq_len, head_dim);
  const Eigen::Map<const Matrix> k(in.k.data(), seq_len, head_dim);
  Matrix scores(seq_len, seq_len);
  for (auto _ : state) {
    scores.noalias() = q * k.transpose();
    benchmark::DoNotOptimize(scores.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * static_cast<double>(seq_len) * static_cast<double>(seq_len) *
                       static_cast<double>(head_dim);
  state.counters["GFLOP/s"] = benchmark::Counter(
      flops * 1e-9 * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

// Whether this build and CPU have the AVX512-BF16 prefill kernel.
bool bf16_dot_here() { return af::detail::kHasBf16DotKernel && af::detail::cpu_has_avx512_bf16(); }

// bf16 copies of a shape's q, k and v, made once for every bf16 call that reads them.
struct Bf16Inputs {
  using Bf16 = Eigen::bfloat16;
  explicit Bf16Inputs(const Inputs& in) : q(to_bf16(in.q)), k(to_bf16(in.k)), v(to_bf16(in.v)) {}

  static Tensor<Bf16, 4> to_bf16(const Tensor<float, 4>& t) {
    Tensor<Bf16, 4> out(t.dimensions());
    for (Index i = 0; i < t.size(); ++i) out.data()[i] = static_cast<Bf16>(t.data()[i]);
    return out;
  }

  Tensor<Bf16, 4> q, k, v;
};

// The same causal prefill with bf16 q, k, v and out (accumulation in float), on the
// AVX512-BF16 dot products (kDotProduct) or converting tiles to float (kConvert): one call
// over the bf16 inputs, into its own output.
class Bf16Prefill {
 public:
  using Bf16 = Eigen::bfloat16;
  Bf16Prefill(const Bf16Inputs& in, int threads, af::Bf16Kernel kernel)
      : in_(in), out_(in.q.dimensions()), sdpa_(options_for(kernel), bench::device_for(threads)) {}
  // It keeps a reference to its inputs: none to a temporary.
  Bf16Prefill(Bf16Inputs&&, int, af::Bf16Kernel) = delete;

  void operator()() { sdpa_(in_.q, in_.k, in_.v, af::StridedView<Bf16, 4>(out_)); }

 private:
  static af::SdpaOptions options_for(af::Bf16Kernel kernel) {
    af::SdpaOptions options;
    options.causal = true;
    options.bf16_kernel = kernel;
    return options;
  }

  const Bf16Inputs& in_;
  Tensor<Bf16, 4> out_;
  af::Sdpa<Bf16> sdpa_;
};

void run_bf16(benchmark::State& state, Index seq_len, Index head_dim, int threads,
              af::Bf16Kernel kernel) {
  if (kernel == af::Bf16Kernel::kDotProduct && !bf16_dot_here()) {
    state.SkipWithError("no AVX512-BF16 kernel here (CPU or build)");
    return;
  }
  const Bf16Inputs in(inputs_for(seq_len, head_dim));
  Bf16Prefill call(in, threads, kernel);
  call();
  for (auto _ : state) {
    call();
    benchmark::ClobberMemory();
  }
  set_attention_counters(state, seq_len, head_dim);
}

// The fp32 fused call and the bf16 calls (dot products where the CPU has them, the
// conversion fallback, kAuto's choice) in turn (bench::time_in_turns): bf16_dot/fused,
// bf16_fallback/fused and bf16_auto/fused are their rate ratios measured side by side.
void run_bf16_in_turns(benchmark::State& state, Index seq_len, Index head_dim, int threads) {
  Inputs& in = inputs_for(seq_len, head_dim);
  MaskedPrefill fused(in, threads, MaskRow::kCausal);
  const Bf16Inputs bf16_in(in);
  Bf16Prefill fallback(bf16_in, threads, af::Bf16Kernel::kConvert);
  Bf16Prefill automatic(bf16_in, threads, af::Bf16Kernel::kAuto);
  // Without the dot products, kAuto's call stands in for them (and is the fallback).
  Bf16Prefill dot(bf16_in, threads,
                  bf16_dot_here() ? af::Bf16Kernel::kDotProduct : af::Bf16Kernel::kAuto);
  const auto seconds = bench::time_in_turns<4>(
      state, {[&] { fused(); }, [&] { dot(); }, [&] { fallback(); }, [&] { automatic(); }});
  if (bf16_dot_here())
    state.counters["bf16_dot/fused"] = bench::median_ratio(seconds[0], seconds[1]);
  state.counters["bf16_fallback/fused"] = bench::median_ratio(seconds[0], seconds[2]);
  state.counters["bf16_auto/fused"] = bench::median_ratio(seconds[0], seconds[3]);
}

std::string shape(Index seq_len, Index head_dim) {
  return "/S:" + std::to_string(seq_len) + "/D:" + std::to_string(head_dim);
}

void register_all() {
  bench::register_fma_peak();
  // D = 128 over S = 256 ... 8192 is the sweep that scripts/plot_bench.py draws.
  const std::pair<Index, Index> shapes[] = {{256, 128}, {512, 128},  {1024, 128}, {2048, 128},
                                            {2048, 64}, {4096, 128}, {8192, 128}};
  // Copies, not structured bindings: C++17 lets no lambda capture a binding.
  for (const auto& len_and_dim : shapes) {
    const Index seq_len = len_and_dim.first, head_dim = len_and_dim.second;
    for (int threads : {1, 2}) {
      bench::add("fused" + shape(seq_len, head_dim) + "/threads:" + std::to_string(threads),
                 benchmark::kMillisecond, [=](benchmark::State& s) {
                   run_sdpa(s, seq_len, head_dim, threads, af::SdpaPath::kFused);
                 });
    }
    if (seq_len == 2048 && head_dim == 128) {
      const std::pair<const char*, MaskRow> mask_rows[] = {{"fused_bool_mask", MaskRow::kBoolMask},
                                                           {"fused_doc_ids", MaskRow::kDocIds},
                                                           {"fused_alibi", MaskRow::kAlibi}};
      for (const auto& name_and_row : mask_rows) {
        const std::string name = name_and_row.first;
        const MaskRow row = name_and_row.second;
        for (int threads : {1, 2}) {
          bench::add(name + shape(seq_len, head_dim) + "/threads:" + std::to_string(threads),
                     benchmark::kMillisecond, [=](benchmark::State& s) {
                       run_mask_row(s, seq_len, head_dim, threads, row);
                     });
        }
      }
      for (int threads : {1, 2}) {
        bench::add(
            "masks_in_turns" + shape(seq_len, head_dim) + "/threads:" + std::to_string(threads),
            benchmark::kMillisecond,
            [=](benchmark::State& s) { run_masks_in_turns(s, seq_len, head_dim, threads); });
      }
      // bf16 rows beside the fp32 kernel, and what kAuto picks on this CPU. There is no AMX
      // row: AMX-BF16 tiles are not implemented (no CPU here has them to test on).
      const std::pair<const char*, af::Bf16Kernel> kernels[] = {
          {"bf16_dot", af::Bf16Kernel::kDotProduct},
          {"bf16_fallback", af::Bf16Kernel::kConvert},
          {"bf16_auto", af::Bf16Kernel::kAuto}};
      for (const auto& name_and_kernel : kernels) {
        const std::string name = name_and_kernel.first;
        const af::Bf16Kernel kernel = name_and_kernel.second;
        bench::add(name + shape(seq_len, head_dim) + "/threads:1", benchmark::kMillisecond,
                   [=](benchmark::State& s) { run_bf16(s, seq_len, head_dim, 1, kernel); });
      }
      for (int threads : {1, 2}) {
        bench::add(
            "bf16_in_turns" + shape(seq_len, head_dim) + "/threads:" + std::to_string(threads),
            benchmark::kMillisecond,
            [=](benchmark::State& s) { run_bf16_in_turns(s, seq_len, head_dim, threads); });
      }
    }
    // The reference is scalar double arithmetic (~10 s per call at S = 2048); at
    // S = 8192 one call would take minutes, so it is timed up to S = 2048.
    if (seq_len <= 2048) {
      benchmark::RegisterBenchmark(
          ("reference" + shape(seq_len, head_dim)).c_str(),
          [=](benchmark::State& s) { run_sdpa(s, seq_len, head_dim, 1, af::SdpaPath::kReference); })
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(1);
    }
    bench::add("eigen_naive" + shape(seq_len, head_dim), benchmark::kMillisecond,
               [=](benchmark::State& s) { run_eigen_naive(s, seq_len, head_dim); });
    bench::add("gemm_yardstick" + shape(seq_len, head_dim), benchmark::kMillisecond,
               [=](benchmark::State& s) { run_gemm_yardstick(s, seq_len, head_dim); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  return attnforge::bench::run_registered_benchmarks(argc, argv);
}
