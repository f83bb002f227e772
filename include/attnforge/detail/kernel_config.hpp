// Tile sizes and register blocking of the fast kernels, in one place, each with the
// reason for its value. docs/design.md has the measurements behind them.
#pragma once

#include <algorithm>

#include "attnforge/detail/cpu_features.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// Compile-time feature switches of one kernel instantiation: a feature that is off costs
// nothing (the code is not there). Chosen once per call by dispatch_features.
template <bool Softcap, bool Masked, bool Biased, bool Bf16Dot = false>
struct Features {
  static constexpr bool kSoftcap = Softcap;  // s = c * tanh(s / c)
  static constexpr bool kMasked =
      Masked;  // element masks (documents, padding, attn_mask, -inf bias)
  static constexpr bool kBiased = Biased;    // attn_bias or ALiBi added to the scores
  static constexpr bool kBf16Dot = Bf16Dot;  // AVX512-BF16 tile products (fused kernel)
};

// Calls body(Features<...>{}) with the compile-time switches equal to the run-time
// flags (in the order of Features' parameters). Both fast paths dispatch through here.
template <bool... Known, typename Body, typename... Flags>
void dispatch_features(Body&& body, bool flag, Flags... rest) {
  if (flag) {
    dispatch_features<Known..., true>(body, rest...);
  } else {
    dispatch_features<Known..., false>(body, rest...);
  }
}
template <bool... Known, typename Body>
void dispatch_features(Body&& body) {
  body(Features<Known...>{});
}

// The fused (prefill) kernel. A query tile holds kLanes query rows along the SIMD lanes;
// the micro-kernel keeps kRows x kLaneVectors accumulators plus kLaneVectors operands
// in registers: 4 x 6 with 32 vector registers (24 + 4 + a broadcast), 4 x 3 with 16.
// Fewer lane vectors (3 x 8, 2 x 12) reload the broadcast operand more often per FMA,
// fewer rows (4 x 4) leave FMA latency exposed.
template <typename T>
struct FusedBlocking {
  static constexpr int kPacket = simd::kWidth<T>;
  static constexpr int kLaneVectors = 4;
  static constexpr int kRows = simd::kRegisters >= 32 ? 6 : 3;
  static constexpr int kLanes = kLaneVectors * kPacket;
};

// Keys per key tile: the micro-kernels stream a tile from L1/L2 at any size from 32 to
// 256 keys at the same rate; 64 keeps the score tile (key_tile x lanes) in L1 and the
// partial tiles on a causal diagonal small.
inline constexpr Index kDefaultKeyTile = 64;

// Query tiles per work item: they share each K/V tile while it is in cache, which keeps
// long sequences (K/V of a head beyond L2) from running at L3 speed. More tiles per item
// gain little beyond 8 and leave the pool fewer items at short S; their states (Qt and
// Ot, 2 * D * lanes values each) must fit in L2 next to a K and a V tile.
inline constexpr Index kQueryTilesPerItem = 8;

// Outputs of at least this many bytes per problem are written with streaming stores
// (simd::store_streaming): a fused call writes each output row once, and an output this
// large leaves a core's L2 before the next operation reads it, so reading its lines in
// before overwriting them only costs memory traffic. Smaller outputs stay in cache for
// the next operation.
inline constexpr Index kStreamedOutputBytes = Index{1} << 20;
template <typename V>
bool streams_output(const V& out) {
  return out.size() * static_cast<Index>(sizeof(typename V::Scalar)) >= kStreamedOutputBytes;
}

// The decode kernel (few query rows, a long cache).
// Keys per split-KV chunk: long enough that the merge (one FMA per chunk and output
// element) is noise, short enough that B * Hkv * chunks gives a pool enough items (at
// Skv = 4096 a KV head is 4 items).
inline constexpr Index kDecodeChunk = 1024;
// The decode path takes query groups of at most this many rows (Sq * n_rep); beyond that
// the fused kernel fills enough of its lanes to be the better choice.
template <typename T>
inline constexpr Index kDecodeMaxRows = FusedBlocking<T>::kLanes / 4;
// The decode scores reduce one accumulator per key with a transpose-add, whose cost
// grows with the packet width while the instructions of the FMAs halve. With 512-bit
// packets the full width wins, also on cores that execute a 512-bit FMA as two 256-bit
// halves (there it still halves the instructions the front end and the scheduler carry);
// narrower builds keep the half packets they were tuned with.
enum class DecodeScoreWidth { kAuto, kHalfPacket, kFullPacket };
template <typename T>
bool decode_scores_full_width(DecodeScoreWidth width) {
  if (width != DecodeScoreWidth::kAuto) return width == DecodeScoreWidth::kFullPacket;
  return simd::kWidth<T> * sizeof(T) == 64;
}
// Query rows one decode score pass takes: each key packet it loads (and widens, for a
// 16-bit cache) serves them all. Their sums for 4 keys, the 4 key packets and a query
// packet fit in the register file: 4 rows with 32 registers, 2 with 16.
inline constexpr int kScoreRows = simd::kRegisters >= 32 ? 4 : 2;
// Packets of head_dim one value pass holds per row: 2 rows of them, their key's values
// and the weights fill the register file.
inline constexpr int kValuePackets = simd::kRegisters >= 32 ? 8 : 4;

// Where the decode kernels stream the cache they read next (simd::LineStream): into L1,
// the block after the one they work on; into L2, that block, either K while the kernels
// score and V while they accumulate values, or crossed (V while they score, K while they
// accumulate, so each phase's requests go to the other operand's memory); or into L2, the
// block after that (the next block then arrives from L2 by the time it is read). Which one
// keeps the memory busiest depends on the core, so kAuto asks the CPU
// (cpu_prefers_l2_stream, cpu_prefers_l2_next_block); docs/design.md, "Decode streams the
// cache once", has the measurements.
enum class DecodeStream {
  kAuto,
  kL1NextBlock,
  kL2NextBlock,
  kL2NextBlockCrossed,
  kL2BlockAfterNext
};
struct DecodeStreamPlan {
  Index blocks_ahead;  // 1: the next block; 2: the one after
  bool into_l2;
  bool crossed;  // V's lines asked for during the scores, K's during the values
};
inline DecodeStreamPlan decode_stream_plan(DecodeStream stream) {
  if (stream == DecodeStream::kAuto) {
    stream = cpu_prefers_l2_stream()       ? DecodeStream::kL2BlockAfterNext
             : cpu_prefers_l2_next_block() ? DecodeStream::kL2NextBlockCrossed
                                           : DecodeStream::kL1NextBlock;
  }
  switch (stream) {
    case DecodeStream::kL2NextBlock:
      return {1, true, false};
    case DecodeStream::kL2NextBlockCrossed:
      return {1, true, true};
    case DecodeStream::kL2BlockAfterNext:
      return {2, true, false};
    default:
      return {1, false, false};
  }
}

// Tuning knobs of one ScaledDotProductAttention (benchmarks and tests only): every value
// gives the same result up to rounding.
struct KernelTuning {
  Index key_tile = 0;  // 0: kDefaultKeyTile
  DecodeScoreWidth decode_score_width = DecodeScoreWidth::kAuto;
  DecodeStream decode_stream = DecodeStream::kAuto;
};

}  // namespace attnforge::detail
