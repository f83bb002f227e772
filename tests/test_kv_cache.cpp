// Tests of kv_cache.hpp: storage, appending updates that return views (no copy), reset,
// and rejected updates that leave the cache exactly as it was; recorded document ids.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "attnforge/kv_cache.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

constexpr Index kBatch = 2, kMaxLen = 10, kKvHeads = 3, kHeadDim = 4;

Tensor<float, 4> new_entries(Index len, std::uint32_t seed) {
  return test::random_normal<float, 4>({kBatch, kKvHeads, len, kHeadDim}, seed);
}

// Appends len random positions (keys from seed_k, values from seed_v). The entries are
// named tensors: a view, and so KVCache::update, never binds to a temporary.
KVPrefix<float> append_random(KVCache<float>& cache, Index len, std::uint32_t seed_k,
                              std::uint32_t seed_v) {
  const Tensor<float, 4> k = new_entries(len, seed_k), v = new_entries(len, seed_v);
  return cache.update(k, v);
}
// The same with recorded document ids.
KVPrefix<float> append_random(KVCache<float>& cache, Index len, std::uint32_t seed_k,
                              std::uint32_t seed_v, const Tensor<DocId, 2>& ids) {
  const Tensor<float, 4> k = new_entries(len, seed_k), v = new_entries(len, seed_v);
  return cache.update(k, v, ids);
}

// The whole observable state of a cache: seq_len and every byte of both buffers.
TEST(KVCache, StartsEmptyWithZeroFilledStorageOfTheRequestedShape) {
  const KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  EXPECT_EQ(cache.seq_len(), 0);
  EXPECT_EQ(cache.batch_size(), kBatch);
  EXPECT_EQ(cache.max_seq_len(), kMaxLen);
  EXPECT_EQ(cache.n_kv_heads(), kKvHeads);
  EXPECT_EQ(cache.head_dim(), kHeadDim);
  // Storage is (B, Hkv, max_seq_len, D), as in KempnerForge.
  const auto& keys = cache.key_storage();
  EXPECT_EQ(keys.dimension(0), kBatch);
  EXPECT_EQ(keys.dimension(1), kKvHeads);
  EXPECT_EQ(keys.dimension(2), kMaxLen);
  EXPECT_EQ(keys.dimension(3), kHeadDim);
  EXPECT_EQ(test::max_abs(cache.key_storage()), 0.0);
  EXPECT_EQ(test::max_abs(cache.value_storage()), 0.0);
  EXPECT_EQ(cache.prefix().keys.dimension(2), 0);
}

TEST(KVCache, UpdateReturnsViewsIntoTheCacheStorage) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  const Tensor<float, 4> k = new_entries(3, 1), v = new_entries(3, 2);
  const KVPrefix<float> prefix = cache.update(k, v);
  EXPECT_EQ(cache.seq_len(), 3);
  EXPECT_EQ(prefix.keys.dimensions(), (std::array<Index, 4>{kBatch, kKvHeads, 3, kHeadDim}));
  EXPECT_EQ(prefix.values.dimensions(), (std::array<Index, 4>{kBatch, kKvHeads, 3, kHeadDim}));
  // No copy: the views address the storage with its own strides.
  const std::array<Index, 4> storage_strides{kKvHeads * kMaxLen * kHeadDim, kMaxLen * kHeadDim,
                                             kHeadDim, 1};
  EXPECT_EQ(prefix.keys.data(), cache.key_storage().data());
  EXPECT_EQ(prefix.values.data(), cache.value_storage().data());
  EXPECT_EQ(prefix.keys.strides(), storage_strides);
  EXPECT_EQ(prefix.values.strides(), storage_strides);
  EXPECT_TRUE(test::bitwise_equal(prefix.keys.to_tensor(), k));
  EXPECT_TRUE(test::bitwise_equal(prefix.values.to_tensor(), v));
  // Positions past seq_len are still zero.
  for (Index b = 0; b < kBatch; ++b) {
    for (Index h = 0; h < kKvHeads; ++h) {
      for (Index s = 3; s < kMaxLen; ++s) {
        for (Index d = 0; d < kHeadDim; ++d) EXPECT_EQ(cache.key_storage()(b, h, s, d), 0.0f);
      }
    }
  }
}

TEST(KVCache, SuccessiveUpdatesAppendAtSeqLenAndEarlierViewsStayValid) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  const Tensor<float, 4> k1 = new_entries(4, 3), v1 = new_entries(4, 4);
  const Tensor<float, 4> k2 = new_entries(1, 5), v2 = new_entries(1, 6);
  const Tensor<float, 4> k3 = new_entries(5, 7), v3 = new_entries(5, 8);
  const KVPrefix<float> first = cache.update(k1, v1);
  cache.update(k2, v2);
  const KVPrefix<float> all = cache.update(k3, v3);  // fills max_seq_len exactly
  EXPECT_EQ(cache.seq_len(), 10);
  EXPECT_EQ(all.keys.dimension(2), 10);
  EXPECT_EQ(all.keys.data(), first.keys.data());
  EXPECT_TRUE(test::bitwise_equal(first.keys.to_tensor(), k1));
  for (Index b = 0; b < kBatch; ++b) {
    for (Index h = 0; h < kKvHeads; ++h) {
      for (Index d = 0; d < kHeadDim; ++d) {
        for (Index s = 0; s < 4; ++s) {
          EXPECT_EQ(all.keys(b, h, s, d), k1(b, h, s, d));
          EXPECT_EQ(all.values(b, h, s, d), v1(b, h, s, d));
        }
        EXPECT_EQ(all.keys(b, h, 4, d), k2(b, h, 0, d));
        EXPECT_EQ(all.values(b, h, 4, d), v2(b, h, 0, d));
        for (Index s = 0; s < 5; ++s) {
          EXPECT_EQ(all.keys(b, h, 5 + s, d), k3(b, h, s, d));
          EXPECT_EQ(all.values(b, h, 5 + s, d), v3(b, h, s, d));
        }
      }
    }
  }
}

TEST(KVCache, UpdateAcceptsStridedInputsSuchAsTransposedProjections) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  // (B, S, Hkv, D) projection buffers seen as (B, Hkv, S, D).
  Tensor<float, 4> k_bshd = test::random_normal<float, 4>({kBatch, 3, kKvHeads, kHeadDim}, 9);
  Tensor<float, 4> v_bshd = test::random_normal<float, 4>({kBatch, 3, kKvHeads, kHeadDim}, 10);
  const ConstView<float, 4> k = ConstView<float, 4>(k_bshd).transpose(1, 2);
  const ConstView<float, 4> v = ConstView<float, 4>(v_bshd).transpose(1, 2);
  const KVPrefix<float> prefix = cache.update(k, v);
  EXPECT_TRUE(test::bitwise_equal(prefix.keys.to_tensor(), k.to_tensor()));
  EXPECT_TRUE(test::bitwise_equal(prefix.values.to_tensor(), v.to_tensor()));
}

TEST(KVCache, ResetEmptiesTheCacheAndKeepsItsStorage) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  append_random(cache, 6, 11, 12);
  const float* storage = cache.key_storage().data();
  cache.reset();
  EXPECT_EQ(cache.seq_len(), 0);
  EXPECT_EQ(cache.key_storage().data(), storage);
  const Tensor<float, 4> k = new_entries(2, 13), v = new_entries(2, 14);
  const KVPrefix<float> prefix = cache.update(k, v);  // writes at position 0 again
  EXPECT_EQ(cache.seq_len(), 2);
  EXPECT_EQ(prefix.keys.data(), storage);
  EXPECT_TRUE(test::bitwise_equal(prefix.keys.to_tensor(), k));
  EXPECT_TRUE(test::bitwise_equal(prefix.values.to_tensor(), v));
  // The full capacity is available again.
  EXPECT_NO_THROW(append_random(cache, 8, 15, 16));
}

TEST(KVCache, TruncateDropsTheTailAndTheNextUpdateOverwritesIt) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  const Tensor<float, 4> k1 = new_entries(4, 32), v1 = new_entries(4, 33);
  cache.update(k1, v1);
  append_random(cache, 3, 34, 35);  // e.g. rejected draft tokens
  cache.truncate(4);
  EXPECT_EQ(cache.seq_len(), 4);
  EXPECT_TRUE(test::bitwise_equal(cache.prefix().keys.to_tensor(), k1));
  const Tensor<float, 4> k2 = new_entries(2, 36), v2 = new_entries(2, 37);
  const KVPrefix<float> prefix = cache.update(k2, v2);
  EXPECT_EQ(prefix.keys.dimension(2), 6);
  for (Index b = 0; b < kBatch; ++b) {
    for (Index h = 0; h < kKvHeads; ++h) {
      for (Index d = 0; d < kHeadDim; ++d) {
        EXPECT_EQ(prefix.keys(b, h, 4, d), k2(b, h, 0, d));
        EXPECT_EQ(prefix.values(b, h, 5, d), v2(b, h, 1, d));
      }
    }
  }
}

TEST(KVCache, TruncateOutsideTheCachedLengthIsRejectedAndLeavesTheCacheUnchanged) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  append_random(cache, 3, 38, 39);
  for (Index bad : {Index{-1}, Index{4}}) {
    test::expect_rejected<std::invalid_argument>(
        cache, [&] { cache.truncate(bad); }, {"KVCache::truncate: seq_len " + std::to_string(bad)});
  }
}

TEST(KVCache, OverflowThrowsLengthErrorAndLeavesTheCacheUnchanged) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  append_random(cache, 7, 17, 18);
  test::expect_rejected<std::length_error>(
      cache, [&] { append_random(cache, 4, 19, 20); },  // 7 + 4 > 10
      {"KVCache::update", "max_seq_len 10"});
  EXPECT_NO_THROW(append_random(cache, 3, 21, 22));  // 7 + 3 fits
}

TEST(KVCache, BadShapesThrowInvalidArgumentNamingTheArgumentAndLeaveTheCacheUnchanged) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  append_random(cache, 2, 23, 24);
  const Tensor<float, 4> good = new_entries(2, 25);
  struct Case {
    Tensor<float, 4> k, v;
    const char* fragment;
  };
  const Case cases[] = {
      {test::random_normal<float, 4>({3, kKvHeads, 2, kHeadDim}, 26), good,
       "k_new has shape (3, 3, 2, 4)"},
      {test::random_normal<float, 4>({kBatch, 2, 2, kHeadDim}, 27), good,
       "k_new has shape (2, 2, 2, 4)"},
      {test::random_normal<float, 4>({kBatch, kKvHeads, 2, 6}, 28), good,
       "k_new has shape (2, 3, 2, 6)"},
      {good, test::random_normal<float, 4>({kBatch, kKvHeads, 2, 5}, 29),
       "v_new has shape (2, 3, 2, 5)"},
      {good, test::random_normal<float, 4>({kBatch, 4, 2, kHeadDim}, 30),
       "v_new has shape (2, 4, 2, 4)"},
      {good, new_entries(3, 31), "v_new has shape (2, 3, 3, 4)"},
  };
  for (const Case& c : cases) {
    test::expect_rejected<std::invalid_argument>(cache, [&] { cache.update(c.k, c.v); },
                                                 {"KVCache::update", c.fragment});
  }
}

TEST(KVCache, ConstructorRejectsNonPositiveSizes) {
  EXPECT_THROW(KVCache<float>(0, 4, 2, 8), std::invalid_argument);
  EXPECT_THROW(KVCache<float>(1, 0, 2, 8), std::invalid_argument);
  EXPECT_THROW(KVCache<float>(1, 4, -2, 8), std::invalid_argument);
  test::expect_invalid([] { KVCache<float>(1, 4, 2, 0); }, {"head_dim 0"});
}

TEST(KVCache, DoubleCacheStoresExactValues) {
  KVCache<double> cache(1, 4, 1, 2);
  Tensor<double, 4> k(1, 1, 2, 2), v(1, 1, 2, 2);
  k.setValues({{{{1.0 / 3.0, 2.0}, {3.0, 4.0}}}});
  v.setValues({{{{5.0, 6.0}, {7.0, 1e-300}}}});
  const KVPrefix<double> prefix = cache.update(k, v);
  EXPECT_EQ(prefix.keys(0, 0, 0, 0), 1.0 / 3.0);
  EXPECT_EQ(prefix.values(0, 0, 1, 1), 1e-300);
}

// ---------------------------------------------------------------------------------------
// Recorded document ids (KVCache(..., record_doc_ids = true)).

// Document ids of len new positions: row b gets first + 100 b, two positions per id.
Tensor<DocId, 2> new_ids(Index len, DocId first) {
  Tensor<DocId, 2> ids(kBatch, len);
  for (Index b = 0; b < kBatch; ++b) {
    for (Index i = 0; i < len; ++i) ids(b, i) = first + b * 100 + i / 2;
  }
  return ids;
}

TEST(KVCacheDocIds, RecordsTheIdsOfEveryUpdateAsAPrefixView) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  EXPECT_TRUE(cache.records_doc_ids());
  ASSERT_TRUE(cache.doc_ids().has_value());
  EXPECT_EQ(cache.doc_ids().dimension(0), kBatch);
  EXPECT_EQ(cache.doc_ids().dimension(1), 0);
  const Tensor<DocId, 2> ids1 = new_ids(4, 0), ids2 = new_ids(3, 7);
  append_random(cache, 4, 1, 2, ids1);
  append_random(cache, 3, 3, 4, ids2);
  const ConstView<DocId, 2> ids = cache.doc_ids();
  ASSERT_EQ(ids.dimension(0), kBatch);
  ASSERT_EQ(ids.dimension(1), 7);
  EXPECT_EQ(ids.data(), cache.doc_id_storage().data());  // a view, no copy
  for (Index b = 0; b < kBatch; ++b) {
    for (Index i = 0; i < 4; ++i) EXPECT_EQ(ids(b, i), ids1(b, i));
    for (Index i = 0; i < 3; ++i) EXPECT_EQ(ids(b, 4 + i), ids2(b, i));
  }
  // truncate keeps the ids of the kept positions; the next update writes after them.
  cache.truncate(5);
  EXPECT_EQ(cache.doc_ids().dimension(1), 5);
  EXPECT_EQ(cache.doc_ids()(1, 4), ids2(1, 0));
  const Tensor<DocId, 2> ids3 = new_ids(2, 50);
  append_random(cache, 2, 5, 6, ids3);
  EXPECT_EQ(cache.doc_ids()(0, 5), ids3(0, 0));
  EXPECT_EQ(cache.doc_ids()(1, 6), ids3(1, 1));
  // reset empties it; the first update after it writes position 0 again.
  cache.reset();
  EXPECT_EQ(cache.doc_ids().dimension(1), 0);
  append_random(cache, 1, 7, 8, new_ids(1, 90));
  EXPECT_EQ(cache.doc_ids()(1, 0), 190);
}

TEST(KVCacheDocIds, Int32IdsAreRecordedAsTheirInt64Values) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  Tensor<std::int32_t, 2> ids(kBatch, 3);
  ids.setValues({{7, 7, -3}, {2147483647, 0, -2147483647 - 1}});
  const Tensor<float, 4> k = new_entries(3, 1), v = new_entries(3, 2);
  cache.update(k, v, ids);
  for (Index b = 0; b < kBatch; ++b) {
    for (Index i = 0; i < 3; ++i) EXPECT_EQ(cache.doc_ids()(b, i), DocId{ids(b, i)});
  }
}

TEST(KVCacheDocIds, ACacheThatDoesNotRecordHasNoIds) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  EXPECT_FALSE(cache.records_doc_ids());
  EXPECT_FALSE(cache.doc_ids().has_value());
  EXPECT_EQ(cache.doc_id_storage().size(), 0);
  append_random(cache, 2, 1, 2);
  EXPECT_FALSE(cache.doc_ids().has_value());
}

TEST(KVCacheDocIds, RejectedUpdatesLeaveKeysValuesAndIdsUnchanged) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  append_random(cache, 6, 1, 2, new_ids(6, 0));
  const Tensor<float, 4> k = new_entries(3, 3), v = new_entries(3, 4), short_v = new_entries(2, 5);
  const Tensor<DocId, 2> ids3 = new_ids(3, 9);
  // Ids of the wrong length, the wrong batch, or missing.
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { const Tensor<DocId, 2> short_ids = new_ids(2, 9);
        cache.update(k, v, short_ids); },
      {"KVCache::update: doc_ids_new has shape (2, 2)", "(batch_size, new_len) = (2, 3)"});
  const Tensor<DocId, 2> one_row(1, 3);
  test::expect_rejected<std::invalid_argument>(cache, [&] { cache.update(k, v, one_row); },
                                               {"doc_ids_new has shape (1, 3)", "(2, 3)"});
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { cache.update(k, v); },
      {"KVCache::update", "records document ids", "doc_ids_new (batch_size, new_len) = (2, 3)"});
  // Keys or values of the wrong shape, with good ids.
  const Tensor<float, 4> k_bad(kBatch, kKvHeads + 1, 3, kHeadDim);
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { cache.update(k_bad, v, ids3); }, {"k_new has shape (2, 4, 3, 4)"});
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { cache.update(k, short_v, ids3); },
      {"k_new has shape (2, 3, 3, 4) but v_new has shape (2, 3, 2, 4)"});
  // Overflow: 6 + 5 > 10.
  test::expect_rejected<std::length_error>(
      cache, [&] { append_random(cache, 5, 6, 7, new_ids(5, 9)); },
      {"6 cached + 5 new positions exceed max_seq_len 10"});
  // Still usable after all that.
  EXPECT_NO_THROW(cache.update(k, v, ids3));
  EXPECT_EQ(cache.seq_len(), 9);
}

TEST(KVCacheDocIds, IdsGivenToACacheThatDoesNotRecordAreRejected) {
  KVCache<float> cache(kBatch, kMaxLen, kKvHeads, kHeadDim);
  append_random(cache, 2, 1, 2);
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { append_random(cache, 3, 3, 4, new_ids(3, 0)); },
      {"KVCache::update: doc_ids_new (2, 3)", "does not record document ids", "record_doc_ids"});
}

}  // namespace
}  // namespace attnforge
