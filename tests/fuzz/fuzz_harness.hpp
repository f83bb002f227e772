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
struct Stats {
  static constexpr int kScenarios = 4;
  long calls[kScenarios] = {};
  long compared[kScenarios] = {};
  long rejected[kScenarios] = {};
  long paged_attention_calls = 0, paged_attention_compared = 0, paged_attention_rejected = 0;
  long qint8_inputs[kScenarios] = {};  // inputs of a scenario that ran over a QInt8 cache
  long cache_sdpa_compared = 0;        // Sdpa calls over a QInt8 KVCache's prefix
  long int8_dot_compared = 0;          // calls over QInt8 caches scored by int8 dot products
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
                 "against the reference %ld, rejected %ld\n",
                 paged_attention_calls, paged_attention_compared, paged_attention_rejected);
    std::fprintf(stderr,
                 "fuzz_attention stats: QInt8 caches: kv_cache inputs %ld (Sdpa calls over them "
                 "checked against the reference %ld), paged inputs %ld; calls scored by int8 "
                 "dot products %ld\n",
                 qint8_inputs[kCacheScenario], cache_sdpa_compared, qint8_inputs[kPagedScenario],
                 int8_dot_compared);
  }
};
inline Stats stats;

inline std::string sci(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", x);
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

// A row of head_dim float values as a cache of storage S must hold it, read back as float:
// the values themselves for float; for QInt8 quantized and dequantized by the library's
// row conversions (qint8.hpp), and checked against the format's stated accuracy: within
// half a quantization step, max |x| / 254 over the value's group of kQInt8Group, of each
// finite value (plus the float rounding of the scale, its inverse and the product: a few
// ulp of max |x|) when the scale is a normal float.
template <typename S>
void stored_row(const float* x, Index head_dim, float* out) {
  if constexpr (std::is_same_v<S, float>) {
    std::copy_n(x, head_dim, out);
  } else {
    std::vector<S> row(static_cast<std::size_t>(af::detail::stored_row_width<S>(head_dim)));
    af::detail::store_row(x, head_dim, row.data());
    af::detail::load_row(row.data(), head_dim, out);
    static_assert(af::detail::is_qint8_v<S>, "the harness fuzzes float and QInt8 caches");
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
}

// The head_dim of a cache scenario from its draw in [0, 8]: the draw itself for a float
// cache (as the seed corpus was written); for QInt8, multiples of 4 (its rule) around and
// across its scale groups of kQInt8Group = 32 values, so rows end mid-group and hold
// several scales, and 64, where the decode path may take the int8 dot products (the
// KVCache scenario draws the first seven).
template <typename S>
Index cache_head_dim(Index draw) {
  if constexpr (af::detail::is_qint8_v<S>) {
    constexpr Index kSizes[] = {0, 4, 8, 12, 28, 32, 64, 36, 68};
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

// The queries the library multiplies in a call of q_len rows per head: q~ where the int8
// dot products score (then the brute force on q~ is the kernel's reference), q otherwise.
template <typename S>
af::Tensor<float, 4> queries_as_scored(const af::Tensor<float, 4>& q, Index n_kv_heads,
                                       const af::SdpaOptions& options) {
  const Index q_len = q.dimension(2), head_dim = q.dimension(3);
  if (!af::detail::is_qint8_v<S> || n_kv_heads <= 0 ||
      !af::test::scores_by_int8_dot(options.path, options.int8_kernel, q_len,
                                    q.dimension(1) / n_kv_heads, head_dim)) {
    return q;
  }
  const double scale =
      options.scale.value_or(1.0 / std::sqrt(static_cast<double>(std::max<Index>(head_dim, 1))));
  ++stats.int8_dot_compared;
  return af::test::quantized_queries(q, scale, options.softcap > 0.0).cast<float>();
}

// The scenarios, each over small shapes (fuzz_attention.cpp describes them): the SDPA
// and Attention ones in fuzz_sdpa.cpp (T = float, double), the cache ones in
// fuzz_kv_cache.cpp and fuzz_paged.cpp (S = float, af::QInt8).
template <typename T>
void fuzz_sdpa(FuzzedDataProvider& fdp);
void fuzz_attention(FuzzedDataProvider& fdp);
template <typename S>
void fuzz_kv_cache(FuzzedDataProvider& fdp);
template <typename S>
void fuzz_paged(FuzzedDataProvider& fdp);

}  // namespace fuzz
