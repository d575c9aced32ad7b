// Progress, cancellation and last-run state of the CPU center_syrk calls (see status.h).
#include "status.h"

#include <functional>
#include <mutex>
#include <thread>
#include <unordered_set>

namespace refframe::cpu {

CovarianceProgress& covariance_progress() {
  static CovarianceProgress progress;
  return progress;
}

ProgressScope::ProgressScope(int64_t n) : id_(covariance_progress().calls.fetch_add(1) + 1) {
  covariance_progress().owner.store(id_);
  covariance_progress().done.store(0);
  covariance_progress().total.store(n);
}

void ProgressScope::advance(int64_t rows) const {
  if (covariance_progress().owner.load(std::memory_order_relaxed) == id_)
    covariance_progress().done.store(rows, std::memory_order_relaxed);
}

ProgressScope::~ProgressScope() {
  if (covariance_progress().owner.load() != id_) return;
  covariance_progress().total.store(0);
  covariance_progress().done.store(0);
}

LastCovariance& last_covariance() {
  static LastCovariance last;
  return last;
}

namespace {
std::mutex cancel_mutex;
std::unordered_set<uint64_t>& cancelled() {
  static std::unordered_set<uint64_t> keys;
  return keys;
}
}  // namespace

uint64_t thread_key() { return static_cast<uint64_t>(std::hash<std::thread::id>{}(std::this_thread::get_id())); }

void request_cancel(uint64_t key) {
  const std::lock_guard<std::mutex> lock(cancel_mutex);
  cancelled().insert(key);
}

void clear_cancel(uint64_t key) {
  const std::lock_guard<std::mutex> lock(cancel_mutex);
  cancelled().erase(key);
}

bool cancel_requested(uint64_t key) {
  const std::lock_guard<std::mutex> lock(cancel_mutex);
  return cancelled().count(key) != 0;
}

}  // namespace refframe::cpu
