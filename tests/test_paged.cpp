// Tests of paged_kv_cache.hpp and paged_attention.hpp: the block pool (append, fork with
// copy-on-write, truncate, free and reuse, capacity errors that change nothing) and
// attention over ragged batches, per sequence against the double brute force within the
// accuracy budget and against the contiguous KVCache path.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "accuracy_budget.hpp"
#include "attnforge/paged_attention.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace paged_tests {
namespace {

constexpr Index kKvHeads = 2, kHeadDim = 24;

Tensor<float, 3> rows(Index n, std::uint32_t seed, Index head_dim = kHeadDim) {
  return test::random_normal<float, 3>({kKvHeads, n, head_dim}, seed);
}

// Everything observable of a pool: free count, refs of every block, each sequence's
// table, length and gathered contents.
struct PoolSnapshot {
  explicit PoolSnapshot(const PagedKVCache<float>& cache) : free(cache.free_blocks()) {
    for (Index b = 0; b < cache.n_blocks(); ++b) refs.push_back(cache.block_refs(b));
    for (SeqId id : cache.sequences()) {
      tables.push_back(cache.block_table(id));
      keys.push_back(cache.gather_keys(id));
      values.push_back(cache.gather_values(id));
    }
  }
  void expect_equal(const PoolSnapshot& o) const {
    EXPECT_EQ(free, o.free);
    EXPECT_EQ(refs, o.refs);
    EXPECT_EQ(tables, o.tables);
    ASSERT_EQ(keys.size(), o.keys.size());
    for (std::size_t s = 0; s < keys.size(); ++s) {
      EXPECT_TRUE(test::bitwise_equal(keys[s], o.keys[s]));
      EXPECT_TRUE(test::bitwise_equal(values[s], o.values[s]));
    }
  }
  Index free;
  std::vector<Index> refs;
  std::vector<std::vector<Index>> tables;
  std::vector<Tensor<float, 3>> keys, values;
};

// Positions [first, first + n) of (Hkv, L, D) rows.
Tensor<float, 3> slice(const Tensor<float, 3>& t, Index first, Index n) {
  Tensor<float, 3> out(t.dimension(0), n, t.dimension(2));
  for (Index h = 0; h < t.dimension(0); ++h)
    for (Index p = 0; p < n; ++p)
      for (Index d = 0; d < t.dimension(2); ++d) out(h, p, d) = t(h, first + p, d);
  return out;
}

TEST(PagedKVCache, AppendsAndGathersWhatWasAppendedAcrossBlocks) {
  PagedKVCache<float> cache(8, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(40, 1), v = rows(40, 2);
  const Tensor<float, 3> k1 = slice(k, 0, 7), v1 = slice(v, 0, 7);
  const Tensor<float, 3> k2 = slice(k, 7, 33), v2 = slice(v, 7, 33);
  cache.append(a, ConstView<float, 3>(k1), ConstView<float, 3>(v1));
  cache.append(a, ConstView<float, 3>(k2), ConstView<float, 3>(v2));
  EXPECT_EQ(cache.seq_len(a), 40);
  EXPECT_EQ(cache.block_table(a).size(), 3u);  // 40 positions in blocks of 16
  EXPECT_EQ(cache.blocks_in_use(), 3);
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(a), k));
  EXPECT_TRUE(test::bitwise_equal(cache.gather_values(a), v));
}

TEST(PagedKVCache, RaggedAppendSplitsThePackedTokensByCuSeqlens) {
  PagedKVCache<float> cache(8, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  const Tensor<float, 3> k = rows(21, 3), v = rows(21, 4);
  cache.append(RaggedBatch{{b, a}, {0, 18, 21}}, ConstView<float, 3>(k), ConstView<float, 3>(v));
  EXPECT_EQ(cache.seq_len(b), 18);
  EXPECT_EQ(cache.seq_len(a), 3);
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(b), slice(k, 0, 18)));
  EXPECT_TRUE(test::bitwise_equal(cache.gather_values(a), slice(v, 18, 3)));
}

TEST(PagedKVCache, FreedBlocksReturnToThePoolAndAreReused) {
  PagedKVCache<float> cache(4, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(64, 5), v = rows(64, 6);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  EXPECT_EQ(cache.free_blocks(), 0);
  const std::vector<Index> blocks = cache.block_table(a);
  cache.free_sequence(a);
  EXPECT_EQ(cache.free_blocks(), 4);
  EXPECT_FALSE(cache.contains(a));
  const SeqId b = cache.add_sequence();
  EXPECT_NE(b, a);  // handles are never reused
  const Tensor<float, 3> k2 = rows(64, 7), v2 = rows(64, 8);
  cache.append(b, ConstView<float, 3>(k2), ConstView<float, 3>(v2));
  std::vector<Index> reused = cache.block_table(b);
  std::sort(reused.begin(), reused.end());
  std::vector<Index> before = blocks;
  std::sort(before.begin(), before.end());
  EXPECT_EQ(reused, before);
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(b), k2));
}

// Sequences that grow a block at a time in turn, as decode steps grow them, each get
// their blocks side by side in the pool (FreeBlocks), so the decode streams each one.
TEST(PagedKVCache, SequencesGrowingInTurnKeepTheirBlocksSideBySide) {
  constexpr Index kSeqs = 8, kBlocksEach = 16;
  PagedKVCache<float> cache(kSeqs * kBlocksEach, 16, kKvHeads, kHeadDim);
  std::vector<SeqId> seqs;
  for (Index s = 0; s < kSeqs; ++s) seqs.push_back(cache.add_sequence());
  const Tensor<float, 3> k = rows(16, 80), v = rows(16, 81);
  for (Index b = 0; b < kBlocksEach; ++b) {
    for (SeqId id : seqs) cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v));
  }
  EXPECT_EQ(cache.free_blocks(), 0);
  std::vector<Index> firsts;
  for (SeqId id : seqs) {
    const std::vector<Index>& table = cache.block_table(id);
    ASSERT_EQ(table.size(), static_cast<std::size_t>(kBlocksEach));
    for (std::size_t i = 1; i < table.size(); ++i) EXPECT_EQ(table[i], table[i - 1] + 1) << id;
    firsts.push_back(table.front());
  }
  // Each new sequence started in the middle of the longest free run: 0, 64, 32, 96, 16, ...
  EXPECT_THAT(firsts, ::testing::ElementsAre(0, 64, 32, 96, 16, 48, 80, 112));

  // Freed blocks are found again: a fragmented pool still hands out every free block.
  for (std::size_t s = 0; s < seqs.size(); s += 2) cache.free_sequence(seqs[s]);
  const SeqId big = cache.add_sequence();
  const Tensor<float, 3> k2 = rows(kSeqs / 2 * kBlocksEach * 16, 82),
                         v2 = rows(kSeqs / 2 * kBlocksEach * 16, 83);
  cache.append(big, ConstView<float, 3>(k2), ConstView<float, 3>(v2));
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(big), k2));
}

// Inside a pool block each head's keys and values take turns in runs of one decode block
// of keys (16 rows; 32 for QInt8 where the block size allows), and the heads follow one
// another, so a decode step that reads a run of keys, then its values, then the next run,
// head after head, walks the block front to back.
template <typename T>
void expect_runs_of(Index block_size, Index run) {
  constexpr Index kHeads = 3, kDim = 32;
  PagedKVCache<T> cache(4, block_size, kHeads, kDim);
  const SeqId id = cache.add_sequence();
  const Tensor<float, 3> k = test::random_normal<float, 3>({kHeads, 2 * block_size, kDim}, 84);
  cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(k));
  const auto keys = cache.keys(id);
  const auto values = cache.values(id);
  const Index width = keys.stride(2);
  const auto* next = keys.row(0, 0, 0);  // where the next row read front to back lies
  for (Index h = 0; h < kHeads; ++h) {
    for (Index first = 0; first < block_size; first += run) {
      for (Index p = first; p < first + run; ++p, next += width) {
        EXPECT_EQ(keys.row(0, h, p), next) << "key row " << p << " of head " << h;
        EXPECT_EQ(keys.contiguous_rows(p), first + run - p);
      }
      for (Index p = first; p < first + run; ++p, next += width)
        EXPECT_EQ(values.row(0, h, p), next) << "value row " << p << " of head " << h;
    }
  }
  // The second pool block is a block of its own (placed right after the first here).
  EXPECT_EQ(keys.row(0, 0, block_size), next);
  EXPECT_EQ(cache.block_table(id), (std::vector<Index>{0, 1}));
  // The same inputs as keys and values read back the same (QInt8 tiles lay keys and values
  // out differently, so their bytes differ).
  std::vector<float> key(kDim), value(kDim);
  for (Index h = 0; h < kHeads; ++h) {
    for (Index p = 0; p < 2 * block_size; ++p) {
      detail::load_position<detail::QInt8Role::kKey>(keys, 0, h, p, key.data());
      detail::load_position<detail::QInt8Role::kValue>(values, 0, h, p, value.data());
      ASSERT_EQ(key, value) << "head " << h << " position " << p;
    }
  }
}

TEST(PagedKVCache, EachHeadsKeysAndValuesTakeTurnsInRunsOfADecodeBlock) {
  expect_runs_of<float>(16, 16);
  expect_runs_of<float>(64, 16);
  expect_runs_of<Eigen::bfloat16>(48, 16);
  expect_runs_of<Eigen::bfloat16>(128, 16);
  expect_runs_of<Eigen::half>(64, 16);
  expect_runs_of<QInt8>(64, 32);
  expect_runs_of<QInt8>(48, 16);
}

// The pool's free set on its own, across 64-bit words and a partial last word: every
// block is handed out once, a sequence continues right after its last block, and a new
// one starts in the middle of the longest free run.
TEST(FreeBlocks, HandsOutEveryBlockOnceAndPlacesByTheLongestRun) {
  constexpr Index kBlocks = 150;
  detail::FreeBlocks free(kBlocks);
  std::vector<int> taken(kBlocks, 0);
  Index last = -1;
  for (Index i = 0; i < kBlocks; ++i) {
    last = free.take(last);
    ASSERT_GE(last, 0);
    ASSERT_LT(last, kBlocks);
    ++taken[static_cast<std::size_t>(last)];
  }
  EXPECT_EQ(free.count(), 0);
  EXPECT_EQ(std::count(taken.begin(), taken.end(), 1), kBlocks);
  EXPECT_EQ(last, kBlocks - 1);  // one sequence from block 0 on: side by side

  // Free runs [10, 20) and [60, 140) (crossing two word boundaries) and block 149.
  for (Index b = 10; b < 20; ++b) free.release(b);
  for (Index b = 60; b < 140; ++b) free.release(b);
  free.release(149);
  EXPECT_EQ(free.count(), 91);
  EXPECT_EQ(free.take(-1), 100);  // the middle of [60, 140)
  EXPECT_EQ(free.take(100), 101);
  EXPECT_EQ(free.take(148), 149);  // right after the sequence's last block
  EXPECT_EQ(free.take(149), 80);   // past the pool's end: the middle of [60, 100)
}

TEST(PagedKVCache, ForkSharesBlocksAndCopiesAPartialLastBlockOnWrite) {
  PagedKVCache<float> cache(8, 16, kKvHeads, kHeadDim);
  const SeqId parent = cache.add_sequence();
  const Tensor<float, 3> k = rows(20, 9), v = rows(20, 10);
  cache.append(parent, ConstView<float, 3>(k), ConstView<float, 3>(v));
  const SeqId child = cache.fork(parent);
  EXPECT_EQ(cache.blocks_in_use(), 2);  // shared, nothing copied yet
  EXPECT_EQ(cache.block_refs(cache.block_table(parent)[1]), 2);
  EXPECT_EQ(cache.blocks_without_sharing(), 4);

  const Tensor<float, 3> kc = rows(5, 11), vc = rows(5, 12);
  cache.append(child, ConstView<float, 3>(kc), ConstView<float, 3>(vc));
  // The child's partial block 1 was copied; block 0 (full) stays shared.
  EXPECT_EQ(cache.block_table(child)[0], cache.block_table(parent)[0]);
  EXPECT_NE(cache.block_table(child)[1], cache.block_table(parent)[1]);
  EXPECT_EQ(cache.blocks_in_use(), 3);
  // The parent is untouched; the child holds the parent's prefix and its own tokens.
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(parent), k));
  EXPECT_TRUE(test::bitwise_equal(cache.gather_values(parent), v));
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(child), 0, 20), k));
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(child), 20, 5), kc));

  // Writing to the parent now copies nothing (its block 1 is no longer shared).
  const Tensor<float, 3> kp = rows(3, 13), vp = rows(3, 14);
  cache.append(parent, ConstView<float, 3>(kp), ConstView<float, 3>(vp));
  EXPECT_EQ(cache.blocks_in_use(), 3);
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(child), 20, 5), kc));
  cache.free_sequence(parent);
  EXPECT_EQ(cache.blocks_in_use(), 2);  // block 0 is still the child's
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(child), 0, 20), k));
}

TEST(PagedKVCache, ForksOfAFullBlockPromptShareEveryBlock) {
  PagedKVCache<float> cache(80, 64, kKvHeads, kHeadDim);
  const SeqId prompt = cache.add_sequence();
  const Tensor<float, 3> k = rows(4096, 15), v = rows(4096, 16);
  cache.append(prompt, ConstView<float, 3>(k), ConstView<float, 3>(v));
  for (int i = 0; i < 8; ++i) cache.fork(prompt);
  EXPECT_EQ(cache.blocks_in_use(), 64);  // 8 forks hold the blocks of one
  EXPECT_EQ(cache.blocks_without_sharing(), 9 * 64);
}

TEST(PagedKVCache, TruncateFreesTheBlocksPastTheNewLength) {
  PagedKVCache<float> cache(8, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(40, 17), v = rows(40, 18);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  cache.truncate(a, 17);
  EXPECT_EQ(cache.seq_len(a), 17);
  EXPECT_EQ(cache.blocks_in_use(), 2);
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(a), slice(k, 0, 17)));
  const Tensor<float, 3> k2 = rows(4, 19), v2 = rows(4, 20);
  cache.append(a, ConstView<float, 3>(k2), ConstView<float, 3>(v2));
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(a), 17, 4), k2));
  cache.truncate(a, 0);
  EXPECT_EQ(cache.blocks_in_use(), 0);
  test::expect_invalid([&] { cache.truncate(a, 1); }, {"PagedKVCache::truncate", "new_len 1"});
}

TEST(PagedKVCache, TruncatingAForkNeverChangesItsParent) {
  PagedKVCache<float> cache(8, 16, kKvHeads, kHeadDim);
  const SeqId parent = cache.add_sequence();
  const Tensor<float, 3> k = rows(30, 21), v = rows(30, 22);
  cache.append(parent, ConstView<float, 3>(k), ConstView<float, 3>(v));
  const SeqId child = cache.fork(parent);
  cache.truncate(child, 10);  // the child now ends inside the shared block 0
  const Tensor<float, 3> kc = rows(12, 23), vc = rows(12, 24);
  cache.append(child, ConstView<float, 3>(kc), ConstView<float, 3>(vc));
  EXPECT_TRUE(test::bitwise_equal(cache.gather_keys(parent), k));
  EXPECT_TRUE(test::bitwise_equal(cache.gather_values(parent), v));
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(child), 10, 12), kc));
}

TEST(PagedKVCache, OutOfBlocksThrowsLengthErrorAndChangesNothing) {
  PagedKVCache<float> cache(3, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  const Tensor<float, 3> k = rows(20, 25), v = rows(20, 26);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  const SeqId c = cache.fork(a);
  const PoolSnapshot before(cache);
  // b needs 2 blocks, c's copy-on-write 1 more: 3 > 1 free.
  const Tensor<float, 3> k2 = rows(21, 27), v2 = rows(21, 28);
  test::expect_throws<std::length_error>(
      [&] {
        cache.append(RaggedBatch{{c, b}, {0, 1, 21}}, ConstView<float, 3>(k2),
                     ConstView<float, 3>(v2));
      },
      {"PagedKVCache::append", "out of blocks", "needs 3 blocks", "1 of 3 are free"});
  before.expect_equal(PoolSnapshot(cache));
  EXPECT_EQ(cache.seq_len(c), 20);
  EXPECT_EQ(cache.seq_len(b), 0);
}

TEST(PagedKVCache, RaggedAppendToEveryHolderOfASharedBlockCopiesItOnce) {
  // Found by the fuzz target: the capacity check counted a copy for each holder of the
  // shared partial block, but after the first copies it the last holder writes in place.
  PagedKVCache<float> cache(3, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(20, 50), v = rows(20, 51);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  const SeqId b = cache.fork(a);
  ASSERT_EQ(cache.free_blocks(), 1);
  const Tensor<float, 3> k2 = rows(5, 52), v2 = rows(5, 53);
  cache.append(RaggedBatch{{a, b}, {0, 3, 5}}, ConstView<float, 3>(k2), ConstView<float, 3>(v2));
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_NE(cache.block_table(a)[1], cache.block_table(b)[1]);
  EXPECT_EQ(cache.block_refs(cache.block_table(a)[1]), 1);
  EXPECT_EQ(cache.block_refs(cache.block_table(b)[1]), 1);
  for (SeqId id : {a, b}) EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(id), 0, 20), k));
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_keys(a), 20, 3), slice(k2, 0, 3)));
  EXPECT_TRUE(test::bitwise_equal(slice(cache.gather_values(b), 20, 2), slice(v2, 3, 2)));

  // With a third holder left out of the batch, both appending holders need their copy.
  const SeqId c = cache.fork(b), d = cache.fork(b);
  cache.free_sequence(a);  // frees a's private block 1 and nothing shared
  ASSERT_EQ(cache.free_blocks(), 1);
  const PoolSnapshot before(cache);
  const Tensor<float, 3> k3 = rows(2, 54), v3 = rows(2, 55);
  test::expect_throws<std::length_error>(
      [&] {
        cache.append(RaggedBatch{{c, d}, {0, 1, 2}}, ConstView<float, 3>(k3),
                     ConstView<float, 3>(v3));
      },
      {"out of blocks", "needs 2 blocks"});
  before.expect_equal(PoolSnapshot(cache));
}

TEST(PagedKVCache, BadArgumentsThrowNamingThemAndChangeNothing) {
  EXPECT_THROW(PagedKVCache<float>(4, 24, kKvHeads, kHeadDim), std::invalid_argument);
  PagedKVCache<float> cache(4, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(5, 29), v = rows(5, 30);
  const Tensor<float, 3> wrong = rows(5, 31, kHeadDim + 1);
  const PoolSnapshot before(cache);
  test::expect_invalid([&] { cache.append(a, ConstView<float, 3>(wrong), ConstView<float, 3>(v)); },
                       {"PagedKVCache::append", "k_new", "(n_kv_heads, total_tokens, head_dim)"});
  test::expect_invalid(
      [&] {
        cache.append(RaggedBatch{{a, a}, {0, 2, 5}}, ConstView<float, 3>(k),
                     ConstView<float, 3>(v));
      },
      {"sequence 0 appears twice"});
  test::expect_invalid(
      [&] {
        cache.append(RaggedBatch{{a}, {0, 4}}, ConstView<float, 3>(k), ConstView<float, 3>(v));
      },
      {"k_new", "(2, 5, 24)"});
  test::expect_invalid(
      [&] {
        cache.append(RaggedBatch{{a}, {1, 5}}, ConstView<float, 3>(k), ConstView<float, 3>(v));
      },
      {"cu_seqlens"});
  test::expect_invalid(
      [&] { cache.append(SeqId{42}, ConstView<float, 3>(k), ConstView<float, 3>(v)); },
      {"no sequence 42"});
  const Tensor<DocId, 2> ids(1, 5);
  test::expect_invalid(
      [&] { cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v), ids); },
      {"does not record document ids"});
  test::expect_invalid([&] { cache.fork(SeqId{7}); }, {"PagedKVCache::fork", "no sequence 7"});
  test::expect_invalid([&] { cache.free_sequence(SeqId{7}); }, {"PagedKVCache::free_sequence"});
  before.expect_equal(PoolSnapshot(cache));
}

TEST(PagedKVCache, RecordsDocumentIdsAndCopiesThemOnWrite) {
  PagedKVCache<float> cache(4, 16, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(18, 32), v = rows(18, 33);
  Tensor<DocId, 2> ids(1, 18);
  for (Index p = 0; p < 18; ++p) ids(0, p) = p < 10 ? 3 : 4;
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v), ids);
  const SeqId b = cache.fork(a);
  const Tensor<float, 3> k1 = rows(1, 34), v1 = rows(1, 35);
  Tensor<std::int32_t, 2> id1(1, 1);
  id1(0, 0) = 9;
  cache.append(b, ConstView<float, 3>(k1), ConstView<float, 3>(v1), id1);
  const Tensor<DocId, 1> got_a = cache.gather_doc_ids(a), got_b = cache.gather_doc_ids(b);
  ASSERT_EQ(got_a.size(), 18);
  ASSERT_EQ(got_b.size(), 19);
  for (Index p = 0; p < 18; ++p) {
    EXPECT_EQ(got_a(p), ids(0, p));
    EXPECT_EQ(got_b(p), ids(0, p));
  }
  EXPECT_EQ(got_b(18), 9);
}

TEST(PagedKVCache, AppendingNoTokensToACacheRecordingDocIdsNeedsNoIds) {
  // Found by the fuzz target: the (1, 0) ids of zero new tokens have no data, read as
  // absent, and the append was rejected for missing ids (KVCache::update accepts them).
  PagedKVCache<float> cache(2, 16, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  const Tensor<float, 3> none = rows(0, 56);
  const Tensor<DocId, 2> no_ids(1, 0);
  cache.append(a, ConstView<float, 3>(none), ConstView<float, 3>(none), no_ids);
  cache.append(a, ConstView<float, 3>(none), ConstView<float, 3>(none));
  cache.append(RaggedBatch{{a, b}, {0, 0, 0}}, ConstView<float, 3>(none), ConstView<float, 3>(none),
               no_ids);
  EXPECT_EQ(cache.seq_len(a), 0);
  EXPECT_EQ(cache.free_blocks(), 2);
  // Tokens to record still need their ids.
  const Tensor<float, 3> k = rows(3, 57), v = rows(3, 58);
  test::expect_invalid([&] { cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v)); },
                       {"records document ids; pass doc_ids_new"});
}

TEST(PagedKVCache, Bf16StorageRoundsFloatActivations) {
  PagedKVCache<Eigen::bfloat16> cache(4, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(5, 36), v = rows(5, 37);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  const Tensor<Eigen::bfloat16, 3> got = cache.gather_keys(a);
  for (Index i = 0; i < k.size(); ++i)
    EXPECT_EQ(static_cast<float>(got.data()[i]), static_cast<float>(Eigen::bfloat16(k.data()[i])));
}

// ---------------------------------------------------------------------------------------
// Attention over ragged batches.

enum class Kind {
  kCausal,
  kWindow,
  kDocs,
  kPadding,
  kSoftcap,
  kAlibi,
  kSinks,
  kAttnMask,
  kBias,
  kEmptyAttendAll
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kCausal:
      return "Causal";
    case Kind::kWindow:
      return "CausalWindow";
    case Kind::kDocs:
      return "CausalDocs";
    case Kind::kPadding:
      return "Padding";
    case Kind::kSoftcap:
      return "CausalSoftcap";
    case Kind::kAlibi:
      return "CausalAlibi";
    case Kind::kSinks:
      return "CausalSinks";
    case Kind::kAttnMask:
      return "AttnMask";
    case Kind::kBias:
      return "CausalBias";
    default:
      return "EmptyRowsAttendAll";
  }
}

// (cached length after the append, new tokens): a whole prompt, a prefill chunk on top of
// a cache, decode steps, and a short multi-token step.
struct SeqShape {
  Index len, n;
};
const std::vector<SeqShape> kShapes = {{150, 150}, {300, 70}, {777, 1}, {45, 1}, {129, 3}};

struct RaggedCase {
  Index block;
  Index n_rep;
  Kind kind;
};

// One sequence of a ragged case: its inputs and the dense masks/options of its problem.
struct SeqData {
  Tensor<float, 4> q, k, v;  // (1, H, n, D), (1, Hkv, len, D)
  test::DenseMasks masks;
  Tensor<DocId, 2> kv_ids;  // (1, len), when the kind has documents
};

SeqData make_sequence(const RaggedCase& c, const SeqShape& shape, Index n_heads, std::uint32_t seed,
                      const test::DenseOptions& options) {
  SeqData s;
  s.q = test::random_normal<float, 4>({1, n_heads, shape.n, kHeadDim}, seed);
  s.k = test::random_normal<float, 4>({1, kKvHeads, shape.len, kHeadDim}, seed + 1);
  s.v = test::random_normal<float, 4>({1, kKvHeads, shape.len, kHeadDim}, seed + 2);
  s.masks.causal = c.kind != Kind::kPadding && c.kind != Kind::kAttnMask;
  if (c.kind == Kind::kWindow) s.masks.window = 40;
  std::mt19937 gen(seed);
  if (c.kind == Kind::kDocs) {
    s.kv_ids = Tensor<DocId, 2>(1, shape.len);
    DocId doc = 0;
    for (Index p = 0; p < shape.len; ++p) {
      if (test::uniform01(gen) < 0.02) ++doc;
      s.kv_ids(0, p) = doc;
    }
    Tensor<DocId, 2> q_ids(1, shape.n);
    for (Index i = 0; i < shape.n; ++i) q_ids(0, i) = s.kv_ids(0, shape.len - shape.n + i);
    s.masks.q_docs = q_ids;
    s.masks.kv_docs = s.kv_ids;
  }
  if (c.kind == Kind::kPadding || c.kind == Kind::kEmptyAttendAll) {
    Tensor<bool, 2> pad(1, shape.len);
    for (Index p = 0; p < shape.len; ++p)
      pad(0, p) = c.kind == Kind::kPadding ? test::uniform01(gen) > 0.15 : false;
    s.masks.key_padding = pad;
  }
  if (c.kind == Kind::kAttnMask) {
    Tensor<bool, 4> m(1, 1, shape.n, shape.len);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = test::uniform01(gen) > 0.3;
    s.masks.attn_mask = m;
  }
  if (c.kind == Kind::kBias) {
    Tensor<float, 4> b(1, n_heads, shape.n, shape.len);
    for (Index i = 0; i < b.size(); ++i) {
      const double u = test::uniform01(gen);
      b.data()[i] =
          u < 0.05 ? -std::numeric_limits<float>::infinity() : static_cast<float>(u - 0.5);
    }
    s.masks.attn_bias = b;
  }
  (void)options;
  return s;
}

test::DenseOptions dense_options(Kind kind, Index n_heads) {
  test::DenseOptions o;
  if (kind == Kind::kSoftcap) o.softcap = 5.0;
  if (kind == Kind::kEmptyAttendAll) o.attend_all_when_empty = true;
  for (Index h = 0; h < n_heads; ++h) {
    if (kind == Kind::kAlibi)
      o.alibi_slopes.push_back(std::exp2(-0.5 * static_cast<double>(h + 1)));
    if (kind == Kind::kSinks) o.sinks.push_back(0.3 * static_cast<double>(h) - 1.0);
  }
  return o;
}

class PagedAttentionRagged : public ::testing::TestWithParam<RaggedCase> {};

TEST_P(PagedAttentionRagged, EverySequenceMatchesTheBruteForceAndTheContiguousPath) {
  const RaggedCase c = GetParam();
  const Index n_heads = kKvHeads * c.n_rep;
  const test::DenseOptions options = dense_options(c.kind, n_heads);
  const bool docs = c.kind == Kind::kDocs;
  PagedKVCache<float> cache(200, c.block, kKvHeads, kHeadDim, docs);
  std::vector<SeqData> seqs;
  RaggedBatch batch{{}, {0}};
  for (std::size_t s = 0; s < kShapes.size(); ++s) {
    seqs.push_back(
        make_sequence(c, kShapes[s], n_heads, 100 + 10 * static_cast<std::uint32_t>(s), options));
    // Filler sequences interleave with this one, so its blocks are scattered in the pool.
    const SeqId filler = cache.add_sequence();
    const Tensor<float, 3> fk = rows(17, 7), fv = rows(17, 8);
    Tensor<DocId, 2> fids(1, 17);
    fids.setZero();
    if (docs)
      cache.append(filler, ConstView<float, 3>(fk), ConstView<float, 3>(fv), fids);
    else
      cache.append(filler, ConstView<float, 3>(fk), ConstView<float, 3>(fv));
    const SeqId id = cache.add_sequence();
    const Tensor<float, 3> k = seqs.back().k.chip<0>(0), v = seqs.back().v.chip<0>(0);
    if (docs)
      cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v), seqs.back().kv_ids);
    else
      cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v));
    batch.seqs.push_back(id);
    batch.cu_seqlens.push_back(batch.cu_seqlens.back() + kShapes[s].n);
  }
  // The packed queries (total, H, D) and the per-sequence masks (the documents' key ids
  // come from the cache's records).
  // (Named references, not a structured binding: a C++17 lambda cannot capture one.)
  const auto packed = test::pack_ragged_queries(seqs, batch);
  const Tensor<float, 3>& q = packed.first;
  const std::vector<Masks>& masks = packed.second;
  const SdpaOptions library = test::library_options(seqs[0].masks, options);
  Tensor<float, 2> lse(n_heads, batch.total_tokens());
  Tensor<float, 3> out(q.dimensions()), out2(q.dimensions());
  PagedAttention<float> one_thread(library), two_threads(library, &test::pool_device(2));
  one_thread(q, cache, batch, out, masks, lse);
  two_threads(q, cache, batch, out2, masks);
  EXPECT_TRUE(test::bitwise_equal(out, out2)) << "the thread count changed the result";

  for (std::size_t s = 0; s < seqs.size(); ++s) {
    SCOPED_TRACE(::testing::Message() << "sequence " << s);
    const SeqData& sd = seqs[s];
    const Index n = kShapes[s].n, first = batch.first_token(static_cast<Index>(s));
    const test::DenseResult exact = test::dense_sdpa(test::to_double(sd.q), test::to_double(sd.k),
                                                     test::to_double(sd.v), sd.masks, options);
    const test::AccuracyBudget budget = test::sdpa_budget<float>(
        SdpaPath::kAuto, test::budget_inputs(sd.q, sd.k, sd.masks, options, exact));
    const Masks contiguous_masks = test::library_masks(sd.masks);
    const auto contiguous =
        scaled_dot_product_attention_with_lse(sd.q, sd.k, sd.v, library, contiguous_masks);
    const double v_scale = test::max_abs(sd.v);
    double err = 0, err_contiguous = 0, err_lse = 0;
    for (Index h = 0; h < n_heads; ++h) {
      for (Index i = 0; i < n; ++i) {
        for (Index d = 0; d < kHeadDim; ++d) {
          err = std::max(err, std::abs(out(first + i, h, d) - exact.out(0, h, i, d)));
          err_contiguous = std::max(
              err_contiguous,
              std::abs(static_cast<double>(out(first + i, h, d)) - contiguous.out(0, h, i, d)));
        }
        const double e = exact.lse(0, h, i), got = lse(h, first + i);
        if (std::isinf(e)) {
          EXPECT_EQ(got, e);
        } else {
          err_lse = std::max(err_lse, std::abs(got - e));
        }
      }
    }
    EXPECT_LE(err / v_scale, budget.out);
    EXPECT_LE(err_contiguous / v_scale, 2.0 * budget.out);
    EXPECT_LE(err_lse, budget.lse);
  }
}

std::vector<RaggedCase> ragged_cases() {
  std::vector<RaggedCase> cases;
  for (Index block : {16, 64, 128})
    for (Index n_rep : {1, 4}) cases.push_back({block, n_rep, Kind::kCausal});
  cases.push_back({16, 8, Kind::kCausal});  // MQA-like: 16 query heads on 2 KV heads
  for (Kind kind : {Kind::kWindow, Kind::kDocs, Kind::kPadding, Kind::kSoftcap, Kind::kAlibi,
                    Kind::kSinks, Kind::kAttnMask, Kind::kBias, Kind::kEmptyAttendAll}) {
    cases.push_back({16, 4, kind});
    cases.push_back({64, 2, kind});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, PagedAttentionRagged, ::testing::ValuesIn(ragged_cases()),
                         [](const ::testing::TestParamInfo<RaggedCase>& info) {
                           return std::string(kind_name(info.param.kind)) + "_block" +
                                  std::to_string(info.param.block) + "_rep" +
                                  std::to_string(info.param.n_rep);
                         });

// head_dim 24 converts the bf16 blocks to float; 64 takes the decode's bf16 dot products
// where the CPU has them (Bf16Kernel::kAuto), on both caches alike.
TEST(PagedAttention, Bf16CacheUnderFloatActivationsMatchesTheContiguousBf16Cache) {
  const Index n_heads = 8, len = 200;
  for (const Index head_dim : {kHeadDim, Index{64}}) {
    PagedKVCache<Eigen::bfloat16> paged(32, 16, kKvHeads, head_dim);
    KVCache<Eigen::bfloat16> contiguous(1, len, kKvHeads, head_dim);
    const SeqId id = paged.add_sequence();
    const Tensor<float, 3> k = rows(len, 40, head_dim), v = rows(len, 41, head_dim);
    paged.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v));
    const Tensor<float, 4> k4 = k.reshape(std::array<Index, 4>{1, kKvHeads, len, head_dim});
    const Tensor<float, 4> v4 = v.reshape(std::array<Index, 4>{1, kKvHeads, len, head_dim});
    const KVPrefix<Eigen::bfloat16> prefix = contiguous.update(k4, v4);
    for (Index n : {Index{1}, Index{33}}) {
      SCOPED_TRACE("head_dim " + std::to_string(head_dim) + ", " + std::to_string(n) + " tokens");
      SdpaOptions options;
      options.causal = true;
      const Tensor<float, 3> q = test::random_normal<float, 3>({n, n_heads, head_dim}, 42);
      Tensor<float, 4> q4(1, n_heads, n, head_dim);
      for (Index h = 0; h < n_heads; ++h)
        for (Index i = 0; i < n; ++i)
          for (Index d = 0; d < head_dim; ++d) q4(0, h, i, d) = q(i, h, d);
      const Tensor<float, 3> got =
          PagedAttention<float, Eigen::bfloat16>(options)(q, paged, RaggedBatch{{id}, {0, n}});
      const Tensor<float, 4> want =
          Sdpa<float, Eigen::bfloat16>(options)(q4, prefix.keys, prefix.values);
      double err = 0;
      for (Index h = 0; h < n_heads; ++h)
        for (Index i = 0; i < n; ++i)
          for (Index d = 0; d < head_dim; ++d)
            err = std::max(err, static_cast<double>(std::abs(got(i, h, d) - want(0, h, i, d))));
      EXPECT_LE(err, 1e-5);
    }
  }
}

// bf16 activations over a bf16 pool take the fused kernel's AVX512-BF16 dot products
// where the CPU has them (else the conversion). A key tile of 64 keys then spans runs of
// 16 rows: its key bits are copied and its values paired run by run. Blocks of 16, 48 and
// 128; new tokens that start mid-tile and at an odd position, so tile products start at
// odd keys moved back to even ones. Each sequence lies within the bf16 output bound of
// the double brute force on the same rounded inputs, and matches the contiguous bf16
// cache's result to float accuracy (the same tiles of the same keys).
TEST(PagedAttention, Bf16PrefillOverTilesSpanningRunsMatchesTheBruteForceAndTheContiguousCache) {
  using Eigen::bfloat16;
  const Index n_heads = 8, head_dim = 64;
  const std::vector<Index> cached = {0, 71}, fresh = {133, 57};
  SdpaOptions options;
  options.causal = true;
  options.bf16_kernel = detail::kHasBf16DotKernel && detail::cpu_has_avx512_bf16()
                            ? Bf16Kernel::kDotProduct
                            : Bf16Kernel::kConvert;
  for (const Index block : {16, 48, 128}) {
    SCOPED_TRACE("block " + std::to_string(block));
    PagedKVCache<bfloat16> cache(32, block, kKvHeads, head_dim);
    RaggedBatch batch{{}, {0}};
    std::vector<Tensor<bfloat16, 4>> qs, ks, vs;
    for (std::size_t s = 0; s < cached.size(); ++s) {
      const Index len = cached[s] + fresh[s];
      const auto seed = 500 + 10 * static_cast<std::uint32_t>(s);
      // Rounded to bf16 first, so the cache, the contiguous path and the brute force all
      // see the same values.
      const Tensor<bfloat16, 3> k = rows(len, seed, head_dim).cast<bfloat16>();
      const Tensor<bfloat16, 3> v = rows(len, seed + 1, head_dim).cast<bfloat16>();
      const SeqId id = cache.add_sequence();
      cache.append(id, ConstView<bfloat16, 3>(k), ConstView<bfloat16, 3>(v));
      batch.seqs.push_back(id);
      batch.cu_seqlens.push_back(batch.cu_seqlens.back() + fresh[s]);
      const std::array<Index, 4> kv_dims{1, kKvHeads, len, head_dim};
      ks.emplace_back(k.reshape(kv_dims));
      vs.emplace_back(v.reshape(kv_dims));
      qs.emplace_back(test::random_normal<float, 4>({1, n_heads, fresh[s], head_dim}, seed + 2)
                          .cast<bfloat16>());
    }
    Tensor<bfloat16, 3> q(batch.total_tokens(), n_heads, head_dim);
    for (std::size_t s = 0; s < qs.size(); ++s) {
      for (Index i = 0; i < fresh[s]; ++i)
        for (Index h = 0; h < n_heads; ++h)
          for (Index d = 0; d < head_dim; ++d)
            q(batch.first_token(static_cast<Index>(s)) + i, h, d) = qs[s](0, h, i, d);
    }
    const Tensor<bfloat16, 3> out = PagedAttention<bfloat16>(options)(q, cache, batch);
    for (std::size_t s = 0; s < qs.size(); ++s) {
      SCOPED_TRACE("sequence " + std::to_string(s));
      test::DenseMasks dense;
      dense.causal = true;
      const test::DenseResult exact = test::dense_sdpa(
          test::to_double(qs[s]), test::to_double(ks[s]), test::to_double(vs[s]), dense);
      const Tensor<bfloat16, 4> contiguous = Sdpa<bfloat16>(options)(qs[s], ks[s], vs[s]);
      const double v_scale = test::max_abs(test::to_double(vs[s]));
      double err = 0, err_contiguous = 0;
      for (Index i = 0; i < fresh[s]; ++i) {
        for (Index h = 0; h < n_heads; ++h) {
          for (Index d = 0; d < head_dim; ++d) {
            const double got =
                static_cast<double>(out(batch.first_token(static_cast<Index>(s)) + i, h, d));
            err = std::max(err, std::abs(got - exact.out(0, h, i, d)));
            err_contiguous = std::max(err_contiguous,
                                      std::abs(got - static_cast<double>(contiguous(0, h, i, d))));
          }
        }
      }
      // Half a bf16 ulp of the output (2^-9 relative) with margin, as test_mixed_precision's
      // bf16 bound; the contiguous result differs only by float rounding, then bf16's.
      EXPECT_LE(err / v_scale, 1e-2);
      EXPECT_LE(err_contiguous / v_scale, 1e-2);
    }
  }
}

// The decode reads a paged cache's blocks with every KV head of a block in turn (a work
// unit holds up to all KV heads of a chunk, fewer when the pool would get too few units).
// Eight KV heads, one new token per sequence, lengths over several chunks, block sizes that
// do and do not divide the chunk, 1-3 threads (so units of 8, 4 and 2 heads): each result
// is bitwise the contiguous cache's (the same blocks per head in the same order) and within
// the budget of the double brute force.
TEST(PagedAttention, DecodeOverEveryKvHeadOfABlockMatchesTheContiguousCache) {
  constexpr Index kHeads = 16, kKv = 8, kDim = 32;
  const std::vector<Index> lengths = {2500, 700, 40};
  for (const Index block : {16, 48, 64, 256}) {
    PagedKVCache<float> cache(400, block, kKv, kDim);
    RaggedBatch batch{{}, {0}};
    std::vector<Tensor<float, 4>> ks, vs;
    for (std::size_t s = 0; s < lengths.size(); ++s) {
      const auto seed = 300 + 10 * static_cast<std::uint32_t>(s);
      ks.push_back(test::random_normal<float, 4>({1, kKv, lengths[s], kDim}, seed));
      vs.push_back(test::random_normal<float, 4>({1, kKv, lengths[s], kDim}, seed + 1));
      const SeqId id = cache.add_sequence();
      const Tensor<float, 3> k = ks.back().chip<0>(0), v = vs.back().chip<0>(0);
      cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v));
      batch.seqs.push_back(id);
      batch.cu_seqlens.push_back(batch.cu_seqlens.back() + 1);
    }
    const Index n_seqs = static_cast<Index>(lengths.size());
    const Tensor<float, 3> q = test::random_normal<float, 3>({n_seqs, kHeads, kDim}, 77);
    SdpaOptions options;
    options.causal = true;
    Tensor<float, 3> out(n_seqs, kHeads, kDim);
    PagedAttention<float> one_thread(options);
    one_thread(q, cache, batch, out);
    for (const int threads : {2, 3}) {
      Tensor<float, 3> again(n_seqs, kHeads, kDim);
      PagedAttention<float> pooled(options, &test::pool_device(threads));
      pooled(q, cache, batch, again);
      EXPECT_TRUE(test::bitwise_equal(out, again))
          << "block " << block << ", " << threads << " threads";
    }
    Tensor<float, 3> want(n_seqs, kHeads, kDim);  // each sequence on a contiguous cache
    for (Index s = 0; s < n_seqs; ++s) {
      SCOPED_TRACE("block " + std::to_string(block) + ", sequence " + std::to_string(s));
      Tensor<float, 4> q4(1, kHeads, 1, kDim);
      for (Index h = 0; h < kHeads; ++h)
        for (Index d = 0; d < kDim; ++d) q4(0, h, 0, d) = q(s, h, d);
      const auto& k = ks[static_cast<std::size_t>(s)];
      const auto& v = vs[static_cast<std::size_t>(s)];
      const Tensor<float, 4> contiguous = Sdpa<float>(options)(q4, k, v);
      test::DenseMasks masks;
      masks.causal = true;
      const test::DenseOptions dense;
      const test::DenseResult exact = test::dense_sdpa(test::to_double(q4), test::to_double(k),
                                                       test::to_double(v), masks, dense);
      const test::AccuracyBudget budget = test::sdpa_budget<float>(
          SdpaPath::kAuto, test::budget_inputs(q4, k, masks, dense, exact));
      double err = 0;
      for (Index h = 0; h < kHeads; ++h) {
        for (Index d = 0; d < kDim; ++d) {
          err = std::max(err, std::abs(out(s, h, d) - exact.out(0, h, 0, d)));
          want(s, h, d) = contiguous(0, h, 0, d);
        }
      }
      EXPECT_LE(err / test::max_abs(v), budget.out);
    }
    EXPECT_TRUE(test::bitwise_equal(out, want))
        << "block " << block << " differs from the contiguous cache";
  }
}

TEST(PagedAttention, ABatchWithoutNewTokensComputesNothing) {
  // Found by the fuzz target: with no sequence having new tokens, the fast path read the
  // options of the first problem of an empty list.
  PagedKVCache<float> cache(4, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  const Tensor<float, 3> k = rows(10, 59), v = rows(10, 60);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  SdpaOptions options;
  options.causal = true;
  for (SdpaPath path : test::kAllPaths) {
    SCOPED_TRACE(test::path_name(path));
    options.path = path;
    PagedAttention<float> attn(options);
    const Tensor<float, 3> q(0, 4, kHeadDim);
    Tensor<float, 3> out(0, 4, kHeadDim);
    attn(q, cache, RaggedBatch{{a, b}, {0, 0, 0}}, out);
    attn(q, cache, RaggedBatch{{}, {0}}, out);
  }
}

TEST(PagedAttention, BadArgumentsThrowBeforeWritingTheOutput) {
  PagedKVCache<float> cache(8, 16, kKvHeads, kHeadDim);
  const SeqId a = cache.add_sequence();
  const Tensor<float, 3> k = rows(10, 43), v = rows(10, 44);
  cache.append(a, ConstView<float, 3>(k), ConstView<float, 3>(v));
  const Tensor<float, 3> q = test::random_normal<float, 3>({4, 4, kHeadDim}, 45);
  Tensor<float, 3> out(4, 4, kHeadDim);
  out.setConstant(7.0f);
  SdpaOptions options;
  options.causal = true;
  PagedAttention<float> attn(options);
  test::expect_invalid(
      [&] {
        attn(q, cache, RaggedBatch{{a}, {0, 3}}, out);
      },
      {"PagedAttention", "q has shape (4, 4, 24)", "(total_tokens, H, head_dim)"});
  const Tensor<float, 3> q3 = test::random_normal<float, 3>({4, 3, kHeadDim}, 46);
  Tensor<float, 3> out3(4, 3, kHeadDim);
  test::expect_invalid(
      [&] {
        attn(q3, cache, RaggedBatch{{a}, {0, 4}}, out3);
      },
      {"q has 3 heads", "2 KV heads"});
  Tensor<float, 3> q_long = test::random_normal<float, 3>({12, 4, kHeadDim}, 47);
  Tensor<float, 3> out_long(12, 4, kHeadDim);
  test::expect_invalid(
      [&] {
        attn(q_long, cache, RaggedBatch{{a}, {0, 12}}, out_long);
      },
      {"12 new tokens", "holds only 10", "append"});
  test::expect_invalid(
      [&] {
        attn(q, cache, RaggedBatch{{a}, {0, 4}}, out, {Masks{}, Masks{}});
      },
      {"2 Masks given for 1 sequences"});
  Masks bad;
  const Tensor<DocId, 2> ids(1, 3);
  bad.doc_ids = ids;
  test::expect_invalid(
      [&] {
        attn(q, cache, RaggedBatch{{a}, {0, 4}}, out, {bad});
      },
      {"PagedAttention", "doc_ids"});
  test::expect_invalid(
      [&] {
        attn(q, cache, RaggedBatch{{SeqId{9}}, {0, 4}}, out);
      },
      {"no sequence 9"});
  for (Index i = 0; i < out.size(); ++i) ASSERT_EQ(out.data()[i], 7.0f);
}

}  // namespace
}  // namespace paged_tests
}  // namespace attnforge
