// Work shared by the calling thread and helpers from XLA's thread pool (the FFI ThreadPool context).
//
// Items are claimed from an atomic counter, so a helper that starts late finds nothing left and the
// caller never waits on queued work; it only spins until items already claimed are done. Which thread
// computes an item never changes its result (each kernel computes an item alone), so the split is free.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace flaxchat {

// Runs work(i) for i in [0, items). `worth` caps the helpers: small calls are not worth waking one for.
// `work` is copied into state the helpers share, so it must capture by value.
template <typename Work>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int64_t worth, Work work) {
  struct State {
    State(Work w, int64_t n) : work(std::move(w)), items(n) {}
    Work work;
    int64_t items;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};

    void Run() {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        work(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(work), items);
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), cores - 1, items - 1, worth});
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state] { state->Run(); });
  state->Run();
  while (state->done.load(std::memory_order_acquire) < items) _mm_pause();
}

}  // namespace flaxchat
