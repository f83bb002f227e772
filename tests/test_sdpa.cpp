// Tests of sdpa.hpp (and through it detail/sdpa_reference.hpp and the fast kernel):
// hand-computed cases, a randomized sweep against the independent dense double brute
// force of test_util.hpp, thread-count invariance, input forms, and validation.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <type_traits>
#include <vector>

#include "attnforge/sdpa.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

using test::DenseMasks;
using test::DenseOptions;
using test::DenseResult;
using test::expect_invalid;
using test::kAllPaths;
using test::path_name;

// Float results vs the double brute force, relative to the output's scale. The reference
// path rounds once (2^-24); a float-accumulating kernel adds errors of order
// sqrt(Skv) * 2^-24 in the softmax sums and sqrt(D) * 2^-24 * |q||k| in the scores,
// both < 1e-6 here; 1e-5 leaves a margin of 10 while still catching any wrong weight.
constexpr double kFloatTol = 1e-5;
// Double results: only summation order differs from the brute force (~1e-15 relative).
constexpr double kDoubleTol = 1e-12;

SdpaOptions with_path(SdpaOptions options, SdpaPath path) {
  options.path = path;
  return options;
}

// Every row the brute force found empty (lse = -inf, under kZeros) must be exactly 0 with
// lse exactly -inf in the library's result: no NaN, no tiny garbage.
template <typename T, typename A>
void expect_empty_rows_exact(const Tensor<T, 4>& out, const Tensor<A, 3>& lse,
                             const DenseResult& ref) {
  for (Index b = 0; b < out.dimension(0); ++b) {
    for (Index h = 0; h < out.dimension(1); ++h) {
      for (Index i = 0; i < out.dimension(2); ++i) {
        if (ref.lse(b, h, i) != -test::kInf) continue;
        EXPECT_EQ(lse(b, h, i), -std::numeric_limits<A>::infinity()) << b << "," << h << "," << i;
        for (Index d = 0; d < out.dimension(3); ++d) {
          ASSERT_EQ(out(b, h, i, d), T(0)) << "empty row " << b << "," << h << "," << i;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Compile time: ranks and element types are static, so misuse does not compile. The free
// functions are SFINAE-constrained; this detection idiom sees that.

template <typename Q, typename K, typename V, typename = void>
struct SdpaInvocable : std::false_type {};
template <typename Q, typename K, typename V>
struct SdpaInvocable<
    Q, K, V,
    std::void_t<decltype(scaled_dot_product_attention(
        std::declval<const Q&>(), std::declval<const K&>(), std::declval<const V&>()))>>
    : std::true_type {};

template <typename Q, typename K, typename V, typename = void>
struct SdpaWithLseInvocable : std::false_type {};
template <typename Q, typename K, typename V>
struct SdpaWithLseInvocable<
    Q, K, V,
    std::void_t<decltype(scaled_dot_product_attention_with_lse(
        std::declval<const Q&>(), std::declval<const K&>(), std::declval<const V&>()))>>
    : std::true_type {};

template <typename Q, typename K, typename = void>
struct WeightsInvocable : std::false_type {};
template <typename Q, typename K>
struct WeightsInvocable<
    Q, K,
    std::void_t<decltype(attention_weights(std::declval<const Q&>(), std::declval<const K&>()))>>
    : std::true_type {};

using F4 = Tensor<float, 4>;
static_assert(SdpaInvocable<F4, F4, F4>::value);
static_assert(
    SdpaInvocable<TensorMap<float, 4>, ConstView<float, 4>, ConstTensorMap<float, 4>>::value);
static_assert(SdpaInvocable<Tensor<double, 4>, Tensor<double, 4>, Tensor<double, 4>>::value);
static_assert(!SdpaInvocable<Tensor<float, 3>, F4, F4>::value, "rank-3 q must not compile");
static_assert(!SdpaInvocable<F4, Tensor<float, 5>, F4>::value, "rank-5 k must not compile");
static_assert(!SdpaInvocable<F4, F4, ConstView<float, 3>>::value, "rank-3 v must not compile");
static_assert(!SdpaInvocable<TensorMap<float, 3>, F4, F4>::value, "rank-3 map must not compile");
static_assert(!SdpaInvocable<Tensor<double, 4>, F4, F4>::value, "mixed element types");
static_assert(SdpaWithLseInvocable<F4, F4, F4>::value);
static_assert(!SdpaWithLseInvocable<F4, Tensor<float, 3>, F4>::value);
static_assert(WeightsInvocable<F4, F4>::value);
static_assert(!WeightsInvocable<Tensor<float, 3>, F4>::value);
static_assert(!std::is_invocable_v<ScaledDotProductAttention<float>&, Tensor<float, 3>&, F4&, F4&>);
static_assert(std::is_invocable_v<ScaledDotProductAttention<float>&, F4&, F4&, F4&>);
// A ColMajor tensor or a non-tensor argument removes the overload (SFINAE) rather than
// breaking compilation inside the constraint.
static_assert(!SdpaInvocable<Eigen::Tensor<float, 4>, F4, F4>::value, "ColMajor q");
static_assert(!SdpaInvocable<int, F4, F4>::value, "not a tensor");

// ---------------------------------------------------------------------------------------
// Hand-computed cases.

TEST(SdpaHandComputed, SingleQueryTwoKeysWithExplicitScale) {
  // scale 1, scores (ln 3, 0): p = (3/4, 1/4); out = 3/4 (1, 2) + 1/4 (5, -2) = (2, 1);
  // lse = ln(3 + 1).
  Tensor<double, 4> q(1, 1, 1, 2), k(1, 1, 2, 2), v(1, 1, 2, 2);
  q.setValues({{{{std::log(3.0), 0.0}}}});
  k.setValues({{{{1.0, 0.0}, {0.0, 1.0}}}});
  v.setValues({{{{1.0, 2.0}, {5.0, -2.0}}}});
  SdpaOptions options;
  options.scale = 1.0;
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const auto d = scaled_dot_product_attention_with_lse(q, k, v, with_path(options, path));
    EXPECT_NEAR(d.out(0, 0, 0, 0), 2.0, 1e-14);
    EXPECT_NEAR(d.out(0, 0, 0, 1), 1.0, 1e-14);
    EXPECT_NEAR(d.lse(0, 0, 0), std::log(4.0), 1e-14);
    const Tensor<float, 4> qf = q.cast<float>(), kf = k.cast<float>(), vf = v.cast<float>();
    const auto f = scaled_dot_product_attention_with_lse(qf, kf, vf, with_path(options, path));
    EXPECT_NEAR(f.out(0, 0, 0, 0), 2.0, 1e-6);  // float inputs and output: a few ulps of 5
    EXPECT_NEAR(f.out(0, 0, 0, 1), 1.0, 1e-6);
    EXPECT_NEAR(f.lse(0, 0, 0), std::log(4.0), 1e-6);
  }
  const Tensor<double, 4> p = attention_weights(q, k, options);
  EXPECT_NEAR(p(0, 0, 0, 0), 0.75, 1e-15);
  EXPECT_NEAR(p(0, 0, 0, 1), 0.25, 1e-15);
}

TEST(SdpaHandComputed, DefaultScaleIsOneOverSqrtHeadDim) {
  // D = 2: default scale 1/sqrt(2), so q = (sqrt(2) ln 3, 0) gives the scores (ln 3, 0).
  Tensor<double, 4> q(1, 1, 1, 2), k(1, 1, 2, 2), v(1, 1, 2, 2);
  q.setValues({{{{std::sqrt(2.0) * std::log(3.0), 0.0}}}});
  k.setValues({{{{1.0, 0.0}, {0.0, 1.0}}}});
  v.setValues({{{{1.0, 2.0}, {5.0, -2.0}}}});
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    SdpaOptions options;
    options.path = path;
    const Tensor<double, 4> out = scaled_dot_product_attention(q, k, v, options);
    EXPECT_NEAR(out(0, 0, 0, 0), 2.0, 1e-14);
    EXPECT_NEAR(out(0, 0, 0, 1), 1.0, 1e-14);
  }
}

TEST(SdpaHandComputed, CausalFirstRowReturnsTheFirstValueExactly) {
  // Sq = Skv = 2, causal: row 0 sees key 0 alone (p = 1), row 1 both keys as above.
  Tensor<float, 4> q(1, 1, 2, 2), k(1, 1, 2, 2), v(1, 1, 2, 2);
  q.setValues({{{{0.3f, -0.7f}, {std::log(3.0f), 0.0f}}}});
  k.setValues({{{{1.0f, 0.0f}, {0.0f, 1.0f}}}});
  v.setValues({{{{1.0f, 2.0f}, {5.0f, -2.0f}}}});
  SdpaOptions options;
  options.scale = 1.0;
  options.causal = true;
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const auto r = scaled_dot_product_attention_with_lse(q, k, v, with_path(options, path));
    EXPECT_EQ(r.out(0, 0, 0, 0), 1.0f);
    EXPECT_EQ(r.out(0, 0, 0, 1), 2.0f);
    EXPECT_NEAR(r.lse(0, 0, 0), 0.3, 1e-6);  // lse of one score is that score
    EXPECT_NEAR(r.out(0, 0, 1, 0), 2.0, 1e-6);
    EXPECT_NEAR(r.out(0, 0, 1, 1), 1.0, 1e-6);
  }
}

TEST(SdpaHandComputed, SoftcapSquashesScoresBeforeTheSoftmax) {
  // scale 1, raw scores (2, 0); softcap 2: 2 tanh(2 / 2) = 2 tanh(1) and 0, with
  // tanh(1) = 0.7615941559557649.
  constexpr double kCapped = 2.0 * 0.76159415595576488812;
  Tensor<double, 4> q(1, 1, 1, 2), k(1, 1, 2, 2), v(1, 1, 2, 2);
  q.setValues({{{{2.0, 0.0}}}});
  k.setValues({{{{1.0, 0.0}, {0.0, 1.0}}}});
  v.setValues({{{{1.0, 0.0}, {0.0, 1.0}}}});
  SdpaOptions options;
  options.scale = 1.0;
  options.softcap = 2.0;
  const double p0 = std::exp(kCapped) / (std::exp(kCapped) + 1.0);
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const auto r = scaled_dot_product_attention_with_lse(q, k, v, with_path(options, path));
    EXPECT_NEAR(r.out(0, 0, 0, 0), p0, 1e-14);
    EXPECT_NEAR(r.out(0, 0, 0, 1), 1.0 - p0, 1e-14);
    EXPECT_NEAR(r.lse(0, 0, 0), std::log(std::exp(kCapped) + 1.0), 1e-14);
  }
}

TEST(SdpaHandComputed, QueryHeadReadsKvHeadHOverNRep) {
  // H = 4, Hkv = 2: heads 0, 1 read kv head 0 and heads 2, 3 read kv head 1 (the grouping
  // of repeat_interleave), not h % Hkv. Each kv head's values are one constant, so each
  // output is that constant whatever the weights.
  const Tensor<float, 4> q = test::random_normal<float, 4>({2, 4, 3, 8}, 1);
  const Tensor<float, 4> k = test::random_normal<float, 4>({2, 2, 5, 8}, 2);
  Tensor<float, 4> v(2, 2, 5, 8);
  for (Index b = 0; b < 2; ++b) {
    for (Index g = 0; g < 2; ++g) {
      for (Index j = 0; j < 5; ++j) {
        for (Index d = 0; d < 8; ++d) v(b, g, j, d) = 10.0f * static_cast<float>(g + 1);
      }
    }
  }
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const Tensor<float, 4> out = scaled_dot_product_attention(q, k, v, with_path({}, path));
    for (Index b = 0; b < 2; ++b) {
      for (Index h = 0; h < 4; ++h) {
        for (Index i = 0; i < 3; ++i) {
          // Weights sum to 1 up to float rounding: 10-20 times a few 2^-24.
          EXPECT_NEAR(out(b, h, i, 0), 10.0 * static_cast<double>(h / 2 + 1), 1e-5) << "head " << h;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Empty rows.

TEST(SdpaEmptyRows, ZerosPolicyGivesZeroOutputAndMinusInfLseNeverNaN) {
  const Tensor<float, 4> q = test::random_normal<float, 4>({2, 2, 3, 8}, 3);
  const Tensor<float, 4> k = test::random_normal<float, 4>({2, 1, 3, 8}, 4);
  const Tensor<float, 4> v = test::random_normal<float, 4>({2, 1, 3, 8}, 5);
  Tensor<bool, 2> pad(2, 3);
  pad.setValues({{false, true, true}, {false, false, false}});  // b0 row 0 (causal), all of b1
  Masks masks;
  masks.key_padding_mask = pad;
  SdpaOptions options;
  options.causal = true;
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const auto r = scaled_dot_product_attention_with_lse(q, k, v, with_path(options, path), masks);
    EXPECT_FALSE(test::has_nan(r.out));
    EXPECT_FALSE(test::has_nan(r.lse));
    for (Index h = 0; h < 2; ++h) {
      EXPECT_EQ(r.lse(0, h, 0), -std::numeric_limits<float>::infinity());
      EXPECT_TRUE(std::isfinite(r.lse(0, h, 1)));
      for (Index i = 0; i < 3; ++i)
        EXPECT_EQ(r.lse(1, h, i), -std::numeric_limits<float>::infinity());
      for (Index d = 0; d < 8; ++d) {
        EXPECT_EQ(r.out(0, h, 0, d), 0.0f);
        for (Index i = 0; i < 3; ++i) EXPECT_EQ(r.out(1, h, i, d), 0.0f);
      }
    }
    const Tensor<float, 4> probs = attention_weights(q, k, with_path(options, path), masks);
    EXPECT_FALSE(test::has_nan(probs));
    for (Index h = 0; h < 2; ++h) {
      for (Index i = 0; i < 3; ++i) {
        for (Index j = 0; j < 3; ++j) EXPECT_EQ(probs(1, h, i, j), 0.0f);
      }
    }
  }
}

TEST(SdpaEmptyRows, AttendAllPolicyAttendsEveryKeyUnmaskedInEmptyRowsOnly) {
  const Tensor<float, 4> q = test::random_normal<float, 4>({1, 2, 4, 8}, 6);
  const Tensor<float, 4> k = test::random_normal<float, 4>({1, 1, 6, 8}, 7);
  const Tensor<float, 4> v = test::random_normal<float, 4>({1, 1, 6, 8}, 8);
  Tensor<bool, 2> pad(1, 6);
  pad.setValues({{false, false, false, true, true, false}});
  Masks masks;
  masks.key_padding_mask = pad;
  SdpaOptions options;
  options.causal = true;  // rows at positions 2..5; row 0 (position 2) sees only padded keys
  options.empty_rows = EmptyRowPolicy::kAttendAll;
  SdpaOptions zeros = options;
  zeros.empty_rows = EmptyRowPolicy::kZeros;
  const auto unmasked =
      scaled_dot_product_attention_with_lse(q, k, v, with_path({}, SdpaPath::kReference));
  const auto masked =
      scaled_dot_product_attention_with_lse(q, k, v, with_path(zeros, SdpaPath::kReference), masks);
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const auto r = scaled_dot_product_attention_with_lse(q, k, v, with_path(options, path), masks);
    for (Index h = 0; h < 2; ++h) {
      // Row 0: all 6 keys, no causal, no padding.
      EXPECT_NEAR(r.lse(0, h, 0), unmasked.lse(0, h, 0), 1e-5);
      for (Index d = 0; d < 8; ++d) {
        EXPECT_NEAR(r.out(0, h, 0, d), unmasked.out(0, h, 0, d), 1e-5);  // float rounding
      }
      // Other rows keep their masks.
      for (Index i = 1; i < 4; ++i) {
        EXPECT_NEAR(r.lse(0, h, i), masked.lse(0, h, i), 1e-5);
        for (Index d = 0; d < 8; ++d) EXPECT_NEAR(r.out(0, h, i, d), masked.out(0, h, i, d), 1e-5);
      }
    }
    const Tensor<float, 4> probs = attention_weights(q, k, with_path(options, path), masks);
    for (Index j = 0; j < 6; ++j) EXPECT_GT(probs(0, 0, 0, j), 0.0f) << "key " << j;
    EXPECT_EQ(probs(0, 0, 1, 0), 0.0f);  // row 1 still masked
  }
}

TEST(SdpaEmptyRows, NoKeysAtAllGiveZerosNotNaNUnderEitherPolicy) {
  // Skv = 0 (an empty cache, non-causal): every row is an empty softmax. Attending "all
  // Skv keys" then attends none, which is the same empty sum: 0, never NaN.
  const Tensor<float, 4> q = test::random_normal<float, 4>({1, 2, 3, 8}, 9);
  const Tensor<float, 4> kv(1, 1, 0, 8);
  for (EmptyRowPolicy policy : {EmptyRowPolicy::kZeros, EmptyRowPolicy::kAttendAll}) {
    for (SdpaPath path : kAllPaths) {
      SCOPED_TRACE(std::string(path_name(path)) +
                   (policy == EmptyRowPolicy::kZeros ? " kZeros" : " kAttendAll"));
      SdpaOptions options;
      options.empty_rows = policy;
      options.path = path;
      const auto r = scaled_dot_product_attention_with_lse(q, kv, kv, options);
      EXPECT_FALSE(test::has_nan(r.out));
      EXPECT_EQ(test::max_abs(r.out), 0.0);
      for (Index h = 0; h < 2; ++h) {
        for (Index i = 0; i < 3; ++i)
          EXPECT_EQ(r.lse(0, h, i), -std::numeric_limits<float>::infinity());
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Log-sum-exp: partial results over disjoint key ranges merge exactly.

TEST(SdpaLse, PartialResultsOverDisjointKeyRangesMergeToTheFullResult) {
  const Tensor<double, 4> q = test::random_normal<double, 4>({2, 4, 5, 16}, 10);
  const Tensor<double, 4> k = test::random_normal<double, 4>({2, 2, 23, 16}, 11);
  const Tensor<double, 4> v = test::random_normal<double, 4>({2, 2, 23, 16}, 12);
  const ConstView<double, 4> kv_k(k), kv_v(v);
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const SdpaOptions options = with_path({}, path);
    const auto full = scaled_dot_product_attention_with_lse(q, k, v, options);
    const auto left = scaled_dot_product_attention_with_lse(q, kv_k.narrow(2, 0, 9),
                                                            kv_v.narrow(2, 0, 9), options);
    const auto right = scaled_dot_product_attention_with_lse(q, kv_k.narrow(2, 9, 14),
                                                             kv_v.narrow(2, 9, 14), options);
    double worst_out = 0.0, worst_lse = 0.0;
    for (Index b = 0; b < 2; ++b) {
      for (Index h = 0; h < 4; ++h) {
        for (Index i = 0; i < 5; ++i) {
          const double m = std::max(left.lse(b, h, i), right.lse(b, h, i));
          const double wl = std::exp(left.lse(b, h, i) - m), wr = std::exp(right.lse(b, h, i) - m);
          worst_lse = std::max(worst_lse, std::abs(m + std::log(wl + wr) - full.lse(b, h, i)));
          for (Index d = 0; d < 16; ++d) {
            const double merged =
                (wl * left.out(b, h, i, d) + wr * right.out(b, h, i, d)) / (wl + wr);
            worst_out = std::max(worst_out, std::abs(merged - full.out(b, h, i, d)));
          }
        }
      }
    }
    EXPECT_LT(worst_out, 1e-13);  // double arithmetic on O(1) values
    EXPECT_LT(worst_lse, 1e-13);
  }
}

// ---------------------------------------------------------------------------------------
// The randomized sweep against the dense double brute force.

enum class Docs { kNone, kSorted, kUnsorted };
enum class Padding { kNone, kRandom, kEmptyRows };
// Element masks: a boolean attn_mask, an additive attn_bias (with -inf entries), or both.
enum class Elements { kNone, kBool, kBias, kBoth };

struct SweepCase {
  std::string label;
  Index batch = 1, n_heads = 4, n_kv_heads = 4, q_len = 1, kv_len = 1, head_dim = 64;
  bool causal = false;
  Docs docs = Docs::kNone;
  Padding padding = Padding::kNone;
  Index window = 0;
  double softcap = 0.0;
  std::optional<double> scale;
  bool attend_all = false;
  Elements elements = Elements::kNone;
  bool alibi = false;
  bool sinks = false;
  std::uint32_t seed = 0;

  // Each kernel is forced where it is slow only at short lengths: the long-KV decode cases
  // skip kFused (one query row per tile of lanes), the Sq = 257 cases skip kDecode (every
  // query row against every key, unblocked).
  std::vector<SdpaPath> paths() const {
    if (label.rfind("Decode", 0) == 0) {
      return {SdpaPath::kAuto, SdpaPath::kReference, SdpaPath::kDecode};
    }
    if (q_len > 33) return {SdpaPath::kAuto, SdpaPath::kReference, SdpaPath::kFused};
    return {std::begin(kAllPaths), std::end(kAllPaths)};
  }

  std::string name() const {
    return "Sq" + std::to_string(q_len) + "Skv" + std::to_string(kv_len) + "_D" +
           std::to_string(head_dim) + "_H" + std::to_string(n_heads) + "Kv" +
           std::to_string(n_kv_heads) + "_B" + std::to_string(batch) + "_" + label;
  }
};

// gtest prints a failing case by its name instead of its bytes.
void PrintTo(const SweepCase& c, std::ostream* os) { *os << c.name(); }

struct Variant {
  const char* label;
  bool causal;
  Docs docs;
  Padding padding;
  bool window, softcap, scale, attend_all;
  Elements elements = Elements::kNone;
  bool alibi = false, sinks = false;
};

// Each option alone, then combined; every variant runs at every Sq.
constexpr Variant kVariants[] = {
    {"Plain", false, Docs::kNone, Padding::kNone, false, false, false, false},
    {"Causal", true, Docs::kNone, Padding::kNone, false, false, false, false},
    {"DocsSorted", false, Docs::kSorted, Padding::kNone, false, false, false, false},
    {"DocsUnsorted", false, Docs::kUnsorted, Padding::kNone, false, false, false, false},
    {"Padding", false, Docs::kNone, Padding::kRandom, false, false, false, false},
    {"PaddingEmptyRows", false, Docs::kNone, Padding::kEmptyRows, false, false, false, false},
    {"CausalPaddingEmptyRowsAttendAll", true, Docs::kNone, Padding::kEmptyRows, false, false, false,
     true},
    {"Window", false, Docs::kNone, Padding::kNone, true, false, false, false},
    {"CausalWindow", true, Docs::kNone, Padding::kNone, true, false, false, false},
    {"Softcap", false, Docs::kNone, Padding::kNone, false, true, false, false},
    {"Scale", false, Docs::kNone, Padding::kNone, false, false, true, false},
    {"CausalDocsSorted", true, Docs::kSorted, Padding::kNone, false, false, false, false},
    {"AllOptions", true, Docs::kUnsorted, Padding::kEmptyRows, true, true, true, false},
    {"AllOptionsAttendAll", true, Docs::kSorted, Padding::kEmptyRows, true, true, true, true},
    // The element masks, ALiBi and sinks, alone and with the other masks.
    {"BoolMask", false, Docs::kNone, Padding::kNone, false, false, false, false, Elements::kBool},
    {"CausalDocsBoolMask", true, Docs::kSorted, Padding::kNone, false, false, false, false, Elements::kBool},
    {"Bias", false, Docs::kNone, Padding::kNone, false, false, false, false, Elements::kBias},
    {"CausalPaddingBias", true, Docs::kNone, Padding::kRandom, false, true, false, false, Elements::kBias},
    {"Alibi", false, Docs::kNone, Padding::kNone, false, false, false, false, Elements::kNone, true},
    {"CausalWindowAlibi", true, Docs::kNone, Padding::kNone, true, false, false, false, Elements::kNone, true},
    {"Sinks", false, Docs::kNone, Padding::kNone, false, false, false, false, Elements::kNone, false, true},
    {"CausalEmptyRowsSinks", true, Docs::kNone, Padding::kEmptyRows, false, false, false, false, Elements::kNone,
     false, true},
    {"AllKinds", true, Docs::kUnsorted, Padding::kEmptyRows, true, true, true, false, Elements::kBoth, true, true},
    {"AllKindsAttendAll", true, Docs::kSorted, Padding::kEmptyRows, true, true, false, true, Elements::kBoth, true,
     true},
};

std::vector<SweepCase> sweep_cases() {
  constexpr Index kQLens[] = {1, 7, 33, 257};
  constexpr Index kHeadDims[] = {64, 80, 128, 256};
  constexpr std::pair<Index, Index> kHeads[] = {{4, 4}, {4, 2}, {4, 1}, {8, 2}};
  constexpr Index kExtraKeys[] = {0, 13, 5};  // Skv = Sq + extra: odd, not tile multiples
  std::vector<SweepCase> cases;
  std::uint32_t seed = 100;
  for (std::size_t si = 0; si < std::size(kQLens); ++si) {
    for (std::size_t vi = 0; vi < std::size(kVariants); ++vi) {
      const Variant& var = kVariants[vi];
      SweepCase c;
      c.label = var.label;
      c.q_len = kQLens[si];
      c.kv_len = c.q_len + kExtraKeys[(vi + si) % 3];
      const bool largest = c.q_len == 257;
      // At Sq = 257, D = 256 (the costliest for the brute force) appears only where causal
      // + window keep the work small, and H = 4 only; smaller Sq rotate through every D and H.
      const bool cheap_at_257 = var.causal && var.window && !var.attend_all;
      c.head_dim = largest ? (cheap_at_257 ? 256 : kHeadDims[vi % 3]) : kHeadDims[(vi + si) % 4];
      const auto heads = kHeads[largest ? vi % 3 : (3 * vi + si) % 4];
      c.n_heads = heads.first;
      c.n_kv_heads = heads.second;
      // Two batch rows where cheap; the non-causal empty-row case needs a fully padded row.
      c.batch = (c.q_len <= 33 || (var.padding == Padding::kEmptyRows && !var.causal)) ? 2 : 1;
      c.causal = var.causal;
      c.docs = var.docs;
      c.padding = var.padding;
      c.window = var.window ? (((c.kv_len + 2) / 3) | 1) : 0;
      c.softcap = var.softcap ? 1.5 : 0.0;
      if (var.scale) c.scale = 0.35;  // 3-6x the default: a sharp softmax
      c.attend_all = var.attend_all;
      c.elements = var.elements;
      c.alibi = var.alibi;
      c.sinks = var.sinks;
      c.seed = seed++;
      cases.push_back(c);
    }
  }
  return cases;
}

// Decode steps (one or two queries, at most 2 query rows per KV head, so the default path
// takes the decode kernel for float and double) against KV lengths beyond 1024, where a
// decode kernel splits the keys into chunks and merges them. Every variant once.
std::vector<SweepCase> long_kv_decode_cases() {
  constexpr Index kKvLens[] = {1025, 2500, 3073};
  constexpr Index kHeadDims[] = {64, 80, 128, 256};
  constexpr std::pair<Index, Index> kHeads[] = {{4, 2}, {2, 2}, {4, 4}};
  std::vector<SweepCase> cases;
  std::uint32_t seed = 500;
  for (std::size_t vi = 0; vi < std::size(kVariants); ++vi) {
    const Variant& var = kVariants[vi];
    SweepCase c;
    c.label = std::string("Decode") + var.label;
    c.batch = 2;
    c.q_len = vi % 2 == 0 ? 1 : 2;
    c.head_dim = kHeadDims[vi % 4];
    c.kv_len = c.head_dim == 256 ? kKvLens[0] : kKvLens[vi % 3];  // keep the largest D shortest
    const auto heads = c.q_len == 2 ? kHeads[1] : kHeads[(vi / 2) % 3];
    c.n_heads = heads.first;
    c.n_kv_heads = heads.second;
    c.causal = var.causal;
    c.docs = var.docs;
    c.padding = var.padding;
    c.window = var.window ? 151 : 0;  // far shorter than Skv: most key chunks are out of reach
    c.softcap = var.softcap ? 1.5 : 0.0;
    if (var.scale) c.scale = 0.35;
    c.attend_all = var.attend_all;
    c.elements = var.elements;
    c.alibi = var.alibi;
    c.sinks = var.sinks;
    c.seed = seed++;
    cases.push_back(c);
  }
  return cases;
}

// Thread invariance on a subset: every variant at Sq = 1, at Sq = 33 and with long KV
// decode; the combined ones at 257.
std::vector<SweepCase> thread_cases() {
  std::vector<SweepCase> cases;
  for (const SweepCase& c : sweep_cases()) {
    if (c.q_len == 1 || c.q_len == 33 || (c.q_len == 7 && c.label == "Plain") ||
        (c.q_len == 257 && (c.label == "AllOptions" || c.label == "CausalDocsSorted"))) {
      cases.push_back(c);
    }
  }
  for (const SweepCase& c : long_kv_decode_cases()) cases.push_back(c);
  return cases;
}

struct SweepInputs {
  Tensor<float, 4> q, k, v;
  DenseMasks masks;
  DenseOptions options;
};

Tensor<DocId, 2> random_ids(Index batch, Index len, DocId n_ids, std::mt19937& gen) {
  Tensor<DocId, 2> ids(batch, len);
  for (Index i = 0; i < ids.size(); ++i) ids.data()[i] = static_cast<DocId>(gen() % n_ids);
  return ids;
}

// attn_mask / attn_bias of the case, each with a broadcast batch or head dimension in
// some cases. The mask is blocky (whole 8 x 16 blocks closed, others random) so that
// the fused kernel meets empty, full and partial tiles; the bias has -inf entries.
void add_element_masks(const SweepCase& c, std::mt19937& gen, DenseMasks& masks) {
  const Index mask_batch = c.seed % 2 == 0 ? c.batch : 1, mask_heads = c.seed % 3 == 0 ? 1 : c.n_heads;
  if (c.elements == Elements::kBool || c.elements == Elements::kBoth) {
    Tensor<bool, 4> mask(mask_batch, mask_heads, c.q_len, c.kv_len);
    const std::uint32_t closed = gen();
    for (Index b = 0; b < mask_batch; ++b) {
      for (Index h = 0; h < mask_heads; ++h) {
        for (Index i = 0; i < c.q_len; ++i) {
          for (Index j = 0; j < c.kv_len; ++j) {
            const bool block_open = ((i / 8) * 7 + (j / 16) * 3 + h + closed) % 4 != 0;
            mask(b, h, i, j) = block_open && ((i + j) % 5 != 0 || (i / 8 + j / 16) % 2 == 0);
          }
        }
      }
    }
    masks.attn_mask = mask;
  }
  if (c.elements == Elements::kBias || c.elements == Elements::kBoth) {
    Tensor<float, 4> bias = test::random_normal<float, 4>({mask_batch, mask_heads, c.q_len, c.kv_len}, c.seed + 4000);
    for (Index n = 0; n < bias.size(); ++n) {
      if (gen() % 10 == 0) bias.data()[n] = -std::numeric_limits<float>::infinity();
    }
    masks.attn_bias = bias;
  }
}

SweepInputs make_inputs(const SweepCase& c) {
  SweepInputs in;
  in.q = test::random_normal<float, 4>({c.batch, c.n_heads, c.q_len, c.head_dim}, c.seed);
  // Keys uniform with unit variance (cheaper to draw for long KV than normal values): with
  // normal queries the scaled scores still have unit variance.
  in.k = test::random_uniform<float, 4>({c.batch, c.n_kv_heads, c.kv_len, c.head_dim},
                                        c.seed + 1000, -std::sqrt(3.0), std::sqrt(3.0));
  in.v =
      test::random_uniform<float, 4>({c.batch, c.n_kv_heads, c.kv_len, c.head_dim}, c.seed + 2000);
  std::mt19937 gen(c.seed + 3000);
  in.masks.causal = c.causal;
  in.masks.window = c.window;
  const Index offset = c.kv_len - c.q_len;
  if (c.docs == Docs::kSorted) {
    const Tensor<DocId, 2> kv_ids =
        test::packed_doc_ids(c.batch, c.kv_len, std::max<Index>(2, c.kv_len / 3), gen);
    if (offset == 0) {
      in.masks.q_docs = kv_ids;  // one tensor for queries and keys, as without a cache
    } else {
      Tensor<DocId, 2> q_ids(c.batch, c.q_len);  // the ids at the queries' positions
      for (Index b = 0; b < c.batch; ++b) {
        for (Index i = 0; i < c.q_len; ++i) q_ids(b, i) = kv_ids(b, offset + i);
      }
      in.masks.q_docs = q_ids;
      in.masks.kv_docs = kv_ids;
    }
  } else if (c.docs == Docs::kUnsorted) {
    if (offset == 0) {
      in.masks.q_docs = random_ids(c.batch, c.q_len, 3, gen);
    } else {
      // Query id 3 has no key: those rows are empty.
      in.masks.q_docs = random_ids(c.batch, c.q_len, 4, gen);
      in.masks.kv_docs = random_ids(c.batch, c.kv_len, 3, gen);
    }
  }
  if (c.padding != Padding::kNone) {
    Tensor<bool, 2> pad(c.batch, c.kv_len);
    // Empty rows: with causal and more than two queries, padding the keys up to the middle
    // query's position empties the first half of the rows; otherwise the last batch row is
    // padded entirely (left padding would empty every row of a decode step).
    const bool empty_rows = c.padding == Padding::kEmptyRows;
    const bool use_prefix = empty_rows && c.causal && c.q_len > 2;
    const Index prefix = use_prefix ? offset + c.q_len / 2 + 1 : 0;
    for (Index b = 0; b < c.batch; ++b) {
      const bool all_padded = empty_rows && !use_prefix && b == c.batch - 1;
      for (Index j = 0; j < c.kv_len; ++j) pad(b, j) = !all_padded && j >= prefix && gen() % 4 != 0;
    }
    in.masks.key_padding = pad;
  }
  add_element_masks(c, gen, in.masks);
  in.options.scale = c.scale;
  in.options.softcap = c.softcap;
  in.options.attend_all_when_empty = c.attend_all;
  for (Index h = 0; h < c.n_heads && c.alibi; ++h) {
    in.options.alibi_slopes.push_back(std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(c.n_heads)));
  }
  for (Index h = 0; h < c.n_heads && c.sinks; ++h) in.options.sinks.push_back(static_cast<double>(h) - 1.0);
  return in;
}

class SdpaSweep : public ::testing::TestWithParam<SweepCase> {};

TEST_P(SdpaSweep, MatchesDenseDoubleReference) {
  const SweepCase& c = GetParam();
  const SweepInputs in = make_inputs(c);
  const Tensor<double, 4> qd = test::to_double(in.q), kd = test::to_double(in.k),
                          vd = test::to_double(in.v);
  const DenseResult ref = test::dense_sdpa(qd, kd, vd, in.masks, in.options);
  if (c.padding == Padding::kEmptyRows) {
    ASSERT_GT(ref.empty_rows, 0) << "the case must exercise rows with no allowed key";
  }
  const Masks masks = test::library_masks(in.masks);

  for (SdpaPath path : c.paths()) {
    SCOPED_TRACE(path_name(path));
    const SdpaOptions options = test::library_options(in.masks, in.options, path);
    const auto r = scaled_dot_product_attention_with_lse(in.q, in.k, in.v, options, masks);
    EXPECT_LT(test::error_relative_to_scale(r.out, ref.out), kFloatTol);
    EXPECT_LT(test::lse_error(r.lse, ref.lse), kFloatTol);
    EXPECT_FALSE(test::has_nan(r.out));
    if (!c.attend_all) expect_empty_rows_exact(r.out, r.lse, ref);

    // Out alone through the default path (the reference computes the same either way).
    if (path == SdpaPath::kAuto) {
      const Tensor<float, 4> out = scaled_dot_product_attention(in.q, in.k, in.v, options, masks);
      EXPECT_LT(test::error_relative_to_scale(out, ref.out), kFloatTol);
    }

    // Double tensors; at Sq = 257 (ASan time) through the default path only.
    if (path == SdpaPath::kAuto || c.q_len <= 33) {
      const auto rd = scaled_dot_product_attention_with_lse(qd, kd, vd, options, masks);
      EXPECT_LT(test::error_relative_to_scale(rd.out, ref.out), kDoubleTol);
      EXPECT_LT(test::lse_error(rd.lse, ref.lse), kDoubleTol);
      if (!c.attend_all) expect_empty_rows_exact(rd.out, rd.lse, ref);
    }
  }

  // Probabilities (always the reference path): float rounding of values <= 1.
  const Tensor<float, 4> probs =
      attention_weights(in.q, in.k, test::library_options(in.masks, in.options), masks);
  EXPECT_LT(test::max_abs_diff(probs, ref.probs), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Cases, SdpaSweep, ::testing::ValuesIn(sweep_cases()),
                         [](const ::testing::TestParamInfo<SweepCase>& info) {
                           return info.param.name();
                         });

INSTANTIATE_TEST_SUITE_P(LongKvDecode, SdpaSweep, ::testing::ValuesIn(long_kv_decode_cases()),
                         [](const ::testing::TestParamInfo<SweepCase>& info) {
                           return info.param.name();
                         });

class SdpaThreads : public ::testing::TestWithParam<SweepCase> {};

TEST_P(SdpaThreads, ResultsAreBitIdenticalForOneTwoAndThreeThreads) {
  const SweepCase& c = GetParam();
  const SweepInputs in = make_inputs(c);
  const Masks masks = test::library_masks(in.masks);
  for (SdpaPath path : c.paths()) {
    // The reference computes each (b, h) alone by construction; at Sq = 257 only the fast
    // kernels, whose work partition is where thread-count dependence could creep in.
    if (path == SdpaPath::kReference && c.q_len > 33) continue;
    SCOPED_TRACE(path_name(path));
    const SdpaOptions options = test::library_options(in.masks, in.options, path);
    const auto serial = scaled_dot_product_attention_with_lse(in.q, in.k, in.v, options, masks);
    for (int n_threads : {1, 2, 3}) {
      SCOPED_TRACE(n_threads);
      const auto pooled = scaled_dot_product_attention_with_lse(in.q, in.k, in.v, options, masks,
                                                                &test::pool_device(n_threads));
      EXPECT_TRUE(test::bitwise_equal(pooled.out, serial.out));
      EXPECT_TRUE(test::bitwise_equal(pooled.lse, serial.lse));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SdpaThreads, ::testing::ValuesIn(thread_cases()),
                         [](const ::testing::TestParamInfo<SweepCase>& info) {
                           return info.param.name();
                         });

// Shapes outside the sweep: head_dim not a multiple of any SIMD width (SDPA itself needs
// no even D), query groups of 3, 5, 17, 20, 33 heads per KV head (more than one SIMD tile
// of lanes), a single decode query, and empty problems.
TEST(SdpaShapes, UnusualGroupSizesAndHeadDimsMatchTheBruteForce) {
  struct Shape {
    Index b, h, hkv, sq, skv, d;
  };
  const Shape shapes[] = {{2, 4, 2, 5, 9, 1},   {1, 3, 1, 17, 20, 17}, {1, 40, 2, 9, 13, 8},
                          {1, 33, 1, 6, 6, 33}, {2, 5, 1, 1, 30, 64},  {1, 10, 2, 3, 41, 24}};
  std::uint32_t seed = 60;
  for (const Shape& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "H " << s.h << " Hkv " << s.hkv << " D " << s.d);
    const Tensor<float, 4> q = test::random_normal<float, 4>({s.b, s.h, s.sq, s.d}, seed++);
    const Tensor<float, 4> k = test::random_normal<float, 4>({s.b, s.hkv, s.skv, s.d}, seed++);
    const Tensor<float, 4> v = test::random_normal<float, 4>({s.b, s.hkv, s.skv, s.d}, seed++);
    DenseMasks m;
    m.causal = true;
    const DenseResult ref =
        test::dense_sdpa(test::to_double(q), test::to_double(k), test::to_double(v), m);
    for (SdpaPath path : kAllPaths) {
      SCOPED_TRACE(path_name(path));
      const SdpaOptions options = test::library_options(m, {}, path);
      const auto r = scaled_dot_product_attention_with_lse(q, k, v, options);
      EXPECT_LT(test::error_relative_to_scale(r.out, ref.out), kFloatTol);
      EXPECT_LT(test::lse_error(r.lse, ref.lse), kFloatTol);
      const auto pooled =
          scaled_dot_product_attention_with_lse(q, k, v, options, {}, &test::pool_device(3));
      EXPECT_TRUE(test::bitwise_equal(pooled.out, r.out));
    }
  }
}

TEST(SdpaShapes, EmptyBatchOrQueryGiveEmptyResults) {
  for (const auto& [b, sq] : {std::pair<Index, Index>{0, 3}, std::pair<Index, Index>{2, 0}}) {
    const Tensor<float, 4> q(b, 4, sq, 8);
    const Tensor<float, 4> kv = test::random_normal<float, 4>({b, 2, 5, 8}, 70);
    for (SdpaPath path : kAllPaths) {
      SCOPED_TRACE(path_name(path));
      const auto r = scaled_dot_product_attention_with_lse(q, kv, kv, with_path({}, path));
      EXPECT_EQ(r.out.size(), 0);
      EXPECT_EQ(r.lse.size(), 0);
    }
  }
}

// detail::sdpa_reference directly: out, lse and probs are each optional and computed alone.
TEST(SdpaReference, ComputesEachRequestedOutputAloneAndLeavesAbsentOnesUnwritten) {
  const Tensor<double, 4> q = test::random_normal<double, 4>({2, 4, 6, 16}, 71);
  const Tensor<double, 4> k = test::random_normal<double, 4>({2, 2, 9, 16}, 72);
  const Tensor<double, 4> v = test::random_normal<double, 4>({2, 2, 9, 16}, 73);
  DenseMasks m;
  m.causal = true;
  m.window = 5;
  const DenseResult ref = test::dense_sdpa(q, k, v, m);
  detail::SdpaParams params;
  params.scale = 0.25;  // 1 / sqrt(16)
  params.rules = detail::MaskRules{true, 5};
  const ConstView<double, 4> qv(q), kv(k), vv(v);
  const detail::MaskPolicy policy(params.rules, Masks{}, 2, 4, 6, 9);
  using Outputs = detail::ReferenceOutputs<double, double>;

  Tensor<double, 4> out(2, 4, 6, 16);
  detail::sdpa_reference(qv, kv, vv, Outputs{StridedView<double, 4>(out), {}, {}}, params, policy, nullptr);
  EXPECT_LT(test::error_relative_to_scale(out, ref.out), kDoubleTol);

  Tensor<double, 3> lse(2, 4, 6);
  detail::sdpa_reference(qv, kv, vv, Outputs{{}, StridedView<double, 3>(lse), {}}, params, policy, nullptr);
  EXPECT_LT(test::lse_error(lse, ref.lse), kDoubleTol);

  Tensor<double, 4> probs(2, 4, 6, 9);
  detail::sdpa_reference(qv, kv, vv, Outputs{{}, {}, StridedView<double, 4>(probs)}, params, policy, nullptr);
  EXPECT_LT(test::max_abs_diff(probs, ref.probs), kDoubleTol);
}

// ---------------------------------------------------------------------------------------
// Input forms: Tensor, TensorMap over caller memory, strided views.

class SdpaInputForms : public ::testing::Test {
 protected:
  static constexpr Index kB = 2, kH = 6, kKvH = 2, kSq = 9, kSkv = 21, kD = 40;

  void SetUp() override {
    q_ = test::random_normal<float, 4>({kB, kH, kSq, kD}, 20);
    k_ = test::random_normal<float, 4>({kB, kKvH, kSkv, kD}, 21);
    v_ = test::random_normal<float, 4>({kB, kKvH, kSkv, kD}, 22);
    options_.causal = true;
    ref_ = test::dense_sdpa(test::to_double(q_), test::to_double(k_), test::to_double(v_),
                            causal_masks());
  }

  static DenseMasks causal_masks() {
    DenseMasks m;
    m.causal = true;
    return m;
  }

  // Same values as the Tensor inputs, whatever form they came in.
  template <typename Q, typename K, typename V>
  void expect_matches(const Q& q, const K& k, const V& v) {
    for (SdpaPath path : kAllPaths) {
      SCOPED_TRACE(path_name(path));
      const Tensor<float, 4> out = scaled_dot_product_attention(q, k, v, with_path(options_, path));
      EXPECT_LT(test::error_relative_to_scale(out, ref_.out), kFloatTol);
      if (path == SdpaPath::kReference) {
        // The reference reads the same numbers in the same order: identical bits.
        EXPECT_TRUE(test::bitwise_equal(
            out, scaled_dot_product_attention(q_, k_, v_, with_path(options_, path))));
      }
    }
  }

  Tensor<float, 4> q_, k_, v_;
  SdpaOptions options_;
  DenseResult ref_;
};

TEST_F(SdpaInputForms, TensorMapsOverCallerMemory) {
  std::vector<float> q_mem(q_.data(), q_.data() + q_.size());
  std::vector<float> k_mem(k_.data(), k_.data() + k_.size());
  std::vector<float> v_mem(v_.data(), v_.data() + v_.size());
  const TensorMap<float, 4> q(q_mem.data(), kB, kH, kSq, kD);
  const ConstTensorMap<float, 4> k(k_mem.data(), kB, kKvH, kSkv, kD);
  const ConstTensorMap<float, 4> v(v_mem.data(), kB, kKvH, kSkv, kD);
  expect_matches(q, k, v);
}

TEST_F(SdpaInputForms, KVCachePrefixViews) {
  KVCache<float> cache(kB, kSkv + 10, kKvH, kD);  // larger than the prefix: strided views
  const ConstView<float, 4> k(k_), v(v_);
  cache.update(k.narrow(2, 0, 12), v.narrow(2, 0, 12));
  const KVPrefix<float> prefix =
      cache.update(k.narrow(2, 12, kSkv - 12), v.narrow(2, 12, kSkv - 12));
  ASSERT_FALSE(prefix.keys.is_contiguous());
  expect_matches(q_, prefix.keys, prefix.values);
}

TEST_F(SdpaInputForms, TransposedBSHDBuffers) {
  // (B, S, H, D) buffers, as projections produce them, seen as (B, H, S, D).
  Tensor<float, 4> q_bshd(kB, kSq, kH, kD), k_bshd(kB, kSkv, kKvH, kD), v_bshd(kB, kSkv, kKvH, kD);
  StridedView<float, 4> q = StridedView<float, 4>(q_bshd).transpose(1, 2);
  StridedView<float, 4> k = StridedView<float, 4>(k_bshd).transpose(1, 2);
  StridedView<float, 4> v = StridedView<float, 4>(v_bshd).transpose(1, 2);
  for (Index b = 0; b < kB; ++b) {
    for (Index h = 0; h < kH; ++h) {
      for (Index s = 0; s < kSq; ++s) {
        for (Index d = 0; d < kD; ++d) q(b, h, s, d) = q_(b, h, s, d);
      }
    }
    for (Index h = 0; h < kKvH; ++h) {
      for (Index s = 0; s < kSkv; ++s) {
        for (Index d = 0; d < kD; ++d) {
          k(b, h, s, d) = k_(b, h, s, d);
          v(b, h, s, d) = v_(b, h, s, d);
        }
      }
    }
  }
  expect_matches(q, k, v);
}

TEST_F(SdpaInputForms, OutputIntoAStridedCallerBuffer) {
  Tensor<float, 4> out_bshd(kB, kSq, kH, kD);
  const StridedView<float, 4> out = StridedView<float, 4>(out_bshd).transpose(1, 2);
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    out_bshd.setConstant(std::nanf(""));
    ScaledDotProductAttention<float> sdpa(with_path(options_, path));
    sdpa(q_, k_, v_, out);
    EXPECT_LT(test::error_relative_to_scale(out.to_tensor(), ref_.out), kFloatTol);
  }
}

// Document ids as int32 and padding masks as uint8_t (what PyTorch engines often hold)
// are read in place and give exactly the int64 / bool result, on every path, also with
// int32 query ids against int64 key ids (a recording cache stores int64).
TEST(SdpaMaskTypes, Int32IdsAndUint8MasksGiveTheInt64AndBoolResultBitForBit) {
  constexpr Index kB = 2, kH = 4, kKvH = 2, kSq = 7, kSkv = 150, kD = 16;
  const Tensor<float, 4> q = test::random_normal<float, 4>({kB, kH, kSq, kD}, 30);
  const Tensor<float, 4> k = test::random_normal<float, 4>({kB, kKvH, kSkv, kD}, 31);
  const Tensor<float, 4> v = test::random_normal<float, 4>({kB, kKvH, kSkv, kD}, 32);
  Tensor<DocId, 2> q_ids64(kB, kSq), kv_ids64(kB, kSkv);
  Tensor<std::int32_t, 2> q_ids32(kB, kSq), kv_ids32(kB, kSkv);
  Tensor<bool, 2> pad_bool(kB, kSkv);
  Tensor<std::uint8_t, 2> pad_u8(kB, kSkv);
  for (Index b = 0; b < kB; ++b) {
    for (Index j = 0; j < kSkv; ++j) {
      kv_ids64(b, j) = kv_ids32(b, j) = static_cast<std::int32_t>(j / 40 + b);
      pad_bool(b, j) = (j * 7 + b) % 5 != 0;
      pad_u8(b, j) = pad_bool(b, j) ? static_cast<std::uint8_t>(1 + j % 200) : 0;  // any nonzero
    }
    for (Index i = 0; i < kSq; ++i) q_ids64(b, i) = q_ids32(b, i) = kv_ids32(b, kSkv - kSq + i);
  }
  DenseMasks dense;
  dense.causal = true;
  dense.q_docs = q_ids64;
  dense.kv_docs = kv_ids64;
  dense.key_padding = pad_bool;
  const DenseResult ref = test::dense_sdpa(test::to_double(q), test::to_double(k), test::to_double(v), dense);
  Masks wide;
  wide.doc_ids = q_ids64;
  wide.kv_doc_ids = kv_ids64;
  wide.key_padding_mask = pad_bool;
  Masks narrow;
  narrow.doc_ids = q_ids32;
  narrow.kv_doc_ids = kv_ids32;
  narrow.key_padding_mask = pad_u8;
  Masks mixed = narrow;
  mixed.kv_doc_ids = kv_ids64;  // int32 queries against int64 keys
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const SdpaOptions options = with_path(test::library_options(dense, {}), path);
    const Tensor<float, 4> expected = scaled_dot_product_attention(q, k, v, options, wide);
    EXPECT_LT(test::error_relative_to_scale(expected, ref.out), kFloatTol);
    EXPECT_TRUE(test::bitwise_equal(scaled_dot_product_attention(q, k, v, options, narrow), expected));
    EXPECT_TRUE(test::bitwise_equal(scaled_dot_product_attention(q, k, v, options, mixed), expected));
  }
  // Validation reads the shapes of either type.
  const Tensor<std::int32_t, 2> short_ids(kB, kSq - 1);
  Masks bad = narrow;
  bad.doc_ids = short_ids;
  expect_invalid([&] { scaled_dot_product_attention(q, k, v, test::library_options(dense, {}), bad); },
                 {"doc_ids has shape (2, 6)", "(B, Sq) = (2, 7)"});
}

TEST(SdpaClass, ReusedInstanceGivesTheSameResultsAsFreshOnesAcrossShapes) {
  // The instance keeps scratch between calls; shrinking and growing must not leak state.
  struct Shape {
    Index b, h, hkv, sq, skv, d;
  };
  const Shape shapes[] = {
      {2, 4, 2, 33, 40, 64}, {1, 2, 1, 1, 7, 16}, {1, 8, 2, 17, 17, 128}, {2, 4, 2, 33, 40, 64}};
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    SdpaOptions options;
    options.causal = true;
    options.path = path;
    ScaledDotProductAttention<float> reused(options);
    std::uint32_t seed = 30;
    for (const Shape& s : shapes) {
      const Tensor<float, 4> q = test::random_normal<float, 4>({s.b, s.h, s.sq, s.d}, seed++);
      const Tensor<float, 4> k = test::random_normal<float, 4>({s.b, s.hkv, s.skv, s.d}, seed++);
      const Tensor<float, 4> v = test::random_normal<float, 4>({s.b, s.hkv, s.skv, s.d}, seed++);
      const Tensor<float, 4> fresh = scaled_dot_product_attention(q, k, v, options);
      EXPECT_TRUE(test::bitwise_equal(reused(q, k, v), fresh));
    }
  }
}

TEST(SdpaClass, KeyTileSizeChangesResultsOnlyWithinRounding) {
  // Tiles of 1 key, odd tiles, and one tile larger than Skv, with every mask kind active.
  const Tensor<float, 4> q = test::random_normal<float, 4>({2, 4, 29, 48}, 35);
  const Tensor<float, 4> k = test::random_normal<float, 4>({2, 2, 45, 48}, 36);
  const Tensor<float, 4> v = test::random_uniform<float, 4>({2, 2, 45, 48}, 37);
  DenseMasks m;
  m.causal = true;
  m.window = 21;
  std::mt19937 gen(38);
  Tensor<DocId, 2> kv_ids(2, 45);
  Tensor<DocId, 2> q_ids(2, 29);
  Tensor<bool, 2> pad(2, 45);
  for (Index b = 0; b < 2; ++b) {
    for (Index j = 0; j < 45; ++j) {
      kv_ids(b, j) = j / 10;  // packed documents of 10 tokens
      pad(b, j) = gen() % 5 != 0;
    }
    for (Index i = 0; i < 29; ++i) q_ids(b, i) = kv_ids(b, 16 + i);
  }
  m.q_docs = q_ids;
  m.kv_docs = kv_ids;
  m.key_padding = pad;
  const DenseResult ref =
      test::dense_sdpa(test::to_double(q), test::to_double(k), test::to_double(v), m);
  for (Index key_tile : {1, 3, 7, 16, 64, 1000}) {
    SCOPED_TRACE(key_tile);
    ScaledDotProductAttention<float> sdpa(test::library_options(m, {}, SdpaPath::kFused));
    sdpa.set_key_tile(key_tile);
    Tensor<float, 4> out(q.dimensions());
    Tensor<float, 3> lse(2, 4, 29);
    sdpa(q, k, v, out, test::library_masks(m), lse);
    EXPECT_LT(test::error_relative_to_scale(out, ref.out), kFloatTol);
    EXPECT_LT(test::lse_error(lse, ref.lse), kFloatTol);
  }
}

// ---------------------------------------------------------------------------------------
// Validation: std::invalid_argument naming the argument and showing the shapes.

TEST(SdpaValidation, MismatchedBatchIsRejectedWithBothShapes) {
  const Tensor<float, 4> q(2, 4, 5, 8), k(3, 2, 5, 8), v(3, 2, 5, 8), v_bad(1, 2, 5, 8);
  const Tensor<float, 4> k_ok(2, 2, 5, 8);
  expect_invalid(
      [&] { scaled_dot_product_attention(q, k, v); },
      {"scaled_dot_product_attention: ", "k has batch size 3", "(2, 4, 5, 8)", "(3, 2, 5, 8)"});
  expect_invalid([&] { scaled_dot_product_attention(q, k_ok, v_bad); },
                 {"v has batch size 1", "(2, 4, 5, 8)", "(1, 2, 5, 8)"});
}

TEST(SdpaValidation, MismatchedHeadDimIsRejectedWithBothShapes) {
  const Tensor<float, 4> q(1, 4, 5, 8), k(1, 2, 5, 6), v(1, 2, 5, 6);
  expect_invalid([&] { scaled_dot_product_attention(q, k, v); },
                 {"k has head_dim 6", "(1, 4, 5, 8)", "(1, 2, 5, 6)"});
}

TEST(SdpaValidation, KvHeadsThatDoNotDivideQueryHeadsAreRejected) {
  const Tensor<float, 4> q(1, 32, 3, 8), k(1, 6, 3, 8), v(1, 6, 3, 8);
  expect_invalid([&] { scaled_dot_product_attention(q, k, v); },
                 {"scaled_dot_product_attention: k has 6 heads, which does not divide q's 32 heads",
                  "(1, 32, 3, 8)", "(1, 6, 3, 8)"});
  const Tensor<float, 4> q2(1, 2, 3, 8), k4(1, 4, 3, 8);  // more kv heads than query heads
  expect_invalid([&] { scaled_dot_product_attention(q2, k4, k4); },
                 {"k has 4 heads, which does not divide q's 2 heads"});
  expect_invalid([&] { attention_weights(q, k); },
                 {"attention_weights: k has 6 heads, which does not divide q's 32 heads"});
}

TEST(SdpaValidation, KeyAndValueShapesMustAgree) {
  const Tensor<float, 4> q(1, 4, 3, 8), k(1, 2, 5, 8), v_len(1, 2, 6, 8), v_heads(1, 1, 5, 8);
  expect_invalid([&] { scaled_dot_product_attention(q, k, v_len); },
                 {"k has shape (1, 2, 5, 8) but v has shape (1, 2, 6, 8)"});
  expect_invalid([&] { scaled_dot_product_attention(q, k, v_heads); },
                 {"k has shape (1, 2, 5, 8) but v has shape (1, 1, 5, 8)"});
}

TEST(SdpaValidation, NonFiniteScaleIsRejected) {
  const Tensor<float, 4> q(1, 1, 2, 4), kv(1, 1, 2, 4);
  for (double bad : {std::nan(""), test::kInf, -test::kInf}) {
    SdpaOptions options;
    options.scale = bad;
    expect_invalid([&] { scaled_dot_product_attention(q, kv, kv, options); }, {"scale"});
  }
}

TEST(SdpaValidation, NegativeOrNonFiniteSoftcapIsRejected) {
  const Tensor<float, 4> q(1, 1, 2, 4), kv(1, 1, 2, 4);
  for (double bad : {-1.0, std::nan(""), test::kInf}) {
    SdpaOptions options;
    options.softcap = bad;
    expect_invalid([&] { scaled_dot_product_attention(q, kv, kv, options); }, {"softcap"});
  }
}

TEST(SdpaValidation, NegativeWindowIsRejected) {
  const Tensor<float, 4> q(1, 1, 2, 4), kv(1, 1, 2, 4);
  SdpaOptions options;
  options.window = -1;
  expect_invalid([&] { scaled_dot_product_attention(q, kv, kv, options); }, {"window", "-1"});
}

TEST(SdpaValidation, NonContiguousLastDimensionIsRejected) {
  Tensor<float, 4> q(1, 1, 4, 4), kv(1, 1, 4, 4);
  const ConstView<float, 4> q_t = ConstView<float, 4>(q).transpose(2, 3);
  expect_invalid([&] { scaled_dot_product_attention(q_t, kv, kv); },
                 {"q", "contiguous last dimension"});
}

TEST(SdpaValidation, OutAndLseOfWrongShapeAreRejectedBeforeAnythingIsWritten) {
  const Tensor<float, 4> q = test::random_normal<float, 4>({1, 2, 3, 8}, 40);
  const Tensor<float, 4> kv = test::random_normal<float, 4>({1, 1, 5, 8}, 41);
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    ScaledDotProductAttention<float> sdpa(with_path({}, path));
    Tensor<float, 4> bad_out(1, 2, 3, 7);
    expect_invalid(
        [&] { sdpa(q, kv, kv, bad_out); },
        {"scaled_dot_product_attention: ", "out has shape (1, 2, 3, 7)", "(1, 2, 3, 8)"});
    Tensor<float, 4> out(1, 2, 3, 8);
    out.setConstant(7.0f);
    Tensor<float, 3> bad_lse(1, 3, 2);
    expect_invalid([&] { sdpa(q, kv, kv, out, {}, bad_lse); },
                   {"lse has shape (1, 3, 2)", "(B, H, Sq)", "(1, 2, 3)"});
    EXPECT_EQ(test::max_abs_diff(out, Tensor<float, 4>(out.constant(7.0f))), 0.0);
  }
}

}  // namespace
}  // namespace attnforge
