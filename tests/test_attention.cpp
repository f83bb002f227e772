// Tests of attention.hpp: construction, parameter layout, forward against an independent
// double computation (projections, QK-norm, RoPE, causal GQA SDPA, output projection),
// incremental decoding with a KVCache, serving over a PagedKVCache (ragged batches, mixed
// prefill and decode, forks), caller-owned weights and inputs, thread-count invariance,
// and validation that leaves the cache untouched.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attnforge/attention.hpp"
#include "attnforge/paged_kv_cache.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

using test::expect_invalid;

// Forward in float vs the double computation, relative to the output's scale: float
// projections over <= 64 inputs, float RoPE tables (2^-24) and float attention each add
// errors of a few 1e-7; 1e-5 leaves a margin while any wrong step is off by > 1e-2.
constexpr double kForwardTol = 1e-5;

// ---- Compile time: x must be rank 3, the tables rank 2. ----
template <typename X, typename C, typename = void>
struct ForwardInvocable : std::false_type {};
template <typename X, typename C>
struct ForwardInvocable<
    X, C,
    std::void_t<decltype(std::declval<Attention<float>&>().forward(
        std::declval<const X&>(), std::declval<const C&>(), std::declval<const C&>()))>>
    : std::true_type {};
static_assert(ForwardInvocable<Tensor<float, 3>, Tensor<float, 2>>::value);
static_assert(ForwardInvocable<TensorMap<float, 3>, ConstView<float, 2>>::value);
static_assert(!ForwardInvocable<Tensor<float, 4>, Tensor<float, 2>>::value,
              "x must be (B, S, dim)");
static_assert(!ForwardInvocable<Tensor<float, 3>, Tensor<float, 3>>::value, "tables are (S, D/2)");
static_assert(!ForwardInvocable<Tensor<double, 3>, Tensor<double, 2>>::value, "element type");

// ---------------------------------------------------------------------------------------
// The independent double computation of docs/design.md's forward.

struct DoubleWeights {
  Tensor<double, 2> wq, wk, wv, wo;
  Tensor<double, 1> q_norm, k_norm;
};

DoubleWeights weights_of(Attention<float>& attn) {
  return {test::to_double(attn.wq().tensor()),     test::to_double(attn.wk().tensor()),
          test::to_double(attn.wv().tensor()),     test::to_double(attn.wo().tensor()),
          test::to_double(attn.q_norm().tensor()), test::to_double(attn.k_norm().tensor())};
}

struct ReferenceConfig {
  Index n_heads = 1, n_kv_heads = 1, head_dim = 2;
  bool qk_norm = false;
  double norm_eps = 1e-5;
  double theta = 10000.0;
  RopeStyle style = RopeStyle::kHalfSplit;
};

// x (B, S, dim) -> (B, heads, S, D): y = x w^T, then optionally RMSNorm over D and RoPE at
// absolute positions [0, S) with angles formed in double from the formula of docs/design.md.
Tensor<double, 4> project(const Tensor<double, 3>& x, const Tensor<double, 2>& w, Index heads,
                          const ReferenceConfig& cfg, const Tensor<double, 1>* norm, bool rope) {
  const Index batch = x.dimension(0), seq = x.dimension(1), dim = x.dimension(2);
  const Index head_dim = cfg.head_dim, half = head_dim / 2;
  Tensor<double, 4> out(batch, heads, seq, head_dim);
  std::vector<double> row(static_cast<std::size_t>(head_dim));
  for (Index b = 0; b < batch; ++b) {
    for (Index s = 0; s < seq; ++s) {
      for (Index h = 0; h < heads; ++h) {
        for (Index d = 0; d < head_dim; ++d) {
          double acc = 0.0;
          for (Index c = 0; c < dim; ++c) acc += x(b, s, c) * w(h * head_dim + d, c);
          row[static_cast<std::size_t>(d)] = acc;
        }
        if (norm != nullptr) {
          double mean_sq = 0.0;
          for (double y : row) mean_sq += y * y;
          mean_sq /= static_cast<double>(head_dim);
          const double inv_rms = 1.0 / std::sqrt(mean_sq + cfg.norm_eps);
          for (Index d = 0; d < head_dim; ++d)
            row[static_cast<std::size_t>(d)] *= inv_rms * (*norm)(d);
        }
        for (Index d = 0; d < head_dim; ++d) out(b, h, s, d) = row[static_cast<std::size_t>(d)];
        if (!rope) continue;
        for (Index i = 0; i < half; ++i) {
          const double angle =
              static_cast<double>(s) *
              std::pow(cfg.theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
          const Index lo = cfg.style == RopeStyle::kHalfSplit ? i : 2 * i;
          const Index hi = cfg.style == RopeStyle::kHalfSplit ? i + half : 2 * i + 1;
          const double a = row[static_cast<std::size_t>(lo)], c = row[static_cast<std::size_t>(hi)];
          out(b, h, s, lo) = a * std::cos(angle) - c * std::sin(angle);
          out(b, h, s, hi) = c * std::cos(angle) + a * std::sin(angle);
        }
      }
    }
  }
  return out;
}

// The full forward over positions [0, S); masks.causal is forced on, as in the module.
Tensor<double, 3> reference_forward(const Tensor<float, 3>& x_float, const DoubleWeights& w,
                                    const ReferenceConfig& cfg, test::DenseMasks masks = {},
                                    const test::DenseOptions& options = {}) {
  const Tensor<double, 3> x = test::to_double(x_float);
  const Tensor<double, 4> q =
      project(x, w.wq, cfg.n_heads, cfg, cfg.qk_norm ? &w.q_norm : nullptr, true);
  const Tensor<double, 4> k =
      project(x, w.wk, cfg.n_kv_heads, cfg, cfg.qk_norm ? &w.k_norm : nullptr, true);
  const Tensor<double, 4> v = project(x, w.wv, cfg.n_kv_heads, cfg, nullptr, false);
  masks.causal = true;
  const test::DenseResult attn = test::dense_sdpa(q, k, v, masks, options);
  const Index batch = x.dimension(0), seq = x.dimension(1), dim = x.dimension(2);
  Tensor<double, 3> out(batch, seq, dim);
  for (Index b = 0; b < batch; ++b) {
    for (Index s = 0; s < seq; ++s) {
      for (Index c = 0; c < dim; ++c) {
        double acc = 0.0;
        for (Index h = 0; h < cfg.n_heads; ++h) {
          for (Index d = 0; d < cfg.head_dim; ++d) {
            acc += attn.out(b, h, s, d) * w.wo(c, h * cfg.head_dim + d);
          }
        }
        out(b, s, c) = acc;
      }
    }
  }
  return out;
}

ReferenceConfig config_of(const Attention<float>& attn) {
  ReferenceConfig cfg;
  cfg.n_heads = attn.n_heads();
  cfg.n_kv_heads = attn.n_kv_heads();
  cfg.head_dim = attn.head_dim();
  cfg.qk_norm = attn.qk_norm();
  cfg.norm_eps = attn.norm_eps();
  cfg.style = attn.rope_style();
  return cfg;
}

// Non-trivial QK-norm weights, so a module that ignored them would fail.
void randomize_norms(Attention<float>& attn, std::uint32_t seed) {
  attn.q_norm() = test::random_uniform<float, 1>({attn.head_dim()}, seed, 0.5, 1.5);
  attn.k_norm() = test::random_uniform<float, 1>({attn.head_dim()}, seed + 1, 0.5, 1.5);
}

// Packed documents of lengths 4, 5, rest in batch row 0; 3, rest in row 1.
Tensor<DocId, 2> packed_doc_ids(Index batch, Index seq) {
  Tensor<DocId, 2> ids(batch, seq);
  for (Index b = 0; b < batch; ++b) {
    for (Index s = 0; s < seq; ++s)
      ids(b, s) = b == 0 ? (s < 4 ? 0 : s < 9 ? 1 : 2) : (s < 3 ? 5 : 6);
  }
  return ids;
}

// Left padding of 3 tokens in the last batch row, and a hole at position 5 in row 0.
Tensor<bool, 2> padding_mask(Index batch, Index len) {
  Tensor<bool, 2> pad(batch, len);
  pad.setConstant(true);
  for (Index j = 0; j < std::min<Index>(3, len); ++j) pad(batch - 1, j) = false;
  if (len > 5) pad(0, 5) = false;
  return pad;
}

// ---------------------------------------------------------------------------------------
// Construction and parameters.

TEST(AttentionConstruction, WeightsHaveTorchLinearLayoutAndNormsStartAtOne) {
  Attention<float> attn(48, 4, 2, 0, true);
  EXPECT_EQ(attn.head_dim(), 12);  // dim / n_heads by default
  EXPECT_EQ(attn.n_rep(), 2);
  const auto dims = [](const auto& t) {
    std::vector<Index> d;
    for (auto x : t.dimensions()) d.push_back(static_cast<Index>(x));
    return d;
  };
  EXPECT_EQ(dims(attn.wq()), (std::vector<Index>{48, 48}));  // (H * D, dim)
  EXPECT_EQ(dims(attn.wk()), (std::vector<Index>{24, 48}));  // (Hkv * D, dim)
  EXPECT_EQ(dims(attn.wv()), (std::vector<Index>{24, 48}));
  EXPECT_EQ(dims(attn.wo()), (std::vector<Index>{48, 48}));  // (dim, H * D)
  EXPECT_EQ(dims(attn.q_norm()), (std::vector<Index>{12}));
  for (Index d = 0; d < 12; ++d) {
    EXPECT_EQ(attn.q_norm()(d), 1.0f);
    EXPECT_EQ(attn.k_norm()(d), 1.0f);
  }
  // torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)), not all zero.
  EXPECT_LE(test::max_abs(attn.wq()), 1.0 / std::sqrt(48.0));
  EXPECT_GT(test::max_abs(attn.wq()), 0.5 / std::sqrt(48.0));
  EXPECT_LE(test::max_abs(attn.wo()), 1.0 / std::sqrt(48.0));
}

TEST(AttentionConstruction, ExplicitHeadDimSetsProjectionWidths) {
  Attention<float> attn(40, 4, 1, 16);
  EXPECT_EQ(attn.head_dim(), 16);
  EXPECT_EQ(attn.wq().dimension(0), 64);
  EXPECT_EQ(attn.wq().dimension(1), 40);
  EXPECT_EQ(attn.wk().dimension(0), 16);
  EXPECT_EQ(attn.wo().dimension(0), 40);
  EXPECT_EQ(attn.wo().dimension(1), 64);
}

TEST(AttentionConstruction, RejectsHeadCountsThatDoNotDivide) {
  expect_invalid([] { Attention<float>(64, 8, 3); }, {"Attention: ", "n_heads 8", "n_kv_heads 3"});
  expect_invalid([] { Attention<float>(64, 2, 4); }, {"n_heads 2", "n_kv_heads 4"});
}

TEST(AttentionConstruction, RejectsOddHeadDim) {
  expect_invalid([] { Attention<float>(30, 2, 1); }, {"head_dim", "15"});  // 30 / 2
  expect_invalid([] { Attention<float>(32, 2, 1, 7); }, {"head_dim", "7"});
}

TEST(AttentionConstruction, RejectsNonPositiveSizes) {
  expect_invalid([] { Attention<float>(0, 2, 1); }, {"dim 0"});
  expect_invalid([] { Attention<float>(32, 0, 1); }, {"n_heads 0"});
  expect_invalid([] { Attention<float>(32, 2, 0); }, {"n_kv_heads 0"});
  expect_invalid([] { Attention<float>(32, 2, -1); }, {"n_kv_heads -1"});
  expect_invalid([] { Attention<float>(32, 2, 1, -4); }, {"head_dim -4"});
}

TEST(AttentionConstruction, RejectsNonPositiveOrNonFiniteNormEps) {
  for (double eps : {0.0, -1e-5, std::nan(""), test::kInf}) {
    expect_invalid([eps] { Attention<float>(32, 2, 1, 0, true, eps); }, {"norm_eps"});
  }
}

// ---------------------------------------------------------------------------------------
// Forward against the double computation.

struct ForwardCase {
  std::string name;
  Index dim, n_heads, n_kv_heads, head_dim;
  bool qk_norm = false;
  bool docs = false;
  bool padding = false;
  Index window = 0;
  double softcap = 0.0;
  RopeStyle style = RopeStyle::kHalfSplit;
};

void PrintTo(const ForwardCase& c, std::ostream* os) { *os << c.name; }

class AttentionForward : public ::testing::TestWithParam<ForwardCase> {};

TEST_P(AttentionForward, MatchesDoubleComputationOfTheSpec) {
  const ForwardCase& c = GetParam();
  constexpr Index kBatch = 2, kSeq = 13;
  Attention<float> attn(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.qk_norm);
  attn.reset_parameters(7);
  if (c.qk_norm) randomize_norms(attn, 8);
  attn.set_rope_style(c.style);
  SdpaOptions sdpa_options;
  sdpa_options.causal = true;
  sdpa_options.window = c.window;
  sdpa_options.softcap = c.softcap;
  attn.set_sdpa_options(sdpa_options);

  const Tensor<float, 3> x = test::random_uniform<float, 3>({kBatch, kSeq, c.dim}, 9);
  const auto [cos, sin] = precompute_rope_frequencies<float>(attn.head_dim(), kSeq);
  test::DenseMasks masks;
  masks.window = c.window;
  Tensor<DocId, 2> doc_ids;
  Tensor<bool, 2> pad;
  if (c.docs) masks.q_docs = doc_ids = packed_doc_ids(kBatch, kSeq);
  if (c.padding) masks.key_padding = pad = padding_mask(kBatch, kSeq);
  test::DenseOptions options;
  options.softcap = c.softcap;

  const Tensor<double, 3> expected =
      reference_forward(x, weights_of(attn), config_of(attn), masks, options);
  const Tensor<float, 3> out = attn.forward(
      x, cos, sin, nullptr, c.docs ? ConstView<DocId, 2>(doc_ids) : ConstView<DocId, 2>(),
      c.padding ? ConstView<bool, 2>(pad) : ConstView<bool, 2>());
  EXPECT_LT(test::error_relative_to_scale(out, expected), kForwardTol);
  EXPECT_FALSE(test::has_nan(out));

  // int32 ids and a uint8 mask, read in place, give the same bits; so does a prefill into
  // a recording cache, which stores the ids as int64.
  if (c.docs || c.padding) {
    Tensor<std::int32_t, 2> ids32 = doc_ids.cast<std::int32_t>();
    Tensor<std::uint8_t, 2> pad8 = pad.cast<std::uint8_t>();
    const DocIdView ids_arg = c.docs ? DocIdView(ids32) : DocIdView();
    const KeyMaskView pad_arg = c.padding ? KeyMaskView(pad8) : KeyMaskView();
    EXPECT_TRUE(test::bitwise_equal(attn.forward(x, cos, sin, nullptr, ids_arg, pad_arg), out));
    KVCache<float> cache(kBatch, kSeq, attn.n_kv_heads(), attn.head_dim(), c.docs);
    EXPECT_TRUE(test::bitwise_equal(attn.forward(x, cos, sin, &cache, ids_arg, pad_arg), out));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, AttentionForward,
    ::testing::Values(ForwardCase{"MHA", 48, 4, 4, 0}, ForwardCase{"MHA_QkNorm", 48, 4, 4, 0, true},
                      ForwardCase{"GQA", 48, 4, 2, 0}, ForwardCase{"GQA_QkNorm", 48, 4, 2, 0, true},
                      ForwardCase{"MQA", 48, 4, 1, 0}, ForwardCase{"MQA_QkNorm", 48, 4, 1, 0, true},
                      ForwardCase{"GQA_HeadDim16", 40, 4, 2, 16},
                      ForwardCase{"GQA_Docs", 48, 4, 2, 0, false, true},
                      ForwardCase{"GQA_QkNorm_Docs", 48, 4, 2, 0, true, true},
                      ForwardCase{"MHA_Padding", 48, 4, 4, 0, false, false, true},
                      ForwardCase{"MQA_QkNorm_DocsPadding", 48, 4, 1, 0, true, true, true},
                      ForwardCase{"GQA_WindowSoftcap", 48, 4, 2, 0, false, false, false, 4, 2.0},
                      ForwardCase{"GQA_Interleaved", 48, 4, 2, 0, false, false, false, 0, 0.0,
                                  RopeStyle::kInterleaved}),
    [](const ::testing::TestParamInfo<ForwardCase>& info) { return info.param.name; });

// Every mask kind through the module (forward with Masks; ALiBi and sinks as options),
// against the double computation, and the same with a cache: a prefill of 9 tokens and a
// chunk of 4 give the rows of the one-shot forward.
TEST(AttentionMasks, EveryMaskKindMatchesTheDoubleComputationAndCachedChunksEqualOneShot) {
  constexpr Index kBatch = 2, kSeq = 13, kDim = 48, kHeads = 4, kKvHeads = 2, kFirst = 9;
  Attention<float> attn(kDim, kHeads, kKvHeads);
  attn.reset_parameters(61);
  SdpaOptions options;
  options.causal = true;
  options.alibi_slopes = {0.5, 0.25, 0.125, 0.0625};
  options.sinks = {0.5, -1.0, 2.0, 0.0};
  attn.set_sdpa_options(options);
  const Tensor<float, 3> x = test::random_uniform<float, 3>({kBatch, kSeq, kDim}, 62);
  const RotaryEmbedding<float> rope(attn.head_dim(), kSeq);
  Tensor<bool, 4> attn_mask(1, kHeads, kSeq, kSeq);  // broadcast over the batch
  for (Index i = 0; i < attn_mask.size(); ++i) attn_mask.data()[i] = (i * 7) % 5 != 0;
  Tensor<float, 4> attn_bias = test::random_normal<float, 4>({kBatch, 1, kSeq, kSeq}, 63);  // over heads
  for (Index i = 0; i < attn_bias.size(); i += 11) attn_bias.data()[i] = -std::numeric_limits<float>::infinity();
  const Tensor<DocId, 2> docs = packed_doc_ids(kBatch, kSeq);
  const Tensor<bool, 2> pad = padding_mask(kBatch, kSeq);

  test::DenseMasks dense;
  dense.q_docs = docs;
  dense.key_padding = pad;
  dense.attn_mask = attn_mask;
  dense.attn_bias = attn_bias;
  test::DenseOptions dense_options;
  dense_options.alibi_slopes = options.alibi_slopes;
  dense_options.sinks = options.sinks;
  const Tensor<double, 3> expected = reference_forward(x, weights_of(attn), config_of(attn), dense, dense_options);

  Masks masks;
  masks.doc_ids = docs;
  masks.key_padding_mask = pad;
  masks.attn_mask = attn_mask;
  masks.attn_bias = attn_bias;
  const Tensor<float, 3> out = attn.forward(x, rope, 0, nullptr, masks);
  EXPECT_LT(test::error_relative_to_scale(out, expected), kForwardTol);

  // Chunked through a recording cache: each chunk's masks are its rows of the full ones,
  // over the keys cached so far.
  KVCache<float> cache(kBatch, kSeq, kKvHeads, attn.head_dim(), /*record_doc_ids=*/true);
  for (const auto& [first, len] : {std::pair<Index, Index>{0, kFirst}, std::pair<Index, Index>{kFirst, kSeq - kFirst}}) {
    const Index keys = first + len;
    Masks chunk;
    chunk.doc_ids = ConstView<DocId, 2>(docs).narrow(1, first, len);
    chunk.key_padding_mask = ConstView<bool, 2>(pad).narrow(1, 0, keys);
    chunk.attn_mask = ConstView<bool, 4>(attn_mask).narrow(2, first, len).narrow(3, 0, keys);
    chunk.attn_bias = ConstView<float, 4>(attn_bias).narrow(2, first, len).narrow(3, 0, keys);
    const Tensor<float, 3> x_chunk = ConstView<float, 3>(x).narrow(1, first, len).to_tensor();
    const Tensor<float, 3> y = attn.forward(x_chunk, rope, first, &cache, chunk);
    const Tensor<float, 3> one_shot = ConstView<float, 3>(out).narrow(1, first, len).to_tensor();
    EXPECT_LT(test::error_relative_to_scale(y, one_shot), kForwardTol) << "chunk at " << first;
  }
  // kv_doc_ids belong to the cache; per-head options must match H.
  Masks with_kv_ids = masks;
  with_kv_ids.kv_doc_ids = docs;
  test::expect_invalid([&] { attn.forward(x, rope, 0, nullptr, with_kv_ids); }, {"masks.kv_doc_ids", "must be absent"});
  SdpaOptions three_slopes = options;
  three_slopes.alibi_slopes.pop_back();
  test::expect_invalid([&] { attn.set_sdpa_options(three_slopes); },
                       {"Attention::set_sdpa_options: alibi_slopes has 3 values", "(H = 4)"});
}

// ---------------------------------------------------------------------------------------
// Incremental decoding: prefill 13, five single-token steps, then a 4-token chunk.

struct DecodeCase {
  std::string name;
  bool qk_norm;
  bool use_rotary_embedding;  // forward(x, rope, start_pos) instead of table rows
  bool padding;
};

void PrintTo(const DecodeCase& c, std::ostream* os) { *os << c.name; }

class AttentionDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(AttentionDecode, CachedStepsEqualTheFullSequenceForwardAtEveryPosition) {
  const DecodeCase& c = GetParam();
  constexpr Index kBatch = 2, kDim = 64, kHeads = 4, kKvHeads = 2, kHeadDim = 16;
  constexpr Index kPrefill = 13, kSteps = 5, kChunk = 4, kTotal = kPrefill + kSteps + kChunk;
  Attention<float> attn(kDim, kHeads, kKvHeads, kHeadDim, c.qk_norm);
  attn.reset_parameters(11);
  if (c.qk_norm) randomize_norms(attn, 12);
  const RotaryEmbedding<float> rope(kHeadDim, 64);
  const Tensor<float, 3> x = test::random_uniform<float, 3>({kBatch, kTotal, kDim}, 13);
  const Tensor<bool, 2> pad = padding_mask(kBatch, kTotal);
  const ConstView<bool, 2> full_pad = c.padding ? ConstView<bool, 2>(pad) : ConstView<bool, 2>();

  const Tensor<float, 3> full =
      attn.forward(x, rope.cos_rows(0, kTotal), rope.sin_rows(0, kTotal), nullptr, {}, full_pad);
  // The full forward is itself right (so equality below is not equality of two wrong things).
  test::DenseMasks masks;
  if (c.padding) masks.key_padding = pad;
  EXPECT_LT(test::error_relative_to_scale(
                full, reference_forward(x, weights_of(attn), config_of(attn), masks)),
            kForwardTol);

  KVCache<float> cache(kBatch, 32, kKvHeads, kHeadDim);
  const ConstView<float, 3> x_view(x);
  Index pos = 0;
  const auto step = [&](Index len) {
    const ConstView<float, 3> x_step = x_view.narrow(1, pos, len);
    const ConstView<bool, 2> step_pad =
        c.padding ? ConstView<bool, 2>(pad).narrow(1, 0, pos + len) : ConstView<bool, 2>();
    const Tensor<float, 3> out = c.use_rotary_embedding
                                     ? attn.forward(x_step, rope, pos, &cache, {}, step_pad)
                                     : attn.forward(x_step, rope.cos_rows(pos, len),
                                                    rope.sin_rows(pos, len), &cache, {}, step_pad);
    const Tensor<float, 3> expected = ConstView<float, 3>(full).narrow(1, pos, len).to_tensor();
    // Same float computation over the same keys; only the grouping of the work differs.
    EXPECT_LT(test::error_relative_to_scale(out, expected), 1e-5)
        << "positions [" << pos << ", " << pos + len << ")";
    pos += len;
    EXPECT_EQ(cache.seq_len(), pos);
  };
  step(kPrefill);
  for (Index i = 0; i < kSteps; ++i) step(1);
  step(kChunk);  // a chunk on top of the cache: top-left causal would fail here
  EXPECT_EQ(pos, kTotal);
}

INSTANTIATE_TEST_SUITE_P(Cases, AttentionDecode,
                         ::testing::Values(DecodeCase{"TableRows", false, false, false},
                                           DecodeCase{"RotaryEmbedding", false, true, false},
                                           DecodeCase{"QkNorm", true, false, false},
                                           DecodeCase{"LeftPadding", false, true, true}),
                         [](const ::testing::TestParamInfo<DecodeCase>& info) {
                           return info.param.name;
                         });

// ---------------------------------------------------------------------------------------
// Caller-owned memory and threads.

TEST(AttentionCallerMemory, BoundWeightsInCallerMemoryGiveTheSameResultAsCopiedWeights) {
  constexpr Index kDim = 48, kHeads = 4, kKvHeads = 2, kHeadDim = 12, kLd = kDim + 5;
  Attention<float> attn(kDim, kHeads, kKvHeads, 0, true);
  attn.reset_parameters(21);
  randomize_norms(attn, 22);
  const Tensor<float, 3> x = test::random_uniform<float, 3>({2, 9, kDim}, 23);
  const auto [cos, sin] = precompute_rope_frequencies<float>(kHeadDim, 9);
  const Tensor<float, 3> with_own = attn.forward(x, cos, sin);

  // A checkpoint-like buffer: rows padded to a leading dimension of kLd.
  const auto strided_copy = [](const Tensor<float, 2>& w, Index ld, std::vector<float>& mem) {
    mem.assign(static_cast<std::size_t>(w.dimension(0) * ld), std::nanf(""));
    for (Index r = 0; r < w.dimension(0); ++r) {
      for (Index c = 0; c < w.dimension(1); ++c)
        mem[static_cast<std::size_t>(r * ld + c)] = w(r, c);
    }
    return ConstView<float, 2>(mem.data(), {w.dimension(0), w.dimension(1)}, {ld, 1});
  };
  std::vector<float> wq_mem, wk_mem, wv_mem, wo_mem;
  std::vector<float> q_norm_mem(attn.q_norm().data(), attn.q_norm().data() + kHeadDim);
  std::vector<float> k_norm_mem(attn.k_norm().data(), attn.k_norm().data() + kHeadDim);
  AttentionWeights<float> bound;
  bound.wq = strided_copy(attn.wq().tensor(), kLd, wq_mem);
  bound.wk = strided_copy(attn.wk().tensor(), kLd, wk_mem);
  bound.wv = strided_copy(attn.wv().tensor(), kLd, wv_mem);
  bound.wo = strided_copy(attn.wo().tensor(), kHeads * kHeadDim + 3, wo_mem);
  bound.q_norm = ConstTensorMap<float, 1>(q_norm_mem.data(), kHeadDim);
  bound.k_norm = ConstTensorMap<float, 1>(k_norm_mem.data(), kHeadDim);
  attn.bind_weights(bound);
  // The module's own parameters no longer matter while bound.
  attn.wq().setZero();
  attn.q_norm().setZero();
  const Tensor<float, 3> with_bound = attn.forward(x, cos, sin);
  // Same numbers through the same products; only Eigen's handling of the row stride differs.
  EXPECT_LT(test::error_relative_to_scale(with_bound, with_own), 1e-6);
  attn.unbind_weights();
  EXPECT_GT(test::error_relative_to_scale(attn.forward(x, cos, sin), with_own), 0.1);
}

TEST(AttentionCallerMemory, BindWeightsRejectsWrongShapesNamingTheWeight) {
  Attention<float> attn(48, 4, 2);
  const Tensor<float, 2> wq(48, 48), wk(24, 48), wv(24, 48), wo(48, 48), bad(24, 47);
  const Tensor<float, 1> bad_norm(11);
  expect_invalid(
      [&] {
        attn.bind_weights({wq, bad, wv, wo, {}, {}});
      },
      {"Attention::bind_weights: wk has shape (24, 47)", "(24, 48)"});
  expect_invalid([&] { attn.bind_weights({wq, wk, wv, wk, {}, {}}); }, {"wo has shape (24, 48)"});
  expect_invalid(
      [&] {
        attn.bind_weights({wq, wk, wv, wo, bad_norm, {}});
      },
      {"q_norm has shape (11)"});
}

TEST(AttentionCallerMemory, ForwardOnTensorMapsOverCallerBuffersMatchesTensorInput) {
  constexpr Index kDim = 48, kSeq = 10;
  Attention<float> attn(kDim, 4, 2);
  attn.reset_parameters(31);
  const Tensor<float, 3> x = test::random_uniform<float, 3>({2, kSeq, kDim}, 32);
  const auto [cos, sin] = precompute_rope_frequencies<float>(12, kSeq);
  const Tensor<float, 3> expected = attn.forward(x, cos, sin);

  std::vector<float> x_mem(x.data(), x.data() + x.size());
  std::vector<float> cos_mem(cos.data(), cos.data() + cos.size());
  std::vector<float> sin_mem(sin.data(), sin.data() + sin.size());
  std::vector<float> out_mem(static_cast<std::size_t>(x.size()), std::nanf(""));
  const ConstTensorMap<float, 3> x_map(x_mem.data(), 2, kSeq, kDim);
  const ConstTensorMap<float, 2> cos_map(cos_mem.data(), kSeq, 6);
  const ConstTensorMap<float, 2> sin_map(sin_mem.data(), kSeq, 6);
  EXPECT_TRUE(test::bitwise_equal(attn.forward(x_map, cos_map, sin_map), expected));

  const TensorMap<float, 3> out_map(out_mem.data(), 2, kSeq, kDim);
  attn.forward_into(x_map, cos_map, sin_map, out_map);
  EXPECT_TRUE(test::bitwise_equal(Tensor<float, 3>(out_map), expected));
}

TEST(AttentionThreads, ForwardIsBitIdenticalForOneTwoAndThreeThreads) {
  // H * D = 320 output features: more than one chunk of the parallel projections.
  constexpr Index kDim = 320, kSeq = 19;
  Attention<float> attn(kDim, 4, 2, 0, true);
  attn.reset_parameters(41);
  const Tensor<float, 3> x = test::random_uniform<float, 3>({2, kSeq, kDim}, 42);
  const auto [cos, sin] = precompute_rope_frequencies<float>(80, kSeq + 3);
  const Tensor<DocId, 2> docs = packed_doc_ids(2, kSeq);
  const ConstView<float, 2> cos_all(cos), sin_all(sin);

  const auto run = [&](const Eigen::ThreadPoolDevice* device) {
    attn.set_device(device);
    KVCache<float> cache(2, kSeq + 3, 2, 80);
    std::vector<Tensor<float, 3>> outs;
    outs.push_back(
        attn.forward(x, cos_all.narrow(0, 0, kSeq), sin_all.narrow(0, 0, kSeq), nullptr, docs));
    outs.push_back(attn.forward(x, cos_all.narrow(0, 0, kSeq), sin_all.narrow(0, 0, kSeq), &cache));
    const Tensor<float, 3> next = ConstView<float, 3>(x).narrow(1, 0, 1).to_tensor();
    outs.push_back(
        attn.forward(next, cos_all.narrow(0, kSeq, 1), sin_all.narrow(0, kSeq, 1), &cache));
    return outs;
  };
  const std::vector<Tensor<float, 3>> serial = run(nullptr);
  for (int n_threads : {1, 2, 3}) {
    const std::vector<Tensor<float, 3>> pooled = run(&test::pool_device(n_threads));
    for (std::size_t i = 0; i < serial.size(); ++i) {
      EXPECT_TRUE(test::bitwise_equal(pooled[i], serial[i])) << n_threads << " threads, call " << i;
    }
  }
  attn.set_device(nullptr);
}

// ---------------------------------------------------------------------------------------
// Serving: ragged steps over a PagedKVCache. Requests arrive and finish at different
// steps, prefill in chunks while others decode, one is forked; every request's rows must
// equal the double computation of that request alone and the contiguous path run alone.

struct ServingCase {
  const char* name;
  bool qk_norm = false;
  bool docs = false;
  Index window = 0;
  bool bf16 = false;
  Index block_size = 16;
};

void PrintTo(const ServingCase& c, std::ostream* os) { *os << c.name; }

class AttentionServing : public ::testing::TestWithParam<ServingCase> {};

// Documents inside one request: a new document starts at position 10 and 27.
DocId request_doc(Index request, Index pos) { return 100 * request + (pos < 10 ? 0 : pos < 27 ? 1 : 2); }

template <typename CacheT>
void run_serving_case(const ServingCase& c) {
  constexpr Index kDim = 48, kHeads = 4, kKvHeads = 2, kMaxLen = 64;
  Attention<float> attn(kDim, kHeads, kKvHeads, 0, c.qk_norm);
  attn.reset_parameters(91);
  if (c.qk_norm) randomize_norms(attn, 92);
  SdpaOptions options;
  options.causal = true;
  options.window = c.window;
  attn.set_sdpa_options(options);
  const Index head_dim = attn.head_dim();
  const RotaryEmbedding<float> rope(head_dim, kMaxLen);

  // Requests 0..3 and 4; request 3 is a fork of request 2 after its first 20 tokens, so
  // its tokens are request 2's 20 followed by its own 3.
  const Index lengths[] = {40, 9, 23, 23, 30};
  std::vector<Tensor<float, 3>> xs;
  for (Index r = 0; r < 5; ++r)
    xs.push_back(test::random_uniform<float, 3>({1, lengths[r], kDim}, 93 + static_cast<std::uint32_t>(r)));
  for (Index p = 0; p < 20; ++p)
    for (Index d = 0; d < kDim; ++d) xs[3](0, p, d) = xs[2](0, p, d);
  const auto doc_of = [&](Index r, Index pos) { return request_doc(r == 3 ? 2 : r, pos); };

  PagedKVCache<CacheT> cache(16, c.block_size, kKvHeads, head_dim, c.docs);
  std::vector<SeqId> ids(5, -1);
  std::vector<Index> done(5, 0);  // tokens of each request run so far
  std::vector<Tensor<float, 3>> outs;
  for (Index r = 0; r < 5; ++r) outs.emplace_back(1, lengths[r], kDim);

  // One ragged step: (request, new tokens) pairs, packed in this order.
  const auto step = [&](const std::vector<std::pair<Index, Index>>& work) {
    RaggedBatch batch;
    batch.cu_seqlens.push_back(0);
    for (const auto& [r, n] : work) {
      batch.seqs.push_back(ids[static_cast<std::size_t>(r)]);
      batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n);
    }
    const Index total = batch.total_tokens();
    Tensor<float, 2> x(total, kDim);
    Tensor<DocId, 2> docs(1, total);
    Index row = 0;
    for (const auto& [r, n] : work) {
      const Index first = done[static_cast<std::size_t>(r)];
      for (Index t = 0; t < n; ++t, ++row) {
        for (Index d = 0; d < kDim; ++d) x(row, d) = xs[static_cast<std::size_t>(r)](0, first + t, d);
        docs(0, row) = doc_of(r, first + t);
      }
    }
    const Tensor<float, 2> y =
        c.docs ? attn.forward(x, rope, cache, batch, docs) : attn.forward(x, rope, cache, batch);
    row = 0;
    for (const auto& [r, n] : work) {
      Index& first = done[static_cast<std::size_t>(r)];
      for (Index t = 0; t < n; ++t, ++row)
        for (Index d = 0; d < kDim; ++d) outs[static_cast<std::size_t>(r)](0, first + t, d) = y(row, d);
      first += n;
    }
  };

  for (Index r : {0, 1, 2}) ids[static_cast<std::size_t>(r)] = cache.add_sequence();
  step({{0, 16}, {1, 7}, {2, 20}});            // prefills (request 0 chunked)
  ids[3] = cache.fork(ids[2]);                 // request 3 shares request 2's prompt
  done[3] = 20;                                // and its outputs for it
  for (Index p = 0; p < 20; ++p)
    for (Index d = 0; d < kDim; ++d) outs[3](0, p, d) = outs[2](0, p, d);
  step({{0, 24}, {1, 1}, {2, 1}, {3, 1}});     // a chunk next to three decodes
  step({{1, 1}, {2, 1}, {3, 1}});              // request 0 finished
  const Index free_before = cache.free_blocks();
  cache.free_sequence(ids[0]);
  EXPECT_GT(cache.free_blocks(), free_before);
  ids[4] = cache.add_sequence();
  step({{2, 1}, {4, 30}, {3, 1}});             // a new request reuses request 0's blocks
  EXPECT_EQ(cache.seq_len(ids[3]), 23);
  for (Index r = 1; r < 5; ++r) cache.free_sequence(ids[static_cast<std::size_t>(r)]);
  EXPECT_EQ(cache.blocks_in_use(), 0);

  for (Index r = 0; r < 5; ++r) {
    SCOPED_TRACE(::testing::Message() << "request " << r);
    const Tensor<float, 3>& x = xs[static_cast<std::size_t>(r)];
    const Index len = lengths[r];
    Tensor<DocId, 2> docs(1, len);
    for (Index p = 0; p < len; ++p) docs(0, p) = doc_of(r, p);
    // Alone, contiguous: the same chunks through a KVCache of the same storage type.
    KVCache<CacheT> alone(1, len, kKvHeads, head_dim, c.docs);
    Tensor<float, 3> contiguous(1, len, kDim);
    for (Index first = 0; first < len;) {
      const Index n = std::min<Index>(first == 0 ? 16 : 1, len - first);
      const Tensor<float, 3> chunk = ConstView<float, 3>(x).narrow(1, first, n).to_tensor();
      const ConstView<DocId, 2> chunk_docs = ConstView<DocId, 2>(docs).narrow(1, first, n);
      const Tensor<float, 3> y = c.docs ? attn.forward(chunk, rope, first, &alone, chunk_docs)
                                        : attn.forward(chunk, rope, first, &alone);
      for (Index t = 0; t < n; ++t)
        for (Index d = 0; d < kDim; ++d) contiguous(0, first + t, d) = y(0, t, d);
      first += n;
    }
    EXPECT_LT(test::error_relative_to_scale(outs[static_cast<std::size_t>(r)], contiguous), kForwardTol);
    if constexpr (std::is_same_v<CacheT, float>) {
      test::DenseMasks masks;
      masks.window = c.window;
      if (c.docs) masks.q_docs = docs;
      const Tensor<double, 3> expected = reference_forward(x, weights_of(attn), config_of(attn), masks);
      EXPECT_LT(test::error_relative_to_scale(outs[static_cast<std::size_t>(r)], expected), kForwardTol);
    }
  }
}

TEST_P(AttentionServing, EveryRequestMatchesTheRequestAloneAndTheDoubleComputation) {
  if (GetParam().bf16) {
    run_serving_case<Eigen::bfloat16>(GetParam());
  } else {
    run_serving_case<float>(GetParam());
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, AttentionServing,
    ::testing::Values(ServingCase{"GQA"}, ServingCase{"GQA_QkNorm_Block32", true, false, 0, false, 32},
                      ServingCase{"GQA_Docs", false, true}, ServingCase{"GQA_Window", false, false, 6},
                      ServingCase{"GQA_Bf16Cache", false, false, 0, true}),
    [](const ::testing::TestParamInfo<ServingCase>& info) { return info.param.name; });

TEST(AttentionServing, RejectsBadArgumentsBeforeTheCacheChanges) {
  constexpr Index kDim = 32, kHeads = 4, kKvHeads = 2;
  Attention<float> attn(kDim, kHeads, kKvHeads);
  const Index head_dim = attn.head_dim();
  const RotaryEmbedding<float> rope(head_dim, 24);
  PagedKVCache<float> cache(2, 16, kKvHeads, head_dim);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  const RaggedBatch prompt{{a, b}, {0, 10, 12}};
  const Tensor<float, 2> x = test::random_uniform<float, 2>({12, kDim}, 5);
  attn.forward(x, rope, cache, prompt);
  const auto unchanged = [&] {
    EXPECT_EQ(cache.seq_len(a), 10);
    EXPECT_EQ(cache.seq_len(b), 2);
    EXPECT_EQ(cache.free_blocks(), 0);
  };
  const RaggedBatch step{{a, b}, {0, 1, 2}};
  const Tensor<float, 2> x2 = test::random_uniform<float, 2>({2, kDim}, 6);
  const Tensor<float, 2> x3 = test::random_uniform<float, 2>({3, kDim}, 6);
  expect_invalid([&] { attn.forward(x3, rope, cache, step); }, {"Attention::forward (ragged)", "x", "(3, 32)", "(total_tokens, dim)"});
  unchanged();
  const RaggedBatch twice{{a, a}, {0, 1, 2}};
  expect_invalid([&] { attn.forward(x2, rope, cache, twice); }, {"Attention::forward (ragged)"});
  unchanged();
  const RotaryEmbedding<float> short_rope(head_dim, 10);
  expect_invalid([&] { attn.forward(x2, short_rope, cache, step); }, {"sequence", "position 10", "max_seq_len 10"});
  unchanged();
  const Tensor<DocId, 2> docs(1, 2);
  expect_invalid([&] { attn.forward(x2, rope, cache, step, docs); }, {"doc_ids need a cache that records"});
  unchanged();
  std::vector<Masks> masks(2);
  masks[1].doc_ids = docs;
  expect_invalid([&] { attn.forward(x2, rope, cache, step, {}, masks); }, {"masks[1]", "doc_ids"});
  unchanged();
  masks.assign(2, Masks{});
  const Tensor<bool, 2> pad(1, 5);  // sequence b will hold 3 keys
  masks[1].key_padding_mask = pad;
  expect_invalid([&] { attn.forward(x2, rope, cache, step, {}, masks); }, {"key_padding_mask"});
  unchanged();
  PagedKVCache<float> wrong(2, 16, 1, head_dim);
  const SeqId w = wrong.add_sequence();
  const Tensor<float, 2> x1 = test::random_uniform<float, 2>({1, kDim}, 8);
  expect_invalid([&] { attn.forward(x1, rope, wrong, RaggedBatch{{w}, {0, 1}}); },
                 {"cache holds (n_kv_heads 1"});
  // Both blocks are taken and sequence a's is full after 6 more tokens: out of blocks.
  const Tensor<float, 2> x7 = test::random_uniform<float, 2>({7, kDim}, 7);
  EXPECT_THROW(attn.forward(x7, rope, cache, RaggedBatch{{a}, {0, 7}}), std::length_error);
  unchanged();
  EXPECT_NO_THROW(attn.forward(x2, rope, cache, step));
  EXPECT_EQ(cache.seq_len(a), 11);
}

// ---------------------------------------------------------------------------------------
// Validation: each rejection names the argument and leaves the cache exactly as it was.

class AttentionValidation : public ::testing::Test {
 protected:
  static constexpr Index kBatch = 2, kDim = 32, kHeads = 4, kKvHeads = 2, kHeadDim = 8;
  static constexpr Index kCached = 5, kSeq = 3, kMaxLen = 10;

  void SetUp() override {
    attn_.reset_parameters(51);
    const Tensor<float, 3> prefill = test::random_uniform<float, 3>({kBatch, kCached, kDim}, 52);
    attn_.forward(prefill, rope_, 0, &cache_);
    keys_ = cache_.key_storage();
    values_ = cache_.value_storage();
  }

  template <typename F>
  void expect_rejected_and_cache_unchanged(F&& call, const std::vector<std::string>& fragments) {
    expect_invalid(call, fragments);
    expect_cache_unchanged();
  }

  void expect_cache_unchanged() {
    EXPECT_EQ(cache_.seq_len(), kCached);
    EXPECT_TRUE(test::bitwise_equal(cache_.key_storage(), keys_));
    EXPECT_TRUE(test::bitwise_equal(cache_.value_storage(), values_));
  }

  ConstView<float, 2> cos(Index start, Index len) const { return rope_.cos_rows(start, len); }
  ConstView<float, 2> sin(Index start, Index len) const { return rope_.sin_rows(start, len); }

  Attention<float> attn_{kDim, kHeads, kKvHeads};
  RotaryEmbedding<float> rope_{kHeadDim, 64};
  KVCache<float> cache_{kBatch, kMaxLen, kKvHeads, kHeadDim};
  Tensor<float, 3> x_ = test::random_uniform<float, 3>({kBatch, kSeq, kDim}, 53);
  Tensor<float, 4> keys_, values_;
};

TEST_F(AttentionValidation, XWithWrongLastDimensionIsRejected) {
  const Tensor<float, 3> x(kBatch, kSeq, kDim + 1);
  expect_rejected_and_cache_unchanged(
      [&] { attn_.forward(x, cos(kCached, kSeq), sin(kCached, kSeq), &cache_); },
      {"Attention::forward: x has shape (2, 3, 33)", "(B, S, dim)", "(-1, -1, 32)"});
}

TEST_F(AttentionValidation, RopeTablesTooShortOrWithWrongColumnsAreRejected) {
  expect_rejected_and_cache_unchanged(
      [&] { attn_.forward(x_, cos(kCached, kSeq - 1), sin(kCached, kSeq - 1), &cache_); },
      {"rope_cos has shape (2, 4)", "(S, head_dim / 2) = (3, 4)"});
  const Tensor<float, 2> wide(kSeq, 5);
  expect_rejected_and_cache_unchanged([&] { attn_.forward(x_, cos(kCached, kSeq), wide, &cache_); },
                                      {"rope_sin has shape (3, 5)", "(3, 4)"});
}

TEST_F(AttentionValidation, RotaryEmbeddingPositionsBeyondItsTableAreRejected) {
  const RotaryEmbedding<float> short_rope(kHeadDim, kCached + 1);
  expect_rejected_and_cache_unchanged([&] { attn_.forward(x_, short_rope, kCached, &cache_); },
                                      {"positions [5, 8)", "max_seq_len 6"});
  const RotaryEmbedding<float> other_dim(kHeadDim + 2, 64);
  expect_rejected_and_cache_unchanged([&] { attn_.forward(x_, other_dim, kCached, &cache_); },
                                      {"rope has head_dim 10"});
}

TEST_F(AttentionValidation, KvCacheOfWrongBatchHeadsOrHeadDimIsRejected) {
  for (const auto& [b, h, d] : {std::array<Index, 3>{kBatch + 1, kKvHeads, kHeadDim},
                                std::array<Index, 3>{kBatch, kKvHeads * 2, kHeadDim},
                                std::array<Index, 3>{kBatch, kKvHeads, kHeadDim + 2}}) {
    KVCache<float> wrong(b, kMaxLen, h, d);
    expect_invalid([&] { attn_.forward(x_, cos(0, kSeq), sin(0, kSeq), &wrong); },
                   {"kv_cache holds (batch_size " + std::to_string(b) + ", n_kv_heads " +
                    std::to_string(h) + ", head_dim " + std::to_string(d) + ")"});
    EXPECT_EQ(wrong.seq_len(), 0);
    EXPECT_EQ(test::max_abs(wrong.key_storage()), 0.0);
  }
}

TEST_F(AttentionValidation, CacheOverflowThroughForwardThrowsLengthErrorAndLeavesTheCache) {
  const Tensor<float, 3> x_long =
      test::random_uniform<float, 3>({kBatch, 6, kDim}, 54);  // 5 + 6 > 10
  test::expect_throws<std::length_error>(
      [&] { attn_.forward(x_long, cos(kCached, 6), sin(kCached, 6), &cache_); },
      {"max_seq_len 10"});
  expect_cache_unchanged();
}

TEST_F(AttentionValidation, DocIdsTogetherWithACacheAreRejected) {
  const Tensor<DocId, 2> docs(kBatch, kSeq);
  expect_rejected_and_cache_unchanged(
      [&] { attn_.forward(x_, cos(kCached, kSeq), sin(kCached, kSeq), &cache_, docs); },
      {"doc_ids (2, 3)", "kv_cache"});
}

TEST_F(AttentionValidation, DocIdsOfWrongShapeAreRejected) {
  const Tensor<DocId, 2> docs(kBatch, kSeq + 1);
  expect_invalid([&] { attn_.forward(x_, cos(0, kSeq), sin(0, kSeq), nullptr, docs); },
                 {"Attention::forward: doc_ids has shape (2, 4)", "(B, Sq) = (2, 3)"});
}

TEST_F(AttentionValidation, KeyPaddingMaskMustCoverCachedAndNewKeys) {
  const Tensor<bool, 2> only_new(kBatch, kSeq);  // needs (B, cached + S) = (2, 8)
  expect_rejected_and_cache_unchanged(
      [&] { attn_.forward(x_, cos(kCached, kSeq), sin(kCached, kSeq), &cache_, {}, only_new); },
      {"key_padding_mask has shape (2, 3)", "(B, Skv) = (2, 8)"});
  Tensor<bool, 2> right(kBatch, kCached + kSeq);
  right.setConstant(true);
  EXPECT_NO_THROW(attn_.forward(x_, cos(kCached, kSeq), sin(kCached, kSeq), &cache_, {}, right));
}

TEST_F(AttentionValidation, OutOfWrongShapeIsRejected) {
  Tensor<float, 3> out(kBatch, kSeq, kDim - 1);
  expect_rejected_and_cache_unchanged(
      [&] { attn_.forward_into(x_, cos(kCached, kSeq), sin(kCached, kSeq), out, &cache_); },
      {"out has shape (2, 3, 31)"});
}

// docs/design.md: every entry point checks option values before touching any output or state. The
// module's SDPA options are checked when forward runs, so that must happen before the update.
// set_sdpa_options validates the options itself: a rejected set keeps the previous
// options, and the module (and its cache) keep working with them.
TEST_F(AttentionValidation, BadSdpaOptionsAreRejectedBySetSdpaOptionsAndChangeNothing) {
  SdpaOptions good;
  good.causal = true;
  good.softcap = 30.0;
  attn_.set_sdpa_options(good);
  const auto bad_with = [&](auto change) {
    SdpaOptions bad = good;
    change(bad);
    return bad;
  };
  const std::pair<SdpaOptions, const char*> cases[] = {
      {bad_with([](SdpaOptions& o) { o.softcap = -1.0; }), "softcap must be >= 0"},
      {bad_with([](SdpaOptions& o) { o.scale = std::nan(""); }), "scale must be finite"},
      {bad_with([](SdpaOptions& o) { o.window = -2; }), "window must be >= 0"},
      {bad_with([](SdpaOptions& o) { o.causal = false; }), "options.causal is false"},
  };
  for (const auto& bad_case : cases) {
    // A lambda may not capture a structured binding in C++17 (clang rejects it).
    const SdpaOptions& bad = bad_case.first;
    test::expect_invalid([&] { attn_.set_sdpa_options(bad); },
                         {"Attention::set_sdpa_options", bad_case.second});
    EXPECT_TRUE(attn_.sdpa_options().causal);
    EXPECT_EQ(attn_.sdpa_options().softcap, 30.0);
    EXPECT_EQ(attn_.sdpa_options().window, 0);
  }
  EXPECT_NO_THROW(attn_.forward(x_, cos(kCached, kSeq), sin(kCached, kSeq), &cache_));
}

}  // namespace
}  // namespace attnforge
