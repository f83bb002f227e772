// The fused (prefill) SDPA kernel: a blocked online softmax over query tiles and key
// tiles, the hot path for Sq * n_rep beyond a few rows.
//
// Layout: a query tile holds `lanes` query rows, the n_rep heads that share one KV head
// at `positions` consecutive positions (lane = position * heads + head), stored
// transposed so queries run along the SIMD lanes:
//   Qt (D x lanes)   queries, pre-scaled so scores come out in log2 units
//   St (Nk x lanes)  scores of one key tile, then their softmax weights P
//   Ot (D x lanes)   the unnormalised output accumulator
// With queries along the lanes, both tile products are one register-blocked micro-kernel
// (a broadcast of K or V from its own row-major storage times a row of Qt or Pt), K and
// V are read in place (a KVCache prefix included; nothing is packed or repeated for GQA),
// and the softmax statistics of every query are plain vector ops.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attnforge/detail/bf16_dot.hpp"
#include "attnforge/detail/kernel_config.hpp"
#include "attnforge/detail/mask_policy.hpp"
#include "attnforge/detail/online_softmax.hpp"
#include "attnforge/detail/paged_rows.hpp"
#include "attnforge/detail/parallel.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge::detail {

template <typename T>
using AlignedBuffer = std::vector<T, Eigen::aligned_allocator<T>>;

// The micro-kernel: c[r][:] (+)= sum_k A(r, k) * b[k][:] for R rows r, where
// A(r, k) = a[r * a_row + k * a_col] is broadcast and b, c rows are `lanes` wide
// (kLaneVectors packets). St = K Qt is (a = K, a_row = ldk, a_col = 1, b = Qt);
// Ot += V^T Pt is (a = V, a_row = 1, a_col = ldv, b = Pt).
template <typename T, int R, bool kAccumulate>
EIGEN_ALWAYS_INLINE void broadcast_product(const T* a, Index a_row, Index a_col, const T* b,
                                           Index n_inner, T* c) {
  using B = FusedBlocking<T>;
  using Packet = simd::Packet<T>;
  Packet acc[R][B::kLaneVectors];
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int v = 0; v < B::kLaneVectors; ++v) {
      acc[r][v] = kAccumulate ? simd::load_aligned<Packet>(c + r * B::kLanes + v * B::kPacket)
                              : simd::zero<Packet>();
    }
  }
  for (Index k = 0; k < n_inner; ++k) {
    Packet operand[B::kLaneVectors];
    ATTNFORGE_UNROLL
    for (int v = 0; v < B::kLaneVectors; ++v) {
      operand[v] = simd::load_aligned<Packet>(b + k * B::kLanes + v * B::kPacket);
    }
    ATTNFORGE_UNROLL
    for (int r = 0; r < R; ++r) {
      const Packet broadcast = simd::splat<Packet>(a[r * a_row + k * a_col]);
      ATTNFORGE_UNROLL
      for (int v = 0; v < B::kLaneVectors; ++v)
        acc[r][v] = simd::fma(broadcast, operand[v], acc[r][v]);
    }
  }
  ATTNFORGE_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNFORGE_UNROLL
    for (int v = 0; v < B::kLaneVectors; ++v)
      simd::store_aligned(c + r * B::kLanes + v * B::kPacket, acc[r][v]);
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
      for (Index b = 0; b < blocks - short_blocks; ++b, first += R)
        f(std::integral_constant<int, R>{}, first);
      for (Index b = 0; b < short_blocks; ++b, first += R - 1)
        f(std::integral_constant<int, R - 1>{}, first);
      return;
    }
    for (; first + R <= n; first += R) f(std::integral_constant<int, R>{}, first);
    if (first < n)
      for_each_row_block<R - 1>(n - first,
                                [&](auto rows, Index offset) { f(rows, first + offset); });
  } else {
    for (; first < n; ++first) f(std::integral_constant<int, 1>{}, first);
  }
}

// qt[d][lane] = rows[lane][d] * scale for d < head_dim (0 for lanes whose row is null),
// transposing one packet-square block at a time; bf16/fp16 rows widened to float as they
// are loaded (simd::load_as).
template <typename T, typename S>
void pack_transposed(const S* const* rows, Index head_dim, T scale, T* qt) {
  using B = FusedBlocking<T>;
  using Packet = simd::Packet<T>;
  constexpr int kP = B::kPacket;
  Index d = 0;
  if constexpr (std::is_same_v<S, T> || std::is_same_v<T, float>) {
    const Packet scale_p = simd::splat<Packet>(scale);
    for (; d + kP <= head_dim; d += kP) {
      for (int v = 0; v < B::kLaneVectors; ++v) {
        simd::Block<T> block;
        for (int i = 0; i < kP; ++i) {
          const S* row = rows[v * kP + i];
          block.packet[i] = row ? simd::load_as<Packet>(row + d) : simd::zero<Packet>();
        }
        simd::transpose(block);
        for (int i = 0; i < kP; ++i) {
          simd::store_aligned(qt + (d + i) * B::kLanes + v * kP,
                              simd::mul(block.packet[i], scale_p));
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

// rows[lane][d] = ot[d][lane] * scale[lane] for the lanes whose row is not null,
// converted to the rows' storage type S; with `streaming`, packets of S = T that are
// aligned go around the caches (simd::store_streaming; the caller fences).
template <typename T, typename S>
void unpack_transposed(const T* ot, Index head_dim, const T* scale, S* const* rows,
                       bool streaming) {
  using B = FusedBlocking<T>;
  using Packet = simd::Packet<T>;
  constexpr int kP = B::kPacket;
  Index d = 0;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<S, T>) {
    for (; d + kP <= head_dim; d += kP) {
      for (int v = 0; v < B::kLaneVectors; ++v) {
        simd::Block<T> block;
        for (int i = 0; i < kP; ++i)
          block.packet[i] = simd::load_aligned<Packet>(ot + (d + i) * B::kLanes + v * kP);
        simd::transpose(block);
        for (int i = 0; i < kP; ++i) {
          S* row = rows[v * kP + i];
          const Packet scaled = simd::mul(block.packet[i], simd::splat<Packet>(scale[v * kP + i]));
          if (!row) continue;
          if constexpr (std::is_same_v<S, T>) {
            if (streaming && simd::packet_aligned<Packet>(row + d)) {
              simd::store_streaming(row + d, scaled);
            } else {
              simd::store(row + d, scaled);
            }
          } else {
            simd::store_as(row + d, scaled);
          }
        }
      }
    }
  }
  for (; d < head_dim; ++d) {
    for (int lane = 0; lane < B::kLanes; ++lane) {
      if (rows[lane]) rows[lane][d] = static_cast<S>(ot[d * B::kLanes + lane] * scale[lane]);
    }
  }
}

// A key/value tile as the micro-kernels read it: rows of the compute type, either the
// caller's own storage (same type) or a converted copy in scratch.
template <typename T>
struct KeyValueTile {
  const T* keys = nullptr;
  Index key_stride = 0;
  const T* values = nullptr;
  Index value_stride = 0;
  // bf16 dot products: K as bits (row stride key_stride), V regrouped as key pairs.
  const std::uint16_t* key_bits = nullptr;
  const std::uint32_t* value_pairs = nullptr;
};

// Rows [first, first + n) of one (batch row, KV head) of a (B, Hkv, Skv, D) view or a
// paged sequence, as a tile of type T: the storage itself when it already is T and the
// rows are contiguous, else converted or dequantized (and gathered from their blocks)
// into `buffer`.
template <QInt8Role kRole, typename T, typename Rows>
const T* tile_rows(const Rows& view, Index b, Index head, Index first, Index n,
                   AlignedBuffer<T>& buffer, Index& stride) {
  if constexpr (std::is_same_v<typename Rows::Scalar, T>) {
    if (contiguous_rows(view, first) >= n) {
      stride = view.stride(2);
      return view.row(b, head, first);
    }
  }
  load_positions<kRole>(view, b, head, first, n, buffer.data());
  stride = view.dimension(3);
  return buffer.data();
}

// A work item: `count` consecutive query tiles of one (batch row, KV head, head group)
// of one problem of the call.
struct QueryTile {
  Index problem;
  Index batch;
  Index kv_head;
  Index head_group;
  Index q_tile;  // the first of `count` consecutive query tiles
  Index count;
};

// Tiling of one call: derived from n_rep and the lane count (query side) and from the
// key tile (key side).
struct TileGeometry {
  Index heads_per_tile;    // query heads of one KV group in a tile
  Index head_groups;       // tiles needed to cover all n_rep heads (1 unless n_rep > lanes)
  Index positions;         // query positions per tile
  Index key_tile;          // keys per key tile
  Index q_tiles_per_item;  // query tiles that share each K/V tile load
};

template <typename T>
TileGeometry tile_geometry(Index n_rep, const KernelTuning& tuning = {}) {
  constexpr Index kLanes = FusedBlocking<T>::kLanes;
  TileGeometry g;
  g.heads_per_tile = std::min(n_rep, kLanes);
  g.head_groups = (n_rep + g.heads_per_tile - 1) / g.heads_per_tile;
  g.positions = std::max<Index>(1, kLanes / g.heads_per_tile);
  g.key_tile = tuning.key_tile > 0 ? tuning.key_tile : kDefaultKeyTile;
  g.q_tiles_per_item = kQueryTilesPerItem;
  return g;
}

// The running state of one query tile: Qt, Ot, the softmax statistics of its lanes and
// what each lane needs for element masks and score biases.
template <typename T>
struct QueryTileState {
  AlignedBuffer<T> q_tile;               // Qt, D x lanes
  AlignedBuffer<T> out_tile;             // Ot, D x lanes
  AlignedBuffer<T> row_ref;              // lanes: SoftmaxStats::ref
  AlignedBuffer<T> row_sum;              // lanes: SoftmaxStats::sum
  AlignedBuffer<T> alpha;                // lanes: rescale factor of the current key tile
  AlignedBuffer<T> alibi_slope;          // lanes: ALiBi slope * log2(e)
  AlignedBuffer<T> alibi_position;       // lanes: pos(i), exact in T
  AlignedBuffer<std::uint32_t> q_pairs;  // bf16 dot: Qt as pairs
  std::vector<DocId> lane_docs;
  std::vector<const unsigned char*> lane_mask;  // attn_mask row of each lane (null: none)
  std::vector<const float*> lane_bias;          // attn_bias row of each lane (null: none)
  Index q_tile_index = 0;
  Index p0 = 0;           // first query position
  Index n_positions = 0;  // positions of the tile inside the sequence
};

// Per-worker scratch, sized once per call and reused across calls: the states of the
// query tiles of one work item and the St buffer they take turns with.
template <typename T>
struct KernelScratch {
  std::vector<QueryTileState<T>> tiles;
  AlignedBuffer<T> scores;  // St, key_tile x lanes
  // K and V tiles converted to T, when the caller's storage is another type.
  AlignedBuffer<T> keys, values;
  // bf16 dot products: V regrouped as key pairs, and the weights P as bf16 pairs; K's
  // rows copied when a tile spans runs of a paged cache.
  AlignedBuffer<std::uint32_t> value_pairs, weight_pairs;
  AlignedBuffer<Eigen::bfloat16> bf16_keys;
  EmptyRows empty_rows;

  void reserve(Index head_dim, Index key_tile, Index tiles_per_item, bool convert_kv, bool bf16_dot,
               bool gather_bf16_keys) {
    constexpr std::size_t kLanes = FusedBlocking<T>::kLanes;
    const auto size = [](Index n) { return static_cast<std::size_t>(n); };
    tiles.resize(size(tiles_per_item));
    for (QueryTileState<T>& t : tiles) {
      for (AlignedBuffer<T>* lanes :
           {&t.row_ref, &t.row_sum, &t.alpha, &t.alibi_slope, &t.alibi_position}) {
        lanes->resize(kLanes);
      }
      t.q_tile.resize(size(head_dim) * kLanes);
      t.out_tile.resize(size(head_dim) * kLanes);
      t.lane_docs.resize(kLanes);
      t.lane_mask.resize(kLanes);
      t.lane_bias.resize(kLanes);
      t.q_pairs.resize(bf16_dot ? size(head_dim / 2) * kLanes : 0);
    }
    const Index key_pairs = (key_tile + 2) / 2;  // one extra: spans are widened to even starts
    value_pairs.resize(bf16_dot ? size(key_pairs * head_dim) : 0);
    weight_pairs.resize(bf16_dot ? size(key_pairs) * kLanes : 0);
    bf16_keys.resize(gather_bf16_keys ? size(key_tile * head_dim) : 0);
    scores.resize(size(key_tile) * kLanes);
    keys.resize(convert_kv ? size(key_tile * head_dim) : 0);
    values.resize(convert_kv ? size(key_tile * head_dim) : 0);
    empty_rows.clear();
  }
};

// Everything a call needs, kept by the ScaledDotProductAttention object between calls.
template <typename T>
struct KernelWorkspace {
  std::vector<TilePlan> plans;  // per problem
  std::vector<QueryTile> items;
  std::vector<Index> item_cost;
  std::vector<Index> order;
  std::vector<KernelScratch<T>> workers;
};

// The inputs of one call: q and out of element type T, k and v of KV (e.g. a bf16
// cache under float activations). The kernels compute in Compute = acc_t<T>; other
// storage types are converted as tiles are loaded and stored.
// KVRows is how K and V are read: a strided (B, Hkv, Skv, D) view, or the PagedRows of
// one sequence of a PagedKVCache (B = 1).
template <typename T, typename KV = T, typename KVRows = ConstView<KV, 4>>
struct KernelProblem {
  using Scalar = T;
  using KVScalar = KV;
  using Compute = acc_t<T>;
  ConstView<T, 4> q;  // (B, H, Sq, D)
  KVRows k;           // (B, Hkv, Skv, D)
  KVRows v;           // (B, Hkv, Skv, D)
  StridedView<T, 4> out;
  StridedView<acc_t<T>, 3> lse;  // optional
  SdpaParams params;             // the mask data reach the kernels through the MaskPolicy
  // Added to the batch index of the empty rows the kernels report: a call over several
  // problems (the sequences of a ragged batch) tells them apart by it.
  Index batch_offset = 0;
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

  // The lane of the tile's position p and its head hl of the group: lanes are
  // position-major (lane_row inverts this).
  Index lane_at(Index p, Index hl) const { return p * geo.heads_per_tile + hl; }

  // The query row of a lane: its head and position, or false for a padding lane.
  bool lane_row(const QueryTileState<typename P::Compute>& state, Index lane, Index& h,
                Index& i) const {
    const Index p = lane / geo.heads_per_tile;
    const Index hl = lane % geo.heads_per_tile;
    h = first_head + hl;
    i = state.p0 + p;
    return p < state.n_positions && hl < heads && lane < geo.positions * geo.heads_per_tile;
  }
};

// What each lane of a fresh query tile needs beyond its query: its document, its
// attn_mask and attn_bias rows, its ALiBi slope (log2 units) and position.
template <typename P>
void set_lane_masks(const TileContext<P>& ctx, QueryTileState<typename P::Compute>& state) {
  using T = typename P::Compute;
  const BatchMask& mask = ctx.mask;
  for (Index lane = 0; lane < FusedBlocking<T>::kLanes; ++lane) {
    Index h = 0, i = 0;
    const bool valid = ctx.lane_row(state, lane, h, i);
    const auto at = static_cast<std::size_t>(lane);
    state.lane_docs[at] = valid && mask.q_docs.has_value() ? mask.q_docs[i] : DocId(0);
    state.lane_mask[at] = valid ? mask.mask_row(h, i) : nullptr;
    state.lane_bias[at] = valid ? mask.bias_row(h, i) : nullptr;
    state.alibi_slope[at] = static_cast<T>(valid ? mask.alibi_slope(h) * kLog2e : 0.0);
    state.alibi_position[at] = static_cast<T>(valid ? mask.position(i) : 0);
  }
}

// 1. Qt of one query tile and its fresh softmax state. Without softcap the log2(e)
// factor of exp -> exp2 is folded into the scale.
template <typename P, typename F>
void begin_query_tile(const TileContext<P>& ctx, Index q_tile,
                      QueryTileState<typename P::Compute>& state) {
  using T = typename P::Compute;
  constexpr Index kLanes = FusedBlocking<T>::kLanes;
  state.q_tile_index = q_tile;
  state.p0 = q_tile * ctx.geo.positions;
  state.n_positions = std::min(ctx.geo.positions, ctx.q_len - state.p0);
  const typename P::Scalar* lane_rows[kLanes];
  for (Index lane = 0; lane < kLanes; ++lane) {
    Index h = 0, i = 0;
    lane_rows[lane] = ctx.lane_row(state, lane, h, i) ? ctx.pb.q.row(ctx.batch, h, i) : nullptr;
  }
  // Rows head by head, each head's positions in order: adjacent rows, which the
  // transposing pack below would otherwise read one line of each at a time.
  for (Index hl = 0; hl < ctx.geo.heads_per_tile; ++hl) {
    for (Index position = 0; position < ctx.geo.positions; ++position) {
      const auto* row = lane_rows[ctx.lane_at(position, hl)];
      if (row != nullptr) simd::touch_lines(row, ctx.head_dim * Index{sizeof(*row)});
    }
  }
  if constexpr (F::kMasked || F::kBiased) set_lane_masks(ctx, state);
  if constexpr (F::kBf16Dot) {
    // The scale is applied to the scores instead: scaling bf16 queries would round them.
    pair_query_rows(lane_rows, kLanes, ctx.head_dim / 2, state.q_pairs.data());
  } else {
    const double scale = ctx.pb.params.scale * (F::kSoftcap ? 1.0 : kLog2e);
    pack_transposed(lane_rows, ctx.head_dim, static_cast<T>(scale), state.q_tile.data());
  }
  std::fill(state.out_tile.begin(), state.out_tile.end(), T(0));
  const SoftmaxStats<T> fresh = SoftmaxStats<T>::start();
  std::fill(state.row_ref.begin(), state.row_ref.end(), fresh.ref);
  std::fill(state.row_sum.begin(), state.row_sum.end(), fresh.sum);
}

// Keys [n0, n0 + n_keys) of a key tile: where the tile products start.
struct TileKeys {
  Index tile_first;  // the tile's first key (where the KeyValueTile rows start)
  Index n0;
  Index n_keys;
};

// 2. St = K Qt, in log2 units (and softcapped).
template <typename P, typename F>
void tile_scores(const TileContext<P>& ctx, const QueryTileState<typename P::Compute>& state,
                 const KeyValueTile<typename P::Compute>& kv, const TileKeys& keys,
                 typename P::Compute* st) {
  using T = typename P::Compute;
  using B = FusedBlocking<T>;
  using Packet = simd::Packet<T>;
  const Index n_scores = keys.n_keys * B::kLanes;
  if constexpr (F::kBf16Dot) {
#if ATTNFORGE_BF16_DOT
    constexpr int kC = B::kLanes / 16;
    constexpr int kR = kC >= 4 ? 6 : 12;
    const Index ldk = kv.key_stride;
    const std::uint16_t* k_bits = kv.key_bits + (keys.n0 - keys.tile_first) * ldk;
    // Scaled (and by log2 e, without softcap) as they are stored, the queries having
    // stayed bf16.
    const auto scale = static_cast<float>(ctx.pb.params.scale * (F::kSoftcap ? 1.0 : kLog2e));
    for_each_row_block<kR>(keys.n_keys, [&](auto rows, Index r0) {
      pair_dot_block<decltype(rows)::value, kC, false>(k_bits + r0 * ldk, ldk, 2,
                                                       state.q_pairs.data(), ctx.head_dim / 2,
                                                       st + r0 * B::kLanes, scale);
    });
#endif
  } else {
    const Index ldk = kv.key_stride;
    const T* k_tile = kv.keys + (keys.n0 - keys.tile_first) * ldk;
    for_each_row_block<B::kRows>(keys.n_keys, [&](auto rows, Index r0) {
      broadcast_product<T, decltype(rows)::value, false>(
          k_tile + r0 * ldk, ldk, 1, state.q_tile.data(), ctx.head_dim, st + r0 * B::kLanes);
    });
  }
  if constexpr (F::kSoftcap) {
    const Packet inv_cap = simd::splat<Packet>(static_cast<T>(1.0 / ctx.pb.params.softcap));
    const Packet cap = simd::splat<Packet>(static_cast<T>(ctx.pb.params.softcap * kLog2e));
    for (Index i = 0; i < n_scores; i += B::kPacket) {
      simd::store_aligned(
          st + i,
          simd::mul(cap, simd::tanh(simd::mul(simd::load_aligned<Packet>(st + i), inv_cap))));
    }
  }
}

// 3a. Adds attn_bias and ALiBi (BatchMask::score_bias, in log2 units) to the scores of
// every non-empty tile.
template <typename P>
void bias_tile(const TileContext<P>& ctx, const QueryTileState<typename P::Compute>& state,
               const TileKeys& keys, typename P::Compute* st) {
  using T = typename P::Compute;
  using B = FusedBlocking<T>;
  using Packet = simd::Packet<T>;
  if (ctx.mask.alibi_slopes != nullptr) {  // BatchMask::score_bias: slope * (j - pos(i))
    Packet slope[B::kLaneVectors], position[B::kLaneVectors];
    ATTNFORGE_UNROLL
    for (int v = 0; v < B::kLaneVectors; ++v) {
      slope[v] = simd::load_aligned<Packet>(state.alibi_slope.data() + v * B::kPacket);
      position[v] = simd::load_aligned<Packet>(state.alibi_position.data() + v * B::kPacket);
    }
    for (Index n = 0; n < keys.n_keys; ++n) {
      T* row = st + n * B::kLanes;
      const Packet key = simd::splat<Packet>(static_cast<T>(keys.n0 + n));
      ATTNFORGE_UNROLL
      for (int v = 0; v < B::kLaneVectors; ++v) {
        T* scores = row + v * B::kPacket;
        simd::store_aligned(scores, simd::fma(slope[v], simd::sub(key, position[v]),
                                              simd::load_aligned<Packet>(scores)));
      }
    }
  }
  if (!ctx.mask.attn_bias.has_value()) return;
  for (Index lane = 0; lane < B::kLanes; ++lane) {  // each lane's bias row is contiguous
    const float* bias = state.lane_bias[static_cast<std::size_t>(lane)];
    if (bias == nullptr) continue;
    for (Index n = 0; n < keys.n_keys; ++n) {
      st[n * B::kLanes + lane] += static_cast<T>(kLog2e * static_cast<double>(bias[keys.n0 + n]));
    }
  }
}

// 3b. Masks the scores of a partial tile with the mask policy's predicates. Lanes are
// position-major, so the positional rules leave each key row one contiguous lane
// interval; documents and attn_mask are checked inside it once per position (the lanes
// of a position are its heads, which share its document, and its attn_mask row unless
// the mask has a row per head: then lane by lane). A -inf attn_bias was added by
// bias_tile.
template <typename P>
void mask_tile(const TileContext<P>& ctx, const QueryTileState<typename P::Compute>& state,
               const TileKeys& keys, typename P::Compute* st) {
  using T = typename P::Compute;
  constexpr Index kLanes = FusedBlocking<T>::kLanes;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const BatchMask& mask = ctx.mask;
  const bool masked_elements = mask.q_docs.has_value() || mask.attn_mask.has_value();
  const Index lanes_alike = mask.attn_mask_per_head() ? 1 : ctx.geo.heads_per_tile;
  for (Index n = 0; n < keys.n_keys; ++n) {
    const Index j = keys.n0 + n;
    T* row = st + n * kLanes;
    const auto [p_lo, p_hi] = mask.rows_seeing(j, state.p0, ctx.geo.positions);
    const Index lane_lo = ctx.lane_at(p_lo, 0), lane_hi = ctx.lane_at(p_hi, 0);
    std::fill(row, row + lane_lo, kNegInf);
    std::fill(row + lane_hi, row + kLanes, kNegInf);
    if (!mask.padding_allows(j)) std::fill(row + lane_lo, row + lane_hi, kNegInf);
    if (!masked_elements) continue;
    for (Index lane = lane_lo; lane < lane_hi; lane += lanes_alike) {
      const auto at = static_cast<std::size_t>(lane);
      if (!mask.documents_allow(state.lane_docs[at], j) ||
          !BatchMask::elements_allow(state.lane_mask[at], nullptr, j)) {
        std::fill(row + lane, row + lane + lanes_alike, kNegInf);
      }
    }
  }
}

// 4. The online softmax of one key tile: statistics, the (rare) rescale of Ot, and the
// weights P in place of the scores, their exp2 of degree kDegree (simd::exp2).
template <typename T, int kDegree = simd::kExp2Degree<T>>
void softmax_tile(QueryTileState<T>& state, Index n_keys, Index head_dim, T* st) {
  using B = FusedBlocking<T>;
  using Packet = simd::Packet<T>;
  bool rescale = false;
  ATTNFORGE_UNROLL
  for (int v = 0; v < B::kLaneVectors; ++v) {
    const Index lane = v * B::kPacket;
    Packet tile_max = simd::splat<Packet>(-std::numeric_limits<T>::infinity());
    for (Index n = 0; n < n_keys; ++n)
      tile_max = simd::max(tile_max, simd::load_aligned<Packet>(st + n * B::kLanes + lane));
    SoftmaxStats<T, true> stats{simd::load_aligned<Packet>(state.row_ref.data() + lane),
                                simd::load_aligned<Packet>(state.row_sum.data() + lane)};
    Packet alpha = simd::splat<Packet>(T(1));
    rescale |= stats.observe(tile_max, alpha);
    simd::store_aligned(state.alpha.data() + lane, alpha);
    Packet sum = simd::zero<Packet>();
    const auto weight_of = stats.template weights<Packet, kDegree>();
    for (Index n = 0; n < n_keys; ++n) {
      T* p = st + n * B::kLanes + lane;
      const Packet weight = weight_of(simd::load_aligned<Packet>(p));
      simd::store_aligned(p, weight);
      sum = simd::add(sum, weight);
    }
    simd::store_aligned(state.row_ref.data() + lane, stats.ref);
    simd::store_aligned(state.row_sum.data() + lane, simd::add(stats.sum, sum));
  }
  if (!rescale) return;
  T* ot = state.out_tile.data();
  for (Index d = 0; d < head_dim; ++d) {
    ATTNFORGE_UNROLL
    for (int v = 0; v < B::kLaneVectors; ++v) {
      T* o = ot + d * B::kLanes + v * B::kPacket;
      simd::store_aligned(
          o, simd::mul(simd::load_aligned<Packet>(o),
                       simd::load_aligned<Packet>(state.alpha.data() + v * B::kPacket)));
    }
  }
}

// 5. Ot += V^T Pt.
template <typename P, typename F>
void accumulate_values(const TileContext<P>& ctx, QueryTileState<typename P::Compute>& state,
                       const KeyValueTile<typename P::Compute>& kv, const TileKeys& keys,
                       const typename P::Compute* st, std::uint32_t* weight_pairs) {
  using T = typename P::Compute;
  using B = FusedBlocking<T>;
  T* ot = state.out_tile.data();
  if constexpr (F::kBf16Dot) {
#if ATTNFORGE_BF16_DOT
    constexpr int kC = B::kLanes / 16;
    constexpr int kR = kC >= 4 ? 6 : 12;
    pair_rows_to_bf16(st, keys.n_keys, B::kLanes, weight_pairs);
    const std::uint32_t* value_pairs =
        kv.value_pairs + (keys.n0 - keys.tile_first) / 2 * ctx.head_dim;
    for_each_row_block<kR>(ctx.head_dim, [&](auto rows, Index d0) {
      pair_dot_block<decltype(rows)::value, kC, true>(
          reinterpret_cast<const std::uint16_t*>(value_pairs + d0), 2, 2 * ctx.head_dim,
          weight_pairs, (keys.n_keys + 1) / 2, ot + d0 * B::kLanes);
    });
#endif
  } else {
    (void)weight_pairs;
    const Index ldv = kv.value_stride;
    const T* v_tile = kv.values + (keys.n0 - keys.tile_first) * ldv;
    for_each_row_block<B::kRows>(ctx.head_dim, [&](auto rows, Index d0) {
      broadcast_product<T, decltype(rows)::value, true>(v_tile + d0, 1, ldv, st, keys.n_keys,
                                                        ot + d0 * B::kLanes);
    });
  }
}

// 2-5. One query tile against key tile kt (not empty). `scores` is the worker's St.
template <typename P, typename F>
void attend_key_tile(const TileContext<P>& ctx, Index kt, TileClass cls,
                     QueryTileState<typename P::Compute>& state, typename P::Compute* scores,
                     std::uint32_t* weight_pairs, const KeyValueTile<typename P::Compute>& kv) {
  // Only the keys some query of the tile may see (the rest would be masked anyway). The
  // bf16 dot products take keys in pairs counted from the tile's first key: an odd span
  // start moves one key back (that key is masked like any key outside the span).
  const KeySpan span = ctx.plan.key_span(ctx.batch, state.q_tile_index, kt);
  TileKeys keys{kt * ctx.geo.key_tile, span.first, 0};
  if constexpr (F::kBf16Dot) keys.n0 = keys.tile_first + (span.first - keys.tile_first) / 2 * 2;
  keys.n_keys = span.last - keys.n0;
  tile_scores<P, F>(ctx, state, kv, keys, scores);
  if constexpr (F::kBiased) bias_tile(ctx, state, keys, scores);
  if (cls == TileClass::kPartial) mask_tile(ctx, state, keys, scores);
  using T = typename P::Compute;
  constexpr int kDegree = F::kBf16Dot ? kBf16WeightExp2Degree : simd::kExp2Degree<T>;
  softmax_tile<T, kDegree>(state, keys.n_keys, ctx.head_dim, scores);
  accumulate_values<P, F>(ctx, state, kv, keys, scores, weight_pairs);
}

// 6. out = Ot^T * out_scale and lse of every lane (see finish_row).
template <typename P>
void finish_query_tile(const TileContext<P>& ctx, QueryTileState<typename P::Compute>& state,
                       EmptyRows& empty_rows, bool streaming) {
  using T = typename P::Compute;
  using Acc = acc_t<T>;
  constexpr Index kLanes = FusedBlocking<T>::kLanes;
  const P& pb = ctx.pb;
  typename P::Scalar* out_rows[kLanes];
  T out_scale[kLanes];
  for (Index lane = 0; lane < kLanes; ++lane) {
    Index h = 0, i = 0;
    out_rows[lane] = nullptr;
    out_scale[lane] = T(0);
    if (!ctx.lane_row(state, lane, h, i)) continue;
    out_rows[lane] = pb.out.row(ctx.batch, h, i);
    const RowEnd end =
        finish_row(state.row_ref[static_cast<std::size_t>(lane)],
                   state.row_sum[static_cast<std::size_t>(lane)], sink_log2(pb.params.sinks, h));
    out_scale[lane] = static_cast<T>(end.out_scale);
    if (pb.lse.has_value()) pb.lse(ctx.batch, h, i) = static_cast<Acc>(end.lse());
    if (end.empty) empty_rows.push_back({ctx.pb.batch_offset + ctx.batch, h, i});
  }
  unpack_transposed(state.out_tile.data(), ctx.head_dim, out_scale, out_rows, streaming);
}

// Loads (converts, pairs) key tile kt once for all the query tiles of a work item.
template <typename P, typename F>
KeyValueTile<typename P::Compute> load_key_tile(const TileContext<P>& ctx, Index kt,
                                                KernelScratch<typename P::Compute>& s) {
  KeyValueTile<typename P::Compute> kv;
  const P& pb = ctx.pb;
  const Index n0 = kt * ctx.geo.key_tile;
  const Index n_keys = std::min(ctx.geo.key_tile, ctx.kv_len - n0);
  if constexpr (F::kBf16Dot) {
    kv.key_bits = reinterpret_cast<const std::uint16_t*>(tile_rows<QInt8Role::kKey>(
        pb.k, ctx.batch, ctx.kv_head, n0, n_keys, s.bf16_keys, kv.key_stride));
    // Run by run: a tile starts at an even key and runs hold an even number of rows
    // (prepare_fused), so no pair of keys straddles two runs.
    for_each_run(pb.v, n0, n_keys, [&](Index offset, Index rows) {
      pair_value_rows(pb.v.row(ctx.batch, ctx.kv_head, n0 + offset), pb.v.stride(2), rows,
                      ctx.head_dim, s.value_pairs.data() + offset / 2 * ctx.head_dim);
    });
    kv.value_pairs = s.value_pairs.data();
  } else {
    kv.keys =
        tile_rows<QInt8Role::kKey>(pb.k, ctx.batch, ctx.kv_head, n0, n_keys, s.keys, kv.key_stride);
    kv.values = tile_rows<QInt8Role::kValue>(pb.v, ctx.batch, ctx.kv_head, n0, n_keys, s.values,
                                             kv.value_stride);
  }
  return kv;
}

// A work item: `count` consecutive query tiles of one (batch row, KV head group). Each
// K/V tile is loaded once for all of them while it is in cache.
template <typename P, typename F>
void process_query_tiles(const P& pb, const MaskPolicy& policy, const TilePlan& plan,
                         const TileGeometry& geo, const QueryTile& item,
                         KernelScratch<typename P::Compute>& s) {
  const Index n_rep = pb.q.dimension(1) / pb.k.dimension(1);
  const Index hpt = geo.heads_per_tile;
  const TileContext<P> ctx{pb,
                           plan,
                           geo,
                           policy.row(item.batch),
                           item.batch,
                           item.kv_head,
                           item.kv_head * n_rep + item.head_group * hpt,
                           std::min(hpt, n_rep - item.head_group * hpt),
                           pb.q.dimension(3),
                           pb.q.dimension(2),
                           pb.k.dimension(2)};
  const Index count = std::min(item.count, plan.q_tiles() - item.q_tile);
  Index kt_first = plan.key_tiles(), kt_last = 0;
  for (Index t = 0; t < count; ++t) {
    begin_query_tile<P, F>(ctx, item.q_tile + t, s.tiles[static_cast<std::size_t>(t)]);
    const auto [first, last] = plan.key_tile_range(item.batch, item.q_tile + t);
    if (first < last) kt_first = std::min(kt_first, first), kt_last = std::max(kt_last, last);
  }
  for (Index kt = kt_first; kt < kt_last; ++kt) {
    KeyValueTile<typename P::Compute> kv;
    bool loaded = false;
    for (Index t = 0; t < count; ++t) {
      const auto [first, last] = plan.key_tile_range(item.batch, item.q_tile + t);
      const TileClass cls = kt < first || kt >= last
                                ? TileClass::kEmpty
                                : plan.classify(item.batch, item.q_tile + t, kt);
      if (cls == TileClass::kEmpty) continue;
      if (!loaded) kv = load_key_tile<P, F>(ctx, kt, s), loaded = true;
      attend_key_tile<P, F>(ctx, kt, cls, s.tiles[static_cast<std::size_t>(t)], s.scores.data(),
                            s.weight_pairs.data(), kv);
    }
  }
  const bool streaming = streams_output(pb.out);
  for (Index t = 0; t < count; ++t)
    finish_query_tile(ctx, s.tiles[static_cast<std::size_t>(t)], s.empty_rows, streaming);
  if (streaming) simd::store_fence();
}

// The work items of a call over problems [0, n), ordered by cost (non-empty key tiles),
// most expensive first, so uneven causal/document work (and sequences of different
// lengths) balance across workers. Each item is computed the same way whichever worker
// takes it: the result does not depend on the thread count.
template <typename P>
void plan_work_items(KernelWorkspace<typename P::Compute>& ws, const TileGeometry& geo,
                     const P* problems, const MaskPolicy* policies, Index n) {
  ws.plans.resize(static_cast<std::size_t>(n));
  ws.items.clear();
  ws.item_cost.clear();
  const Index per_item = geo.q_tiles_per_item;
  for (Index p = 0; p < n; ++p) {
    TilePlan& plan = ws.plans[static_cast<std::size_t>(p)];
    plan.build(policies[p], geo.positions, geo.key_tile);
    for (Index b = 0; b < problems[p].q.dimension(0); ++b) {
      for (Index qt = 0; qt < plan.q_tiles(); qt += per_item) {
        Index cost = 0;
        for (Index t = qt; t < std::min(qt + per_item, plan.q_tiles()); ++t)
          cost += plan.active_key_tiles(b, t);
        for (Index kv_head = 0; kv_head < problems[p].k.dimension(1); ++kv_head) {
          for (Index group = 0; group < geo.head_groups; ++group) {
            ws.items.push_back({p, b, kv_head, group, qt, per_item});
            ws.item_cost.push_back(cost);
          }
        }
      }
    }
  }
  ws.order.resize(ws.items.size());
  for (std::size_t i = 0; i < ws.order.size(); ++i) ws.order[i] = static_cast<Index>(i);
  std::stable_sort(ws.order.begin(), ws.order.end(), [&](Index a, Index b) {
    return ws.item_cost[static_cast<std::size_t>(a)] > ws.item_cost[static_cast<std::size_t>(b)];
  });
}

// Whether problems of type P can take the bf16 dot-product kernel at all.
template <typename P>
inline constexpr bool kBf16DotStorage =
    std::is_same_v<typename P::Scalar, Eigen::bfloat16>&&
            std::is_same_v<typename P::KVScalar, Eigen::bfloat16>&& kHasBf16DotKernel&&
                FusedBlocking<typename P::Compute>::kLanes %
        16 ==
    0;

// How the fused kernel runs problems [0, n) of one call, which share head counts,
// head_dim, options and K/V layout (one problem, or the sequences of a ragged batch).
struct FusedRun {
  TileGeometry geo;
  bool bf16_dot;
  Index items;  // work items, run as fused_item(0 .. items - 1)
};

// Plans the work items and sizes the per-worker scratch.
template <typename P>
FusedRun prepare_fused(const P* problems, const MaskPolicy* policies, Index n, int workers,
                       KernelWorkspace<typename P::Compute>& ws, const KernelTuning& tuning) {
  using T = typename P::Compute;
  const P& pb = problems[0];
  const Index head_dim = pb.q.dimension(3);
  const TileGeometry geo = tile_geometry<T>(pb.q.dimension(1) / pb.k.dimension(1), tuning);
  plan_work_items(ws, geo, problems, policies, n);
  ws.workers.resize(static_cast<std::size_t>(workers));
  // Tiles that span runs are copied (or paired) run by run; the bf16 dot products pair
  // keys from even offsets, so they need tiles that start at even keys.
  const bool contiguous = tiles_contiguous(pb.k, geo.key_tile);
  const bool bf16_dot =
      kBf16DotStorage<P> && pb.params.bf16_dot && (contiguous || geo.key_tile % 2 == 0);
  const bool convert_kv = (!std::is_same_v<typename P::KVScalar, T> || !contiguous) && !bf16_dot;
  for (KernelScratch<T>& s : ws.workers) {
    s.reserve(head_dim, geo.key_tile, geo.q_tiles_per_item, convert_kv, bf16_dot,
              bf16_dot && !contiguous);
  }
  return {geo, bf16_dot, static_cast<Index>(ws.order.size())};
}

// Work item `index` (in cost order) of a prepared run, on the scratch of `worker`.
template <typename P, typename F>
void fused_item(const P* problems, const MaskPolicy* policies, const FusedRun& run,
                KernelWorkspace<typename P::Compute>& ws, int worker, Index index) {
  const QueryTile& item =
      ws.items[static_cast<std::size_t>(ws.order[static_cast<std::size_t>(index)])];
  if constexpr (!F::kBf16Dot || kBf16DotStorage<P>) {
    process_query_tiles<P, F>(problems[item.problem], policies[item.problem],
                              ws.plans[static_cast<std::size_t>(item.problem)], run.geo, item,
                              ws.workers[static_cast<std::size_t>(worker)]);
  }
}

// Runs the kernel over all query tiles of problems [0, n) on the caller's pool. Returns,
// through ws.workers[*].empty_rows, the rows that had no allowed key.
template <typename P>
void flash_attention_many(const P* problems, const MaskPolicy* policies, Index n,
                          const Eigen::ThreadPoolDevice* device,
                          KernelWorkspace<typename P::Compute>& ws,
                          const KernelTuning& tuning = {}) {
  const FusedRun run = prepare_fused(problems, policies, n, worker_count(device), ws, tuning);
  bool masked = false, biased = false;
  for (Index p = 0; p < n; ++p)
    masked |= policies[p].masks_elements(), biased |= policies[p].biases_scores();
  dispatch_features(
      [&](auto features) {
        using F = decltype(features);
        parallel_for_items(device, run.items, [&](int worker, Index item) {
          fused_item<P, F>(problems, policies, run, ws, worker, item);
        });
      },
      problems[0].params.softcap > 0.0, masked, biased, run.bf16_dot);
}

template <typename P>
void flash_attention(const P& pb, const MaskPolicy& policy, const Eigen::ThreadPoolDevice* device,
                     KernelWorkspace<typename P::Compute>& ws, const KernelTuning& tuning = {}) {
  flash_attention_many(&pb, &policy, 1, device, ws, tuning);
}

}  // namespace attnforge::detail
