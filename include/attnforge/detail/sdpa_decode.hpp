// The decode kernel: few query rows (Sq * n_rep small) against a long KV cache.
//
// Such a step does ~1 FMA per byte of K/V, so its limit is how fast the cache streams
// from memory. The kernel therefore reads every K and V row exactly once per KV head
// (all n_rep query heads of the group and all Sq positions share it), straight from
// the cache's storage, with the SIMD lanes along head_dim:
//   scores: for a block of P keys (P = packet size), the query rows accumulate one
//           packet per key and row, a few rows at a time sharing each key packet
//           loaded, and a lane sum (simd::sum_each) turns a row's P packets into one
//           packet of P scores;
//   output: out[r] += p[r][j] * v[j], register-blocked over rows and head_dim.
// A QInt8 or bf16 cache is multiplied in its stored form where the CPU has the dot
// products (int8_dot.hpp, bf16_dot.hpp). Otherwise a bf16 or fp16 cache is widened to
// float packet by packet as the kernels load it, and a QInt8 one is dequantized a block
// at a time.
// Split-KV (flash-decoding): the keys are cut into chunks of kDecodeChunk, computed in
// parallel, each giving a normalised partial output and its log-sum-exp, merged exactly
// in chunk order. The chunking depends on Skv only, so any thread count gives the same
// bits. A work unit is one (KV head, chunk), or on a paged cache up to every KV head of a
// chunk, read pool block by pool block (decode_unit). While a kernel works on one block
// of keys it asks for the lines of a block ahead (the next, or the one after it, into
// L2, as the CPU prefers: DecodeStream), a few per key (next_block; docs/design.md,
// "Decode streams the cache once").
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "attnforge/detail/bf16_dot.hpp"
#include "attnforge/detail/int8_dot.hpp"
#include "attnforge/detail/kernel_config.hpp"
#include "attnforge/detail/mask_policy.hpp"
#include "attnforge/detail/online_softmax.hpp"
#include "attnforge/detail/parallel.hpp"
#include "attnforge/detail/sdpa_kernel.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

// What one group's rows carry from block to block of a chunk: their queries, output
// accumulators and softmax statistics. A worker that interleaves several groups keeps
// the others parked and swaps each in for its blocks (DecodeScratch::parked).
template <typename T>
struct DecodeRowState {
  AlignedBuffer<T> q_rows;                   // rows x D, pre-scaled queries
  AlignedBuffer<T> out_rows;                 // rows x D, unnormalised output accumulator
  std::vector<KeyPacketSoftmax<T>> softmax;  // rows
  AlignedBuffer<QInt8> q_int8;               // int8 path: rows x qint8_row_bytes(D)
  AlignedBuffer<std::int32_t> q_start;       // int8 path: rows x qint8_groups(D)
  AlignedBuffer<std::uint16_t> q_bf16;       // bf16 path: rows x padded D, the queries (unscaled)

  // O(1): buffers change owners, nothing is copied.
  void swap_with(DecodeRowState& other) {
    q_rows.swap(other.q_rows);
    out_rows.swap(other.out_rows);
    softmax.swap(other.softmax);
    q_int8.swap(other.q_int8);
    q_start.swap(other.q_start);
    q_bf16.swap(other.q_bf16);
  }
};

// Keys [j0, j0 + n) of KV head `head`: one block of a chunk's visit order.
struct DecodeBlockAt {
  Index head = 0;
  Index j0 = 0;
  Index n = 0;  // 0: no block
};

template <typename T>
struct DecodeScratch : DecodeRowState<T> {
  AlignedBuffer<T> keys, values;  // P x D, a key block converted to T (when stored as another type)
  AlignedBuffer<T> merged;        // D, one output row being merged
  AlignedBuffer<T> weights;       // rows x block_keys(), scores and softmax weights of a block
  std::vector<DecodeRowState<T>> parked;  // one per group of a unit; see decode_unit
  std::vector<DecodeBlockAt> order;       // the unit's blocks in the order they are read
  bool full_width_scores = false;         // the score packet (DecodeScoreWidth)
  DecodeStreamPlan stream{1, false, false};
  // The int8 dot-product path (QInt8 cache, int8_dot.hpp), else empty.
  bool int8_dot = false;
  AlignedBuffer<std::uint8_t> value_weights;  // rows x the bytes of quantize_value_weights
  AlignedBuffer<float> value_units;           // rows x qint8_groups(D)
  // The bf16 dot-product path (bf16 cache, bf16_dot.hpp), else empty.
  bool bf16_dot = false;
  AlignedBuffer<std::uint32_t> weight_pairs;  // rows x kBf16DotKeys / 2
  AlignedBuffer<std::uint16_t> zero_row;      // D zeros: the value row past a block's last key

  // Keys per block: the packet, or kInt8DecodeKeys on the int8 path.
  Index block_keys() const { return int8_dot ? kInt8DecodeKeys : simd::kWidth<T>; }
};

// Whether decode_block reads a cache of S as stored, each packet widened to T as it is
// loaded (simd::load_as), instead of converting every block into scratch first: the
// conversion pass wrote and reread each block and added its time to the memory's.
template <typename T, typename S>
inline constexpr bool kDecodeWidensAsLoaded = std::is_same_v<T, float> &&
                                              (std::is_same_v<S, Eigen::half> ||
                                               std::is_same_v<S, Eigen::bfloat16>);

// Whether the decode of problem type P can take the bf16 dot products (bf16_dot.hpp).
template <typename P>
inline constexpr bool kBf16DotDecode =
    kBf16DotDecodeTypes<typename P::Compute, typename P::KVScalar>;

// What the queries of one batch row can see: keys outside `span` are masked for all of
// them; inside it, `check_keys` says whether anything but position may still exclude a key.
struct DecodeKeys {
  KeySpan span;
  bool check_keys;
};

template <typename T>
struct DecodeWorkspace {
  std::vector<DecodeKeys> keys;  // per batch row of every problem
  std::vector<DecodeScratch<T>> workers;
  // Per item (problem, b, kv_head, chunk): max_rows x D normalised partial outputs and
  // max_rows lse (log2).
  AlignedBuffer<T> partial_out;
  AlignedBuffer<T> partial_lse;
  std::vector<Index> first_item;  // per problem, and the total at the end
  // A work unit is the items of unit_heads consecutive KV heads of one (problem, b,
  // chunk), computed block by block together (decode_unit); 1 unless the heads share
  // blocks (kHeadsShareBlocks).
  Index unit_heads = 1;
  std::vector<Index> first_unit;  // per problem, and the total at the end
  std::vector<Index> first_row;   // per problem: its batch row 0 in `keys`
  Index max_rows = 0;
};

// The keys one batch row's queries can see at all (BatchMask::key_span over all rows).
inline DecodeKeys decode_keys(const BatchMask& mask, Index q_len) {
  const auto [q_min, q_max] = mask.query_documents(0, q_len - 1);
  return {mask.key_span(0, q_len - 1, q_min, q_max), mask.excludes_inside_span(q_min, q_max)};
}

// sum[r][i] += q_r . key_(g + i) over head_dim's whole packets (`whole` elements), for R
// query rows (row stride ldq) and the kG keys from g of a score packet's rows: each key
// packet is loaded (and widened) once for all R rows, so a 16-bit cache is widened once
// per key rather than once per row, and the block's new lines are read by one pass, not
// by the first of R. kG key rows are read side by side, a packet of each in turn (all
// the packet's rows side by side streamed markedly slower from DRAM).
template <typename T, bool kFull, int R, int kG, typename K>
EIGEN_ALWAYS_INLINE void key_group_scores(const T* q, Index ldq, const K* const* rows, int g,
                                          Index whole, simd::BlockOfWidth<T, kFull> (&acc)[R]) {
  using Packet = simd::PacketOfWidth<T, kFull>;
  constexpr int kS = simd::kSize<Packet>;
  Packet sum[R][kG];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int i = 0; i < kG; ++i) sum[r][i] = simd::zero<Packet>();
  }
  for (Index d = 0; d < whole; d += kS) {
    Packet key[kG];
    ATTNFORGE_UNROLL
    for (int i = 0; i < kG; ++i) key[i] = simd::in_register(simd::load_as<Packet>(rows[g + i] + d));
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const Packet query = simd::in_register(simd::load<Packet>(q + r * ldq + d));
      ATTNFORGE_UNROLL
      for (int i = 0; i < kG; ++i) sum[r][i] = simd::fma(query, key[i], sum[r][i]);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int i = 0; i < kG; ++i) acc[r].packet[g + i] = sum[r][i];
  }
}

// Scores of R query rows (row stride ldq) against keys [first, first + S) of a block of
// n_keys keys (S = size of the score packet, full or half width: see DecodeScoreWidth),
// written to out[r * ldo, r * ldo + S). Keys past n_keys read the block's key 0 again;
// the caller masks them. The keys go kG at a time (key_group_scores; 4, or S if smaller),
// so R x kG sums stay in registers; a row's S sums, one accumulator per key, become its
// S scores by a lane sum (simd::sum_each). `ahead` (the lines of a block ahead) takes one
// step per key and row, a group's steps before its FMAs: a step inside the pass's loop
// would put one copy of the request loop among the FMAs per unrolled key.
template <typename T, bool kFull, int R, typename K>
EIGEN_ALWAYS_INLINE void block_scores(const T* q, Index ldq, const K* keys, Index ldk, Index n_keys,
                                      Index first, Index head_dim, T* out, Index ldo,
                                      simd::LineStream& ahead) {
  constexpr int kS = simd::kSize<simd::PacketOfWidth<T, kFull>>;
  constexpr int kG = kS < 4 ? kS : 4;
  static_assert(kS % kG == 0, "a score packet holds whole groups of keys");
  const K* rows[kS];
  for (int j = 0; j < kS; ++j) rows[j] = keys + (first + j < n_keys ? first + j : 0) * ldk;
  const Index whole = head_dim / kS * kS;
  simd::BlockOfWidth<T, kFull> acc[R];
  for (int g = 0; g < kS; g += kG) {
    ahead.steps(kG * R);
    key_group_scores<T, kFull, R, kG>(q, ldq, rows, g, whole, acc);
  }
  for (int r = 0; r < R; ++r) {
    T* o = out + r * ldo;
    simd::store(o, simd::sum_each(acc[r]));
    for (Index e = whole; e < head_dim; ++e) {  // head_dim not a multiple of the packet
      for (int j = 0; j < kS; ++j) o[j] += q[r * ldq + e] * static_cast<T>(rows[j][e]);
    }
  }
}

// out[r][:] += sum_j weights[r][j] * v_j[:] for R rows (row stride ldo), the n_keys
// keys of the block, a chunk of head_dim (C packets) at a time. Whole value rows are read
// one after the other, as the prefetchers like; the rows beyond the first R reread the
// block from L1. `ahead` steps once per key (the lines of a block ahead). The value
// packets are left for the compiler to fold into the FMAs: held in registers
// (simd::in_register), as the score pass holds its operands, they made the decode slower
// out of DRAM (docs/design.md).
template <typename T, int R, int C, typename K>
EIGEN_ALWAYS_INLINE void accumulate_chunk(const T* weights, const K* values, Index ldv,
                                          Index n_keys, T* out, Index ldo,
                                          simd::LineStream& ahead) {
  using Packet = simd::Packet<T>;
  constexpr int kP = simd::kWidth<T>;
  Packet acc[R][C];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) acc[r][c] = simd::load_aligned<Packet>(out + r * ldo + c * kP);
  }
  for (Index j = 0; j < n_keys; ++j) {
    ahead.step();
    Packet v[C];
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) v[c] = simd::load_as<Packet>(values + j * ldv + c * kP);
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const Packet w = simd::splat<Packet>(weights[r * kP + j]);
      ATTNFORGE_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = simd::fma(w, v[c], acc[r][c]);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < C; ++c) simd::store_aligned(out + r * ldo + c * kP, acc[r][c]);
  }
}

// Packets of head_dim one accumulate_chunk pass of R rows takes: R x kValueChunk
// accumulators fill the register file. A power of two (kValuePackets is).
template <int R>
inline constexpr int kValueChunk = R > 2 ? kValuePackets / 2 : kValuePackets;

// The accumulate_chunk passes over the packets of head_dim from d on, C packets each while
// they fit, then C / 2, ... 1, so a head_dim such as 64, 80 or 96 ends in one shorter pass
// rather than one pass per packet (each pass reads every key's weight again). Returns
// where the whole packets end.
template <typename T, int R, int C, typename K>
EIGEN_ALWAYS_INLINE Index accumulate_chunks(const T* weights, const K* values, Index ldv,
                                            Index n_keys, Index head_dim, Index d, T* out,
                                            Index ldo, simd::LineStream& ahead) {
  constexpr int kP = simd::kWidth<T>;
  for (; d + C * kP <= head_dim; d += C * kP)
    accumulate_chunk<T, R, C>(weights, values + d, ldv, n_keys, out + d, ldo, ahead);
  if constexpr (C > 1) {
    return accumulate_chunks<T, R, C / 2>(weights, values, ldv, n_keys, head_dim, d, out, ldo,
                                          ahead);
  } else {
    return d;
  }
}

// accumulate_chunk passes accumulate_chunks<.., C, ..> makes over `packets` packets.
constexpr Index accumulate_chunk_passes(Index packets, Index c) {
  return c == 1 ? packets : packets / c + accumulate_chunk_passes(packets % c, c / 2);
}

// decode_accumulate past its last whole chunk of C packets: the shorter chunks, then the
// elements past the last whole packet. Out of line, because only a head_dim that is no
// multiple of the chunk gets here, and inlined these passes grew the value pass until the
// compiler no longer inlined it into the block, which then ran slower even at head_dims
// that never get here (docs/design.md, section 3).
template <typename T, int R, int C, typename K>
EIGEN_DONT_INLINE void accumulate_tail(const T* weights, const K* values, Index ldv, Index n_keys,
                                       Index head_dim, Index d, T* out, Index ldo,
                                       simd::LineStream& ahead) {
  constexpr int kP = simd::kWidth<T>;
  if constexpr (C > 1) {
    d = accumulate_chunks<T, R, C / 2>(weights, values, ldv, n_keys, head_dim, d, out, ldo, ahead);
  }
  for (; d < head_dim; ++d) {
    for (int r = 0; r < R; ++r) {
      T sum = out[r * ldo + d];
      for (Index j = 0; j < n_keys; ++j)
        sum += weights[r * kP + j] * static_cast<T>(values[j * ldv + d]);
      out[r * ldo + d] = sum;
    }
  }
}

template <typename T, int R, typename K>
EIGEN_ALWAYS_INLINE void decode_accumulate(const T* weights, const K* values, Index ldv,
                                           Index n_keys, Index head_dim, T* out, Index ldo,
                                           simd::LineStream& ahead) {
  constexpr int kP = simd::kWidth<T>;
  constexpr int kChunk = kValueChunk<R>;
  Index d = 0;
  for (; d + kChunk * kP <= head_dim; d += kChunk * kP) {
    accumulate_chunk<T, R, kChunk>(weights, values + d, ldv, n_keys, out + d, ldo, ahead);
  }
  if (d < head_dim)
    accumulate_tail<T, R, kChunk>(weights, values, ldv, n_keys, head_dim, d, out, ldo, ahead);
}

// Asks for rows [0, n_rows) of a row-major matrix (row stride ld, `width` elements per
// row), front to back, for a read at kWhen (simd::prefetch).
template <simd::ReadAt kWhen, typename S>
EIGEN_ALWAYS_INLINE void prefetch_rows(const S* rows, Index ld, Index n_rows, Index width) {
  constexpr Index kLine = 64 / sizeof(S);
  for (Index r = 0; r < n_rows; ++r) {
    for (Index e = 0; e < width; e += kLine) simd::prefetch<kWhen>(rows + r * ld + e);
  }
}

// Scratch rows are padded to a multiple of the packet so every row starts aligned.
inline Index padded_head_dim(Index head_dim, Index packet) {
  return (head_dim + packet - 1) / packet * packet;
}

// What one decode item works on: a (batch row, KV head) and its rows (row r is position
// r / n_rep of head kv_head * n_rep + r % n_rep).
struct DecodeGroup {
  BatchMask mask;
  Index b;
  Index kv_head;
  Index n_rep;
  Index rows;
  Index head_dim;
  Index hd;  // padded head_dim
  // K and V rows lie back to back (a KVCache, a paged cache's block), so a kernel can
  // stream the next block's rows while it works (next_block, simd::LineStream).
  bool dense_rows;
  Index head(Index r) const { return kv_head * n_rep + r % n_rep; }
  Index query(Index r) const { return r / n_rep; }
};

// What the decode multiplies the scores by: the scale, in log2 units unless a softcap
// (which takes natural-log scores) follows.
template <typename T, typename F>
T decode_query_scale(const SdpaParams& params) {
  return static_cast<T>(params.scale * (F::kSoftcap ? 1.0 : kLog2e));
}

// Pre-scaled query rows and fresh statistics.
template <typename P, typename F>
void start_decode_rows(const P& pb, const DecodeGroup& g, DecodeScratch<typename P::Compute>& s) {
  using T = typename P::Compute;
  // The bf16 dot products multiply the scores by the scale instead (decode_block_bf16):
  // bf16 queries then reach them exactly.
  const T q_scale = s.bf16_dot ? T(1) : decode_query_scale<T, F>(pb.params);
  for (Index r = 0; r < g.rows; ++r) {
    const auto* q = pb.q.row(g.b, g.head(r), g.query(r));
    T* dst = s.q_rows.data() + r * g.hd;
    for (Index d = 0; d < g.head_dim; ++d) dst[d] = static_cast<T>(q[d]) * q_scale;
    s.softmax[static_cast<std::size_t>(r)] = KeyPacketSoftmax<T>::start();
  }
  std::fill(s.out_rows.begin(), s.out_rows.begin() + g.rows * g.hd, T(0));
  if constexpr (kBf16DotDecode<P>) {
#if ATTNFORGE_BF16_DOT
    if (s.bf16_dot) {
      round_to_bf16(s.q_rows.data(), g.rows * g.hd, s.q_bf16.data());
      return;
    }
#endif
  }
#if ATTNFORGE_INT8_DOT
  if constexpr (std::is_same_v<T, float>) {
    if (!s.int8_dot) return;
    for (Index r = 0; r < g.rows; ++r) {
      quantize_query_row(s.q_rows.data() + r * g.hd, g.head_dim,
                         s.q_int8.data() + r * qint8_row_bytes(g.head_dim),
                         s.q_start.data() + r * qint8_groups(g.head_dim));
    }
  }
#endif
}

// Softcap, score biases and exclusions of row r's scores for keys [j0, j0 + P) (log2
// units); keys past n_keys are excluded. `check_keys`: some key of the block may be
// excluded for some row (else only the biases apply).
template <typename T, typename F>
void mod_decode_scores(const DecodeGroup& g, const SdpaParams& params, Index r, Index j0,
                       Index n_keys, bool check_keys, T* scores) {
  using Packet = simd::Packet<T>;
  constexpr int kP = simd::kWidth<T>;
  if constexpr (F::kSoftcap) {
    const Packet cap = simd::splat<Packet>(static_cast<T>(params.softcap * kLog2e));
    const Packet inv_cap = simd::splat<Packet>(static_cast<T>(1.0 / params.softcap));
    simd::store_aligned(
        scores, simd::mul(cap, simd::tanh(simd::mul(simd::load_aligned<Packet>(scores), inv_cap))));
  } else {
    (void)params;
  }
  if (!F::kBiased && !check_keys) return;
  const Index h = g.head(r), i = g.query(r);
  if constexpr (F::kBiased) {
    for (Index j = 0; j < n_keys; ++j)
      scores[j] += static_cast<T>(kLog2e * g.mask.score_bias(h, i, j0 + j));
  }
  if (!check_keys) return;
  for (Index j = 0; j < kP; ++j) {
    if (j >= n_keys || !g.mask.allowed(h, i, j0 + j))
      scores[j] = -std::numeric_limits<T>::infinity();
  }
}

// The online softmax of every row over one block of `packets` packets of scores (row
// stride packets x P), in place into weights: every packet is observed before the first
// weight, so the whole block shares one reference.
template <typename T>
void softmax_decode_block(const DecodeGroup& g, DecodeScratch<T>& s, Index packets = 1) {
  using Packet = simd::Packet<T>;
  constexpr int kP = simd::kWidth<T>;
  for (Index r = 0; r < g.rows; ++r) {
    KeyPacketSoftmax<T>& softmax = s.softmax[static_cast<std::size_t>(r)];
    T* row = s.weights.data() + r * packets * kP;
    for (Index p = 0; p < packets; ++p) {
      T alpha = T(1);
      if (softmax.observe(simd::load_aligned<Packet>(row + p * kP), alpha)) {
        T* out = s.out_rows.data() + r * g.hd;
        for (Index d = 0; d < g.hd; d += kP) {
          simd::store_aligned(
              out + d, simd::mul(simd::load_aligned<Packet>(out + d), simd::splat<Packet>(alpha)));
        }
      }
    }
    for (Index p = 0; p < packets; ++p)
      simd::store_aligned(row + p * kP, softmax.weights(simd::load_aligned<Packet>(row + p * kP)));
  }
}

// The K and V lines of the block `ahead` (the next block the worker reads, or the one
// after it: DecodeStreamPlan), for a kernel to ask for while it works on the current one:
// one stream stepped by its scores (k_steps steps), one by its values (v_steps). K's lines
// go with the scores and V's with the values, or the other way round for a crossed plan.
// None when the rows are not dense or there is no such block.
struct NextBlock {
  simd::LineStream during_scores, during_values;
};

template <typename P>
NextBlock next_block(const P& pb, const DecodeGroup& g, const DecodeScratch<typename P::Compute>& s,
                     const DecodeBlockAt& ahead, Index k_steps, Index v_steps) {
  using S = typename P::KVScalar;
  if (ahead.n == 0 || !g.dense_rows) return {};
  const Index bytes = ahead.n * stored_row_width<S>(g.head_dim) * Index{sizeof(S)};
  const bool l2 = s.stream.into_l2;
  const auto* keys = pb.k.row(g.b, ahead.head, ahead.j0);
  const auto* values = pb.v.row(g.b, ahead.head, ahead.j0);
  const bool crossed = s.stream.crossed;
  return {simd::LineStream::over(crossed ? values : keys, bytes, k_steps, l2),
          simd::LineStream::over(crossed ? keys : values, bytes, v_steps, l2)};
}

// rows[j] = the row of key j0 + j of g's KV head for j < n_keys; past them `past_end`, or
// key j0 again when that is null (the dot-product kernels take a whole block of rows).
// A block lies in one run (plan_decode_blocks), so one row's address gives the others: a
// paged view's row() divides, and once per row that showed in the decode's time
// (docs/design.md, "A decode block's rows come from its first row's address").
template <typename Row, std::size_t kKeys, typename View>
void block_rows(const View& view, const DecodeGroup& g, Index j0, Index n_keys, Row (&rows)[kKeys],
                Row past_end = nullptr) {
  eigen_assert(contiguous_rows(view, j0) >= n_keys);
  const auto* first = view.row(g.b, g.kv_head, j0);
  const Index ld = view.stride(2);
  for (Index j = 0; j < static_cast<Index>(kKeys); ++j)
    rows[j] = j < n_keys ? first + j * ld : (past_end != nullptr ? past_end : first);
}

// Calls f(std::integral_constant<int, rows>, first) over [0, n) in blocks of R rows, then
// R / 2, ... 1: a group's rows through the decode's row-blocked kernels. Unlike the fused
// kernel's balanced for_each_row_block, only halvings, so each kernel has log2(R) + 1
// instances: with more, the compiler stopped inlining the int8 value pass, which ran
// slower out of line.
template <int R, typename F>
EIGEN_ALWAYS_INLINE void for_each_halving_row_block(Index n, F&& f, Index first = 0) {
  for (; first + R <= n; first += R) f(std::integral_constant<int, R>{}, first);
  if constexpr (R > 1) for_each_halving_row_block<R / 2>(n, f, first);
}

// Query rows per value pass over values read as K: two for rows of the compute type T;
// four for rows widened as loaded, so each packet is widened once for every four rows.
template <typename T, typename K>
inline constexpr int kValueRows = std::is_same_v<K, T> ? 2 : 4;

// The steps the value passes of one block take (decode_accumulate: one per key and
// accumulate_chunk call), so next_block spreads its requests over all of them.
template <typename T, typename K>
Index value_pass_steps(Index rows, Index head_dim, Index n_keys) {
  Index passes = 0;
  for_each_halving_row_block<kValueRows<T, K>>(rows, [&](auto r, Index) {
    passes += accumulate_chunk_passes(head_dim / simd::kWidth<T>, kValueChunk<decltype(r)::value>);
  });
  return passes * n_keys;
}

// The int8 scores of every row of the group against the block's NSub key tiles (from
// `tiles` on), four rows at a time (then two, then one), into out (row stride ldo).
template <int NSub>
void int8_block_scores(const DecodeGroup& g, DecodeScratch<float>& s, const QInt8* tiles,
                       float* out, Index ldo, simd::LineStream& ahead) {
#if ATTNFORGE_INT8_DOT
  const Index groups = qint8_groups(g.head_dim);
  const auto query = [&](Index r) {
    return Int8QueryRow{s.q_int8.data() + r * qint8_row_bytes(g.head_dim),
                        s.q_start.data() + r * groups};
  };
  const auto scores = [&](auto rows, Index r0) {
    constexpr int kRows = decltype(rows)::value;
    Int8QueryRow q[kRows];
    for (int r = 0; r < kRows; ++r) q[r] = query(r0 + r);
    int8_row_scores<kRows, NSub>(q, tiles, qint8_tile_bytes(g.head_dim), g.head_dim, out + r0 * ldo,
                                 ldo, ahead);
  };
  for_each_halving_row_block<4>(g.rows, scores);
#else
  (void)g, (void)s, (void)tiles, (void)out, (void)ldo, (void)ahead;
#endif
}

// decode_block over a QInt8 cache with int8 dot products, for a block of NSub tiles (n_keys
// keys in all, from j0, a tile's first key): the scores of every row from the quantized
// queries, their softmax over the whole block, then the value products from the value
// tiles and the rows' weights (times each key's group scales) in 16-bit integers. The
// cache holds the tiles in the kernels' layouts, so nothing of the block is copied.
template <int NSub, typename P, typename F>
void decode_int8_sub_blocks(const P& pb, const DecodeGroup& g, Index j0, Index n_keys,
                            const DecodeBlockAt& ahead, bool check, DecodeScratch<float>& s) {
#if ATTNFORGE_INT8_DOT
  constexpr Index kKeys = kInt8DotKeys, kLd = NSub * kKeys;  // kLd: the scores' row stride
  const auto sub_keys = [&](int b) { return std::min(kKeys, n_keys - b * kKeys); };
  const Index groups = qint8_groups(g.head_dim);
  const Index tile_bytes = qint8_tile_bytes(g.head_dim);
  eigen_assert(j0 % kQInt8Tile == 0 && contiguous_rows(pb.k, j0) >= n_keys);
  // Both passes take the rows in the same blocks: each score call steps once per 4 bytes
  // of head_dim, each value call once per tile and scale group.
  Index row_blocks = 0;
  for_each_halving_row_block<4>(g.rows, [&](auto, Index) { ++row_blocks; });
  NextBlock next =
      next_block(pb, g, s, ahead, row_blocks * g.head_dim / 4, row_blocks * NSub * groups);
  float* scores = s.weights.data();
  int8_block_scores<NSub>(g, s, pb.k.row(g.b, g.kv_head, j0), scores, kLd, next.during_scores);
  next.during_scores.finish();
  for (Index r = 0; r < g.rows; ++r) {
    for (int b = 0; b < NSub; ++b) {
      mod_decode_scores<float, F>(g, pb.params, r, j0 + b * kKeys, sub_keys(b), check,
                                  scores + r * kLd + b * kKeys);
    }
  }
  softmax_decode_block(g, s, NSub);
  const QInt8* value_tiles = pb.v.row(g.b, g.kv_head, j0);
  __mmask16 keep[NSub];
  for (int b = 0; b < NSub; ++b) keep[b] = simd::first_lanes<__mmask16>(sub_keys(b));
  const Index ldw = NSub * value_weight_row_bytes(groups);
  quantize_value_weights<NSub>(scores, g.rows, kLd, value_tiles, tile_bytes, keep, g.head_dim,
                               s.value_weights.data(), ldw, s.value_units.data());
  for_each_halving_row_block<4>(g.rows, [&](auto rows, Index r0) {
    int8_value_products<decltype(rows)::value, NSub>(
        s.value_weights.data() + r0 * ldw, ldw, s.value_units.data() + r0 * groups, value_tiles,
        tile_bytes, g.head_dim, s.out_rows.data() + r0 * g.hd, g.hd, next.during_values);
  });
  next.during_values.finish();
#else
  (void)pb, (void)g, (void)j0, (void)n_keys, (void)ahead, (void)check, (void)s;
#endif
}

// decode_block over a QInt8 cache with int8 dot products: a block of up to kInt8DecodeKeys
// keys, in as many sub-blocks of kInt8DotKeys as it needs.
template <typename P, typename F>
void decode_block_int8(const P& pb, const DecodeGroup& g, Index j0, Index n_keys,
                       const DecodeBlockAt& ahead, bool check, DecodeScratch<float>& s) {
  static_assert(kInt8SubBlocks == 2, "a block is one or two sub-blocks");
  if (n_keys > kInt8DotKeys) {
    decode_int8_sub_blocks<2, P, F>(pb, g, j0, n_keys, ahead, check, s);
  } else {
    decode_int8_sub_blocks<1, P, F>(pb, g, j0, n_keys, ahead, check, s);
  }
}

// decode_block over a bf16 cache with bf16 dot products (bf16_dot.hpp): the scores of
// every row from its bf16 query, their softmax, then the values against the weights
// rounded to bf16. Nothing of the block is converted to float.
template <typename P, typename F>
void decode_block_bf16(const P& pb, const DecodeGroup& g, Index j0, Index n_keys,
                       const DecodeBlockAt& ahead, bool check, DecodeScratch<float>& s) {
#if ATTNFORGE_BF16_DOT
  const void* k_rows[kBf16DotKeys];  // keys past n_keys: key 0 (masked), zero values
  const void* v_rows[kBf16DotKeys];
  block_rows(pb.k, g, j0, n_keys, k_rows);
  block_rows(pb.v, g, j0, n_keys, v_rows, static_cast<const void*>(s.zero_row.data()));
  const Index pairs = (n_keys + 1) / 2;
  // The value pass takes head_dim in chunks of (at least) two bf16 packets per row block.
  const Index value_chunks = std::max<Index>(1, g.head_dim / (2 * kBf16DotChunk));
  NextBlock next =
      next_block(pb, g, s, ahead, g.rows * kBf16DotKeys, (g.rows + 3) / 4 * pairs * value_chunks);
  float* weights = s.weights.data();
  const float scale = decode_query_scale<float, F>(pb.params);
  for (Index r = 0; r < g.rows; ++r) {
    bf16_key_scores(s.q_bf16.data() + r * g.hd, k_rows, g.head_dim, scale,
                    weights + r * kBf16DotKeys, next.during_scores);
    mod_decode_scores<float, F>(g, pb.params, r, j0, n_keys, check, weights + r * kBf16DotKeys);
  }
  next.during_scores.finish();
  softmax_decode_block(g, s);
  pair_decode_weights(weights, g.rows, s.weight_pairs.data());
  const std::uint32_t* w = s.weight_pairs.data();
  constexpr Index kW = kBf16DotKeys / 2;
  float* out = s.out_rows.data();
  for_each_halving_row_block<4>(g.rows, [&](auto rows, Index r0) {
    bf16_accumulate_values<decltype(rows)::value>(w + r0 * kW, v_rows, pairs, g.head_dim,
                                                  out + r0 * g.hd, g.hd, next.during_values);
  });
  next.during_values.finish();
#else
  (void)pb, (void)g, (void)j0, (void)n_keys, (void)ahead, (void)check, (void)s;
#endif
}

// Every row's scores against a block of n_keys keys, into s.weights, kScoreRows rows at a
// time (then half as many ...), each pass reading every key once for all its rows. All
// rows' scores come first, then their softmax: the rows are independent, and keeping each
// phase in its own loop lets the core overlap their latency chains.
template <typename T, bool kFull, typename K>
void score_rows(const DecodeGroup& g, const K* keys, Index ldk, Index n_keys, DecodeScratch<T>& s,
                simd::LineStream& ahead) {
  constexpr int kP = simd::kWidth<T>;
  constexpr int kS = simd::kSize<simd::PacketOfWidth<T, kFull>>;
  simd::LineStream stream = ahead;  // a local, so its state stays in registers (simd.hpp)
  for (int first = 0; first < kP; first += kS) {
    for_each_halving_row_block<kScoreRows>(g.rows, [&](auto rows, Index r0) {
      block_scores<T, kFull, decltype(rows)::value>(s.q_rows.data() + r0 * g.hd, g.hd, keys, ldk,
                                                    n_keys, first, g.head_dim,
                                                    s.weights.data() + r0 * kP + first, kP, stream);
    });
  }
  ahead = stream;
}

// Asks for the K and V rows of a block of batch row b, all at once, front to back.
template <simd::ReadAt kWhen, typename P>
EIGEN_ALWAYS_INLINE void prefetch_block(const P& pb, Index b, const DecodeBlockAt& block,
                                        Index head_dim) {
  if (block.n == 0) return;
  const Index row_width = stored_row_width<typename P::KVScalar>(head_dim);
  prefetch_rows<kWhen>(pb.k.row(b, block.head, block.j0), pb.k.stride(2), block.n, row_width);
  prefetch_rows<kWhen>(pb.v.row(b, block.head, block.j0), pb.v.stride(2), block.n, row_width);
}

// decode_block's scores, softmax and value products over keys and values read as K: T
// itself, or a 16-bit cache widened packet by packet as the kernels load it. values(ldv)
// gives the value rows (and their stride) once the scores are done.
template <typename P, typename F, typename K, typename Values>
void attend_block_rows(const DecodeGroup& g, const SdpaParams& params, Index j0, Index n_keys,
                       bool check, const K* keys, Index ldk, const Values& values, NextBlock& next,
                       DecodeScratch<typename P::Compute>& s) {
  using T = typename P::Compute;
  constexpr int kP = simd::kWidth<T>;
  if (s.full_width_scores) {
    score_rows<T, true>(g, keys, ldk, n_keys, s, next.during_scores);
  } else {
    score_rows<T, false>(g, keys, ldk, n_keys, s, next.during_scores);
  }
  next.during_scores.finish();
  for (Index r = 0; r < g.rows; ++r) {
    mod_decode_scores<T, F>(g, params, r, j0, n_keys, check, s.weights.data() + r * kP);
  }
  softmax_decode_block(g, s);
  Index ldv = 0;
  const K* value_rows = values(ldv);
  for_each_halving_row_block<kValueRows<T, K>>(g.rows, [&](auto rows, Index r0) {
    decode_accumulate<T, decltype(rows)::value>(s.weights.data() + r0 * kP, value_rows, ldv, n_keys,
                                                g.head_dim, s.out_rows.data() + r0 * g.hd, g.hd,
                                                next.during_values);
  });
  next.during_values.finish();
}

// One block of n_keys (<= s.block_keys()) keys starting at j0: scores of every row, their
// softmax, the values.
// `ahead` is the block the kernels stream while they work (next_block).
template <typename P, typename F>
void decode_block(const P& pb, const DecodeGroup& g, Index j0, Index n_keys,
                  const DecodeBlockAt& ahead, KeySpan all_rows, bool check_keys,
                  DecodeScratch<typename P::Compute>& s) {
  using T = typename P::Compute;
  constexpr int kP = simd::kWidth<T>;
  // Each block is in flight before it is read: every kernel streams a later block's rows
  // from inside its loops (next_block; decode_unit asks for the first). Rows that are not
  // dense are asked for a block at a time, all at once, front to back.
  if (!g.dense_rows)
    prefetch_block<simd::ReadAt::kNow>(pb, g.b, {g.kv_head, j0, n_keys}, g.head_dim);
  // Keys past n_keys in a block's last packet are masked (a block may hold several packets).
  const bool check =
      check_keys || n_keys % kP != 0 || j0 < all_rows.first || j0 + n_keys > all_rows.last;
  if constexpr (std::is_same_v<T, float> && is_qint8_v<typename P::KVScalar>) {
    if (s.int8_dot) {
      decode_block_int8<P, F>(pb, g, j0, n_keys, ahead, check, s);
      return;
    }
  }
  if constexpr (kBf16DotDecode<P>) {
    if (s.bf16_dot) {
      decode_block_bf16<P, F>(pb, g, j0, n_keys, ahead, check, s);
      return;
    }
  }
  // The kernels read the values as stored when they widen them as loaded, else as T.
  using ValueRead =
      std::conditional_t<kDecodeWidensAsLoaded<T, typename P::KVScalar>, typename P::KVScalar, T>;
  NextBlock next = next_block(pb, g, s, ahead, g.rows * kP,
                              value_pass_steps<T, ValueRead>(g.rows, g.head_dim, n_keys));
  if constexpr (kDecodeWidensAsLoaded<T, typename P::KVScalar>) {
    eigen_assert(contiguous_rows(pb.k, j0) >= n_keys && contiguous_rows(pb.v, j0) >= n_keys);
    const auto values = [&](Index& ldv) {
      ldv = pb.v.stride(2);
      return pb.v.row(g.b, g.kv_head, j0);
    };
    attend_block_rows<P, F>(g, pb.params, j0, n_keys, check, pb.k.row(g.b, g.kv_head, j0),
                            pb.k.stride(2), values, next, s);
  } else {
    Index ldk = pb.k.stride(2);
    const T* keys = tile_rows<QInt8Role::kKey>(pb.k, g.b, g.kv_head, j0, n_keys, s.keys, ldk);
    const auto values = [&](Index& ldv) {
      ldv = pb.v.stride(2);
      return tile_rows<QInt8Role::kValue>(pb.v, g.b, g.kv_head, j0, n_keys, s.values, ldv);
    };
    attend_block_rows<P, F>(g, pb.params, j0, n_keys, check, keys, ldk, values, next, s);
  }
}

// The blocks (of block_keys keys or fewer) of keys [key_first, key_last) of KV heads
// [h0, h0 + n_heads), in the order a worker reads them: the keys of a paged cache's pool
// block (of a whole chunk otherwise) for each head in turn, then the next pool block.
// When the heads share blocks (kHeadsShareBlocks) that order reads each pool block front
// to back. A block never crosses the end of a run of contiguous rows.
template <typename P>
void plan_decode_blocks(const P& pb, Index h0, Index n_heads, Index key_first, Index key_last,
                        Index block_keys, std::vector<DecodeBlockAt>& order) {
  order.clear();
  for (Index first = key_first, last = 0; first < key_last; first = last) {
    last = std::min(key_last, first + block_rows(pb.k, first));
    for (Index h = h0; h < h0 + n_heads; ++h) {
      for (Index j0 = first, n = 0; j0 < last; j0 += n) {
        n = std::min({block_keys, last - j0, contiguous_rows(pb.k, j0)});
        order.push_back({h, j0, n});
      }
    }
  }
}

// The block `a` places after order[i]: past the unit, the keys after it of its first head,
// which the unit of the next chunk starts with (a worker alone takes them in turn).
template <typename P>
DecodeBlockAt block_ahead(const P& pb, const std::vector<DecodeBlockAt>& order, std::size_t i,
                          Index a, Index key_last, Index block_keys) {
  const std::size_t at = i + static_cast<std::size_t>(a);
  if (at < order.size()) return order[at];
  const Index j = key_last + static_cast<Index>(at - order.size()) * block_keys;
  const Index kv_len = pb.k.dimension(2);
  if (j >= kv_len) return {};
  return {order.front().head, j, std::min({block_keys, kv_len - j, contiguous_rows(pb.k, j)})};
}

// The normalised outputs and lse (log2 units, no sink) of group g's rows into the partial
// slots of their item.
template <typename P>
void finish_decode_rows(const DecodeGroup& g, const DecodeScratch<typename P::Compute>& s,
                        typename P::Compute* partial_out, typename P::Compute* partial_lse) {
  using T = typename P::Compute;
  for (Index r = 0; r < g.rows; ++r) {
    const KeyPacketSoftmax<T>& softmax = s.softmax[static_cast<std::size_t>(r)];
    const RowEnd end =
        finish_row(softmax.stats.ref, softmax.sum(), -std::numeric_limits<double>::infinity());
    const T* src = s.out_rows.data() + r * g.hd;
    T* dst = partial_out + r * g.hd;
    partial_lse[r] = static_cast<T>(end.lse2);
    if constexpr (kBf16DotDecode<P>) {
      if (s.bf16_dot) {
        unpermute_bf16_decode_row(src, g.head_dim, static_cast<T>(end.out_scale), dst);
        continue;
      }
    }
    for (Index d = 0; d < g.head_dim; ++d) dst[d] = src[d] * static_cast<T>(end.out_scale);
  }
}

// One work unit: the items (g's batch row, KV heads [g.kv_head, g.kv_head + n_heads),
// chunk), all rows of each group against the chunk's keys, leaving normalised outputs and
// lse in the partial slots (partial_out / partial_lse are the first head's item's; the
// next heads' items follow `chunks` items apart). The groups' row states take turns in
// the scratch (DecodeRowState); the blocks go in plan_decode_blocks' order.
template <typename P, typename F>
void decode_unit(const P& pb, DecodeGroup g, Index n_heads, Index chunk, Index chunks,
                 const DecodeKeys& keys, DecodeScratch<typename P::Compute>& s, Index slot_rows,
                 typename P::Compute* partial_out, typename P::Compute* partial_lse) {
  const Index h0 = g.kv_head;
  const auto parked = [&](Index head) -> DecodeRowState<typename P::Compute>& {
    return s.parked[static_cast<std::size_t>(head - h0)];
  };
  // The chunk's keys that some row may see (possibly none: the chunk then gives lse -inf),
  // and those every row may see by position (a block inside needs no positional mask:
  // causal and window are monotone in the position).
  // On the int8 path blocks start at a tile of the cache (its keys before the span are
  // masked: they are outside all_rows).
  Index key_first = std::max(chunk * kDecodeChunk, keys.span.first);
  static_assert(kDecodeChunk % kQInt8Tile == 0, "a chunk starts at a tile");
  if (s.int8_dot) key_first -= key_first % kQInt8Tile;
  const Index key_last =
      std::min(std::min(g.mask.kv_len, (chunk + 1) * kDecodeChunk), keys.span.last);
  const KeySpan all_rows{std::max(g.mask.key_begin(pb.q.dimension(2) - 1), keys.span.first),
                         std::min(g.mask.key_end(0), keys.span.last)};
  for (Index h = h0; h < h0 + n_heads; ++h) {
    g.kv_head = h;
    start_decode_rows<P, F>(pb, g, s);
    s.swap_with(parked(h));
  }
  plan_decode_blocks(pb, h0, n_heads, key_first, key_last, s.block_keys(), s.order);
  // The blocks before the stream's first: decode_block asks for each later one while it
  // works on an earlier one.
  const Index ahead = s.stream.blocks_ahead;
  if (g.dense_rows) {
    for (Index a = 0; a < ahead && !s.order.empty(); ++a) {
      prefetch_block<simd::ReadAt::kNow>(
          pb, g.b, block_ahead(pb, s.order, 0, a, key_last, s.block_keys()), g.head_dim);
    }
  }
  for (std::size_t i = 0; i < s.order.size(); ++i) {
    const DecodeBlockAt& block = s.order[i];
    if (i == 0 || block.head != g.kv_head) {
      if (i > 0) s.swap_with(parked(g.kv_head));
      g.kv_head = block.head;
      s.swap_with(parked(g.kv_head));
    }
    decode_block<P, F>(pb, g, block.j0, block.n,
                       block_ahead(pb, s.order, i, ahead, key_last, s.block_keys()), all_rows,
                       F::kMasked && keys.check_keys, s);
  }
  if (!s.order.empty()) s.swap_with(parked(g.kv_head));
  for (Index h = h0; h < h0 + n_heads; ++h) {
    g.kv_head = h;
    s.swap_with(parked(h));
    const Index slot = (h - h0) * chunks * slot_rows;
    finish_decode_rows<P>(g, s, partial_out + slot * g.hd, partial_lse + slot);
    s.swap_with(parked(h));
  }
}

// Writes out (and lse) of one (b, kv_head) from its chunks' partials, in chunk order,
// with the heads' sinks joining the merge (merge_lse2). Returns the rows with no allowed
// key through `empty_rows`.
template <typename P>
void merge_chunks(const P& pb, const DecodeGroup& g, Index n_chunks, Index slot_rows,
                  const typename P::Compute* partial_out, const typename P::Compute* partial_lse,
                  typename P::Compute* merged, EmptyRows& empty_rows) {
  using T = typename P::Compute;
  using Out = typename P::Scalar;
  for (Index r = 0; r < g.rows; ++r) {
    const Index h = g.head(r), i = g.query(r);
    const T no_key = -std::numeric_limits<T>::infinity();
    const T keys_lse = merge_lse2(partial_lse + r, n_chunks, slot_rows, no_key);
    const T lse = merge_lse2(&keys_lse, 1, 1, static_cast<T>(sink_log2(pb.params.sinks, h)));
    if (keys_lse == no_key) empty_rows.push_back({pb.batch_offset + g.b, h, i});
    std::fill(merged, merged + g.head_dim, T(0));
    for (Index c = 0; c < n_chunks && keys_lse != no_key; ++c) {
      const T weight = std::exp2(partial_lse[c * slot_rows + r] - lse);
      if (weight == T(0)) continue;
      const T* part = partial_out + (c * slot_rows + r) * g.hd;
      for (Index d = 0; d < g.head_dim; ++d) merged[d] += weight * part[d];
    }
    Out* out = pb.out.row(g.b, h, i);
    for (Index d = 0; d < g.head_dim; ++d) out[d] = static_cast<Out>(merged[d]);
    if (pb.lse.has_value())
      pb.lse(g.b, h, i) = static_cast<acc_t<T>>(static_cast<double>(lse) / kLog2e);
  }
}

template <typename T>
bool decode_applies(Index q_len, Index n_rep) {
  return q_len * n_rep <= kDecodeMaxRows<T>;
}

template <typename T>
void reserve_row_state(DecodeRowState<T>& state, Index rows, Index head_dim, bool int8_dot,
                       bool bf16_dot) {
  const auto size = [](Index n) { return static_cast<std::size_t>(n); };
  const Index hd = padded_head_dim(head_dim, simd::kWidth<T>);
  state.q_rows.resize(size(rows * hd));
  state.out_rows.resize(size(rows * hd));
  state.softmax.resize(size(rows));
  state.q_int8.resize(int8_dot ? size(rows * qint8_row_bytes(head_dim)) : 0);
  state.q_start.resize(int8_dot ? size(rows * qint8_groups(head_dim)) : 0);
  state.q_bf16.resize(bf16_dot ? size(rows * hd) : 0);
}

template <typename T>
void reserve_decode(DecodeWorkspace<T>& ws, int workers, Index rows, Index head_dim,
                    bool convert_kv, bool int8_dot, bool bf16_dot, bool full_width_scores,
                    DecodeStreamPlan stream, Index partials) {
  constexpr int kP = simd::kWidth<T>;
  const auto size = [](Index n) { return static_cast<std::size_t>(n); };
  const Index hd = padded_head_dim(head_dim, kP);
  ws.workers.resize(size(workers));
  for (DecodeScratch<T>& s : ws.workers) {
    reserve_row_state(s, rows, head_dim, int8_dot, bf16_dot);
    s.parked.resize(size(ws.unit_heads));
    for (DecodeRowState<T>& state : s.parked)
      reserve_row_state(state, rows, head_dim, int8_dot, bf16_dot);
    s.int8_dot = int8_dot;
    s.weights.resize(size(rows * s.block_keys()));
    s.keys.resize(convert_kv && !int8_dot && !bf16_dot ? size(kP * head_dim) : 0);
    s.values.resize(s.keys.size());
    s.merged.resize(size(hd));
    s.full_width_scores = full_width_scores;
    s.stream = stream;
    const Index groups = int8_dot ? qint8_groups(head_dim) : 0;
    s.value_weights.resize(size(rows * kInt8SubBlocks * value_weight_row_bytes(groups)));
    s.value_units.resize(size(rows * groups));
    s.bf16_dot = bf16_dot;
    s.weight_pairs.resize(bf16_dot ? size(rows * kP / 2) : 0);
    s.zero_row.assign(bf16_dot ? size(head_dim) : 0, 0);
  }
  ws.partial_out.resize(size(partials * rows * hd));
  ws.partial_lse.resize(size(partials * rows));
}

template <typename P>
Index decode_chunks(const P& pb) {
  return std::max<Index>(1, (pb.k.dimension(2) + kDecodeChunk - 1) / kDecodeChunk);
}

// The (batch row, KV head) group g of problem pb.
template <typename P>
DecodeGroup decode_group(const P& pb, const MaskPolicy& policy, Index g) {
  using T = typename P::Compute;
  const Index n_kv_heads = pb.k.dimension(1), head_dim = pb.q.dimension(3);
  const Index n_rep = pb.q.dimension(1) / n_kv_heads;
  const Index b = g / n_kv_heads;
  const Index row_width = stored_row_width<typename P::KVScalar>(head_dim);
  return DecodeGroup{policy.row(b),
                     b,
                     g % n_kv_heads,
                     n_rep,
                     pb.q.dimension(2) * n_rep,
                     head_dim,
                     padded_head_dim(head_dim, simd::kWidth<T>),
                     pb.k.stride(2) == row_width && pb.v.stride(2) == row_width};
}

// Plans the items of problems [0, n) (each (problem, batch row, KV head, key chunk)) and
// their work units, and sizes the scratch. Returns the unit count.
template <typename P>
Index prepare_decode(const P* problems, const MaskPolicy* policies, Index n, int workers,
                     DecodeWorkspace<typename P::Compute>& ws, const KernelTuning& tuning) {
  ws.first_item.assign(1, 0);
  ws.first_row.clear();
  ws.keys.clear();
  ws.max_rows = 0;
  for (Index p = 0; p < n; ++p) {
    const P& pb = problems[p];
    const Index batch = pb.q.dimension(0), q_len = pb.q.dimension(2);
    ws.max_rows = std::max(ws.max_rows, q_len * (pb.q.dimension(1) / pb.k.dimension(1)));
    ws.first_row.push_back(static_cast<Index>(ws.keys.size()));
    for (Index b = 0; b < batch; ++b) ws.keys.push_back(decode_keys(policies[p].row(b), q_len));
    ws.first_item.push_back(ws.first_item.back() + batch * pb.k.dimension(1) * decode_chunks(pb));
  }
  // Where the heads share blocks, a unit takes all of them (each pool block is then read
  // front to back), halved while that would leave fewer than 4 units per worker.
  ws.unit_heads = 1;
  if constexpr (kHeadsShareBlocks<decltype(P::k)>) {
    const Index n_kv_heads = problems[0].k.dimension(1);
    const auto units = [&](Index heads) { return ws.first_item.back() / n_kv_heads * heads; };
    ws.unit_heads = n_kv_heads;
    while (ws.unit_heads % 2 == 0 && units(n_kv_heads / ws.unit_heads) < 4 * workers)
      ws.unit_heads /= 2;
  }
  ws.first_unit.resize(ws.first_item.size());
  for (std::size_t p = 0; p < ws.first_item.size(); ++p)
    ws.first_unit[p] = ws.first_item[p] / ws.unit_heads;
  reserve_decode(ws, workers, ws.max_rows, problems[0].q.dimension(3),
                 !std::is_same_v<typename P::KVScalar, typename P::Compute> &&
                     !kDecodeWidensAsLoaded<typename P::Compute, typename P::KVScalar>,
                 problems[0].params.int8_dot,
                 problems[0].params.bf16_dot &&
                     bf16_dot_decode_fits<typename P::Compute, typename P::KVScalar>(
                         problems[0].q.dimension(3)),
                 decode_scores_full_width<typename P::Compute>(tuning.decode_score_width),
                 decode_stream_plan(tuning.decode_stream), ws.first_item.back());
  return ws.first_unit.back();
}

// Work unit `unit` of a prepared call, on the scratch of `worker`. A problem's units are
// (batch row, head unit, chunk), chunks fastest; its items (batch row, KV head, chunk).
template <typename P, typename F>
void run_decode_unit(const P* problems, const MaskPolicy* policies,
                     DecodeWorkspace<typename P::Compute>& ws, int worker, Index unit) {
  const auto next = std::upper_bound(ws.first_unit.begin(), ws.first_unit.end(), unit);
  const auto p = static_cast<std::size_t>(next - ws.first_unit.begin() - 1);
  const P& pb = problems[p];
  const Index chunks = decode_chunks(pb), local = unit - ws.first_unit[p];
  const Index chunk = local % chunks, head_unit = local / chunks;
  const Index group = head_unit * ws.unit_heads;  // b * Hkv + the unit's first KV head
  const DecodeGroup g = decode_group(pb, policies[p], group);
  const Index slot = (ws.first_item[p] + group * chunks + chunk) * ws.max_rows;
  decode_unit<P, F>(pb, g, ws.unit_heads, chunk, chunks,
                    ws.keys[static_cast<std::size_t>(ws.first_row[p] + g.b)],
                    ws.workers[static_cast<std::size_t>(worker)], ws.max_rows,
                    ws.partial_out.data() + slot * g.hd, ws.partial_lse.data() + slot);
}

// Merges every group's chunks (one pass over rows * D * chunks values per group: done on
// the caller).
template <typename P>
void merge_decode(const P* problems, const MaskPolicy* policies, Index n,
                  DecodeWorkspace<typename P::Compute>& ws, EmptyRows& empty_rows) {
  for (Index p = 0; p < n; ++p) {
    const P& pb = problems[p];
    const Index chunks = decode_chunks(pb);
    for (Index group = 0; group < pb.q.dimension(0) * pb.k.dimension(1); ++group) {
      const DecodeGroup g = decode_group(pb, policies[p], group);
      const Index slot =
          (ws.first_item[static_cast<std::size_t>(p)] + group * chunks) * ws.max_rows;
      merge_chunks(pb, g, chunks, ws.max_rows, ws.partial_out.data() + slot * g.hd,
                   ws.partial_lse.data() + slot, ws.workers[0].merged.data(), empty_rows);
    }
  }
}

template <typename P>
void flash_decode_many(const P* problems, const MaskPolicy* policies, Index n,
                       const Eigen::ThreadPoolDevice* device,
                       DecodeWorkspace<typename P::Compute>& ws, const KernelTuning& tuning,
                       EmptyRows& empty_rows) {
  const Index units = prepare_decode(problems, policies, n, worker_count(device), ws, tuning);
  bool masked = false, biased = false;
  for (Index p = 0; p < n; ++p)
    masked |= policies[p].masks_elements(), biased |= policies[p].biases_scores();
  dispatch_features(
      [&](auto features) {
        using F = decltype(features);
        parallel_for_item_runs(device, units, [&](int worker, Index unit) {
          run_decode_unit<P, F>(problems, policies, ws, worker, unit);
        });
      },
      problems[0].params.softcap > 0.0, masked, biased);
  merge_decode(problems, policies, n, ws, empty_rows);
}

template <typename P>
void flash_decode(const P& pb, const MaskPolicy& policy, const Eigen::ThreadPoolDevice* device,
                  DecodeWorkspace<typename P::Compute>& ws, const KernelTuning& tuning,
                  EmptyRows& empty_rows) {
  flash_decode_many(&pb, &policy, 1, device, ws, tuning, empty_rows);
}

}  // namespace attnforge::detail
