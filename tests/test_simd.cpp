// Checks the accuracy claims stated in detail/simd.hpp, and the online softmax of
// detail/online_softmax.hpp on hand-computed rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attnforge/detail/bf16_dot.hpp"
#include "attnforge/detail/online_softmax.hpp"
#include "attnforge/detail/simd.hpp"

namespace attnforge::detail {
namespace {

template <typename T, int kDegree = simd::kExp2Degree<T>>
std::vector<T> apply_exp2(const std::vector<T>& xs) {
  using Packet = simd::Packet<T>;
  constexpr int kSize = simd::kWidth<T>;
  std::vector<T> in = xs;
  in.resize((xs.size() + kSize - 1) / kSize * kSize, T(0));
  std::vector<T> out(in.size());
  for (std::size_t i = 0; i < in.size(); i += kSize) {
    simd::store(out.data() + i, simd::exp2<Packet, kDegree>(simd::load<Packet>(in.data() + i)));
  }
  out.resize(xs.size());
  return out;
}

// Max relative error of exp2 against std::exp2 in long double over a dense grid of
// [lo, hi), in units of the type's epsilon (1 ulp of a value in [1, 2)).
template <typename T, int kDegree = simd::kExp2Degree<T>>
double exp2_max_error_ulp(double lo, double hi, int points) {
  std::vector<T> xs(static_cast<std::size_t>(points));
  for (int i = 0; i < points; ++i) xs[i] = static_cast<T>(lo + (hi - lo) * i / points);
  const std::vector<T> ys = apply_exp2<T, kDegree>(xs);
  double worst = 0;
  for (int i = 0; i < points; ++i) {
    const long double ref = std::exp2(static_cast<long double>(xs[i]));
    const double rel = static_cast<double>(std::fabs((ys[i] - ref) / ref));
    worst = std::max(worst, rel);
  }
  return worst / std::numeric_limits<T>::epsilon();
}

TEST(Simd, Exp2FloatWithinOneUlpOverNormalRange) {
  EXPECT_LE(exp2_max_error_ulp<float>(-126.0, 128.0, 1 << 20), 1.0);
  // The softmax range, sampled densely.
  EXPECT_LE(exp2_max_error_ulp<float>(-30.0, 8.0, 1 << 20), 1.0);
}

TEST(Simd, Exp2DoubleWithinOneUlpOverNormalRange) {
  EXPECT_LE(exp2_max_error_ulp<double>(-1022.0, 1024.0, 1 << 18), 1.0);
  EXPECT_LE(exp2_max_error_ulp<double>(-30.0, 8.0, 1 << 18), 1.0);
}

TEST(Simd, Exp2IsExactAtIntegersAndZeroBelowRange) {
  const std::vector<float> xs{0.0f, 1.0f, -1.0f, 10.0f, -126.0f, 127.0f};
  const std::vector<float> ys = apply_exp2(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(ys[i], std::exp2(xs[i])) << xs[i];
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> flushed = apply_exp2(std::vector<float>{-126.5f, -200.0f, -inf});
  for (float y : flushed) EXPECT_EQ(y, 0.0f);  // masked scores (-inf) weigh exactly 0
  const std::vector<float> overflow = apply_exp2(std::vector<float>{128.0f, 1000.0f, inf});
  for (float y : overflow) EXPECT_EQ(y, inf);
  const std::vector<double> flushed_d =
      apply_exp2(std::vector<double>{-1022.5, -std::numeric_limits<double>::infinity()});
  for (double y : flushed_d) EXPECT_EQ(y, 0.0);
}

// The bf16 prefill's weights (kBf16WeightExp2Degree): the stated 5.6e-5 truncation error
// plus float rounding, at most 1/32 of the bf16 rounding (2^-9) that follows; still exact
// at integers and 0 below the range.
TEST(Simd, Exp2OfTheBf16WeightsDegreeIsWithinItsStatedError) {
  constexpr int kDegree = kBf16WeightExp2Degree;
  const double worst = exp2_max_error_ulp<float, kDegree>(-30.0, 8.0, 1 << 20) *
                       std::numeric_limits<float>::epsilon();
  EXPECT_LE(worst, 5.6e-5 + 4 * std::numeric_limits<float>::epsilon());
  EXPECT_LE(worst, std::exp2(-9.0) / 32);
  EXPECT_GE(worst, 1e-5);  // the degree is the lower one, not the full polynomial
  const std::vector<float> xs{0.0f, 1.0f, -1.0f, 10.0f, -126.0f, 127.0f};
  const std::vector<float> ys = apply_exp2<float, kDegree>(xs);
  for (std::size_t i = 0; i < xs.size(); ++i) EXPECT_EQ(ys[i], std::exp2(xs[i])) << xs[i];
  const float inf = std::numeric_limits<float>::infinity();
  for (float y : apply_exp2<float, kDegree>(std::vector<float>{-126.5f, -200.0f, -inf}))
    EXPECT_EQ(y, 0.0f);
}

TEST(Simd, TanhFloatWithinStatedAbsoluteError) {
  using Packet = simd::Packet<float>;
  constexpr int kSize = simd::kWidth<float>;
  double worst = 0;
  alignas(64) float in[kSize];
  alignas(64) float out[kSize];
  for (int i = 0; i < 400000; i += kSize) {
    for (int l = 0; l < kSize; ++l) in[l] = -20.0f + 40.0f * static_cast<float>(i + l) / 400000.0f;
    simd::store(out, simd::tanh(simd::load<Packet>(in)));
    for (int l = 0; l < kSize; ++l) {
      worst = std::max(
          worst, std::abs(static_cast<double>(out[l]) - std::tanh(static_cast<double>(in[l]))));
    }
  }
  EXPECT_LE(worst, 1.5e-7);
  RecordProperty("max_abs_error", std::to_string(worst));
}

// sum_each on a full and a half block of integers (exact in float): lane j is the sum of
// packet j's lanes, in the build's packet width (the shuffle tree under AVX-512).
template <typename Block, typename Packet>
void check_sum_each() {
  constexpr int kSize = simd::kSize<Packet>;
  Block block;
  alignas(64) float lanes[kSize];
  for (int j = 0; j < kSize; ++j) {
    for (int l = 0; l < kSize; ++l) lanes[l] = static_cast<float>(100 * j + l * (j % 3 + 1));
    block.packet[j] = simd::load<Packet>(lanes);
  }
  alignas(64) float sums[kSize];
  simd::store(sums, simd::sum_each(block));
  for (int j = 0; j < kSize; ++j) {
    const int expected = 100 * j * kSize + (j % 3 + 1) * kSize * (kSize - 1) / 2;
    EXPECT_EQ(sums[j], static_cast<float>(expected)) << "packet " << j << " of " << kSize;
  }
}

TEST(Simd, SumEachGivesEveryPacketsLaneSumInItsLane) {
  check_sum_each<simd::Block<float>, simd::Packet<float>>();
  check_sum_each<simd::HalfBlock<float>, simd::HalfPacket<float>>();
}

// store_as rounds a float packet to bf16 / fp16 bit for bit as static_cast does: ties,
// subnormals, the largest finite values, infinities and NaNs of either sign included.
template <typename S>
void check_store_as() {
  using Packet = simd::Packet<float>;
  constexpr int kSize = simd::kWidth<float>;
  std::vector<float> xs = {0.0f,
                           -0.0f,
                           1.0f,
                           1.00390625f,
                           1.01171875f,
                           1.0009765625f,
                           -3.3e-39f,
                           9.2e-41f,
                           1e-45f,
                           6.0e-8f,
                           3.0e-5f,
                           65504.0f,
                           65520.0f,
                           3.389e38f,
                           std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(),
                           -std::numeric_limits<float>::quiet_NaN()};
  for (int i = 0; i < 4000; ++i) xs.push_back(std::ldexp(std::sin(0.37f * i), i % 300 - 150));
  xs.resize((xs.size() + kSize - 1) / kSize * kSize, 0.5f);
  std::vector<S> got(xs.size());
  for (std::size_t i = 0; i < xs.size(); i += kSize)
    simd::store_as(got.data() + i, simd::load<Packet>(xs.data() + i));
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const S want = static_cast<S>(xs[i]);
    if (std::isnan(xs[i])) {
      EXPECT_TRUE(std::isnan(static_cast<float>(got[i])));
      EXPECT_EQ(std::signbit(static_cast<float>(got[i])), std::signbit(xs[i]));
    } else {
      std::uint16_t got_bits, want_bits;
      std::memcpy(&got_bits, &got[i], sizeof(got_bits));
      std::memcpy(&want_bits, &want, sizeof(want_bits));
      EXPECT_EQ(got_bits, want_bits) << xs[i];
    }
  }
}

TEST(Simd, StoreAsRoundsLikeStaticCast) {
  check_store_as<Eigen::bfloat16>();
  check_store_as<Eigen::half>();
}

// load_as widens every bf16 and fp16 value to the float static_cast gives (exact), and
// convert() widens and rounds whole rows as static_cast does, vector steps and tail alike:
// every 16-bit pattern, NaNs as NaNs of their sign.
template <typename S>
void check_widening() {
  using Packet = simd::Packet<float>;
  constexpr int kSize = simd::kWidth<float>;
  std::vector<S> all(65536 + 3);  // + 3: convert's scalar tail
  for (std::size_t i = 0; i < all.size(); ++i) {
    all[i] = Eigen::numext::bit_cast<S>(static_cast<std::uint16_t>(i));
  }
  std::vector<float> loaded(all.size()), converted(all.size());
  for (std::size_t i = 0; i + kSize <= all.size(); i += kSize)
    simd::store(loaded.data() + i, simd::load_as<Packet>(all.data() + i));
  detail::convert(all.data(), converted.data(), static_cast<Index>(all.size()));
  std::vector<S> rounded(all.size());
  detail::convert(converted.data(), rounded.data(), static_cast<Index>(all.size()));
  const auto same = [](float got, float want) {
    return std::isnan(want) ? std::isnan(got) && std::signbit(got) == std::signbit(want)
                            : std::memcmp(&got, &want, sizeof(got)) == 0;
  };
  for (std::size_t i = 0; i < all.size(); ++i) {
    const float want = static_cast<float>(all[i]);
    if (i < all.size() / kSize * kSize) {
      ASSERT_TRUE(same(loaded[i], want)) << i;
    }
    ASSERT_TRUE(same(converted[i], want)) << i;
    ASSERT_TRUE(same(static_cast<float>(rounded[i]), want)) << i;  // back exactly
  }
}

TEST(Simd, LoadAsAndConvertWidenEvery16BitValueExactly) {
  check_widening<Eigen::half>();
  check_widening<Eigen::bfloat16>();
}

// The online softmax over a row fed in blocks, against the two-pass softmax in double:
// the lazy reference moves only past the threshold, and the result is the same.
// The byte shuffles that read a QInt8 tile's quads: every length, so the vector steps of
// each instruction set and the byte-by-byte tail (all an ARM build has) are checked.
TEST(Simd, DeinterleaveFourBytesGivesEachStreamItsBytes) {
  for (Index n = 0; n <= 21; ++n) {
    std::vector<std::int8_t> interleaved(static_cast<std::size_t>(4 * n));
    for (Index i = 0; i < 4 * n; ++i)
      interleaved[static_cast<std::size_t>(i)] = static_cast<std::int8_t>(3 * i - 100);
    std::vector<std::int8_t> streams(static_cast<std::size_t>(4 * n + 4), std::int8_t{7});
    std::int8_t* const out[4] = {streams.data(), streams.data() + n + 1, streams.data() + 2 * n + 2,
                                 streams.data() + 3 * n + 3};
    simd::deinterleave_4_bytes(interleaved.data(), n, out);
    for (int k = 0; k < 4; ++k) {
      for (Index i = 0; i < n; ++i)
        ASSERT_EQ(out[k][i], static_cast<std::int8_t>(3 * (4 * i + k) - 100))
            << n << " " << k << " " << i;
      ASSERT_EQ(out[k][n], 7) << "written past stream " << k << " of " << n;  // the gap after it
    }
  }
}

TEST(Simd, GatherWordColumnsGivesEachWordItsColumnsFlipped) {
  const Index stride = 64;
  for (Index columns = 0; columns <= 11; ++columns) {
    for (const std::uint8_t flip : {std::uint8_t{0}, std::uint8_t{0x80}}) {
      std::vector<std::int8_t> src(static_cast<std::size_t>(columns * stride + 16));
      for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::int8_t>(5 * i + 1);
      std::vector<std::int8_t> words(static_cast<std::size_t>(4 * (4 * columns + 1)),
                                     std::int8_t{7});
      const Index ld = 4 * columns + 1;
      std::int8_t* const out[4] = {words.data(), words.data() + ld, words.data() + 2 * ld,
                                   words.data() + 3 * ld};
      simd::gather_word_columns(src.data(), stride, columns, flip, out);
      for (int k = 0; k < 4; ++k) {
        for (Index c = 0; c < columns; ++c) {
          for (int i = 0; i < 4; ++i) {
            const auto byte =
                static_cast<std::uint8_t>(src[static_cast<std::size_t>(c * stride + 4 * k + i)]);
            ASSERT_EQ(out[k][4 * c + i], static_cast<std::int8_t>(byte ^ flip))
                << columns << " " << k << " " << c << " " << i;
          }
        }
        ASSERT_EQ(out[k][4 * columns], 7) << "written past word " << k;
      }
    }
  }
}

TEST(OnlineSoftmax, BlockwiseStatisticsGiveTheExactSoftmaxSumAndLse) {
  // Scores (log2 units): the reference starts at 0.5, stays there for 8 (within the
  // threshold of 8: weights up to 2^7.5), and moves once more for 30.
  const std::vector<float> scores{0.5f, -1.0f, 2.0f, 8.0f, 8.4f, 30.0f, 29.0f, -5.0f};
  SoftmaxStats<float> stats = SoftmaxStats<float>::start();
  double out = 0.0;  // the accumulator of sum_j w_j * v_j with v_j = j
  int moves = 0;
  for (std::size_t first = 0; first < scores.size(); first += 2) {
    const float block_max = std::max(scores[first], scores[first + 1]);
    float alpha = 1.0f;
    if (stats.observe(block_max, alpha)) {
      out *= alpha;
      ++moves;
    }
    for (std::size_t j = first; j < first + 2; ++j) {
      const float w = std::exp2(scores[j] - stats.base());
      stats.sum += w;
      out += w * static_cast<double>(j);
    }
  }
  EXPECT_EQ(moves, 2);
  double max = 30.0, sum = 0.0, expected_out = 0.0;
  for (std::size_t j = 0; j < scores.size(); ++j) {
    sum += std::exp2(scores[j] - max);
    expected_out += std::exp2(scores[j] - max) * static_cast<double>(j);
  }
  const RowEnd end = finish_row(stats.ref, stats.sum, -std::numeric_limits<double>::infinity());
  EXPECT_NEAR(out * end.out_scale, expected_out / sum, 1e-6);
  EXPECT_NEAR(end.lse2, max + std::log2(sum), 1e-6);
  EXPECT_FALSE(end.empty);
}

// The decode's form: a row fed a packet of keys at a time, tested lane by lane against
// the threshold and summed lane-wise, gives the two-pass softmax in double. Packets: all
// masked (-inf), a first batch of keys (moves the reference from -inf), keys within the
// threshold (no move), one key far above it (a move: the lane sums fold in first).
TEST(OnlineSoftmax, KeyPacketsGiveTheExactSoftmaxSumAndLse) {
  using Packet = simd::Packet<float>;
  constexpr int kP = simd::kWidth<float>;
  std::vector<float> scores(4 * kP);
  for (int j = 0; j < kP; ++j) {
    scores[j] = -std::numeric_limits<float>::infinity();
    scores[kP + j] = 0.25f * static_cast<float>(j % 5);
    scores[2 * kP + j] = 7.0f - 0.5f * static_cast<float>(j % 3);
    scores[3 * kP + j] = j == kP / 2 ? 21.0f : -3.0f + 0.125f * static_cast<float>(j);
  }
  KeyPacketSoftmax<float> softmax = KeyPacketSoftmax<float>::start();
  double out = 0.0;  // sum_j w_j * v_j with v_j = j
  std::vector<int> moved;
  for (int p = 0; p < 4; ++p) {
    const Packet block = simd::load<Packet>(scores.data() + p * kP);
    float alpha = 1.0f;
    if (softmax.observe(block, alpha)) {
      out *= alpha;
      moved.push_back(p);
    }
    alignas(64) float w[kP];
    simd::store(w, softmax.weights(block));
    for (int j = 0; j < kP; ++j) out += w[j] * static_cast<double>(p * kP + j);
  }
  EXPECT_EQ(moved, (std::vector<int>{1, 3}));
  EXPECT_EQ(softmax.stats.ref, 21.0f);
  double sum = 0.0, expected_out = 0.0;
  for (int j = 0; j < 4 * kP; ++j) {
    const double w = std::exp2(static_cast<double>(scores[j]) - 21.0);
    sum += w;
    expected_out += w * j;
  }
  EXPECT_NEAR(softmax.sum(), sum, 1e-6 * sum);
  const RowEnd end =
      finish_row(softmax.stats.ref, softmax.sum(), -std::numeric_limits<double>::infinity());
  EXPECT_NEAR(out * end.out_scale, expected_out / sum, 1e-5 * (4 * kP));
  EXPECT_NEAR(end.lse2, 21.0 + std::log2(sum), 1e-6);
}

TEST(OnlineSoftmax, EmptyRowsAndSinksFinishAsStated) {
  const double no_sink = -std::numeric_limits<double>::infinity();
  // No allowed key: output 0, lse -inf; with a sink, the softmax over the sink alone.
  const RowEnd empty = finish_row(-std::numeric_limits<double>::infinity(), 0.0, no_sink);
  EXPECT_TRUE(empty.empty);
  EXPECT_EQ(empty.out_scale, 0.0);
  EXPECT_EQ(empty.lse(), -std::numeric_limits<double>::infinity());
  const RowEnd sink_only = finish_row(-std::numeric_limits<double>::infinity(), 0.0, 3.0);
  EXPECT_TRUE(sink_only.empty);
  EXPECT_EQ(sink_only.lse2, 3.0);
  // One key of score 1 (log2 units) and a sink of 1: each takes half, lse2 = 2.
  const RowEnd half = finish_row(1.0, 1.0, 1.0);
  EXPECT_DOUBLE_EQ(half.out_scale, 0.5);
  EXPECT_DOUBLE_EQ(half.lse2, 2.0);
  // A NaN sum is not an empty row.
  const RowEnd nan = finish_row(1.0, std::nan(""), no_sink);
  EXPECT_FALSE(nan.empty);
  EXPECT_TRUE(std::isnan(nan.lse2));
  // The merge of partial results: log2(2^1 + 2^1 + 2^2) = 3, NaN sticks.
  const double parts[] = {1.0, 1.0};
  EXPECT_DOUBLE_EQ(merge_lse2(parts, 2, 1, 2.0), 3.0);
  const double with_nan[] = {1.0, std::nan("")};
  EXPECT_TRUE(std::isnan(merge_lse2(with_nan, 2, 1, no_sink)));
}

// A LineStream asks for every line of its bytes exactly once across its steps, and
// finish() for those the steps left; the decode relies on it to have the next block in
// flight, whatever the block's size and the number of steps its loops take; a stream into
// L2 (ReadAt::kLater) the same.
class LineStreamSteps : public ::testing::TestWithParam<bool> {};

TEST_P(LineStreamSteps, CoverEveryLineOnce) {
  const bool into_l2 = GetParam();
  alignas(64) static char bytes[64 * 40];
  const auto lines_left = [](const simd::LineStream& s) {
    return static_cast<std::ptrdiff_t>((s.end - s.next) / simd::LineStream::kLineBytes);
  };
  // 40 lines over 16 steps: 3 per step, so the 14th step asks for the last one.
  simd::LineStream stream = simd::LineStream::over(bytes, sizeof(bytes), 16, into_l2);
  EXPECT_EQ(stream.into_l2, into_l2);
  EXPECT_EQ(lines_left(stream), 40);
  EXPECT_EQ(stream.step_bytes, 3u * 64u);
  for (int i = 0; i < 13; ++i) stream.step();
  EXPECT_EQ(lines_left(stream), 1);
  stream.step();
  EXPECT_EQ(lines_left(stream), 0);
  EXPECT_EQ(stream.next, reinterpret_cast<std::uintptr_t>(bytes) + sizeof(bytes));
  stream.step();  // nothing more to ask for
  EXPECT_EQ(lines_left(stream), 0);
  EXPECT_EQ(stream.next, reinterpret_cast<std::uintptr_t>(bytes) + sizeof(bytes));
  // A range starting inside a line: 639 bytes from byte 1, asked for 64 bytes apart.
  // Fewer steps than planned: finish() asks for the rest.
  simd::LineStream short_of_steps = simd::LineStream::over(bytes + 1, 64 * 10 - 1, 5, into_l2);
  EXPECT_EQ(lines_left(short_of_steps), 10);
  EXPECT_EQ(short_of_steps.step_bytes, 2u * 64u);
  short_of_steps.step();
  EXPECT_EQ(lines_left(short_of_steps), 8);
  short_of_steps.finish();
  EXPECT_EQ(lines_left(short_of_steps), 0);
  // Nothing to ask for: no step moves.
  simd::LineStream none;
  none.step();
  none.finish();
  EXPECT_EQ(none.next, 0u);
  EXPECT_EQ(lines_left(none), 0);
}

INSTANTIATE_TEST_SUITE_P(Targets, LineStreamSteps, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "IntoL2" : "IntoL1";
                         });

}  // namespace
}  // namespace attnforge::detail
