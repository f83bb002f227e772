// Numerical robustness of scaled_dot_product_attention on every SdpaPath, for float and
// double: logits of magnitude 1e4 (the online softmax must not overflow or underflow to
// 0/0), all-equal scores, a single allowed key, rows with no allowed key, Skv = 1,
// hostile option values, and NaN/Inf inputs (what happens is documented in README.md,
// "NaN and Inf inputs"; that nothing reads out of bounds is what the ASan run of these
// tests shows).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "accuracy_budget.hpp"
#include "attnforge/attnforge.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

using test::DenseMasks;
using test::DenseOptions;
using test::DenseResult;
using test::kAllPaths;
using test::path_name;

// Shapes that put the work on different kernels and tile boundaries: a prefill over
// several key tiles (kAuto: fused kernel), a decode step over two split-KV chunks of the
// decode kernel (kAuto: decode), and a small odd one (head_dim 5, 3 query heads per KV
// head).
struct ProblemShape {
  Index batch, n_heads, n_kv_heads, q_len, kv_len, head_dim;
};
constexpr ProblemShape kShapes[] = {
    {2, 4, 2, 37, 150, 8}, {1, 4, 1, 1, 1500, 8}, {1, 3, 1, 6, 9, 5}};

template <typename T>
struct Qkv {
  Tensor<T, 4> q, k, v;
};

// q, k, v with q[., 0] = sign * 100 and q[., d > 0] = 0, k[., 0] = k0[j] and v nonzero:
// with scale 1 every score is exactly sign * 100 * k0[j] in any precision (the other
// products are exact zeros), so logits of magnitude 1e4 are built exactly.
template <typename T>
Qkv<T> exact_logits(const ProblemShape& s, double sign, const std::vector<double>& k0,
                    std::uint32_t seed) {
  Qkv<T> x;
  x.q = Tensor<T, 4>(s.batch, s.n_heads, s.q_len, s.head_dim);
  x.q.setZero();
  for (Index b = 0; b < s.batch; ++b) {
    for (Index h = 0; h < s.n_heads; ++h) {
      for (Index i = 0; i < s.q_len; ++i) x.q(b, h, i, 0) = static_cast<T>(sign * 100.0);
    }
  }
  x.k = test::random_uniform<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, seed);
  for (Index b = 0; b < s.batch; ++b) {
    for (Index g = 0; g < s.n_kv_heads; ++g) {
      for (Index j = 0; j < s.kv_len; ++j) x.k(b, g, j, 0) = static_cast<T>(k0[j]);
    }
  }
  // Values in +-[0.5, 1.5]: no zeros, so "exactly v" cannot pass by accident.
  x.v =
      test::random_uniform<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, seed + 1, 0.5, 1.5);
  for (Index i = 0; i < x.v.size(); i += 3) x.v.data()[i] = -x.v.data()[i];
  return x;
}

template <typename T>
SdpaOptions options_for(SdpaPath path, double scale = 1.0) {
  SdpaOptions o;
  o.scale = scale;
  o.path = path;
  return o;
}

// The stated budget (accuracy_budget.hpp) of this problem on this path.
template <typename T>
test::AccuracyBudget budget_of(SdpaPath path, const Qkv<T>& x, const DenseMasks& masks,
                               const DenseOptions& options, const DenseResult& exact) {
  return test::sdpa_budget<T>(path, test::budget_inputs(x.q, x.k, masks, options, exact));
}

// Every query row (b, h, i) of `out` equals value row expected_key(b, h, i) of v, bit for bit.
template <typename T, typename F>
void expect_rows_are_values(const Tensor<T, 4>& out, const Tensor<T, 4>& v, F&& expected_key) {
  const Index n_rep = out.dimension(1) / v.dimension(1);
  for (Index b = 0; b < out.dimension(0); ++b) {
    for (Index h = 0; h < out.dimension(1); ++h) {
      for (Index i = 0; i < out.dimension(2); ++i) {
        const Index j = expected_key(b, h, i);
        ASSERT_EQ(std::memcmp(&out(b, h, i, 0), &v(b, h / n_rep, j, 0),
                              sizeof(T) * static_cast<std::size_t>(out.dimension(3))),
                  0)
            << "row " << b << "," << h << "," << i << " is not value row " << j
            << " bit for bit (first element " << out(b, h, i, 0) << " vs " << v(b, h / n_rep, j, 0)
            << ")";
      }
    }
  }
}

template <typename T>
class Robustness : public ::testing::Test {};
using ElementTypes = ::testing::Types<float, double>;
struct ElementTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};
TYPED_TEST_SUITE(Robustness, ElementTypes, ElementTypeNames);

// ---------------------------------------------------------------------------------------
// Logits of magnitude 1e4.

// One key scores 1e4 (or -1e4), every other 200 lower: its weight is 1 and the others'
// are e^-200 (0 in float, negligible next to 1 in double), so the output is that key's
// value row exactly. A softmax that exponentiated the raw logits would give inf/inf or
// 0/0; the online softmax must give v, bit for bit, including across key tiles (the
// winner sits in a later tile than the first maximum, forcing a rescale) and across the
// decode kernel's split-KV chunks.
TYPED_TEST(Robustness, LogitsOfMagnitude1e4WithOneKeyAheadGiveItsValueExactly) {
  using T = TypeParam;
  for (const ProblemShape& s : kShapes) {
    for (double sign : {1.0, -1.0}) {
      const Index winner = s.kv_len * 7 / 8;
      std::vector<double> k0(static_cast<std::size_t>(s.kv_len), 100.0 - 2.0 * sign);
      k0[static_cast<std::size_t>(winner)] = 100.0;
      const Qkv<T> x = exact_logits<T>(s, sign, k0, 11);
      for (SdpaPath path : kAllPaths) {
        SCOPED_TRACE(::testing::Message()
                     << path_name(path) << " Skv " << s.kv_len << " sign " << sign);
        const auto r = scaled_dot_product_attention_with_lse(x.q, x.k, x.v, options_for<T>(path));
        expect_rows_are_values(r.out, x.v, [&](Index, Index, Index) { return winner; });
        // lse = the winner's score, up to the roundings of a score of 1e4.
        const double tol = test::sdpa_budget<T>(path, {s.head_dim, s.kv_len, 1e4, 0.0, 1e4}).lse;
        for (Index i = 0; i < r.lse.size(); ++i) {
          ASSERT_NEAR(r.lse.data()[i], sign * 1e4, tol);
        }
      }
    }
  }
}

// Every score exactly 1e4 (or -1e4): the weights are all equal, the output is the mean
// of the allowed values, lse = s + log(N). With masks (causal, padding) N varies by row.
TYPED_TEST(Robustness, AllEqualLogitsOfMagnitude1e4AverageTheAllowedValues) {
  using T = TypeParam;
  for (const ProblemShape& s : kShapes) {
    for (double sign : {1.0, -1.0}) {
      const std::vector<double> k0(static_cast<std::size_t>(s.kv_len), 100.0);
      const Qkv<T> x = exact_logits<T>(s, sign, k0, 12);
      DenseMasks m;
      m.causal = true;
      Tensor<bool, 2> pad(s.batch, s.kv_len);
      for (Index j = 0; j < pad.size(); ++j) pad.data()[j] = j % 5 != 1;
      m.key_padding = pad;
      DenseOptions o;
      o.scale = 1.0;
      const DenseResult exact =
          test::dense_sdpa(test::to_double(x.q), test::to_double(x.k), test::to_double(x.v), m, o);
      for (SdpaPath path : kAllPaths) {
        SCOPED_TRACE(::testing::Message()
                     << path_name(path) << " Skv " << s.kv_len << " sign " << sign);
        const auto r = scaled_dot_product_attention_with_lse(
            x.q, x.k, x.v, test::library_options(m, o, path), test::library_masks(m));
        const test::AccuracyBudget budget = budget_of(path, x, m, o, exact);
        EXPECT_FALSE(test::has_nan(r.out));
        EXPECT_LE(test::max_abs_diff(r.out, exact.out) / test::max_abs(x.v), budget.out);
        EXPECT_LE(test::max_abs_diff(r.lse, exact.lse), budget.lse);
      }
    }
  }
}

// Scores spread over [1e4 - 30, 1e4]: a genuine softmax at large magnitude, within the
// stated budget (whose score term grows with the magnitude, see accuracy_budget.hpp).
TYPED_TEST(Robustness, LogitsNear1e4WithAGenuineSpreadStayWithinTheBudget) {
  using T = TypeParam;
  for (const ProblemShape& s : kShapes) {
    std::vector<double> k0(static_cast<std::size_t>(s.kv_len));
    for (std::size_t j = 0; j < k0.size(); ++j)
      k0[j] = 100.0 - 0.3 * static_cast<double>(j % 11) / 10.0;
    const Qkv<T> x = exact_logits<T>(s, 1.0, k0, 13);
    DenseMasks m;
    m.causal = s.q_len <= s.kv_len;
    DenseOptions o;
    o.scale = 1.0;
    const DenseResult exact =
        test::dense_sdpa(test::to_double(x.q), test::to_double(x.k), test::to_double(x.v), m, o);
    for (SdpaPath path : kAllPaths) {
      SCOPED_TRACE(::testing::Message() << path_name(path) << " Skv " << s.kv_len);
      const auto r =
          scaled_dot_product_attention_with_lse(x.q, x.k, x.v, test::library_options(m, o, path));
      const test::AccuracyBudget budget = budget_of(path, x, m, o, exact);
      EXPECT_LE(test::max_abs_diff(r.out, exact.out) / test::max_abs(x.v), budget.out);
      EXPECT_LE(test::max_abs_diff(r.lse, exact.lse), budget.lse);
    }
  }
}

// ---------------------------------------------------------------------------------------
// A single allowed key: its weight is exp(0) = 1 exactly and every other weight exactly
// 0, so every path must return that key's value row bit for bit, whatever the logits.

template <typename T>
void expect_single_key(const ProblemShape& s, const DenseMasks& m, double softcap,
                       const std::function<Index(Index, Index, Index)>& key_of) {
  Qkv<T> x;
  // Large random logits (scale 3 on unit normals, D = 8: scores of tens).
  x.q = test::random_normal<T, 4>({s.batch, s.n_heads, s.q_len, s.head_dim}, 21);
  x.k = test::random_normal<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 22);
  x.v = test::random_uniform<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 23, 0.5, 1.5);
  DenseOptions o;
  o.scale = 3.0;
  o.softcap = softcap;
  const DenseResult exact =
      test::dense_sdpa(test::to_double(x.q), test::to_double(x.k), test::to_double(x.v), m, o);
  for (SdpaPath path : kAllPaths) {
    SCOPED_TRACE(path_name(path));
    const auto r = scaled_dot_product_attention_with_lse(
        x.q, x.k, x.v, test::library_options(m, o, path), test::library_masks(m));
    expect_rows_are_values(r.out, x.v, key_of);
    EXPECT_LE(test::max_abs_diff(r.lse, exact.lse), budget_of(path, x, m, o, exact).lse);
  }
}

TYPED_TEST(Robustness, SkvOfOneGivesTheOnlyValueRowExactly) {
  for (double softcap : {0.0, 5.0}) {
    SCOPED_TRACE(softcap);
    DenseMasks none;
    expect_single_key<TypeParam>({2, 4, 2, 5, 1, 8}, none, softcap,
                                 [](Index, Index, Index) { return Index(0); });
    DenseMasks causal;
    causal.causal = true;
    expect_single_key<TypeParam>({2, 6, 3, 1, 1, 8}, causal, softcap,
                                 [](Index, Index, Index) { return Index(0); });
  }
}

TYPED_TEST(Robustness, CausalWindowOfOneGivesEachRowItsOwnValueExactly) {
  DenseMasks m;
  m.causal = true;
  m.window = 1;
  expect_single_key<TypeParam>({2, 4, 2, 70, 70, 8}, m, 0.0,
                               [](Index, Index, Index i) { return i; });
  // A chunk on top of a cache: query i sits at position Skv - Sq + i.
  expect_single_key<TypeParam>({1, 4, 2, 3, 90, 8}, m, 5.0,
                               [](Index, Index, Index i) { return 87 + i; });
}

TYPED_TEST(Robustness, DistinctDocumentIdsGiveEachRowItsOwnValueExactly) {
  constexpr Index kLen = 70;
  DenseMasks m;
  Tensor<DocId, 2> ids(2, kLen);
  for (Index b = 0; b < 2; ++b) {
    for (Index i = 0; i < kLen; ++i) {
      // Ids at both ends of the int64 range and unsorted in row 1.
      ids(b, i) = b == 0 ? std::numeric_limits<DocId>::min() + i
                         : std::numeric_limits<DocId>::max() - (i * 37) % kLen;
    }
  }
  m.q_docs = ids;
  expect_single_key<TypeParam>({2, 4, 2, kLen, kLen, 8}, m, 0.0,
                               [](Index, Index, Index i) { return i; });
}

TYPED_TEST(Robustness, OneUnpaddedKeyGivesItsValueToEveryRowExactly) {
  for (const ProblemShape& s :
       {ProblemShape{2, 4, 2, 20, 130, 8}, ProblemShape{1, 4, 1, 1, 1500, 8}}) {
    const Index kept = s.kv_len - 40;
    DenseMasks m;
    Tensor<bool, 2> pad(s.batch, s.kv_len);
    pad.setConstant(false);
    for (Index b = 0; b < s.batch; ++b) pad(b, kept) = true;
    m.key_padding = pad;
    expect_single_key<TypeParam>(s, m, 0.0, [&](Index, Index, Index) { return kept; });
  }
}

// ---------------------------------------------------------------------------------------
// Rows with no allowed key: exactly 0 and lse = -inf by default, never NaN, next to rows
// of 1e4 logits; under kAttendAll they attend to every key. Batch row 1 is all padding,
// and in row 0 the queries of document 9 find no key of their document.
TYPED_TEST(Robustness, RowsWithNoAllowedKeyAreZeroWithMinusInfLseNextToHugeLogits) {
  using T = TypeParam;
  for (const ProblemShape& base :
       {ProblemShape{2, 4, 2, 37, 150, 8}, ProblemShape{2, 4, 1, 1, 1500, 8}}) {
    const ProblemShape s = base;
    std::vector<double> k0(static_cast<std::size_t>(s.kv_len));
    for (std::size_t j = 0; j < k0.size(); ++j) k0[j] = 100.0 - 0.1 * static_cast<double>(j % 7);
    const Qkv<T> x = exact_logits<T>(s, 1.0, k0, 31);
    DenseMasks m;
    Tensor<bool, 2> pad(s.batch, s.kv_len);
    for (Index j = 0; j < s.kv_len; ++j) {
      pad(0, j) = j % 3 != 0;
      pad(1, j) = false;
    }
    m.key_padding = pad;
    Tensor<DocId, 2> q_ids(s.batch, s.q_len), kv_ids(s.batch, s.kv_len);
    for (Index i = 0; i < s.q_len; ++i) {
      q_ids(0, i) = i % 4 == 0 ? 9 : 1;
      q_ids(1, i) = 1;
    }
    kv_ids.setConstant(1);
    m.q_docs = q_ids;
    m.kv_docs = kv_ids;
    for (bool attend_all : {false, true}) {
      DenseOptions o;
      o.scale = 1.0;
      o.attend_all_when_empty = attend_all;
      const DenseResult exact =
          test::dense_sdpa(test::to_double(x.q), test::to_double(x.k), test::to_double(x.v), m, o);
      ASSERT_GT(exact.empty_rows, 0);
      for (SdpaPath path : kAllPaths) {
        SCOPED_TRACE(::testing::Message() << path_name(path) << " Skv " << s.kv_len
                                          << (attend_all ? " kAttendAll" : " kZeros"));
        const auto r = scaled_dot_product_attention_with_lse(
            x.q, x.k, x.v, test::library_options(m, o, path), test::library_masks(m));
        EXPECT_FALSE(test::has_nan(r.out));
        EXPECT_FALSE(test::has_nan(r.lse));
        const test::AccuracyBudget budget = budget_of(path, x, m, o, exact);
        EXPECT_LE(test::max_abs_diff(r.out, exact.out) / test::max_abs(x.v), budget.out);
        // -inf must match -inf exactly (max_abs_diff skips equal infinities and counts
        // -inf against a finite value as an infinite error).
        EXPECT_LE(test::max_abs_diff(r.lse, exact.lse), budget.lse);
        if (attend_all) continue;
        for (Index i = 0; i < exact.lse.size(); ++i) {
          if (exact.lse.data()[i] != -test::kInf) continue;
          for (Index d = 0; d < s.head_dim; ++d) {
            ASSERT_EQ(r.out.data()[i * s.head_dim + d], T(0));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Hostile option values.

// A window of INT64_MAX (or any window >= Skv) excludes nothing: the result is the
// unwindowed one bit for bit, with no signed overflow in the mask arithmetic (the UBSan
// run checks that), including for Sq > Skv without causal (negative positions).
TYPED_TEST(Robustness, HugeWindowEqualsNoWindowWithoutOverflow) {
  using T = TypeParam;
  for (const ProblemShape& s :
       {ProblemShape{2, 4, 2, 37, 150, 8}, ProblemShape{1, 4, 1, 1, 1500, 8},
        ProblemShape{1, 2, 1, 40, 9, 8}}) {
    const Tensor<T, 4> q = test::random_normal<T, 4>({s.batch, s.n_heads, s.q_len, s.head_dim}, 41);
    const Tensor<T, 4> k =
        test::random_normal<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 42);
    const Tensor<T, 4> v =
        test::random_normal<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 43);
    for (bool causal : {false, true}) {
      if (causal && s.q_len > s.kv_len) continue;
      for (Index window : {std::numeric_limits<Index>::max(), s.kv_len}) {
        for (SdpaPath path : kAllPaths) {
          SCOPED_TRACE(::testing::Message()
                       << path_name(path) << " causal " << causal << " window " << window);
          SdpaOptions o;
          o.causal = causal;
          o.path = path;
          const auto plain = scaled_dot_product_attention_with_lse(q, k, v, o);
          o.window = window;
          const auto windowed = scaled_dot_product_attention_with_lse(q, k, v, o);
          EXPECT_TRUE(test::bitwise_equal(windowed.out, plain.out));
          EXPECT_TRUE(test::bitwise_equal(windowed.lse, plain.lse));
        }
      }
    }
  }
}

TEST(RobustnessAttention, HugeWindowThroughAttentionEqualsNoWindow) {
  Attention<float> attn(32, 4, 2);
  attn.reset_parameters(44);
  const RotaryEmbedding<float> rope(8, 64);
  const Tensor<float, 3> x = test::random_uniform<float, 3>({2, 9, 32}, 45);
  KVCache<float> cache(2, 16, 2, 8);
  const Tensor<float, 3> plain = attn.forward(x, rope, 0);
  SdpaOptions o;
  o.causal = true;
  o.window = std::numeric_limits<Index>::max();
  attn.set_sdpa_options(o);
  EXPECT_TRUE(test::bitwise_equal(attn.forward(x, rope, 0), plain));
  EXPECT_TRUE(test::bitwise_equal(attn.forward(x, rope, 0, &cache), plain));
}

// ---------------------------------------------------------------------------------------
// NaN and Inf inputs (README.md, "NaN and Inf inputs").

template <typename T>
struct Clean {
  Tensor<T, 4> q, k, v;
  DenseMasks masks;
};

// Causal prefill over two query tiles and three key tiles, and a decode step.
template <typename T>
Clean<T> clean_inputs(const ProblemShape& s) {
  Clean<T> c;
  c.q = test::random_normal<T, 4>({s.batch, s.n_heads, s.q_len, s.head_dim}, 51);
  c.k = test::random_normal<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 52);
  c.v = test::random_normal<T, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 53);
  c.masks.causal = true;
  return c;
}

constexpr ProblemShape kNonFiniteShapes[] = {{1, 4, 2, 37, 150, 8}, {1, 4, 1, 1, 1500, 8}};

template <typename T>
std::vector<T> non_finite_values() {
  return {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
          -std::numeric_limits<T>::infinity()};
}

// True when every element of row (b, h, i) is NaN.
template <typename T>
bool row_is_nan(const Tensor<T, 4>& out, Index b, Index h, Index i) {
  for (Index d = 0; d < out.dimension(3); ++d) {
    if (!std::isnan(out(b, h, i, d))) return false;
  }
  return true;
}

template <typename T>
bool row_equal(const Tensor<T, 4>& a, const Tensor<T, 4>& b, Index bb, Index h, Index i) {
  return std::memcmp(&a(bb, h, i, 0), &b(bb, h, i, 0),
                     sizeof(T) * static_cast<std::size_t>(a.dimension(3))) == 0;
}

// A non-finite query row poisons that row only: its output is NaN on every path, and
// every other row is bit for bit what it is without the poison.
TYPED_TEST(Robustness, NonFiniteQueryMakesOnlyItsOwnRowNaN) {
  using T = TypeParam;
  for (const ProblemShape& s : kNonFiniteShapes) {
    Clean<T> c = clean_inputs<T>(s);
    const Index h0 = 1, i0 = s.q_len - 1;
    for (T bad : non_finite_values<T>()) {
      for (SdpaPath path : kAllPaths) {
        SCOPED_TRACE(::testing::Message()
                     << path_name(path) << " Skv " << s.kv_len << " q = " << bad);
        const SdpaOptions o = test::library_options(c.masks, {}, path);
        const auto clean = scaled_dot_product_attention_with_lse(c.q, c.k, c.v, o);
        Tensor<T, 4> q = c.q;
        q(0, h0, i0, 2) = bad;
        const auto r = scaled_dot_product_attention_with_lse(q, c.k, c.v, o);
        for (Index h = 0; h < s.n_heads; ++h) {
          for (Index i = 0; i < s.q_len; ++i) {
            if (h == h0 && i == i0) {
              EXPECT_TRUE(row_is_nan(r.out, 0, h, i));
              // NaN, not -inf: an lse of -inf would let a merge of partial results
              // (split-KV, ring attention) drop the row's NaN as an empty part.
              EXPECT_TRUE(std::isnan(r.lse(0, h, i)));
            } else {
              ASSERT_TRUE(row_equal(r.out, clean.out, 0, h, i)) << h << "," << i;
              ASSERT_EQ(r.lse(0, h, i), clean.lse(0, h, i)) << h << "," << i;
            }
          }
        }
      }
    }
  }
}

// A NaN key poisons exactly the rows that may attend to it (their score against it is
// NaN); rows the mask keeps from it are bit for bit unchanged. (An infinite key gives
// scores of +-inf or NaN: +inf and NaN poison the row the same way, -inf drops the key.)
TYPED_TEST(Robustness, NaNKeyAffectsOnlyTheRowsThatMaySeeIt) {
  using T = TypeParam;
  for (const ProblemShape& s : kNonFiniteShapes) {
    const Clean<T> c = clean_inputs<T>(s);
    const Index j0 = s.kv_len - 20;  // seen by the last 20 positions only (causal)
    for (SdpaPath path : kAllPaths) {
      SCOPED_TRACE(::testing::Message() << path_name(path) << " Skv " << s.kv_len);
      const SdpaOptions o = test::library_options(c.masks, {}, path);
      const auto clean = scaled_dot_product_attention_with_lse(c.q, c.k, c.v, o);
      Tensor<T, 4> k = c.k;
      k(0, 0, j0, 3) = std::numeric_limits<T>::quiet_NaN();
      const auto r = scaled_dot_product_attention_with_lse(c.q, k, c.v, o);
      const Index n_rep = s.n_heads / s.n_kv_heads;
      for (Index h = 0; h < s.n_heads; ++h) {
        for (Index i = 0; i < s.q_len; ++i) {
          const bool sees = h / n_rep == 0 && s.kv_len - s.q_len + i >= j0;
          if (sees) {
            EXPECT_TRUE(row_is_nan(r.out, 0, h, i)) << h << "," << i;
            EXPECT_TRUE(std::isnan(r.lse(0, h, i))) << h << "," << i;
          } else {
            ASSERT_TRUE(row_equal(r.out, clean.out, 0, h, i)) << h << "," << i;
          }
        }
      }
    }
  }
}

// A NaN or infinite value row reaches every row that attends to its key: those outputs
// are not finite, on every path. (On the fused and decode kernels it can also reach rows
// of the same tile that the mask keeps from it, through 0 * NaN: README.md.)
TYPED_TEST(Robustness, NonFiniteValueMakesTheRowsThatSeeItNonFinite) {
  using T = TypeParam;
  for (const ProblemShape& s : kNonFiniteShapes) {
    const Clean<T> c = clean_inputs<T>(s);
    const Index j0 = s.kv_len - 20;
    for (T bad : non_finite_values<T>()) {
      for (SdpaPath path : kAllPaths) {
        SCOPED_TRACE(::testing::Message()
                     << path_name(path) << " Skv " << s.kv_len << " v = " << bad);
        Tensor<T, 4> v = c.v;
        for (Index d = 0; d < s.head_dim; ++d) v(0, 0, j0, d) = bad;
        const auto r = scaled_dot_product_attention_with_lse(
            c.q, c.k, v, test::library_options(c.masks, {}, path));
        const Index n_rep = s.n_heads / s.n_kv_heads;
        for (Index h = 0; h < n_rep; ++h) {
          for (Index i = 0; i < s.q_len; ++i) {
            if (s.kv_len - s.q_len + i < j0) continue;
            for (Index d = 0; d < s.head_dim; ++d) {
              ASSERT_FALSE(std::isfinite(r.out(0, h, i, d))) << h << "," << i << "," << d;
            }
          }
        }
      }
    }
  }
}

// Keys and values behind the mask are never read into a result by the reference path,
// whatever they hold; keys behind the mask (their scores are overwritten by -inf before
// the softmax) are ignored by every path. Padded positions of a batch commonly hold
// garbage.
TYPED_TEST(Robustness, NonFiniteInputsBehindTheMaskAreIgnoredWhereStated) {
  using T = TypeParam;
  for (const ProblemShape& s : kNonFiniteShapes) {
    const Clean<T> c = clean_inputs<T>(s);
    DenseMasks m = c.masks;
    Tensor<bool, 2> pad(s.batch, s.kv_len);
    for (Index j = 0; j < s.kv_len; ++j) pad(0, j) = j % 4 != 3;
    m.key_padding = pad;
    for (T bad : non_finite_values<T>()) {
      Tensor<T, 4> k = c.k, v = c.v;
      for (Index g = 0; g < s.n_kv_heads; ++g) {
        for (Index j = 3; j < s.kv_len; j += 4) {
          for (Index d = 0; d < s.head_dim; ++d) {
            k(0, g, j, d) = bad;
            v(0, g, j, d) = bad;
          }
        }
      }
      for (SdpaPath path : kAllPaths) {
        SCOPED_TRACE(::testing::Message() << path_name(path) << " Skv " << s.kv_len << " " << bad);
        const SdpaOptions o = test::library_options(m, {}, path);
        const Masks masks = test::library_masks(m);
        const auto clean = scaled_dot_product_attention_with_lse(c.q, c.k, c.v, o, masks);
        const auto bad_keys = scaled_dot_product_attention_with_lse(c.q, k, c.v, o, masks);
        EXPECT_TRUE(test::bitwise_equal(bad_keys.out, clean.out));
        EXPECT_TRUE(test::bitwise_equal(bad_keys.lse, clean.lse));
        if (path == SdpaPath::kReference) {
          const auto bad_both = scaled_dot_product_attention_with_lse(c.q, k, v, o, masks);
          EXPECT_TRUE(test::bitwise_equal(bad_both.out, clean.out));
        }
      }
    }
  }
}

// Non-finite values sprinkled anywhere, with every mask and option combination, through
// every entry point: each call returns (no exception, no hang) with results of the right
// shape, and a cache takes the step's keys and values as usual. Out-of-bounds reads would
// show in the ASan run.
TEST(RobustnessNonFinite, SprinkledNaNAndInfNeverThrowOrHang) {
  const ProblemShape s{2, 4, 2, 21, 70, 8};
  Tensor<float, 4> q = test::random_normal<float, 4>({s.batch, s.n_heads, s.q_len, s.head_dim}, 61);
  Tensor<float, 4> k =
      test::random_normal<float, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 62);
  Tensor<float, 4> v =
      test::random_normal<float, 4>({s.batch, s.n_kv_heads, s.kv_len, s.head_dim}, 63);
  const float specials[] = {std::nanf(""), INFINITY, -INFINITY, 3e38f, -3e38f, 1e-45f};
  std::mt19937 gen(64);
  for (Tensor<float, 4>* t : {&q, &k, &v}) {
    for (int n = 0; n < 12; ++n) t->data()[gen() % t->size()] = specials[gen() % 6];
  }
  Tensor<bool, 2> pad(s.batch, s.kv_len);
  for (Index i = 0; i < pad.size(); ++i) pad.data()[i] = gen() % 5 != 0;
  Tensor<DocId, 2> q_ids(s.batch, s.q_len), kv_ids(s.batch, s.kv_len);
  for (Index i = 0; i < q_ids.size(); ++i) q_ids.data()[i] = gen() % 3;
  for (Index i = 0; i < kv_ids.size(); ++i) kv_ids.data()[i] = gen() % 3;
  Masks masks;
  masks.doc_ids = q_ids;
  masks.kv_doc_ids = kv_ids;
  masks.key_padding_mask = pad;
  for (SdpaPath path : kAllPaths) {
    for (double softcap : {0.0, 30.0}) {
      for (EmptyRowPolicy policy : {EmptyRowPolicy::kZeros, EmptyRowPolicy::kAttendAll}) {
        SdpaOptions o;
        o.causal = true;
        o.window = 17;
        o.softcap = softcap;
        o.empty_rows = policy;
        o.path = path;
        const auto r = scaled_dot_product_attention_with_lse(q, k, v, o, masks);
        EXPECT_EQ(r.out.dimensions(), q.dimensions());
        EXPECT_EQ(r.lse.dimension(2), s.q_len);
        Sdpa<float> sdpa(o, &test::pool_device(2));
        EXPECT_EQ(sdpa(q, k, v, masks).dimensions(), q.dimensions());
      }
    }
  }
  Attention<float> attn(32, 4, 2);
  attn.reset_parameters(65);
  const RotaryEmbedding<float> rope(8, 64);
  KVCache<float> cache(2, 64, 2, 8);
  Tensor<float, 3> x = test::random_normal<float, 3>({2, 9, 32}, 66);
  x(0, 3, 5) = std::nanf("");
  x(1, 8, 0) = INFINITY;
  EXPECT_EQ(attn.forward(x, rope, 0, &cache).dimensions(), x.dimensions());
  EXPECT_EQ(cache.seq_len(), 9);
  EXPECT_EQ(attn.forward(x, rope, 9, &cache).dimensions(), x.dimensions());
  EXPECT_EQ(cache.seq_len(), 18);
}

}  // namespace
}  // namespace attnforge
