// Work distribution over the caller's Eigen::ThreadPoolDevice.
#pragma once

#include <algorithm>
#include <atomic>

#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// Number of workers a call may use: the pool's thread count (the calling thread is one
// of them), or 1 without a pool.
inline int worker_count(const Eigen::ThreadPoolDevice* device) {
  return device == nullptr ? 1 : std::max(1, device->numThreads());
}

// Calls body(worker, item) once for every item in [0, n_items). Workers claim runs of
// consecutive items from a shared counter, in increasing order, run_length(items left,
// workers) items at a time (at least 1), and call body on each item of a run in turn.
// The calling thread is worker 0 and works too. Each item must be computed the same way
// whichever worker takes it; then the result does not depend on the number of threads.
// Not to be called from inside a task of the same pool (the caller blocks on a barrier).
template <typename RunLength, typename Body>
void parallel_for_claimed_runs(const Eigen::ThreadPoolDevice* device, Index n_items,
                               RunLength run_length, Body& body) {
  const int workers = static_cast<int>(std::min<Index>(worker_count(device), n_items));
  if (workers <= 1) {
    for (Index item = 0; item < n_items; ++item) body(0, item);
    return;
  }
  std::atomic<Index> next_item{0};
  // Claims the next run [first, first + count); false when no item is left.
  const auto claim = [&](Index& first, Index& count) {
    first = next_item.load(std::memory_order_relaxed);
    do {
      if (first >= n_items) return false;
      count = std::max<Index>(1, run_length(n_items - first, workers));
    } while (!next_item.compare_exchange_weak(first, first + count, std::memory_order_relaxed));
    return true;
  };
  auto run = [&](int worker) {
    for (Index first = 0, count = 0; claim(first, count);) {
      for (Index item = first; item < first + count; ++item) body(worker, item);
    }
  };
  Eigen::Barrier barrier(static_cast<unsigned int>(workers - 1));
  // Each task is a self-contained closure handed straight to the pool's Schedule(), the
  // one scheduling call Eigen 3.4 and Eigen 5 share unchanged (Eigen 5 removed
  // ThreadPoolDevice::enqueue_with_barrier and marks enqueueNoNotification for removal).
  // `run` and `barrier` live on this frame until barrier.Wait() returns, which is after
  // every task has notified.
  Eigen::ThreadPoolInterface* pool = device->getPool();
  for (int worker = 1; worker < workers; ++worker) {
    pool->Schedule([&run, &barrier, worker] {
      run(worker);
      barrier.Notify();
    });
  }
  run(0);
  barrier.Wait();
}

// One item at a time: a caller that orders its items from most to least expensive gets
// longest-first balancing.
template <typename Body>
void parallel_for_items(const Eigen::ThreadPoolDevice* device, Index n_items, Body&& body) {
  parallel_for_claimed_runs(
      device, n_items, [](Index, int) { return Index{1}; }, body);
}

// For items of equal cost whose neighbours lie next to each other in memory (a decode's
// key chunks, in order): a worker claims a share of the items left (left / (2 * workers))
// at a time, so it reads on from where its last item ended, where the stream its kernel
// keeps ahead already runs into the next item, instead of starting each item cold; the
// shares shrink as the items run out, so the workers still finish together.
template <typename Body>
void parallel_for_item_runs(const Eigen::ThreadPoolDevice* device, Index n_items, Body&& body) {
  parallel_for_claimed_runs(
      device, n_items, [](Index left, int workers) { return left / (2 * workers); }, body);
}

}  // namespace attnforge::detail
