// The fuzz target's shared harness: run statistics, checks, the expected outcome of a
// call, input decoding helpers, and the scenarios each translation unit defines
// (fuzz_attention.cpp says what the target checks).
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "accuracy_budget.hpp"
#include "attnforge/attnforge.hpp"
#include "test_util.hpp"

namespace fuzz {

namespace af = attnforge;
using af::Index;

// Per-scenario counts, printed at exit when ATTNFORGE_FUZZ_STATS is set (how many calls
// were checked against the brute force, or for the cache scenarios against the shadow
// model, and how many were rightly rejected); the paged scenario's PagedAttention calls,
// checked against the brute force, are counted apart.
enum Scenario { kSdpaScenario, kCacheScenario, kAttentionScenario, kPagedScenario };
inline constexpr int kScenarios = 4;
// What ran over the caches of one reduced storage type (QInt8, bf16), so a run shows
// whether the fuzzer reached them and their dot-product decode at all.
struct ReducedCacheStats {
  long inputs[kScenarios] = {};  // inputs of a scenario that ran over such a cache
  long cache_sdpa_compared = 0;  // Sdpa calls over such a KVCache's prefix
  long dot_compared = 0;         // calls multiplied by the dot products on the stored form
  long paged_dot_compared = 0;   // PagedAttention calls with a sequence so multiplied
};
struct Stats {
  long calls[kScenarios] = {};
  long compared[kScenarios] = {};
  long rejected[kScenarios] = {};
  long paged_attention_calls = 0, paged_attention_compared = 0, paged_attention_rejected = 0;
  long paged_bf16_activation_compared = 0;  // of those compared, bf16 queries and outputs
  ReducedCacheStats qint8, bf16;
  ~Stats() {
    if (std::getenv("ATTNFORGE_FUZZ_STATS") == nullptr) return;
    const char* names[kScenarios] = {"sdpa", "kv_cache", "attention", "paged"};
    for (int i = 0; i < kScenarios; ++i) {
      std::fprintf(
          stderr,
          "fuzz_attention stats: %-9s calls %ld, checked against the reference %ld, rejected %ld\n",
          names[i], calls[i], compared[i], rejected[i]);
    }
    std::fprintf(stderr,
                 "fuzz_attention stats: paged     of which PagedAttention calls %ld, checked "
                 "against the reference %ld (bf16 activations %ld), rejected %ld\n",
                 paged_attention_calls, paged_attention_compared, paged_bf16_activation_compared,
                 paged_attention_rejected);
    const auto print = [](const char* storage, const ReducedCacheStats& s, const char* products) {
      std::fprintf(stderr,
                   "fuzz_attention stats: %s caches: kv_cache inputs %ld (Sdpa calls over them "
                   "checked against the reference %ld), paged inputs %ld; calls by %s dot "
                   "products %ld (of which PagedAttention calls %ld)\n",
                   storage, s.inputs[kCacheScenario], s.cache_sdpa_compared,
                   s.inputs[kPagedScenario], products, s.dot_compared, s.paged_dot_compared);
    };
    print("QInt8", qint8, "int8");
    print("bf16", bf16, "bf16");
  }
};
inline Stats stats;

// The counts of the caches of reduced storage S.
template <typename S>
ReducedCacheStats& reduced_cache_stats() {
  if constexpr (af::detail::is_qint8_v<S>) {
    return stats.qint8;
  } else {
    static_assert(std::is_same_v<S, Eigen::bfloat16>, "the harness fuzzes QInt8 and bf16 caches");
    return stats.bf16;
  }
}

inline std::string sci(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", x);
  return buf;
}

// Every bit of x's value (where sci's four digits cannot tell two roundings apart).
inline std::string hex(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%a", x);
  return buf;
}

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_attention: CHECK FAILED: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline void check(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

inline const Eigen::ThreadPoolDevice& pool_device() {
  // No spinning: idle workers would take the CPU from the fuzzing thread.
  static Eigen::ThreadPool pool(2, /*allow_spinning=*/false);
  static Eigen::ThreadPoolDevice device(&pool, 2);
  return device;
}

// What a call did: returned, or threw one of the two documented exceptions (anything
// else propagates to libFuzzer as a crash).
enum class Outcome { kOk, kInvalid, kLength };

template <typename F>
Outcome outcome_of(F&& call) {
  try {
    call();
    return Outcome::kOk;
  } catch (const std::invalid_argument&) {
    return Outcome::kInvalid;
  } catch (const std::length_error&) {
    return Outcome::kLength;
  }
}

inline const char* outcome_name(Outcome o) {
  return o == Outcome::kOk        ? "success"
         : o == Outcome::kInvalid ? "invalid_argument"
                                  : "length_error";
}

// The harness's verdict on a call: which exception (if any) the arguments call for. With
// several problems at once any of their exceptions is acceptable.
struct Expected {
  bool invalid = false;
  bool overflow = false;
  std::string why;

  void bad(bool condition, const char* reason) {
    if (condition && !invalid) why = reason;
    invalid |= condition;
  }
  bool accepts(Outcome o) const {
    if (!invalid && !overflow) return o == Outcome::kOk;
    return (invalid && o == Outcome::kInvalid) || (overflow && o == Outcome::kLength);
  }
};

inline void check_outcome(const Expected& e, Outcome o, const char* where) {
  if (e.accepts(o)) return;
  fail(std::string(where) + ": got " + outcome_name(o) + ", expected " +
       (e.invalid    ? "invalid_argument (" + e.why + ")"
        : e.overflow ? std::string("length_error")
                     : std::string("success")));
}

template <typename T>
T pick(FuzzedDataProvider& fdp, std::initializer_list<T> values) {
  const std::size_t i = fdp.ConsumeIntegralInRange<std::size_t>(0, values.size() - 1);
  return *(values.begin() + i);
}

// Fills t from a seeded generator at the given magnitude; with `specials`, a few
// elements become NaN, +-Inf or huge.
template <typename T, int Rank>
void fill(af::Tensor<T, Rank>& t, std::uint32_t seed, double magnitude, bool specials,
          FuzzedDataProvider& fdp) {
  // splitmix64: cheaper than std::mt19937 under the sanitizers' instrumentation.
  std::uint64_t state = seed;
  for (Index i = 0; i < t.size(); ++i) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    const double u = static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
    t.data()[i] = static_cast<T>(magnitude * (2.0 * u - 1.0));
  }
  if (!specials || t.size() == 0) return;
  const int n = fdp.ConsumeIntegralInRange<int>(1, 4);
  for (int s = 0; s < n; ++s) {
    const T value =
        pick<T>(fdp, {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                      -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::max(), T(0)});
    t.data()[fdp.ConsumeIntegralInRange<Index>(0, t.size() - 1)] = value;
  }
}

// A bf16 row as read back (out) against the values stored (x): each value bit for bit its
// rounding to nearest even as Eigen rounds a scalar (a NaN any NaN).
inline void check_bf16_row(const float* x, Index head_dim, const float* out) {
  for (Index d = 0; d < head_dim; ++d) {
    const float rounded = static_cast<float>(Eigen::bfloat16(x[d]));
    const bool same = std::isnan(rounded) ? std::isnan(out[d])
                                          : std::memcmp(&rounded, &out[d], sizeof(float)) == 0;
    if (!same) {
      fail("bf16 row: value " + hex(x[d]) + " reads back as " + hex(out[d]) +
           ", not its rounding to nearest even " + hex(rounded));
    }
  }
}

// A QInt8 row as read back (out) against the values stored (x): within half a
// quantization step, max |x| / 254 over the value's group of kQInt8Group, of each finite
// value (plus the float rounding of the scale, its inverse and the product: a few ulp of
// max |x|) when the scale is a normal float.
inline void check_qint8_row(const float* x, Index head_dim, const float* out) {
  for (Index g0 = 0; g0 < head_dim; g0 += af::detail::kQInt8Group) {
    const Index end = std::min(head_dim, g0 + af::detail::kQInt8Group);
    double max_abs = 0.0;
    for (Index d = g0; d < end; ++d) max_abs = std::max(max_abs, std::abs(double{x[d]}));
    // (A scale below the normal range keeps fewer bits; the harness's values never get there.)
    if (!std::isfinite(max_abs) || max_abs < 127.0 * std::numeric_limits<float>::min()) continue;
    const double bound = max_abs * (1.0 / 254.0 + 0x1.0p-21);
    for (Index d = g0; d < end; ++d) {
      if (!(std::abs(double{out[d]} - double{x[d]}) <= bound)) {
        fail("QInt8 row: value " + sci(x[d]) + " reads back as " + sci(out[d]) +
             ", more than half a step (max |x| " + sci(max_abs) + " / 254) away");
      }
    }
  }
}

// A row of head_dim float values as a cache of storage S must hold it, read back as float:
// the values themselves for float; for bf16 rounded and widened, for QInt8 quantized and
// dequantized by the row format (qint8.hpp), and checked against the format's stated
// accuracy. (A QInt8 cache holds the same quantized bytes, rearranged into its tiles, and
// reads them back through load_position as the same floats, bit for bit.)
template <typename S>
void stored_row(const float* x, Index head_dim, float* out) {
  if constexpr (std::is_same_v<S, float>) {
    std::copy_n(x, head_dim, out);
  } else {
    std::vector<S> row(static_cast<std::size_t>(af::detail::stored_row_width<S>(head_dim)));
    if constexpr (af::detail::is_qint8_v<S>) {
      af::detail::quantize_row(x, head_dim, row.data());
      af::detail::dequantize_row(row.data(), head_dim, out);
    } else {
      af::detail::convert(x, row.data(), head_dim);
      af::detail::convert(row.data(), out, head_dim);
    }
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      check_bf16_row(x, head_dim, out);
    } else {
      static_assert(af::detail::is_qint8_v<S>, "the harness fuzzes float, bf16 and QInt8 caches");
      check_qint8_row(x, head_dim, out);
    }
  }
}

// The head_dim of a cache scenario from its draw in [0, 8] (the KVCache scenario draws the
// first seven): the draw itself for a float cache (as the seed corpus was written); for
// QInt8, multiples of 4 (its rule) around and across its scale groups of kQInt8Group = 32
// values, so rows end mid-group and hold several scales (the decode path may take the
// int8 dot products at each of them); for bf16, the multiples of 32 where the decode path
// may take the bf16 dot products (32, 64 and 96, all among the first seven) and sizes
// where it cannot, odd ones and 33 (one past a dot-product chunk), which convert.
template <typename S>
Index cache_head_dim(Index draw) {
  if constexpr (af::detail::is_qint8_v<S>) {
    constexpr Index kSizes[] = {0, 4, 8, 12, 28, 32, 64, 36, 68};
    return kSizes[draw];
  } else if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
    constexpr Index kSizes[] = {0, 1, 3, 32, 64, 6, 96, 2, 33};
    return kSizes[draw];
  } else {
    return draw;
  }
}

// The brute force's options for a library call's options.
inline af::test::DenseOptions dense_options_of(const af::SdpaOptions& options) {
  af::test::DenseOptions dense_options;
  dense_options.scale = options.scale;
  dense_options.softcap = options.softcap;
  dense_options.attend_all_when_empty = options.empty_rows == af::EmptyRowPolicy::kAttendAll;
  dense_options.alibi_slopes = options.alibi_slopes;
  dense_options.sinks = options.sinks;
  return dense_options;
}

// The brute force of an SDPA call on the same inputs, the accuracy budget the call's result
// must meet against it, and the unit of the out error (max |v|).
struct Reference {
  af::test::DenseResult exact;
  af::test::AccuracyBudget budget;
  double v_scale;
};
template <typename T>
Reference reference_of(const af::Tensor<T, 4>& q, const af::Tensor<T, 4>& k,
                       const af::Tensor<T, 4>& v, const af::test::DenseMasks& dense,
                       const af::SdpaOptions& options) {
  const af::test::DenseOptions dense_options = dense_options_of(options);
  Reference r;
  r.exact = af::test::dense_sdpa(af::test::to_double(q), af::test::to_double(k),
                                 af::test::to_double(v), dense, dense_options);
  r.budget = af::test::sdpa_budget<T>(options.path,
                                      af::test::budget_inputs(q, k, dense, dense_options, r.exact));
  r.v_scale = std::max(af::test::max_abs(v), 1e-300);
  return r;
}

// Over a QInt8 cache the decode path may score with int8 dot products on quantized
// queries (Int8Kernel::kAuto where the CPU has them; docs/design.md, "Quantized caches"):
// rows with no allowed key are then redone from the original query (kAttendAll), so such
// calls take the float scores instead, which keeps every row's reference one query. No
// input byte is consumed: the seed corpus decodes as before.
template <typename S>
af::Int8Kernel int8_kernel_for(const af::SdpaOptions& options) {
  return af::detail::is_qint8_v<S> && options.empty_rows != af::EmptyRowPolicy::kAttendAll
             ? af::Int8Kernel::kAuto
             : af::Int8Kernel::kDequantize;
}

// Over a bf16 cache likewise: the decode by bf16 dot products (Bf16Kernel::kAuto where the
// CPU prefers them) multiplies bf16-rounded queries, and redoes rows with no allowed key
// from the float ones, so kAttendAll calls convert instead.
template <typename S>
af::Bf16Kernel bf16_kernel_for(const af::SdpaOptions& options) {
  return std::is_same_v<S, Eigen::bfloat16> && options.empty_rows != af::EmptyRowPolicy::kAttendAll
             ? af::Bf16Kernel::kAuto
             : af::Bf16Kernel::kConvert;
}

// The reference of an SDPA call with float queries q over a cache of storage S, whose
// keys and values k, v (B, Hkv, Skv, D) are what the cache holds, read as float (so the
// budget is the float one: the storage error is the cache's, not the kernels'). Where the
// decode path multiplies the stored form, the brute force runs on the queries it
// multiplies (accuracy_budget.hpp, 5. and 6.): q~ quantized for the int8 dot products,
// q rounded to bf16 for the bf16 ones (exact in float); the rounding of the softmax
// weights (to 16-bit integers, to bf16) also adds to the budget.
template <typename S>
Reference reference_over_cache(const af::Tensor<float, 4>& q, const af::Tensor<float, 4>& k,
                               const af::Tensor<float, 4>& v, const af::test::DenseMasks& dense,
                               const af::SdpaOptions& options) {
  const Index q_len = q.dimension(2), n_rep = q.dimension(1) / k.dimension(1),
              head_dim = q.dimension(3);
  if constexpr (af::detail::is_qint8_v<S>) {
    if (af::test::scores_by_int8_dot(options.path, options.int8_kernel, q_len, n_rep, head_dim)) {
      ++stats.qint8.dot_compared;
      const double scale = options.scale.value_or(
          1.0 / std::sqrt(static_cast<double>(std::max<Index>(head_dim, 1))));
      const af::Tensor<float, 4> q_quantized =
          af::test::quantized_queries(q, scale, options.softcap > 0.0).cast<float>();
      Reference r = reference_of(q_quantized, k, v, dense, options);
      r.budget = af::test::with_int8_value_weights(r.budget);
      return r;
    }
  } else if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
    if (af::test::decodes_by_bf16_dot(options.path, options.bf16_kernel, q_len, n_rep, head_dim)) {
      ++stats.bf16.dot_compared;
      const af::Tensor<float, 4> q_rounded = af::test::bf16_rounded_queries(q).cast<float>();
      Reference r = reference_of(q_rounded, k, v, dense, options);
      r.budget = af::test::with_bf16_weights(r.budget);
      return r;
    }
  }
  return reference_of(q, k, v, dense, options);
}

// The scenarios, each over small shapes (fuzz_attention.cpp describes them): the SDPA
// and Attention ones in fuzz_sdpa.cpp (T = float, double), the cache ones in
// fuzz_kv_cache.cpp and fuzz_paged.cpp (S = float, Eigen::bfloat16, af::QInt8).
template <typename T>
void fuzz_sdpa(FuzzedDataProvider& fdp);
void fuzz_attention(FuzzedDataProvider& fdp);
template <typename S>
void fuzz_kv_cache(FuzzedDataProvider& fdp);
template <typename S>
void fuzz_paged(FuzzedDataProvider& fdp);

}  // namespace fuzz
