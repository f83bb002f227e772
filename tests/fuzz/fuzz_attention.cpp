// libFuzzer target for the validating entry points of attnforge.
//
// Each input is decoded (FuzzedDataProvider) into one of four scenarios, with small
// shapes so an input runs in well under a millisecond:
//   SDPA       shapes, options (scale, causal, window, softcap, empty-row policy, path),
//              doc ids, kv doc ids, padding, an optional thread pool, and at most one
//              deliberately broken argument; called through scaled_dot_product_attention,
//              scaled_dot_product_attention_with_lse and a reused Sdpa object writing
//              into caller buffers.
//   KVCache    a cache (with or without document ids) and a sequence of updates (some of
//              wrong shape or overflowing), truncates and resets, against a shadow model;
//              a QInt8 cache also serves Sdpa<float, QInt8> calls after each operation,
//              checked against the brute force on its dequantized keys and values.
//   Attention  a module (some constructor arguments invalid), options, and forward steps
//              with and without a cache, doc ids and padding, some invalid.
//   Paged      a PagedKVCache of a few blocks (with or without document ids) and a sequence
//              of add_sequence, appends to one sequence and ragged appends to several
//              (some of wrong shape, naming unknown or repeated sequences, with malformed
//              cu_seqlens, or needing more blocks than are free), forks, truncates and
//              frees, against a shadow model of every sequence's rows and of which blocks
//              fork and copy-on-write share; and PagedAttention calls over ragged batches
//              of its sequences, checked per sequence against the brute force.
// The two cache scenarios run over a float cache, or over a QInt8 cache (float keys and
// values quantized as they are appended): its shadow then holds each row as the cache must
// hold it, quantized and dequantized (within half a quantization step of each value, which
// the harness checks), and the brute force runs on those values, so the accuracy budget is
// the float one (the quantization error is the cache's, not the kernels'). A QInt8 cache's
// head_dim comes from wider sizes (cache_head_dim), so its rows span several scale groups.
// Every call must either throw std::invalid_argument / std::length_error exactly when the
// harness's own reading of SPEC.md says the arguments are invalid, leaving outputs and
// the cache untouched, or succeed with a result within the stated accuracy budget
// (tests/accuracy_budget.hpp) of the double brute force (tests/test_util.hpp). Inputs
// may contain NaN/Inf; then only the absence of crashes, hangs and out-of-bounds access
// (ASan/UBSan) and the shape of the result are checked. A failed check aborts, so
// libFuzzer keeps the input as a crash.
//
// Build: the `fuzz` CMake preset (clang, -fsanitize=fuzzer,address,undefined);
// run: scripts/test.sh fuzz (README.md, "Reliability").
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

namespace af = attnforge;
using af::Index;

namespace {

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
                 "checked against the reference %ld), paged inputs %ld\n",
                 qint8_inputs[kCacheScenario], cache_sdpa_compared, qint8_inputs[kPagedScenario]);
  }
};
Stats stats;

std::string sci(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", x);
  return buf;
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_attention: CHECK FAILED: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

void check(bool ok, const std::string& what) {
  if (!ok) fail(what);
}

const Eigen::ThreadPoolDevice& pool_device() {
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

const char* outcome_name(Outcome o) {
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

void check_outcome(const Expected& e, Outcome o, const char* where) {
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
// several scales.
template <typename S>
Index cache_head_dim(Index draw) {
  if constexpr (af::detail::is_qint8_v<S>) {
    constexpr Index kSizes[] = {0, 4, 8, 12, 28, 32, 36, 64, 68};
    return kSizes[draw];
  } else {
    return draw;
  }
}

// The brute force's options for a library call's options.
af::test::DenseOptions dense_options_of(const af::SdpaOptions& options) {
  af::test::DenseOptions dense_options;
  dense_options.scale = options.scale;
  dense_options.softcap = options.softcap;
  dense_options.attend_all_when_empty = options.empty_rows == af::EmptyRowPolicy::kAttendAll;
  dense_options.alibi_slopes = options.alibi_slopes;
  dense_options.sinks = options.sinks;
  return dense_options;
}

// ---------------------------------------------------------------------------------------
// SDPA.

template <typename T>
std::string describe(const af::SdpaOptions& o, const af::Tensor<T, 4>& q, const af::Tensor<T, 4>& k,
                     int entry, bool pooled) {
  const char* paths[] = {"kAuto", "kReference", "kFused", "kDecode"};
  return std::string(sizeof(T) == 4 ? "float" : "double") + " q " +
         af::detail::shape_string(q.dimensions()) + " k " +
         af::detail::shape_string(k.dimensions()) + " path " + paths[static_cast<int>(o.path)] +
         " causal " + std::to_string(o.causal) + " window " + std::to_string(o.window) +
         " softcap " + sci(o.softcap) + " scale " +
         (o.scale ? sci(*o.scale) : std::string("default")) + " attend_all " +
         std::to_string(o.empty_rows == af::EmptyRowPolicy::kAttendAll) + " entry " +
         std::to_string(entry) + " pooled " + std::to_string(pooled);
}

enum class Break {
  kNone,
  kKBatch,
  kKHeadDim,
  kHeadsNotDividing,
  kVShape,
  kDocIdsShape,
  kKvDocIdsShape,
  kKvDocIdsAlone,
  kPaddingShape,
  kQStride,
  kOutShape,
  kLseShape,
  kAttnMaskShape,
  kAttnBiasShape,
  kPerHeadCount,
  kCount
};

// attn_mask / attn_bias of (B|1, H|1, Sq, Skv) with random broadcast dimensions (one more
// query row when broken); ALiBi slopes and sinks (one value short when broken).
template <typename Mask>
void fuzz_element_masks(FuzzedDataProvider& fdp, Index batch, Index n_heads, Index q_len, Index kv_len,
                        Break broken, std::uint32_t seed, af::Tensor<Mask, 4>& mask,
                        af::Tensor<float, 4>& bias, af::SdpaOptions& options) {
  const int kinds = fdp.ConsumeIntegralInRange<int>(0, 7);  // bits: mask, bias, per-head options
  std::mt19937 gen(seed + 7);
  const auto dims = [&](bool bad) {
    return std::array<Index, 4>{fdp.ConsumeBool() ? batch : 1, fdp.ConsumeBool() ? n_heads : 1,
                                q_len + (bad ? 1 : 0), kv_len};
  };
  if ((kinds & 1) != 0 || broken == Break::kAttnMaskShape) {
    mask = af::Tensor<Mask, 4>(dims(broken == Break::kAttnMaskShape));
    const int density = fdp.ConsumeIntegralInRange<int>(0, 4);  // 0: all closed
    for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = static_cast<Mask>(static_cast<int>(gen() % 4) < density);
  }
  if ((kinds & 2) != 0 || broken == Break::kAttnBiasShape) {
    bias = af::Tensor<float, 4>(dims(broken == Break::kAttnBiasShape));
    const double magnitude = pick<double>(fdp, {0.5, 2.0, 30.0});
    for (Index i = 0; i < bias.size(); ++i) {
      bias.data()[i] = gen() % 8 == 0 ? -std::numeric_limits<float>::infinity()
                                      : static_cast<float>(magnitude * (af::test::uniform01(gen) - 0.5));
    }
  }
  if ((kinds & 4) != 0 || broken == Break::kPerHeadCount) {
    const Index count = n_heads - (broken == Break::kPerHeadCount ? 1 : 0);
    for (Index h = 0; h < count; ++h) {
      if (fdp.ConsumeBool()) options.alibi_slopes.push_back(pick<double>(fdp, {0.0, 0.01, 0.125, 0.5, 2.0}));
    }
    if (!options.alibi_slopes.empty()) options.alibi_slopes.resize(static_cast<std::size_t>(count), 0.25);
    if (fdp.ConsumeBool() || options.alibi_slopes.empty()) {
      for (Index h = 0; h < count; ++h) options.sinks.push_back(pick<double>(fdp, {-30.0, -1.0, 0.0, 2.0, 40.0}));
    }
  }
}

template <typename T>
void fuzz_sdpa(FuzzedDataProvider& fdp) {
  using Acc = af::acc_t<T>;
  const Index batch = pick<Index>(fdp, {1, 1, 1, 2, 2, 0});
  Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(1, 3);
  const Index n_rep = fdp.ConsumeIntegralInRange<Index>(1, 5);
  const Index head_dim = fdp.ConsumeIntegralInRange<Index>(1, 24);
  const bool long_kv = fdp.ConsumeIntegralInRange<int>(0, 15) == 0;  // several decode chunks
  const Index q_len = fdp.ConsumeIntegralInRange<Index>(0, long_kv ? 2 : 24);
  const Index kv_len = long_kv ? fdp.ConsumeIntegralInRange<Index>(1000, 2100)
                               : fdp.ConsumeIntegralInRange<Index>(0, 40);
  const Break broken = fdp.ConsumeIntegralInRange<int>(0, 3) != 0
                           ? Break::kNone
                           : static_cast<Break>(fdp.ConsumeIntegralInRange<int>(
                                 0, static_cast<int>(Break::kCount) - 1));
  if (broken == Break::kHeadsNotDividing && n_kv_heads == 1) n_kv_heads = 2;
  const Index n_heads = n_kv_heads * n_rep + (broken == Break::kHeadsNotDividing ? 1 : 0);

  // Options: valid values mostly; one input in four draws from lists with invalid ones.
  af::SdpaOptions options;
  const bool free_options = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr Index kMaxIndex = std::numeric_limits<Index>::max();
  if (fdp.ConsumeIntegralInRange<int>(0, 9) > 0) {
    options.scale = free_options ? pick<double>(fdp, {0.0, 0.3, 1.0, -0.7, 1e3, kNaN, kInf})
                                 : pick<double>(fdp, {0.0, 0.05, 0.3, 1.0, 3.0, -0.7});
  }
  options.causal = fdp.ConsumeBool() && (free_options || q_len <= kv_len);
  options.window = free_options ? pick<Index>(fdp, {0, 1, 5, 1500, kMaxIndex, -1})
                                : pick<Index>(fdp, {0, 0, 0, 1, 2, 3, 5, 17, 64, 1500, kMaxIndex});
  options.softcap = free_options ? pick<double>(fdp, {0.0, 2.0, 1e6, -1.0, kNaN, kInf})
                                 : pick<double>(fdp, {0.0, 0.0, 0.0, 0.5, 2.0, 30.0, 1e6});
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path = pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kReference,
                                          af::SdpaPath::kFused, af::SdpaPath::kDecode});

  // Shapes of k and v (one of them possibly broken).
  const Index k_batch = batch + (broken == Break::kKBatch ? 1 : 0);
  const Index k_head_dim = head_dim + (broken == Break::kKHeadDim ? 1 : 0);
  af::Tensor<T, 4> q(batch, n_heads, q_len, head_dim);
  af::Tensor<T, 4> k(k_batch, n_kv_heads, kv_len, k_head_dim);
  af::Tensor<T, 4> v(k_batch, n_kv_heads, kv_len + (broken == Break::kVShape ? 1 : 0), k_head_dim);
  const bool specials = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  const double magnitude = pick<double>(fdp, {1.0, 1.0, 1.0, 4.0, 30.0, 100.0});
  const std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  fill(q, seed, magnitude, specials, fdp);
  fill(k, seed + 1, magnitude, specials, fdp);
  fill(v, seed + 2, 1.0, specials, fdp);

  // Masks. Key ids: runs of equal ids (packed documents) or small random ids, sometimes at
  // the int64 limits; the queries' ids are the keys' at the queries' positions, or random.
  af::test::DenseMasks dense;
  dense.causal = options.causal;
  dense.window = options.window;
  const int docs = fdp.ConsumeIntegralInRange<int>(0, 3);  // 0: none
  af::Tensor<af::DocId, 2> q_ids, kv_ids;
  af::Masks masks;
  if (docs > 0) {
    const af::DocId base = fdp.ConsumeBool() ? 0 : std::numeric_limits<af::DocId>::max() - 1000;
    kv_ids = af::Tensor<af::DocId, 2>(batch, kv_len + (broken == Break::kKvDocIdsShape ? 1 : 0));
    for (Index i = 0; i < kv_ids.size(); ++i) {
      kv_ids.data()[i] = base + (docs == 1 ? (i % std::max<Index>(1, kv_ids.dimension(1))) / 7
                                           : fdp.ConsumeIntegralInRange<af::DocId>(0, 3));
    }
    q_ids = af::Tensor<af::DocId, 2>(batch, q_len + (broken == Break::kDocIdsShape ? 1 : 0));
    for (Index b = 0; b < q_ids.dimension(0); ++b) {
      for (Index i = 0; i < q_ids.dimension(1); ++i) {
        const Index j = kv_len - q_len + i;
        q_ids(b, i) = docs != 3 && j >= 0 && j < kv_ids.dimension(1)
                          ? kv_ids(b, j)
                          : base + fdp.ConsumeIntegralInRange<af::DocId>(0, 4);
      }
    }
    const bool pass_kv_ids =
        q_len != kv_len || fdp.ConsumeBool() || broken == Break::kKvDocIdsShape;
    if (broken != Break::kKvDocIdsAlone) masks.doc_ids = q_ids;
    if (pass_kv_ids || broken == Break::kKvDocIdsAlone) masks.kv_doc_ids = kv_ids;
    // A mask tensor without elements is indistinguishable from an absent one (a view is
    // present when it has data): the library treats it as absent, and so does the model.
    if (masks.doc_ids.has_value()) dense.q_docs = q_ids;
    if (masks.doc_ids.has_value() && masks.kv_doc_ids.has_value()) dense.kv_docs = kv_ids;
  }
  af::Tensor<bool, 2> padding;
  if (fdp.ConsumeBool() || broken == Break::kPaddingShape) {
    padding = af::Tensor<bool, 2>(batch, kv_len + (broken == Break::kPaddingShape ? 2 : 0));
    const int density = fdp.ConsumeIntegralInRange<int>(0, 4);  // 0: all padded
    std::mt19937 gen(seed + 3);
    for (Index i = 0; i < padding.size(); ++i)
      padding.data()[i] = static_cast<int>(gen() % 4) < density;
    masks.key_padding_mask = padding;
    if (masks.key_padding_mask.has_value()) dense.key_padding = padding;
  }

  // Element masks (bool or uint8), score biases, ALiBi and sinks.
  af::Tensor<bool, 4> bool_mask;
  af::Tensor<std::uint8_t, 4> byte_mask;
  af::Tensor<float, 4> bias;
  if (fdp.ConsumeBool()) {
    fuzz_element_masks(fdp, batch, n_heads, q_len, kv_len, broken, seed, bool_mask, bias, options);
    if (bool_mask.size() > 0) masks.attn_mask = bool_mask;
  } else {
    fuzz_element_masks(fdp, batch, n_heads, q_len, kv_len, broken, seed, byte_mask, bias, options);
    if (byte_mask.size() > 0) masks.attn_mask = byte_mask;
  }
  if (bias.size() > 0) masks.attn_bias = bias;
  if (masks.attn_mask.has_value()) {
    af::Tensor<bool, 4> as_bool(masks.attn_mask.dimensions());
    for (Index i = 0; i < as_bool.size(); ++i) {
      as_bool.data()[i] = bool_mask.size() > 0 ? bool_mask.data()[i] : byte_mask.data()[i] != 0;
    }
    dense.attn_mask = as_bool;
  }
  if (masks.attn_bias.has_value()) dense.attn_bias = bias;

  // The harness's own reading of SPEC.md's validation rules.
  Expected expected;
  expected.bad(masks.attn_mask.has_value() && broken == Break::kAttnMaskShape, "attn_mask shape");
  expected.bad(masks.attn_bias.has_value() && broken == Break::kAttnBiasShape, "attn_bias shape");
  expected.bad(broken == Break::kPerHeadCount && (!options.alibi_slopes.empty() || !options.sinks.empty()),
               "alibi_slopes / sinks count");
  expected.bad(k_batch != batch || v.dimension(0) != batch, "batch sizes differ");
  expected.bad(k_head_dim != head_dim, "head_dim differs");
  expected.bad(v.dimensions() != k.dimensions(), "k and v shapes differ");
  expected.bad(n_heads % n_kv_heads != 0 || n_heads == 0, "kv heads do not divide heads");
  expected.bad(options.scale && !std::isfinite(*options.scale), "non-finite scale");
  expected.bad(!(options.softcap >= 0.0) || !std::isfinite(options.softcap), "bad softcap");
  expected.bad(options.window < 0, "negative window");
  expected.bad(options.causal && q_len > kv_len, "causal with Sq > Skv");
  const bool has_q_ids = masks.doc_ids.has_value(), has_kv_ids = masks.kv_doc_ids.has_value();
  expected.bad(!has_q_ids && has_kv_ids, "kv_doc_ids without doc_ids");
  expected.bad(has_q_ids && broken == Break::kDocIdsShape, "doc_ids shape");
  expected.bad(has_q_ids && has_kv_ids && broken == Break::kKvDocIdsShape, "kv_doc_ids shape");
  expected.bad(has_q_ids && !has_kv_ids && q_len != kv_len, "doc_ids without kv ids, Sq != Skv");
  expected.bad(masks.key_padding_mask.has_value() && broken == Break::kPaddingShape,
               "padding shape");
  // An empty q skips the q-side checks only where the library documents it; here every
  // listed rule applies whatever the sizes, so the verdict stands for empty tensors too.

  const bool use_device = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const Eigen::ThreadPoolDevice* device = use_device ? &pool_device() : nullptr;
  const int entry = fdp.ConsumeIntegralInRange<int>(0, 2);

  af::Tensor<T, 4> out;
  af::Tensor<Acc, 3> lse;
  bool have_lse = false;
  Outcome outcome = Outcome::kOk;
  if (entry == 0) {
    outcome = outcome_of(
        [&] { out = af::scaled_dot_product_attention(q, k, v, options, masks, device); });
  } else if (entry == 1) {
    outcome = outcome_of([&] {
      auto r = af::scaled_dot_product_attention_with_lse(q, k, v, options, masks, device);
      out = r.out;
      lse = r.lse;
    });
    have_lse = true;
  } else {
    // A reused object (scratch sized by an earlier, different call) writing into caller
    // buffers filled with a sentinel; a rejected call must leave them as they were.
    af::Sdpa<T> sdpa(options, device);
    af::SdpaOptions warm = options;
    warm.causal = false;
    warm.window = 0;
    warm.softcap = 0.0;
    warm.scale.reset();
    warm.alibi_slopes.clear();
    warm.sinks.clear();
    sdpa.set_options(warm);
    const af::Tensor<T, 4> wq = af::test::random_normal<T, 4>({1, 2, 9, 4}, 5);
    const af::Tensor<T, 4> wkv = af::test::random_normal<T, 4>({1, 1, 70, 4}, 6);
    (void)sdpa(wq, wkv, wkv);
    sdpa.set_options(options);
    out = af::Tensor<T, 4>(batch, n_heads, q_len + (broken == Break::kOutShape ? 1 : 0), head_dim);
    lse = af::Tensor<Acc, 3>(batch, n_heads, q_len + (broken == Break::kLseShape ? 1 : 0));
    out.setConstant(T(7));
    lse.setConstant(Acc(7));
    expected.bad(broken == Break::kOutShape, "out shape");
    // lse is optional: without elements it counts as absent (as the masks do).
    expected.bad(broken == Break::kLseShape && lse.size() > 0, "lse shape");
    if (broken == Break::kQStride && q.size() > 0) {
      // q seen with a last-dimension stride of 2: must be rejected, not read.
      const af::ConstView<T, 4> strided(
          q.data(), {batch, n_heads, q_len, (head_dim + 1) / 2},
          {n_heads * q_len * head_dim, q_len * head_dim, head_dim, 2});
      const Outcome o = outcome_of([&] { sdpa(strided, k, v, af::StridedView<T, 4>(out), masks); });
      check(o == Outcome::kInvalid, "q with a strided last dimension was not rejected");
      return;
    }
    outcome = outcome_of(
        [&] { sdpa(q, k, v, af::StridedView<T, 4>(out), masks, af::StridedView<Acc, 3>(lse)); });
    have_lse = true;
    if (outcome != Outcome::kOk) {
      for (Index i = 0; i < out.size(); ++i)
        check(out.data()[i] == T(7), "rejected call wrote out");
      for (Index i = 0; i < lse.size(); ++i)
        check(lse.data()[i] == Acc(7), "rejected call wrote lse");
    }
  }
  check_outcome(expected, outcome, "sdpa");
  ++stats.calls[kSdpaScenario];
  if (outcome != Outcome::kOk) {
    ++stats.rejected[kSdpaScenario];
    return;
  }

  check(out.dimension(0) == batch && out.dimension(1) == n_heads && out.dimension(2) == q_len &&
            out.dimension(3) == head_dim,
        "out has the wrong shape");
  if (out.size() == 0) return;
  if (specials) {
    // NaN never turns into a number: a row whose query, or the key of a key it may attend
    // to, holds a NaN has a NaN score, so its output and lse must be NaN on every path
    // (README.md, "NaN and Inf inputs").
    const Index n_rep_ok = n_heads / n_kv_heads;
    const auto has_nan = [](const T* row, Index n) {
      for (Index d = 0; d < n; ++d) {
        if (std::isnan(row[d])) return true;
      }
      return false;
    };
    const bool attend_all = options.empty_rows == af::EmptyRowPolicy::kAttendAll;
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < n_heads; ++h) {
        const auto allowed = af::test::dense_allowed(dense, b, h, q_len, kv_len);
        for (Index i = 0; i < q_len; ++i) {
          const auto& row = allowed[static_cast<std::size_t>(i)];
          const bool empty = std::none_of(row.begin(), row.end(), [](bool x) { return x; });
          if (empty && (!attend_all || kv_len == 0)) continue;  // no score at all
          bool reads_nan = has_nan(&q(b, h, i, 0), head_dim);
          for (Index j = 0; j < kv_len && !reads_nan; ++j) {
            if (empty || row[static_cast<std::size_t>(j)]) {
              reads_nan = has_nan(&k(b, h / n_rep_ok, j, 0), head_dim);
            }
          }
          if (!reads_nan) continue;
          for (Index d = 0; d < head_dim; ++d) {
            if (!std::isnan(out(b, h, i, d))) {
              fail("row (" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                   std::to_string(i) + ") has a NaN score but out[" + std::to_string(d) + "] = " +
                   sci(out(b, h, i, d)) + "; " + describe(options, q, k, entry, device != nullptr));
            }
          }
          if (have_lse) check(std::isnan(lse(b, h, i)), "a row with a NaN score has a non-NaN lse");
        }
      }
    }
    return;
  }

  // Against the brute force, within the stated budget.
  const af::test::DenseOptions dense_options = dense_options_of(options);
  const af::test::DenseResult exact = af::test::dense_sdpa(
      af::test::to_double(q), af::test::to_double(k), af::test::to_double(v), dense, dense_options);
  const af::test::AccuracyBudget budget = af::test::sdpa_budget<T>(
      options.path, af::test::budget_inputs(q, k, dense, dense_options, exact));
  const double v_scale = std::max(af::test::max_abs(v), 1e-300);
  const double out_err = af::test::max_abs_diff(out, exact.out) / v_scale;
  if (!(out_err <= budget.out)) {
    fail("out error " + sci(out_err) + " > budget " + sci(budget.out));
  }
  if (have_lse) {
    const double lse_err = af::test::max_abs_diff(lse, exact.lse);
    if (!(lse_err <= budget.lse)) {
      fail("lse error " + sci(lse_err) + " > budget " + sci(budget.lse));
    }
  }
  ++stats.compared[kSdpaScenario];
  // Rows with no allowed key: exactly 0 under kZeros.
  if (!dense_options.attend_all_when_empty) {
    for (Index r = 0; r < exact.lse.size(); ++r) {
      if (exact.lse.data()[r] != -af::test::kInf) continue;
      for (Index d = 0; d < head_dim; ++d)
        check(out.data()[r * head_dim + d] == T(0), "empty row not 0");
    }
  }
  // The thread count changes nothing.
  if (device != nullptr) {
    const af::Tensor<T, 4> serial = af::scaled_dot_product_attention(q, k, v, options, masks);
    check(af::test::bitwise_equal(serial, out), "pooled result differs from the serial one");
  }
}

// ---------------------------------------------------------------------------------------
// KVCache against a shadow model.

// Sdpa<float, S> over the cache's filled prefix (1 to 4 queries per head, at most the
// cached length; causal or not, any path), against the brute force on the shadow's keys
// and values (B, Hkv, seq_len, D).
template <typename S>
void fuzz_sdpa_over_cache(FuzzedDataProvider& fdp, const af::KVCache<S>& cache,
                          const af::Tensor<float, 4>& keys, const af::Tensor<float, 4>& values,
                          std::uint32_t seed) {
  using T = float;
  const Index batch = cache.batch_size(), n_kv_heads = cache.n_kv_heads(),
              head_dim = cache.head_dim();
  const Index n_heads = n_kv_heads * fdp.ConsumeIntegralInRange<Index>(1, 3);
  // At most the cached length: causal attention aligns the queries bottom-right.
  const Index q_len = fdp.ConsumeIntegralInRange<Index>(1, std::min<Index>(4, cache.seq_len()));
  af::SdpaOptions options;
  options.causal = fdp.ConsumeBool();
  options.window = pick<Index>(fdp, {0, 0, 0, 1, 3});
  options.softcap = pick<double>(fdp, {0.0, 0.0, 0.0, 5.0});
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path = pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kReference,
                                          af::SdpaPath::kFused, af::SdpaPath::kDecode});
  const bool use_device = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  af::Tensor<T, 4> q(batch, n_heads, q_len, head_dim);
  fill(q, seed, pick<double>(fdp, {1.0, 1.0, 4.0}), false, fdp);
  af::Tensor<T, 4> out(q.dimensions());
  af::Tensor<T, 3> lse(batch, n_heads, q_len);
  af::Sdpa<T, S> sdpa(options, use_device ? &pool_device() : nullptr);
  const af::KVPrefix<S> prefix = cache.prefix();
  sdpa(q, prefix.keys, prefix.values, af::StridedView<T, 4>(out), {}, af::StridedView<T, 3>(lse));

  af::test::DenseMasks dense;
  dense.causal = options.causal;
  dense.window = options.window;
  const af::test::DenseOptions dense_options = dense_options_of(options);
  const af::test::DenseResult exact =
      af::test::dense_sdpa(af::test::to_double(q), af::test::to_double(keys),
                           af::test::to_double(values), dense, dense_options);
  const af::test::AccuracyBudget budget = af::test::sdpa_budget<T>(
      options.path, af::test::budget_inputs(q, keys, dense, dense_options, exact));
  const double v_scale = std::max(af::test::max_abs(values), 1e-300);
  const double out_err = af::test::max_abs_diff(out, exact.out) / v_scale;
  const double lse_err = af::test::max_abs_diff(lse, exact.lse);
  if (!(out_err <= budget.out) || !(lse_err <= budget.lse)) {
    fail("Sdpa over a KVCache: out error " + sci(out_err) + " (budget " + sci(budget.out) +
         "), lse error " + sci(lse_err) + " (budget " + sci(budget.lse) + "); q " +
         af::detail::shape_string(q.dimensions()) + " cached " + std::to_string(cache.seq_len()) +
         " causal " + std::to_string(options.causal) + " window " + std::to_string(options.window));
  }
  ++stats.cache_sdpa_compared;
}

// S is the cache's storage: float, or QInt8 (float keys and values quantized as appended).
template <typename S>
void fuzz_kv_cache(FuzzedDataProvider& fdp) {
  using T = float;
  const Index batch = fdp.ConsumeIntegralInRange<Index>(-1, 2);
  const Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(0, 3);
  const Index head_dim = cache_head_dim<S>(fdp.ConsumeIntegralInRange<Index>(0, 6));
  const Index max_len = fdp.ConsumeIntegralInRange<Index>(-1, 20);
  const bool record = fdp.ConsumeBool();
  std::optional<af::KVCache<S>> cache;
  const Outcome made =
      outcome_of([&] { cache.emplace(batch, max_len, n_kv_heads, head_dim, record); });
  Expected ctor;
  ctor.bad(batch <= 0 || n_kv_heads <= 0 || head_dim <= 0 || max_len <= 0, "non-positive size");
  check_outcome(ctor, made, "KVCache constructor");
  if (made != Outcome::kOk) return;

  // Shadow: what the first seq_len positions must hold (read as float).
  std::vector<T> keys, values;
  std::vector<af::DocId> ids;
  Index seq_len = 0;
  const auto at = [&](Index b, Index h, Index s) {
    return ((b * n_kv_heads + h) * max_len + s) * head_dim;
  };
  keys.assign(static_cast<std::size_t>(batch * n_kv_heads * max_len * head_dim), T(0));
  values = keys;
  ids.assign(static_cast<std::size_t>(batch * max_len), 0);

  std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  const int n_ops = fdp.ConsumeIntegralInRange<int>(1, 10);
  for (int op = 0; op < n_ops && fdp.remaining_bytes() > 0; ++op) {
    const af::Tensor<S, 4> key_snapshot = cache->key_storage();
    const af::Tensor<S, 4> value_snapshot = cache->value_storage();
    const af::Tensor<af::DocId, 2> id_snapshot = cache->doc_id_storage();
    const Index len_before = cache->seq_len();
    const int kind = fdp.ConsumeIntegralInRange<int>(0, 5);
    Expected e;
    Outcome o = Outcome::kOk;
    if (kind <= 3) {
      // update, with at most one broken part.
      const Index new_len = fdp.ConsumeIntegralInRange<Index>(0, 8);
      const int broken = fdp.ConsumeIntegralInRange<int>(0, 12);
      const Index kb = batch + (broken == 1), kh = n_kv_heads + (broken == 2),
                  kd = head_dim + (broken == 3);
      const Index v_len = new_len + (broken == 4);
      af::Tensor<T, 4> k_new = af::test::random_uniform<T, 4>({kb, kh, new_len, kd}, ++seed);
      af::Tensor<T, 4> v_new = af::test::random_uniform<T, 4>({kb, kh, v_len, kd}, ++seed);
      const bool give_ids = broken == 5 ? !record : record;
      af::Tensor<af::DocId, 2> ids_new(batch, new_len + (broken == 6));
      for (Index i = 0; i < ids_new.size(); ++i)
        ids_new.data()[i] = static_cast<af::DocId>(++seed % 5);
      e.bad(broken >= 1 && broken <= 4, "k_new/v_new shape");
      e.bad(give_ids != record, "doc ids given iff the cache records them");
      e.bad(give_ids && broken == 6, "doc_ids_new shape");
      e.overflow = len_before + new_len > max_len;
      // Strided inputs (a transposed projection buffer) are valid too.
      const bool transposed = fdp.ConsumeBool() && broken == 0;
      af::Tensor<T, 4> k_bshd;
      af::ConstView<T, 4> k_view(k_new);
      if (transposed) {
        k_bshd = af::Tensor<T, 4>(kb, new_len, kh, kd);
        for (Index b = 0; b < kb; ++b)
          for (Index h = 0; h < kh; ++h)
            for (Index s = 0; s < new_len; ++s)
              for (Index d = 0; d < kd; ++d) k_bshd(b, s, h, d) = k_new(b, h, s, d);
        k_view = af::ConstView<T, 4>(k_bshd).transpose(1, 2);
      }
      af::KVPrefix<S> prefix;
      o = outcome_of([&] {
        prefix = give_ids ? cache->update(k_view, v_new, ids_new) : cache->update(k_view, v_new);
      });
      check_outcome(e, o, "KVCache::update");
      if (o == Outcome::kOk) {
        for (Index b = 0; b < batch; ++b) {
          for (Index h = 0; h < n_kv_heads; ++h) {
            for (Index s = 0; s < new_len; ++s) {
              stored_row<S>(&k_new(b, h, s, 0), head_dim,
                            &keys[static_cast<std::size_t>(at(b, h, seq_len + s))]);
              stored_row<S>(&v_new(b, h, s, 0), head_dim,
                            &values[static_cast<std::size_t>(at(b, h, seq_len + s))]);
            }
          }
          for (Index s = 0; s < new_len && record; ++s)
            ids[static_cast<std::size_t>(b * max_len + seq_len + s)] = ids_new(b, s);
        }
        seq_len += new_len;
        check(prefix.keys.dimension(2) == seq_len &&
                  prefix.keys.data() == cache->key_storage().data(),
              "update did not return the filled prefix of the cache's storage");
      }
    } else if (kind == 4) {
      const Index to = fdp.ConsumeIntegralInRange<Index>(-2, max_len + 2);
      e.bad(to < 0 || to > len_before, "truncate outside [0, seq_len]");
      o = outcome_of([&] { cache->truncate(to); });
      check_outcome(e, o, "KVCache::truncate");
      if (o == Outcome::kOk) seq_len = to;
    } else {
      cache->reset();
      seq_len = 0;
    }
    ++stats.calls[kCacheScenario];
    if (o == Outcome::kOk) ++stats.compared[kCacheScenario];
    if (o != Outcome::kOk) {
      ++stats.rejected[kCacheScenario];
      check(cache->seq_len() == len_before, "a rejected call changed seq_len");
      check(af::test::bitwise_equal(cache->key_storage(), key_snapshot) &&
                af::test::bitwise_equal(cache->value_storage(), value_snapshot) &&
                af::test::bitwise_equal(cache->doc_id_storage(), id_snapshot),
            "a rejected call changed the cache's storage");
    }
    // The filled prefix always equals the shadow.
    check(cache->seq_len() == seq_len, "seq_len differs from the shadow");
    const af::KVPrefix<S> p = cache->prefix();
    std::vector<T> key_row(static_cast<std::size_t>(head_dim)), value_row(key_row.size());
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < n_kv_heads; ++h) {
        for (Index s = 0; s < seq_len; ++s) {
          af::detail::load_row(p.keys.row(b, h, s), head_dim, key_row.data());
          af::detail::load_row(p.values.row(b, h, s), head_dim, value_row.data());
          check(std::memcmp(key_row.data(), &keys[static_cast<std::size_t>(at(b, h, s))],
                            sizeof(T) * head_dim) == 0 &&
                    std::memcmp(value_row.data(), &values[static_cast<std::size_t>(at(b, h, s))],
                                sizeof(T) * head_dim) == 0,
                "cached keys/values differ from the shadow");
        }
      }
      for (Index s = 0; s < seq_len && record; ++s) {
        check(cache->doc_ids()(b, s) == ids[static_cast<std::size_t>(b * max_len + s)],
              "cached doc ids differ");
      }
    }
    // Attention over what a QInt8 cache holds. (Only there: a float cache's inputs keep
    // decoding as they did before QInt8 caches existed, and its prefix is plain floats,
    // which the SDPA scenario covers.)
    if (af::detail::is_qint8_v<S> && seq_len > 0) {
      af::Tensor<T, 4> shadow_keys(batch, n_kv_heads, seq_len, head_dim),
          shadow_values(shadow_keys.dimensions());
      for (Index b = 0; b < batch; ++b) {
        for (Index h = 0; h < n_kv_heads; ++h) {
          for (Index s = 0; s < seq_len; ++s) {
            const std::size_t from = static_cast<std::size_t>(at(b, h, s));
            std::copy_n(&keys[from], head_dim, &shadow_keys(b, h, s, 0));
            std::copy_n(&values[from], head_dim, &shadow_values(b, h, s, 0));
          }
        }
      }
      fuzz_sdpa_over_cache(fdp, *cache, shadow_keys, shadow_values, ++seed);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Attention.

// max over rows of sum |w[r, :]| (the infinity norm: |W x|_max <= it * |x|_max).
double row_norm(const af::ConstView<float, 2>& w) {
  double worst = 0.0;
  for (Index r = 0; r < w.dimension(0); ++r) {
    double sum = 0.0;
    for (Index c = 0; c < w.dimension(1); ++c) sum += std::abs(static_cast<double>(w(r, c)));
    worst = std::max(worst, sum);
  }
  return worst;
}

void fuzz_attention(FuzzedDataProvider& fdp) {
  using T = float;
  // Mostly a valid module (so forward is exercised); one input in four draws every
  // constructor argument freely, invalid combinations included.
  const bool free_args = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 3);
  const Index n_heads = free_args ? fdp.ConsumeIntegralInRange<Index>(0, 6)
                                  : n_kv_heads * fdp.ConsumeIntegralInRange<Index>(1, 3);
  const Index head_dim_arg =
      free_args ? pick<Index>(fdp, {0, 0, 2, 4, 6, 8, 3, -2}) : pick<Index>(fdp, {2, 4, 6, 8, 0});
  const Index dim = head_dim_arg == 0 && !free_args
                        ? n_heads * 2 * fdp.ConsumeIntegralInRange<Index>(1, 4)
                        : fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 40);
  const bool qk_norm = fdp.ConsumeBool();
  const double norm_eps =
      free_args
          ? pick<double>(fdp, {1e-5, 1e-5, 0.0, -1.0, std::numeric_limits<double>::quiet_NaN()})
          : 1e-5;
  Expected ctor;
  const Index head_dim = head_dim_arg == 0 && n_heads > 0 ? dim / n_heads : head_dim_arg;
  ctor.bad(dim <= 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0, "non-positive size");
  ctor.bad(n_kv_heads > 0 && n_heads % n_kv_heads != 0, "heads not a multiple of kv heads");
  ctor.bad(head_dim % 2 != 0, "odd head_dim");
  ctor.bad(!(norm_eps > 0.0), "norm_eps");
  std::optional<af::Attention<T>> fast, ref;
  const Outcome made =
      outcome_of([&] { fast.emplace(dim, n_heads, n_kv_heads, head_dim_arg, qk_norm, norm_eps); });
  check_outcome(ctor, made, "Attention constructor");
  if (made != Outcome::kOk) return;
  ref.emplace(dim, n_heads, n_kv_heads, head_dim_arg, qk_norm, norm_eps);
  const std::uint64_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  fast->reset_parameters(seed);
  ref->reset_parameters(seed);

  af::SdpaOptions options;
  const bool free_options = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  options.window = free_options
                       ? pick<Index>(fdp, {0, 3, std::numeric_limits<Index>::max(), -2})
                       : pick<Index>(fdp, {0, 0, 0, 1, 3, 9, std::numeric_limits<Index>::max()});
  options.softcap = free_options ? pick<double>(fdp, {0.0, 5.0, -1.0})
                                 : pick<double>(fdp, {0.0, 0.0, 0.0, 5.0, 50.0});
  if (fdp.ConsumeBool()) {
    options.scale = free_options ? pick<double>(fdp, {0.1, std::numeric_limits<double>::infinity()})
                                 : pick<double>(fdp, {0.1, 1.0});
  }
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path =
      pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kFused, af::SdpaPath::kDecode});
  // ALiBi slopes and sinks: per-head options, one value per query head (or one short).
  const Index per_head = n_heads - (free_options && fdp.ConsumeBool() ? 1 : 0);
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) options.alibi_slopes.assign(static_cast<std::size_t>(std::max<Index>(per_head, 0)), 0.125);
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) options.sinks.assign(static_cast<std::size_t>(std::max<Index>(per_head, 0)), 1.5);
  // The module is always causal: set_sdpa_options rejects causal = false.
  options.causal = !free_options || fdp.ConsumeIntegralInRange<int>(0, 3) != 0;
  // set_sdpa_options validates: it throws exactly for bad options and keeps the old ones.
  Expected option_check;
  option_check.bad(!options.causal, "causal = false");
  option_check.bad(options.window < 0, "window");
  option_check.bad(options.softcap < 0, "softcap");
  option_check.bad(options.scale && !std::isfinite(*options.scale), "scale");
  option_check.bad((!options.alibi_slopes.empty() && static_cast<Index>(options.alibi_slopes.size()) != n_heads) ||
                       (!options.sinks.empty() && static_cast<Index>(options.sinks.size()) != n_heads),
                   "alibi_slopes / sinks count");
  const af::SdpaOptions before = fast->sdpa_options();
  const Outcome set = outcome_of([&] { fast->set_sdpa_options(options); });
  check_outcome(option_check, set, "Attention::set_sdpa_options");
  if (set != Outcome::kOk) {
    if (fast->sdpa_options().causal != before.causal || fast->sdpa_options().window != before.window ||
        fast->sdpa_options().softcap != before.softcap) {
      fail("Attention::set_sdpa_options changed the options it rejected");
    }
    return;
  }
  af::SdpaOptions ref_options = options;
  ref_options.path = af::SdpaPath::kReference;
  ref->set_sdpa_options(ref_options);
  if (fdp.ConsumeBool()) fast->set_device(&pool_device());

  // The cache (sometimes of the wrong geometry) and the session's steps.
  const Index batch = fdp.ConsumeIntegralInRange<Index>(1, 2);
  const int cache_kind =
      pick<int>(fdp, {0, 1, 2, 0, 1, 2, 3});  // none, plain, records ids, mismatched
  const Index max_len = fdp.ConsumeIntegralInRange<Index>(1, 16);
  std::optional<af::KVCache<T>> fast_cache, ref_cache;
  if (cache_kind > 0) {
    const Index cache_heads = n_kv_heads + (cache_kind == 3 ? 1 : 0);
    fast_cache.emplace(batch, max_len, cache_heads, head_dim, cache_kind == 2);
    ref_cache.emplace(batch, max_len, cache_heads, head_dim, cache_kind == 2);
  }
  const af::RotaryEmbedding<T> rope(
      head_dim + (fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? 2 : 0), 24);
  double x_max = 0.0;  // over every step so far: bounds the cached values too
  const double wv_norm = row_norm(fast->weights().wv), wo_norm = row_norm(fast->weights().wo);
  const double wq_norm = row_norm(fast->weights().wq), wk_norm = row_norm(fast->weights().wk);
  Index pos = 0;
  const int steps = fdp.ConsumeIntegralInRange<int>(1, 3);
  for (int step = 0; step < steps && fdp.remaining_bytes() > 0; ++step) {
    const Index seq_len = fdp.ConsumeIntegralInRange<Index>(0, 6);
    // Mostly consistent arguments; one step in four may break any of them.
    const bool free_step = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
    const Index x_dim = dim + (free_step && fdp.ConsumeBool() ? 1 : 0);
    const Index start = free_step && fdp.ConsumeBool() ? 20 : pos;
    af::Tensor<T, 3> x = af::test::random_uniform<T, 3>({batch, seq_len, x_dim},
                                                        static_cast<std::uint32_t>(seed + step));
    const bool give_ids =
        free_step || !fast_cache ? fdp.ConsumeBool() : fast_cache->records_doc_ids();
    const bool give_padding = fdp.ConsumeBool();
    const Index cached = fast_cache ? fast_cache->seq_len() : 0;
    const Index pad_len = cached + seq_len + (free_step && fdp.ConsumeBool() ? 1 : 0);
    af::Tensor<af::DocId, 2> ids(batch, seq_len);
    for (Index i = 0; i < ids.size(); ++i) ids.data()[i] = (pos * batch + i) / 5;
    af::Tensor<bool, 2> padding(batch, pad_len);
    for (Index i = 0; i < padding.size(); ++i) padding.data()[i] = (i * 7 + step) % 5 != 0;
    const af::ConstView<af::DocId, 2> ids_arg =
        give_ids ? af::ConstView<af::DocId, 2>(ids) : af::ConstView<af::DocId, 2>();
    const af::ConstView<bool, 2> pad_arg =
        give_padding ? af::ConstView<bool, 2>(padding) : af::ConstView<bool, 2>();
    // Empty mask tensors count as absent (see fuzz_sdpa).
    const bool has_ids = ids_arg.has_value(), has_padding = pad_arg.has_value();

    Expected e;
    e.bad(rope.head_dim() != head_dim, "rope head_dim");
    e.bad(start + seq_len > rope.cos().dimension(0), "positions beyond the rope table");
    e.bad(x_dim != dim, "x's last dimension");
    e.bad(has_padding && pad_len != cached + seq_len, "padding length");
    if (fast_cache) {
      e.bad(fast_cache->n_kv_heads() != n_kv_heads, "cache geometry");
      e.bad(has_ids != fast_cache->records_doc_ids(), "doc ids iff the cache records them");
      e.overflow = cached + seq_len > max_len;
    }
    const af::Tensor<T, 4> keys_before =
        fast_cache ? fast_cache->key_storage() : af::Tensor<T, 4>();
    const Index len_before = fast_cache ? fast_cache->seq_len() : 0;
    af::Tensor<T, 3> out_fast, out_ref;
    const Outcome o = outcome_of([&] {
      out_fast =
          fast->forward(x, rope, start, fast_cache ? &*fast_cache : nullptr, ids_arg, pad_arg);
    });
    check_outcome(e, o, "Attention::forward");
    ++stats.calls[kAttentionScenario];
    if (o != Outcome::kOk) {
      ++stats.rejected[kAttentionScenario];
      if (fast_cache) {
        check(fast_cache->seq_len() == len_before &&
                  af::test::bitwise_equal(fast_cache->key_storage(), keys_before),
              "a rejected forward changed the cache");
      }
      continue;
    }
    out_ref = ref->forward(x, rope, start, ref_cache ? &*ref_cache : nullptr, ids_arg, pad_arg);
    if (fast_cache) {
      // Keys and values are computed before the SDPA path matters: identical caches.
      check(af::test::bitwise_equal(fast_cache->key_storage(), ref_cache->key_storage()) &&
                af::test::bitwise_equal(fast_cache->value_storage(), ref_cache->value_storage()),
            "caches of the fast and the reference module differ");
    }
    pos = start + seq_len;
    x_max = std::max(x_max, af::test::max_abs(x));
    // Bound on the SDPA difference, carried through wo: |q_d|, |k_d| <= |x| * ||w||_inf
    // (with QK-norm <= sqrt(D) * max|norm weight| = sqrt(D), the weights being ones),
    // times sqrt(2) for RoPE's rotation of a pair; |v| <= |x| * ||wv||_inf.
    const double d = static_cast<double>(head_dim);
    const double q_max = std::sqrt(2.0) * (qk_norm ? std::sqrt(d) : x_max * wq_norm);
    const double k_max = std::sqrt(2.0) * (qk_norm ? std::sqrt(d) : x_max * wk_norm);
    const double scale = options.scale.value_or(1.0 / std::sqrt(d));
    af::test::BudgetInputs in;
    in.head_dim = head_dim;
    in.max_keys = (fast_cache ? fast_cache->seq_len() : seq_len);
    in.max_score = std::abs(scale) * d * q_max * k_max;
    in.softcap = options.softcap;
    in.max_abs_lse = in.max_score + std::log(static_cast<double>(std::max<Index>(1, in.max_keys)));
    const double sdpa_bound = af::test::sdpa_budget<T>(options.path, in).out +
                              af::test::sdpa_budget<T>(af::SdpaPath::kReference, in).out;
    // The output projection itself is the same float code in both modules.
    const double bound = sdpa_bound * x_max * wv_norm * wo_norm;
    ++stats.compared[kAttentionScenario];
    const double err = af::test::max_abs_diff(out_fast, out_ref);
    if (!(err <= bound)) {
      fail("Attention::forward differs from the reference path by " + sci(err) + " > " +
           sci(bound));
    }
  }
}

// ---------------------------------------------------------------------------------------
// PagedKVCache and PagedAttention against a shadow model.

// One position of a sequence as the shadow holds it: the keys and values of every KV head
// ((Hkv, D) row-major; as the cache holds them, read as float) and its document id.
struct PagedRow {
  std::vector<float> k, v;
  af::DocId doc = 0;
};

// What a PagedKVCache must hold, derived from the documented semantics alone: each
// sequence's rows, and the pool blocks it holds under the shadow's own block names (never
// the library's), so that sharing by fork and copy-on-write are modelled independently and
// the library's tables can be compared with them up to renaming.
class PagedShadow {
 public:
  struct Seq {
    std::vector<PagedRow> rows;
    std::vector<int> blocks;  // shadow block names, one per block_size positions
  };

  PagedShadow(Index n_blocks, Index block_size) : n_blocks_(n_blocks), block_size_(block_size) {}

  Index block_size() const { return block_size_; }
  Index blocks_for(Index len) const { return (len + block_size_ - 1) / block_size_; }
  bool contains(af::SeqId id) const { return seqs_.count(id) > 0; }
  const std::map<af::SeqId, Seq>& seqs() const { return seqs_; }
  const Seq& seq(af::SeqId id) const { return seqs_.at(id); }
  Index len(af::SeqId id) const {
    return contains(id) ? static_cast<Index>(seqs_.at(id).rows.size()) : 0;
  }
  Index refs(int block) const { return refs_[static_cast<std::size_t>(block)]; }
  std::vector<af::SeqId> ids() const {
    std::vector<af::SeqId> out;
    for (const auto& entry : seqs_) out.push_back(entry.first);
    return out;
  }
  Index blocks_in_use() const {
    return static_cast<Index>(
        std::count_if(refs_.begin(), refs_.end(), [](Index r) { return r > 0; }));
  }
  Index free_blocks() const { return n_blocks_ - blocks_in_use(); }

  void add(af::SeqId id) { seqs_[id] = Seq{}; }
  void fork(af::SeqId parent, af::SeqId child) {
    seqs_[child] = seqs_.at(parent);
    for (int b : seqs_.at(child).blocks) ++refs_[static_cast<std::size_t>(b)];
  }
  void truncate(af::SeqId id, Index new_len) {
    Seq& s = seqs_.at(id);
    release(s, static_cast<std::size_t>(blocks_for(new_len)));
    s.rows.resize(static_cast<std::size_t>(new_len));
  }
  void free_sequence(af::SeqId id) {
    release(seqs_.at(id), 0);
    seqs_.erase(id);
  }

  // The blocks a valid append of n[s] positions to each of ids[s] (distinct, in batch
  // order) takes from the pool, counted on a copy of the sharing state: a holder of a
  // shared, partially filled last block copies it first, which leaves one holder fewer,
  // so when every holder appends in one batch the last one writes in place.
  Index blocks_needed(const std::vector<af::SeqId>& ids, const std::vector<Index>& n) const {
    std::vector<Index> refs = refs_;
    Index taken = 0;
    for (std::size_t s = 0; s < ids.size(); ++s) {
      std::vector<int> blocks = seqs_.at(ids[s]).blocks;
      taken += make_room(blocks, len(ids[s]), n[s], refs);
    }
    return taken;
  }
  void append(af::SeqId id, std::vector<PagedRow> rows) {
    Seq& s = seqs_.at(id);
    make_room(s.blocks, static_cast<Index>(s.rows.size()), static_cast<Index>(rows.size()), refs_);
    for (PagedRow& r : rows) s.rows.push_back(std::move(r));
  }

 private:
  // paged_kv_cache.hpp's rule for making room for n more positions after len: a private
  // copy of a shared, partially filled last block, then fresh blocks. Returns the number
  // of blocks taken.
  Index make_room(std::vector<int>& blocks, Index len, Index n, std::vector<Index>& refs) const {
    if (n == 0) return 0;
    Index taken = 0;
    const auto take = [&] {
      refs.push_back(1);
      ++taken;
      return static_cast<int>(refs.size()) - 1;
    };
    if (len % block_size_ != 0 && refs[static_cast<std::size_t>(blocks.back())] > 1) {
      --refs[static_cast<std::size_t>(blocks.back())];
      blocks.back() = take();
    }
    while (static_cast<Index>(blocks.size()) < blocks_for(len + n)) blocks.push_back(take());
    return taken;
  }
  void release(Seq& s, std::size_t keep) {
    for (std::size_t i = keep; i < s.blocks.size(); ++i)
      --refs_[static_cast<std::size_t>(s.blocks[i])];
    s.blocks.resize(std::min(keep, s.blocks.size()));
  }

  Index n_blocks_, block_size_;
  std::map<af::SeqId, Seq> seqs_;
  std::vector<Index> refs_;  // per shadow block name: sequences holding it (0: back in the pool)
};

// Everything observable of a pool: a rejected call must leave all of it as it was.
template <typename S>
struct PagedSnapshot {
  explicit PagedSnapshot(const af::PagedKVCache<S>& cache) : free(cache.free_blocks()) {
    for (Index b = 0; b < cache.n_blocks(); ++b) refs.push_back(cache.block_refs(b));
    for (af::SeqId id : cache.sequences()) {
      ids.push_back(id);
      tables.push_back(cache.block_table(id));
      keys.push_back(cache.gather_keys(id));
      values.push_back(cache.gather_values(id));
      if (cache.records_doc_ids()) docs.push_back(cache.gather_doc_ids(id));
    }
  }
  bool operator==(const PagedSnapshot& o) const {
    if (free != o.free || refs != o.refs || ids != o.ids || tables != o.tables) return false;
    for (std::size_t s = 0; s < keys.size(); ++s) {
      if (!af::test::bitwise_equal(keys[s], o.keys[s]) ||
          !af::test::bitwise_equal(values[s], o.values[s])) {
        return false;
      }
    }
    for (std::size_t s = 0; s < docs.size(); ++s) {
      if (!af::test::bitwise_equal(docs[s], o.docs[s])) return false;
    }
    return true;
  }
  Index free;
  std::vector<Index> refs;
  std::vector<af::SeqId> ids;
  std::vector<std::vector<Index>> tables;
  std::vector<af::Tensor<S, 3>> keys, values;  // stored rows (for QInt8: values, then scales)
  std::vector<af::Tensor<af::DocId, 1>> docs;
};

// The cache against the shadow: the same sequences with the same rows; block tables that
// share exactly where the shadow's do (a renaming of its blocks), refs that count the
// holders, and every block either held or free.
template <typename S>
void check_paged_pool(const af::PagedKVCache<S>& cache, const PagedShadow& shadow) {
  const Index n_blocks = cache.n_blocks(), n_kv_heads = cache.n_kv_heads(),
              head_dim = cache.head_dim();
  check(cache.sequences() == shadow.ids(), "PagedKVCache: live sequences differ from the shadow");
  std::map<Index, int> to_shadow;
  std::map<int, Index> to_library;
  std::vector<Index> holders(static_cast<std::size_t>(n_blocks), 0);
  Index without_sharing = 0;
  for (const auto& [id, seq] : shadow.seqs()) {
    const Index len = static_cast<Index>(seq.rows.size());
    check(cache.seq_len(id) == len, "PagedKVCache: seq_len differs from the shadow");
    const std::vector<Index>& table = cache.block_table(id);
    check(static_cast<Index>(table.size()) == shadow.blocks_for(len) &&
              table.size() == seq.blocks.size(),
          "PagedKVCache: a block table's length is not ceil(seq_len / block_size)");
    without_sharing += static_cast<Index>(table.size());
    for (std::size_t i = 0; i < table.size(); ++i) {
      const Index block = table[i];
      check(block >= 0 && block < n_blocks, "PagedKVCache: a block table names no pool block");
      ++holders[static_cast<std::size_t>(block)];
      const auto a = to_shadow.emplace(block, seq.blocks[i]);
      const auto b = to_library.emplace(seq.blocks[i], block);
      check(a.first->second == seq.blocks[i] && b.first->second == block,
            "PagedKVCache: blocks are shared where fork / copy-on-write would not share them "
            "(or not shared where they would)");
    }
    const af::Tensor<S, 3> keys = cache.gather_keys(id), values = cache.gather_values(id);
    check(keys.dimension(0) == n_kv_heads && keys.dimension(1) == len &&
              keys.dimension(2) == af::detail::stored_row_width<S>(head_dim) &&
              values.dimensions() == keys.dimensions(),
          "PagedKVCache: gathered keys/values have the wrong shape");
    std::vector<float> key_row(static_cast<std::size_t>(head_dim)), value_row(key_row.size());
    for (Index p = 0; p < len; ++p) {
      const PagedRow& row = seq.rows[static_cast<std::size_t>(p)];
      for (Index h = 0; h < n_kv_heads; ++h) {
        const std::size_t at = static_cast<std::size_t>(h * head_dim);
        af::detail::load_row(&keys(h, p, 0), head_dim, key_row.data());
        af::detail::load_row(&values(h, p, 0), head_dim, value_row.data());
        if (std::memcmp(key_row.data(), &row.k[at], sizeof(float) * head_dim) != 0 ||
            std::memcmp(value_row.data(), &row.v[at], sizeof(float) * head_dim) != 0) {
          fail(
              "PagedKVCache: a sequence's keys/values differ from what was appended to it "
              "(position " +
              std::to_string(p) + " of sequence " + std::to_string(id) + ")");
        }
      }
    }
    if (cache.records_doc_ids()) {
      const af::Tensor<af::DocId, 1> docs = cache.gather_doc_ids(id);
      check(docs.size() == len, "PagedKVCache: gathered doc ids have the wrong length");
      for (Index p = 0; p < len; ++p) {
        check(docs(p) == seq.rows[static_cast<std::size_t>(p)].doc,
              "PagedKVCache: a sequence's doc ids differ from what was appended to it");
      }
    }
  }
  Index in_use = 0;
  for (Index b = 0; b < n_blocks; ++b) {
    const Index held = holders[static_cast<std::size_t>(b)];
    check(cache.block_refs(b) == held,
          "PagedKVCache: block_refs differs from the tables holding it");
    if (held > 0) {
      ++in_use;
      check(shadow.refs(to_shadow.at(b)) == held,
            "PagedKVCache: a block is shared by the wrong count");
    }
  }
  // Blocks nobody holds are free (and so reused): none leaks, none is handed out twice.
  check(cache.free_blocks() + in_use == n_blocks && cache.blocks_in_use() == in_use,
        "PagedKVCache: free_blocks + blocks held != n_blocks");
  check(cache.free_blocks() == shadow.free_blocks(),
        "PagedKVCache: free_blocks differs from the shadow");
  check(cache.blocks_without_sharing() == without_sharing,
        "PagedKVCache: blocks_without_sharing differs from the tables' total length");
}

// New rows (Hkv, n, D) for an append, packed tokens [first, first + n) of k_new / v_new,
// as a cache of storage S holds them.
template <typename S>
std::vector<PagedRow> paged_rows(const af::Tensor<float, 3>& k_new,
                                 const af::Tensor<float, 3>& v_new,
                                 const af::Tensor<af::DocId, 2>& ids, Index first, Index n) {
  const Index n_kv_heads = k_new.dimension(0), head_dim = k_new.dimension(2);
  std::vector<PagedRow> rows(static_cast<std::size_t>(n));
  for (Index t = 0; t < n; ++t) {
    PagedRow& row = rows[static_cast<std::size_t>(t)];
    row.k.resize(static_cast<std::size_t>(n_kv_heads * head_dim));
    row.v.resize(row.k.size());
    for (Index h = 0; h < n_kv_heads; ++h) {
      const std::size_t at = static_cast<std::size_t>(h * head_dim);
      stored_row<S>(&k_new(h, first + t, 0), head_dim, &row.k[at]);
      stored_row<S>(&v_new(h, first + t, 0), head_dim, &row.v[at]);
    }
    row.doc = ids.size() > 0 ? ids(0, first + t) : 0;
  }
  return rows;
}

// Document ids for packed tokens: short runs (documents packed in a sequence) from a seed.
af::Tensor<af::DocId, 2> paged_doc_ids(Index cols, std::uint32_t seed) {
  af::Tensor<af::DocId, 2> ids(1, std::max<Index>(cols, 0));
  af::DocId doc = seed % 3;
  for (Index t = 0; t < ids.size(); ++t) {
    if ((seed + static_cast<std::uint32_t>(t)) % 5 == 0) ++doc;
    ids(0, t) = doc;
  }
  return ids;
}

// One PagedAttention call over a ragged batch of the cache's sequences (sometimes with a
// broken argument), checked per sequence against the brute force on the shadow's rows.
template <typename S>
void fuzz_paged_attention(FuzzedDataProvider& fdp, const af::PagedKVCache<S>& cache,
                          const PagedShadow& shadow, af::PagedAttention<float, S>& attn,
                          const std::function<af::SeqId()>& pick_seq, std::uint32_t seed) {
  using T = float;
  const Index n_kv_heads = cache.n_kv_heads(), head_dim = cache.head_dim();
  const int broken = fdp.ConsumeIntegralInRange<int>(0, 15);  // 1..6 break one argument
  const int m = fdp.ConsumeIntegralInRange<int>(0, 3);
  af::RaggedBatch batch{{}, {0}};
  Expected e;
  for (int s = 0; s < m; ++s) {
    const af::SeqId id =
        s > 0 && fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? batch.seqs[0] : pick_seq();
    const Index len = shadow.len(id);
    // Mostly decode steps and short chunks; sometimes the whole sequence (a prompt), or
    // one token more than the cache holds.
    const int how = fdp.ConsumeIntegralInRange<int>(0, 9);
    const Index n = how < 4   ? std::min<Index>(len, 1)
                    : how < 7 ? fdp.ConsumeIntegralInRange<Index>(0, std::min<Index>(len, 8))
                    : how < 9 ? len
                              : len + 1;
    e.bad(!shadow.contains(id), "unknown sequence");
    e.bad(std::find(batch.seqs.begin(), batch.seqs.end(), id) != batch.seqs.end(),
          "duplicate sequence");
    e.bad(n > len, "more new tokens than the sequence holds");
    batch.seqs.push_back(id);
    batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n);
  }
  const Index total = batch.total_tokens();

  af::SdpaOptions options;
  options.causal = fdp.ConsumeBool();
  options.window = pick<Index>(fdp, {0, 0, 0, 1, 3, 17});
  options.softcap = pick<double>(fdp, {0.0, 0.0, 0.0, 5.0});
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) options.scale = pick<double>(fdp, {0.5, 2.0});
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path = pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kReference,
                                          af::SdpaPath::kFused, af::SdpaPath::kDecode});
  const bool use_device = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const Index n_rep = fdp.ConsumeIntegralInRange<Index>(1, 3);
  Index n_heads = n_kv_heads * n_rep;
  if (broken == 1) n_heads = n_kv_heads == 2 ? n_heads + 1 : 0;
  e.bad(n_heads == 0 || n_heads % n_kv_heads != 0, "heads not a multiple of the KV heads");

  af::Tensor<T, 3> q(total + (broken == 2 ? 1 : 0), n_heads, head_dim);
  fill(q, seed, pick<double>(fdp, {1.0, 1.0, 4.0}), false, fdp);
  e.bad(broken == 2, "q's total_tokens");
  af::Tensor<T, 3> out(total + (broken == 3 ? 1 : 0), n_heads, head_dim);
  out.setConstant(T(7));
  e.bad(broken == 3 && out.dimensions() != q.dimensions(), "out shape");
  const bool give_lse = fdp.ConsumeBool() || broken == 4;
  af::Tensor<T, 2> lse(n_heads, total + (broken == 4 ? 1 : 0));
  lse.setConstant(T(7));
  e.bad(give_lse && broken == 4 && lse.size() > 0, "lse shape");

  // Document masks: the new tokens' recorded ids as the queries' (the keys' then come
  // from the cache's records); a cache without records needs every new token to be the
  // whole sequence (the ids are the keys' too).
  const bool docs = fdp.ConsumeIntegralInRange<int>(0, 2) == 0 || broken == 5;
  std::vector<af::Tensor<af::DocId, 2>> q_ids(batch.seqs.size());
  std::vector<af::Masks> masks;
  if (docs || broken == 6) masks.resize(batch.seqs.size() + (broken == 6 ? 1 : 0));
  e.bad(broken == 6, "Masks count");
  for (Index s = 0; s < batch.size() && docs; ++s) {
    const af::SeqId id = batch.seqs[static_cast<std::size_t>(s)];
    const Index n = batch.new_tokens(s), len = shadow.len(id);
    af::Tensor<af::DocId, 2>& ids = q_ids[static_cast<std::size_t>(s)];
    ids = af::Tensor<af::DocId, 2>(1, n + (broken == 5 && s == 0 ? 1 : 0));
    for (Index i = 0; i < ids.size(); ++i) {
      const Index p = len - n + i;
      ids(0, i) = p >= 0 && p < len ? shadow.seq(id).rows[static_cast<std::size_t>(p)].doc : 0;
    }
    masks[static_cast<std::size_t>(s)].doc_ids = ids;
    // An ids tensor without elements counts as absent (see fuzz_sdpa).
    e.bad(broken == 5 && s == 0, "doc_ids shape");
    e.bad(ids.size() > 0 && !cache.records_doc_ids() && n != len,
          "doc_ids without recorded key ids, n != len");
  }

  const PagedSnapshot before(cache);
  attn.set_options(options);
  attn.set_device(use_device ? &pool_device() : nullptr);
  const af::StridedView<T, 2> lse_view =
      give_lse ? af::StridedView<T, 2>(lse) : af::StridedView<T, 2>();
  const Outcome o = outcome_of([&] { attn(q, cache, batch, out, masks, lse_view); });
  check_outcome(e, o, "PagedAttention");
  check(PagedSnapshot(cache) == before, "PagedAttention changed the cache");
  ++stats.paged_attention_calls;
  if (o != Outcome::kOk) {
    ++stats.paged_attention_rejected;
    for (Index i = 0; i < out.size(); ++i)
      check(out.data()[i] == T(7), "a rejected PagedAttention wrote out");
    for (Index i = 0; i < lse.size(); ++i)
      check(lse.data()[i] == T(7), "a rejected PagedAttention wrote lse");
    return;
  }

  // Each sequence with new tokens against the brute force on the shadow's rows.
  for (Index s = 0; s < batch.size(); ++s) {
    const af::SeqId id = batch.seqs[static_cast<std::size_t>(s)];
    const Index n = batch.new_tokens(s), first = batch.first_token(s), len = shadow.len(id);
    if (n == 0) continue;
    af::Tensor<T, 4> q4(1, n_heads, n, head_dim), k4(1, n_kv_heads, len, head_dim),
        v4(k4.dimensions());
    for (Index h = 0; h < n_heads; ++h)
      for (Index i = 0; i < n; ++i)
        for (Index d = 0; d < head_dim; ++d) q4(0, h, i, d) = q(first + i, h, d);
    af::Tensor<af::DocId, 2> kv_ids(1, len);
    for (Index p = 0; p < len; ++p) {
      const PagedRow& row = shadow.seq(id).rows[static_cast<std::size_t>(p)];
      for (Index h = 0; h < n_kv_heads; ++h) {
        for (Index d = 0; d < head_dim; ++d) {
          k4(0, h, p, d) = row.k[static_cast<std::size_t>(h * head_dim + d)];
          v4(0, h, p, d) = row.v[static_cast<std::size_t>(h * head_dim + d)];
        }
      }
      kv_ids(0, p) = row.doc;
    }
    af::test::DenseMasks dense;
    dense.causal = options.causal;
    dense.window = options.window;
    if (docs) {
      dense.q_docs = q_ids[static_cast<std::size_t>(s)];
      if (cache.records_doc_ids()) dense.kv_docs = kv_ids;
    }
    const af::test::DenseOptions dense_options = dense_options_of(options);
    const af::test::DenseResult exact =
        af::test::dense_sdpa(af::test::to_double(q4), af::test::to_double(k4),
                             af::test::to_double(v4), dense, dense_options);
    const af::test::AccuracyBudget budget = af::test::sdpa_budget<T>(
        options.path, af::test::budget_inputs(q4, k4, dense, dense_options, exact));
    const double v_scale = std::max(af::test::max_abs(v4), 1e-300);
    double out_err = 0.0, lse_err = 0.0;
    for (Index h = 0; h < n_heads; ++h) {
      for (Index i = 0; i < n; ++i) {
        for (Index d = 0; d < head_dim; ++d) {
          const double diff =
              std::abs(static_cast<double>(out(first + i, h, d)) - exact.out(0, h, i, d));
          if (!(diff <= out_err)) out_err = std::isnan(diff) ? af::test::kInf : diff;
        }
        if (!give_lse) continue;
        const double want = exact.lse(0, h, i), got = lse(h, first + i);
        const double diff = got == want ? 0.0 : std::abs(got - want);  // -inf == -inf
        if (!(diff <= lse_err)) lse_err = std::isnan(diff) ? af::test::kInf : diff;
      }
    }
    if (!(out_err / v_scale <= budget.out)) {
      fail("PagedAttention: sequence " + std::to_string(id) + " (n " + std::to_string(n) +
           ", len " + std::to_string(len) + ") out error " + sci(out_err / v_scale) + " > budget " +
           sci(budget.out));
    }
    if (!(lse_err <= budget.lse)) {
      fail("PagedAttention: sequence " + std::to_string(id) + " lse error " + sci(lse_err) +
           " > budget " + sci(budget.lse));
    }
  }
  ++stats.paged_attention_compared;
  // The thread count changes nothing.
  if (use_device) {
    af::Tensor<T, 3> serial(out.dimensions());
    af::PagedAttention<T, S> serial_attn(options);
    serial_attn(q, cache, batch, serial, masks);
    check(af::test::bitwise_equal(serial, out),
          "PagedAttention: pooled result differs from the serial one");
  }
}

// S is the cache's storage: float, or QInt8 (float keys and values quantized as appended).
template <typename S>
void fuzz_paged(FuzzedDataProvider& fdp) {
  using T = float;
  // Mostly a valid pool of a few blocks (so that running out of them is common); one
  // input in eight draws the constructor's arguments freely.
  const bool free_args = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  const Index n_blocks = fdp.ConsumeIntegralInRange<Index>(free_args ? -1 : 1, 5);
  const Index block_size =
      free_args ? pick<Index>(fdp, {16, 32, 0, 8, 24, -16}) : pick<Index>(fdp, {16, 32});
  const Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 2);
  const Index head_dim = cache_head_dim<S>(fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 8));
  const bool record = fdp.ConsumeBool();
  std::optional<af::PagedKVCache<S>> made_cache;
  const Outcome made =
      outcome_of([&] { made_cache.emplace(n_blocks, block_size, n_kv_heads, head_dim, record); });
  Expected ctor;
  ctor.bad(n_blocks <= 0 || n_kv_heads <= 0 || head_dim <= 0, "non-positive size");
  ctor.bad(block_size <= 0 || block_size % 16 != 0, "block_size not a positive multiple of 16");
  check_outcome(ctor, made, "PagedKVCache constructor");
  if (made != Outcome::kOk) return;
  af::PagedKVCache<S>& cache = *made_cache;

  PagedShadow shadow(n_blocks, block_size);
  std::set<af::SeqId> issued;    // handles are never reused
  std::vector<af::SeqId> freed;  // for calls naming a sequence that is gone
  af::PagedAttention<T, S> attn;  // reused: its scratch outlives calls of other shapes
  std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  // A live sequence, or now and then (always, when none is live) one the cache does not hold.
  const std::function<af::SeqId()> pick_seq = [&]() -> af::SeqId {
    const std::vector<af::SeqId> live = shadow.ids();
    if (live.empty() || fdp.ConsumeIntegralInRange<int>(0, 9) == 0) {
      return pick<af::SeqId>(fdp, {issued.empty() ? 0 : *issued.rbegin() + 1, -1,
                                   freed.empty() ? 1000 : freed.back()});
    }
    return live[fdp.ConsumeIntegralInRange<std::size_t>(0, live.size() - 1)];
  };
  const auto issue = [&](af::SeqId id) {
    check(issued.insert(id).second, "PagedKVCache: a sequence handle was issued twice");
  };
  // k_new, v_new (Hkv, total, D) and doc ids (1, total) for `total` packed tokens, with at
  // most one broken part; the verdict on them goes into e.
  struct NewTokens {
    af::Tensor<T, 3> k, v, k_storage;
    af::ConstView<T, 3> k_view, v_view;
    af::Tensor<af::DocId, 2> ids;
    af::DocIdView ids_view;
  };
  // (Filled in place: the views point into the tensors next to them.)
  const auto new_tokens = [&](NewTokens& t, Index total, int broken, Expected& e) {
    t.k = af::test::random_uniform<T, 3>(
        {n_kv_heads + (broken == 1 ? 1 : 0), total, head_dim + (broken == 2 ? 1 : 0)}, ++seed);
    t.v = af::test::random_uniform<T, 3>({n_kv_heads, total + (broken == 3 ? 1 : 0), head_dim},
                                         ++seed);
    t.k_view = t.k;
    t.v_view = t.v;
    e.bad(broken >= 1 && broken <= 3, "k_new / v_new shape");
    if (broken == 4 && total > 0) {
      // The same rows read with a stride of 2 in the last dimension: rejected, never read.
      t.k_storage = af::Tensor<T, 3>(n_kv_heads, total, 2 * head_dim);
      t.k_view = af::ConstView<T, 3>(t.k_storage.data(), {n_kv_heads, total, head_dim},
                                     {total * 2 * head_dim, 2 * head_dim, 2});
      e.bad(true, "k_new with a strided last dimension");
    } else if (broken == 7) {
      // Projections written (total, Hkv, D), read transposed: valid.
      t.k_storage = af::Tensor<T, 3>(total, n_kv_heads, head_dim);
      for (Index h = 0; h < n_kv_heads; ++h)
        for (Index p = 0; p < total; ++p)
          for (Index d = 0; d < head_dim; ++d) t.k_storage(p, h, d) = t.k(h, p, d);
      t.k_view = af::ConstView<T, 3>(t.k_storage).transpose(0, 1);
    }
    const bool give_ids = broken == 5 ? !record : record;
    t.ids = paged_doc_ids(give_ids ? total + (broken == 6 ? 1 : 0) : 0, ++seed);
    if (give_ids) t.ids_view = t.ids;
    // An ids tensor without elements is absent; a cache that records ids needs them only
    // for tokens to record.
    const bool has_ids = t.ids_view.has_value();
    e.bad(record && !has_ids && total > 0, "doc ids missing for a cache that records them");
    e.bad(!record && has_ids, "doc ids given to a cache that does not record them");
    e.bad(record && has_ids && t.ids.dimension(1) != total, "doc_ids_new shape");
  };

  const int n_ops = fdp.ConsumeIntegralInRange<int>(1, 16);
  for (int op = 0; op < n_ops && fdp.remaining_bytes() > 0; ++op) {
    const PagedSnapshot before(cache);
    const int kind = fdp.ConsumeIntegralInRange<int>(0, 9);
    Expected e;
    Outcome o = Outcome::kOk;
    if (kind == 8 || kind == 9) {
      fuzz_paged_attention(fdp, cache, shadow, attn, pick_seq, ++seed);
      continue;
    }
    if (kind == 0) {
      af::SeqId id = -1;
      o = outcome_of([&] { id = cache.add_sequence(); });
      check_outcome(e, o, "PagedKVCache::add_sequence");
      issue(id);
      shadow.add(id);
    } else if (kind <= 2) {
      // One sequence: mostly a few tokens, sometimes more than the pool holds.
      const af::SeqId id = pick_seq();
      const Index n = fdp.ConsumeIntegralInRange<int>(0, 7) == 0
                          ? fdp.ConsumeIntegralInRange<Index>(0, (n_blocks + 1) * block_size)
                          : fdp.ConsumeIntegralInRange<Index>(0, block_size + 3);
      const int broken = fdp.ConsumeIntegralInRange<int>(0, 15);
      NewTokens t;
      new_tokens(t, n, broken, e);
      e.bad(!shadow.contains(id), "unknown sequence");
      e.overflow = !e.invalid && shadow.blocks_needed({id}, {n}) > shadow.free_blocks();
      o = outcome_of([&] { cache.append(id, t.k_view, t.v_view, t.ids_view); });
      check_outcome(e, o, "PagedKVCache::append");
      if (o == Outcome::kOk) shadow.append(id, paged_rows<S>(t.k, t.v, t.ids, 0, n));
    } else if (kind <= 4) {
      // Several sequences packed (sometimes one twice, or one unknown), sometimes with
      // malformed cu_seqlens.
      const int m = fdp.ConsumeIntegralInRange<int>(0, 3);
      af::RaggedBatch batch{{}, {0}};
      std::vector<Index> n;
      for (int s = 0; s < m; ++s) {
        const af::SeqId id =
            s > 0 && fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? batch.seqs[0] : pick_seq();
        e.bad(!shadow.contains(id), "unknown sequence");
        e.bad(std::find(batch.seqs.begin(), batch.seqs.end(), id) != batch.seqs.end(),
              "duplicate sequence");
        batch.seqs.push_back(id);
        n.push_back(fdp.ConsumeIntegralInRange<int>(0, 7) == 0
                        ? fdp.ConsumeIntegralInRange<Index>(0, (n_blocks + 1) * block_size)
                        : fdp.ConsumeIntegralInRange<Index>(0, block_size / 2));
        batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n.back());
      }
      const Index total = batch.cu_seqlens.back();
      const int broken = fdp.ConsumeIntegralInRange<int>(0, 19);
      if (broken == 10) {
        batch.cu_seqlens.pop_back();
      } else if (broken == 11) {
        batch.cu_seqlens.push_back(total);
      } else if (broken == 12) {
        for (Index& c : batch.cu_seqlens) ++c;
      } else if (broken == 13 && m > 0) {
        const std::size_t s =
            fdp.ConsumeIntegralInRange<std::size_t>(1, static_cast<std::size_t>(m));
        batch.cu_seqlens[s] = batch.cu_seqlens[s - 1] - 1;
      }
      e.bad(broken >= 10 && broken <= 13 && !(broken == 13 && m == 0), "malformed cu_seqlens");
      NewTokens t;
      new_tokens(t, total, broken < 10 ? broken : 0, e);
      e.overflow = !e.invalid && shadow.blocks_needed(batch.seqs, n) > shadow.free_blocks();
      o = outcome_of([&] { cache.append(batch, t.k_view, t.v_view, t.ids_view); });
      check_outcome(e, o, "PagedKVCache::append (ragged)");
      if (o == Outcome::kOk) {
        for (Index s = 0; s < batch.size(); ++s) {
          shadow.append(batch.seqs[static_cast<std::size_t>(s)],
                        paged_rows<S>(t.k, t.v, t.ids, batch.first_token(s), batch.new_tokens(s)));
        }
      }
    } else if (kind == 5) {
      const af::SeqId parent = pick_seq();
      e.bad(!shadow.contains(parent), "unknown sequence");
      af::SeqId child = -1;
      o = outcome_of([&] { child = cache.fork(parent); });
      check_outcome(e, o, "PagedKVCache::fork");
      if (o == Outcome::kOk) {
        issue(child);
        shadow.fork(parent, child);
      }
    } else if (kind == 6) {
      const af::SeqId id = pick_seq();
      const Index len = shadow.len(id);
      const Index new_len = fdp.ConsumeIntegralInRange<Index>(-1, len + 2);
      e.bad(!shadow.contains(id), "unknown sequence");
      e.bad(new_len < 0 || new_len > len, "truncate outside [0, seq_len]");
      o = outcome_of([&] { cache.truncate(id, new_len); });
      check_outcome(e, o, "PagedKVCache::truncate");
      if (o == Outcome::kOk) shadow.truncate(id, new_len);
    } else {
      const af::SeqId id = pick_seq();
      e.bad(!shadow.contains(id), "unknown sequence");
      o = outcome_of([&] { cache.free_sequence(id); });
      check_outcome(e, o, "PagedKVCache::free_sequence");
      if (o == Outcome::kOk) {
        shadow.free_sequence(id);
        freed.push_back(id);
      }
    }
    ++stats.calls[kPagedScenario];
    if (o != Outcome::kOk) {
      ++stats.rejected[kPagedScenario];
      check(PagedSnapshot(cache) == before, "a rejected PagedKVCache call changed the pool");
    } else {
      ++stats.compared[kPagedScenario];
    }
    check_paged_pool(cache, shadow);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  // The input's last byte picks the scenario (byte % 5, as the seed corpus was written)
  // and, for the two cache scenarios, the cache's storage: QInt8 when byte / 5 % 4 == 3,
  // float otherwise. Every seed decodes as it did before QInt8 caches existed; the cache
  // seeds whose byte says QInt8 now run over a QInt8 cache.
  const std::uint8_t choice = fdp.ConsumeIntegral<std::uint8_t>();
  const bool qint8 = choice / 5 % 4 == 3;
  switch (choice % 5) {
    case 0:
      fuzz_sdpa<float>(fdp);
      break;
    case 1:
      fuzz_sdpa<double>(fdp);
      break;
    case 2:
      stats.qint8_inputs[kCacheScenario] += qint8;
      qint8 ? fuzz_kv_cache<af::QInt8>(fdp) : fuzz_kv_cache<float>(fdp);
      break;
    case 3:
      fuzz_attention(fdp);
      break;
    default:
      stats.qint8_inputs[kPagedScenario] += qint8;
      qint8 ? fuzz_paged<af::QInt8>(fdp) : fuzz_paged<float>(fdp);
      break;
  }
  return 0;
}
