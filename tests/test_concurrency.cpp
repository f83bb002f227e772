// Concurrent callers: several threads, each with its own Attention (bound to one shared
// set of weights) and its own KVCache, or its own Sdpa, give the results of running the
// same work one caller after another, bit for bit, whether each caller computes on its
// own thread or all of them share one Eigen::ThreadPoolDevice. The TSan step of
// scripts/test.sh runs these tests (and the thread-count tests of the other files) under
// ThreadSanitizer, which checks that the sharing is race-free, not only that it gave
// the right numbers this time.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <thread>
#include <vector>

#include "attnforge/attnforge.hpp"
#include "attnforge/detail/parallel.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace {

constexpr int kCallers = 4;

// Runs work(caller) for every caller, all at once on their own threads (released
// together, so they overlap), and returns what each returned.
template <typename Result>
std::vector<Result> run_concurrently(const std::function<Result(int)>& work) {
  std::vector<Result> results(kCallers);
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int caller = 0; caller < kCallers; ++caller) {
    threads.emplace_back([&, caller] {
      ready.fetch_add(1);
      while (ready.load() < kCallers) std::this_thread::yield();
      results[static_cast<std::size_t>(caller)] = work(caller);
    });
  }
  for (std::thread& t : threads) t.join();
  return results;
}

template <typename Result>
std::vector<Result> run_sequentially(const std::function<Result(int)>& work) {
  std::vector<Result> results;
  for (int caller = 0; caller < kCallers; ++caller) results.push_back(work(caller));
  return results;
}

template <typename T, int Rank>
void expect_bitwise_equal(const std::vector<std::vector<Tensor<T, Rank>>>& actual,
                          const std::vector<std::vector<Tensor<T, Rank>>>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (std::size_t caller = 0; caller < actual.size(); ++caller) {
    ASSERT_EQ(actual[caller].size(), expected[caller].size());
    for (std::size_t step = 0; step < actual[caller].size(); ++step) {
      EXPECT_TRUE(test::bitwise_equal(actual[caller][step], expected[caller][step]))
          << "caller " << caller << ", step " << step;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Attention: one set of weights in caller memory, bound by every caller's module.

class ConcurrentAttention : public ::testing::Test {
 protected:
  static constexpr Index kBatch = 2, kDim = 64, kHeads = 4, kKvHeads = 2, kHeadDim = 16;
  static constexpr Index kPrefill = 11, kSteps = 4, kChunk = 3;
  static constexpr Index kTotal = kPrefill + kSteps + kChunk;

  ConcurrentAttention() {
    // The shared weights: drawn once (through a module's initialisation) and then only read.
    Attention<float> source(kDim, kHeads, kKvHeads, kHeadDim, /*qk_norm=*/true);
    source.reset_parameters(7);
    wq_ = source.wq().tensor();
    wk_ = source.wk().tensor();
    wv_ = source.wv().tensor();
    wo_ = source.wo().tensor();
    q_norm_ = test::random_uniform<float, 1>({kHeadDim}, 8, 0.5, 1.5);
    k_norm_ = test::random_uniform<float, 1>({kHeadDim}, 9, 0.5, 1.5);
    for (int caller = 0; caller < kCallers; ++caller) {
      inputs_.push_back(test::random_uniform<float, 3>({kBatch, kTotal, kDim},
                                                       100 + static_cast<std::uint32_t>(caller)));
    }
  }

  // One caller's session: a module bound to the shared weights, its own cache, a prefill,
  // single-token decode steps and a chunk; returns every step's output.
  std::vector<Tensor<float, 3>> session(int caller, const Eigen::ThreadPoolDevice* device) const {
    Attention<float> attn(kDim, kHeads, kKvHeads, kHeadDim, /*qk_norm=*/true);
    attn.bind_weights({wq_, wk_, wv_, wo_, q_norm_, k_norm_});
    attn.set_device(device);
    KVCache<float> cache(kBatch, kTotal, kKvHeads, kHeadDim);
    const ConstView<float, 3> x(inputs_[static_cast<std::size_t>(caller)]);
    std::vector<Tensor<float, 3>> outs;
    Index pos = 0;
    for (Index len : {kPrefill, Index(1), Index(1), Index(1), Index(1), kChunk}) {
      outs.push_back(attn.forward(x.narrow(1, pos, len), rope_, pos, &cache));
      pos += len;
    }
    // The whole sequence without a cache, on the same module.
    outs.push_back(attn.forward(x, rope_, 0));
    return outs;
  }

  Tensor<float, 2> wq_, wk_, wv_, wo_;
  Tensor<float, 1> q_norm_, k_norm_;
  const RotaryEmbedding<float> rope_{kHeadDim, 64};
  std::vector<Tensor<float, 3>> inputs_;
};

TEST_F(ConcurrentAttention, CallersWithOwnCachesOnSharedWeightsMatchSequentialRunsBitForBit) {
  using Outs = std::vector<Tensor<float, 3>>;
  const std::vector<Outs> sequential =
      run_sequentially<Outs>([&](int caller) { return session(caller, nullptr); });
  const std::vector<Outs> concurrent =
      run_concurrently<Outs>([&](int caller) { return session(caller, nullptr); });
  expect_bitwise_equal(concurrent, sequential);
}

TEST_F(ConcurrentAttention, CallersSharingOneThreadPoolDeviceMatchSequentialRunsBitForBit) {
  using Outs = std::vector<Tensor<float, 3>>;
  const std::vector<Outs> sequential =
      run_sequentially<Outs>([&](int caller) { return session(caller, nullptr); });
  for (int n_threads : {2, 3}) {
    SCOPED_TRACE(n_threads);
    const Eigen::ThreadPoolDevice& device = test::pool_device(n_threads);
    const std::vector<Outs> concurrent =
        run_concurrently<Outs>([&](int caller) { return session(caller, &device); });
    expect_bitwise_equal(concurrent, sequential);
  }
}

// ---------------------------------------------------------------------------------------
// SDPA: every caller its own Sdpa object (scratch is per object), one shared device,
// shared read-only inputs, and every path and mask kind at once.

struct SdpaInputs {
  Tensor<float, 4> q, k, v;
  Tensor<DocId, 2> doc_ids;
  Tensor<bool, 2> padding;
};

SdpaInputs sdpa_inputs() {
  SdpaInputs in;
  in.q = test::random_normal<float, 4>({2, 6, 40, 16}, 11);
  in.k = test::random_normal<float, 4>({2, 2, 70, 16}, 12);
  in.v = test::random_normal<float, 4>({2, 2, 70, 16}, 13);
  in.doc_ids = Tensor<DocId, 2>(2, 70);
  in.padding = Tensor<bool, 2>(2, 70);
  for (Index b = 0; b < 2; ++b) {
    for (Index j = 0; j < 70; ++j) {
      in.doc_ids(b, j) = j / (20 + 10 * b);
      in.padding(b, j) = (j + b) % 7 != 0;
    }
  }
  return in;
}

// Caller c runs path c % 4 with its own mask combination, several calls on one object
// (so scratch is reused while others run), returning out and lse of each call.
std::vector<Tensor<float, 4>> sdpa_session(int caller, const SdpaInputs& in,
                                           const Eigen::ThreadPoolDevice* device) {
  constexpr SdpaPath kPaths[] = {SdpaPath::kAuto, SdpaPath::kReference, SdpaPath::kFused,
                                 SdpaPath::kDecode};
  SdpaOptions options;
  options.path = kPaths[caller % 4];
  options.causal = true;
  options.softcap = caller % 2 == 0 ? 0.0 : 20.0;
  options.window = caller == 3 ? 25 : 0;
  Sdpa<float> sdpa(options, device);
  const ConstView<float, 4> k(in.k), v(in.v);
  const ConstView<DocId, 2> kv_ids(in.doc_ids);
  std::vector<Tensor<float, 4>> outs;
  for (Index q_len : {Index(40), Index(1), Index(7)}) {
    const ConstView<float, 4> q = ConstView<float, 4>(in.q).narrow(2, 0, q_len);
    Masks masks;
    masks.doc_ids = kv_ids.narrow(1, 70 - q_len, q_len);
    masks.kv_doc_ids = kv_ids;
    masks.key_padding_mask = in.padding;
    Tensor<float, 4> out(q.dimensions());
    Tensor<float, 3> lse(2, 6, q_len);
    sdpa(q, k, v, out, masks, lse);
    outs.push_back(out);
    outs.push_back(Tensor<float, 4>(lse.reshape(Eigen::array<Index, 4>{2, 6, q_len, 1})));
  }
  return outs;
}

TEST(ConcurrentSdpa, CallersWithOwnSdpaObjectsSharingOneDeviceMatchSequentialRuns) {
  using Outs = std::vector<Tensor<float, 4>>;
  const SdpaInputs in = sdpa_inputs();
  const std::vector<Outs> sequential =
      run_sequentially<Outs>([&](int caller) { return sdpa_session(caller, in, nullptr); });
  for (int n_threads : {2, 3}) {
    SCOPED_TRACE(n_threads);
    const Eigen::ThreadPoolDevice& device = test::pool_device(n_threads);
    const std::vector<Outs> concurrent =
        run_concurrently<Outs>([&](int caller) { return sdpa_session(caller, in, &device); });
    expect_bitwise_equal(concurrent, sequential);
  }
}

// Several requests reading one shared, already filled cache at once (e.g. a common
// prompt): KVCache::prefix() is a read-only view, safe to read from many threads.
TEST(ConcurrentSdpa, ReadersOfOneSharedCachePrefixMatchSequentialRuns) {
  constexpr Index kLen = 50;
  KVCache<float> shared(1, kLen, 2, 16);
  const Tensor<float, 4> keys = test::random_normal<float, 4>({1, 2, kLen, 16}, 21);
  const Tensor<float, 4> values = test::random_normal<float, 4>({1, 2, kLen, 16}, 22);
  shared.update(keys, values);
  const KVPrefix<float> prefix = shared.prefix();
  std::vector<Tensor<float, 4>> queries;
  for (int caller = 0; caller < kCallers; ++caller) {
    queries.push_back(
        test::random_normal<float, 4>({1, 4, 1, 16}, 30 + static_cast<std::uint32_t>(caller)));
  }
  using Outs = std::vector<Tensor<float, 4>>;
  // test::pool_device creates its pools lazily, unsynchronised: fetch before the threads.
  const Eigen::ThreadPoolDevice* pool = &test::pool_device(2);
  const auto work = [&](int caller) {
    SdpaOptions options;
    options.causal = true;
    Outs outs;
    for (const Eigen::ThreadPoolDevice* device :
         {static_cast<const Eigen::ThreadPoolDevice*>(nullptr), pool}) {
      outs.push_back(scaled_dot_product_attention(queries[static_cast<std::size_t>(caller)],
                                                  prefix.keys, prefix.values, options, {}, device));
    }
    return outs;
  };
  expect_bitwise_equal(run_concurrently<Outs>(work), run_sequentially<Outs>(work));
}

// The two work distributions of detail/parallel.hpp: every item runs exactly once, on a
// worker the pool has, and each worker meets its items in increasing order (both claim
// from one increasing counter; parallel_for_item_runs a run of consecutive items at a
// time). Under TSan this also checks that claiming and the barrier are race-free.
template <typename Distribute>
void expect_each_item_once(const Distribute& distribute) {
  for (const int n_threads : {1, 2, 3}) {
    for (const Index n_items : {0, 1, 2, 3, 7, 64, 1000}) {
      SCOPED_TRACE(::testing::Message() << n_threads << " threads, " << n_items << " items");
      const Eigen::ThreadPoolDevice* device =
          n_threads == 1 ? nullptr : &test::pool_device(n_threads);
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(n_items));
      // Per worker, written by that worker only.
      std::vector<std::vector<Index>> seen(static_cast<std::size_t>(n_threads));
      std::atomic<int> bad_worker{0};
      distribute(device, n_items, [&](int worker, Index item) {
        if (worker < 0 || worker >= n_threads) {
          bad_worker.fetch_add(1);
          return;
        }
        runs[static_cast<std::size_t>(item)].fetch_add(1);
        seen[static_cast<std::size_t>(worker)].push_back(item);
      });
      EXPECT_EQ(bad_worker.load(), 0);
      for (Index item = 0; item < n_items; ++item)
        EXPECT_EQ(runs[static_cast<std::size_t>(item)].load(), 1) << "item " << item;
      for (const std::vector<Index>& items : seen)
        EXPECT_TRUE(std::is_sorted(items.begin(), items.end()));
    }
  }
}

TEST(WorkDistribution, ParallelForItemsRunsEveryItemOnceInIncreasingOrderPerWorker) {
  expect_each_item_once([](const Eigen::ThreadPoolDevice* device, Index n, const auto& body) {
    detail::parallel_for_items(device, n, body);
  });
}

TEST(WorkDistribution, ParallelForItemRunsRunsEveryItemOnceInIncreasingOrderPerWorker) {
  expect_each_item_once([](const Eigen::ThreadPoolDevice* device, Index n, const auto& body) {
    detail::parallel_for_item_runs(device, n, body);
  });
}

// parallel_for_item_runs hands out runs, not single items: with 1000 items of equal cost on
// 2 workers, each claim takes a quarter of those left, 25 claims in all, so each
// worker's items fall into few stretches of consecutive items. (Claimed one at a time,
// workers busy at once alternate items: hundreds of stretches.)
TEST(WorkDistribution, ParallelForItemRunsGivesEachWorkerFewStretchesOfConsecutiveItems) {
  constexpr Index kItems = 1000;
  std::vector<std::vector<Index>> seen(2);
  detail::parallel_for_item_runs(&test::pool_device(2), kItems, [&](int worker, Index item) {
    seen[static_cast<std::size_t>(worker)].push_back(item);
    std::this_thread::sleep_for(std::chrono::microseconds(10));  // both workers take part
  });
  Index stretches = 0, items = 0;
  for (const std::vector<Index>& mine : seen) {
    items += static_cast<Index>(mine.size());
    for (std::size_t i = 0; i < mine.size(); ++i) stretches += i == 0 || mine[i] != mine[i - 1] + 1;
  }
  EXPECT_EQ(items, kItems);
  EXPECT_LE(stretches, 40);
}

}  // namespace
}  // namespace attnforge
