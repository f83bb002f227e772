// This rank's two query chunks of the ring prefill: each attends to the chunks of a
// visiting K/V block pair by pair and folds the partial into its running result.
#pragma once

#include <array>
#include <utility>

#include "attnforge/mpi/lse_merge.hpp"
#include "attnforge/mpi/ring_block.hpp"
#include "attnforge/mpi/zigzag.hpp"
#include "attnforge/sdpa.hpp"

namespace attnforge::mpi::detail {

// A chunk's place: its number in 0..2P-1, its global positions, its offset in the shard.
struct ShardChunk {
  int chunk = 0;
  ChunkRange global;
  Index offset = 0;
};

inline std::array<ShardChunk, 2> shard_chunks(Index seq_len, int ranks, int rank) {
  const auto ids = zigzag_chunks_of(ranks, rank);
  const ChunkRange first = zigzag_chunk(seq_len, ranks, ids[0]);
  const ChunkRange second = zigzag_chunk(seq_len, ranks, ids[1]);
  return {ShardChunk{ids[0], first, 0}, ShardChunk{ids[1], second, first.size()}};
}

template <typename T>
class LocalQueries {
 public:
  LocalQueries(const Tensor<T, 4>& q, const RingMasks& masks, Index seq_len, int ranks, int rank)
      : seq_len_(seq_len), ranks_(ranks), chunks_(shard_chunks(seq_len, ranks, rank)) {
    for (int c = 0; c < 2; ++c) {
      const ShardChunk& sc = chunks_[c];
      q_[c] = slice_seq(q, sc.offset, sc.global.size());
      if (masks.doc_ids.size() != 0) doc_ids_[c] = slice_seq(masks.doc_ids, sc.offset, sc.global.size());
      acc_[c] = empty_partial<T>(q.dimension(0), q.dimension(1), sc.global.size(), q.dimension(3));
    }
  }

  // Attends both query chunks to both key chunks of `block`, in a fixed order.
  void attend(const RingBlock<T>& block, const SdpaOptions& options, RingStats& stats) {
    SdpaOptions off_diagonal = options;
    off_diagonal.causal = false;
    off_diagonal.window = 0;
    off_diagonal.sinks.clear();  // the diagonal pair adds each row's sink exactly once
    const auto key_chunks = shard_chunks(seq_len_, ranks_, block.owner);
    for (int qc = 0; qc < 2; ++qc) {
      for (const ShardChunk& kc : key_chunks) {
        const PairKind kind = classify_pair(chunks_[qc].global, kc.global, chunks_[qc].chunk,
                                            kc.chunk, options);
        if (kind == PairKind::kSkip || !docs_meet(qc, block, kc)) {
          ++stats.pairs_skipped;
          continue;
        }
        attend_pair(qc, block, kc, kind, kind == PairKind::kDiagonal ? options : off_diagonal,
                    options.window);
        ++stats.pairs_computed;
      }
    }
  }

  // (out, lse) of the shard, in shard order.
  SdpaResult<T> result() const {
    Tensor<acc_t<T>, 3> lse(acc_[0].lse.dimension(0), acc_[0].lse.dimension(1),
                            acc_[0].lse.dimension(2) + acc_[1].lse.dimension(2));
    for (Index b = 0; b < lse.dimension(0); ++b) {
      for (Index h = 0; h < lse.dimension(1); ++h) {
        for (Index i = 0; i < lse.dimension(2); ++i) {
          const bool first = i < acc_[0].lse.dimension(2);
          lse(b, h, i) = first ? acc_[0].lse(b, h, i) : acc_[1].lse(b, h, i - acc_[0].lse.dimension(2));
        }
      }
    }
    return {concat_seq(acc_[0].out, acc_[1].out), lse};
  }

 private:
  bool docs_meet(int qc, const RingBlock<T>& block, const ShardChunk& kc) const {
    if (doc_ids_[qc].size() == 0) return true;
    const ChunkRange q_cols{0, chunks_[qc].global.size()};
    const ChunkRange k_cols{kc.offset, kc.offset + kc.global.size()};
    return doc_ranges_meet(doc_ids_[qc], q_cols, block.doc_ids, k_cols);
  }

  void attend_pair(int qc, const RingBlock<T>& block, const ShardChunk& kc, PairKind kind,
                   const SdpaOptions& options, Index window) {
    const Index len = kc.global.size();
    const Tensor<T, 4> k = slice_seq(block.k, kc.offset, len);
    const Tensor<T, 4> v = slice_seq(block.v, kc.offset, len);
    Tensor<std::int64_t, 2> kv_doc_ids;
    Tensor<std::uint8_t, 2> padding;
    Tensor<std::uint8_t, 4> window_mask;
    Masks masks;
    if (block.doc_ids.size() != 0) {
      kv_doc_ids = slice_seq(block.doc_ids, kc.offset, len);
      masks.doc_ids = doc_ids_[qc];
      masks.kv_doc_ids = kv_doc_ids;
    }
    if (block.key_padding_mask.size() != 0) {
      padding = slice_seq(block.key_padding_mask, kc.offset, len);
      masks.key_padding_mask = padding;
    }
    if (kind == PairKind::kMasked) {
      window_mask = window_pair_mask(chunks_[qc].global, kc.global, window);
      masks.attn_mask = window_mask;
    }
    const SdpaResult<T> part = scaled_dot_product_attention_with_lse(q_[qc], k, v, options, masks);
    merge_partial(acc_[qc], part);
  }

  Index seq_len_;
  int ranks_;
  std::array<ShardChunk, 2> chunks_;
  std::array<Tensor<T, 4>, 2> q_;
  std::array<Tensor<std::int64_t, 2>, 2> doc_ids_;
  std::array<SdpaResult<T>, 2> acc_;
};

}  // namespace attnforge::mpi::detail
