// metrics.jsonl writer and progress/ETA formatting.
#include "framework/metrics.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "framework/error.h"

namespace loom {

MetricsLog::MetricsLog(const std::string& path) : path_(path) {
  if (path.empty()) return;
  std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  file_ = std::fopen(path.c_str(), "a");
  LOOM_CHECK(file_ != nullptr) << "cannot open metrics file " << path << ": " << std::strerror(errno);
}

MetricsLog::~MetricsLog() {
  if (file_ != nullptr) std::fclose(file_);
}

void MetricsLog::write(const nlohmann::json& record) {
  if (file_ == nullptr) return;
  // Invalid UTF-8 (e.g. bytes sampled from a byte-level model) is replaced, never fatal.
  std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  LOOM_CHECK(std::fwrite(line.data(), 1, line.size(), file_) == line.size())
      << "writing " << path_ << " failed: " << std::strerror(errno);
  std::fflush(file_);
}

ProgressMeter::ProgressMeter(int64_t first_step, int64_t total_steps)
    : first_step_(first_step), total_steps_(total_steps), current_step_(first_step), start_(Clock::now()),
      window_start_(start_) {}

void ProgressMeter::step_done(int64_t step, int64_t tokens) {
  current_step_ = step;
  window_tokens_ += tokens;
}

double ProgressMeter::tokens_per_second() const {
  double seconds = std::chrono::duration<double>(Clock::now() - window_start_).count();
  return seconds > 0 ? static_cast<double>(window_tokens_) / seconds : 0.0;
}

double ProgressMeter::seconds_remaining() const {
  int64_t done = current_step_ - first_step_;
  if (done <= 0) return 0.0;
  double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  return elapsed / static_cast<double>(done) * static_cast<double>(total_steps_ - current_step_);
}

void ProgressMeter::window_reset() {
  window_start_ = Clock::now();
  window_tokens_ = 0;
}

std::string ProgressMeter::bar(int width) const {
  double fraction = total_steps_ > 0 ? static_cast<double>(current_step_) / static_cast<double>(total_steps_) : 1.0;
  fraction = std::clamp(fraction, 0.0, 1.0);
  int filled = static_cast<int>(fraction * width + 0.5);
  return fmt::format("[{}{}] {}/{} {:.0f}% | {} tok/s | ETA {}", std::string(filled, '#'),
                     std::string(width - filled, '.'), current_step_, total_steps_, 100 * fraction,
                     format_count(tokens_per_second()), format_duration(seconds_remaining()));
}

std::string format_duration(double seconds) {
  if (!(seconds >= 0)) return "?";
  auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

std::string format_count(double value) {
  if (value >= 1e9) return fmt::format("{:.2f}G", value / 1e9);
  if (value >= 1e6) return fmt::format("{:.2f}M", value / 1e6);
  if (value >= 1e3) return fmt::format("{:.1f}k", value / 1e3);
  return fmt::format("{:.0f}", value);
}

std::string format_bytes(double bytes) {
  if (bytes >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024 * 1024));
  if (bytes >= 1024.0 * 1024) return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024));
  if (bytes >= 1024.0) return fmt::format("{:.1f} KiB", bytes / 1024.0);
  return fmt::format("{:.0f} B", bytes);
}

bool stdout_is_terminal() {
  // Under mpirun, ranks write to a pseudo-terminal even when the launcher's
  // output is a file or a pipe, so a launcher's environment counts as "not a terminal".
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var) != nullptr) return false;
  return isatty(STDOUT_FILENO) == 1;
}

}  // namespace loom
