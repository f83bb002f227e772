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

// Calls body(worker, item) once for every item in [0, n_items). Items are claimed in
// increasing order from a shared counter, so a caller that orders its items from most
// to least expensive gets longest-first balancing. The calling thread is worker 0 and
// works too. Each item must be computed the same way whichever worker takes it; then
// the result does not depend on the number of threads.
// Not to be called from inside a task of the same pool (the caller blocks on a barrier).
template <typename Body>
void parallel_for_items(const Eigen::ThreadPoolDevice* device, Index n_items, Body&& body) {
  const int workers = static_cast<int>(std::min<Index>(worker_count(device), n_items));
  if (workers <= 1) {
    for (Index item = 0; item < n_items; ++item) body(0, item);
    return;
  }
  std::atomic<Index> next_item{0};
  auto run = [&](int worker) {
    for (Index item = next_item.fetch_add(1); item < n_items; item = next_item.fetch_add(1)) {
      body(worker, item);
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

}  // namespace attnforge::detail
