// Tests of mask.hpp: which (query, key) pairs causal (bottom-right), sliding window,
// doc_ids and key padding allow, checked against hand-written matrices both in
// detail::BatchMask and through the probabilities of attention_weights; and the
// validation of the mask inputs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "attnforge/mask.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

using Pattern = std::vector<std::string>;  // one string per query row, '1' = allowed

struct MaskSetup {
  Index q_len = 0, kv_len = 0;
  bool causal = false;
  Index window = 0;
  std::vector<DocId> q_docs, kv_docs;  // empty: none
  std::vector<bool> key_padding;       // empty: none
};

Tensor<DocId, 2> ids_tensor(const std::vector<DocId>& ids) {
  Tensor<DocId, 2> t(1, static_cast<Index>(ids.size()));
  for (std::size_t j = 0; j < ids.size(); ++j) t(0, static_cast<Index>(j)) = ids[j];
  return t;
}

test::DenseMasks dense_masks(const MaskSetup& s) {
  test::DenseMasks m;
  m.causal = s.causal;
  m.window = s.window;
  if (!s.q_docs.empty()) m.q_docs = ids_tensor(s.q_docs);
  if (!s.kv_docs.empty()) m.kv_docs = ids_tensor(s.kv_docs);
  if (!s.key_padding.empty()) {
    Tensor<bool, 2> pad(1, static_cast<Index>(s.key_padding.size()));
    for (std::size_t j = 0; j < s.key_padding.size(); ++j) {
      pad(0, static_cast<Index>(j)) = s.key_padding[j];
    }
    m.key_padding = pad;
  }
  return m;
}

// The library's BatchMask for batch row 0, written out as a pattern.
Pattern batch_mask_pattern(const MaskSetup& s) {
  const test::DenseMasks m = dense_masks(s);
  const Masks masks = test::library_masks(m);
  const detail::BatchMask mask =
      detail::MaskPolicy(detail::MaskRules{s.causal, s.window}, masks, 1, 1, s.q_len, s.kv_len).row(0);
  Pattern p;
  for (Index i = 0; i < s.q_len; ++i) {
    std::string row;
    for (Index j = 0; j < s.kv_len; ++j) row += mask.allowed(i, j) ? '1' : '0';
    p.push_back(row);
  }
  return p;
}

// Which probabilities of attention_weights are non-zero, for every head; all heads of
// the single batch row must agree. Rows must sum to 1 (or be all 0 when empty).
Pattern weights_pattern(const MaskSetup& s) {
  const test::DenseMasks m = dense_masks(s);
  constexpr Index kHeads = 2, kHeadDim = 8;
  // Moderate scores (|s| < ~3), so no allowed probability underflows to 0.
  const Tensor<float, 4> q = test::random_uniform<float, 4>({1, kHeads, s.q_len, kHeadDim}, 1);
  const Tensor<float, 4> k = test::random_uniform<float, 4>({1, 1, s.kv_len, kHeadDim}, 2);
  const Tensor<float, 4> probs =
      attention_weights(q, k, test::library_options(m, {}), test::library_masks(m));
  Pattern first;
  for (Index h = 0; h < kHeads; ++h) {
    Pattern p;
    for (Index i = 0; i < s.q_len; ++i) {
      std::string row;
      double sum = 0.0;
      for (Index j = 0; j < s.kv_len; ++j) {
        row += probs(0, h, i, j) != 0.0f ? '1' : '0';
        sum += probs(0, h, i, j);
      }
      if (row.find('1') != std::string::npos) {
        EXPECT_NEAR(sum, 1.0, 1e-6) << "row " << i;  // float probabilities, Skv terms
      }
      p.push_back(row);
    }
    if (h == 0) first = p;
    EXPECT_EQ(p, first) << "head " << h;
  }
  return first;
}

// The independent dense matrix from docs/design.md's formulas (test_util.hpp).
Pattern dense_pattern(const MaskSetup& s) {
  const auto allowed = test::dense_allowed(dense_masks(s), 0, s.q_len, s.kv_len);
  Pattern p;
  for (const auto& r : allowed) {
    std::string row;
    for (bool a : r) row += a ? '1' : '0';
    p.push_back(row);
  }
  return p;
}

void expect_pattern(const MaskSetup& s, const Pattern& expected) {
  EXPECT_EQ(batch_mask_pattern(s), expected) << "detail::BatchMask::allowed";
  EXPECT_EQ(weights_pattern(s), expected) << "attention_weights";
  EXPECT_EQ(dense_pattern(s), expected) << "test brute force (self-check)";
}

TEST(DocMask, PackedDocs0011CausalAllowsOnlySameDocumentPairsAtOrBeforeTheQuery) {
  expect_pattern({4, 4, true, 0, {0, 0, 1, 1}, {}, {}}, {"1000", "1100", "0010", "0011"});
}

TEST(DocMask, PackedDocs0011NonCausalAllowsWholeDocumentBlocks) {
  expect_pattern({4, 4, false, 0, {0, 0, 1, 1}, {}, {}}, {"1100", "1100", "0011", "0011"});
}

TEST(DocMask, PackedDocs0112CausalAllowsOnlySameDocumentPairsAtOrBeforeTheQuery) {
  expect_pattern({4, 4, true, 0, {0, 1, 1, 2}, {}, {}}, {"1000", "0100", "0110", "0001"});
}

TEST(DocMask, PackedDocs0112NonCausalAllowsWholeDocumentBlocks) {
  expect_pattern({4, 4, false, 0, {0, 1, 1, 2}, {}, {}}, {"1000", "0110", "0110", "0001"});
}

TEST(DocMask, UnsortedRepeatedIdsAllowEqualIdsWhereverTheyAre) {
  // Documents need not be contiguous: id 0 at positions 0 and 3.
  expect_pattern({4, 4, true, 0, {0, 1, 1, 0}, {}, {}}, {"1000", "0100", "0110", "1001"});
}

TEST(DocMask, KvDocIdsWithACacheCompareQueryIdsToCachedKeyIds) {
  // Two new tokens (positions 3 and 4) of document 1 on top of a cache of 3 tokens.
  expect_pattern({2, 5, true, 0, {1, 1}, {0, 0, 1, 1, 1}, {}}, {"00110", "00111"});
}

TEST(DocMask, SingleDocumentDocMaskEqualsCausal) {
  constexpr Index kS = 9, kH = 4, kKvH = 2, kD = 16;
  const Tensor<float, 4> q = test::random_normal<float, 4>({2, kH, kS, kD}, 3);
  const Tensor<float, 4> k = test::random_normal<float, 4>({2, kKvH, kS, kD}, 4);
  const Tensor<float, 4> v = test::random_normal<float, 4>({2, kKvH, kS, kD}, 5);
  Tensor<DocId, 2> one_doc(2, kS);
  one_doc.setConstant(7);
  Masks docs;
  docs.doc_ids = one_doc;
  SdpaOptions causal;
  causal.causal = true;
  const Tensor<float, 4> with_docs = scaled_dot_product_attention(q, k, v, causal, docs);
  const Tensor<float, 4> causal_only = scaled_dot_product_attention(q, k, v, causal);
  EXPECT_TRUE(test::bitwise_equal(with_docs, causal_only));
  EXPECT_TRUE(
      test::bitwise_equal(attention_weights(q, k, causal, docs), attention_weights(q, k, causal)));
  // And causal is really in effect (the unmasked result differs).
  EXPECT_GT(test::max_abs_diff(causal_only, scaled_dot_product_attention(q, k, v)), 1e-3);
  expect_pattern({4, 4, true, 0, {3, 3, 3, 3}, {}, {}}, {"1000", "1100", "1110", "1111"});
}

TEST(CausalMask, SquareCausalIsTheLowerTriangle) {
  expect_pattern({4, 4, true, 0, {}, {}, {}}, {"1000", "1100", "1110", "1111"});
}

TEST(CausalMask, DecodeStepSeesEveryCachedKey) {
  // Bottom-right alignment: a single query at position Skv - 1 sees all Skv keys.
  expect_pattern({1, 6, true, 0, {}, {}, {}}, {"111111"});
}

TEST(CausalMask, ChunkOnTopOfCacheIsBottomRightAligned) {
  // Queries at positions 5, 6, 7 of 8 keys; top-left alignment would give 100.., 110..
  expect_pattern({3, 8, true, 0, {}, {}, {}}, {"11111100", "11111110", "11111111"});
}

TEST(CausalMask, NonCausalWithoutMasksAllowsEverything) {
  expect_pattern({2, 3, false, 0, {}, {}, {}}, {"111", "111"});
}

TEST(WindowMask, CausalWindowKeepsTheLastWKeys) {
  expect_pattern({5, 5, true, 2, {}, {}, {}}, {"10000", "11000", "01100", "00110", "00011"});
  expect_pattern({3, 3, true, 1, {}, {}, {}}, {"100", "010", "001"});
}

TEST(WindowMask, NonCausalWindowBoundsOnlyHowFarBackAKeyMayBe) {
  // docs/design.md: pos(i) - j < W; keys after the query stay allowed without causal.
  expect_pattern({4, 4, false, 2, {}, {}, {}}, {"1111", "1111", "0111", "0011"});
}

TEST(WindowMask, WindowIsMeasuredFromTheBottomRightAlignedPosition) {
  // Queries at positions 4 and 5 of 6 keys, window 3.
  expect_pattern({2, 6, true, 3, {}, {}, {}}, {"001110", "000111"});
}

TEST(PaddingMask, PaddedKeysAreExcludedForEveryQuery) {
  expect_pattern({3, 5, false, 0, {}, {}, {true, false, true, true, false}},
                 {"10110", "10110", "10110"});
  expect_pattern({3, 5, true, 0, {}, {}, {true, false, true, true, false}},
                 {"10100", "10110", "10110"});
}

TEST(PaddingMask, RowWhoseKeysAreAllPaddedAllowsNothing) {
  expect_pattern({3, 3, true, 0, {}, {}, {false, true, true}}, {"000", "010", "011"});
}

TEST(MaskRules, AllRulesCombineAsAConjunction) {
  expect_pattern(
      {4, 6, true, 3, {0, 1, 1, 1}, {0, 1, 0, 1, 1, 1}, {true, true, true, false, true, true}},
      {"101000", "010000", "000010", "000011"});
}

TEST(MaskRules, BatchMaskAgreesWithTheDenseSpecMatrixOnRandomMasks) {
  std::mt19937 gen(6);
  for (int trial = 0; trial < 200; ++trial) {
    MaskSetup s;
    s.kv_len = 1 + static_cast<Index>(gen() % 12);
    s.q_len = 1 + static_cast<Index>(gen() % s.kv_len);
    s.causal = gen() % 2 == 0;
    s.window = static_cast<Index>(gen() % 5);
    if (gen() % 2 == 0) {
      for (Index i = 0; i < s.kv_len; ++i) s.kv_docs.push_back(static_cast<DocId>(gen() % 3));
      if (s.q_len == s.kv_len && gen() % 2 == 0) {
        s.q_docs = s.kv_docs;
        s.kv_docs.clear();
      } else {
        for (Index i = 0; i < s.q_len; ++i) s.q_docs.push_back(static_cast<DocId>(gen() % 3));
      }
    }
    if (gen() % 2 == 0) {
      for (Index j = 0; j < s.kv_len; ++j) s.key_padding.push_back(gen() % 4 != 0);
    }
    EXPECT_EQ(batch_mask_pattern(s), dense_pattern(s)) << "trial " << trial;
  }
}

// ---- Tile classification (detail::TilePlan): what lets the fast kernel skip work. ----

detail::TilePlan tile_plan(const MaskSetup& s, const test::DenseMasks& m, Index q_tile,
                           Index key_tile) {
  return test::tile_plan(m, test::library_masks(m), 1, s.q_len, s.kv_len, q_tile, key_tile);
}

TEST(TilePlan, NeverSkipsAnAllowedPairNorCallsATileWithAMaskedPairFull) {
  std::mt19937 gen(7);
  for (int trial = 0; trial < 300; ++trial) {
    MaskSetup s;
    s.kv_len = 1 + static_cast<Index>(gen() % 40);
    s.q_len = 1 + static_cast<Index>(gen() % s.kv_len);
    s.causal = gen() % 2 == 0;
    s.window = gen() % 3 == 0 ? 1 + static_cast<Index>(gen() % 9) : 0;
    const int doc_kind = static_cast<int>(gen() % 3);  // none, packed, random
    if (doc_kind != 0) {
      DocId doc = 0;
      for (Index j = 0; j < s.kv_len; ++j) {
        if (doc_kind == 1 && gen() % 6 == 0) ++doc;
        s.kv_docs.push_back(doc_kind == 1 ? doc : static_cast<DocId>(gen() % 3));
      }
      for (Index i = 0; i < s.q_len; ++i) s.q_docs.push_back(s.kv_docs[s.kv_len - s.q_len + i]);
    }
    if (gen() % 2 == 0) {
      for (Index j = 0; j < s.kv_len; ++j) s.key_padding.push_back(gen() % 3 != 0 && j % 7 != 3);
    }
    const Index q_tile = 1 + static_cast<Index>(gen() % 9);
    const Index key_tile = 1 + static_cast<Index>(gen() % 9);
    const test::DenseMasks m = dense_masks(s);
    const auto allowed = test::dense_allowed(m, 0, s.q_len, s.kv_len);
    const detail::TilePlan plan = tile_plan(s, m, q_tile, key_tile);
    ASSERT_EQ(plan.q_tiles(), (s.q_len + q_tile - 1) / q_tile);
    ASSERT_EQ(plan.key_tiles(), (s.kv_len + key_tile - 1) / key_tile);
    for (Index qt = 0; qt < plan.q_tiles(); ++qt) {
      const auto [first, last] = plan.key_tile_range(0, qt);
      for (Index kt = 0; kt < plan.key_tiles(); ++kt) {
        bool any = false, all = true;
        for (Index i = qt * q_tile; i < std::min(s.q_len, (qt + 1) * q_tile); ++i) {
          for (Index j = kt * key_tile; j < std::min(s.kv_len, (kt + 1) * key_tile); ++j) {
            const bool a = allowed[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)];
            any |= a;
            all &= a;
          }
        }
        const bool in_range = first <= kt && kt < last;
        const detail::TileClass cls =
            in_range ? plan.classify(0, qt, kt) : detail::TileClass::kEmpty;
        if (any) {
          EXPECT_NE(cls, detail::TileClass::kEmpty)
              << "trial " << trial << " tile " << qt << "," << kt;
        }
        if (cls == detail::TileClass::kFull) {
          EXPECT_TRUE(all) << "trial " << trial << " tile " << qt << "," << kt;
        }
      }
    }
  }
}

TEST(TilePlan, DocMaskSkipsTilesOutsideTheDiagonalBlocks) {
  // Three packed documents of 8 tokens, causal, tiles of 4 queries x 4 keys: query tile qt
  // lies in document qt / 2 and needs only the key tiles of its own document up to itself.
  MaskSetup s{24, 24, true, 0, {}, {}, {}};
  for (Index j = 0; j < 24; ++j) s.q_docs.push_back(j / 8);
  const test::DenseMasks m = dense_masks(s);
  const detail::TilePlan plan = tile_plan(s, m, 4, 4);
  using detail::TileClass;
  for (Index qt = 0; qt < 6; ++qt) {
    const auto [first, last] = plan.key_tile_range(0, qt);
    EXPECT_EQ(last, qt + 1) << "causal: no key tile after the diagonal";
    for (Index kt = first; kt < last; ++kt) {
      const TileClass expected = kt / 2 != qt / 2 ? TileClass::kEmpty
                                 : kt == qt       ? TileClass::kPartial
                                                  : TileClass::kFull;
      EXPECT_EQ(plan.classify(0, qt, kt), expected) << "tile " << qt << "," << kt;
    }
    EXPECT_EQ(plan.active_key_tiles(0, qt), qt % 2 + 1) << "query tile " << qt;
  }
}

TEST(TilePlan, CausalChunkOnTopOfCacheKeepsEveryEarlierKeyTileFull) {
  // 4 queries at positions 8..11 of 12 keys, tiles of 4: key tiles 0 and 1 are entirely
  // visible, key tile 2 is the diagonal.
  MaskSetup s{4, 12, true, 0, {}, {}, {}};
  const test::DenseMasks m = dense_masks(s);
  const detail::TilePlan plan = tile_plan(s, m, 4, 4);
  const auto [first, last] = plan.key_tile_range(0, 0);
  EXPECT_EQ(first, 0);
  EXPECT_EQ(last, 3);
  EXPECT_EQ(plan.classify(0, 0, 0), detail::TileClass::kFull);
  EXPECT_EQ(plan.classify(0, 0, 1), detail::TileClass::kFull);
  EXPECT_EQ(plan.classify(0, 0, 2), detail::TileClass::kPartial);
}

TEST(TilePlan, WindowSkipsKeyTilesTooFarBack) {
  // Causal window 4 over 16 tokens, tiles of 4: query tile 3 (positions 12..15) needs keys
  // 9..15, i.e. key tiles 2 and 3 only.
  MaskSetup s{16, 16, true, 4, {}, {}, {}};
  const test::DenseMasks m = dense_masks(s);
  const detail::TilePlan plan = tile_plan(s, m, 4, 4);
  const auto [first, last] = plan.key_tile_range(0, 3);
  EXPECT_EQ(first, 2);
  EXPECT_EQ(last, 4);
  EXPECT_EQ(plan.active_key_tiles(0, 3), 2);
}

// ---- Validation of the mask inputs (through the public entry point). ----

class MaskValidation : public ::testing::Test {
 protected:
  void expect_rejected(const SdpaOptions& options, const Masks& masks, Index q_len, Index kv_len,
                       const std::vector<const char*>& fragments) {
    const Tensor<float, 4> q(2, 2, q_len, 4);
    const Tensor<float, 4> kv(2, 1, kv_len, 4);
    std::vector<std::string> expected{"scaled_dot_product_attention: "};
    expected.insert(expected.end(), fragments.begin(), fragments.end());
    test::expect_invalid([&] { scaled_dot_product_attention(q, kv, kv, options, masks); },
                         expected);
  }
};

TEST_F(MaskValidation, DocIdsOfWrongShapeAreRejectedWithTheirShape) {
  const Tensor<DocId, 2> wrong_len(2, 6), wrong_batch(3, 5);
  Masks masks;
  masks.doc_ids = wrong_len;
  expect_rejected({}, masks, 5, 5, {"doc_ids has shape (2, 6)", "(B, Sq) = (2, 5)"});
  masks.doc_ids = wrong_batch;
  expect_rejected({}, masks, 5, 5, {"doc_ids has shape (3, 5)", "(B, Sq) = (2, 5)"});
}

TEST_F(MaskValidation, KvDocIdsOfWrongShapeAreRejectedWithTheirShape) {
  const Tensor<DocId, 2> q_ids(2, 3), kv_ids(2, 7);
  Masks masks;
  masks.doc_ids = q_ids;
  masks.kv_doc_ids = kv_ids;
  expect_rejected({}, masks, 3, 8, {"kv_doc_ids has shape (2, 7)", "(B, Skv) = (2, 8)"});
}

TEST_F(MaskValidation, QueryDocIdsAloneNeedSqEqualSkv) {
  const Tensor<DocId, 2> q_ids(2, 3);
  Masks masks;
  masks.doc_ids = q_ids;
  expect_rejected({}, masks, 3, 8, {"doc_ids (2, 3)", "kv_doc_ids"});
}

TEST_F(MaskValidation, KvDocIdsWithoutQueryDocIdsAreRejected) {
  const Tensor<DocId, 2> kv_ids(2, 5);
  Masks masks;
  masks.kv_doc_ids = kv_ids;
  expect_rejected({}, masks, 5, 5, {"kv_doc_ids (2, 5)", "without doc_ids"});
}

TEST_F(MaskValidation, KeyPaddingMaskOfWrongShapeIsRejectedWithItsShape) {
  const Tensor<bool, 2> short_pad(2, 4), wrong_batch(1, 5);
  Masks masks;
  masks.key_padding_mask = short_pad;
  expect_rejected({}, masks, 3, 5, {"key_padding_mask has shape (2, 4)", "(B, Skv) = (2, 5)"});
  masks.key_padding_mask = wrong_batch;
  expect_rejected({}, masks, 3, 5, {"key_padding_mask has shape (1, 5)"});
}

TEST_F(MaskValidation, CausalWithMoreQueriesThanKeysIsRejected) {
  SdpaOptions options;
  options.causal = true;
  expect_rejected(options, {}, 6, 4, {"causal", "Sq 6", "Skv 4"});
}

TEST_F(MaskValidation, NegativeWindowIsRejected) {
  SdpaOptions options;
  options.window = -3;
  expect_rejected(options, {}, 4, 4, {"window", "-3"});
}

}  // namespace
}  // namespace attnforge
