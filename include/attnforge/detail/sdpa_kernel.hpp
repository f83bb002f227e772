// The blocked online-softmax SDPA kernel (the hot path).
//
// Layout: a query tile holds `lanes` query rows, the n_rep heads that share one KV
// head at `positions` consecutive positions (lane = position * heads + head), stored
// transposed so queries run along the SIMD lanes:
//   Qt (D x lanes)   queries, pre-scaled so scores come out in log2 units
//   St (Nk x lanes)  scores of one key tile, then their softmax weights P
//   Ot (D x lanes)   the unnormalised output accumulator
// With queries along the lanes, both tile products are the same register-blocked
// micro-kernel (a broadcast of K or V from its own row-major storage times a row of
// Qt or Pt), K and V are read in place (a KVCache prefix included; nothing is packed or
// repeated for GQA), and the softmax statistics of every query are plain vector ops.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnforge/detail/bf16_dot.hpp"
#include "attnforge/detail/parallel.hpp"
#include "attnforge/detail/vec_math.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

#if defined(__clang__)
#define ATTNFORGE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTNFORGE_UNROLL _Pragma("GCC unroll 16")
#else
#define ATTNFORGE_UNROLL
#endif

// Eigen's packet types (__m512 ...) lose their alignment attribute as template
// arguments (PacketBlock<Packet16f, 16>, unpacket_traits<...>); harmless here, and Eigen
// silences the same warning in its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace attnforge::detail {

// Register blocking: kRows rows of K (or of V^T) times kLaneVectors packets of lanes,
// kRows * kLaneVectors accumulators plus kLaneVectors operands in registers. Measured
// (S = 2048, D = 128, 1 thread, AVX-512) for lane vectors x rows: 4 x 6 100.7 GFLOP/s,
// 3 x 8 98.3, 2 x 12 95.4, 4 x 4 81.5.
template <typename T>
struct Blocking {
  using Packet = packet_t<T>;
  static constexpr int kPacket = kPacketSize<T>;
#ifdef ATTNFORGE_LANE_VECTORS
  static constexpr int kLaneVectors = ATTNFORGE_LANE_VECTORS;
  static constexpr int kRows = ATTNFORGE_ROWS;
#else
  static constexpr int kLaneVectors = 4;
  static constexpr int kRows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 6 : 3;
#endif
  static constexpr int kLanes = kLaneVectors * kPacket;
};

// st[r][:] = sum_d k[r * ldk + d] * qt[d][:] for the R key rows at k.
template <typename T, int R>
EIGEN_ALWAYS_INLINE void score_block(const T* k, Index ldk, const T* qt, Index head_dim, T* st) {
  using B = Blocking<T>;
  using Packet = typename B::Packet;
  Packet acc[R][B::kLaneVectors];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < B::kLaneVectors; ++c) acc[r][c] = ei::pset1<Packet>(T(0));
  }
  for (Index d = 0; d < head_dim; ++d) {
    Packet q[B::kLaneVectors];
    ATTNFORGE_UNROLL
    for (int c = 0; c < B::kLaneVectors; ++c) q[c] = ei::pload<Packet>(qt + d * B::kLanes + c * B::kPacket);
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const Packet key = ei::pset1<Packet>(k[r * ldk + d]);
      ATTNFORGE_UNROLL
      for (int c = 0; c < B::kLaneVectors; ++c) acc[r][c] = ei::pmadd(key, q[c], acc[r][c]);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < B::kLaneVectors; ++c) ei::pstore(st + r * B::kLanes + c * B::kPacket, acc[r][c]);
  }
}

// ot[r][:] += sum_n v[n * ldv + r] * pt[n][:] for the R output dimensions at v.
template <typename T, int R>
EIGEN_ALWAYS_INLINE void accumulate_block(const T* v, Index ldv, const T* pt, Index n_keys, T* ot) {
  using B = Blocking<T>;
  using Packet = typename B::Packet;
  Packet acc[R][B::kLaneVectors];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < B::kLaneVectors; ++c) acc[r][c] = ei::pload<Packet>(ot + r * B::kLanes + c * B::kPacket);
  }
  for (Index n = 0; n < n_keys; ++n) {
    Packet p[B::kLaneVectors];
    ATTNFORGE_UNROLL
    for (int c = 0; c < B::kLaneVectors; ++c) p[c] = ei::pload<Packet>(pt + n * B::kLanes + c * B::kPacket);
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const Packet value = ei::pset1<Packet>(v[n * ldv + r]);
      ATTNFORGE_UNROLL
      for (int c = 0; c < B::kLaneVectors; ++c) acc[r][c] = ei::pmadd(value, p[c], acc[r][c]);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int c = 0; c < B::kLaneVectors; ++c) ei::pstore(ot + r * B::kLanes + c * B::kPacket, acc[r][c]);
  }
}

// Calls f(std::integral_constant<int, rows>, first) over [0, n) in blocks of at most R
// rows. The blocks are balanced (sizes R and R - 1 where possible, e.g. 128 = 18 x 6 +
// 4 x 5) because a short tail block runs its FMAs at a fraction of the rate.
template <int R, typename F>
EIGEN_ALWAYS_INLINE void for_each_row_block(Index n, F&& f) {
  const Index blocks = (n + R - 1) / R;
  Index first = 0;
  if constexpr (R > 1) {
    // blocks * R - n blocks of R - 1 rows (when that many exist), the rest of R rows.
    const Index short_blocks = std::min(blocks * R - n, blocks);
    if (short_blocks * (R - 1) + (blocks - short_blocks) * R == n) {
      for (Index b = 0; b < blocks - short_blocks; ++b, first += R) f(std::integral_constant<int, R>{}, first);
      for (Index b = 0; b < short_blocks; ++b, first += R - 1) f(std::integral_constant<int, R - 1>{}, first);
      return;
    }
    for (; first + R <= n; first += R) f(std::integral_constant<int, R>{}, first);
    if (first < n) for_each_row_block<R - 1>(n - first, [&](auto rows, Index offset) { f(rows, first + offset); });
  } else {
    for (; first < n; ++first) f(std::integral_constant<int, 1>{}, first);
  }
}

// qt[d][lane] = rows[lane][d] * scale for d < head_dim (0 for lanes whose row is null),
// transposing one packet-square block at a time. Rows of another storage type than the
// compute type T are converted element by element.
template <typename T, typename S>
void pack_transposed(const S* const* rows, Index head_dim, T scale, T* qt) {
  using B = Blocking<T>;
  using Packet = typename B::Packet;
  constexpr int kP = B::kPacket;
  Index d = 0;
  if constexpr (std::is_same_v<S, T>) {
    const Packet scale_p = ei::pset1<Packet>(scale);
    for (; d + kP <= head_dim; d += kP) {
      for (int c = 0; c < B::kLaneVectors; ++c) {
        ei::PacketBlock<Packet, kP> block;
        for (int i = 0; i < kP; ++i) {
          const T* row = rows[c * kP + i];
          block.packet[i] = row ? ei::ploadu<Packet>(row + d) : ei::pzero(scale_p);
        }
        ei::ptranspose(block);
        for (int i = 0; i < kP; ++i) {
          ei::pstore(qt + (d + i) * B::kLanes + c * kP, ei::pmul(block.packet[i], scale_p));
        }
      }
    }
  }
  for (; d < head_dim; ++d) {
    for (int lane = 0; lane < B::kLanes; ++lane) {
      qt[d * B::kLanes + lane] = rows[lane] ? static_cast<T>(rows[lane][d]) * scale : T(0);
    }
  }
}

// rows[lane][d] = ot[d][lane] * inv_sum[lane] for the lanes whose row is not null,
// converted to the rows' storage type S.
template <typename T, typename S>
void unpack_transposed(const T* ot, Index head_dim, const T* inv_sum, S* const* rows) {
  using B = Blocking<T>;
  using Packet = typename B::Packet;
  constexpr int kP = B::kPacket;
  Index d = 0;
  if constexpr (std::is_same_v<S, T>) {
    for (; d + kP <= head_dim; d += kP) {
      for (int c = 0; c < B::kLaneVectors; ++c) {
        ei::PacketBlock<Packet, kP> block;
        for (int i = 0; i < kP; ++i) block.packet[i] = ei::pload<Packet>(ot + (d + i) * B::kLanes + c * kP);
        ei::ptranspose(block);
        for (int i = 0; i < kP; ++i) {
          T* row = rows[c * kP + i];
          if (row) ei::pstoreu(row + d, ei::pmul(block.packet[i], ei::pset1<Packet>(inv_sum[c * kP + i])));
        }
      }
    }
  }
  for (; d < head_dim; ++d) {
    for (int lane = 0; lane < B::kLanes; ++lane) {
      if (rows[lane]) rows[lane][d] = static_cast<S>(ot[d * B::kLanes + lane] * inv_sum[lane]);
    }
  }
}

// A key/value tile as the micro-kernels read it: rows of the compute type, either the
// caller's own storage (same type) or a converted copy in scratch.
template <typename T>
struct KeyValueTile {
  const T* keys;
  Index key_stride;
  const T* values;
  Index value_stride;
  // bf16 dot products: K straight from storage (bits), V regrouped as key pairs.
  const std::uint16_t* key_bits = nullptr;
  const std::uint32_t* value_pairs = nullptr;
};

// Rows [first, first + n) of one (batch row, KV head) of a (B, Hkv, Skv, D) view, as a
// tile of type T: the storage itself when it already is T, else converted into `buffer`.
template <typename T, typename S>
const T* tile_rows(const ConstView<S, 4>& view, Index b, Index head, Index first, Index n,
                   std::vector<T, Eigen::aligned_allocator<T>>& buffer, Index& stride) {
  if constexpr (std::is_same_v<S, T>) {
    stride = view.stride(2);
    return view.row(b, head, first);
  } else {
    const Index width = view.dimension(3);
    for (Index r = 0; r < n; ++r) convert(view.row(b, head, first + r), buffer.data() + r * width, width);
    stride = width;
    return buffer.data();
  }
}

// A work item: where its query tiles sit (batch row, KV head, head group, first tile).
struct QueryTile {
  Index batch;
  Index kv_head;
  Index head_group;
  Index q_tile;  // the first of `count` consecutive query tiles
  Index count;
};

// Tiling of one call: derived from n_rep and the lane count (query side) and from the
// measured key tile (key side).
struct TileGeometry {
  Index heads_per_tile;  // query heads of one KV group in a tile
  Index head_groups;     // tiles needed to cover all n_rep heads (1 unless n_rep > lanes)
  Index positions;       // query positions per tile
  Index key_tile;        // keys per key tile
  Index q_tiles_per_item;  // query tiles that share each K/V tile load
};

// Keys per key tile. Sweeping {32, 48, 64, 96, 128, 192, 256} on S = 2048, D = 128, 1
// thread, gave 99.5-101.4 GFLOP/s: flat within 2%, because the micro-kernels stream the
// tile from L1/L2 at any of these sizes. 64 keeps the St tile (key_tile x lanes) in L1
// and the causal diagonal's partial tiles small.
inline Index default_key_tile(Index /*head_dim*/) { return 64; }

// Query tiles per work item, sharing each K/V tile while it is in L1/L2 (measured as
// above: 2 -> 97.2 GFLOP/s, 4 -> 98.2, 8 -> 100.3, 16 -> 101.1; 8 keeps more items for
// the pool at short S). Their states (Qt and Ot, 2 * D * lanes values each) must fit in
// L2 next to a K and a V tile.
#ifndef ATTNFORGE_Q_TILES_PER_ITEM
#define ATTNFORGE_Q_TILES_PER_ITEM 8
#endif
inline constexpr Index kQueryTilesPerItem = ATTNFORGE_Q_TILES_PER_ITEM;

template <typename T>
TileGeometry tile_geometry(Index n_rep, Index head_dim, Index key_tile = 0) {
  constexpr Index kLanes = Blocking<T>::kLanes;
  TileGeometry g;
  g.heads_per_tile = std::min(n_rep, kLanes);
  g.head_groups = (n_rep + g.heads_per_tile - 1) / g.heads_per_tile;
  g.positions = std::max<Index>(1, kLanes / g.heads_per_tile);
  g.key_tile = key_tile > 0 ? key_tile : default_key_tile(head_dim);
  g.q_tiles_per_item = kQueryTilesPerItem;
  return g;
}

// The running state of one query tile: its Qt, Ot and softmax statistics.
template <typename T>
struct QueryTileState {
  using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;
  Buffer q_tile;    // Qt, D x lanes
  Buffer out_tile;  // Ot, D x lanes
  Buffer row_max;   // lanes, exponent reference (lazily moved running max, log2 units)
  Buffer row_sum;   // lanes
  Buffer alpha;     // lanes, rescale factor of the current key tile
  std::vector<std::uint32_t, Eigen::aligned_allocator<std::uint32_t>> q_pairs;  // bf16 dot: Qt as pairs
  std::vector<DocId> lane_docs;
  Index q_tile_index = 0;
  Index p0 = 0;           // first query position
  Index n_positions = 0;  // positions of the tile inside the sequence
};

// Per-worker scratch, sized once per call and reused across calls: the states of the
// query tiles of one work item and the St buffer they take turns with.
template <typename T>
struct KernelScratch {
  std::vector<QueryTileState<T>> tiles;
  std::vector<T, Eigen::aligned_allocator<T>> scores;  // St, key_tile x lanes
  // K and V tiles converted to T, when the caller's storage is another type.
  std::vector<T, Eigen::aligned_allocator<T>> keys, values;
  // bf16 dot products: V regrouped as key pairs, and the weights P as bf16 pairs.
  std::vector<std::uint32_t, Eigen::aligned_allocator<std::uint32_t>> value_pairs, weight_pairs;
  std::vector<std::array<Index, 3>> empty_rows;  // (b, h, i) with no allowed key

  void reserve(Index head_dim, Index key_tile, Index tiles_per_item, bool convert_kv,
               bool bf16_dot) {
    constexpr Index kLanes = Blocking<T>::kLanes;
    tiles.resize(static_cast<std::size_t>(tiles_per_item));
    for (QueryTileState<T>& t : tiles) {
      t.q_tile.resize(static_cast<std::size_t>(head_dim * kLanes));
      t.out_tile.resize(static_cast<std::size_t>(head_dim * kLanes));
      t.row_max.resize(kLanes);
      t.row_sum.resize(kLanes);
      t.alpha.resize(kLanes);
      t.lane_docs.resize(kLanes);
      t.q_pairs.resize(bf16_dot ? static_cast<std::size_t>(head_dim / 2 * kLanes) : 0);
    }
    const Index key_pairs = (key_tile + 2) / 2;  // one extra: spans are widened to even starts
    value_pairs.resize(bf16_dot ? static_cast<std::size_t>(key_pairs * head_dim) : 0);
    weight_pairs.resize(bf16_dot ? static_cast<std::size_t>(key_pairs * kLanes) : 0);
    scores.resize(static_cast<std::size_t>(key_tile * kLanes));
    keys.resize(convert_kv ? static_cast<std::size_t>(key_tile * head_dim) : 0);
    values.resize(convert_kv ? static_cast<std::size_t>(key_tile * head_dim) : 0);
    empty_rows.clear();
  }
};

// Everything a call needs, kept by the ScaledDotProductAttention object between calls.
template <typename T>
struct KernelWorkspace {
  TilePlan plan;
  std::vector<QueryTile> items;
  std::vector<Index> item_cost;
  std::vector<KernelScratch<T>> workers;
};

// The inputs of one call: q and out of element type T, k and v of KV (e.g. a bf16
// cache under float activations). The kernels compute in Compute = acc_t<T>; other
// storage types are converted as tiles are loaded and stored.
template <typename T, typename KV = T>
struct KernelProblem {
  using Scalar = T;
  using KVScalar = KV;
  using Compute = acc_t<T>;
  ConstView<T, 4> q;   // (B, H, Sq, D)
  ConstView<KV, 4> k;  // (B, Hkv, Skv, D)
  ConstView<KV, 4> v;  // (B, Hkv, Skv, D)
  StridedView<T, 4> out;
  StridedView<acc_t<T>, 3> lse;  // optional
  SdpaParams params;
  Masks masks;
};

// The per-call context every query tile of a work item shares.
template <typename P>
struct TileContext {
  const P& pb;
  const TilePlan& plan;
  const TileGeometry& geo;
  BatchMask mask;
  Index batch;
  Index kv_head;
  Index first_head;  // of the head group
  Index heads;       // query heads in the group
  Index head_dim;
  Index q_len;
  Index kv_len;
};

// 1. Qt of one query tile and its fresh softmax state. Without softcap the log2(e)
// factor of exp -> exp2 is folded into the scale.
template <typename P, bool kSoftcap, bool kDocs, bool kBf16Dot>
void begin_query_tile(const TileContext<P>& ctx, Index q_tile,
                      QueryTileState<typename P::Compute>& state) {
  using T = typename P::Compute;
  constexpr Index kLanes = Blocking<T>::kLanes;
  constexpr double kLog2e = 1.4426950408889634074;
  const Index hpt = ctx.geo.heads_per_tile;
  state.q_tile_index = q_tile;
  state.p0 = q_tile * ctx.geo.positions;
  state.n_positions = std::min(ctx.geo.positions, ctx.q_len - state.p0);
  const T q_scale = static_cast<T>(kSoftcap ? ctx.pb.params.scale : ctx.pb.params.scale * kLog2e);
  const typename P::Scalar* lane_rows[kLanes];
  for (Index lane = 0; lane < kLanes; ++lane) {
    const Index p = lane / hpt;
    const Index hl = lane % hpt;
    const bool valid = p < state.n_positions && hl < ctx.heads && lane < ctx.geo.positions * hpt;
    lane_rows[lane] = valid ? ctx.pb.q.row(ctx.batch, ctx.first_head + hl, state.p0 + p) : nullptr;
    if constexpr (kDocs) state.lane_docs[lane] = valid ? ctx.mask.q_docs[state.p0 + p] : DocId(0);
  }
  if constexpr (kBf16Dot) {
    // The scale is applied to the scores instead: scaling bf16 queries would round them.
    pair_query_rows(reinterpret_cast<const std::uint16_t* const*>(lane_rows), kLanes,
                    ctx.head_dim / 2, state.q_pairs.data());
  } else {
    pack_transposed(lane_rows, ctx.head_dim, q_scale, state.q_tile.data());
  }
  std::fill(state.out_tile.begin(), state.out_tile.end(), T(0));
  std::fill(state.row_max.begin(), state.row_max.end(), -std::numeric_limits<T>::infinity());
  std::fill(state.row_sum.begin(), state.row_sum.end(), T(0));
}

// 2-5. One query tile against key tile kt (not empty): scores, mask, online softmax,
// output update. `scores` is the worker's St buffer.
template <typename P, bool kSoftcap, bool kDocs, bool kPadding, bool kBf16Dot>
void attend_key_tile(const TileContext<P>& ctx, Index kt, TileClass cls,
                     QueryTileState<typename P::Compute>& state, typename P::Compute* scores,
                     std::uint32_t* state_weight_pairs, const KeyValueTile<typename P::Compute>& kv) {
  using T = typename P::Compute;
  using B = Blocking<T>;
  using Packet = typename B::Packet;
  constexpr Index kLanes = B::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr double kLog2e = 1.4426950408889634074;
  const P& pb = ctx.pb;
  const TileGeometry& geo = ctx.geo;
  const BatchMask& mask = ctx.mask;
  const Index head_dim = ctx.head_dim;
  const Index hpt = geo.heads_per_tile;
  const Index p0 = state.p0;
  const Index q_offset = ctx.kv_len - ctx.q_len;
  T* qt = state.q_tile.data();
  T* ot = state.out_tile.data();
  T* st = scores;
  // Only the keys some query of the tile may see (the rest would be masked anyway).
  const KeySpan keys = ctx.plan.key_span(ctx.batch, state.q_tile_index, kt);
  const Index tile_first = kt * geo.key_tile;
  // The bf16 dot products take keys in pairs counted from the tile's first key: an odd
  // span start moves one key back (that key is masked like any key outside the span).
  const Index n0 = kBf16Dot ? tile_first + (keys.first - tile_first) / 2 * 2 : keys.first;
  const Index n_keys = keys.last - n0;

  // 2. St = K Qt.
  if constexpr (kBf16Dot) {
#if ATTNFORGE_BF16_DOT
    constexpr int kC = kLanes / 16;
    constexpr int kR = kC >= 4 ? 6 : 12;
    const Index ldk = pb.k.stride(2);
    const std::uint16_t* k_bits = kv.key_bits + (n0 - tile_first) * ldk;
    for_each_row_block<kR>(n_keys, [&](auto rows, Index r0) {
      pair_dot_block<decltype(rows)::value, kC, false>(k_bits + r0 * ldk, ldk, 2, state.q_pairs.data(),
                                                      head_dim / 2, st + r0 * kLanes);
    });
    // Scale (and log2 e, without softcap) here, the queries having stayed bf16.
    const Packet score_scale = ei::pset1<Packet>(
        static_cast<T>(kSoftcap ? pb.params.scale : pb.params.scale * kLog2e));
    for (Index i = 0; i < n_keys * kLanes; i += B::kPacket) {
      ei::pstore(st + i, ei::pmul(ei::pload<Packet>(st + i), score_scale));
    }
#endif
  } else {
    const Index ldk = kv.key_stride;
    const T* k_tile = kv.keys + (n0 - tile_first) * ldk;  // kv starts at the tile's first key
    for_each_row_block<B::kRows>(n_keys, [&](auto rows, Index r0) {
      score_block<T, decltype(rows)::value>(k_tile + r0 * ldk, ldk, qt, head_dim, st + r0 * kLanes);
    });
  }
  if constexpr (kSoftcap) {
    const Packet inv_cap = ei::pset1<Packet>(static_cast<T>(1.0 / pb.params.softcap));
    const Packet cap = ei::pset1<Packet>(static_cast<T>(pb.params.softcap * kLog2e));
    for (Index i = 0; i < n_keys * kLanes; i += B::kPacket) {
      ei::pstore(st + i, ei::pmul(cap, tanh(ei::pmul(ei::pload<Packet>(st + i), inv_cap))));
    }
  }

  // 3. Mask (partial tiles only). Lanes are position-major, so the positional rules
  // leave each key row one contiguous lane interval [lane_lo, lane_hi).
  if (cls == TileClass::kPartial) {
    for (Index n = 0; n < n_keys; ++n) {
      const Index j = n0 + n;
      T* row = st + n * kLanes;
      Index lane_lo = 0;
      Index lane_hi = geo.positions * hpt;
      if (mask.causal) lane_lo = std::clamp<Index>(j - q_offset - p0, 0, geo.positions) * hpt;
      if (mask.window > 0) {
        lane_hi = std::clamp<Index>(j - q_offset + mask.window - p0, 0, geo.positions) * hpt;
      }
      if constexpr (kPadding) {
        if (!mask.key_allowed[j]) lane_hi = 0;
      }
      lane_lo = std::min(lane_lo, lane_hi);
      std::fill(row, row + lane_lo, kNegInf);
      std::fill(row + lane_hi, row + kLanes, kNegInf);
      if constexpr (kDocs) {
        const DocId key_doc = mask.kv_docs[j];
        for (Index lane = lane_lo; lane < lane_hi; ++lane) {
          if (state.lane_docs[lane] != key_doc) row[lane] = kNegInf;
        }
      }
    }
  }

  // 4. Online softmax with a lazily moved reference. Weights are exp2(score - ref);
  // ref only moves (and Ot, row_sum are rescaled by exp2(old - new)) when a lane's
  // tile max exceeds it by more than kRescaleThreshold, so weights stay <= 2^8 and
  // cannot overflow, and the rescale pass over Ot is rare after the first tiles.
  // Out and lse use the same ref, so the result is the exact softmax either way.
  // A lane that has seen no allowed key has ref -inf; its exponentials are taken
  // relative to 0 instead, so exp2(-inf - 0) = 0 and no -inf - (-inf) = NaN arises.
  constexpr T kRescaleThreshold = T(8);
  bool rescale = false;
  ATTNFORGE_UNROLL
  for (int c = 0; c < B::kLaneVectors; ++c) {
    const Index lane = c * B::kPacket;
    Packet tile_max = ei::pset1<Packet>(kNegInf);
    for (Index n = 0; n < n_keys; ++n) tile_max = ei::pmax(tile_max, ei::pload<Packet>(st + n * kLanes + lane));
    const Packet old_ref = ei::pload<Packet>(state.row_max.data() + lane);
    const Packet moves = ei::pcmp_lt(ei::padd(old_ref, ei::pset1<Packet>(kRescaleThreshold)), tile_max);
    if (ei::predux_any(moves)) {
      const Packet new_ref = ei::pselect(moves, tile_max, old_ref);
      const Packet base = ei::pselect(ei::pcmp_eq(new_ref, ei::pset1<Packet>(kNegInf)), ei::pzero(new_ref), new_ref);
      const Packet alpha = exp2(ei::psub(old_ref, base));
      ei::pstore(state.row_sum.data() + lane, ei::pmul(ei::pload<Packet>(state.row_sum.data() + lane), alpha));
      ei::pstore(state.row_max.data() + lane, new_ref);
      ei::pstore(state.alpha.data() + lane, alpha);
      rescale = true;
    } else {
      ei::pstore(state.alpha.data() + lane, ei::pset1<Packet>(T(1)));
    }
  }
  if (rescale) {
    for (Index d = 0; d < head_dim; ++d) {
      ATTNFORGE_UNROLL
      for (int c = 0; c < B::kLaneVectors; ++c) {
        T* o = ot + d * kLanes + c * B::kPacket;
        ei::pstore(o, ei::pmul(ei::pload<Packet>(o), ei::pload<Packet>(state.alpha.data() + c * B::kPacket)));
      }
    }
  }
  ATTNFORGE_UNROLL
  for (int c = 0; c < B::kLaneVectors; ++c) {
    const Index lane = c * B::kPacket;
    const Packet ref = ei::pload<Packet>(state.row_max.data() + lane);
    const Packet base = ei::pselect(ei::pcmp_eq(ref, ei::pset1<Packet>(kNegInf)), ei::pzero(ref), ref);
    Packet sum = ei::pzero(ref);
    for (Index n = 0; n < n_keys; ++n) {
      T* p = st + n * kLanes + lane;
      const Packet weight = exp2(ei::psub(ei::pload<Packet>(p), base));
      ei::pstore(p, weight);
      sum = ei::padd(sum, weight);
    }
    ei::pstore(state.row_sum.data() + lane, ei::padd(ei::pload<Packet>(state.row_sum.data() + lane), sum));
  }

  // 5. Ot += V^T Pt.
  if constexpr (kBf16Dot) {
#if ATTNFORGE_BF16_DOT
    constexpr int kC = kLanes / 16;
    constexpr int kR = kC >= 4 ? 6 : 12;
    std::uint32_t* weight_pairs = state_weight_pairs;
    pair_rows_to_bf16(st, n_keys, kLanes, weight_pairs);
    const std::uint32_t* value_pairs = kv.value_pairs + (n0 - tile_first) / 2 * head_dim;
    for_each_row_block<kR>(head_dim, [&](auto rows, Index d0) {
      pair_dot_block<decltype(rows)::value, kC, true>(
          reinterpret_cast<const std::uint16_t*>(value_pairs + d0), 2, 2 * head_dim, weight_pairs,
          (n_keys + 1) / 2, ot + d0 * kLanes);
    });
#endif
  } else {
    const Index ldv = kv.value_stride;
    const T* v_tile = kv.values + (n0 - tile_first) * ldv;
    for_each_row_block<B::kRows>(head_dim, [&](auto rows, Index d0) {
      accumulate_block<T, decltype(rows)::value>(v_tile + d0, ldv, st, n_keys, ot + d0 * kLanes);
    });
  }
}


// 6. out = Ot^T / row_sum; lse = ln 2 * (ref + log2(sum)). A row with no allowed key
// has sum 0: output 0 and lse -inf (the kZeros policy), recorded for kAttendAll.
template <typename P>
void finish_query_tile(const TileContext<P>& ctx, QueryTileState<typename P::Compute>& state,
                       std::vector<std::array<Index, 3>>& empty_rows) {
  using T = typename P::Compute;
  constexpr Index kLanes = Blocking<T>::kLanes;
  constexpr double kLog2e = 1.4426950408889634074;
  const P& pb = ctx.pb;
  const TileGeometry& geo = ctx.geo;
  const Index hpt = geo.heads_per_tile;
  const Index heads = ctx.heads;
  const Index first_head = ctx.first_head;
  const Index n_positions = state.n_positions;
  const Index p0 = state.p0;
  const Index head_dim = ctx.head_dim;
  T* ot = state.out_tile.data();
  using Acc = acc_t<T>;
  typename P::Scalar* out_rows[kLanes];
  T inv_sum[kLanes];
  for (Index lane = 0; lane < kLanes; ++lane) {
    const Index p = lane / hpt;
    const Index hl = lane % hpt;
    out_rows[lane] = nullptr;
    inv_sum[lane] = T(0);
    if (p >= n_positions || hl >= heads || lane >= geo.positions * hpt) continue;
    const Index h = first_head + hl;
    const Index i = p0 + p;
    out_rows[lane] = pb.out.row(ctx.batch, h, i);
    const T sum = state.row_sum[lane];
    // Only sum == 0 means no allowed key. A NaN sum (a NaN or infinite score) is not an
    // empty row: it keeps out and lse NaN, so a merge of partial results cannot drop it.
    if (sum != T(0)) {
      inv_sum[lane] = T(1) / sum;
      if (pb.lse.has_value()) {
        pb.lse(ctx.batch, h, i) = static_cast<Acc>(
            (static_cast<double>(state.row_max[lane]) + std::log2(static_cast<double>(sum))) / kLog2e);
      }
    } else {
      if (pb.lse.has_value()) pb.lse(ctx.batch, h, i) = -std::numeric_limits<Acc>::infinity();
      empty_rows.push_back({ctx.batch, h, i});
    }
  }
  unpack_transposed(ot, head_dim, inv_sum, out_rows);
}

// A work item: `count` consecutive query tiles of one (batch row, KV head group). Each
// K/V tile is loaded once for all of them while it is in cache, which is what keeps
// long sequences (K/V of a head beyond L2) from running at L3 speed.
template <typename P, bool kSoftcap, bool kDocs, bool kPadding, bool kBf16Dot>
void process_query_tiles(const P& pb, const TilePlan& plan, const TileGeometry& geo,
                         const QueryTile& item, KernelScratch<typename P::Compute>& s) {
  using T = typename P::Compute;
  const Index n_rep = pb.q.dimension(1) / pb.k.dimension(1);
  const Index hpt = geo.heads_per_tile;
  const TileContext<P> ctx{pb,
                           plan,
                           geo,
                           batch_mask(pb.params.rules, pb.masks, item.batch, pb.q.dimension(2),
                                      pb.k.dimension(2)),
                           item.batch,
                           item.kv_head,
                           item.kv_head * n_rep + item.head_group * hpt,
                           std::min(hpt, n_rep - item.head_group * hpt),
                           pb.q.dimension(3),
                           pb.q.dimension(2),
                           pb.k.dimension(2)};
  const Index count = std::min(item.count, plan.q_tiles() - item.q_tile);
  Index kt_first = plan.key_tiles();
  Index kt_last = 0;
  for (Index t = 0; t < count; ++t) {
    begin_query_tile<P, kSoftcap, kDocs, kBf16Dot>(ctx, item.q_tile + t, s.tiles[t]);
    const auto [first, last] = plan.key_tile_range(item.batch, item.q_tile + t);
    if (first < last) {
      kt_first = std::min(kt_first, first);
      kt_last = std::max(kt_last, last);
    }
  }
  for (Index kt = kt_first; kt < kt_last; ++kt) {
    KeyValueTile<T> kv{nullptr, 0, nullptr, 0};
    bool loaded = false;
    for (Index t = 0; t < count; ++t) {
      const auto [first, last] = plan.key_tile_range(item.batch, item.q_tile + t);
      if (kt < first || kt >= last) continue;
      const TileClass cls = plan.classify(item.batch, item.q_tile + t, kt);
      if (cls == TileClass::kEmpty) continue;
      if (!loaded) {  // loaded (converted, paired) once for all the item's query tiles
        const Index n0 = kt * geo.key_tile;
        const Index n_keys = std::min(geo.key_tile, ctx.kv_len - n0);
        if constexpr (kBf16Dot) {
          kv.key_bits = reinterpret_cast<const std::uint16_t*>(pb.k.row(item.batch, item.kv_head, n0));
          pair_value_rows(reinterpret_cast<const std::uint16_t*>(pb.v.row(item.batch, item.kv_head, n0)),
                          pb.v.stride(2), n_keys, ctx.head_dim, s.value_pairs.data());
          kv.value_pairs = s.value_pairs.data();
        } else {
          kv.keys = tile_rows(pb.k, item.batch, item.kv_head, n0, n_keys, s.keys, kv.key_stride);
          kv.values = tile_rows(pb.v, item.batch, item.kv_head, n0, n_keys, s.values, kv.value_stride);
        }
        loaded = true;
      }
      attend_key_tile<P, kSoftcap, kDocs, kPadding, kBf16Dot>(ctx, kt, cls, s.tiles[t], s.scores.data(),
                                                              s.weight_pairs.data(), kv);
    }
  }
  for (Index t = 0; t < count; ++t) finish_query_tile(ctx, s.tiles[t], s.empty_rows);
}

// Runs the kernel over all query tiles on the caller's pool. Returns, through
// ws.workers[*].empty_rows, the rows that had no allowed key.
template <typename P>
void flash_attention(const P& pb, const Eigen::ThreadPoolDevice* device,
                     KernelWorkspace<typename P::Compute>& ws, Index key_tile = 0) {
  using T = typename P::Compute;
  const Index batch = pb.q.dimension(0);
  const Index q_len = pb.q.dimension(2);
  const Index head_dim = pb.q.dimension(3);
  const Index n_kv_heads = pb.k.dimension(1);
  const Index n_rep = pb.q.dimension(1) / n_kv_heads;
  const TileGeometry geo = tile_geometry<T>(n_rep, head_dim, key_tile);
  ws.plan.build(pb.params.rules, pb.masks, batch, q_len, pb.k.dimension(2), geo.positions,
                geo.key_tile);

  // Work items ordered by cost (non-empty key tiles), most expensive first, so uneven
  // causal/document work balances across workers. Each item is computed the same way
  // whichever worker takes it: the result does not depend on the thread count.
  ws.items.clear();
  ws.item_cost.clear();
  const Index per_item = geo.q_tiles_per_item;
  for (Index b = 0; b < batch; ++b) {
    for (Index qt = 0; qt < ws.plan.q_tiles(); qt += per_item) {
      Index cost = 0;
      for (Index t = qt; t < std::min(qt + per_item, ws.plan.q_tiles()); ++t) {
        cost += ws.plan.active_key_tiles(b, t);
      }
      for (Index kv_head = 0; kv_head < n_kv_heads; ++kv_head) {
        for (Index group = 0; group < geo.head_groups; ++group) {
          ws.items.push_back({b, kv_head, group, qt, per_item});
          ws.item_cost.push_back(cost);
        }
      }
    }
  }
  std::vector<Index> order(ws.items.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<Index>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](Index a, Index b) { return ws.item_cost[a] > ws.item_cost[b]; });

  ws.workers.resize(static_cast<std::size_t>(worker_count(device)));
  constexpr bool kBf16Storage = std::is_same_v<typename P::Scalar, Eigen::bfloat16> &&
                                std::is_same_v<typename P::KVScalar, Eigen::bfloat16>;
  const bool bf16_dot = kBf16Storage && pb.params.bf16_dot;
  const bool convert_kv = !std::is_same_v<typename P::KVScalar, T> && !bf16_dot;
  for (KernelScratch<T>& s : ws.workers) {
    s.reserve(head_dim, geo.key_tile, per_item, convert_kv, bf16_dot);
  }

  const auto run_with = [&](auto softcap, auto docs, auto padding, auto dot) {
    parallel_for_items(device, static_cast<Index>(order.size()), [&](int worker, Index item) {
      process_query_tiles<P, decltype(softcap)::value, decltype(docs)::value,
                          decltype(padding)::value, decltype(dot)::value>(
          pb, ws.plan, geo, ws.items[static_cast<std::size_t>(order[item])],
          ws.workers[static_cast<std::size_t>(worker)]);
    });
  };
  const auto run = [&](auto softcap, auto docs, auto padding) {
    if constexpr (kBf16Storage && kHasBf16DotKernel && Blocking<T>::kLanes % 16 == 0) {
      if (bf16_dot) return run_with(softcap, docs, padding, std::true_type{});
    }
    run_with(softcap, docs, padding, std::false_type{});
  };
  const auto with_padding = [&](auto softcap, auto docs) {
    if (pb.masks.key_padding_mask.has_value()) {
      run(softcap, docs, std::true_type{});
    } else {
      run(softcap, docs, std::false_type{});
    }
  };
  const auto with_docs = [&](auto softcap) {
    if (pb.masks.doc_ids.has_value()) {
      with_padding(softcap, std::true_type{});
    } else {
      with_padding(softcap, std::false_type{});
    }
  };
  if (pb.params.softcap > 0.0) {
    with_docs(std::true_type{});
  } else {
    with_docs(std::false_type{});
  }
}

}  // namespace attnforge::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
