// Tests of qint8.hpp, the QInt8 storage of a quantized KV cache: the row layout and the
// round-to-nearest quantization with one scale per group of 32 values (against a
// quantization written here from the format's definition), non-finite inputs;
// KVCache<QInt8> and PagedKVCache<QInt8> holding exactly those bytes; and every attention
// path reading them (Sdpa, PagedAttention, Attention::forward) against the double brute
// force on the dequantized values (the float accuracy budget) and on the original values
// (the quantization budget, tests/accuracy_budget.hpp, 4.).
//
// ATTNFORGE_PRINT_ACCURACY=1 prints the errors of float, bf16, fp16 and QInt8 caches
// against the original and the stored inputs (README.md's table of cache formats).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "accuracy_budget.hpp"
#include "attnforge/paged_attention.hpp"
#include "test_expect.hpp"
#include "test_util.hpp"

namespace attnforge {
namespace qint8_tests {
namespace {

using Eigen::bfloat16;
using Eigen::half;

constexpr float kInfinity = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---------------------------------------------------------------------------------------
// The format, written out from its definition (not through qint8.hpp): a row of head_dim
// values is head_dim int8 steps q, zero padding up to a multiple of 4 bytes, then one
// float scale s per group of 32 values; the value is the float product q * s.

constexpr Index kGroup = 32;

Index scale_offset(Index head_dim, Index g) { return (head_dim + 3) / 4 * 4 + 4 * g; }

float stored_scale(const QInt8* row, Index head_dim, Index g) {
  float s;
  std::memcpy(&s, row + scale_offset(head_dim, g), sizeof s);
  return s;
}

int stored_step(const QInt8* row, Index d) { return static_cast<std::int8_t>(row[d]); }

float dequantized(const QInt8* row, Index head_dim, Index d) {
  return static_cast<float>(stored_step(row, d)) * stored_scale(row, head_dim, d / kGroup);
}

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// Where the bytes of `row` differ from the quantization of x (head_dim values) by the
// definition, or "" when they do not: each scale m / 127 (m = max |x| over the group)
// bit for bit (the double quotient of two floats rounds to the correctly rounded float),
// each step the nearest integer to 127 x / m, the padding zero. "Nearest" allows 2^-16
// of a step past one half: the library forms x / m * 127 in float (two roundings of a
// value <= 127), so at an exact tie either neighbour is right.
std::string row_mismatch(const QInt8* row, const float* x, Index head_dim) {
  std::ostringstream os;
  for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kGroup, ++g) {
    const Index end = std::min(head_dim, g0 + kGroup);
    double m = 0.0;
    for (Index d = g0; d < end; ++d) m = std::max(m, std::abs(static_cast<double>(x[d])));
    const float scale = static_cast<float>(m / 127.0);
    if (bits_of(stored_scale(row, head_dim, g)) != bits_of(scale)) {
      os << "group " << g << ": scale " << stored_scale(row, head_dim, g) << ", expected " << scale;
      return os.str();
    }
    for (Index d = g0; d < end; ++d) {
      const double step = m > 0.0 ? 127.0 * static_cast<double>(x[d]) / m : 0.0;
      if (!(std::abs(stored_step(row, d) - step) <= 0.5 + 0x1.0p-16)) {
        os << "value " << d << " (" << x[d] << "): step " << stored_step(row, d) << ", expected "
           << step << " rounded";
        return os.str();
      }
    }
  }
  for (Index d = head_dim; d < scale_offset(head_dim, 0); ++d) {
    if (stored_step(row, d) != 0) {
      os << "padding byte " << d << " is " << stored_step(row, d);
      return os.str();
    }
  }
  return "";
}

// A QInt8 cache's tiles of 16 positions, also written out from their definition: in a key
// tile value d of position s is byte 64 (d / 4) + 4 s + d % 4, plus 128; in a value tile
// byte 4 head_dim (s / 4) + 4 d + s % 4; the scale of group g of position s is float
// 16 g + s after the 16 head_dim value bytes.
enum class Role { kKeys, kValues };

// Position s of the tile at `tile` as one stored row (values, padding, scales).
std::vector<QInt8> tile_row(const QInt8* tile, Index head_dim, Index s, Role role) {
  const Index groups = (head_dim + kGroup - 1) / kGroup;
  std::vector<QInt8> row(static_cast<std::size_t>(scale_offset(head_dim, groups)), QInt8{0});
  for (Index d = 0; d < head_dim; ++d) {
    const Index at =
        role == Role::kKeys ? 64 * (d / 4) + 4 * s + d % 4 : 4 * head_dim * (s / 4) + 4 * d + s % 4;
    const auto byte = static_cast<std::uint8_t>(tile[at]);
    row[static_cast<std::size_t>(d)] =
        static_cast<QInt8>(role == Role::kKeys ? static_cast<std::uint8_t>(byte ^ 0x80u) : byte);
  }
  for (Index g = 0; g < groups; ++g) {
    std::memcpy(row.data() + scale_offset(head_dim, g), tile + 16 * head_dim + 4 * (16 * g + s),
                sizeof(float));
  }
  return row;
}

// Position s of (b, h) of a cache's QInt8 view (a 4-D view or a paged sequence's rows) as
// one stored row.
template <typename Rows>
std::vector<QInt8> stored_row(const Rows& rows, Index b, Index h, Index s, Role role) {
  return tile_row(rows.row(b, h, s - s % 16), rows.dimension(3), s % 16, role);
}

// The values a cache view holds, as floats: widened from bf16/fp16, dequantized from QInt8.
template <typename KV>
Tensor<float, 4> stored_values(const ConstView<KV, 4>& rows, Role role) {
  Tensor<float, 4> out(rows.dimensions());
  const Index head_dim = rows.dimension(3);
  for (Index b = 0; b < rows.dimension(0); ++b) {
    for (Index h = 0; h < rows.dimension(1); ++h) {
      for (Index s = 0; s < rows.dimension(2); ++s) {
        if constexpr (detail::is_qint8_v<KV>) {
          const std::vector<QInt8> row = stored_row(rows, b, h, s, role);
          for (Index d = 0; d < head_dim; ++d)
            out(b, h, s, d) = dequantized(row.data(), head_dim, d);
        } else {
          (void)role;
          for (Index d = 0; d < head_dim; ++d)
            out(b, h, s, d) = static_cast<float>(rows.row(b, h, s)[d]);
        }
      }
    }
  }
  return out;
}

// Rows of head_dim values whose groups of 32 span magnitudes 1e-3 .. 1e3, so every group
// has its own scale.
Tensor<float, 2> spread_rows(Index n_rows, Index head_dim, std::uint32_t seed) {
  Tensor<float, 2> x = test::random_normal<float, 2>({n_rows, head_dim}, seed);
  std::mt19937 gen(seed + 1);
  for (Index r = 0; r < n_rows; ++r) {
    for (Index g0 = 0; g0 < head_dim; g0 += kGroup) {
      const float magnitude = static_cast<float>(std::pow(10.0, 6.0 * test::uniform01(gen) - 3.0));
      for (Index d = g0; d < std::min(head_dim, g0 + kGroup); ++d) x(r, d) *= magnitude;
    }
  }
  return x;
}

std::vector<QInt8> quantized(const float* x, Index head_dim) {
  std::vector<QInt8> row(static_cast<std::size_t>(detail::qint8_row_bytes(head_dim)));
  detail::quantize_row(x, head_dim, row.data());
  return row;
}

const Index kHeadDims[] = {3, 40, 80, 128, 130};

// ---------------------------------------------------------------------------------------
// The format.

TEST(QInt8Format, RowIsTheValuesPaddedToFourBytesThenOneFloatScalePerGroupOf32) {
  struct Layout {
    Index head_dim, row_bytes;
  };
  const Layout layouts[] = {{1, 8},   {3, 8},   {4, 8},   {32, 36},   {33, 44},
                            {40, 48}, {64, 72}, {80, 92}, {128, 144}, {130, 152}};
  for (const Layout& l : layouts) {
    SCOPED_TRACE(l.head_dim);
    EXPECT_EQ(detail::qint8_row_bytes(l.head_dim), l.row_bytes);
    EXPECT_EQ(detail::stored_row_width<QInt8>(l.head_dim), l.row_bytes);
    EXPECT_EQ(detail::stored_row_width<float>(l.head_dim), l.head_dim);
    EXPECT_EQ(detail::stored_row_width<bfloat16>(l.head_dim), l.head_dim);
    EXPECT_EQ(l.row_bytes % 4, 0);  // so every row's scales are 4-aligned in a cache
  }
  static_assert(sizeof(QInt8) == 1 && detail::kQInt8Group == kGroup);
}

TEST(QInt8Format, QuantizeRowWritesTheIndependentQuantizationAndNothingPastTheRow) {
  constexpr unsigned char kSentinel = 0x5a;
  for (const Index head_dim : kHeadDims) {
    SCOPED_TRACE(head_dim);
    const Tensor<float, 2> x = spread_rows(20, head_dim, 1 + static_cast<std::uint32_t>(head_dim));
    const Index row_bytes = detail::qint8_row_bytes(head_dim);
    for (Index r = 0; r < x.dimension(0); ++r) {
      std::vector<QInt8> buffer(static_cast<std::size_t>(row_bytes + 16),
                                static_cast<QInt8>(kSentinel));
      detail::quantize_row(&x(r, 0), head_dim, buffer.data());
      EXPECT_EQ(row_mismatch(buffer.data(), &x(r, 0), head_dim), "") << "row " << r;
      for (Index i = row_bytes; i < row_bytes + 16; ++i)
        ASSERT_EQ(static_cast<unsigned char>(buffer[static_cast<std::size_t>(i)]), kSentinel);
    }
  }
}

// Round to nearest: each value is within half a step s / 2 = m / 254 of its input (with
// the float arithmetic's 2^-13 and, where s is subnormal, 2^-143 absolute:
// test::storage_error_bound, whose derivation this checks). Groups of every magnitude,
// from subnormal to near FLT_MAX.
TEST(QInt8Format, DequantizedValuesAreWithinHalfAStepOfTheirInputs) {
  const double magnitudes[] = {1.0, 1e-3, 1e3, 1e-30, 1e30, 1e37, 1e-37, 1e-40, 1e-44};
  for (const Index head_dim : kHeadDims) {
    for (const double magnitude : magnitudes) {
      SCOPED_TRACE(::testing::Message() << "head_dim " << head_dim << ", magnitude " << magnitude);
      Tensor<float, 2> x = test::random_normal<float, 2>({8, head_dim}, 7);
      for (Index i = 0; i < x.size(); ++i)
        x.data()[i] = static_cast<float>(static_cast<double>(x.data()[i]) * magnitude);
      const Tensor<double, 2> bound = test::storage_error_bound<QInt8>(x);
      double worst = 0.0;  // error / bound
      for (Index r = 0; r < x.dimension(0); ++r) {
        const std::vector<QInt8> row = quantized(&x(r, 0), head_dim);
        EXPECT_EQ(row_mismatch(row.data(), &x(r, 0), head_dim), "") << "row " << r;
        std::vector<float> back(static_cast<std::size_t>(head_dim));
        detail::dequantize_row(row.data(), head_dim, back.data());
        for (Index d = 0; d < head_dim; ++d) {
          const double error =
              std::abs(static_cast<double>(back[static_cast<std::size_t>(d)]) - x(r, d));
          worst = std::max(worst, error / bound(r, d));
        }
      }
      EXPECT_LE(worst, 1.0);
      if (magnitude >= 1e-37) {
        EXPECT_GT(worst, 0.5);  // and not loose (for a normal or nearly normal s)
      }
    }
  }
}

TEST(QInt8Format, TheLargestValueOfEachGroupIsStoredAsPlusOrMinus127Exactly) {
  for (const Index head_dim : kHeadDims) {
    SCOPED_TRACE(head_dim);
    const Tensor<float, 2> x = spread_rows(16, head_dim, 30);
    for (Index r = 0; r < x.dimension(0); ++r) {
      const std::vector<QInt8> row = quantized(&x(r, 0), head_dim);
      for (Index g0 = 0, g = 0; g0 < head_dim; g0 += kGroup, ++g) {
        Index largest = g0;
        for (Index d = g0; d < std::min(head_dim, g0 + kGroup); ++d)
          largest = std::abs(x(r, d)) > std::abs(x(r, largest)) ? d : largest;
        EXPECT_EQ(stored_step(row.data(), largest), x(r, largest) > 0 ? 127 : -127);
        // q * s rounds m * (127 / 127) back to within one rounding of m.
        EXPECT_NEAR(dequantized(row.data(), head_dim, largest), x(r, largest),
                    2 * 0x1.0p-24 * std::abs(x(r, largest)));
      }
    }
  }
}

TEST(QInt8Format, AnAllZeroGroupHasScaleZeroAndDequantizesToZeros) {
  const Index head_dim = 80;  // groups [0, 32), [32, 64), [64, 80)
  for (const Index zero_group : {0, 1, 2}) {
    SCOPED_TRACE(zero_group);
    Tensor<float, 2> x = spread_rows(1, head_dim, 40);
    for (Index d = zero_group * kGroup; d < std::min(head_dim, (zero_group + 1) * kGroup); ++d)
      x(0, d) = d % 2 == 0 ? 0.0f : -0.0f;
    const std::vector<QInt8> row = quantized(&x(0, 0), head_dim);
    EXPECT_EQ(row_mismatch(row.data(), &x(0, 0), head_dim), "");
    EXPECT_EQ(stored_scale(row.data(), head_dim, zero_group), 0.0f);
    std::vector<float> back(static_cast<std::size_t>(head_dim));
    detail::dequantize_row(row.data(), head_dim, back.data());
    for (Index d = zero_group * kGroup; d < std::min(head_dim, (zero_group + 1) * kGroup); ++d) {
      EXPECT_EQ(stored_step(row.data(), d), 0);
      EXPECT_EQ(back[static_cast<std::size_t>(d)], 0.0f);
    }
    for (Index d = 0; d < head_dim; ++d)
      EXPECT_FALSE(std::isnan(back[static_cast<std::size_t>(d)]));
  }
}

// The reason for groups: a channel of much larger magnitude (as keys carry) spends the 8
// bits of its own group only.
TEST(QInt8Format, AnOutlierCoarsensOnlyItsOwnGroup) {
  const Index head_dim = 128;
  const Tensor<float, 2> x = test::random_normal<float, 2>({1, head_dim}, 50);
  Tensor<float, 2> with_outlier = x;
  with_outlier(0, 70) = 1000.0f;  // group 2
  const std::vector<QInt8> plain = quantized(&x(0, 0), head_dim);
  const std::vector<QInt8> row = quantized(&with_outlier(0, 0), head_dim);
  EXPECT_EQ(row_mismatch(row.data(), &with_outlier(0, 0), head_dim), "");
  for (Index g = 0; g < 4; ++g) {
    SCOPED_TRACE(g);
    const bool same_scale = bits_of(stored_scale(row.data(), head_dim, g)) ==
                            bits_of(stored_scale(plain.data(), head_dim, g));
    EXPECT_EQ(same_scale, g != 2);
    for (Index d = g * kGroup; d < (g + 1) * kGroup; ++d) {
      if (g != 2) {
        EXPECT_EQ(stored_step(row.data(), d), stored_step(plain.data(), d));
      }
    }
  }
  // Group 2's step is 1000 / 127: its N(0, 1) values mostly round to 0.
  EXPECT_NEAR(stored_scale(row.data(), head_dim, 2), 1000.0 / 127.0, 1e-4);
}

// A non-finite input gives its group a NaN scale, so all of that group reads NaN (as a
// float cache would propagate it into the scores), and never reaches the float -> int8
// conversion out of range (UBSan checks that in CI); the other groups are unaffected.
TEST(QInt8Format, NonFiniteInputsMakeOnlyTheirOwnGroupNaN) {
  const Index head_dim = 130;  // groups of 32, 32, 32, 32, 2
  const Tensor<float, 2> x = spread_rows(1, head_dim, 60);
  const std::vector<QInt8> plain = quantized(&x(0, 0), head_dim);
  for (const float bad : {kInfinity, -kInfinity, kNaN}) {
    for (const Index at : {0, 31, 40, 95, 129}) {
      SCOPED_TRACE(::testing::Message() << bad << " at " << at);
      Tensor<float, 2> y = x;
      y(0, at) = bad;
      if (at == 40) {  // and a whole group of them
        for (Index d = 32; d < 64; ++d) y(0, d) = bad;
      }
      const std::vector<QInt8> row = quantized(&y(0, 0), head_dim);
      std::vector<float> back(static_cast<std::size_t>(head_dim));
      detail::dequantize_row(row.data(), head_dim, back.data());
      for (Index g = 0; g < 5; ++g) {
        const bool bad_group = g == at / kGroup;
        EXPECT_EQ(std::isnan(stored_scale(row.data(), head_dim, g)), bad_group) << "group " << g;
        for (Index d = g * kGroup; d < std::min(head_dim, (g + 1) * kGroup); ++d) {
          EXPECT_GE(stored_step(row.data(), d), -127);
          EXPECT_EQ(std::isnan(back[static_cast<std::size_t>(d)]), bad_group) << d;
          if (!bad_group) {
            EXPECT_EQ(stored_step(row.data(), d), stored_step(plain.data(), d));
          }
        }
      }
    }
  }
}

// The int8 decode quantizes its query rows in vectors (int8_dot.hpp): the same bytes and
// scales as quantize_row, bit for bit, across magnitudes from subnormal to near FLT_MAX,
// all-zero groups and non-finite values, and each group's accumulator start -128 x (the
// sum of its steps); rows ending on a group and mid-group (by 16 values, by 4), and a row
// shorter than one group.
TEST(QInt8Format, TheDecodesVectorQueryQuantizationGivesQuantizeRowsBytes) {
#if ATTNFORGE_INT8_DOT
  if (!detail::cpu_has_avx512_vnni()) GTEST_SKIP() << "no AVX-512 VNNI on this CPU";
  const float specials[] = {0.0f, 1e-40f, 1e-44f, 3e38f, kInfinity, -kInfinity, kNaN};
  for (const Index head_dim : {Index{4}, Index{44}, Index{64}, Index{80}, Index{100}, Index{128},
                               Index{192}, Index{256}}) {
    SCOPED_TRACE(head_dim);
    const Index groups = detail::qint8_groups(head_dim);
    const auto group_end = [&](Index g) { return std::min(head_dim, (g + 1) * kGroup); };
    Tensor<float, 2> x = spread_rows(40, head_dim, 70 + static_cast<std::uint32_t>(head_dim));
    std::mt19937 gen(static_cast<std::uint32_t>(head_dim));
    for (Index r = 8; r < x.dimension(0); ++r) {  // rows 0-7 keep their spread groups
      const Index g = static_cast<Index>(gen() % static_cast<std::uint32_t>(groups));
      const float special = specials[(r - 8) % std::size(specials)];
      const bool whole_group = r % 2 == 0;
      const Index one = std::min(g * kGroup + r % kGroup, group_end(g) - 1);
      for (Index d = g * kGroup; d < group_end(g); ++d) {
        if (whole_group || d == one)
          x(r, d) = special == 0.0f || std::isnan(special) ? special : x(r, d) * special;
      }
    }
    const Index row_bytes = detail::qint8_row_bytes(head_dim);
    for (Index r = 0; r < x.dimension(0); ++r) {
      SCOPED_TRACE(r);
      const std::vector<QInt8> expected = quantized(&x(r, 0), head_dim);
      std::vector<QInt8> row(static_cast<std::size_t>(row_bytes));
      std::vector<std::int32_t> start(static_cast<std::size_t>(groups));
      detail::quantize_query_row(&x(r, 0), head_dim, row.data(), start.data());
      EXPECT_EQ(std::memcmp(row.data(), expected.data(), row.size()), 0);
      for (Index g = 0; g < groups; ++g) {
        std::int32_t sum = 0;
        for (Index d = g * kGroup; d < group_end(g); ++d) sum += stored_step(expected.data(), d);
        EXPECT_EQ(start[static_cast<std::size_t>(g)], -128 * sum) << "group " << g;
      }
    }
  }
#else
  GTEST_SKIP() << "the int8 dot-product kernels are not compiled for this target";
#endif
}

// store_position quantizes into a QInt8 cache's tile and rounds into a bf16 one;
// load_position reads back the float product q * s, to float and to double.
TEST(QInt8Format, StoreAndLoadPositionQuantizeForQInt8AndConvertOtherwise) {
  const Index head_dim = 80, row_bytes = detail::qint8_row_bytes(head_dim), at = 5;
  const Tensor<float, 2> x = spread_rows(1, head_dim, 70);
  std::vector<QInt8> tile(static_cast<std::size_t>(16 * row_bytes), QInt8{0});
  detail::store_position<detail::QInt8Role::kValue>(&x(0, 0), head_dim, tile.data(), at);
  const std::vector<QInt8> stored = tile_row(tile.data(), head_dim, at, Role::kValues);
  EXPECT_EQ(row_mismatch(stored.data(), &x(0, 0), head_dim), "");
  const ConstView<QInt8, 4> tile_view = detail::cache_view<const QInt8, 4>(
      tile.data(), {1, 1, 16, head_dim}, {16 * row_bytes, 16 * row_bytes, row_bytes, 1});
  std::vector<float> as_float(static_cast<std::size_t>(head_dim));
  std::vector<double> as_double(static_cast<std::size_t>(head_dim));
  detail::load_position<detail::QInt8Role::kValue>(tile_view, 0, 0, at, as_float.data());
  detail::load_position<detail::QInt8Role::kValue>(tile_view, 0, 0, at, as_double.data());
  std::vector<bfloat16> as_bf16(static_cast<std::size_t>(16 * head_dim));
  detail::store_position<detail::QInt8Role::kValue>(&x(0, 0), head_dim, as_bf16.data(), at);
  for (Index d = 0; d < head_dim; ++d) {
    const auto i = static_cast<std::size_t>(d);
    // The reference path reads the float product q * s widened, exactly what the kernels read.
    EXPECT_EQ(as_float[i], dequantized(stored.data(), head_dim, d));
    EXPECT_EQ(as_double[i], static_cast<double>(dequantized(stored.data(), head_dim, d)));
    EXPECT_EQ(static_cast<float>(as_bf16[static_cast<std::size_t>(at * head_dim + d)]),
              static_cast<float>(static_cast<bfloat16>(x(0, d))));
  }
}

// A tile's 16 positions hold quantize_row's bytes and scales in the tile layout (read back
// by this file's own reader of it), and every way of reading a tile (a slot; a quad at
// once, whose byte shuffles differ per instruction set; a range of positions) gives
// dequantize_row's floats bit for bit.
TEST(QInt8Format, TilesHoldTheRowsQuantizationAndEveryReaderGivesTheRowsFloats) {
  for (const Index head_dim : {Index{4}, Index{40}, Index{128}, Index{132}}) {
    for (const Role role : {Role::kKeys, Role::kValues}) {
      SCOPED_TRACE(::testing::Message()
                   << "head_dim " << head_dim << (role == Role::kKeys ? " keys" : " values"));
      const Tensor<float, 2> x = spread_rows(16, head_dim, 75);
      std::vector<QInt8> tile(static_cast<std::size_t>(16 * detail::qint8_row_bytes(head_dim)),
                              QInt8{0});
      for (Index s = 0; s < 16; ++s) {
        if (role == Role::kKeys) {
          detail::store_tile_slot<detail::QInt8Role::kKey>(&x(s, 0), head_dim, tile.data(), s);
        } else {
          detail::store_tile_slot<detail::QInt8Role::kValue>(&x(s, 0), head_dim, tile.data(), s);
        }
      }
      std::vector<float> slot(static_cast<std::size_t>(head_dim)),
          quads(static_cast<std::size_t>(16 * head_dim));
      for (Index q = 0; q < 4; ++q) {
        if (role == Role::kKeys) {
          detail::load_tile_quad<detail::QInt8Role::kKey>(
              tile.data(), head_dim, q, quads.data() + 4 * q * head_dim, head_dim);
        } else {
          detail::load_tile_quad<detail::QInt8Role::kValue>(
              tile.data(), head_dim, q, quads.data() + 4 * q * head_dim, head_dim);
        }
      }
      for (Index s = 0; s < 16; ++s) {
        const std::vector<QInt8> row = tile_row(tile.data(), head_dim, s, role);
        ASSERT_EQ(row_mismatch(row.data(), &x(s, 0), head_dim), "") << "slot " << s;
        if (role == Role::kKeys) {
          detail::load_tile_slot<detail::QInt8Role::kKey>(tile.data(), head_dim, s, slot.data());
        } else {
          detail::load_tile_slot<detail::QInt8Role::kValue>(tile.data(), head_dim, s, slot.data());
        }
        for (Index d = 0; d < head_dim; ++d) {
          const float expected = dequantized(row.data(), head_dim, d);
          ASSERT_EQ(bits_of(slot[static_cast<std::size_t>(d)]), bits_of(expected)) << s << " " << d;
          ASSERT_EQ(bits_of(quads[static_cast<std::size_t>(s * head_dim + d)]), bits_of(expected))
              << s << " " << d;
        }
      }
    }
  }
}

// A cache's positions read as a range from any first position (whole quads at once, the
// rest one by one) give what each position gives alone.
TEST(QInt8Format, ARangeOfPositionsReadsWhatEachPositionReads) {
  const Index head_dim = 64, len = 45;
  KVCache<QInt8> cache(1, len, 2, head_dim);
  const auto k = test::random_normal<float, 4>({1, 2, len, head_dim}, 76);
  const auto v = test::random_normal<float, 4>({1, 2, len, head_dim}, 77);
  const KVPrefix<QInt8> rows = cache.update(k, v);
  for (const auto& [first, n] : {std::pair<Index, Index>{0, 45}, {3, 30}, {14, 7}, {32, 13}}) {
    std::vector<float> keys(static_cast<std::size_t>(n * head_dim)), values(keys.size()),
        one(static_cast<std::size_t>(head_dim));
    detail::load_positions<detail::QInt8Role::kKey>(rows.keys, 0, 1, first, n, keys.data());
    detail::load_positions<detail::QInt8Role::kValue>(rows.values, 0, 1, first, n, values.data());
    for (Index j = 0; j < n; ++j) {
      detail::load_position<detail::QInt8Role::kKey>(rows.keys, 0, 1, first + j, one.data());
      EXPECT_TRUE(std::equal(one.begin(), one.end(), keys.begin() + j * head_dim)) << first + j;
      detail::load_position<detail::QInt8Role::kValue>(rows.values, 0, 1, first + j, one.data());
      EXPECT_TRUE(std::equal(one.begin(), one.end(), values.begin() + j * head_dim)) << first + j;
    }
  }
}

// ---------------------------------------------------------------------------------------
// KVCache<QInt8>.

TEST(QInt8Cache, UpdateStoresTheQuantizedRowsAndPrefixViewsThemWithTheStoredRowStride) {
  // The storage holds whole tiles of 16 positions: 10 round up to 16.
  const Index batch = 2, max_len = 10, capacity = 16, kv_heads = 3, head_dim = 40, row_bytes = 48;
  KVCache<QInt8> cache(batch, max_len, kv_heads, head_dim);
  EXPECT_EQ(cache.head_dim(), head_dim);
  EXPECT_EQ(cache.max_seq_len(), max_len);
  EXPECT_TRUE(
      test::same_dims(cache.key_storage(), Tensor<QInt8, 4>(batch, kv_heads, capacity, row_bytes)));
  const auto k1 = test::random_normal<float, 4>({batch, kv_heads, 4, head_dim}, 80);
  const auto v1 = test::random_normal<float, 4>({batch, kv_heads, 4, head_dim}, 81);
  const auto k2 = test::random_uniform<float, 4>({batch, kv_heads, 3, head_dim}, 82, -50, 50);
  const auto v2 = test::random_uniform<float, 4>({batch, kv_heads, 3, head_dim}, 83, -1e-3, 1e-3);
  cache.update(k1, v1);
  const KVPrefix<QInt8> prefix = cache.update(k2, v2);
  for (const ConstView<QInt8, 4>& rows : {prefix.keys, prefix.values}) {
    EXPECT_EQ(rows.dimensions(), (std::array<Index, 4>{batch, kv_heads, 7, head_dim}));
    EXPECT_EQ(rows.strides(), (std::array<Index, 4>{kv_heads * capacity * row_bytes,
                                                    capacity * row_bytes, row_bytes, 1}));
  }
  EXPECT_EQ(prefix.keys.data(), cache.key_storage().data());
  EXPECT_EQ(prefix.values.data(), cache.value_storage().data());
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < kv_heads; ++h) {
      for (Index s = 0; s < 7; ++s) {
        SCOPED_TRACE(::testing::Message() << "b " << b << " h " << h << " s " << s);
        const float* k = s < 4 ? &k1(b, h, s, 0) : &k2(b, h, s - 4, 0);
        const float* v = s < 4 ? &v1(b, h, s, 0) : &v2(b, h, s - 4, 0);
        EXPECT_EQ(row_mismatch(stored_row(prefix.keys, b, h, s, Role::kKeys).data(), k, head_dim),
                  "");
        EXPECT_EQ(
            row_mismatch(stored_row(prefix.values, b, h, s, Role::kValues).data(), v, head_dim),
            "");
      }
    }
  }
}

TEST(QInt8Cache, TruncateAndResetAppendFromTheKeptLength) {
  const Index head_dim = 80;
  KVCache<QInt8> cache(1, 8, 2, head_dim);
  const auto k = test::random_normal<float, 4>({1, 2, 6, head_dim}, 90);
  const auto k2 = test::random_normal<float, 4>({1, 2, 3, head_dim}, 91);
  const auto k3 = test::random_normal<float, 4>({1, 2, 1, head_dim}, 92);
  cache.update(k, k);
  cache.truncate(2);
  EXPECT_EQ(cache.prefix().keys.dimension(2), 2);
  const KVPrefix<QInt8> prefix = cache.update(k2, k2);
  ASSERT_EQ(prefix.keys.dimension(2), 5);
  for (Index h = 0; h < 2; ++h) {
    for (Index s = 0; s < 5; ++s) {
      const float* expected = s < 2 ? &k(0, h, s, 0) : &k2(0, h, s - 2, 0);
      EXPECT_EQ(
          row_mismatch(stored_row(prefix.keys, 0, h, s, Role::kKeys).data(), expected, head_dim),
          "")
          << h << " " << s;
      EXPECT_EQ(row_mismatch(stored_row(prefix.values, 0, h, s, Role::kValues).data(), expected,
                             head_dim),
                "")
          << h << " " << s;
    }
  }
  test::expect_invalid([&] { cache.truncate(6); }, {"KVCache::truncate", "seq_len 6"});
  cache.reset();
  EXPECT_EQ(cache.seq_len(), 0);
  const KVPrefix<QInt8> again = cache.update(k3, k3);
  ASSERT_EQ(again.keys.dimension(2), 1);
  for (Index h = 0; h < 2; ++h)
    EXPECT_EQ(row_mismatch(stored_row(again.keys, 0, h, 0, Role::kKeys).data(), &k3(0, h, 0, 0),
                           head_dim),
              "");
}

TEST(QInt8Cache, RecordsTheDocumentIdsOfItsPositions) {
  const Index head_dim = 40;
  KVCache<QInt8> cache(2, 8, 2, head_dim, /*record_doc_ids=*/true);
  const auto k = test::random_normal<float, 4>({2, 2, 3, head_dim}, 100);
  Tensor<DocId, 2> ids(2, 3);
  ids.setValues({{4, 4, 5}, {7, 8, 8}});
  cache.update(k, k, ids);
  Tensor<std::int32_t, 2> more(2, 2);  // int32 ids are read as well
  more.setValues({{5, 6}, {9, 9}});
  const ConstView<float, 4> first_two = ConstView<float, 4>(k).narrow(2, 0, 2);
  cache.update(first_two, first_two, more);
  EXPECT_EQ(row_mismatch(stored_row(cache.prefix().keys, 1, 1, 4, Role::kKeys).data(),
                         &k(1, 1, 1, 0), head_dim),
            "");
  const ConstView<DocId, 2> got = cache.doc_ids();
  ASSERT_EQ(got.dimensions(), (std::array<Index, 2>{2, 5}));
  const DocId expected[2][5] = {{4, 4, 5, 5, 6}, {7, 8, 8, 9, 9}};
  for (Index b = 0; b < 2; ++b)
    for (Index s = 0; s < 5; ++s) EXPECT_EQ(got(b, s), expected[b][s]);
  test::expect_rejected<std::invalid_argument>(cache, [&] { cache.update(k, k); },
                                               {"KVCache::update", "records document ids"});
}

TEST(QInt8Cache, OverflowThrowsLengthErrorAndLeavesTheCacheUnchanged) {
  KVCache<QInt8> cache(1, 5, 2, 40);
  const auto k = test::random_normal<float, 4>({1, 2, 3, 40}, 110);
  cache.update(k, k);
  test::expect_rejected<std::length_error>(
      cache, [&] { cache.update(k, k); },
      {"KVCache::update", "cache overflow", "3 cached + 3 new", "max_seq_len 5"});
}

TEST(QInt8Cache, InvalidShapesThrowInvalidArgumentAndLeaveTheCacheUnchanged) {
  const Index head_dim = 40;
  KVCache<QInt8> cache(1, 5, 2, head_dim);
  const auto k = test::random_normal<float, 4>({1, 2, 3, head_dim}, 120);
  cache.update(k, k);
  const auto three_heads = test::random_normal<float, 4>({1, 3, 1, head_dim}, 122);
  // Rows as wide as the stored rows (48 bytes) are not rows of head_dim values.
  const auto stored_width = test::random_normal<float, 4>({1, 2, 1, 48}, 123);
  const auto one = test::random_normal<float, 4>({1, 2, 1, head_dim}, 124);
  const std::string expected_shape = "(batch_size, n_kv_heads, new_len, head_dim)";
  test::expect_rejected<std::invalid_argument>(cache, [&] { cache.update(stored_width, one); },
                                               {"k_new", "(1, 2, 1, 48)", expected_shape});
  test::expect_rejected<std::invalid_argument>(cache, [&] { cache.update(one, stored_width); },
                                               {"v_new", expected_shape});
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { cache.update(three_heads, three_heads); }, {"k_new", "(1, 3, 1, 40)"});
  const auto two = test::random_normal<float, 4>({1, 2, 1, head_dim}, 125);
  const ConstView<float, 4> first_two = ConstView<float, 4>(k).narrow(2, 0, 2);
  test::expect_rejected<std::invalid_argument>(
      cache, [&] { cache.update(first_two, two); },
      {"k_new has shape (1, 2, 2, 40) but v_new has shape (1, 2, 1, 40)"});
  test::expect_invalid([] { KVCache<QInt8>(1, 5, 2, 0); }, {"KVCache", "head_dim 0"});
  test::expect_invalid([] { KVCache<QInt8>(0, 5, 2, 40); }, {"KVCache", "batch_size 0"});
  test::expect_invalid([] { KVCache<QInt8>(1, 5, 2, 42); },
                       {"KVCache", "head_dim a multiple of 4", "42"});
  test::expect_invalid([] { PagedKVCache<QInt8>(4, 16, 2, 42); },
                       {"PagedKVCache", "head_dim a multiple of 4", "42"});
}

// ---------------------------------------------------------------------------------------
// Sdpa<float, QInt8> on every path.

enum class Kind {
  kNone,
  kCausal,
  kWindow,
  kDocs,
  kPadding,
  kSoftcap,
  kAlibi,
  kSinks,
  kEmptyAttendAll
};

struct Problem {
  Tensor<float, 4> q, k, v;  // the original float inputs
  test::DenseMasks masks;
  test::DenseOptions options;
};

Problem make_problem(Kind kind, Index batch, Index n_heads, Index n_kv_heads, Index q_len,
                     Index kv_len, Index head_dim, std::uint32_t seed) {
  Problem p;
  p.q = test::random_normal<float, 4>({batch, n_heads, q_len, head_dim}, seed);
  p.k = test::random_normal<float, 4>({batch, n_kv_heads, kv_len, head_dim}, seed + 1);
  p.v = test::random_normal<float, 4>({batch, n_kv_heads, kv_len, head_dim}, seed + 2);
  p.masks.causal = kind != Kind::kNone;
  if (kind == Kind::kWindow) p.masks.window = 40;
  std::mt19937 gen(seed);
  if (kind == Kind::kDocs) {
    Tensor<DocId, 2> kv_docs(batch, kv_len), q_docs(batch, q_len);
    for (Index b = 0; b < batch; ++b) {
      for (Index j = 0; j < kv_len; ++j) kv_docs(b, j) = (j + 7 * b) / 29;
      for (Index i = 0; i < q_len; ++i) q_docs(b, i) = kv_docs(b, kv_len - q_len + i);
    }
    p.masks.q_docs = q_docs;
    p.masks.kv_docs = kv_docs;
  }
  if (kind == Kind::kPadding || kind == Kind::kEmptyAttendAll) {
    // Under kEmptyAttendAll batch row 1 has no key at all: every row of it is empty.
    Tensor<bool, 2> pad(batch, kv_len);
    for (Index b = 0; b < batch; ++b) {
      for (Index j = 0; j < kv_len; ++j)
        pad(b, j) = (kind == Kind::kEmptyAttendAll && b == 1) ? false : test::uniform01(gen) > 0.15;
    }
    p.masks.key_padding = pad;
  }
  if (kind == Kind::kSoftcap) p.options.softcap = 5.0;
  if (kind == Kind::kEmptyAttendAll) p.options.attend_all_when_empty = true;
  for (Index h = 0; h < n_heads; ++h) {
    if (kind == Kind::kAlibi)
      p.options.alibi_slopes.push_back(std::exp2(-0.5 * static_cast<double>(h + 1)));
    if (kind == Kind::kSinks) p.options.sinks.push_back(0.3 * static_cast<double>(h) - 1.0);
  }
  return p;
}

// max |a - b| over lse values; -inf (a row with no key) must match exactly.
template <typename A>
double lse_abs_error(const A& actual, const Tensor<double, 3>& exact) {
  double worst = 0.0;
  for (Index i = 0; i < exact.size(); ++i) {
    const double x = static_cast<double>(actual.data()[i]), r = exact.data()[i];
    if (std::isinf(r) || !std::isfinite(x)) {
      if (x != r) return test::kInf;
      continue;
    }
    worst = std::max(worst, std::abs(x - r));
  }
  return worst;
}

struct SdpaCase {
  const char* name;
  Index n_heads, n_kv_heads, head_dim;
  Kind kind;
};

void PrintTo(const SdpaCase& c, std::ostream* os) { *os << c.name; }

// Every path and Int8Kernel, 1 and 2 threads, over a QInt8 cache holding p's keys and
// values: (a) within the float budget of the brute force on the dequantized values (and
// on the quantized queries where the int8 dot products score), (b) within the
// quantization budget of the brute force on the original ones.
void expect_sdpa_within_budgets(const SdpaCase& c, Index batch, Index q_len, Index kv_len,
                                std::uint32_t seed) {
  const Problem p =
      make_problem(c.kind, batch, c.n_heads, c.n_kv_heads, q_len, kv_len, c.head_dim, seed);
  KVCache<QInt8> cache(batch, kv_len, c.n_kv_heads, c.head_dim);
  const KVPrefix<QInt8> prefix = cache.update(p.k, p.v);
  const Tensor<float, 4> k_stored = stored_values(prefix.keys, Role::kKeys);
  const Tensor<float, 4> v_stored = stored_values(prefix.values, Role::kValues);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  const Tensor<double, 4> q_quantized =
      test::quantized_queries(p.q, scale, p.options.softcap > 0.0);
  const Tensor<float, 4> q_quantized_float = q_quantized.cast<float>();
  const test::DenseResult exact_stored =
      test::dense_sdpa(test::to_double(p.q), test::to_double(k_stored), test::to_double(v_stored),
                       p.masks, p.options);
  test::DenseResult exact_quantized_q = test::dense_sdpa(
      q_quantized, test::to_double(k_stored), test::to_double(v_stored), p.masks, p.options);
  // Rows with no allowed key are redone on the reference path (the attend-all policy),
  // from the original query.
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < c.n_heads; ++h) {
      const auto allowed = test::dense_allowed(p.masks, b, h, q_len, kv_len);
      for (Index i = 0; i < q_len; ++i) {
        const auto& row = allowed[static_cast<std::size_t>(i)];
        if (std::find(row.begin(), row.end(), true) != row.end()) continue;
        exact_quantized_q.lse(b, h, i) = exact_stored.lse(b, h, i);
        for (Index d = 0; d < c.head_dim; ++d)
          exact_quantized_q.out(b, h, i, d) = exact_stored.out(b, h, i, d);
      }
    }
  }
  const test::DenseResult exact_original = test::dense_sdpa(
      test::to_double(p.q), test::to_double(p.k), test::to_double(p.v), p.masks, p.options);
  if (c.kind == Kind::kEmptyAttendAll) {
    ASSERT_GT(exact_stored.empty_rows, 0);
  }
  const Masks masks = test::library_masks(p.masks);
  for (const SdpaPath path : test::kAllPaths) {
    for (const Int8Kernel kernel : {Int8Kernel::kAuto, Int8Kernel::kDequantize}) {
      const bool int8_dot =
          test::scores_by_int8_dot(path, kernel, q_len, c.n_heads / c.n_kv_heads, c.head_dim);
      SCOPED_TRACE(std::string(test::path_name(path)) +
                   (int8_dot ? ", int8 dot products" : ", dequantized keys"));
      const test::DenseResult& exact = int8_dot ? exact_quantized_q : exact_stored;
      test::AccuracyBudget on_stored =
          test::sdpa_budget<float>(path, test::budget_inputs(int8_dot ? q_quantized_float : p.q,
                                                             k_stored, p.masks, p.options, exact));
      if (int8_dot) on_stored = test::with_int8_value_weights(on_stored);
      const test::AccuracyBudget on_original =
          int8_dot ? test::quantized_query_cache_budget<QInt8>(on_stored, q_quantized, p.q, p.k,
                                                               p.v, scale)
                   : test::cache_budget<QInt8>(on_stored, p.q, p.k, p.v, scale);
      Tensor<float, 4> out[2] = {Tensor<float, 4>(p.q.dimensions()),
                                 Tensor<float, 4>(p.q.dimensions())};
      Tensor<float, 3> lse[2] = {Tensor<float, 3>(batch, c.n_heads, q_len),
                                 Tensor<float, 3>(batch, c.n_heads, q_len)};
      for (int t = 0; t < 2; ++t) {
        SdpaOptions options = test::library_options(p.masks, p.options, path);
        options.int8_kernel = kernel;
        Sdpa<float, QInt8> sdpa(options, t == 0 ? nullptr : &test::pool_device(2));
        sdpa(p.q, prefix.keys, prefix.values, StridedView<float, 4>(out[t]), masks,
             StridedView<float, 3>(lse[t]));
      }
      EXPECT_TRUE(test::bitwise_equal(out[0], out[1])) << "2 threads differ from 1";
      EXPECT_TRUE(test::bitwise_equal(lse[0], lse[1])) << "2 threads differ from 1";
      const double err_stored = test::max_abs_diff(out[0], exact.out) / test::max_abs(v_stored);
      const double err_original =
          test::max_abs_diff(out[0], exact_original.out) / test::max_abs(p.v);
      EXPECT_LE(err_stored, on_stored.out);
      EXPECT_LE(lse_abs_error(lse[0], exact.lse), on_stored.lse);
      EXPECT_LE(err_original, on_original.out);
      EXPECT_LE(lse_abs_error(lse[0], exact_original.lse), on_original.lse);
      // The cache (and query) really are quantized: against the original inputs the error
      // is far above the float rounding measured against the quantized ones (random inputs
      // land 100-1000x below the worst-case float budget, and so does quantization's
      // averaging error).
      EXPECT_GT(err_original, 10.0 * err_stored);
    }
  }
}

class QInt8Sdpa : public ::testing::TestWithParam<SdpaCase> {};

TEST_P(QInt8Sdpa, MatchesTheDequantizedBruteForceAtFloatAccuracyAndTheOriginalWithinBudget) {
  const SdpaCase& c = GetParam();
  {
    SCOPED_TRACE("prefill: B 2, Sq 48, Skv 150");
    expect_sdpa_within_budgets(c, 2, 48, 150, 200);
  }
  {
    SCOPED_TRACE("decode: B 2, Sq 2, Skv 1100 (split-KV chunks)");
    expect_sdpa_within_budgets(c, 2, 2, 1100, 300);
  }
  {
    // One token: n_rep rows per KV head, which the int8 score kernel takes 4, then 2,
    // then 1 at a time; a key count ending mid-block.
    SCOPED_TRACE("decode: B 2, Sq 1, Skv 1059");
    expect_sdpa_within_budgets(c, 2, 1, 1059, 400);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, QInt8Sdpa,
    ::testing::Values(SdpaCase{"GQA_D128_Causal", 8, 2, 128, Kind::kCausal},
                      SdpaCase{"MHA_D64_Causal", 4, 4, 64, Kind::kCausal},
                      SdpaCase{"MQA_D80_Causal", 8, 1, 80, Kind::kCausal},
                      SdpaCase{"GQA3_D128_Causal", 6, 2, 128, Kind::kCausal},
                      SdpaCase{"GQA7_D64_Window", 7, 1, 64, Kind::kWindow},
                      SdpaCase{"GQA_D64_NoMask", 8, 2, 64, Kind::kNone},
                      SdpaCase{"GQA_D80_Window", 8, 2, 80, Kind::kWindow},
                      SdpaCase{"MHA_D128_Docs", 4, 4, 128, Kind::kDocs},
                      SdpaCase{"GQA_D64_Padding", 8, 2, 64, Kind::kPadding},
                      SdpaCase{"MQA_D128_Softcap", 8, 1, 128, Kind::kSoftcap},
                      SdpaCase{"GQA_D80_Alibi", 8, 2, 80, Kind::kAlibi},
                      SdpaCase{"MHA_D80_Sinks", 4, 4, 80, Kind::kSinks},
                      SdpaCase{"GQA_D64_EmptyRowsAttendAll", 8, 2, 64, Kind::kEmptyAttendAll},
                      // Scale groups gathered 4 at a time, then 2 one at a time (D 192);
                      // two runs of 4 (D 256).
                      SdpaCase{"GQA_D192_Causal", 8, 2, 192, Kind::kCausal},
                      SdpaCase{"GQA_D256_Docs", 8, 2, 256, Kind::kDocs},
                      // Rows ending mid-group: after 16 values (D 80 above), 12 (D 44) and 24
                      // (D 56); three whole groups (D 96).
                      SdpaCase{"GQA_D96_Causal", 8, 2, 96, Kind::kCausal},
                      SdpaCase{"GQA_D44_Padding", 8, 2, 44, Kind::kPadding},
                      SdpaCase{"MHA_D56_Causal", 4, 4, 56, Kind::kCausal}),
    [](const ::testing::TestParamInfo<SdpaCase>& info) { return std::string(info.param.name); });

// A QInt8 row's scales are found from stride(2), so a view whose rows are not stored rows
// of its own head_dim would read values as scales: rejected before anything is written.
TEST(QInt8SdpaValidation, AViewWhoseRowStrideIsNotTheStoredRowIsRejectedNamingKOrV) {
  KVCache<QInt8> wide(1, 16, 2, 128), narrow(1, 16, 2, 96);
  const auto k = test::random_normal<float, 4>({1, 2, 16, 128}, 400);
  const auto k96 = test::random_normal<float, 4>({1, 2, 16, 96}, 401);
  const KVPrefix<QInt8> wide_rows = wide.update(k, k), rows = narrow.update(k96, k96);
  const auto q = test::random_normal<float, 4>({1, 4, 3, 96}, 402);
  // 96 of 128 values: the row stride is 144 bytes, a stored row of 96 values has 108.
  const ConstView<QInt8, 4> narrowed_k = wide_rows.keys.narrow(3, 0, 96);
  const ConstView<QInt8, 4> narrowed_v = wide_rows.values.narrow(3, 0, 96);
  for (const SdpaPath path : test::kAllPaths) {
    SCOPED_TRACE(test::path_name(path));
    SdpaOptions options;
    options.path = path;
    Sdpa<float, QInt8> sdpa(options);
    Tensor<float, 4> out(q.dimensions());
    out.setConstant(7.0f);
    test::expect_invalid([&] { sdpa(q, narrowed_k, rows.values, out); },
                         {"scaled_dot_product_attention", "k is a QInt8 view (1, 2, 16, 96)",
                          "row stride 144", "108 bytes"});
    test::expect_invalid([&] { sdpa(q, rows.keys, narrowed_v, out); },
                         {"v is a QInt8 view (1, 2, 16, 96)", "row stride 144"});
    // Narrowed at an offset: 127 values from value 1 keep a stride that a stored row of
    // 127 values would have, so only the head_dim rule tells them apart.
    const auto q127 = test::random_normal<float, 4>({1, 4, 3, 127}, 403);
    Tensor<float, 4> out127(q127.dimensions());
    test::expect_invalid(
        [&] {
          sdpa(q127, wide_rows.keys.narrow(3, 1, 127), wide_rows.values.narrow(3, 1, 127), out127);
        },
        {"scaled_dot_product_attention", "head_dim a multiple of 4", "127"});
    for (Index i = 0; i < out.size(); ++i) ASSERT_EQ(out.data()[i], 7.0f);
    // The same call on stored rows runs.
    EXPECT_NO_THROW(sdpa(q, rows.keys, rows.values, out));
  }
}

// A QInt8 view is read a tile of 16 positions at a time, so its positions narrow only
// from a tile's first; other bytes cannot be viewed as QInt8 at all (compile_fail tests).
TEST(QInt8SdpaValidation, PositionsNarrowOnlyFromATilesFirstPosition) {
  KVCache<QInt8> cache(1, 40, 2, 64);
  const auto k = test::random_normal<float, 4>({1, 2, 40, 64}, 405);
  const KVPrefix<QInt8> rows = cache.update(k, k);
  test::expect_invalid([&] { (void)rows.keys.narrow(2, 3, 20); },
                       {"StridedView::narrow", "QInt8", "multiple of 16", "start 3"});
  const ConstView<QInt8, 4> from_16 = rows.keys.narrow(2, 16, 20);
  const std::vector<QInt8> expected = stored_row(rows.keys, 0, 1, 21, Role::kKeys);
  const std::vector<QInt8> got = stored_row(from_16, 0, 1, 5, Role::kKeys);
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), got.begin()));
  EXPECT_EQ(row_mismatch(got.data(), &k(0, 1, 21, 0), 64), "");
}

// Int8Kernel::kDotProduct insists on the int8 dot products: where they cannot run (a CPU
// or build without them) the call throws before writing; where they run, at every head_dim
// (rows ending on a scale group or mid-group, by 16 or by 4 values), it is kAuto's result
// bit for bit, and kDequantize's float scores differ.
TEST(QInt8SdpaValidation, Int8KernelDotProductRunsWhereItCanAndThrowsElsewhere) {
  for (const Index head_dim : {Index{4}, Index{44}, Index{80}, Index{96}, Index{128}}) {
    SCOPED_TRACE(head_dim);
    const auto k = test::random_normal<float, 4>({1, 2, 40, head_dim}, 410);
    const auto v = test::random_normal<float, 4>({1, 2, 40, head_dim}, 411);
    const auto q = test::random_normal<float, 4>({1, 8, 1, head_dim}, 412);
    KVCache<QInt8> cache(1, 40, 2, head_dim);
    const KVPrefix<QInt8> rows = cache.update(k, v);
    Tensor<float, 4> out[3];
    const Int8Kernel kernels[3] = {Int8Kernel::kDotProduct, Int8Kernel::kAuto,
                                   Int8Kernel::kDequantize};
    for (int i = 0; i < 3; ++i) {
      SdpaOptions options;
      options.int8_kernel = kernels[i];
      out[i] = Tensor<float, 4>(q.dimensions());
      out[i].setConstant(7.0f);
      Sdpa<float, QInt8> sdpa(options);
      if (i == 0 &&
          !test::scores_by_int8_dot(SdpaPath::kDecode, Int8Kernel::kAuto, 1, 4, head_dim)) {
        test::expect_invalid([&] { sdpa(q, rows.keys, rows.values, out[0]); },
                             {"scaled_dot_product_attention", "Int8Kernel::kDotProduct",
                              "head_dim " + std::to_string(head_dim)});
        for (Index e = 0; e < out[0].size(); ++e) ASSERT_EQ(out[0].data()[e], 7.0f);
      } else {
        sdpa(q, rows.keys, rows.values, out[i]);
      }
    }
    if (test::scores_by_int8_dot(SdpaPath::kDecode, Int8Kernel::kAuto, 1, 4, head_dim)) {
      EXPECT_TRUE(test::bitwise_equal(out[0], out[1]));
      EXPECT_FALSE(test::bitwise_equal(out[1], out[2]));
    } else {
      EXPECT_TRUE(test::bitwise_equal(out[1], out[2]));  // kAuto dequantizes here
    }
  }
}

// A non-finite key or value gives its group a NaN scale (QInt8Format above), and the decode
// then reads NaN as a float cache would: a NaN key score makes its query rows NaN, a NaN
// value group those rows' outputs in that group only; every other output stays finite.
// Positions in either half of a 32-key block of the int8 dot products, and in a partial
// last block, on both kernels.
TEST(QInt8SdpaValidation, ANonFiniteKeyOrValueMakesExactlyTheOutputsAFloatCacheWouldNaN) {
  constexpr Index kKvLen = 72, kHeadDim = 128, kKvHeads = 2, kRep = 4;
  const auto k = test::random_normal<float, 4>({1, kKvHeads, kKvLen, kHeadDim}, 420);
  const auto v = test::random_normal<float, 4>({1, kKvHeads, kKvLen, kHeadDim}, 421);
  const auto q = test::random_normal<float, 4>({1, kKvHeads * kRep, 1, kHeadDim}, 422);
  for (const float bad : {kNaN, kInfinity}) {
    for (const bool in_value : {false, true}) {
      for (const Index at : {Index{3}, Index{20}, Index{47}, Index{70}}) {
        SCOPED_TRACE(::testing::Message()
                     << bad << (in_value ? " value" : " key") << " at position " << at);
        const Index kv_head = at % kKvHeads, d_bad = 40;  // group 1
        Tensor<float, 4> k_bad = k, v_bad = v;
        (in_value ? v_bad : k_bad)(0, kv_head, at, d_bad) = bad;
        KVCache<QInt8> cache(1, kKvLen, kKvHeads, kHeadDim);
        const KVPrefix<QInt8> rows = cache.update(k_bad, v_bad);
        for (const Int8Kernel kernel : {Int8Kernel::kAuto, Int8Kernel::kDequantize}) {
          SdpaOptions options;
          options.int8_kernel = kernel;
          Tensor<float, 4> out(q.dimensions());
          Sdpa<float, QInt8> sdpa(options);
          sdpa(q, rows.keys, rows.values, out);
          for (Index h = 0; h < q.dimension(1); ++h) {
            for (Index d = 0; d < kHeadDim; ++d) {
              const bool in_group = d / kGroup == d_bad / kGroup;
              const bool expect_nan = h / kRep == kv_head && (!in_value || in_group);
              ASSERT_EQ(std::isnan(out(0, h, 0, d)), expect_nan)
                  << "head " << h << ", d " << d << ", kernel " << static_cast<int>(kernel);
              if (!expect_nan) {
                ASSERT_TRUE(std::isfinite(out(0, h, 0, d)));
              }
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Accuracy of each cache format: float queries over a float, bf16, fp16 and QInt8 cache of
// the same keys and values, against the exact result on the original inputs (the
// format's error: cache_budget) and on the stored ones (float accuracy: sdpa_budget).

bool print_table() {
  const char* env = std::getenv("ATTNFORGE_PRINT_ACCURACY");
  return env != nullptr && std::string(env) != "0";
}

// `int8` picks how a QInt8 cache is scored and `bf16` how a bf16 cache is decoded; where
// that is the int8 or bf16 dot products, "stored" means the queries as they multiply.
template <typename KV>
void measure_cache_format(const char* format, const char* shape, const Problem& p,
                          const test::DenseResult& exact_original,
                          Int8Kernel int8 = Int8Kernel::kDequantize,
                          Bf16Kernel bf16 = Bf16Kernel::kConvert) {
  SCOPED_TRACE(format);
  const Index batch = p.k.dimension(0), kv_len = p.k.dimension(2), head_dim = p.k.dimension(3);
  const Index q_len = p.q.dimension(2), n_rep = p.q.dimension(1) / p.k.dimension(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const bool softcap = p.options.softcap > 0.0;
  const bool int8_dot = detail::is_qint8_v<KV> &&
                        test::scores_by_int8_dot(SdpaPath::kAuto, int8, q_len, n_rep, head_dim);
  const bool bf16_dot = std::is_same_v<KV, bfloat16> &&
                        test::decodes_by_bf16_dot(SdpaPath::kAuto, bf16, q_len, n_rep, head_dim);
  KVCache<KV> cache(batch, kv_len, p.k.dimension(1), head_dim);
  const KVPrefix<KV> prefix = cache.update(p.k, p.v);
  const Tensor<float, 4> k_stored = stored_values(prefix.keys, Role::kKeys);
  const Tensor<float, 4> v_stored = stored_values(prefix.values, Role::kValues);
  const bool rounds_q = int8_dot || bf16_dot;
  const Tensor<double, 4> q_rounded =
      bf16_dot ? test::bf16_rounded_queries(p.q) : test::quantized_queries(p.q, scale, softcap);
  const Tensor<float, 4> q_seen = rounds_q ? Tensor<float, 4>(q_rounded.cast<float>()) : p.q;
  const test::DenseResult exact_stored =
      std::is_same_v<KV, float>
          ? exact_original
          : test::dense_sdpa(rounds_q ? q_rounded : test::to_double(p.q), test::to_double(k_stored),
                             test::to_double(v_stored), p.masks, p.options);
  test::AccuracyBudget on_stored = test::sdpa_budget<float>(
      SdpaPath::kAuto, test::budget_inputs(q_seen, k_stored, p.masks, p.options, exact_stored));
  if (bf16_dot) on_stored = test::with_bf16_weights(on_stored);
  if (int8_dot) on_stored = test::with_int8_value_weights(on_stored);
  const test::AccuracyBudget on_original =
      rounds_q ? test::quantized_query_cache_budget<KV>(on_stored, q_rounded, p.q, p.k, p.v, scale)
               : test::cache_budget<KV>(on_stored, p.q, p.k, p.v, scale);
  SdpaOptions options = test::library_options(p.masks, p.options);
  options.int8_kernel = int8;
  options.bf16_kernel = bf16;
  const Tensor<float, 4> out =
      Sdpa<float, KV>(options)(p.q, prefix.keys, prefix.values, test::library_masks(p.masks));
  const double err_original = test::max_abs_diff(out, exact_original.out) / test::max_abs(p.v);
  const double err_stored = test::max_abs_diff(out, exact_stored.out) / test::max_abs(v_stored);
  EXPECT_LE(err_original, on_original.out);
  EXPECT_LE(err_stored, on_stored.out);
  if (print_table()) {
    std::printf("| %-7s | %5lld | %-6s | %9.2e | %9.2e | %9.2e | %9.2e |\n", shape,
                static_cast<long long>(kv_len), format, on_original.out, err_original,
                on_stored.out, err_stored);
  }
}

void measure_cache_formats(const char* shape, Index q_len, Index kv_len, bool causal) {
  const Problem p = make_problem(causal ? Kind::kCausal : Kind::kNone, 1, 8, 2, q_len, kv_len, 128,
                                 500 + static_cast<std::uint32_t>(kv_len));
  const test::DenseResult exact = test::dense_sdpa(test::to_double(p.q), test::to_double(p.k),
                                                   test::to_double(p.v), p.masks, p.options);
  measure_cache_format<float>("fp32", shape, p, exact);
  measure_cache_format<bfloat16>("bf16", shape, p, exact);
  measure_cache_format<half>("fp16", shape, p, exact);
  measure_cache_format<QInt8>("int8", shape, p, exact);
  if (test::scores_by_int8_dot(SdpaPath::kAuto, Int8Kernel::kAuto, q_len, 4, 128))
    measure_cache_format<QInt8>("int8 dot", shape, p, exact, Int8Kernel::kAuto);
  if (test::decodes_by_bf16_dot(SdpaPath::kAuto, Bf16Kernel::kDotProduct, q_len, 4, 128)) {
    measure_cache_format<bfloat16>("bf16 dot", shape, p, exact, Int8Kernel::kDequantize,
                                   Bf16Kernel::kDotProduct);
  }
}

// q, k, v ~ N(0, 1), H 8, Hkv 2, D 128, default scale. decode: one query over Skv keys;
// prefill (printed only, its brute force is slow): Sq = Skv, causal.
TEST(QInt8CacheAccuracy, EveryCacheFormatStaysWithinItsBudgetAgainstOriginalAndStoredInputs) {
  const bool print = print_table();
  if (print) {
    std::printf(
        "| shape   |   Skv | cache  | bound vs original | measured vs original | "
        "bound vs stored | measured vs stored |\n");
  }
  for (const Index kv_len : {256, 512, 1024, 2048}) {
    SCOPED_TRACE(kv_len);
    if (print || kv_len == 256 || kv_len == 2048) measure_cache_formats("decode", 1, kv_len, false);
    if (print) measure_cache_formats("prefill", kv_len, kv_len, true);
  }
}

// ---------------------------------------------------------------------------------------
// PagedKVCache<QInt8> and PagedAttention<float, QInt8>.

// Two groups, the last of 12; stored rows of 52 bytes, so consecutive rows (and their
// scales) are only 4-aligned.
constexpr Index kPagedKvHeads = 2, kPagedHeadDim = 44;

// (cached length after the append, new tokens): a whole prompt, a prefill chunk on top of
// a cache, decode steps, and a short multi-token step.
struct SeqShape {
  Index len, n;
};
const SeqShape kShapes[] = {{150, 150}, {300, 70}, {777, 1}, {45, 1}, {129, 3}};

// Positions [first, first + n) of (1, Hkv, L, D) rows as (Hkv, n, D), the paged layout.
Tensor<float, 3> positions(const Tensor<float, 4>& t, Index first, Index n) {
  Tensor<float, 3> out(t.dimension(1), n, t.dimension(3));
  for (Index h = 0; h < t.dimension(1); ++h)
    for (Index p = 0; p < n; ++p)
      for (Index d = 0; d < t.dimension(3); ++d) out(h, p, d) = t(0, h, first + p, d);
  return out;
}

// The head_dim whose stored row is row_bytes long.
Index head_dim_of(Index row_bytes) {
  Index head_dim = 4;
  while (scale_offset(head_dim, (head_dim + kGroup - 1) / kGroup) < row_bytes) head_dim += 4;
  return head_dim;
}

// Positions [0, n) of tile bytes (Hkv, >= n positions, row_bytes), head h's tiles at
// data + h * head_stride, as stored rows (Hkv, n, row_bytes).
Tensor<QInt8, 3> as_rows(const QInt8* data, Index heads, Index head_stride, Index row_bytes,
                         Index n, Role role) {
  Tensor<QInt8, 3> out(heads, n, row_bytes);
  for (Index h = 0; h < heads; ++h) {
    for (Index p = 0; p < n; ++p) {
      const std::vector<QInt8> row = tile_row(data + h * head_stride + (p - p % 16) * row_bytes,
                                              head_dim_of(row_bytes), p % 16, role);
      std::copy(row.begin(), row.end(), &out(h, p, 0));
    }
  }
  return out;
}

// Positions [0, n) of a (1, Hkv, capacity, row_bytes) KVCache storage as stored rows.
Tensor<QInt8, 3> first_rows(const Tensor<QInt8, 4>& storage, Index n, Role role) {
  return as_rows(storage.data(), storage.dimension(1), storage.dimension(2) * storage.dimension(3),
                 storage.dimension(3), n, role);
}

// PagedKVCache::gather_keys / gather_values (whole tiles) of a sequence of length n as
// stored rows.
Tensor<QInt8, 3> gathered_rows(const Tensor<QInt8, 3>& tiles, Index n, Role role) {
  return as_rows(tiles.data(), tiles.dimension(0), tiles.dimension(1) * tiles.dimension(2),
                 tiles.dimension(2), n, role);
}

struct PagedCase {
  Index block;
  Index n_rep;
  Kind kind;
  Index head_dim = kPagedHeadDim;  // 64 too: whole groups as well as a row ending mid-group
};

std::string paged_case_name(const ::testing::TestParamInfo<PagedCase>& info) {
  const char* kind = info.param.kind == Kind::kCausal   ? "Causal"
                     : info.param.kind == Kind::kWindow ? "CausalWindow"
                     : info.param.kind == Kind::kDocs   ? "CausalDocs"
                                                        : "CausalSinks";
  return std::string(kind) + "_block" + std::to_string(info.param.block) + "_rep" +
         std::to_string(info.param.n_rep) + "_D" + std::to_string(info.param.head_dim);
}

class QInt8PagedRagged : public ::testing::TestWithParam<PagedCase> {};

// Each sequence of a ragged batch (decode steps and prefill chunks, blocks scattered by
// interleaved filler sequences) holds exactly the bytes of a contiguous KVCache<QInt8> of
// the same positions, and its attention equals Sdpa<float, QInt8> over that cache: both
// are within the float budget of the brute force on the same dequantized values.
TEST_P(QInt8PagedRagged, EverySequenceHoldsTheContiguousCacheBytesAndMatchesItsAttention) {
  const PagedCase c = GetParam();
  const Index n_heads = kPagedKvHeads * c.n_rep;
  const bool docs = c.kind == Kind::kDocs;
  PagedKVCache<QInt8> cache(200, c.block, kPagedKvHeads, c.head_dim, docs);
  std::vector<Problem> seqs;
  std::vector<KVCache<QInt8>> contiguous;
  RaggedBatch batch{{}, {0}};
  for (std::size_t s = 0; s < std::size(kShapes); ++s) {
    const SeqShape shape = kShapes[s];
    seqs.push_back(make_problem(c.kind, 1, n_heads, kPagedKvHeads, shape.n, shape.len, c.head_dim,
                                600 + 10 * static_cast<std::uint32_t>(s)));
    const Problem& p = seqs.back();
    // A filler sequence first, so this one's blocks are scattered in the pool.
    const SeqId filler = cache.add_sequence();
    const Tensor<float, 3> fk = test::random_normal<float, 3>({kPagedKvHeads, 17, c.head_dim}, 7);
    Tensor<DocId, 2> filler_ids(1, 17);
    filler_ids.setZero();
    if (docs) {
      cache.append(filler, ConstView<float, 3>(fk), ConstView<float, 3>(fk), filler_ids);
    } else {
      cache.append(filler, ConstView<float, 3>(fk), ConstView<float, 3>(fk));
    }
    // The cached positions, then the new tokens' (appended before attending to them).
    const SeqId id = cache.add_sequence();
    for (const auto& [first, n] : {std::pair<Index, Index>{0, shape.len - shape.n},
                                   std::pair<Index, Index>{shape.len - shape.n, shape.n}}) {
      const Tensor<float, 3> k = positions(p.k, first, n), v = positions(p.v, first, n);
      if (docs) {
        const ConstView<DocId, 2> ids = ConstView<DocId, 2>(*p.masks.kv_docs).narrow(1, first, n);
        cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v), ids);
      } else {
        cache.append(id, ConstView<float, 3>(k), ConstView<float, 3>(v));
      }
    }
    batch.seqs.push_back(id);
    batch.cu_seqlens.push_back(batch.cu_seqlens.back() + shape.n);
    contiguous.emplace_back(1, shape.len, kPagedKvHeads, c.head_dim);
    contiguous.back().update(p.k, p.v);
    EXPECT_TRUE(
        test::bitwise_equal(gathered_rows(cache.gather_keys(id), shape.len, Role::kKeys),
                            first_rows(contiguous.back().key_storage(), shape.len, Role::kKeys)))
        << "sequence " << s;
    EXPECT_TRUE(test::bitwise_equal(
        gathered_rows(cache.gather_values(id), shape.len, Role::kValues),
        first_rows(contiguous.back().value_storage(), shape.len, Role::kValues)))
        << "sequence " << s;
  }
  // The packed queries (total, H, D); per-sequence masks take the keys' document ids from
  // the cache's records.
  // (Named references, not a structured binding: a C++17 lambda cannot capture one.)
  const auto packed = test::pack_ragged_queries(seqs, batch);
  const Tensor<float, 3>& q = packed.first;
  const std::vector<Masks>& masks = packed.second;
  // Per sequence, the brute force on the dequantized keys and values from q, and from q~
  // (what the int8 dot products multiply, for the decode steps that take them).
  std::vector<test::DenseResult> exact[2];
  std::vector<test::BudgetInputs> inputs[2];
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    const Problem& p = seqs[s];
    const KVPrefix<QInt8> prefix = contiguous[s].prefix();
    const Tensor<float, 4> k_stored = stored_values(prefix.keys, Role::kKeys);
    const Tensor<float, 4> q_quantized =
        test::quantized_queries(p.q, scale, p.options.softcap > 0.0).cast<float>();
    for (int dot = 0; dot < 2; ++dot) {
      const Tensor<float, 4>& q_seen = dot ? q_quantized : p.q;
      exact[dot].push_back(test::dense_sdpa(
          test::to_double(q_seen), test::to_double(k_stored),
          test::to_double(stored_values(prefix.values, Role::kValues)), p.masks, p.options));
      inputs[dot].push_back(
          test::budget_inputs(q_seen, k_stored, p.masks, p.options, exact[dot].back()));
    }
  }
  Index int8_dot_sequences = 0;
  for (const SdpaPath path : test::kAllPaths) {
    SCOPED_TRACE(test::path_name(path));
    const SdpaOptions options = test::library_options(seqs[0].masks, seqs[0].options, path);
    Tensor<float, 3> out(q.dimensions()), out2(q.dimensions());
    Tensor<float, 2> lse(n_heads, batch.total_tokens());
    PagedAttention<float, QInt8> one_thread(options), two_threads(options, &test::pool_device(2));
    one_thread(q, cache, batch, out, masks, lse);
    two_threads(q, cache, batch, out2, masks);
    EXPECT_TRUE(test::bitwise_equal(out, out2)) << "2 threads differ from 1";
    for (std::size_t s = 0; s < seqs.size(); ++s) {
      SCOPED_TRACE(::testing::Message() << "sequence " << s);
      const Problem& p = seqs[s];
      const Index n = kShapes[s].n, first = batch.first_token(static_cast<Index>(s));
      const KVPrefix<QInt8> prefix = contiguous[s].prefix();
      Tensor<float, 4> want(p.q.dimensions());
      Tensor<float, 3> want_lse(1, n_heads, n);
      Sdpa<float, QInt8> sdpa(options);
      sdpa(p.q, prefix.keys, prefix.values, StridedView<float, 4>(want),
           test::library_masks(p.masks), StridedView<float, 3>(want_lse));
      const int dot = test::scores_by_int8_dot(path, Int8Kernel::kAuto, n, c.n_rep, c.head_dim);
      int8_dot_sequences += dot;
      test::AccuracyBudget budget = test::sdpa_budget<float>(path, inputs[dot][s]);
      if (dot) budget = test::with_int8_value_weights(budget);
      const double v_scale = test::max_abs(stored_values(prefix.values, Role::kValues));
      double err = 0, err_contiguous = 0, err_lse = 0, err_lse_contiguous = 0;
      for (Index h = 0; h < n_heads; ++h) {
        for (Index i = 0; i < n; ++i) {
          for (Index d = 0; d < c.head_dim; ++d) {
            const double got = out(first + i, h, d);
            err = std::max(err, std::abs(got - exact[dot][s].out(0, h, i, d)));
            err_contiguous = std::max(err_contiguous, std::abs(got - want(0, h, i, d)));
          }
          const double e = exact[dot][s].lse(0, h, i), got = lse(h, first + i);
          if (std::isinf(e)) {
            EXPECT_EQ(got, e);
          } else {
            err_lse = std::max(err_lse, std::abs(got - e));
            err_lse_contiguous = std::max(err_lse_contiguous, std::abs(got - want_lse(0, h, i)));
          }
        }
      }
      EXPECT_LE(err / v_scale, budget.out);
      EXPECT_LE(err_lse, budget.lse);
      // Both within the budget of the same exact result.
      EXPECT_LE(err_contiguous / v_scale, 2.0 * budget.out);
      EXPECT_LE(err_lse_contiguous, 2.0 * budget.lse);
    }
  }
  // Every case (D 44 and D 64) reaches the int8 dot products wherever the CPU and build have
  // them.
  if (test::scores_by_int8_dot(SdpaPath::kDecode, Int8Kernel::kAuto, 1, 1, c.head_dim)) {
    EXPECT_GT(int8_dot_sequences, 0);
  }
}

std::vector<PagedCase> paged_cases() {
  std::vector<PagedCase> cases;
  for (const Index block : {16, 64}) {
    cases.push_back({block, block == 16 ? Index{8} : Index{4}, Kind::kCausal});  // MQA-like, GQA
    cases.push_back({block, 1, Kind::kWindow});                                  // MHA
    cases.push_back({block, 2, Kind::kDocs});
    cases.push_back({block, 4, Kind::kSinks});
    cases.push_back({block, 4, Kind::kCausal, 64});
  }
  cases.push_back({16, 2, Kind::kDocs, 64});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, QInt8PagedRagged, ::testing::ValuesIn(paged_cases()),
                         paged_case_name);

class QInt8PagedFork : public ::testing::TestWithParam<Index> {};

// A fork shares the parent's blocks; the child's first append copies the shared, partially
// filled last block. The parent keeps its bytes, and both hold the bytes of a contiguous
// KVCache<QInt8> of their positions.
TEST_P(QInt8PagedFork, CopyOnWriteOfASharedPartialBlockKeepsTheParentsBytes) {
  const Index block = GetParam(), parent_len = block + 5, child_new = 7;
  PagedKVCache<QInt8> cache(8, block, kPagedKvHeads, kPagedHeadDim);
  const auto k =
      test::random_normal<float, 4>({1, kPagedKvHeads, parent_len + child_new, kPagedHeadDim}, 700);
  const auto v =
      test::random_normal<float, 4>({1, kPagedKvHeads, parent_len + child_new, kPagedHeadDim}, 701);
  const auto parent_k = positions(k, 0, parent_len), parent_v = positions(v, 0, parent_len);
  const auto child_k = positions(k, parent_len, child_new),
             child_v = positions(v, parent_len, child_new);
  const SeqId parent = cache.add_sequence();
  cache.append(parent, ConstView<float, 3>(parent_k), ConstView<float, 3>(parent_v));
  KVCache<QInt8> contiguous(1, parent_len + child_new, kPagedKvHeads, kPagedHeadDim);
  contiguous.update(ConstView<float, 4>(k).narrow(2, 0, parent_len),
                    ConstView<float, 4>(v).narrow(2, 0, parent_len));
  const Tensor<QInt8, 3> parent_keys =
      gathered_rows(cache.gather_keys(parent), parent_len, Role::kKeys);
  const Tensor<QInt8, 3> parent_values =
      gathered_rows(cache.gather_values(parent), parent_len, Role::kValues);
  EXPECT_TRUE(test::bitwise_equal(parent_keys,
                                  first_rows(contiguous.key_storage(), parent_len, Role::kKeys)));
  EXPECT_TRUE(test::bitwise_equal(
      parent_values, first_rows(contiguous.value_storage(), parent_len, Role::kValues)));

  const SeqId child = cache.fork(parent);
  EXPECT_EQ(cache.blocks_in_use(), 2);  // shared, nothing copied yet
  cache.append(child, ConstView<float, 3>(child_k), ConstView<float, 3>(child_v));
  EXPECT_EQ(cache.block_table(child)[0], cache.block_table(parent)[0]);  // full: still shared
  EXPECT_NE(cache.block_table(child)[1], cache.block_table(parent)[1]);  // partial: copied
  EXPECT_EQ(cache.blocks_in_use(), 3);
  EXPECT_TRUE(test::bitwise_equal(gathered_rows(cache.gather_keys(parent), parent_len, Role::kKeys),
                                  parent_keys));
  EXPECT_TRUE(test::bitwise_equal(
      gathered_rows(cache.gather_values(parent), parent_len, Role::kValues), parent_values));
  contiguous.update(ConstView<float, 4>(k).narrow(2, parent_len, child_new),
                    ConstView<float, 4>(v).narrow(2, parent_len, child_new));
  const Index child_len = parent_len + child_new;
  EXPECT_TRUE(test::bitwise_equal(gathered_rows(cache.gather_keys(child), child_len, Role::kKeys),
                                  first_rows(contiguous.key_storage(), child_len, Role::kKeys)));
  EXPECT_TRUE(
      test::bitwise_equal(gathered_rows(cache.gather_values(child), child_len, Role::kValues),
                          first_rows(contiguous.value_storage(), child_len, Role::kValues)));

  // The parent's own appends now write in place and leave the child alone.
  const auto more = test::random_normal<float, 3>({kPagedKvHeads, 2, kPagedHeadDim}, 702);
  cache.append(parent, ConstView<float, 3>(more), ConstView<float, 3>(more));
  EXPECT_EQ(cache.blocks_in_use(), 3);
  EXPECT_TRUE(test::bitwise_equal(gathered_rows(cache.gather_keys(child), child_len, Role::kKeys),
                                  first_rows(contiguous.key_storage(), child_len, Role::kKeys)));

  // Attention of the child's last 3 tokens reads the copied block like the contiguous cache.
  const Index n_heads = 4, n = 3;
  const auto q4 = test::random_normal<float, 4>({1, n_heads, n, kPagedHeadDim}, 703);
  Tensor<float, 3> q(n, n_heads, kPagedHeadDim);
  for (Index h = 0; h < n_heads; ++h)
    for (Index i = 0; i < n; ++i)
      for (Index d = 0; d < kPagedHeadDim; ++d) q(i, h, d) = q4(0, h, i, d);
  SdpaOptions options;
  options.causal = true;
  const Tensor<float, 3> got =
      PagedAttention<float, QInt8>(options)(q, cache, RaggedBatch{{child}, {0, n}});
  const KVPrefix<QInt8> prefix = contiguous.prefix();
  const Tensor<float, 4> k_stored = stored_values(prefix.keys, Role::kKeys);
  test::DenseMasks dense;
  dense.causal = true;
  // Where the int8 dot products score, against the queries as they multiply.
  const bool int8_dot = test::scores_by_int8_dot(SdpaPath::kAuto, Int8Kernel::kAuto, n,
                                                 n_heads / kPagedKvHeads, kPagedHeadDim);
  const double scale = 1.0 / std::sqrt(static_cast<double>(kPagedHeadDim));
  const Tensor<double, 4> q_seen =
      int8_dot ? test::quantized_queries(q4, scale, false) : test::to_double(q4);
  const test::DenseResult exact =
      test::dense_sdpa(q_seen, test::to_double(k_stored),
                       test::to_double(stored_values(prefix.values, Role::kValues)), dense);
  test::AccuracyBudget on_stored = test::sdpa_budget<float>(
      SdpaPath::kAuto,
      test::budget_inputs(Tensor<float, 4>(q_seen.cast<float>()), k_stored, dense, {}, exact));
  if (int8_dot) on_stored = test::with_int8_value_weights(on_stored);
  const double budget = on_stored.out;
  const double v_scale = test::max_abs(stored_values(prefix.values, Role::kValues));
  double err = 0;
  for (Index h = 0; h < n_heads; ++h)
    for (Index i = 0; i < n; ++i)
      for (Index d = 0; d < kPagedHeadDim; ++d)
        err = std::max(err, std::abs(got(i, h, d) - exact.out(0, h, i, d)));
  EXPECT_LE(err / v_scale, budget);
}

INSTANTIATE_TEST_SUITE_P(BlockSizes, QInt8PagedFork, ::testing::Values(Index{16}, Index{64}),
                         [](const ::testing::TestParamInfo<Index>& info) {
                           return "block" + std::to_string(info.param);
                         });

// ---------------------------------------------------------------------------------------
// Attention<float>::forward over QInt8 caches.

constexpr Index kDim = 128, kHeads = 4, kKvHeads = 2, kModuleHeadDim = 64;

// An upper bound of ||q||_2 over every query head the module forms from the rows of x
// (RoPE rotates pairs of values, keeping the norm): with qk_norm, sqrt(D) max|q_norm|
// (the RMS-normalised vector has norm sqrt(D) at most); without, max_t ||x_t|| times the
// largest Frobenius norm of a head's block of wq. The factor 1 + 1e-5 covers the float
// rounding of the projection, the norm and the rotation (a few units of 2^-24 each).
double query_norm_bound(const Attention<float>& attn, const Tensor<float, 3>& x) {
  double bound = 0.0;
  if (attn.qk_norm()) {
    bound = std::sqrt(static_cast<double>(attn.head_dim())) * test::max_abs(attn.q_norm());
  } else {
    double x_norm = 0.0;
    for (Index r = 0; r < x.size() / attn.dim(); ++r) {
      double sum = 0.0;
      for (Index c = 0; c < attn.dim(); ++c)
        sum += std::pow(static_cast<double>(x.data()[r * attn.dim() + c]), 2);
      x_norm = std::max(x_norm, std::sqrt(sum));
    }
    double w_norm = 0.0;
    const Tensor<float, 2>& wq = attn.wq();
    for (Index h = 0; h < attn.n_heads(); ++h) {
      double sum = 0.0;
      for (Index r = h * attn.head_dim(); r < (h + 1) * attn.head_dim(); ++r)
        for (Index c = 0; c < attn.dim(); ++c) sum += std::pow(static_cast<double>(wq(r, c)), 2);
      w_norm = std::max(w_norm, std::sqrt(sum));
    }
    bound = x_norm * w_norm;
  }
  return bound * (1.0 + 1e-5);
}

// max_r sum_c |wo[r, c]|: how much y = o wo^T amplifies a bound on |o|.
double output_gain(const Attention<float>& attn) {
  double gain = 0.0;
  const Tensor<float, 2>& wo = attn.wo();
  for (Index r = 0; r < wo.dimension(0); ++r) {
    double sum = 0.0;
    for (Index c = 0; c < wo.dimension(1); ++c) sum += std::abs(static_cast<double>(wo(r, c)));
    gain = std::max(gain, sum);
  }
  return gain;
}

// max_j ||row_j||_2 over the rows (..., D) of t.
double max_row_norm(const Tensor<double, 4>& t) {
  double worst = 0.0;
  const Index d = t.dimension(3);
  for (Index r = 0; r < t.size() / d; ++r) {
    double sum = 0.0;
    for (Index i = 0; i < d; ++i) sum += t.data()[r * d + i] * t.data()[r * d + i];
    worst = std::max(worst, std::sqrt(sum));
  }
  return worst;
}

// E_out (sdpa_budget, float) of the module's attention: scores bounded by Cauchy-Schwarz,
// S <= scale max||q|| max||k||, over at most `keys` keys.
double module_attention_budget(double q_norm, double k_norm, Index keys) {
  test::BudgetInputs in;
  in.head_dim = kModuleHeadDim;
  in.max_keys = keys;
  in.max_score = q_norm * k_norm / std::sqrt(static_cast<double>(kModuleHeadDim));
  return test::sdpa_budget<float>(SdpaPath::kAuto, in).out;
}

// Each forward's y rows through the cache, a prefill chunk of 5 then single tokens.
template <typename Cache>
Tensor<float, 3> decode_steps(Attention<float>& attn, const RotaryEmbedding<float>& rope,
                              const Tensor<float, 3>& x, Cache& cache) {
  const Index batch = x.dimension(0), len = x.dimension(1);
  Tensor<float, 3> steps(batch, len, kDim);
  for (Index start = 0; start < len;) {
    const Index n = start == 0 ? 5 : 1;
    const Tensor<float, 3> y =
        attn.forward(ConstView<float, 3>(x).narrow(1, start, n), rope, start, &cache);
    for (Index b = 0; b < batch; ++b)
      for (Index s = 0; s < n; ++s)
        for (Index d = 0; d < kDim; ++d) steps(b, start + s, d) = y(b, s, d);
    start += n;
  }
  return steps;
}

class QInt8Attention : public ::testing::TestWithParam<bool> {};  // qk_norm

// The same module decoding through a QInt8 and a float cache: the caches hold the same
// keys and values (the QInt8 one quantized), so y moves by the quantization budget of the
// attention (cache_budget's form, scores bounded by Cauchy-Schwarz: delta_K <= scale
// max||q|| max||dk||) plus both attentions' float error, through wo:
//   |dy| <= gain(wo) max|v| ((E_out + e^(2 delta_K) - 1)(1 + E_V) + E_V + E_out
//                             + 2 (H D + 1) 2^-24 (1 + E_V))
// the last term for the two projections' float sums of H D terms.
TEST_P(QInt8Attention, DecodingThroughAQInt8CacheStaysWithinTheQuantizationBudgetOfAFloatCache) {
  const bool qk_norm = GetParam();
  constexpr Index kBatch = 2, kLen = 12;
  Attention<float> attn(kDim, kHeads, kKvHeads, kModuleHeadDim, qk_norm);
  attn.reset_parameters(31);
  if (qk_norm) {
    attn.q_norm() = test::random_uniform<float, 1>({kModuleHeadDim}, 32, 0.5, 1.5);
    attn.k_norm() = test::random_uniform<float, 1>({kModuleHeadDim}, 33, 0.5, 1.5);
  }
  const RotaryEmbedding<float> rope(kModuleHeadDim, kLen);
  const auto x = test::random_normal<float, 3>({kBatch, kLen, kDim}, 34);
  KVCache<float> float_cache(kBatch, kLen, kKvHeads, kModuleHeadDim);
  KVCache<QInt8> int8_cache(kBatch, kLen, kKvHeads, kModuleHeadDim);
  const Tensor<float, 3> y_float = decode_steps(attn, rope, x, float_cache);
  const Tensor<float, 3> y_int8 = decode_steps(attn, rope, x, int8_cache);

  // The QInt8 cache holds the float cache's rows (rotated keys, values), quantized.
  const Tensor<float, 4> k = float_cache.prefix().keys.to_tensor();
  const Tensor<float, 4> v = float_cache.prefix().values.to_tensor();
  const KVPrefix<QInt8> stored = int8_cache.prefix();
  for (Index b = 0; b < kBatch; ++b)
    for (Index h = 0; h < kKvHeads; ++h)
      for (Index s = 0; s < kLen; ++s) {
        ASSERT_EQ(row_mismatch(stored_row(stored.keys, b, h, s, Role::kKeys).data(), &k(b, h, s, 0),
                               kModuleHeadDim),
                  "");
        ASSERT_EQ(row_mismatch(stored_row(stored.values, b, h, s, Role::kValues).data(),
                               &v(b, h, s, 0), kModuleHeadDim),
                  "");
      }

  const double q_norm = query_norm_bound(attn, x);
  const double scale = 1.0 / std::sqrt(static_cast<double>(kModuleHeadDim));
  const double delta_k = scale * q_norm * max_row_norm(test::storage_error_bound<QInt8>(k));
  const double v_scale = test::max_abs(v);
  const double value_error = test::max_abs(test::storage_error_bound<QInt8>(v)) / v_scale;
  const double k_norm =
      std::max(max_row_norm(test::to_double(k)),
               max_row_norm(test::to_double(stored_values(stored.keys, Role::kKeys))));
  const double e_out = module_attention_budget(q_norm, k_norm, kLen);
  const double attention =
      test::reduced_cache_budget({e_out, 0.0}, delta_k, value_error).out + e_out;
  const double projection =
      2.0 * static_cast<double>(kHeads * kModuleHeadDim + 1) * 0x1.0p-24 * (1.0 + value_error);
  const double bound = output_gain(attn) * v_scale * (attention + projection);
  const double err = test::max_abs_diff(y_int8, y_float);
  EXPECT_LE(err, bound);
  EXPECT_GT(err, 0.0);  // the cache really is quantized
}

// Dyadic weights k / 64 and inputs k / 16 make every projection exact, whatever the
// order of its sums (one row is a GEMV, a ragged step a GEMM of all its rows): the ragged
// and the contiguous run then append identical keys and values, and must store identical
// bytes (otherwise a value at a rounding tie of the quantization could legitimately land
// one step apart, which is no float-accuracy difference).
void make_dyadic(Attention<float>& attn) {
  for (ParameterRef<float, 2> w : {attn.wq(), attn.wk(), attn.wv(), attn.wo()})
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = std::round(w.data()[i] * 64.0f) / 64.0f;
}

// Ragged steps over a PagedKVCache<QInt8> (prefill chunks next to decodes, a fork of a
// prompt) against each request run alone through a KVCache<QInt8>: the same bytes, and
// outputs that differ only by the float rounding of two attentions over them
// (2 E_out max|v~|) and of the output projection, through wo.
TEST_P(QInt8Attention, RaggedForwardOverAPagedQInt8CacheMatchesTheContiguousQInt8CachePerRequest) {
  const bool qk_norm = GetParam();
  constexpr Index kMaxLen = 32;
  Attention<float> attn(kDim, kHeads, kKvHeads, kModuleHeadDim, qk_norm);
  attn.reset_parameters(41);
  make_dyadic(attn);
  if (qk_norm) {
    attn.q_norm() = test::random_uniform<float, 1>({kModuleHeadDim}, 42, 0.5, 1.5);
    attn.k_norm() = test::random_uniform<float, 1>({kModuleHeadDim}, 43, 0.5, 1.5);
  }
  const RotaryEmbedding<float> rope(kModuleHeadDim, kMaxLen);

  // Requests 0..3; request 3 is a fork of request 2 after its first 6 tokens.
  const Index lengths[] = {20, 9, 14, 14};
  std::vector<Tensor<float, 3>> xs;
  for (Index r = 0; r < 4; ++r) {
    Tensor<float, 3> x =
        test::random_uniform<float, 3>({1, lengths[r], kDim}, 44 + static_cast<std::uint32_t>(r));
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = std::round(x.data()[i] * 16.0f) / 16.0f;
    xs.push_back(x);
  }
  for (Index p = 0; p < 6; ++p)
    for (Index d = 0; d < kDim; ++d) xs[3](0, p, d) = xs[2](0, p, d);

  PagedKVCache<QInt8> cache(16, 16, kKvHeads, kModuleHeadDim);
  std::vector<SeqId> ids(4, -1);
  std::vector<Index> done(4, 0);
  std::vector<Tensor<float, 3>> outs;
  for (Index r = 0; r < 4; ++r) outs.emplace_back(1, lengths[r], kDim);
  const auto step = [&](const std::vector<std::pair<Index, Index>>& work) {
    RaggedBatch batch{{}, {0}};
    for (const auto& [r, n] : work) {
      batch.seqs.push_back(ids[static_cast<std::size_t>(r)]);
      batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n);
    }
    Tensor<float, 2> x(batch.total_tokens(), kDim);
    Index row = 0;
    for (const auto& [r, n] : work)
      for (Index t = 0; t < n; ++t, ++row)
        for (Index d = 0; d < kDim; ++d)
          x(row, d) = xs[static_cast<std::size_t>(r)](0, done[static_cast<std::size_t>(r)] + t, d);
    const Tensor<float, 2> y = attn.forward(x, rope, cache, batch);
    row = 0;
    for (const auto& [r, n] : work) {
      Index& first = done[static_cast<std::size_t>(r)];
      for (Index t = 0; t < n; ++t, ++row)
        for (Index d = 0; d < kDim; ++d)
          outs[static_cast<std::size_t>(r)](0, first + t, d) = y(row, d);
      first += n;
    }
  };
  for (Index r : {0, 1, 2}) ids[static_cast<std::size_t>(r)] = cache.add_sequence();
  step({{0, 8}, {1, 9}, {2, 6}});  // prefills, request 0's in two chunks
  ids[3] = cache.fork(ids[2]);     // request 3 shares request 2's prompt and its outputs
  done[3] = 6;
  for (Index p = 0; p < 6; ++p)
    for (Index d = 0; d < kDim; ++d) outs[3](0, p, d) = outs[2](0, p, d);
  step({{0, 12}, {2, 1}, {3, 1}});  // a chunk next to two decodes of the forked pair
  step({{2, 1}, {3, 1}});
  step({{3, 6}, {2, 6}});

  for (Index r = 0; r < 4; ++r) {
    SCOPED_TRACE(::testing::Message() << "request " << r);
    const Index len = lengths[r];
    ASSERT_EQ(cache.seq_len(ids[static_cast<std::size_t>(r)]), len);
    KVCache<QInt8> alone(1, len, kKvHeads, kModuleHeadDim);
    Tensor<float, 3> contiguous(1, len, kDim);
    for (Index first = 0; first < len;) {
      const Index n = std::min<Index>(first == 0 ? 7 : 1, len - first);
      const Tensor<float, 3> y =
          attn.forward(ConstView<float, 3>(xs[static_cast<std::size_t>(r)]).narrow(1, first, n),
                       rope, first, &alone);
      for (Index t = 0; t < n; ++t)
        for (Index d = 0; d < kDim; ++d) contiguous(0, first + t, d) = y(0, t, d);
      first += n;
    }
    EXPECT_TRUE(test::bitwise_equal(
        gathered_rows(cache.gather_keys(ids[static_cast<std::size_t>(r)]), len, Role::kKeys),
        first_rows(alone.key_storage(), len, Role::kKeys)));
    EXPECT_TRUE(test::bitwise_equal(
        gathered_rows(cache.gather_values(ids[static_cast<std::size_t>(r)]), len, Role::kValues),
        first_rows(alone.value_storage(), len, Role::kValues)));
    const Tensor<float, 4> k_stored = stored_values(alone.prefix().keys, Role::kKeys);
    const double v_scale = test::max_abs(stored_values(alone.prefix().values, Role::kValues));
    const double e_out =
        module_attention_budget(query_norm_bound(attn, xs[static_cast<std::size_t>(r)]),
                                max_row_norm(test::to_double(k_stored)), len);
    const double projection = 2.0 * static_cast<double>(kHeads * kModuleHeadDim + 1) * 0x1.0p-24;
    const double bound = output_gain(attn) * v_scale * (2.0 * e_out + projection);
    EXPECT_LE(test::max_abs_diff(outs[static_cast<std::size_t>(r)], contiguous), bound);
  }
}

INSTANTIATE_TEST_SUITE_P(QkNorm, QInt8Attention, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? std::string("QkNorm") : std::string("NoQkNorm");
                         });

}  // namespace
}  // namespace qint8_tests
}  // namespace attnforge
