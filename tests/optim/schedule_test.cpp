// Learning-rate schedules at the key steps (0, warmup-1, warmup, middle, last,
// end and beyond) against their closed forms, and the configuration errors.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "framework/error.h"
#include "optim/schedule.h"

namespace loom {
namespace {

constexpr double kLr = 1e-3, kMinLr = 1e-4;

LrSchedule make(LrScheduleKind kind, int64_t warmup = 10, int64_t total = 110, int64_t decay = 0) {
  LrSchedule s;
  s.kind = kind;
  s.lr = kLr;
  s.min_lr = kMinLr;
  s.warmup_steps = warmup;
  s.total_steps = total;
  s.decay_steps = decay;
  return s;
}

void expect_warmup(const LrSchedule& s) {
  EXPECT_DOUBLE_EQ(s.lr_at(0), kLr / 10);      // lr * 1 / warmup
  EXPECT_DOUBLE_EQ(s.lr_at(4), kLr * 5 / 10);  // lr * (step + 1) / warmup
  EXPECT_DOUBLE_EQ(s.lr_at(9), kLr);           // warmup - 1: full lr
}

TEST(LrSchedule, Constant) {
  LrSchedule s = make(LrScheduleKind::constant);
  expect_warmup(s);
  for (int64_t step : {10, 60, 109, 110, 500}) EXPECT_DOUBLE_EQ(s.lr_at(step), kLr) << step;
  s.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(s.lr_at(0), kLr);
}

TEST(LrSchedule, WarmupCosine) {
  LrSchedule s = make(LrScheduleKind::cosine);  // decay over steps 10 .. 110
  expect_warmup(s);
  auto cosine = [](double p) { return kMinLr + (kLr - kMinLr) * 0.5 * (1 + std::cos(std::numbers::pi * p)); };
  EXPECT_DOUBLE_EQ(s.lr_at(10), kLr);                      // decay starts at the full lr
  EXPECT_DOUBLE_EQ(s.lr_at(60), (kLr + kMinLr) / 2);       // halfway: the mean
  EXPECT_DOUBLE_EQ(s.lr_at(35), cosine(0.25));
  EXPECT_DOUBLE_EQ(s.lr_at(109), cosine(99.0 / 100.0));    // last step
  EXPECT_DOUBLE_EQ(s.lr_at(110), kMinLr);                  // end
  EXPECT_DOUBLE_EQ(s.lr_at(1000), kMinLr);                 // beyond: stays at min_lr
}

TEST(LrSchedule, WarmupLinear) {
  LrSchedule s = make(LrScheduleKind::linear);
  expect_warmup(s);
  EXPECT_DOUBLE_EQ(s.lr_at(10), kLr);
  EXPECT_DOUBLE_EQ(s.lr_at(60), (kLr + kMinLr) / 2);
  EXPECT_DOUBLE_EQ(s.lr_at(35), kLr + (kMinLr - kLr) * 0.25);
  EXPECT_DOUBLE_EQ(s.lr_at(109), kLr + (kMinLr - kLr) * 0.99);
  EXPECT_DOUBLE_EQ(s.lr_at(110), kMinLr);
  EXPECT_DOUBLE_EQ(s.lr_at(200), kMinLr);
}

TEST(LrSchedule, WarmupStableDecay) {
  LrSchedule s = make(LrScheduleKind::wsd, 10, 110, 20);  // stable 10 .. 89, decay 90 .. 110
  expect_warmup(s);
  EXPECT_DOUBLE_EQ(s.lr_at(10), kLr);
  EXPECT_DOUBLE_EQ(s.lr_at(50), kLr);
  EXPECT_DOUBLE_EQ(s.lr_at(89), kLr);  // last stable step
  EXPECT_DOUBLE_EQ(s.lr_at(90), kLr);  // decay starts at the full lr
  EXPECT_DOUBLE_EQ(s.lr_at(100), (kLr + kMinLr) / 2);
  EXPECT_DOUBLE_EQ(s.lr_at(109), kLr + (kMinLr - kLr) * 19.0 / 20.0);
  EXPECT_DOUBLE_EQ(s.lr_at(110), kMinLr);
  EXPECT_DOUBLE_EQ(s.lr_at(111), kMinLr);
}

TEST(LrSchedule, WarmupEqualToTotalNeverDecays) {
  LrSchedule s = make(LrScheduleKind::cosine, 5, 5);
  EXPECT_DOUBLE_EQ(s.lr_at(4), kLr);
  EXPECT_DOUBLE_EQ(s.lr_at(5), kMinLr);  // past the end
}

TEST(LrSchedule, KindNames) {
  for (auto kind : {LrScheduleKind::constant, LrScheduleKind::cosine, LrScheduleKind::linear, LrScheduleKind::wsd})
    EXPECT_EQ(lr_schedule_kind_from_name(lr_schedule_kind_name(kind)), kind);
}

template <typename Fn>
void expect_error(Fn&& fn, const std::string& part) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning " << part;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << "'" << part << "' not in: " << e.what();
  }
}

TEST(LrSchedule, ErrorsNameTheValues) {
  expect_error([] { make(LrScheduleKind::cosine, 200, 100).lr_at(0); }, "warmup_steps 200");
  expect_error([] { make(LrScheduleKind::cosine, 200, 100).lr_at(0); }, "total_steps 100");
  LrSchedule s = make(LrScheduleKind::linear);
  s.min_lr = 0.5;
  expect_error([&] { s.lr_at(0); }, "min_lr 0.5 is above lr 0.001");
  expect_error([] { lr_schedule_kind_from_name("cosin"); }, "unknown lr schedule 'cosin'");
  expect_error([] { make(LrScheduleKind::wsd, 10, 100, 0).lr_at(0); }, "decay_steps 0");
  expect_error([] { make(LrScheduleKind::wsd, 10, 100, 95).lr_at(0); }, "decay_steps 95 exceed total_steps 100");
  expect_error([] { make(LrScheduleKind::constant).lr_at(-1); }, "step -1");
  expect_error([] { make(LrScheduleKind::constant, 0, 0).lr_at(0); }, "total_steps 0");
  LrSchedule bad_kind = make(LrScheduleKind::constant);
  bad_kind.kind = static_cast<LrScheduleKind>(42);
  expect_error([&] { bad_kind.lr_at(0); }, "unknown lr schedule kind 42");
}

}  // namespace
}  // namespace loom
