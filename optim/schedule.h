// Learning-rate schedules: lr_at(step) for the 0-based index of the step about
// to be taken. Every kind starts with a linear warmup
//     lr * (step + 1) / warmup_steps            for step < warmup_steps
// so the first step already moves (lr / warmup) and step warmup-1 runs at the
// full lr. After warmup, with progress p = (step - start) / length clamped to
// [0, 1]:
//   constant : lr
//   cosine   : min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,
//              start = warmup_steps, length = total_steps - warmup_steps
//   linear   : lr + (min_lr - lr) * p, same start and length as cosine
//   wsd      : warmup-stable-decay: lr until total_steps - decay_steps, then
//              linear decay to min_lr over the last decay_steps steps
//              (start = total_steps - decay_steps, length = decay_steps).
//              The decay shape is linear (the common choice for WSD; a
//              1-sqrt or cosine tail would be a new kind).
// The decays reach min_lr at step == total_steps (one past the last step, as
// in most trainers), and stay at min_lr beyond it.
#pragma once

#include <cstdint>
#include <string>

namespace loom {

enum class LrScheduleKind { constant, cosine, linear, wsd };

// "constant", "cosine", "linear", "wsd" (throws naming the value and the choices).
LrScheduleKind lr_schedule_kind_from_name(const std::string& name);
const char* lr_schedule_kind_name(LrScheduleKind kind);

struct LrSchedule {
  LrScheduleKind kind = LrScheduleKind::cosine;
  double lr = 3e-4;          // peak learning rate
  double min_lr = 0.0;       // floor of the decays (ignored by constant)
  int64_t warmup_steps = 0;  // 0 = no warmup
  int64_t total_steps = 1;   // training steps
  int64_t decay_steps = 0;   // wsd only: length of the final decay

  // Throws naming the values: lr < 0, min_lr < 0 or > lr, warmup > total,
  // total < 1, and for wsd decay_steps < 1 or warmup + decay_steps > total.
  void validate() const;
  // Learning rate for 0-based step `step` (>= 0). Validates first.
  double lr_at(int64_t step) const;
};

}  // namespace loom
