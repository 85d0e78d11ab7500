// Work shared by the calling thread and one helper thread.
//
// Items are claimed from an atomic counter, so a helper that starts late finds nothing left and the
// caller never waits on queued work; it only waits until items already claimed are done. Which thread
// computes an item never changes its result (each kernel computes an item alone), so the split is free.
//
// The helper is this library's own thread, not one of XLA's pool: a decode step makes ~150 kernel calls
// of 50-200 us each, and a pool thread woken per call arrived too late to take much of the work (measured:
// +25 % at one row instead of ~2x). Ours spins briefly after each job (the next call of a step follows
// within tens of microseconds), then sleeps until the next call wakes it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace flaxchat {

// One call's shared work: items claimed from `next`, `grain` consecutive ones at a time; `done` counts
// finished ones.
struct Job {
  virtual ~Job() = default;
  virtual void Item(int64_t i) = 0;
  int64_t items = 0;
  int64_t grain = 1;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> helper_done{false};  // set by the helper after its last access to this job

  void Run() {
    for (int64_t i; (i = next.fetch_add(grain, std::memory_order_relaxed)) < items;) {
      const int64_t end = std::min(i + grain, items);
      for (int64_t j = i; j < end; ++j) Item(j);
      done.fetch_add(end - i, std::memory_order_release);
    }
  }
};

// The helper thread. A job is handed over through `offered_`: the caller publishes it, the helper claims it
// with a compare-exchange before touching it, and the caller, when done itself, takes it back with the same
// compare-exchange; whichever exchange wins decides whether the helper runs the job, so the caller knows
// whether to wait for `helper_done` before its job (on its stack) goes away.
class Helper {
 public:
  static Helper& Get() {
    static Helper* helper = new Helper();  // never destroyed: the thread sleeps at exit
    return *helper;
  }

  // Offers `job`; false when another call's job is on offer.
  bool Offer(Job* job) {
    Job* expected = nullptr;
    if (!offered_.compare_exchange_strong(expected, job)) return false;
    if (sleeping_.load()) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_one();
    }
    return true;
  }

  // After the caller's own share: takes the offer back, or waits for the helper that claimed it.
  void Finish(Job* job) {
    Job* expected = job;
    if (offered_.compare_exchange_strong(expected, nullptr)) return;  // never claimed
    while (!job->helper_done.load(std::memory_order_acquire)) _mm_pause();
  }

 private:
  Helper() { std::thread([this] { Loop(); }).detach(); }

  void Loop() {
    using Clock = std::chrono::steady_clock;
    constexpr auto kSpin = std::chrono::microseconds(200);
    auto idle_since = Clock::now();
    for (;;) {
      Job* job = offered_.load();
      if (job != nullptr) {
        if (offered_.compare_exchange_strong(job, nullptr)) {  // claimed: the caller waits for us now
          job->Run();
          job->helper_done.store(true, std::memory_order_release);  // last access to the job
          idle_since = Clock::now();
        }
        continue;
      }
      if (Clock::now() - idle_since < kSpin) {
        _mm_pause();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      sleeping_.store(true);
      wake_.wait(lock, [this] { return offered_.load() != nullptr; });
      sleeping_.store(false);
      idle_since = Clock::now();
    }
  }

  std::atomic<Job*> offered_{nullptr};
  std::atomic<bool> sleeping_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

// Runs work(i) for i in [0, items) on the calling thread and, when `worth` > 0 and the machine has more
// than one core, on the helper too, each thread claiming `grain` consecutive items at a time. `pool`
// (XLA's) is not used (see the top of this file).
template <typename Work>
void ParallelFor(xla::ffi::ThreadPool& /*pool*/, int64_t items, int64_t worth, Work work, int64_t grain = 1) {
  struct Call final : Job {
    explicit Call(Work& w) : work(w) {}
    void Item(int64_t i) override { work(i); }
    Work& work;
  } call(work);
  call.items = items;
  call.grain = std::max<int64_t>(grain, 1);
  static const bool several_cores = std::thread::hardware_concurrency() > 1;
  const bool offered = several_cores && worth > 0 && items > 1 && Helper::Get().Offer(&call);
  call.Run();
  if (offered) Helper::Get().Finish(&call);
  while (call.done.load(std::memory_order_acquire) < items) _mm_pause();
}

}  // namespace flaxchat
