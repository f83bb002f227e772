// bf16 and fp16 element types, and float activations over a bf16/fp16 cache, on every
// SDPA path, against the double reference evaluated on the same (already rounded) inputs.
#include <gtest/gtest.h>

#include <string>

#include "accuracy_budget.hpp"
#include "test_util.hpp"

namespace attnforge::test {
namespace {

using Eigen::bfloat16;
using Eigen::half;

// Error bounds relative to the output's scale. Inputs are exact in both computations
// (the reference widens the same rounded values), accumulation is float (~1e-6), so the
// error is the final rounding of each output to T: half an ulp, 2^-9 relative for bf16
// (8 significant bits) and 2^-12 for fp16 (11 bits); the bounds leave 2-4x margin. With
// float outputs over a 16-bit cache nothing is rounded but the float arithmetic.
template <typename T>
double bound() {
  if constexpr (std::is_same_v<T, bfloat16>) return 1e-2;
  if constexpr (std::is_same_v<T, half>) return 2e-3;
  return 1e-5;
}

template <typename T, typename KV>
void expect_matches_reference(SdpaPath path, Index q_len, Index kv_len, bool with_docs,
                              Bf16Kernel bf16_kernel = Bf16Kernel::kAuto, Index head_dim = 80) {
  const Index batch = 2, n_heads = 8, n_kv_heads = 2;
  const auto q = rounded_normal<T, 4>({batch, n_heads, q_len, head_dim}, 1);
  const auto k = rounded_normal<KV, 4>({batch, n_kv_heads, kv_len, head_dim}, 2);
  const auto v = rounded_normal<KV, 4>({batch, n_kv_heads, kv_len, head_dim}, 3);
  DenseMasks dense;
  dense.causal = true;
  if (with_docs) {
    Tensor<DocId, 2> docs(batch, kv_len);
    for (Index b = 0; b < batch; ++b) {
      for (Index j = 0; j < kv_len; ++j) docs(b, j) = (j + 7 * b) / 29;
    }
    Tensor<DocId, 2> q_docs(batch, q_len);
    for (Index b = 0; b < batch; ++b) {
      for (Index i = 0; i < q_len; ++i) q_docs(b, i) = docs(b, kv_len - q_len + i);
    }
    dense.q_docs = q_docs;
    dense.kv_docs = docs;
  }
  const DenseResult ref = dense_sdpa(to_double(q), to_double(k), to_double(v), dense);
  const Masks masks = library_masks(dense);
  Tensor<T, 4> first;
  for (int threads : {1, 2}) {
    SdpaOptions options = library_options(dense, {}, path);
    options.bf16_kernel = bf16_kernel;
    Sdpa<T, KV> sdpa(options, threads == 1 ? nullptr : &pool_device(threads));
    Tensor<T, 4> out(q.dimensions());
    Tensor<float, 3> lse(batch, n_heads, q_len);
    sdpa(q, k, v, StridedView<T, 4>(out), masks, StridedView<float, 3>(lse));
    EXPECT_LT(error_relative_to_scale(out, ref.out), bound<T>()) << threads << " threads";
    EXPECT_LT(lse_error(lse, ref.lse), 1e-4) << threads << " threads";  // lse stays float
    if (threads == 1) {
      first = out;
    } else {
      EXPECT_TRUE(bitwise_equal(out, first)) << "2 threads differ from 1";
    }
  }
}

struct PathCase {
  SdpaPath path;
  Index q_len, kv_len;
  const char* name;
};
const PathCase kPathCases[] = {{SdpaPath::kFused, 70, 70, "fused"},
                               {SdpaPath::kDecode, 3, 1100, "decode_split_kv"},
                               {SdpaPath::kReference, 9, 40, "reference"},
                               {SdpaPath::kAuto, 1, 300, "auto"}};

class LowPrecision : public ::testing::TestWithParam<PathCase> {};

TEST_P(LowPrecision, Bfloat16MatchesReferenceWithinOutputRounding) {
  const PathCase& c = GetParam();
  expect_matches_reference<bfloat16, bfloat16>(c.path, c.q_len, c.kv_len, false);
  expect_matches_reference<bfloat16, bfloat16>(c.path, c.q_len, c.kv_len, true);
}

TEST_P(LowPrecision, HalfMatchesReferenceWithinOutputRounding) {
  const PathCase& c = GetParam();
  expect_matches_reference<half, half>(c.path, c.q_len, c.kv_len, false);
  expect_matches_reference<half, half>(c.path, c.q_len, c.kv_len, true);
}

TEST_P(LowPrecision, FloatActivationsOverBfloat16AndHalfCacheMatchAtFloatAccuracy) {
  const PathCase& c = GetParam();
  expect_matches_reference<float, bfloat16>(c.path, c.q_len, c.kv_len, true);
  expect_matches_reference<float, half>(c.path, c.q_len, c.kv_len, false);
}

// The decode reads a 16-bit cache as stored and widens each packet as it loads it: every
// head_dim tail (whole chunks of packets, single packets, single elements), one and
// several query rows per head, over bf16 (by conversion, not dot products) and fp16.
TEST(LowPrecisionKernels, DecodeWidensSixteenBitCachesAtEveryHeadDim) {
  for (const Index head_dim : {Index{8}, Index{20}, Index{36}, Index{80}, Index{128}}) {
    SCOPED_TRACE(testing::Message() << "head_dim " << head_dim);
    for (const Index q_len : {Index{1}, Index{3}}) {
      expect_matches_reference<float, bfloat16>(SdpaPath::kDecode, q_len, 333, true,
                                                Bf16Kernel::kConvert, head_dim);
      expect_matches_reference<float, half>(SdpaPath::kDecode, q_len, 333, true, Bf16Kernel::kAuto,
                                            head_dim);
    }
  }
}

// The AVX512-BF16 dot products round the softmax weights to bf16 before P V (relative
// error 2^-9 per weight, averaging out over the keys), so the same bf16 bound holds.
TEST(LowPrecisionKernels, Bfloat16DotProductsAndConversionBothMatchTheReference) {
  for (const Index key_len : {Index{70}, Index{133}}) {
    expect_matches_reference<bfloat16, bfloat16>(SdpaPath::kFused, 70, key_len, true,
                                                 Bf16Kernel::kConvert);
    if (detail::kHasBf16DotKernel && detail::cpu_has_avx512_bf16()) {
      expect_matches_reference<bfloat16, bfloat16>(SdpaPath::kFused, 70, key_len, true,
                                                   Bf16Kernel::kDotProduct);
      expect_matches_reference<bfloat16, bfloat16>(SdpaPath::kFused, 70, key_len, false,
                                                   Bf16Kernel::kDotProduct);
    } else {
      // Asking for the dot products where the CPU lacks them is an error, not a silent
      // fallback.
      EXPECT_THROW((expect_matches_reference<bfloat16, bfloat16>(SdpaPath::kFused, 70, key_len,
                                                                 false, Bf16Kernel::kDotProduct)),
                   std::invalid_argument);
    }
  }
}

// The decode kernel's bf16 dot products (head_dim a multiple of 32) on bf16 queries: the
// queries and weights it rounds to bf16 stay within the bf16 output bound, and 2 threads
// give the bits of 1. Where this build or CPU has no such kernel, the conversion path
// runs the same checks. (Float queries: Bf16DecodeKernel in test_sdpa_kernel.cpp.)
TEST(LowPrecisionKernels, Bfloat16DecodeByDotProductsMatchesTheReference) {
  const Bf16Kernel kernel =
      decodes_by_bf16_dot(SdpaPath::kDecode, Bf16Kernel::kDotProduct, 3, 4, 128)
          ? Bf16Kernel::kDotProduct
          : Bf16Kernel::kConvert;
  for (const bool docs : {false, true})
    expect_matches_reference<bfloat16, bfloat16>(SdpaPath::kDecode, 3, 1100, docs, kernel, 128);
}

TEST(LowPrecisionKernels, Bfloat16DotProductsRejectAnOddHeadDim) {
  const auto q = rounded_normal<bfloat16, 4>({1, 2, 20, 7}, 1);
  SdpaOptions options;
  options.path = SdpaPath::kFused;
  options.bf16_kernel = Bf16Kernel::kDotProduct;
  EXPECT_THROW(scaled_dot_product_attention(q, q, q, options), std::invalid_argument);
  options.bf16_kernel = Bf16Kernel::kAuto;  // falls back to conversion
  EXPECT_NO_THROW(scaled_dot_product_attention(q, q, q, options));
  // Float queries over a bf16 cache: the decode kernel's dot products need head_dim a
  // multiple of 32, so kDotProduct rejects 80 on every CPU and kAuto converts.
  const auto qf = random_normal<float, 4>({1, 2, 1, 80}, 2);
  const auto kv = rounded_normal<bfloat16, 4>({1, 2, 40, 80}, 3);
  options.path = SdpaPath::kDecode;
  options.bf16_kernel = Bf16Kernel::kDotProduct;
  EXPECT_THROW((Sdpa<float, bfloat16>(options)(qf, kv, kv)), std::invalid_argument);
  options.bf16_kernel = Bf16Kernel::kAuto;
  EXPECT_NO_THROW((Sdpa<float, bfloat16>(options)(qf, kv, kv)));
}

// Bf16Kernel::kAuto gives, bit for bit, the kDotProduct result when `dot_expected`, else
// the kConvert one; run(kernel) makes one call with that kernel.
template <typename Run>
void expect_auto_is_one_kernel(bool dot_expected, const Run& run) {
  const auto automatic = run(Bf16Kernel::kAuto);
  const auto converted = run(Bf16Kernel::kConvert);
  if (dot_expected) {
    const auto dot = run(Bf16Kernel::kDotProduct);
    EXPECT_FALSE(test::bitwise_equal(dot, converted));  // else this test could not tell
    EXPECT_TRUE(test::bitwise_equal(automatic, dot));
  } else {
    EXPECT_TRUE(test::bitwise_equal(automatic, converted));
  }
}

// kAuto is one of the two kernels, bit for bit: the dot products where this CPU runs them
// faster than the conversion (detail::cpu_prefers_bf16_dot), the conversion elsewhere.
TEST(LowPrecisionKernels, AutoTakesTheDotProductsOnlyWhereTheCpuPrefersThem) {
  const auto q = rounded_normal<bfloat16, 4>({1, 2, 40, 32}, 3);
  const auto k = rounded_normal<bfloat16, 4>({1, 2, 70, 32}, 4);
  const auto v = rounded_normal<bfloat16, 4>({1, 2, 70, 32}, 5);
  SdpaOptions options;
  options.path = SdpaPath::kFused;
  const auto run = [&](Bf16Kernel kernel) {
    options.bf16_kernel = kernel;
    return scaled_dot_product_attention(q, k, v, options);
  };
  expect_auto_is_one_kernel(detail::kHasBf16DotKernel && detail::cpu_prefers_bf16_dot(), run);
}

// In a decode over a bf16 cache kAuto takes the dot products wherever they run (an
// AVX512-BF16 CPU, an AVX-512 build, head_dim a multiple of 32), whatever the CPU's
// prefill choice: bit for bit the kDotProduct result there, the conversion's elsewhere.
TEST(LowPrecisionKernels, AutoDecodesByDotProductsWhereverTheyRun) {
  const auto q = test::random_normal<float, 4>({2, 8, 1, 64}, 6);
  const auto k = rounded_normal<bfloat16, 4>({2, 2, 300, 64}, 7);
  const auto v = rounded_normal<bfloat16, 4>({2, 2, 300, 64}, 8);
  SdpaOptions options;
  options.path = SdpaPath::kDecode;
  const auto run = [&](Bf16Kernel kernel) {
    options.bf16_kernel = kernel;
    Tensor<float, 4> out(q.dimensions());
    Sdpa<float, bfloat16> sdpa(options);
    sdpa(q, k, v, StridedView<float, 4>(out));
    return out;
  };
  const bool runs = detail::kHasBf16DotKernel && detail::cpu_has_avx512_bf16() &&
                    detail::bf16_dot_decode_fits<float, bfloat16>(64);
  EXPECT_EQ(runs, decodes_by_bf16_dot(SdpaPath::kDecode, Bf16Kernel::kAuto, 1, 4, 64));
  expect_auto_is_one_kernel(runs, run);
}

INSTANTIATE_TEST_SUITE_P(Paths, LowPrecision, ::testing::ValuesIn(kPathCases),
                         [](const auto& info) { return std::string(info.param.name); });

// Which element-type combinations the free functions accept (compile-time).
template <typename Q, typename K, typename V, typename = void>
struct Invocable : std::false_type {};
template <typename Q, typename K, typename V>
struct Invocable<Q, K, V,
                 std::void_t<decltype(scaled_dot_product_attention(
                     std::declval<const Q&>(), std::declval<const K&>(), std::declval<const V&>()))>>
    : std::true_type {};
using F4 = Tensor<float, 4>;
using B4 = Tensor<bfloat16, 4>;
using H4 = Tensor<half, 4>;
static_assert(Invocable<B4, B4, B4>::value);
static_assert(Invocable<H4, H4, H4>::value);
static_assert(Invocable<F4, B4, B4>::value, "float activations over a bf16 cache");
static_assert(Invocable<F4, H4, H4>::value, "float activations over an fp16 cache");
static_assert(!Invocable<F4, B4, H4>::value, "k and v of different types");
static_assert(!Invocable<B4, F4, F4>::value, "bf16 queries over a float cache");
static_assert(!Invocable<F4, Tensor<double, 4>, Tensor<double, 4>>::value);

}  // namespace
}  // namespace attnforge::test

namespace attnforge::test {
namespace {

TEST(MixedPrecisionCache, FloatUpdatesAreRoundedIntoABfloat16Cache) {
  KVCache<bfloat16> cache(1, 8, 2, 16);
  const auto k = random_normal<float, 4>({1, 2, 3, 16}, 4);
  const auto v = random_normal<float, 4>({1, 2, 3, 16}, 5);
  const KVPrefix<bfloat16> prefix = cache.update(k, v);
  ASSERT_EQ(prefix.keys.dimension(2), 3);
  for (Index h = 0; h < 2; ++h) {
    for (Index s = 0; s < 3; ++s) {
      for (Index d = 0; d < 16; ++d) {
        // Round to nearest even, as Eigen's (and PyTorch's) float -> bf16 cast.
        EXPECT_EQ(static_cast<float>(prefix.keys(0, h, s, d)),
                  static_cast<float>(static_cast<bfloat16>(k(0, h, s, d))));
        EXPECT_EQ(static_cast<float>(prefix.values(0, h, s, d)),
                  static_cast<float>(static_cast<bfloat16>(v(0, h, s, d))));
      }
    }
  }
}

// Decoding through a bf16 cache equals the float forward up to the rounding of the
// cached keys and values: 2^-9 relative each, which moves scores by ~2^-9 * |q||k| and
// the output by a few times 2^-9 of its scale.
TEST(MixedPrecisionCache, AttentionDecodesThroughABfloat16AndHalfCache) {
  const Index dim = 64, len = 12;
  Attention<float> attn(dim, 4, 2);
  attn.reset_parameters(3);
  RotaryEmbedding<float> rope(attn.head_dim(), 64);
  const auto x = random_normal<float, 3>({2, len, dim}, 6);
  const Tensor<float, 3> full = attn.forward(x, rope, 0);
  const auto run = [&](auto cache) {
    Tensor<float, 3> steps(2, len, dim);
    const ConstView<float, 3> xv(x);
    for (Index start = 0; start < len;) {
      const Index n = start == 0 ? 5 : 1;  // a prefill chunk, then single tokens
      const Tensor<float, 3> y = attn.forward(xv.narrow(1, start, n), rope, start, &cache);
      for (Index b = 0; b < 2; ++b) {
        for (Index s = 0; s < n; ++s) {
          for (Index d = 0; d < dim; ++d) steps(b, start + s, d) = y(b, s, d);
        }
      }
      start += n;
    }
    return steps;
  };
  const Tensor<float, 3> bf16_steps = run(KVCache<bfloat16>(2, len, 2, attn.head_dim()));
  const Tensor<float, 3> half_steps = run(KVCache<half>(2, len, 2, attn.head_dim()));
  EXPECT_LT(error_relative_to_scale(bf16_steps, full), 1e-2);
  EXPECT_LT(error_relative_to_scale(half_steps, full), 2e-3);
  EXPECT_GT(error_relative_to_scale(bf16_steps, full), 0.0);  // the cache really is bf16
}

// A whole 16-bit module against the float module with the same (16-bit-representable)
// weights and input: the 16-bit module rounds q, k, v, the attention output and the
// projections' results (2^-9 each for bf16, 2^-12 for fp16), a few times that overall,
// since its products sum in float (detail/linear.hpp, widened_linear).
template <typename T>
double module_error_against_float(Index dim, Index len) {
  Attention<float> reference(dim, 4, 2, 0, /*qk_norm=*/true);
  reference.reset_parameters(8);
  Attention<T> attn(dim, 4, 2, 0, /*qk_norm=*/true);
  const auto round_weights = [](ParameterRef<float, 2> w, ParameterRef<T, 2> out) {
    for (Index i = 0; i < w.size(); ++i) {
      out.data()[i] = static_cast<T>(w.data()[i]);
      w.data()[i] = static_cast<float>(out.data()[i]);
    }
  };
  round_weights(reference.wq(), attn.wq());
  round_weights(reference.wk(), attn.wk());
  round_weights(reference.wv(), attn.wv());
  round_weights(reference.wo(), attn.wo());
  const auto x = rounded_normal<T, 3>({1, len, dim}, 9);
  Tensor<float, 3> xf(x.dimensions());
  for (Index i = 0; i < x.size(); ++i) xf.data()[i] = static_cast<float>(x.data()[i]);
  RotaryEmbedding<float> rope_f(dim / 4, 32);
  RotaryEmbedding<T> rope_t(dim / 4, 32);
  KVCache<T> cache(1, 32, 2, dim / 4);
  const Tensor<T, 3> y = attn.forward(x, rope_t, 0, &cache);
  const Tensor<float, 3> yf = reference.forward(xf, rope_f, 0);
  return error_relative_to_scale(y, yf);
}

TEST(LowPrecisionAttention, SixteenBitModulesTrackTheFloatModule) {
  // dim 64 (16 features per head); dim 512 sums 512 features per projection output.
  for (Index dim : {64, 512}) {
    const double bf16 = module_error_against_float<bfloat16>(dim, 10);
    const double fp16 = module_error_against_float<half>(dim, 10);
    // About 3 x the errors of float sums; sums in 16 bits, as Eigen's own 16-bit products
    // take them, exceed both bounds at both widths.
    EXPECT_LT(bf16, 1e-2) << dim;
    EXPECT_LT(fp16, 1.5e-3) << dim;
    EXPECT_GT(bf16, 0.0) << dim;  // the modules really are 16-bit
    EXPECT_GT(fp16, 0.0) << dim;
  }
}

}  // namespace
}  // namespace attnforge::test
