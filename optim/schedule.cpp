// Learning-rate schedules (formulas in schedule.h).
#include "optim/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "framework/error.h"

namespace loom {

LrScheduleKind lr_schedule_kind_from_name(const std::string& name) {
  if (name == "constant") return LrScheduleKind::constant;
  if (name == "cosine") return LrScheduleKind::cosine;
  if (name == "linear") return LrScheduleKind::linear;
  if (name == "wsd") return LrScheduleKind::wsd;
  LOOM_FAIL() << "unknown lr schedule '" << name << "' (choose constant, cosine, linear or wsd)";
}

const char* lr_schedule_kind_name(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::constant: return "constant";
    case LrScheduleKind::cosine: return "cosine";
    case LrScheduleKind::linear: return "linear";
    case LrScheduleKind::wsd: return "wsd";
  }
  LOOM_FAIL() << "unknown lr schedule kind " << static_cast<int>(kind);
}

void LrSchedule::validate() const {
  const char* name = lr_schedule_kind_name(kind);  // throws on an unknown kind
  LOOM_CHECK(std::isfinite(lr) && lr >= 0.0) << name << " schedule: lr " << lr << " must be finite and >= 0";
  LOOM_CHECK(std::isfinite(min_lr) && min_lr >= 0.0) << name << " schedule: min_lr " << min_lr << " must be >= 0";
  LOOM_CHECK(min_lr <= lr) << name << " schedule: min_lr " << min_lr << " is above lr " << lr;
  LOOM_CHECK(total_steps >= 1) << name << " schedule: total_steps " << total_steps << " must be >= 1";
  LOOM_CHECK(warmup_steps >= 0 && warmup_steps <= total_steps)
      << name << " schedule: warmup_steps " << warmup_steps << " must lie in [0, total_steps " << total_steps << "]";
  if (kind == LrScheduleKind::wsd) {
    LOOM_CHECK(decay_steps >= 1) << "wsd schedule: decay_steps " << decay_steps << " must be >= 1";
    LOOM_CHECK(warmup_steps + decay_steps <= total_steps)
        << "wsd schedule: warmup_steps " << warmup_steps << " + decay_steps " << decay_steps
        << " exceed total_steps " << total_steps;
  }
}

double LrSchedule::lr_at(int64_t step) const {
  validate();
  LOOM_CHECK(step >= 0) << lr_schedule_kind_name(kind) << " schedule: step " << step << " must be >= 0";
  if (step < warmup_steps) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  // Fraction of the decay done at `step`, for a decay of `length` steps from `start`.
  auto progress = [step](int64_t start, int64_t length) {
    if (length <= 0) return 1.0;  // no room to decay (warmup == total): at or past the end
    double p = static_cast<double>(step - start) / static_cast<double>(length);
    return std::clamp(p, 0.0, 1.0);
  };
  switch (kind) {
    case LrScheduleKind::constant: return lr;
    case LrScheduleKind::cosine: {
      double p = progress(warmup_steps, total_steps - warmup_steps);
      return min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
    }
    case LrScheduleKind::linear: return lr + (min_lr - lr) * progress(warmup_steps, total_steps - warmup_steps);
    case LrScheduleKind::wsd: {
      int64_t decay_start = total_steps - decay_steps;
      if (step < decay_start) return lr;
      return lr + (min_lr - lr) * progress(decay_start, decay_steps);
    }
  }
  LOOM_FAIL() << "unknown lr schedule kind " << static_cast<int>(kind);
}

}  // namespace loom
