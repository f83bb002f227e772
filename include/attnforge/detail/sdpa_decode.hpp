// The decode kernel: few query rows (Sq * n_rep small) against a long KV cache.
//
// Such a step does ~1 FMA per byte of K/V, so its limit is how fast the cache streams
// from memory. The kernel therefore reads every K and V row exactly once per KV head
// (all n_rep query heads of the group and all Sq positions share it), straight from
// the cache's storage, with the SIMD lanes along head_dim:
//   scores: for a block of P keys (P = packet size), each query row accumulates one
//           packet per key, and a transpose-add turns the P packets into one packet of
//           P scores;
//   output: out[r] += p[r][j] * v[j], register-blocked over rows and head_dim.
// Split-KV (flash-decoding): the keys are cut into chunks of kDecodeChunk, computed in
// parallel, each giving a normalised partial output and its log-sum-exp, merged exactly
// in chunk order. The chunking depends on Skv only, so any thread count gives the same
// bits.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "attnforge/detail/parallel.hpp"
#include "attnforge/detail/sdpa_kernel.hpp"
#include "attnforge/detail/vec_math.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

// Eigen's packet types (__m512 ...) lose their alignment attribute as template
// arguments (PacketBlock<Packet16f, 16>, unpacket_traits<...>); harmless here, and Eigen
// silences the same warning in its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace attnforge::detail {

// Keys per split-KV chunk. Long enough that the merge (one FMA per chunk and output
// element) is noise, short enough that B * Hkv * chunks gives a pool enough items:
// at Skv = 4096 a KV head is 4 items.
inline constexpr Index kDecodeChunk = 1024;

// The decode path takes query groups of at most this many rows (Sq * n_rep); beyond
// that the prefill kernel fills enough of its lanes to be the better choice.
template <typename T>
inline constexpr Index kDecodeMaxRows = Blocking<T>::kLanes / 4;

template <typename T>
struct DecodeScratch {
  using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;
  Buffer keys, values;  // P x D, a key block converted to T (when stored as another type)
  Buffer merged;        // D, one output row being merged
  Buffer q_rows;        // rows x D, pre-scaled queries
  Buffer out_rows;      // rows x D, unnormalised output accumulator
  Buffer weights;       // rows x P, softmax weights of the current key block
  Buffer row_ref;       // rows, exponent reference (lazily moved running max, log2 units)
  Buffer row_sum;       // rows
};

// The keys one batch row's queries can see at all: the union of their positional
// ranges, narrowed to their documents when the key ids are sorted (packed sequences, a
// cache continuing a packed stream). With a single query document and sorted ids every
// key inside has that document, so no per-key document check is left.
struct DecodeKeyRange {
  Index first = 0;
  Index last = 0;
  bool docs_resolved = false;
};

inline DecodeKeyRange decode_key_range(const BatchMask& mask, Index q_len) {
  DecodeKeyRange range{mask.key_begin(0), mask.key_end(q_len - 1), !mask.q_docs.has_value()};
  if (!mask.q_docs.has_value() || range.first >= range.last) return range;
  const auto [q_min, q_max] = mask.q_docs.visit([q_len](const auto* q_docs) {
    const auto [lo, hi] = std::minmax_element(q_docs, q_docs + q_len);
    return std::pair<DocId, DocId>(*lo, *hi);
  });
  mask.kv_docs.visit([&, q_min = q_min, q_max = q_max](const auto* kv_docs) {
    const auto* kv_first = kv_docs + range.first;
    const auto* kv_last = kv_docs + range.last;
    if (!std::is_sorted(kv_first, kv_last)) return;
    range.first = std::lower_bound(kv_first, kv_last, q_min) - kv_docs;
    range.last = std::upper_bound(kv_first, kv_last, q_max) - kv_docs;
    range.docs_resolved = q_min == q_max;
  });
  return range;
}

template <typename T>
struct DecodeWorkspace {
  std::vector<DecodeKeyRange> key_ranges;  // per batch row
  std::vector<DecodeScratch<T>> workers;
  // Per (b, kv_head, chunk): rows x D normalised partial outputs and rows lse (log2).
  std::vector<T, Eigen::aligned_allocator<T>> partial_out;
  std::vector<T, Eigen::aligned_allocator<T>> partial_lse;
};

// The packet the decode scores use. Each score is a dot product that ends in a
// transpose-reduce of one accumulator per key; with half-width packets that reduction
// is a quarter of the work (8 x 8 instead of 16 x 16) while the FMA rate is the same on
// cores whose 512-bit FMAs are two 256-bit halves (AMD Zen 4).
template <typename T>
using score_packet_t = typename ei::packet_traits<T>::half;

// Packets of one query row a score pass holds in registers (the rest of the register
// file holds one accumulator per key of the score packet, and the key loads).
template <typename T>
inline constexpr int kScoreQueryPackets = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 16 : 8;

// Keys [first, first + S) of a block of n_keys keys (S = size of the score packet),
// against head_dim elements [d0, d0 + NQ * S) of one query row held in registers:
// acc[j] += q . key_j over that range. Each key row is read front to back before the next,
// the order the hardware prefetchers follow: reading the block's rows side by side, a
// column at a time, streamed from DRAM at ~2/3 of this rate when measured here.
template <typename T, int NQ>
EIGEN_ALWAYS_INLINE void score_pass(
    const T* q, const T* const* rows, Index d0,
    ei::PacketBlock<score_packet_t<T>, ei::unpacket_traits<score_packet_t<T>>::size>& acc) {
  using Packet = score_packet_t<T>;
  constexpr int kS = ei::unpacket_traits<Packet>::size;
  Packet qv[NQ];
  ATTNFORGE_UNROLL
  for (int c = 0; c < NQ; ++c) qv[c] = ei::ploadu<Packet>(q + d0 + c * kS);
  ATTNFORGE_UNROLL
  for (int j = 0; j < kS; ++j) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < NQ; ++c) {
      acc.packet[j] = ei::pmadd(qv[c], ei::ploadu<Packet>(rows[j] + d0 + c * kS), acc.packet[j]);
    }
  }
}

// Scores of one query row against keys [first, first + S) of a block of n_keys keys,
// written to out[0, S). Keys past n_keys read the block's key 0 again; the caller masks
// them.
template <typename T>
EIGEN_ALWAYS_INLINE void block_scores(const T* q, const T* keys, Index ldk, Index n_keys,
                                      Index first, Index head_dim, T* out) {
  using Packet = score_packet_t<T>;
  constexpr int kS = ei::unpacket_traits<Packet>::size;
  constexpr int kNQ = kScoreQueryPackets<T>;
  ei::PacketBlock<Packet, kS> acc;
  const T* rows[kS];
  for (int j = 0; j < kS; ++j) {
    acc.packet[j] = ei::pset1<Packet>(T(0));
    rows[j] = keys + (first + j < n_keys ? first + j : 0) * ldk;
  }
  Index d = 0;
  for (; d + kNQ * kS <= head_dim; d += kNQ * kS) score_pass<T, kNQ>(q, rows, d, acc);
  // The tail of head_dim, one power of two of packets at a time (head_dim 64, 80, 96 ...).
  if constexpr (kNQ >= 16) {
    if (d + 8 * kS <= head_dim) {
      score_pass<T, 8>(q, rows, d, acc);
      d += 8 * kS;
    }
  }
  if constexpr (kNQ >= 8) {
    if (d + 4 * kS <= head_dim) {
      score_pass<T, 4>(q, rows, d, acc);
      d += 4 * kS;
    }
  }
  if (d + 2 * kS <= head_dim) {
    score_pass<T, 2>(q, rows, d, acc);
    d += 2 * kS;
  }
  if (d + kS <= head_dim) {
    score_pass<T, 1>(q, rows, d, acc);
    d += kS;
  }
  ei::ptranspose(acc);
  // Pairwise, so the adds form a tree of depth log2(S) rather than a chain of S - 1.
  for (int width = kS / 2; width >= 1; width /= 2) {
    for (int j = 0; j < width; ++j) acc.packet[j] = ei::padd(acc.packet[j], acc.packet[j + width]);
  }
  ei::pstoreu(out, acc.packet[0]);
  for (Index e = d; e < head_dim; ++e) {  // head_dim not a multiple of the packet
    for (int j = 0; j < kS; ++j) out[j] += q[e] * rows[j][e];
  }
}

// Packets of head_dim one accumulate pass holds per row: R rows of them, their key's
// values and the R weights fill the register file.
template <typename T>
inline constexpr int kValuePackets = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 8 : 4;

// out[r][:] += sum_j weights[r][j] * v_j[:] for R rows (row stride ldo), the n_keys
// keys of the block. Whole value rows (up to kValuePackets packets) are read one after
// the other, as the prefetchers like; the rows beyond the first R reread the block from L1.
template <typename T, int R>
EIGEN_ALWAYS_INLINE void decode_accumulate(const T* weights, const T* values, Index ldv,
                                           Index n_keys, Index head_dim, T* out, Index ldo) {
  using Packet = packet_t<T>;
  constexpr int kP = kPacketSize<T>;
  constexpr int kChunk = kValuePackets<T>;
  Index d = 0;
  for (; d + kChunk * kP <= head_dim; d += kChunk * kP) {
    Packet acc[R][kChunk];
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      ATTNFORGE_UNROLL
      for (int c = 0; c < kChunk; ++c) acc[r][c] = ei::pload<Packet>(out + r * ldo + d + c * kP);
    }
    for (Index j = 0; j < n_keys; ++j) {
      Packet v[kChunk];
      ATTNFORGE_UNROLL
      for (int c = 0; c < kChunk; ++c) v[c] = ei::ploadu<Packet>(values + j * ldv + d + c * kP);
      ATTNFORGE_UNROLL
      for (int r = 0; r < R; ++r) {
        const Packet w = ei::pset1<Packet>(weights[r * kP + j]);
        ATTNFORGE_UNROLL
        for (int c = 0; c < kChunk; ++c) acc[r][c] = ei::pmadd(w, v[c], acc[r][c]);
      }
    }
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      ATTNFORGE_UNROLL
      for (int c = 0; c < kChunk; ++c) ei::pstore(out + r * ldo + d + c * kP, acc[r][c]);
    }
  }
  for (; d + kP <= head_dim; d += kP) {  // the packets after the last whole chunk
    Packet acc[R];
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) acc[r] = ei::pload<Packet>(out + r * ldo + d);
    for (Index j = 0; j < n_keys; ++j) {
      const Packet v = ei::ploadu<Packet>(values + j * ldv + d);
      ATTNFORGE_UNROLL
      for (int r = 0; r < R; ++r)
        acc[r] = ei::pmadd(ei::pset1<Packet>(weights[r * kP + j]), v, acc[r]);
    }
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) ei::pstore(out + r * ldo + d, acc[r]);
  }
  for (; d < head_dim; ++d) {
    for (int r = 0; r < R; ++r) {
      T sum = out[r * ldo + d];
      for (Index j = 0; j < n_keys; ++j) sum += weights[r * kP + j] * values[j * ldv + d];
      out[r * ldo + d] = sum;
    }
  }
}

// Asks for rows [0, n_rows) of a row-major matrix (row stride ld, `width` elements per
// row), front to back.
template <typename S>
EIGEN_ALWAYS_INLINE void prefetch_rows(const S* rows, Index ld, Index n_rows, Index width) {
  constexpr Index kLine = 64 / sizeof(S);
  for (Index r = 0; r < n_rows; ++r) {
    for (Index e = 0; e < width; e += kLine) __builtin_prefetch(rows + r * ld + e, 0, 2);
  }
}

// Scratch rows are padded to a multiple of the packet so every row starts aligned.
inline Index padded_head_dim(Index head_dim, Index packet) {
  return (head_dim + packet - 1) / packet * packet;
}

// One (batch row, KV head, key chunk) item: all rows of the group against the chunk's
// keys, leaving normalised outputs and lse (log2 units) in the partial slots.
template <typename P, bool kSoftcap, bool kMasked>
void decode_chunk(const P& pb, Index b, Index kv_head, Index chunk, const DecodeKeyRange& range,
                  DecodeScratch<typename P::Compute>& s, typename P::Compute* partial_out,
                  typename P::Compute* partial_lse) {
  using T = typename P::Compute;
  using Packet = packet_t<T>;
  constexpr int kP = kPacketSize<T>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr T kRescaleThreshold = T(8);  // as in the prefill kernel: weights <= 2^8

  const Index head_dim = pb.q.dimension(3);
  const Index hd = padded_head_dim(head_dim, kP);
  const Index q_len = pb.q.dimension(2);
  const Index kv_len = pb.k.dimension(2);
  const Index n_rep = pb.q.dimension(1) / pb.k.dimension(1);
  const Index rows = q_len * n_rep;  // row r: position r / n_rep, head kv_head * n_rep + r % n_rep
  // The chunk's keys that some row may see (possibly none: the chunk then gives lse -inf).
  const Index key_first = std::max(chunk * kDecodeChunk, range.first);
  const Index key_last = std::min(std::min(kv_len, (chunk + 1) * kDecodeChunk), range.last);
  const BatchMask mask = batch_mask(pb.params.rules, pb.masks, b, q_len, kv_len);
  const bool per_key_mask = kMasked && (mask.key_allowed != nullptr || !range.docs_resolved);

  const T q_scale = static_cast<T>(kSoftcap ? pb.params.scale : pb.params.scale * kLog2e);
  for (Index r = 0; r < rows; ++r) {
    const auto* q = pb.q.row(b, kv_head * n_rep + r % n_rep, r / n_rep);
    T* dst = s.q_rows.data() + r * hd;
    for (Index d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(q[d]) * q_scale;
    s.row_ref[r] = kNegInf;
    s.row_sum[r] = T(0);
  }
  std::fill(s.out_rows.begin(), s.out_rows.begin() + rows * hd, T(0));

  // Keys every row may see by position: a block inside [all_first, all_last) needs no
  // positional mask (causal and window are monotone in the position).
  const Index all_first = mask.key_begin(rows > 0 ? q_len - 1 : 0);
  const Index all_last = mask.key_end(0);
  Index ldk = pb.k.stride(2);
  Index ldv = pb.v.stride(2);
  const Packet inv_cap =
      ei::pset1<Packet>(static_cast<T>(kSoftcap ? 1.0 / pb.params.softcap : 1.0));
  const Packet cap = ei::pset1<Packet>(static_cast<T>(pb.params.softcap * kLog2e));
  alignas(64) T lanes[kP];

  for (Index j0 = key_first; j0 < key_last; j0 += kP) {
    const Index n_keys = std::min<Index>(kP, key_last - j0);
    // The whole block (K and V) is asked for at once, front to back, before any of it is
    // used: the misses then overlap instead of arriving one stall at a time. Measured here
    // (Skv = 32768, 1 thread) that beats prefetching the next block instead, which lost to
    // no software prefetch at all (the hardware prefetchers already run ahead on their own),
    // beats bursts of 2 or 4 blocks, and needs every line: asking for every other one, or
    // for K or V alone, loses a fifth of the rate or more.
    prefetch_rows(pb.k.row(b, kv_head, j0), pb.k.stride(2), n_keys, head_dim);
    prefetch_rows(pb.v.row(b, kv_head, j0), pb.v.stride(2), n_keys, head_dim);
    const T* keys = tile_rows(pb.k, b, kv_head, j0, n_keys, s.keys, ldk);
    const bool positional_full = j0 >= all_first && j0 + n_keys <= all_last;
    // All rows' scores first, then their softmax: the rows are independent, and keeping
    // each phase in its own loop lets the core overlap their latency chains. The first
    // row reads each key from memory, the others from L1.
    constexpr int kS = ei::unpacket_traits<score_packet_t<T>>::size;
    for (int first = 0; first < kP; first += kS) {
      for (Index r = 0; r < rows; ++r) {
        block_scores<T>(s.q_rows.data() + r * hd, keys, ldk, n_keys, first, head_dim,
                        s.weights.data() + r * kP + first);
      }
    }
    for (Index r = 0; r < rows; ++r) {
      T* row_scores = s.weights.data() + r * kP;
      Packet scores = ei::pload<Packet>(row_scores);
      if constexpr (kSoftcap) scores = ei::pmul(cap, tanh(ei::pmul(scores, inv_cap)));
      if (per_key_mask || !positional_full || n_keys < kP) {
        ei::pstore(lanes, scores);
        const Index i = r / n_rep;
        for (Index j = 0; j < kP; ++j) {
          if (j >= n_keys || !mask.allowed(i, j0 + j)) lanes[j] = kNegInf;
        }
        scores = ei::pload<Packet>(lanes);
      }
      ei::pstore(s.weights.data() + r * kP, scores);
    }
    for (Index r = 0; r < rows; ++r) {
      const Packet scores = ei::pload<Packet>(s.weights.data() + r * kP);
      // Online softmax of this row (see the prefill kernel for the lazy reference).
      const T block_max = ei::predux_max(scores);
      T ref = s.row_ref[r];
      if (block_max > ref + kRescaleThreshold) {
        const T base_old = ref;
        ref = block_max;
        const T alpha =
            base_old == kNegInf ? T(0) : ei::pfirst(exp2(ei::pset1<Packet>(base_old - ref)));
        s.row_sum[r] *= alpha;
        T* out = s.out_rows.data() + r * hd;
        for (Index d = 0; d < hd; d += kP)
          ei::pstore(out + d, ei::pmul(ei::pload<Packet>(out + d), ei::pset1<Packet>(alpha)));
        s.row_ref[r] = ref;
      }
      const T base = ref == kNegInf ? T(0) : ref;
      const Packet weights = exp2(ei::psub(scores, ei::pset1<Packet>(base)));
      s.row_sum[r] += ei::predux(weights);
      ei::pstore(s.weights.data() + r * kP, weights);
    }
    const T* values = tile_rows(pb.v, b, kv_head, j0, n_keys, s.values, ldv);
    Index r0 = 0;
    for (; r0 + 2 <= rows; r0 += 2) {
      decode_accumulate<T, 2>(s.weights.data() + r0 * kP, values, ldv, n_keys, head_dim,
                              s.out_rows.data() + r0 * hd, hd);
    }
    for (; r0 < rows; ++r0) {
      decode_accumulate<T, 1>(s.weights.data() + r0 * kP, values, ldv, n_keys, head_dim,
                              s.out_rows.data() + r0 * hd, hd);
    }
  }

  for (Index r = 0; r < rows; ++r) {
    const T sum = s.row_sum[r];
    // Only sum == 0 means no allowed key in the chunk. A NaN sum (a NaN or infinite score
    // or query) must stay NaN, not pass for an empty chunk that the merge would drop.
    const bool empty = sum == T(0);
    const T inv = empty ? T(0) : T(1) / sum;
    const T* src = s.out_rows.data() + r * hd;
    T* dst = partial_out + r * hd;
    for (Index d = 0; d < head_dim; ++d) dst[d] = src[d] * inv;
    partial_lse[r] = empty ? kNegInf : s.row_ref[r] + std::log2(sum);
  }
}

// Writes out (and lse) of one (b, kv_head) from its chunks' partials, in chunk order:
// lse = log2 sum_c 2^lse_c, out = sum_c 2^(lse_c - lse) out_c. Returns the rows with no
// allowed key through `empty_rows`.
template <typename P>
void merge_chunks(const P& pb, Index b, Index kv_head, Index n_chunks,
                  const typename P::Compute* partial_out, const typename P::Compute* partial_lse,
                  typename P::Compute* merged, std::vector<std::array<Index, 3>>& empty_rows) {
  using T = typename P::Compute;
  using Out = typename P::Scalar;
  constexpr double kLog2e = 1.4426950408889634074;
  const Index head_dim = pb.q.dimension(3);
  const Index hd = padded_head_dim(head_dim, kPacketSize<T>);
  const Index q_len = pb.q.dimension(2);
  const Index n_rep = pb.q.dimension(1) / pb.k.dimension(1);
  const Index rows = q_len * n_rep;
  using Acc = acc_t<T>;
  for (Index r = 0; r < rows; ++r) {
    const Index h = kv_head * n_rep + r % n_rep;
    const Index i = r / n_rep;
    T max_lse = -std::numeric_limits<T>::infinity();
    for (Index c = 0; c < n_chunks; ++c) {
      const T chunk_lse = partial_lse[c * rows + r];
      if (std::isnan(chunk_lse) || chunk_lse > max_lse) max_lse = chunk_lse;  // NaN sticks
    }
    Out* out = pb.out.row(b, h, i);
    if (max_lse == -std::numeric_limits<T>::infinity()) {
      std::fill(out, out + head_dim, Out(0));
      if (pb.lse.has_value()) pb.lse(b, h, i) = -std::numeric_limits<Acc>::infinity();
      empty_rows.push_back({b, h, i});
      continue;
    }
    T total = 0;
    for (Index c = 0; c < n_chunks; ++c) total += std::exp2(partial_lse[c * rows + r] - max_lse);
    const T lse = max_lse + std::log2(total);
    std::fill(merged, merged + head_dim, T(0));
    for (Index c = 0; c < n_chunks; ++c) {
      const T weight = std::exp2(partial_lse[c * rows + r] - lse);
      if (weight == T(0)) continue;
      const T* part = partial_out + (c * rows + r) * hd;
      for (Index d = 0; d < head_dim; ++d) merged[d] += weight * part[d];
    }
    for (Index d = 0; d < head_dim; ++d) out[d] = static_cast<Out>(merged[d]);
    if (pb.lse.has_value()) pb.lse(b, h, i) = static_cast<Acc>(static_cast<double>(lse) / kLog2e);
  }
}

template <typename T>
bool decode_applies(Index q_len, Index n_rep) {
  return q_len * n_rep <= kDecodeMaxRows<T>;
}

template <typename P>
void flash_decode(const P& pb, const Eigen::ThreadPoolDevice* device,
                  DecodeWorkspace<typename P::Compute>& ws,
                  std::vector<std::array<Index, 3>>& empty_rows) {
  using T = typename P::Compute;
  const Index batch = pb.q.dimension(0);
  const Index n_kv_heads = pb.k.dimension(1);
  const Index kv_len = pb.k.dimension(2);
  const Index rows = pb.q.dimension(2) * (pb.q.dimension(1) / n_kv_heads);
  const Index hd = padded_head_dim(pb.q.dimension(3), kPacketSize<T>);
  const Index n_chunks = std::max<Index>(1, (kv_len + kDecodeChunk - 1) / kDecodeChunk);
  const Index groups = batch * n_kv_heads;

  ws.workers.resize(static_cast<std::size_t>(worker_count(device)));
  for (DecodeScratch<T>& s : ws.workers) {
    s.q_rows.resize(static_cast<std::size_t>(rows * hd));
    s.out_rows.resize(static_cast<std::size_t>(rows * hd));
    s.weights.resize(static_cast<std::size_t>(rows * kPacketSize<T>));
    s.row_ref.resize(static_cast<std::size_t>(rows));
    s.row_sum.resize(static_cast<std::size_t>(rows));
    const bool convert_kv = !std::is_same_v<typename P::KVScalar, T>;
    s.keys.resize(convert_kv ? static_cast<std::size_t>(kPacketSize<T> * pb.q.dimension(3)) : 0);
    s.values.resize(s.keys.size());
    s.merged.resize(static_cast<std::size_t>(hd));
  }
  ws.partial_out.resize(static_cast<std::size_t>(groups * n_chunks * rows * hd));
  ws.partial_lse.resize(static_cast<std::size_t>(groups * n_chunks * rows));
  const bool masked = pb.masks.doc_ids.has_value() || pb.masks.key_padding_mask.has_value();
  ws.key_ranges.resize(static_cast<std::size_t>(batch));
  for (Index b = 0; b < batch; ++b) {
    ws.key_ranges[static_cast<std::size_t>(b)] = decode_key_range(
        batch_mask(pb.params.rules, pb.masks, b, pb.q.dimension(2), kv_len), pb.q.dimension(2));
  }

  const auto run = [&](auto softcap, auto with_masks) {
    parallel_for_items(device, groups * n_chunks, [&](int worker, Index item) {
      const Index group = item / n_chunks;
      const Index chunk = item % n_chunks;
      decode_chunk<P, decltype(softcap)::value, decltype(with_masks)::value>(
          pb, group / n_kv_heads, group % n_kv_heads, chunk,
          ws.key_ranges[static_cast<std::size_t>(group / n_kv_heads)],
          ws.workers[static_cast<std::size_t>(worker)], ws.partial_out.data() + (item * rows) * hd,
          ws.partial_lse.data() + item * rows);
    });
  };
  const bool softcap = pb.params.softcap > 0.0;
  if (softcap && masked) run(std::true_type{}, std::true_type{});
  if (softcap && !masked) run(std::true_type{}, std::false_type{});
  if (!softcap && masked) run(std::false_type{}, std::true_type{});
  if (!softcap && !masked) run(std::false_type{}, std::false_type{});

  // The merge is one pass over rows * D * chunks values per group: done on the caller.
  for (Index group = 0; group < groups; ++group) {
    merge_chunks(pb, group / n_kv_heads, group % n_kv_heads, n_chunks,
                 ws.partial_out.data() + group * n_chunks * rows * hd,
                 ws.partial_lse.data() + group * n_chunks * rows, ws.workers[0].merged.data(),
                 empty_rows);
  }
}

}  // namespace attnforge::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
