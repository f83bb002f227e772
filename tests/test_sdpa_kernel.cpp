// The fused kernel (detail/sdpa_kernel.hpp) and the tile classification it relies on
// (TilePlan in mask.hpp), against the dense brute force of test_util.hpp.
#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "accuracy_budget.hpp"
#include "test_util.hpp"

namespace attnforge::test {
namespace {

// Counts, for every (batch, query tile, key tile), how many (query, key) pairs the dense
// mask allows, and checks the plan's class against it: empty => none allowed, full =>
// all allowed, and no allowed pair lies outside key_tile_range.
void expect_plan_matches_dense(const DenseMasks& dense, Index batch, Index q_len, Index kv_len,
                               Index positions, Index key_tile) {
  const Masks masks = library_masks(dense);
  const detail::TilePlan plan = tile_plan(dense, masks, batch, q_len, kv_len, positions, key_tile);
  for (Index b = 0; b < batch; ++b) {
    const auto allowed = dense_allowed(dense, b, q_len, kv_len);
    for (Index qt = 0; qt < plan.q_tiles(); ++qt) {
      const auto [first, last] = plan.key_tile_range(b, qt);
      for (Index kt = 0; kt < plan.key_tiles(); ++kt) {
        Index n_allowed = 0, n_pairs = 0;
        for (Index i = qt * positions; i < std::min(q_len, (qt + 1) * positions); ++i) {
          for (Index j = kt * key_tile; j < std::min(kv_len, (kt + 1) * key_tile); ++j) {
            n_allowed += allowed[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
            ++n_pairs;
          }
        }
        const std::string where =
            "b " + std::to_string(b) + " qt " + std::to_string(qt) + " kt " + std::to_string(kt);
        if (kt < first || kt >= last) {
          EXPECT_EQ(n_allowed, 0) << "allowed pairs outside key_tile_range at " << where;
          continue;
        }
        switch (plan.classify(b, qt, kt)) {
          case detail::TileClass::kEmpty:
            EXPECT_EQ(n_allowed, 0) << where;
            break;
          case detail::TileClass::kFull:
            EXPECT_EQ(n_allowed, n_pairs) << where;
            break;
          case detail::TileClass::kPartial:
            break;
        }
      }
    }
  }
}

Tensor<DocId, 2> packed_doc_ids(Index batch, Index len, const std::vector<Index>& doc_lengths) {
  Tensor<DocId, 2> ids(batch, len);
  for (Index b = 0; b < batch; ++b) {
    Index pos = 0;
    DocId doc = 0;
    while (pos < len) {
      const Index n = doc_lengths[static_cast<std::size_t>((doc + b) % doc_lengths.size())];
      for (Index j = 0; j < n && pos < len; ++j) ids(b, pos++) = doc;
      ++doc;
    }
  }
  return ids;
}

TEST(TilePlan, ClassesAgreeWithDenseMaskForEveryRule) {
  const Index batch = 2;
  for (const auto& [q_len, kv_len] : {std::pair<Index, Index>{37, 37}, {5, 70}, {64, 64}}) {
    for (const auto& [positions, key_tile] : {std::pair<Index, Index>{4, 8}, {16, 64}, {3, 7}}) {
      for (int variant = 0; variant < 6; ++variant) {
        DenseMasks dense;
        dense.causal = variant != 1;
        dense.window = (variant == 1 || variant == 5) ? 11 : 0;
        if (variant >= 2) {
          Tensor<DocId, 2> kv_docs =
              variant == 3
                  ? random_uniform<DocId, 2>({batch, kv_len}, 7, 0, 3)  // unsorted, repeated
                  : packed_doc_ids(batch, kv_len, {9, 1, 20});
          Tensor<DocId, 2> q_docs(batch, q_len);
          for (Index b = 0; b < batch; ++b) {
            for (Index i = 0; i < q_len; ++i) q_docs(b, i) = kv_docs(b, kv_len - q_len + i);
          }
          dense.q_docs = q_docs;
          dense.kv_docs = kv_docs;
        }
        if (variant >= 4) {
          Tensor<bool, 2> padding(batch, kv_len);
          for (Index j = 0; j < kv_len; ++j) {
            padding(0, j) = j % 5 != 0;
            padding(1, j) = j < kv_len / 3;  // a run of padded tiles
          }
          dense.key_padding = padding;
        }
        SCOPED_TRACE("Sq " + std::to_string(q_len) + " Skv " + std::to_string(kv_len) + " tile " +
                     std::to_string(positions) + "x" + std::to_string(key_tile) + " variant " +
                     std::to_string(variant));
        expect_plan_matches_dense(dense, batch, q_len, kv_len, positions, key_tile);
      }
    }
  }
}

TEST(TilePlan, DocMaskSkipsTilesOutsideDiagonal) {
  // 8 packed documents of 64 tokens, tiles aligned with them: every query tile touches
  // exactly the key tiles of its own document, causally.
  const Index len = 512;
  const Tensor<DocId, 2> ids = packed_doc_ids(1, len, {64});
  Masks masks;
  masks.doc_ids = ids;
  DenseMasks causal;
  causal.causal = true;
  const detail::TilePlan plan = tile_plan(causal, masks, 1, len, len, 16, 32);
  Index active = 0;
  for (Index qt = 0; qt < plan.q_tiles(); ++qt) {
    const Index within_doc = (qt * 16 % 64) / 32 + 1;  // causal key tiles inside the document
    EXPECT_EQ(plan.active_key_tiles(0, qt), within_doc) << "query tile " << qt;
    active += plan.active_key_tiles(0, qt);
  }
  // Dense causal touches sum over query tiles of (qt * 16 / 32 + 1) = 272 tiles; the
  // documents 48.
  Index dense_causal = 0;
  for (Index qt = 0; qt < plan.q_tiles(); ++qt) dense_causal += qt * 16 / 32 + 1;
  EXPECT_EQ(active, 48);
  EXPECT_EQ(dense_causal, 272);
}

struct KernelCase {
  Index batch, n_heads, n_kv_heads, q_len, kv_len, head_dim;
  bool causal;
  Index window;
  double softcap;
  int docs;  // 0 none, 1 packed sorted, 2 unsorted
  bool padding;
  bool attend_all;
};

class FusedKernel : public ::testing::TestWithParam<std::tuple<KernelCase, Index>> {};

// Float kernel vs the double brute force: errors are float rounding of D-term dot
// products and of the softmax sums (~sqrt(Skv) * 6e-8 relative), well under 1e-5.
TEST_P(FusedKernel, MatchesDenseReferenceForAnyKeyTileAndThreadCount) {
  const auto& [c, key_tile] = GetParam();
  auto q = random_normal<float, 4>({c.batch, c.n_heads, c.q_len, c.head_dim}, 11);
  auto k = random_normal<float, 4>({c.batch, c.n_kv_heads, c.kv_len, c.head_dim}, 12);
  auto v = random_normal<float, 4>({c.batch, c.n_kv_heads, c.kv_len, c.head_dim}, 13);
  DenseMasks dense;
  dense.causal = c.causal;
  dense.window = c.window;
  if (c.docs) {
    Tensor<DocId, 2> kv_docs = c.docs == 1 ? packed_doc_ids(c.batch, c.kv_len, {13, 40, 2})
                                           : random_uniform<DocId, 2>({c.batch, c.kv_len}, 5, 0, 3);
    Tensor<DocId, 2> q_docs(c.batch, c.q_len);
    for (Index b = 0; b < c.batch; ++b) {
      for (Index i = 0; i < c.q_len; ++i) q_docs(b, i) = kv_docs(b, c.kv_len - c.q_len + i);
    }
    dense.q_docs = q_docs;
    dense.kv_docs = kv_docs;
  }
  if (c.padding) {
    Tensor<bool, 2> padding(c.batch, c.kv_len);
    for (Index b = 0; b < c.batch; ++b) {
      for (Index j = 0; j < c.kv_len; ++j) padding(b, j) = (j * 7 + b) % 4 != 0;
    }
    dense.key_padding = padding;
  }
  DenseOptions dense_options;
  dense_options.softcap = c.softcap;
  dense_options.attend_all_when_empty = c.attend_all;
  const DenseResult ref =
      dense_sdpa(to_double(q), to_double(k), to_double(v), dense, dense_options);

  const Masks masks = library_masks(dense);
  Tensor<float, 4> first_out;
  for (int threads : {1, 2, 3}) {
    Sdpa<float> sdpa(library_options(dense, dense_options, SdpaPath::kFused),
                     threads == 1 ? nullptr : &pool_device(threads));
    sdpa.set_key_tile(key_tile);
    Tensor<float, 4> out(q.dimensions());
    Tensor<float, 3> lse(c.batch, c.n_heads, c.q_len);
    sdpa(q, k, v, StridedView<float, 4>(out), masks, StridedView<float, 3>(lse));
    EXPECT_LT(error_relative_to_scale(out, ref.out), 1e-5) << threads << " threads";
    EXPECT_LT(lse_error(lse, ref.lse), 1e-5) << threads << " threads";
    EXPECT_FALSE(has_nan(out));
    if (threads == 1) {
      first_out = out;
    } else {
      EXPECT_TRUE(bitwise_equal(out, first_out)) << threads << " threads differ from 1";
    }
  }
}

const KernelCase kKernelCases[] = {
    // batch, H, Hkv, Sq, Skv, D, causal, window, softcap, docs, padding, attend_all
    {1, 4, 4, 70, 70, 64, true, 0, 0.0, 0, false, false},   // MHA, more than one tile
    {2, 8, 2, 33, 33, 80, true, 0, 0.0, 0, false, false},   // GQA, D not a packet multiple of 16
    {1, 6, 1, 19, 45, 128, true, 0, 0.0, 0, false, false},  // MQA, chunk on a cache
    {1, 4, 2, 1, 77, 64, true, 0, 0.0, 0, false, false},    // decode step
    {1, 4, 2, 40, 40, 64, false, 0, 0.0, 0, false, false},  // not causal
    {1, 4, 2, 50, 61, 64, true, 17, 0.0, 0, false, false},  // sliding window
    {1, 4, 2, 50, 50, 64, false, 9, 0.0, 0, false, false},  // window without causal
    {1, 4, 2, 45, 45, 64, true, 0, 30.0, 0, false, false},  // Gemma-style softcap
    {2, 4, 2, 55, 55, 64, true, 0, 0.0, 1, false, false},   // packed documents
    {2, 4, 2, 30, 30, 64, true, 0, 0.0, 2, false, false},   // unsorted doc ids
    {2, 4, 2, 30, 39, 64, true, 0, 0.0, 0, true, false},    // padding
    {2, 4, 2, 30, 39, 64, false, 0, 0.0, 2, true, true},    // empty rows attend all
    {2, 8, 2, 37, 41, 80, true, 13, 20.0, 1, true, false},  // everything at once
    {1, 68, 1, 3, 20, 64, true, 0, 0.0, 0, false, false},   // n_rep larger than the lanes
    // Outputs of more than kStreamedOutputBytes, written with streaming stores: rows that
    // are all aligned to a packet (D 128), and rows that are not (D 72).
    {1, 8, 2, 260, 260, 128, true, 0, 0.0, 1, false, false},
    {1, 16, 4, 230, 230, 72, true, 0, 0.0, 0, false, false},
};

std::string kernel_case_name(const ::testing::TestParamInfo<std::tuple<KernelCase, Index>>& info) {
  const auto& [c, key_tile] = info.param;
  std::string name = "H" + std::to_string(c.n_heads) + "kv" + std::to_string(c.n_kv_heads) + "_Sq" +
                     std::to_string(c.q_len) + "_Skv" + std::to_string(c.kv_len) + "_D" +
                     std::to_string(c.head_dim);
  if (c.causal) name += "_causal";
  if (c.window) name += "_window" + std::to_string(c.window);
  if (c.softcap > 0) name += "_softcap";
  if (c.docs) name += c.docs == 1 ? "_packed" : "_unsorted";
  if (c.padding) name += "_padding";
  if (c.attend_all) name += "_attendall";
  return name + "_keytile" + std::to_string(key_tile);
}

INSTANTIATE_TEST_SUITE_P(Cases, FusedKernel,
                         ::testing::Combine(::testing::ValuesIn(kKernelCases),
                                            ::testing::Values<Index>(1, 7, 0)),
                         kernel_case_name);

// The decode streams compared bit for bit with kL1NextBlock.
constexpr detail::DecodeStream kStreamsBesideL1[] = {
    detail::DecodeStream::kL2NextBlock, detail::DecodeStream::kL2NextBlockCrossed,
    detail::DecodeStream::kL2BlockAfterNext, detail::DecodeStream::kAuto};

// The decode kernel holds a query row in registers a fixed number of packets at a time
// and the output a whole value row at a time: every head_dim that leaves a tail of
// packets (or of elements) behind, and odd row counts (rows taken two or four at a
// time), against the double brute force on 1 and 2 threads, with a key count that ends
// mid-block, and with both score packet widths (kAuto takes one of them by build). Every
// way of streaming the cache ahead (DecodeStream) gives the same bits: they only ask for
// lines.
class DecodeKernel : public ::testing::TestWithParam<std::tuple<Index, Index>> {};

// The cache as KV: float, or a 16-bit type the kernels widen as they load it (the bf16
// one by conversion, not by dot products), against the reference over the same values.
template <typename KV>
void expect_decode_matches_dense_reference(Index head_dim, Index n_rep) {
  const Index n_kv_heads = 2, kv_len = 1100 + head_dim % 13;
  auto q = random_normal<float, 4>({1, n_kv_heads * n_rep, 1, head_dim}, 21);
  auto k = rounded_normal<KV, 4>({1, n_kv_heads, kv_len, head_dim}, 22);
  auto v = rounded_normal<KV, 4>({1, n_kv_heads, kv_len, head_dim}, 23);
  DenseMasks dense;
  dense.causal = true;
  const DenseResult ref = dense_sdpa(to_double(q), to_double(k), to_double(v), dense);
  SdpaOptions options = library_options(dense, {}, SdpaPath::kDecode);
  options.bf16_kernel = Bf16Kernel::kConvert;
  using Width = detail::DecodeScoreWidth;
  for (Width width : {Width::kHalfPacket, Width::kFullPacket}) {
    SCOPED_TRACE(width == Width::kFullPacket ? "full-width scores" : "half-width scores");
    for (int threads : {1, 2}) {
      Sdpa<float, KV> sdpa(options, threads == 1 ? nullptr : &pool_device(threads));
      sdpa.set_decode_score_width(width);
      sdpa.set_decode_stream(detail::DecodeStream::kL1NextBlock);
      Tensor<float, 4> out(q.dimensions());
      Tensor<float, 3> lse(1, q.dimension(1), 1);
      sdpa(q, k, v, StridedView<float, 4>(out), {}, StridedView<float, 3>(lse));
      EXPECT_LT(error_relative_to_scale(out, ref.out), 1e-5) << threads << " threads";
      EXPECT_LT(lse_error(lse, ref.lse), 1e-5) << threads << " threads";
      for (detail::DecodeStream stream : kStreamsBesideL1) {
        SCOPED_TRACE("decode stream " + std::to_string(static_cast<int>(stream)));
        sdpa.set_decode_stream(stream);
        Tensor<float, 4> out_l2(q.dimensions());
        Tensor<float, 3> lse_l2(1, q.dimension(1), 1);
        sdpa(q, k, v, StridedView<float, 4>(out_l2), {}, StridedView<float, 3>(lse_l2));
        EXPECT_TRUE(bitwise_equal(out_l2, out)) << threads << " threads";
        EXPECT_TRUE(bitwise_equal(lse_l2, lse)) << threads << " threads";
      }
    }
  }
}

TEST_P(DecodeKernel, MatchesDenseReferenceForHeadDimTailsAndOddRowCounts) {
  const auto& [head_dim, n_rep] = GetParam();
  expect_decode_matches_dense_reference<float>(head_dim, n_rep);
}

TEST_P(DecodeKernel, WidensSixteenBitCachesForHeadDimTailsAndOddRowCounts) {
  const auto& [head_dim, n_rep] = GetParam();
  {
    SCOPED_TRACE("fp16 cache");
    expect_decode_matches_dense_reference<Eigen::half>(head_dim, n_rep);
  }
  SCOPED_TRACE("bf16 cache");
  expect_decode_matches_dense_reference<Eigen::bfloat16>(head_dim, n_rep);
}

INSTANTIATE_TEST_SUITE_P(Tails, DecodeKernel,
                         ::testing::Combine(::testing::Values<Index>(2, 6, 10, 24, 40, 72, 136, 200,
                                                                     264),
                                            ::testing::Values<Index>(1, 3, 4)),
                         [](const ::testing::TestParamInfo<std::tuple<Index, Index>>& info) {
                           return "D" + std::to_string(std::get<0>(info.param)) + "_rep" +
                                  std::to_string(std::get<1>(info.param));
                         });

// Every way of streaming the cache ahead (DecodeStream) gives the same bits over each cache
// format, whose kernels step the stream in loops of their own.
template <typename KV>
void expect_same_bits_for_every_decode_stream(const KVPrefix<KV>& kv, const Tensor<float, 4>& q) {
  using detail::DecodeStream;
  for (int threads : {1, 2}) {
    Sdpa<float, KV> sdpa(library_options(DenseMasks{}, {}, SdpaPath::kDecode),
                         threads == 1 ? nullptr : &pool_device(threads));
    sdpa.set_decode_stream(DecodeStream::kL1NextBlock);
    Tensor<float, 4> first(q.dimensions());
    sdpa(q, kv.keys, kv.values, StridedView<float, 4>(first));
    for (DecodeStream stream : kStreamsBesideL1) {
      sdpa.set_decode_stream(stream);
      Tensor<float, 4> out(q.dimensions());
      sdpa(q, kv.keys, kv.values, StridedView<float, 4>(out));
      EXPECT_TRUE(bitwise_equal(out, first))
          << threads << " threads, stream " << static_cast<int>(stream);
    }
  }
}

TEST(DecodeStreams, GiveTheSameBitsOverEveryCacheFormat) {
  const Index n_kv_heads = 2, n_rep = 4, kv_len = 3001, head_dim = 128;
  const auto q = random_normal<float, 4>({2, n_kv_heads * n_rep, 1, head_dim}, 41);
  const auto k = random_normal<float, 4>({2, n_kv_heads, kv_len, head_dim}, 42);
  const auto v = random_normal<float, 4>({2, n_kv_heads, kv_len, head_dim}, 43);
  KVCache<float> fp32(2, kv_len, n_kv_heads, head_dim);
  KVCache<Eigen::bfloat16> bf16(2, kv_len, n_kv_heads, head_dim);
  KVCache<QInt8> int8(2, kv_len, n_kv_heads, head_dim);
  {
    SCOPED_TRACE("fp32 cache");
    expect_same_bits_for_every_decode_stream(fp32.update(k, v), q);
  }
  {
    SCOPED_TRACE("bf16 cache");
    expect_same_bits_for_every_decode_stream(bf16.update(k, v), q);
  }
  {
    SCOPED_TRACE("QInt8 cache");
    expect_same_bits_for_every_decode_stream(int8.update(k, v), q);
  }
}

// The decode asks for the next block's lines over the value passes' steps, as many as
// value_pass_steps counts (next_block), so the count must be the steps decode_accumulate
// takes: one per key and chunk pass, over the blocks of rows the block takes. Counted with
// a stream of one line per step over a long buffer: its first line not yet asked for
// moves one line a step. Every head_dim from 1 to 300 (every tail of chunks, packets and
// elements), 1 to 9 rows, a full block of keys and shorter ones; values read as float and
// values widened from fp16 (four rows per pass).
template <typename K>
void expect_value_pass_steps_match_the_kernel() {
  namespace simd = detail::simd;
  constexpr Index kP = simd::kWidth<float>;  // a block's keys: at most one packet
  constexpr std::ptrdiff_t kBufferBytes = std::ptrdiff_t{1} << 20;
  const std::vector<char> buffer(static_cast<std::size_t>(kBufferBytes));
  for (Index head_dim = 1; head_dim <= 300; ++head_dim) {
    const Index padded = (head_dim + kP - 1) / kP * kP;
    for (Index rows = 1; rows <= 9; ++rows) {
      for (Index n_keys : {Index{1}, kP - 1, kP}) {
        const detail::AlignedBuffer<float> weights(static_cast<std::size_t>(rows * kP), 0.5f);
        detail::AlignedBuffer<float> out(static_cast<std::size_t>(rows * padded), 0.0f);
        const std::vector<K> values(static_cast<std::size_t>(n_keys * head_dim), K(1.0f));
        simd::LineStream stream = simd::LineStream::over(
            buffer.data(), kBufferBytes, kBufferBytes / simd::LineStream::kLineBytes);
        const std::uintptr_t first = stream.next;
        detail::for_each_halving_row_block<detail::kValueRows<float, K>>(
            rows, [&](auto block, Index r0) {
              detail::decode_accumulate<float, decltype(block)::value>(
                  weights.data() + r0 * kP, values.data(), head_dim, n_keys, head_dim,
                  out.data() + r0 * padded, padded, stream);
            });
        const auto steps = static_cast<Index>((stream.next - first) / simd::LineStream::kLineBytes);
        ASSERT_EQ(steps, (detail::value_pass_steps<float, K>(rows, head_dim, n_keys)))
            << "head_dim " << head_dim << ", " << rows << " rows, " << n_keys << " keys";
        // Every output is the sum of its n_keys weights times 1.
        for (Index r = 0; r < rows; ++r) {
          for (Index d = 0; d < head_dim; ++d)
            ASSERT_EQ(out[static_cast<std::size_t>(r * padded + d)],
                      0.5f * static_cast<float>(n_keys));
        }
      }
    }
  }
}

TEST(DecodeKernelSteps, ValuePassStepsAreTheStepsTheKernelTakes) {
  expect_value_pass_steps_match_the_kernel<float>();
  expect_value_pass_steps_match_the_kernel<Eigen::half>();
}

// The bf16 decode kernel (float queries over bf16 keys and values, Bf16Kernel): every
// head_dim the score and value passes split differently (multiples of 32), row counts
// that take the 4-, 2- and 1-row value passes, a key count ending mid-block on an odd key,
// 1 and 2 threads, against the double brute force on what the kernel multiplies (the
// bf16 keys and values, the queries rounded as in accuracy_budget.hpp 6.). kConvert
// widens the same bf16 values to float: the float bound holds.
class Bf16DecodeKernel : public ::testing::TestWithParam<std::tuple<Index, Index>> {};

TEST_P(Bf16DecodeKernel, MatchesDenseReferenceOnWhatItMultiplies) {
  const auto& [head_dim, n_rep] = GetParam();
  const Index n_kv_heads = 2, kv_len = 1059;
  const auto q = random_normal<float, 4>({1, n_kv_heads * n_rep, 1, head_dim}, 31);
  const auto k = random_normal<float, 4>({1, n_kv_heads, kv_len, head_dim}, 32);
  const auto v = random_normal<float, 4>({1, n_kv_heads, kv_len, head_dim}, 33);
  const Tensor<Eigen::bfloat16, 4> k16 = k.cast<Eigen::bfloat16>(), v16 = v.cast<Eigen::bfloat16>();
  const Tensor<float, 4> k_stored = k16.cast<float>(), v_stored = v16.cast<float>();
  DenseMasks dense;
  dense.causal = true;
  for (Bf16Kernel kernel : {Bf16Kernel::kDotProduct, Bf16Kernel::kConvert}) {
    const bool dot = decodes_by_bf16_dot(SdpaPath::kDecode, kernel, 1, n_rep, head_dim);
    if (kernel == Bf16Kernel::kDotProduct && !dot) continue;  // no AVX512-BF16 here
    SCOPED_TRACE(dot ? "bf16 dot products" : "converted to float");
    const Tensor<double, 4> q_seen = dot ? bf16_rounded_queries(q) : to_double(q);
    const DenseResult exact = dense_sdpa(q_seen, to_double(k_stored), to_double(v_stored), dense);
    AccuracyBudget budget = sdpa_budget<float>(
        SdpaPath::kDecode,
        budget_inputs(Tensor<float, 4>(q_seen.cast<float>()), k_stored, dense, {}, exact));
    if (dot) budget = with_bf16_weights(budget);
    for (int threads : {1, 2}) {
      SdpaOptions options = library_options(dense, {}, SdpaPath::kDecode);
      options.bf16_kernel = kernel;
      Sdpa<float, Eigen::bfloat16> sdpa(options, threads == 1 ? nullptr : &pool_device(threads));
      Tensor<float, 4> out(q.dimensions());
      Tensor<float, 3> lse(1, q.dimension(1), 1);
      sdpa(q, k16, v16, StridedView<float, 4>(out), {}, StridedView<float, 3>(lse));
      EXPECT_LE(max_abs_diff(out, exact.out) / max_abs(v_stored), budget.out) << threads;
      EXPECT_LE(lse_error(lse, exact.lse), budget.lse) << threads << " threads";
      // Zero queries: every score is 0 and every weight 1, exact in bf16, so the output is
      // the mean of the value rows to float accuracy, whatever the kernel rounds (a key
      // dropped or counted twice moves it by ~1e-3 of max|v| here).
      Tensor<float, 4> zero_q(q.dimensions());
      zero_q.setZero();
      sdpa(zero_q, k16, v16, StridedView<float, 4>(out));
      double worst = 0.0;
      for (Index h = 0; h < q.dimension(1); ++h) {
        for (Index d = 0; d < head_dim; ++d) {
          double mean = 0.0;
          for (Index j = 0; j < kv_len; ++j) mean += v_stored(0, h / n_rep, j, d);
          worst = std::max(worst, std::abs(out(0, h, 0, d) - mean / static_cast<double>(kv_len)));
        }
      }
      EXPECT_LE(worst / max_abs(v_stored), 1e-5) << threads << " threads, zero queries";
    }
  }
}

// Every mask kind and option through the bf16 decode kernel (masks and biases apply to
// the scores it forms, a softcap to them before the scale's log2 e): two query positions
// per head, B = 2, against the double brute force on what it multiplies.
TEST(Bf16DecodeKernelMasks, EveryMaskKindAndOptionMatchesTheBruteForce) {
  const Index batch = 2, n_heads = 8, n_kv_heads = 2, q_len = 2, kv_len = 700, head_dim = 64;
  const bool dot = decodes_by_bf16_dot(SdpaPath::kDecode, Bf16Kernel::kDotProduct, q_len,
                                       n_heads / n_kv_heads, head_dim);
  const Bf16Kernel kernel = dot ? Bf16Kernel::kDotProduct : Bf16Kernel::kConvert;
  const auto q = random_normal<float, 4>({batch, n_heads, q_len, head_dim}, 41);
  const auto k = random_normal<float, 4>({batch, n_kv_heads, kv_len, head_dim}, 42);
  const auto v = random_normal<float, 4>({batch, n_kv_heads, kv_len, head_dim}, 43);
  const Tensor<Eigen::bfloat16, 4> k16 = k.cast<Eigen::bfloat16>(), v16 = v.cast<Eigen::bfloat16>();
  const Tensor<float, 4> k_stored = k16.cast<float>(), v_stored = v16.cast<float>();
  const Tensor<double, 4> q_seen = dot ? bf16_rounded_queries(q) : to_double(q);
  for (int kind = 0; kind < 5; ++kind) {
    DenseMasks dense;
    DenseOptions opts;
    dense.causal = kind != 3;
    if (kind == 0) dense.window = 300, opts.softcap = 8.0;  // window and softcap
    if (kind == 1) {                                        // ALiBi and sinks
      for (Index h = 0; h < n_heads; ++h) {
        opts.alibi_slopes.push_back(0.01 * static_cast<double>(h + 1));
        opts.sinks.push_back(0.5 - 0.2 * static_cast<double>(h));
      }
    }
    if (kind == 2) {  // documents and key padding
      Tensor<DocId, 2> docs(batch, kv_len), q_docs(batch, q_len);
      Tensor<bool, 2> padding(batch, kv_len);
      for (Index b = 0; b < batch; ++b) {
        for (Index j = 0; j < kv_len; ++j)
          docs(b, j) = (j + 50 * b) / 170, padding(b, j) = j % 9 != 4;
        for (Index i = 0; i < q_len; ++i) q_docs(b, i) = docs(b, kv_len - q_len + i);
      }
      dense.q_docs = q_docs, dense.kv_docs = docs, dense.key_padding = padding;
    }
    if (kind == 3) {  // a boolean mask and an additive bias, not causal
      Tensor<bool, 4> mask(batch, 1, q_len, kv_len);
      Tensor<float, 4> bias = random_normal<float, 4>({1, n_heads, q_len, kv_len}, 44);
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = (i * 7919) % 5 != 0;
      dense.attn_mask = mask, dense.attn_bias = bias;
    }
    if (kind == 4) {  // rows with no key left, attending to all
      Tensor<bool, 2> padding(batch, kv_len);
      padding.setConstant(false);
      dense.key_padding = padding, opts.attend_all_when_empty = true;
    }
    SCOPED_TRACE("kind " + std::to_string(kind));
    // Rows left empty are redone without masks on the reference path, which multiplies
    // the float queries.
    const Tensor<double, 4> q_used = kind == 4 ? to_double(q) : q_seen;
    const DenseResult exact =
        dense_sdpa(q_used, to_double(k_stored), to_double(v_stored), dense, opts);
    AccuracyBudget budget = sdpa_budget<float>(
        SdpaPath::kDecode,
        budget_inputs(Tensor<float, 4>(q_used.cast<float>()), k_stored, dense, opts, exact));
    if (dot && kind != 4) budget = with_bf16_weights(budget);
    SdpaOptions options = library_options(dense, opts, SdpaPath::kDecode);
    options.bf16_kernel = kernel;
    Tensor<float, 4> out(q.dimensions());
    Tensor<float, 3> lse(batch, n_heads, q_len);
    Sdpa<float, Eigen::bfloat16> sdpa(options);
    sdpa(q, k16, v16, StridedView<float, 4>(out), library_masks(dense), StridedView<float, 3>(lse));
    EXPECT_LE(max_abs_diff(out, exact.out) / max_abs(v_stored), budget.out);
    EXPECT_LE(lse_error(lse, exact.lse), budget.lse);
  }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, Bf16DecodeKernel,
                         ::testing::Combine(::testing::Values<Index>(32, 64, 96, 128, 160, 256,
                                                                     288),
                                            ::testing::Values<Index>(1, 3, 4, 7)),
                         [](const ::testing::TestParamInfo<std::tuple<Index, Index>>& info) {
                           return "D" + std::to_string(std::get<0>(info.param)) + "_rep" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(FusedKernelScratch, DoesNotGrowWithSequenceLength) {
  detail::KernelWorkspace<float> ws;
  std::vector<std::size_t> sizes;
  for (Index len : {64, 1024}) {
    auto q = random_normal<float, 4>({1, 4, len, 64}, 1);
    auto k = random_normal<float, 4>({1, 2, len, 64}, 2);
    Tensor<float, 4> out(q.dimensions());
    detail::SdpaParams params;
    params.scale = 0.125;
    params.rules.causal = true;
    const detail::MaskPolicy policy(params.rules, Masks{}, 1, 4, len, len);
    detail::flash_attention(detail::KernelProblem<float>{q, k, k, out, {}, params}, policy, nullptr,
                            ws);
    const auto& s = ws.workers.at(0);
    std::size_t total = s.scores.size();
    for (const auto& tile : s.tiles) total += tile.q_tile.size() + tile.out_tile.size();
    sizes.push_back(total);
  }
  EXPECT_EQ(sizes[0], sizes[1]);
}

}  // namespace
}  // namespace attnforge::test
