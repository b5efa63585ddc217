// Tensor layout, views, dtype conversions, printing, RNG.
#include <gtest/gtest.h>

#include <cmath>

#include "framework/random.h"
#include "framework/tensor.h"
#include "tests/testing.h"

namespace loom {
namespace {

TEST(Tensor, ContiguousLayoutAndViews) {
  Tensor t = Tensor::arange(24, DType::f32).view({2, 3, 4});
  EXPECT_EQ(t.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(t.strides(), (Shape{12, 4, 1}));
  EXPECT_TRUE(t.is_contiguous());
  Tensor tr = t.transpose(0, 2);  // (4, 3, 2)
  EXPECT_FALSE(tr.is_contiguous());
  EXPECT_TRUE(tr.shares_storage(t));
  EXPECT_EQ(tr.shape(), (Shape{4, 3, 2}));
  // element [i][j][k] of the transpose is t[k][j][i] = 12k + 4j + i
  std::vector<float> v = tr.to_vector<float>();
  EXPECT_EQ(v[(1 * 3 + 2) * 2 + 1], 12 * 1 + 4 * 2 + 1);
  Tensor c = tr.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_FALSE(c.shares_storage(t));
  EXPECT_EQ(c.to_vector<float>(), v);
}

TEST(Tensor, SliceNarrowSelect) {
  Tensor t = Tensor::arange(20, DType::f64).view({4, 5});
  Tensor s = t.slice(1, 1, 5, 2);  // columns 1, 3
  EXPECT_EQ(s.shape(), (Shape{4, 2}));
  EXPECT_EQ(s.to_vector<double>(), (std::vector<double>{1, 3, 6, 8, 11, 13, 16, 18}));
  Tensor n = t.narrow(0, 2, 2);
  EXPECT_EQ(n.to_vector<double>().front(), 10);
  EXPECT_EQ(t.select(1, -1).to_vector<double>(), (std::vector<double>{4, 9, 14, 19}));
  // Writes through a view land in the base tensor.
  Tensor col = t.select(1, 0);
  col.fill_(-1.0);
  EXPECT_EQ(t.to_vector<double>()[5], -1.0);
  EXPECT_EQ(t.to_vector<double>()[6], 6.0);
}

TEST(Tensor, ViewErrorsNameTheShapes) {
  Tensor t = Tensor::zeros({3, 4});
  try {
    t.view({5, 3});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("(5, 3)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("(3, 4)"), std::string::npos) << msg;
  }
  EXPECT_THROW(t.transpose(0, 1).view({12}), Error);
  EXPECT_EQ(t.transpose(0, 1).reshape({12}).numel(), 12);
  EXPECT_THROW(t.narrow(1, 3, 2), Error);
  EXPECT_THROW(t.select(2, 0), Error);
  EXPECT_THROW(t.data<double>(), Error);
  EXPECT_EQ(t.view({-1, 2}).shape(), (Shape{6, 2}));
}

TEST(Tensor, ExpandBroadcastsWithZeroStride) {
  Tensor t = Tensor::from_vector<float>({1, 2, 3}, {3, 1});
  Tensor e = t.expand({2, 3, 4});
  EXPECT_EQ(e.strides(), (Shape{0, 1, 0}));
  EXPECT_EQ(e.to_vector<float>()[4 + 1], 2.0f);
  EXPECT_THROW(t.expand({3, 2, 2}).numel() == 0 ? void() : (void)t.expand({2, 2}), Error);
  EXPECT_EQ(broadcast_shapes({3, 1}, {1, 5}), (Shape{3, 5}));
  EXPECT_THROW(broadcast_shapes({3, 2}, {4, 2}), Error);
}

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(float(bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3*2^-8 is halfway between 1+2^-7 and 1+2^-6... ties to even mantissa (1 + 2^-6).
  EXPECT_EQ(float(bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  // Just above halfway rounds up.
  EXPECT_EQ(float(bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20))), 1.0f + std::ldexp(1.0f, -7));
  EXPECT_TRUE(std::isnan(float(bf16(NAN))));
  EXPECT_TRUE(std::isinf(float(bf16(INFINITY))));
  EXPECT_EQ(float(bf16(-2.5f)), -2.5f);
}

TEST(DType, F16RoundsToNearestEvenIncludingSubnormals) {
  EXPECT_EQ(float(f16(1.0f + std::ldexp(1.0f, -11))), 1.0f);  // halfway, ties to even
  EXPECT_EQ(float(f16(1.0f + 3 * std::ldexp(1.0f, -11))), 1.0f + std::ldexp(1.0f, -9));
  EXPECT_EQ(float(f16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(float(f16(65520.0f))));  // rounds past the largest finite half
  EXPECT_EQ(float(f16(std::ldexp(1.0f, -24))), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(float(f16(std::ldexp(1.0f, -25))), 0.0f);                    // halfway to 0: even
  EXPECT_EQ(float(f16(std::ldexp(3.0f, -26))), std::ldexp(1.0f, -24));   // above halfway
  EXPECT_EQ(float(f16(std::ldexp(3.0f, -25))), std::ldexp(2.0f, -24));   // 1.5 ulp: ties to even 2
  // Every finite half value round-trips exactly.
  for (uint32_t bits = 0; bits < 0x7c00; ++bits) {
    float x = f16_bits_to_float(static_cast<uint16_t>(bits));
    ASSERT_EQ(float_to_f16_bits(x), bits) << bits;
  }
}

TEST(Tensor, DtypeConversionsAndPrinting) {
  Tensor t = Tensor::from_vector<float>({1.5f, -2.25f, 3.0f, 1e-3f}, {2, 2});
  for (DType d : {DType::f64, DType::bf16, DType::f16, DType::i64, DType::i32}) {
    Tensor back = t.to(d).to(DType::f32);
    std::vector<float> v = back.to_vector<float>();
    if (is_floating(d)) {
      EXPECT_EQ(v[0], 1.5f) << d;
      EXPECT_EQ(v[1], -2.25f) << d;
    } else {
      EXPECT_EQ(v[0], 1.0f) << d;
      EXPECT_EQ(v[1], -2.0f) << d;
    }
  }
  std::string s = t.str();
  EXPECT_NE(s.find("(2, 2) f32 cpu"), std::string::npos) << s;
  EXPECT_NE(s.find("-2.25"), std::string::npos) << s;
  EXPECT_EQ(Tensor::arange(100).str().find("...") != std::string::npos, true);
}

TEST(Random, PhiloxMatchesTheReferenceVector) {
  // Known-answer test of Philox-4x32-10 (Random123): counter 0, key 0.
  uint32_t out[4];
  philox4x32(0, 0, 0, out);
  EXPECT_EQ(out[0], 0x6627e8d5u);
  EXPECT_EQ(out[1], 0xe169c58du);
  EXPECT_EQ(out[2], 0xbc57ac4cu);
  EXPECT_EQ(out[3], 0x9b00dbd8u);
}

TEST(Random, SameSeedSameNumbersUnderAnySplit) {
  Tensor whole = Tensor::empty({10, 7}, DType::f64);
  fill_normal(whole, 0.0, 1.0, 42, 0);
  // A "rank" filling rows 4..9 with the matching counter gets the same values.
  Tensor part = Tensor::empty({6, 7}, DType::f64);
  fill_normal(part, 0.0, 1.0, 42, 4 * 7);
  EXPECT_TENSOR_CLOSE(part, whole.narrow(0, 4, 6), 0, 0);
  Tensor other = Tensor::empty({10, 7}, DType::f64);
  fill_normal(other, 0.0, 1.0, 43, 0);
  EXPECT_NE(other.to_vector<double>()[0], whole.to_vector<double>()[0]);
  // Moments of a large sample.
  Tensor big = Tensor::empty({100000}, DType::f64);
  Generator gen(7);
  fill_normal(big, 0.0, 1.0, gen);
  EXPECT_EQ(gen.counter(), 100000u);
  double sum = 0, sq = 0;
  for (double v : big.to_vector<double>()) {
    sum += v;
    sq += v * v;
  }
  EXPECT_NEAR(sum / 1e5, 0.0, 0.02);
  EXPECT_NEAR(sq / 1e5, 1.0, 0.02);
}

TEST(Storage, MemoryStatsTrackLiveBytes) {
  MemoryStats before = memory_stats(Device::cpu());
  {
    Tensor t = Tensor::empty({1000}, DType::f64);
    EXPECT_EQ(memory_stats(Device::cpu()).current_bytes, before.current_bytes + 8000);
  }
  EXPECT_EQ(memory_stats(Device::cpu()).current_bytes, before.current_bytes);
}

TEST(Device, ParseAndErrors) {
  EXPECT_EQ(Device::parse("cuda:3"), Device::cuda(3));
  EXPECT_EQ(Device::parse("cpu"), Device::cpu());
  EXPECT_THROW(Device::parse("cuda:x"), Error);
  EXPECT_THROW(Device::parse("tpu"), Error);
  EXPECT_THROW(dtype_from_name("f8"), Error);
}

TEST(Cuda, DeviceTensorsRoundTrip) {
  LOOM_SKIP_WITHOUT_GPU();
  Tensor host = testing::random_tensor({17, 33}, 5, DType::f32);
  Tensor dev = host.to(Device::cuda(0));
  EXPECT_EQ(dev.device(), Device::cuda(0));
  EXPECT_TENSOR_CLOSE(dev.to(Device::cpu()), host, 0, 0);
  // Non-contiguous views and casts on device data.
  EXPECT_TENSOR_CLOSE(dev.transpose(0, 1).contiguous().to(Device::cpu()), host.transpose(0, 1), 0, 0);
  EXPECT_TENSOR_CLOSE(dev.to(DType::bf16).to(Device::cpu()), host.to(DType::bf16), 0, 0);
  EXPECT_GT(memory_stats(Device::cuda(0)).current_bytes, 0);
}

}  // namespace
}  // namespace loom
