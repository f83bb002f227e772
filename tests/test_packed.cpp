// Packed documents end to end: the tile plan's narrowing to a query tile's own documents
// (mask.hpp), packed SDPA against each document run alone, and Attention::forward
// continuing a packed stream through a KVCache that records document ids, in chunks of any
// size (attention.hpp). The cache's own doc-id tests are in test_kv_cache.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attnforge/attnforge.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

// Document lengths of each batch row (one vector per row); each row sums to the same S.
using Layouts = std::vector<std::vector<Index>>;

Index row_length(const Layouts& layouts) {
  Index len = 0;
  for (Index n : layouts.front()) len += n;
  return len;
}

// Row b holds documents 0, 1, ... of the given lengths, in order (sorted ids).
Tensor<DocId, 2> packed_ids(const Layouts& layouts) {
  const Index len = row_length(layouts);
  Tensor<DocId, 2> ids(static_cast<Index>(layouts.size()), len);
  for (std::size_t b = 0; b < layouts.size(); ++b) {
    Index pos = 0;
    for (std::size_t doc = 0; doc < layouts[b].size(); ++doc) {
      for (Index i = 0; i < layouts[b][doc]; ++i) {
        ids(static_cast<Index>(b), pos++) = static_cast<DocId>(doc);
      }
    }
  }
  return ids;
}

// Positions [start, start + len) of batch row b, as a (1, ..., len, D) view.
template <typename T, int Rank>
ConstView<T, Rank> document(const Tensor<T, Rank>& t, Index b, Index start, Index len) {
  return ConstView<T, Rank>(t).narrow(0, b, 1).narrow(Rank - 2, start, len);
}

// ---------------------------------------------------------------------------------------
// The tile plan.

// For every (b, query tile): no pair the dense mask allows lies outside
// key_tile_range(b, qt) or outside the key_span of its key tile, every key tile of the
// range has a non-empty span, and the range never widens the positional one.
void expect_spans_cover_allowed_pairs(const test::DenseMasks& dense, Index batch, Index q_len,
                                      Index kv_len, Index positions, Index key_tile) {
  const Masks masks = test::library_masks(dense);
  const detail::TilePlan plan = test::tile_plan(dense, masks, batch, q_len, kv_len, positions, key_tile);
  // The same rules without documents or padding: the positional key tiles.
  const detail::TilePlan positional = test::tile_plan(dense, Masks{}, batch, q_len, kv_len, positions, key_tile);
  for (Index b = 0; b < batch; ++b) {
    const auto allowed = test::dense_allowed(dense, b, q_len, kv_len);
    for (Index qt = 0; qt < plan.q_tiles(); ++qt) {
      const auto [first, last] = plan.key_tile_range(b, qt);
      const auto [pos_first, pos_last] = positional.key_tile_range(b, qt);
      const std::string where = "b " + std::to_string(b) + " qt " + std::to_string(qt);
      if (first < last) {
        EXPECT_GE(first, pos_first) << where;
        EXPECT_LE(last, pos_last) << where;
      }
      for (Index kt = first; kt < last; ++kt) {
        const detail::KeySpan span = plan.key_span(b, qt, kt);
        EXPECT_LT(span.first, span.last) << where << " kt " << kt;
        EXPECT_GE(span.first, kt * key_tile) << where << " kt " << kt;
        EXPECT_LE(span.last, std::min(kv_len, (kt + 1) * key_tile)) << where << " kt " << kt;
      }
      for (Index i = qt * positions; i < std::min(q_len, (qt + 1) * positions); ++i) {
        for (Index j = 0; j < kv_len; ++j) {
          if (!allowed[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)]) continue;
          const Index kt = j / key_tile;
          ASSERT_TRUE(kt >= first && kt < last)
              << "query " << i << " may see key " << j << " outside the key tiles of " << where;
          const detail::KeySpan span = plan.key_span(b, qt, kt);
          ASSERT_TRUE(j >= span.first && j < span.last)
              << "query " << i << " may see key " << j << " outside the key span of " << where;
        }
      }
    }
  }
}

TEST(PackedTilePlan, KeySpansCoverEveryAllowedPairForAnyIdsAndRules) {
  // Row 0 and row 1 are laid out differently; a 1-token document, documents shorter and
  // longer than a tile, none aligned to the tiles.
  const Layouts sorted_layouts = {{9, 1, 20, 3, 40, 6}, {33, 2, 2, 42}};
  const Tensor<DocId, 2> sorted = packed_ids(sorted_layouts);
  const Index kv_len = sorted.dimension(1);  // 79
  // Unsorted, with a document that comes back (repeated ids): narrowing must not apply.
  Tensor<DocId, 2> repeated = sorted;
  for (Index j = 60; j < kv_len; ++j) repeated(1, j) = 0;
  const Tensor<DocId, 2> random = test::random_uniform<DocId, 2>({2, kv_len}, 3, 0, 3);
  for (const Tensor<DocId, 2>* kv_docs :
       std::vector<const Tensor<DocId, 2>*>{&sorted, &repeated, &random}) {
    for (const Index q_len : {kv_len, Index{30}, Index{1}}) {  // with and without a cache
      Tensor<DocId, 2> q_docs(2, q_len);
      for (Index b = 0; b < 2; ++b) {
        for (Index i = 0; i < q_len; ++i) q_docs(b, i) = (*kv_docs)(b, kv_len - q_len + i);
      }
      for (const auto& [positions, key_tile] :
           {std::pair<Index, Index>{16, 64}, {4, 8}, {3, 7}, {1, 1}}) {
        for (int variant = 0; variant < 4; ++variant) {
          test::DenseMasks dense;
          dense.causal = variant != 1;
          dense.window = variant >= 1 ? 13 : 0;
          dense.q_docs = q_docs;
          dense.kv_docs = *kv_docs;
          if (variant == 3) {
            Tensor<bool, 2> padding(2, kv_len);
            for (Index j = 0; j < kv_len; ++j) padding(0, j) = padding(1, j) = j % 4 != 1;
            dense.key_padding = padding;
          }
          SCOPED_TRACE("ids " +
                       std::to_string(kv_docs == &sorted     ? 0
                                      : kv_docs == &repeated ? 1
                                                             : 2) +
                       " Sq " + std::to_string(q_len) + " tile " + std::to_string(positions) + "x" +
                       std::to_string(key_tile) + " variant " + std::to_string(variant));
          expect_spans_cover_allowed_pairs(dense, 2, q_len, kv_len, positions, key_tile);
        }
      }
    }
  }
}

TEST(PackedTilePlan, QueryTileOfSortedDocumentsGetsOnlyItsDocumentsKeyTiles) {
  // Two rows of different layouts; 16-position query tiles, 64-key tiles (the float
  // kernel's geometry for n_rep = 4 with AVX-512), documents not aligned to either.
  const Layouts layouts = {{100, 5, 151, 30, 226}, {16, 16, 300, 1, 179}};
  const Tensor<DocId, 2> ids = packed_ids(layouts);
  const Index len = ids.dimension(1);
  const Index positions = 16, key_tile = 64;
  Masks masks;
  masks.doc_ids = ids;
  test::DenseMasks causal;
  causal.causal = true;
  const detail::TilePlan plan = test::tile_plan(causal, masks, 2, len, len, positions, key_tile);
  for (Index b = 0; b < 2; ++b) {
    for (Index qt = 0; qt < plan.q_tiles(); ++qt) {
      // The tile's keys: from the start of its first query's document to its last query
      // (causal), so only its own documents' key tiles.
      const Index p_first = qt * positions;
      const Index p_last = std::min(len, p_first + positions) - 1;
      Index doc_start = p_first;
      while (doc_start > 0 && ids(b, doc_start - 1) == ids(b, p_first)) --doc_start;
      const std::string where = "b " + std::to_string(b) + " qt " + std::to_string(qt);
      const auto [first, last] = plan.key_tile_range(b, qt);
      EXPECT_EQ(first, doc_start / key_tile) << where;
      EXPECT_EQ(last, p_last / key_tile + 1) << where;
      EXPECT_EQ(plan.key_span(b, qt, first).first, doc_start) << where;
      EXPECT_EQ(plan.key_span(b, qt, last - 1).last, p_last + 1) << where;
      EXPECT_EQ(plan.active_key_tiles(b, qt), last - first) << where;
    }
  }
}

TEST(PackedTilePlan, UnsortedIdsKeepThePositionalKeyTiles) {
  Tensor<DocId, 2> ids = packed_ids({{40, 40, 48}});
  for (Index j = 100; j < 128; ++j) ids(0, j) = 0;  // document 0 resumes: not sorted
  Masks masks;
  masks.doc_ids = ids;
  test::DenseMasks causal;
  causal.causal = true;
  const detail::TilePlan plan = test::tile_plan(causal, masks, 1, 128, 128, 16, 32);
  const detail::TilePlan positional = test::tile_plan(causal, Masks{}, 1, 128, 128, 16, 32);
  for (Index qt = 0; qt < plan.q_tiles(); ++qt) {
    EXPECT_EQ(plan.key_tile_range(0, qt), positional.key_tile_range(0, qt)) << "query tile " << qt;
  }
}

// ---------------------------------------------------------------------------------------
// Packed SDPA.

// Float kernel vs the double reference on single documents: errors are float rounding of
// D-term dot products and softmax sums over <= 300 keys (~1e-7 relative); 1e-5 leaves a
// margin, while a document that saw a neighbour would be off by O(1e-1).
constexpr double kPackedTol = 1e-5;

struct PackedCase {
  std::string name;
  Layouts layouts;
  Index key_tile;  // 0: the kernel's default
};

class PackedSdpa : public ::testing::TestWithParam<PackedCase> {};

TEST_P(PackedSdpa, EachDocumentEqualsItRunAlone) {
  const PackedCase& c = GetParam();
  const Index batch = static_cast<Index>(c.layouts.size());
  const Index len = row_length(c.layouts);
  const Index n_heads = 8, n_kv_heads = 2, head_dim = 32;
  const auto q = test::random_normal<float, 4>({batch, n_heads, len, head_dim}, 21);
  const auto k = test::random_normal<float, 4>({batch, n_kv_heads, len, head_dim}, 22);
  const auto v = test::random_normal<float, 4>({batch, n_kv_heads, len, head_dim}, 23);
  const Tensor<DocId, 2> ids = packed_ids(c.layouts);
  Masks masks;
  masks.doc_ids = ids;
  SdpaOptions options;
  options.causal = true;
  options.path = SdpaPath::kFused;
  for (const Eigen::ThreadPoolDevice* device :
       {static_cast<const Eigen::ThreadPoolDevice*>(nullptr), &test::pool_device(2)}) {
    Sdpa<float> sdpa(options, device);
    sdpa.set_key_tile(c.key_tile);
    const Tensor<float, 4> packed = sdpa(q, k, v, masks);
    SdpaOptions alone_options;
    alone_options.causal = true;
    alone_options.path = SdpaPath::kReference;
    for (Index b = 0; b < batch; ++b) {
      Index start = 0;
      for (const Index doc_len : c.layouts[static_cast<std::size_t>(b)]) {
        const Tensor<float, 4> alone = scaled_dot_product_attention(
            document(q, b, start, doc_len), document(k, b, start, doc_len),
            document(v, b, start, doc_len), alone_options);
        EXPECT_LE(
            test::error_relative_to_scale(document(packed, b, start, doc_len).to_tensor(), alone),
            kPackedTol)
            << "row " << b << " document [" << start << ", " << start + doc_len << ")";
        start += doc_len;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PackedSdpa,
    ::testing::Values(PackedCase{"AlignedToTiles", {{64, 64, 128}}, 0},
                      PackedCase{"NotAligned", {{37, 1, 90, 50, 78}}, 0},
                      PackedCase{"RowsDiffer", {{100, 5, 151}, {16, 16, 224}, {256}}, 0},
                      PackedCase{"ShortDocumentsOddKeyTile", {{3, 7, 2, 30, 1, 1, 20, 64}}, 7},
                      PackedCase{"LongAndShortSmallKeyTile", {{200, 3, 3, 50}, {1, 255}}, 16}),
    [](const ::testing::TestParamInfo<PackedCase>& info) { return info.param.name; });

// The keys' ids differ from the queries' (a chunk on top of cached keys) and are sorted
// in one row, repeated in the other: against the dense double brute force.
TEST(PackedSdpaWithCachedKeys, MatchesDenseReferenceForSortedAndRepeatedIds) {
  const Index q_len = 45, kv_len = 150, n_heads = 8, n_kv_heads = 2, head_dim = 32;
  Tensor<DocId, 2> kv_docs = packed_ids({{30, 2, 70, 48}, {120, 1, 29}});
  for (Index j = 140; j < kv_len; ++j) kv_docs(1, j) = 0;  // document 0 resumes in row 1
  Tensor<DocId, 2> q_docs(2, q_len);
  for (Index b = 0; b < 2; ++b) {
    for (Index i = 0; i < q_len; ++i) q_docs(b, i) = kv_docs(b, kv_len - q_len + i);
  }
  const auto q = test::random_normal<float, 4>({2, n_heads, q_len, head_dim}, 31);
  const auto k = test::random_normal<float, 4>({2, n_kv_heads, kv_len, head_dim}, 32);
  const auto v = test::random_normal<float, 4>({2, n_kv_heads, kv_len, head_dim}, 33);
  test::DenseMasks dense;
  dense.causal = true;
  dense.q_docs = q_docs;
  dense.kv_docs = kv_docs;
  const test::DenseResult expected =
      test::dense_sdpa(test::to_double(q), test::to_double(k), test::to_double(v), dense);
  const Tensor<float, 4> out = scaled_dot_product_attention(
      q, k, v, test::library_options(dense, {}, SdpaPath::kFused), test::library_masks(dense));
  EXPECT_LE(test::error_relative_to_scale(out, expected.out), kPackedTol);
}

// ---------------------------------------------------------------------------------------
// Attention::forward over packed documents, with and without a cache.

// Attention in float vs float: projections over dim = 256 inputs, RoPE tables at other
// angles and the attention sums each add rounding of a few 1e-7 relative; 1e-5 leaves a
// margin while any leak between documents or wrong position is off by > 1e-2.
constexpr double kPackedForwardTol = 1e-5;

class PackedAttention : public ::testing::Test {
 protected:
  static constexpr Index kDim = 256, kHeads = 8, kKvHeadsA = 2, kLen = 200;

  PackedAttention() : attn_(kDim, kHeads, kKvHeadsA), rope_(attn_.head_dim(), 2 * kLen) {
    attn_.reset_parameters(7);
  }

  Attention<float> attn_;
  RotaryEmbedding<float> rope_;
  // Rows differ; documents start mid-chunk for every chunk size tried, one has 1 token.
  const Layouts layouts_ = {{37, 1, 90, 50, 22}, {5, 120, 3, 72}};
  const Tensor<DocId, 2> ids_ = packed_ids(layouts_);
  const Tensor<float, 3> x_ = test::random_normal<float, 3>({2, kLen, kDim}, 41);
};

TEST_F(PackedAttention, EachDocumentEqualsItRunAlone) {
  const Tensor<float, 3> packed = attn_.forward(x_, rope_, 0, nullptr, ids_);
  for (Index b = 0; b < 2; ++b) {
    Index start = 0;
    for (const Index doc_len : layouts_[static_cast<std::size_t>(b)]) {
      // Alone, the document starts at position 0: RoPE scores depend only on distances.
      const Tensor<float, 3> alone = attn_.forward(document(x_, b, start, doc_len), rope_, 0);
      EXPECT_LE(
          test::error_relative_to_scale(document(packed, b, start, doc_len).to_tensor(), alone),
          kPackedForwardTol)
          << "row " << b << " document [" << start << ", " << start + doc_len << ")";
      start += doc_len;
    }
  }
}

TEST_F(PackedAttention, ChunkedPrefillThroughACacheWithRecordedIdsEqualsOneShot) {
  const Tensor<float, 3> one_shot = attn_.forward(x_, rope_, 0, nullptr, ids_);
  for (const Index chunk : {Index{1}, Index{3}, Index{64}, Index{100}}) {
    KVCache<float> cache(2, kLen, kKvHeadsA, attn_.head_dim(), /*record_doc_ids=*/true);
    Tensor<float, 3> chunked(2, kLen, kDim);
    for (Index start = 0; start < kLen; start += chunk) {
      const Index len = std::min(chunk, kLen - start);
      const ConstView<DocId, 2> chunk_ids = ConstView<DocId, 2>(ids_).narrow(1, start, len);
      const Tensor<float, 3> out = attn_.forward(ConstView<float, 3>(x_).narrow(1, start, len),
                                                 rope_, start, &cache, chunk_ids);
      for (Index b = 0; b < 2; ++b) {
        for (Index s = 0; s < len; ++s) {
          for (Index d = 0; d < kDim; ++d) chunked(b, start + s, d) = out(b, s, d);
        }
      }
    }
    EXPECT_EQ(cache.seq_len(), kLen);
    EXPECT_TRUE(test::bitwise_equal(cache.doc_ids().to_tensor(), ids_));
    EXPECT_LE(test::error_relative_to_scale(chunked, one_shot), kPackedForwardTol)
        << "chunk " << chunk;
  }
}

// Rejections happen before the cache is touched: ids included.
TEST_F(PackedAttention, DocIdsWithACacheAreValidatedBeforeTheCacheIsTouched) {
  KVCache<float> recording(2, kLen, kKvHeadsA, attn_.head_dim(), /*record_doc_ids=*/true);
  attn_.forward(ConstView<float, 3>(x_).narrow(1, 0, 10), rope_, 0, &recording,
                ConstView<DocId, 2>(ids_).narrow(1, 0, 10));
  const ConstView<float, 3> x = ConstView<float, 3>(x_).narrow(1, 10, 4);
  const ConstView<DocId, 2> ids = ConstView<DocId, 2>(ids_).narrow(1, 10, 4);
  const auto expect_invalid = [&](KVCache<float>& cache, auto&& call,
                                  const std::vector<std::string>& fragments) {
    test::expect_rejected<std::invalid_argument>(cache, call, fragments);
  };
  // Ids of the wrong shape, or none although the cache records them.
  expect_invalid(
      recording,
      [&] { attn_.forward(x, rope_, 10, &recording, ConstView<DocId, 2>(ids_).narrow(1, 10, 5)); },
      {"Attention::forward: doc_ids has shape (2, 5)", "(B, Sq) = (2, 4)"});
  expect_invalid(recording, [&] { attn_.forward(x, rope_, 10, &recording); },
                 {"Attention::forward: kv_cache records document ids", "(B, S) = (2, 4)"});
  // A padding mask that only covers the new keys.
  const Tensor<bool, 2> only_new(2, 4);
  expect_invalid(recording, [&] { attn_.forward(x, rope_, 10, &recording, ids, only_new); },
                 {"key_padding_mask has shape (2, 4)", "(B, Skv) = (2, 14)"});
  // Overflow through forward.
  KVCache<float> small(2, 12, kKvHeadsA, attn_.head_dim(), /*record_doc_ids=*/true);
  const Tensor<float, 4> cached =
      test::random_normal<float, 4>({2, kKvHeadsA, 10, attn_.head_dim()}, 42);
  small.update(cached, cached, ConstView<DocId, 2>(ids_).narrow(1, 0, 10));
  test::expect_rejected<std::length_error>(small, [&] { attn_.forward(x, rope_, 10, &small, ids); },
                                           {"10 cached + 4 new positions exceed max_seq_len 12"});
  // A cache that does not record ids keeps rejecting doc_ids (docs/design.md), as before.
  KVCache<float> plain(2, kLen, kKvHeadsA, attn_.head_dim());
  expect_invalid(plain, [&] { attn_.forward(x, rope_, 0, &plain, ids); },
                 {"doc_ids (2, 4)", "kv_cache", "record_doc_ids"});
  // The recording cache still works after the rejections.
  EXPECT_NO_THROW(attn_.forward(x, rope_, 10, &recording, ids));
  EXPECT_EQ(recording.seq_len(), 14);
}

}  // namespace
}  // namespace attnforge
