// Run visibility: metrics.jsonl (one JSON object per logged step, appended and
// flushed so a crash loses nothing already logged), the one-line step log and
// a live progress bar with throughput and ETA when stdout is a terminal.
#pragma once

#include <chrono>
#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

namespace loom {

class MetricsLog {
 public:
  // Opens `path` for appending (creating parent directories); an empty path disables it.
  explicit MetricsLog(const std::string& path);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  void write(const nlohmann::json& record);  // one line, flushed
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

// Tracks progress of a run of `total_steps` steps that starts at `first_step`
// (non-zero after a resume), for throughput and ETA.
class ProgressMeter {
 public:
  ProgressMeter(int64_t first_step, int64_t total_steps);
  // Call once per completed step with the tokens it processed (all ranks together).
  void step_done(int64_t step, int64_t tokens);
  double tokens_per_second() const;   // since the last call of window_reset()
  double seconds_remaining() const;   // from the average step time so far
  void window_reset();
  // "[#####.....] 120/200 60% | 12.3k tok/s | ETA 1m05s"
  std::string bar(int width = 24) const;

 private:
  using Clock = std::chrono::steady_clock;
  int64_t first_step_, total_steps_, current_step_;
  Clock::time_point start_, window_start_;
  int64_t window_tokens_ = 0;
};

std::string format_duration(double seconds);  // "1h02m", "3m05s", "12s"
std::string format_count(double value);       // 12300 -> "12.3k", 4.5e6 -> "4.50M"
std::string format_bytes(double bytes);       // "1.50 GiB"
bool stdout_is_terminal();

}  // namespace loom
