// What a CPU center_syrk call shows and takes from outside while it runs: its progress, a request
// to cancel it, and which kernel set the last call ran. Read from Python through module.cpp; the
// driver (center_syrk.cpp) moves the counters and checks for a cancel once per row block.
#pragma once

#include <atomic>
#include <cstdint>

namespace refframe::cpu {

// Rows of W done by the running CPU center_syrk call and its row count (both 0 when none runs), for
// a progress display. One process-wide pair: two calls running at once would share it.
struct CovarianceProgress {
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> total{0};
  std::atomic<int64_t> owner{0};  // the call the counters belong to: the one that started last
  std::atomic<int64_t> calls{0};
};
CovarianceProgress& covariance_progress();

// Owns the progress counters from the start of a call (n rows) to its end, however it ends. Only
// the call that owns the counters moves them: an older call still running (one abandoned after an
// interrupt) cannot reset or advance a newer call's progress.
class ProgressScope {
 public:
  explicit ProgressScope(int64_t n);
  ProgressScope(const ProgressScope&) = delete;
  ProgressScope& operator=(const ProgressScope&) = delete;
  ~ProgressScope();
  void advance(int64_t rows) const;  // the first `rows` rows are done

 private:
  const int64_t id_;
};

// What the last CPU center_syrk call that got as far as multiplying ran: its kernel set (a set with
// exact bf16 products can hand W to its fallback) and the number of columns it multiplied (d, or
// more with split columns). Null and 0 before the first call.
struct LastCovariance {
  std::atomic<const char*> set{nullptr};
  std::atomic<int64_t> columns{0};
};
LastCovariance& last_covariance();

// Cancellation, per calling thread: request_cancel(key) stops the center_syrk call running in the
// thread whose thread_key() is key at its next row block (it throws "center_syrk: cancelled"), or
// the next call that thread starts; clear_cancel(key) withdraws the request. So an interrupted
// build need not wait for its covariance, and no other call is touched.
uint64_t thread_key();
void request_cancel(uint64_t key);
void clear_cancel(uint64_t key);
bool cancel_requested(uint64_t key);

}  // namespace refframe::cpu
