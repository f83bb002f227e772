// PagedKVCache: the KV cache of a serving engine. A pool of fixed-size blocks holds the
// keys and values of many sequences; each sequence owns a block table (its positions in
// order, block_size per block) and a length. Sequences are added, appended to, truncated,
// forked (sharing blocks, copy-on-write) and freed independently, and a freed block is
// reused by the next sequence that needs one. See docs/design.md, "Ragged batches over a
// paged cache".
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

#include "attnforge/detail/free_blocks.hpp"
#include "attnforge/detail/huge_pages.hpp"
#include "attnforge/detail/paged_rows.hpp"
#include "attnforge/detail/simd.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/qint8.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge {

// A sequence's handle in a PagedKVCache. Handles are never reused within one cache.
using SeqId = std::int64_t;

// The new tokens of several sequences packed one after the other, as
// flash_attn_varlen_func's cu_seqlens: sequence seqs[s] owns the packed tokens
// [cu_seqlens[s], cu_seqlens[s + 1]), with cu_seqlens[0] = 0.
struct RaggedBatch {
  std::vector<SeqId> seqs;
  std::vector<Index> cu_seqlens;

  Index size() const { return static_cast<Index>(seqs.size()); }
  Index total_tokens() const { return cu_seqlens.empty() ? 0 : cu_seqlens.back(); }
  Index new_tokens(Index s) const {
    return cu_seqlens[static_cast<std::size_t>(s) + 1] - cu_seqlens[static_cast<std::size_t>(s)];
  }
  Index first_token(Index s) const { return cu_seqlens[static_cast<std::size_t>(s)]; }
};

// T is the storage type: float (or double), or bf16/fp16/QInt8 under float activations
// (the appended keys and values are then rounded or quantized, as in KVCache).
template <typename T>
class PagedKVCache {
 public:
  // The pool holds n_blocks blocks of block_size positions, each with Hkv x block_size x D
  // keys and as many values (and, with record_doc_ids, the document id of each position).
  // block_size must be a multiple of 16, so the decode kernel's blocks of keys never
  // straddle two pool blocks, nor two runs of keys (detail::paged_run_rows).
  PagedKVCache(Index n_blocks, Index block_size, Index n_kv_heads, Index head_dim,
               bool record_doc_ids = false)
      : pool_(checked_dims(n_blocks, block_size, n_kv_heads, head_dim)),
        head_dim_(head_dim),
        refs_(static_cast<std::size_t>(n_blocks), 0),
        free_(n_blocks) {
    // Before the first touch, which decides the pages.
    detail::advise_huge_pages(pool_.data(), static_cast<std::size_t>(pool_.size()) * sizeof(T));
    pool_.setZero();
    if (record_doc_ids) {
      doc_ids_ = Tensor<DocId, 2>(n_blocks, block_size);
      doc_ids_.setZero();
    }
  }

  Index n_blocks() const { return pool_.dimension(0); }
  Index n_kv_heads() const { return pool_.dimension(1); }
  Index block_size() const { return pool_.dimension(2) / 2; }
  Index head_dim() const { return head_dim_; }
  bool records_doc_ids() const { return doc_ids_.size() > 0; }
  Index free_blocks() const { return free_.count(); }
  Index blocks_in_use() const { return n_blocks() - free_blocks(); }
  // Blocks the sequences would hold if none were shared (the memory sharing saves).
  Index blocks_without_sharing() const {
    Index n = 0;
    for (const auto& entry : seqs_) n += static_cast<Index>(entry.second.table.size());
    return n;
  }
  Index n_sequences() const { return static_cast<Index>(seqs_.size()); }
  std::vector<SeqId> sequences() const {
    std::vector<SeqId> ids;
    for (const auto& entry : seqs_) ids.push_back(entry.first);
    return ids;
  }
  bool contains(SeqId id) const { return seqs_.count(id) > 0; }
  Index seq_len(SeqId id) const { return sequence("PagedKVCache::seq_len", id).len; }
  // The pool blocks holding the sequence's positions, in order.
  const std::vector<Index>& block_table(SeqId id) const& {
    return sequence("PagedKVCache::block_table", id).table;
  }
  const std::vector<Index>& block_table(SeqId id) const&& = delete;
  // How many sequences hold pool block `block` (0 = free).
  Index block_refs(Index block) const {
    if (block < 0 || block >= n_blocks()) {
      detail::throw_invalid_argument("PagedKVCache::block_refs: block ", block, " is outside [0, ",
                                     n_blocks(), ")");
    }
    return refs_[static_cast<std::size_t>(block)];
  }

  // A new, empty sequence (it holds no block until something is appended).
  SeqId add_sequence() {
    seqs_[next_id_] = Sequence{};
    return next_id_++;
  }

  // The sequence's blocks return to the pool (those it shares stay with the others).
  void free_sequence(SeqId id) {
    Sequence& seq = sequence("PagedKVCache::free_sequence", id);
    release_blocks(seq.table, 0);
    seqs_.erase(id);
  }

  // A new sequence with the parent's positions, sharing all its blocks; the first append
  // to either one into a shared, partially filled block copies that block first.
  SeqId fork(SeqId parent) {
    const Sequence copy = sequence("PagedKVCache::fork", parent);
    for (Index block : copy.table) ++refs_[static_cast<std::size_t>(block)];
    seqs_[next_id_] = copy;
    return next_id_++;
  }

  // Keeps positions [0, new_len) of the sequence (speculative decoding rejects the rest);
  // blocks no longer needed return to the pool.
  void truncate(SeqId id, Index new_len) {
    Sequence& seq = sequence("PagedKVCache::truncate", id);
    if (new_len < 0 || new_len > seq.len) {
      detail::throw_invalid_argument("PagedKVCache::truncate: new_len ", new_len,
                                     " is outside [0, ", seq.len, "] (sequence ", id, "'s length)");
    }
    const std::size_t keep = static_cast<std::size_t>(blocks_for(new_len));
    release_blocks(seq.table, keep);
    seq.table.resize(keep);
    seq.len = new_len;
  }

  // Appends k_new, v_new (Hkv, n, D) at positions [seq_len, seq_len + n) of sequence id
  // (and doc_ids_new (1, n) for a cache that records document ids). Throws std::length_error,
  // changing nothing, when the pool lacks the blocks.
  template <typename S>
  void append(SeqId id, const ConstView<S, 3>& k_new, const ConstView<S, 3>& v_new,
              const DocIdView& doc_ids_new = {}) {
    const RaggedBatch one{{id}, {0, k_new.dimension(1)}};
    append(one, k_new, v_new, doc_ids_new);
  }

  // Appends the packed new tokens of several sequences: k_new, v_new (Hkv, total, D) and,
  // for a cache that records them, doc_ids_new (1, total), split by batch.cu_seqlens. Every
  // check (shapes, distinct known sequences, enough free blocks) runs before the first
  // write, so a rejected call changes nothing.
  template <typename S>
  void append(const RaggedBatch& batch, const ConstView<S, 3>& k_new, const ConstView<S, 3>& v_new,
              const DocIdView& doc_ids_new = {}) {
    static_assert((std::is_same_v<S, T> && !detail::is_qint8_v<T>) ||
                      (std::is_same_v<S, float> && detail::is_reduced_storage_v<T>),
                  "PagedKVCache::append takes keys of the storage type, or float for a "
                  "bf16/fp16/QInt8 cache");
    check_append(batch, k_new, v_new, doc_ids_new);
    for (Index s = 0; s < batch.size(); ++s) {
      Sequence& seq = seqs_.at(batch.seqs[static_cast<std::size_t>(s)]);
      make_room(seq, batch.new_tokens(s));
      for (Index t = 0; t < batch.new_tokens(s); ++t) {
        write_position(seq, k_new, v_new, doc_ids_new, batch.first_token(s) + t);
      }
    }
  }

  // Checks a ragged batch against this cache: known, distinct sequences and well-formed
  // cu_seqlens. `where` names the caller in the message.
  void check_batch(const char* where, const RaggedBatch& batch) const {
    const std::size_t n = batch.seqs.size();
    if (batch.cu_seqlens.size() != n + 1 || batch.cu_seqlens.front() != 0) {
      detail::throw_invalid_argument(where, ": cu_seqlens has ", batch.cu_seqlens.size(),
                                     " entries for ", n,
                                     " sequences; expected n + 1 offsets starting at 0");
    }
    for (std::size_t s = 0; s < n; ++s) {
      if (batch.cu_seqlens[s + 1] < batch.cu_seqlens[s]) {
        detail::throw_invalid_argument(where, ": cu_seqlens decreases at entry ", s + 1, " (",
                                       batch.cu_seqlens[s], " then ", batch.cu_seqlens[s + 1], ")");
      }
      sequence(where, batch.seqs[s]);
      for (std::size_t t = 0; t < s; ++t) {
        if (batch.seqs[t] == batch.seqs[s]) {
          detail::throw_invalid_argument(where, ": sequence ", batch.seqs[s],
                                         " appears twice in the batch");
        }
      }
    }
  }

  // The kernels' view of a sequence's keys / values: (1, Hkv, seq_len, D) through its
  // block table. Valid until the sequence is next changed.
  detail::PagedRows<const T> keys(SeqId id) const& { return rows(kKeys, id); }
  detail::PagedRows<const T> values(SeqId id) const& { return rows(kValues, id); }
  detail::PagedRows<const T> keys(SeqId id) const&& = delete;
  detail::PagedRows<const T> values(SeqId id) const&& = delete;

  // Copies of a sequence's keys / values (Hkv, seq_len, D) and document ids (seq_len):
  // for tests and for the reference path. (For QInt8, the pool's bytes: (Hkv, seq_len
  // rounded up to whole tiles, qint8_row_bytes(D)), the tiles of qint8.hpp.)
  Tensor<T, 3> gather_keys(SeqId id) const { return gather(kKeys, id); }
  Tensor<T, 3> gather_values(SeqId id) const { return gather(kValues, id); }
  Tensor<DocId, 1> gather_doc_ids(SeqId id) const {
    const Sequence& seq = sequence("PagedKVCache::gather_doc_ids", id);
    if (!records_doc_ids()) {
      detail::throw_invalid_argument(
          "PagedKVCache::gather_doc_ids: this cache does not record "
          "document ids (construct it with record_doc_ids = true)");
    }
    Tensor<DocId, 1> ids(seq.len);
    for (Index p = 0; p < seq.len; ++p) ids(p) = doc_ids_(block_of(seq, p), p % block_size());
    return ids;
  }

 private:
  // A head's keys or its values (the first run of values follows the first run of keys).
  enum Half : Index { kKeys = 0, kValues = 1 };

  struct Sequence {
    std::vector<Index> table;
    Index len = 0;
  };

  Index blocks_for(Index len) const { return (len + block_size() - 1) / block_size(); }
  Index block_of(const Sequence& seq, Index pos) const {
    return seq.table[static_cast<std::size_t>(pos / block_size())];
  }

  const Sequence& sequence(const char* where, SeqId id) const {
    const auto it = seqs_.find(id);
    if (it == seqs_.end()) {
      detail::throw_invalid_argument(where, ": no sequence ", id, " in this cache (", seqs_.size(),
                                     " live sequences)");
    }
    return it->second;
  }
  Sequence& sequence(const char* where, SeqId id) {
    return const_cast<Sequence&>(std::as_const(*this).sequence(where, id));
  }

  // Blocks appending entry s of the batch takes from the pool: the new blocks, plus a copy
  // of a shared, partially filled last block. Every earlier entry that copied the same
  // block left it one holder fewer (make_room runs in batch order), so when all its
  // holders append in one batch the last of them writes in place and copies nothing.
  Index blocks_to_append(const RaggedBatch& batch, Index s) const {
    const Sequence& seq = seqs_.at(batch.seqs[static_cast<std::size_t>(s)]);
    const Index n = batch.new_tokens(s);
    if (n == 0) return 0;
    const Index new_blocks = blocks_for(seq.len + n) - static_cast<Index>(seq.table.size());
    if (seq.len % block_size() == 0) return new_blocks;
    const Index last = seq.table.back();
    Index holders = refs_[static_cast<std::size_t>(last)];
    for (Index t = 0; t < s && holders > 1; ++t) {
      const Sequence& other = seqs_.at(batch.seqs[static_cast<std::size_t>(t)]);
      if (batch.new_tokens(t) > 0 && other.len % block_size() != 0 && other.table.back() == last)
        --holders;
    }
    return new_blocks + (holders > 1 ? 1 : 0);
  }

  template <typename S>
  void check_append(const RaggedBatch& batch, const ConstView<S, 3>& k_new,
                    const ConstView<S, 3>& v_new, const DocIdView& doc_ids_new) const {
    constexpr const char* kWhere = "PagedKVCache::append";
    check_batch(kWhere, batch);
    const std::array<Index, 3> expected{n_kv_heads(), batch.total_tokens(), head_dim()};
    detail::check_shape(kWhere, "k_new", k_new, expected, "(n_kv_heads, total_tokens, head_dim)");
    detail::check_shape(kWhere, "v_new", v_new, expected, "(n_kv_heads, total_tokens, head_dim)");
    if (k_new.stride(2) != 1 || v_new.stride(2) != 1) {
      detail::throw_invalid_argument(kWhere, ": k_new and v_new need a contiguous last dimension");
    }
    // Zero new tokens need no ids: their (1, 0) tensor has no data, so it reads as absent.
    const bool ids_missing =
        records_doc_ids() && !doc_ids_new.has_value() && batch.total_tokens() > 0;
    if (ids_missing || (!records_doc_ids() && doc_ids_new.has_value())) {
      detail::throw_invalid_argument(kWhere,
                                     records_doc_ids()
                                         ? ": this cache records document ids; pass doc_ids_new"
                                         : ": doc_ids_new given, but this cache does not record "
                                           "document ids (construct it with record_doc_ids = true)",
                                     " (total_tokens ", batch.total_tokens(), ")");
    }
    if (doc_ids_new.has_value()) {
      detail::check_shape(kWhere, "doc_ids_new", doc_ids_new, {1, batch.total_tokens()},
                          "(1, total_tokens)");
    }
    Index needed = 0;
    for (Index s = 0; s < batch.size(); ++s) needed += blocks_to_append(batch, s);
    if (needed > free_blocks()) {
      std::ostringstream os;
      os << kWhere << ": out of blocks: appending " << batch.total_tokens() << " positions to "
         << batch.size() << " sequences needs " << needed << " blocks of " << block_size()
         << " positions, " << free_blocks() << " of " << n_blocks() << " are free";
      throw std::length_error(os.str());
    }
  }

  // A free block for a sequence whose last block is `after` (-1: none), placed by FreeBlocks
  // next to it where possible.
  Index take_block(Index after) {
    const Index block = free_.take(after);
    refs_[static_cast<std::size_t>(block)] = 1;
    return block;
  }

  // Drops this holder's reference to table[keep...]; blocks nobody holds return to the pool.
  void release_blocks(const std::vector<Index>& table, std::size_t keep) {
    for (std::size_t i = table.size(); i-- > keep;) {
      Index& refs = refs_[static_cast<std::size_t>(table[i])];
      if (--refs == 0) free_.release(table[i]);
    }
  }

  // Gives the sequence the blocks n more positions need: a private copy of a shared,
  // partially filled last block (copy-on-write), then fresh blocks.
  void make_room(Sequence& seq, Index n) {
    if (n == 0) return;
    if (seq.len % block_size() != 0 && refs_[static_cast<std::size_t>(seq.table.back())] > 1) {
      const Index shared = seq.table.back();
      const Index copy = take_block(seq.table.size() >= 2 ? seq.table[seq.table.size() - 2] : -1);
      --refs_[static_cast<std::size_t>(shared)];
      copy_block(shared, copy);
      seq.table.back() = copy;
    }
    while (static_cast<Index>(seq.table.size()) < blocks_for(seq.len + n))
      seq.table.push_back(take_block(seq.table.empty() ? -1 : seq.table.back()));
  }

  void copy_block(Index from, Index to) {
    const auto chunk = static_cast<std::size_t>(pool_.size() / n_blocks());
    std::copy_n(&pool_(from, 0, 0, 0), chunk, &pool_(to, 0, 0, 0));
    if (records_doc_ids())
      std::copy_n(&doc_ids_(from, 0), static_cast<std::size_t>(block_size()), &doc_ids_(to, 0));
  }

  // Writes packed token t of the inputs at position seq.len, which make_room provided.
  template <typename S>
  void write_position(Sequence& seq, const ConstView<S, 3>& k_new, const ConstView<S, 3>& v_new,
                      const DocIdView& doc_ids_new, Index t) {
    const Index block = block_of(seq, seq.len), slot = seq.len % block_size();
    const detail::PagedRows<T> keys = rows_in(pool_.data(), kKeys, seq);
    const detail::PagedRows<T> values = rows_in(pool_.data(), kValues, seq);
    for (Index h = 0; h < n_kv_heads(); ++h) {
      // Position seq.len of the run that starts at its tile (runs are whole tiles).
      const Index tile = seq.len - seq.len % detail::kQInt8Tile, at = seq.len - tile;
      detail::store_position<detail::QInt8Role::kKey>(k_new.row(h, t), head_dim(),
                                                      keys.row(0, h, tile), at);
      detail::store_position<detail::QInt8Role::kValue>(v_new.row(h, t), head_dim(),
                                                        values.row(0, h, tile), at);
    }
    if (doc_ids_new.has_value())
      doc_ids_new.visit([&](const auto& ids) { doc_ids_(block, slot) = ids(0, t); });
    ++seq.len;
  }

  // The sequence's keys or values in the pool at `pool` (pool_.data(), const or not).
  template <typename Stored>
  detail::PagedRows<Stored> rows_in(Stored* pool, Half half, const Sequence& seq) const {
    const Index run = detail::paged_run_rows<T>(block_size());
    return {pool + half * run * pool_.dimension(3),
            seq.table.data(),
            block_size(),
            run,
            n_kv_heads(),
            head_dim(),
            seq.len};
  }
  detail::PagedRows<const T> rows(Half half, SeqId id) const {
    return rows_in(pool_.data(), half, sequence("PagedKVCache::keys/values", id));
  }

  Tensor<T, 3> gather(Half half, SeqId id) const {
    const detail::PagedRows<const T> src = rows(half, id);
    const Index width = pool_.dimension(3), len = src.dimension(2);
    // QInt8: whole tiles (the last one's block holds them), read as the pool's are.
    const Index positions = detail::is_qint8_v<T> ? detail::qint8_whole_tiles(len) : len;
    Tensor<T, 3> out(n_kv_heads(), positions, width);
    for (Index h = 0; h < n_kv_heads(); ++h) {
      for (Index p = 0; p < positions; ++p)
        std::copy_n(src.row(0, h, p), static_cast<std::size_t>(width), &out(h, p, 0));
    }
    return out;
  }

  static std::array<Index, 4> checked_dims(Index n_blocks, Index block_size, Index n_kv_heads,
                                           Index head_dim) {
    if (n_blocks <= 0 || block_size <= 0 || n_kv_heads <= 0 || head_dim <= 0 ||
        block_size % 16 != 0) {
      detail::throw_invalid_argument(
          "PagedKVCache: n_blocks, n_kv_heads and head_dim must be positive and block_size a "
          "positive multiple of 16, got n_blocks ",
          n_blocks, ", block_size ", block_size, ", n_kv_heads ", n_kv_heads, ", head_dim ",
          head_dim);
    }
    if constexpr (detail::is_qint8_v<T>) detail::check_qint8_head_dim("PagedKVCache", head_dim);
    return {n_blocks, n_kv_heads, 2 * block_size, detail::stored_row_width<T>(head_dim)};
  }

  // (n_blocks, Hkv, 2 x block_size, D), the last dimension wider for QInt8 (stored rows):
  // per block and head its block_size keys and as many values, in turns of
  // detail::paged_run_rows rows each (PagedRows).
  Tensor<T, 4> pool_;
  Index head_dim_;
  Tensor<DocId, 2> doc_ids_;  // (n_blocks, block_size) with record_doc_ids, else empty
  std::vector<Index> refs_;   // per block: sequences holding it
  detail::FreeBlocks free_;   // blocks with refs 0
  std::map<SeqId, Sequence> seqs_;
  SeqId next_id_ = 0;
};

}  // namespace attnforge
