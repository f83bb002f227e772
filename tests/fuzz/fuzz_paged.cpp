// The fuzz target's PagedKVCache scenario against a shadow model (fuzz_attention.cpp
// describes it).
#include "fuzz_harness.hpp"

namespace fuzz {

// ---------------------------------------------------------------------------------------
// PagedKVCache and PagedAttention against a shadow model.

// One position of a sequence as the shadow holds it: the keys and values of every KV head
// ((Hkv, D) row-major; as the cache holds them, read as float) and its document id.
struct PagedRow {
  std::vector<float> k, v;
  af::DocId doc = 0;
};

// What a PagedKVCache must hold, derived from the documented semantics alone: each
// sequence's rows, and the pool blocks it holds under the shadow's own block names (never
// the library's), so that sharing by fork and copy-on-write are modelled independently and
// the library's tables can be compared with them up to renaming.
class PagedShadow {
 public:
  struct Seq {
    std::vector<PagedRow> rows;
    std::vector<int> blocks;  // shadow block names, one per block_size positions
  };

  PagedShadow(Index n_blocks, Index block_size) : n_blocks_(n_blocks), block_size_(block_size) {}

  Index block_size() const { return block_size_; }
  Index blocks_for(Index len) const { return (len + block_size_ - 1) / block_size_; }
  bool contains(af::SeqId id) const { return seqs_.count(id) > 0; }
  const std::map<af::SeqId, Seq>& seqs() const { return seqs_; }
  const Seq& seq(af::SeqId id) const { return seqs_.at(id); }
  Index len(af::SeqId id) const {
    return contains(id) ? static_cast<Index>(seqs_.at(id).rows.size()) : 0;
  }
  Index refs(int block) const { return refs_[static_cast<std::size_t>(block)]; }
  std::vector<af::SeqId> ids() const {
    std::vector<af::SeqId> out;
    for (const auto& entry : seqs_) out.push_back(entry.first);
    return out;
  }
  Index blocks_in_use() const {
    return static_cast<Index>(
        std::count_if(refs_.begin(), refs_.end(), [](Index r) { return r > 0; }));
  }
  Index free_blocks() const { return n_blocks_ - blocks_in_use(); }

  void add(af::SeqId id) { seqs_[id] = Seq{}; }
  void fork(af::SeqId parent, af::SeqId child) {
    seqs_[child] = seqs_.at(parent);
    for (int b : seqs_.at(child).blocks) ++refs_[static_cast<std::size_t>(b)];
  }
  void truncate(af::SeqId id, Index new_len) {
    Seq& s = seqs_.at(id);
    release(s, static_cast<std::size_t>(blocks_for(new_len)));
    s.rows.resize(static_cast<std::size_t>(new_len));
  }
  void free_sequence(af::SeqId id) {
    release(seqs_.at(id), 0);
    seqs_.erase(id);
  }

  // The blocks a valid append of n[s] positions to each of ids[s] (distinct, in batch
  // order) takes from the pool, counted on a copy of the sharing state: a holder of a
  // shared, partially filled last block copies it first, which leaves one holder fewer,
  // so when every holder appends in one batch the last one writes in place.
  Index blocks_needed(const std::vector<af::SeqId>& ids, const std::vector<Index>& n) const {
    std::vector<Index> refs = refs_;
    Index taken = 0;
    for (std::size_t s = 0; s < ids.size(); ++s) {
      std::vector<int> blocks = seqs_.at(ids[s]).blocks;
      taken += make_room(blocks, len(ids[s]), n[s], refs);
    }
    return taken;
  }
  void append(af::SeqId id, std::vector<PagedRow> rows) {
    Seq& s = seqs_.at(id);
    make_room(s.blocks, static_cast<Index>(s.rows.size()), static_cast<Index>(rows.size()), refs_);
    for (PagedRow& r : rows) s.rows.push_back(std::move(r));
  }

 private:
  // paged_kv_cache.hpp's rule for making room for n more positions after len: a private
  // copy of a shared, partially filled last block, then fresh blocks. Returns the number
  // of blocks taken.
  Index make_room(std::vector<int>& blocks, Index len, Index n, std::vector<Index>& refs) const {
    if (n == 0) return 0;
    Index taken = 0;
    const auto take = [&] {
      refs.push_back(1);
      ++taken;
      return static_cast<int>(refs.size()) - 1;
    };
    if (len % block_size_ != 0 && refs[static_cast<std::size_t>(blocks.back())] > 1) {
      --refs[static_cast<std::size_t>(blocks.back())];
      blocks.back() = take();
    }
    while (static_cast<Index>(blocks.size()) < blocks_for(len + n)) blocks.push_back(take());
    return taken;
  }
  void release(Seq& s, std::size_t keep) {
    for (std::size_t i = keep; i < s.blocks.size(); ++i)
      --refs_[static_cast<std::size_t>(s.blocks[i])];
    s.blocks.resize(std::min(keep, s.blocks.size()));
  }

  Index n_blocks_, block_size_;
  std::map<af::SeqId, Seq> seqs_;
  std::vector<Index> refs_;  // per shadow block name: sequences holding it (0: back in the pool)
};

// Everything observable of a pool: a rejected call must leave all of it as it was.
template <typename S>
struct PagedSnapshot {
  explicit PagedSnapshot(const af::PagedKVCache<S>& cache) : free(cache.free_blocks()) {
    for (Index b = 0; b < cache.n_blocks(); ++b) refs.push_back(cache.block_refs(b));
    for (af::SeqId id : cache.sequences()) {
      ids.push_back(id);
      tables.push_back(cache.block_table(id));
      keys.push_back(cache.gather_keys(id));
      values.push_back(cache.gather_values(id));
      if (cache.records_doc_ids()) docs.push_back(cache.gather_doc_ids(id));
    }
  }
  bool operator==(const PagedSnapshot& o) const {
    if (free != o.free || refs != o.refs || ids != o.ids || tables != o.tables) return false;
    for (std::size_t s = 0; s < keys.size(); ++s) {
      if (!af::test::bitwise_equal(keys[s], o.keys[s]) ||
          !af::test::bitwise_equal(values[s], o.values[s])) {
        return false;
      }
    }
    for (std::size_t s = 0; s < docs.size(); ++s) {
      if (!af::test::bitwise_equal(docs[s], o.docs[s])) return false;
    }
    return true;
  }
  Index free;
  std::vector<Index> refs;
  std::vector<af::SeqId> ids;
  std::vector<std::vector<Index>> tables;
  // The stored bytes (for QInt8 the tiles, whole: gather_keys rounds len up to them).
  std::vector<af::Tensor<S, 3>> keys, values;
  std::vector<af::Tensor<af::DocId, 1>> docs;
};

// The positions gather_keys / gather_values return for a sequence of len positions: len,
// rounded up to whole tiles for QInt8 (qint8.hpp), whose bytes they copy.
template <typename S>
Index gathered_positions(Index len) {
  if constexpr (af::detail::is_qint8_v<S>) {
    return (len + af::detail::kQInt8Tile - 1) / af::detail::kQInt8Tile * af::detail::kQInt8Tile;
  } else {
    return len;
  }
}

// A sequence's gathered keys or values t (Hkv, gathered_positions(len), stored row width)
// as a (1, Hkv, len, head_dim) view of a cache's rows, to read with load_position.
template <typename S>
af::ConstView<S, 4> gathered_view(const af::Tensor<S, 3>& t, Index len, Index head_dim) {
  const Index n_kv_heads = t.dimension(0), positions = t.dimension(1), width = t.dimension(2);
  return af::detail::cache_view<const S, 4>(
      t.data(), {1, n_kv_heads, len, head_dim},
      {n_kv_heads * positions * width, positions * width, width, 1});
}

// The cache against the shadow: the same sequences with the same rows; block tables that
// share exactly where the shadow's do (a renaming of its blocks), refs that count the
// holders, and every block either held or free.
template <typename S>
void check_paged_pool(const af::PagedKVCache<S>& cache, const PagedShadow& shadow) {
  const Index n_blocks = cache.n_blocks(), n_kv_heads = cache.n_kv_heads(),
              head_dim = cache.head_dim();
  check(cache.sequences() == shadow.ids(), "PagedKVCache: live sequences differ from the shadow");
  std::map<Index, int> to_shadow;
  std::map<int, Index> to_library;
  std::vector<Index> holders(static_cast<std::size_t>(n_blocks), 0);
  Index without_sharing = 0;
  for (const auto& [id, seq] : shadow.seqs()) {
    const Index len = static_cast<Index>(seq.rows.size());
    check(cache.seq_len(id) == len, "PagedKVCache: seq_len differs from the shadow");
    const std::vector<Index>& table = cache.block_table(id);
    check(static_cast<Index>(table.size()) == shadow.blocks_for(len) &&
              table.size() == seq.blocks.size(),
          "PagedKVCache: a block table's length is not ceil(seq_len / block_size)");
    without_sharing += static_cast<Index>(table.size());
    for (std::size_t i = 0; i < table.size(); ++i) {
      const Index block = table[i];
      check(block >= 0 && block < n_blocks, "PagedKVCache: a block table names no pool block");
      ++holders[static_cast<std::size_t>(block)];
      const auto a = to_shadow.emplace(block, seq.blocks[i]);
      const auto b = to_library.emplace(seq.blocks[i], block);
      check(a.first->second == seq.blocks[i] && b.first->second == block,
            "PagedKVCache: blocks are shared where fork / copy-on-write would not share them "
            "(or not shared where they would)");
    }
    const af::Tensor<S, 3> keys = cache.gather_keys(id), values = cache.gather_values(id);
    check(keys.dimension(0) == n_kv_heads && keys.dimension(1) == gathered_positions<S>(len) &&
              keys.dimension(2) == af::detail::stored_row_width<S>(head_dim) &&
              values.dimensions() == keys.dimensions(),
          "PagedKVCache: gathered keys/values have the wrong shape");
    // Position by position: a QInt8 cache holds each head's positions in tiles.
    const af::ConstView<S, 4> key_rows = gathered_view(keys, len, head_dim),
                              value_rows = gathered_view(values, len, head_dim);
    std::vector<float> key_row(static_cast<std::size_t>(head_dim)), value_row(key_row.size());
    for (Index p = 0; p < len; ++p) {
      const PagedRow& row = seq.rows[static_cast<std::size_t>(p)];
      for (Index h = 0; h < n_kv_heads; ++h) {
        const std::size_t at = static_cast<std::size_t>(h * head_dim);
        af::detail::load_position<af::detail::QInt8Role::kKey>(key_rows, 0, h, p, key_row.data());
        af::detail::load_position<af::detail::QInt8Role::kValue>(value_rows, 0, h, p,
                                                                 value_row.data());
        if (std::memcmp(key_row.data(), &row.k[at], sizeof(float) * head_dim) != 0 ||
            std::memcmp(value_row.data(), &row.v[at], sizeof(float) * head_dim) != 0) {
          fail(
              "PagedKVCache: a sequence's keys/values differ from what was appended to it "
              "(position " +
              std::to_string(p) + " of sequence " + std::to_string(id) + ")");
        }
      }
    }
    if (cache.records_doc_ids()) {
      const af::Tensor<af::DocId, 1> docs = cache.gather_doc_ids(id);
      check(docs.size() == len, "PagedKVCache: gathered doc ids have the wrong length");
      for (Index p = 0; p < len; ++p) {
        check(docs(p) == seq.rows[static_cast<std::size_t>(p)].doc,
              "PagedKVCache: a sequence's doc ids differ from what was appended to it");
      }
    }
  }
  Index in_use = 0;
  for (Index b = 0; b < n_blocks; ++b) {
    const Index held = holders[static_cast<std::size_t>(b)];
    check(cache.block_refs(b) == held,
          "PagedKVCache: block_refs differs from the tables holding it");
    if (held > 0) {
      ++in_use;
      check(shadow.refs(to_shadow.at(b)) == held,
            "PagedKVCache: a block is shared by the wrong count");
    }
  }
  // Blocks nobody holds are free (and so reused): none leaks, none is handed out twice.
  check(cache.free_blocks() + in_use == n_blocks && cache.blocks_in_use() == in_use,
        "PagedKVCache: free_blocks + blocks held != n_blocks");
  check(cache.free_blocks() == shadow.free_blocks(),
        "PagedKVCache: free_blocks differs from the shadow");
  check(cache.blocks_without_sharing() == without_sharing,
        "PagedKVCache: blocks_without_sharing differs from the tables' total length");
}

// New rows (Hkv, n, D) for an append, packed tokens [first, first + n) of k_new / v_new,
// as a cache of storage S holds them.
template <typename S>
std::vector<PagedRow> paged_rows(const af::Tensor<float, 3>& k_new,
                                 const af::Tensor<float, 3>& v_new,
                                 const af::Tensor<af::DocId, 2>& ids, Index first, Index n) {
  const Index n_kv_heads = k_new.dimension(0), head_dim = k_new.dimension(2);
  std::vector<PagedRow> rows(static_cast<std::size_t>(n));
  for (Index t = 0; t < n; ++t) {
    PagedRow& row = rows[static_cast<std::size_t>(t)];
    row.k.resize(static_cast<std::size_t>(n_kv_heads * head_dim));
    row.v.resize(row.k.size());
    for (Index h = 0; h < n_kv_heads; ++h) {
      const std::size_t at = static_cast<std::size_t>(h * head_dim);
      stored_row<S>(&k_new(h, first + t, 0), head_dim, &row.k[at]);
      stored_row<S>(&v_new(h, first + t, 0), head_dim, &row.v[at]);
    }
    row.doc = ids.size() > 0 ? ids(0, first + t) : 0;
  }
  return rows;
}

// Document ids for packed tokens: short runs (documents packed in a sequence) from a seed.
af::Tensor<af::DocId, 2> paged_doc_ids(Index cols, std::uint32_t seed) {
  af::Tensor<af::DocId, 2> ids(1, std::max<Index>(cols, 0));
  af::DocId doc = seed % 3;
  for (Index t = 0; t < ids.size(); ++t) {
    if ((seed + static_cast<std::uint32_t>(t)) % 5 == 0) ++doc;
    ids(0, t) = doc;
  }
  return ids;
}

// One PagedAttention call over a ragged batch of the cache's sequences (sometimes with a
// broken argument), checked per sequence against the brute force on the shadow's rows.
// T: the activations, float or (over a bf16 cache) bf16, which the fused prefill multiplies
// by bf16 dot products reading key tiles split across the pool's runs.
template <typename T, typename S>
void fuzz_paged_attention(FuzzedDataProvider& fdp, const af::PagedKVCache<S>& cache,
                          const PagedShadow& shadow, af::PagedAttention<T, S>& attn,
                          const std::function<af::SeqId()>& pick_seq, std::uint32_t seed) {
  constexpr bool kBf16Activations = std::is_same_v<T, Eigen::bfloat16>;
  static_assert(std::is_same_v<T, float> || (kBf16Activations && std::is_same_v<S, T>),
                "float activations, or bf16 ones over a bf16 cache");
  const Index n_kv_heads = cache.n_kv_heads(), head_dim = cache.head_dim();
  const int broken = fdp.ConsumeIntegralInRange<int>(0, 15);  // 1..6 break one argument
  const int m = fdp.ConsumeIntegralInRange<int>(0, 3);
  af::RaggedBatch batch{{}, {0}};
  Expected e;
  for (int s = 0; s < m; ++s) {
    const af::SeqId id =
        s > 0 && fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? batch.seqs[0] : pick_seq();
    const Index len = shadow.len(id);
    // Mostly decode steps and short chunks; sometimes the whole sequence (a prompt), or
    // one token more than the cache holds.
    const int how = fdp.ConsumeIntegralInRange<int>(0, 9);
    const Index n = how < 4   ? std::min<Index>(len, 1)
                    : how < 7 ? fdp.ConsumeIntegralInRange<Index>(0, std::min<Index>(len, 8))
                    : how < 9 ? len
                              : len + 1;
    e.bad(!shadow.contains(id), "unknown sequence");
    e.bad(std::find(batch.seqs.begin(), batch.seqs.end(), id) != batch.seqs.end(),
          "duplicate sequence");
    e.bad(n > len, "more new tokens than the sequence holds");
    batch.seqs.push_back(id);
    batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n);
  }
  const Index total = batch.total_tokens();

  af::SdpaOptions options;
  options.causal = fdp.ConsumeBool();
  options.window = pick<Index>(fdp, {0, 0, 0, 1, 3, 17});
  options.softcap = pick<double>(fdp, {0.0, 0.0, 0.0, 5.0});
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) options.scale = pick<double>(fdp, {0.5, 2.0});
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path = pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kReference,
                                          af::SdpaPath::kFused, af::SdpaPath::kDecode});
  // With bf16 activations the decode path converts the queries and runs as for float ones;
  // the fused kernel's bf16 dot products, which read the pool's split tiles, are what is new.
  if (kBf16Activations && options.path == af::SdpaPath::kDecode)
    options.path = af::SdpaPath::kFused;
  options.int8_kernel = int8_kernel_for<S>(options);
  options.bf16_kernel = bf16_kernel_for<S>(options);
  const bool use_device = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const Index n_rep = fdp.ConsumeIntegralInRange<Index>(1, 3);
  Index n_heads = n_kv_heads * n_rep;
  if (broken == 1) n_heads = n_kv_heads == 2 ? n_heads + 1 : 0;
  e.bad(n_heads == 0 || n_heads % n_kv_heads != 0, "heads not a multiple of the KV heads");

  af::Tensor<T, 3> q(total + (broken == 2 ? 1 : 0), n_heads, head_dim);
  fill(q, seed, pick<double>(fdp, {1.0, 1.0, 4.0}), false, fdp);
  e.bad(broken == 2, "q's total_tokens");
  af::Tensor<T, 3> out(total + (broken == 3 ? 1 : 0), n_heads, head_dim);
  out.setConstant(T(7));
  e.bad(broken == 3 && out.dimensions() != q.dimensions(), "out shape");
  const bool give_lse = fdp.ConsumeBool() || broken == 4;
  af::Tensor<float, 2> lse(n_heads, total + (broken == 4 ? 1 : 0));  // float for bf16 T too
  lse.setConstant(7.0f);
  e.bad(give_lse && broken == 4 && lse.size() > 0, "lse shape");

  // Document masks: the new tokens' recorded ids as the queries' (the keys' then come
  // from the cache's records); a cache without records needs every new token to be the
  // whole sequence (the ids are the keys' too).
  const bool docs = fdp.ConsumeIntegralInRange<int>(0, 2) == 0 || broken == 5;
  std::vector<af::Tensor<af::DocId, 2>> q_ids(batch.seqs.size());
  std::vector<af::Masks> masks;
  if (docs || broken == 6) masks.resize(batch.seqs.size() + (broken == 6 ? 1 : 0));
  e.bad(broken == 6, "Masks count");
  for (Index s = 0; s < batch.size() && docs; ++s) {
    const af::SeqId id = batch.seqs[static_cast<std::size_t>(s)];
    const Index n = batch.new_tokens(s), len = shadow.len(id);
    af::Tensor<af::DocId, 2>& ids = q_ids[static_cast<std::size_t>(s)];
    ids = af::Tensor<af::DocId, 2>(1, n + (broken == 5 && s == 0 ? 1 : 0));
    for (Index i = 0; i < ids.size(); ++i) {
      const Index p = len - n + i;
      ids(0, i) = p >= 0 && p < len ? shadow.seq(id).rows[static_cast<std::size_t>(p)].doc : 0;
    }
    masks[static_cast<std::size_t>(s)].doc_ids = ids;
    // An ids tensor without elements counts as absent (see fuzz_sdpa).
    e.bad(broken == 5 && s == 0, "doc_ids shape");
    e.bad(ids.size() > 0 && !cache.records_doc_ids() && n != len,
          "doc_ids without recorded key ids, n != len");
  }

  const PagedSnapshot before(cache);
  attn.set_options(options);
  attn.set_device(use_device ? &pool_device() : nullptr);
  const af::StridedView<float, 2> lse_view =
      give_lse ? af::StridedView<float, 2>(lse) : af::StridedView<float, 2>();
  const Outcome o = outcome_of([&] { attn(q, cache, batch, out, masks, lse_view); });
  check_outcome(e, o, "PagedAttention");
  check(PagedSnapshot(cache) == before, "PagedAttention changed the cache");
  ++stats.paged_attention_calls;
  if (o != Outcome::kOk) {
    ++stats.paged_attention_rejected;
    for (Index i = 0; i < out.size(); ++i)
      check(out.data()[i] == T(7), "a rejected PagedAttention wrote out");
    for (Index i = 0; i < lse.size(); ++i)
      check(lse.data()[i] == 7.0f, "a rejected PagedAttention wrote lse");
    return;
  }

  // Each sequence with new tokens against the brute force on the shadow's rows (counting
  // the calls over a reduced cache where some sequence took the dot products).
  long dots_before = 0;
  if constexpr (!std::is_same_v<S, float>) dots_before = reduced_cache_stats<S>().dot_compared;
  for (Index s = 0; s < batch.size(); ++s) {
    const af::SeqId id = batch.seqs[static_cast<std::size_t>(s)];
    const Index n = batch.new_tokens(s), first = batch.first_token(s), len = shadow.len(id);
    if (n == 0) continue;
    af::Tensor<float, 4> q4(1, n_heads, n, head_dim), k4(1, n_kv_heads, len, head_dim),
        v4(k4.dimensions());
    for (Index h = 0; h < n_heads; ++h)
      for (Index i = 0; i < n; ++i)
        for (Index d = 0; d < head_dim; ++d)
          q4(0, h, i, d) = static_cast<float>(q(first + i, h, d));
    af::Tensor<af::DocId, 2> kv_ids(1, len);
    for (Index p = 0; p < len; ++p) {
      const PagedRow& row = shadow.seq(id).rows[static_cast<std::size_t>(p)];
      for (Index h = 0; h < n_kv_heads; ++h) {
        for (Index d = 0; d < head_dim; ++d) {
          k4(0, h, p, d) = row.k[static_cast<std::size_t>(h * head_dim + d)];
          v4(0, h, p, d) = row.v[static_cast<std::size_t>(h * head_dim + d)];
        }
      }
      kv_ids(0, p) = row.doc;
    }
    af::test::DenseMasks dense;
    dense.causal = options.causal;
    dense.window = options.window;
    if (docs) {
      dense.q_docs = q_ids[static_cast<std::size_t>(s)];
      if (cache.records_doc_ids()) dense.kv_docs = kv_ids;
    }
    Reference reference;
    if constexpr (kBf16Activations) {
      reference = reference_of(q4, k4, v4, dense, options);
      reference.budget = af::test::with_bf16_activations(reference.budget);
    } else {
      reference = reference_over_cache<S>(q4, k4, v4, dense, options);
    }
    const auto& [exact, budget, v_scale] = reference;
    double out_err = 0.0, lse_err = 0.0;
    for (Index h = 0; h < n_heads; ++h) {
      for (Index i = 0; i < n; ++i) {
        for (Index d = 0; d < head_dim; ++d) {
          const double diff =
              std::abs(static_cast<double>(out(first + i, h, d)) - exact.out(0, h, i, d));
          if (!(diff <= out_err)) out_err = std::isnan(diff) ? af::test::kInf : diff;
        }
        if (!give_lse) continue;
        const double want = exact.lse(0, h, i), got = lse(h, first + i);
        const double diff = got == want ? 0.0 : std::abs(got - want);  // -inf == -inf
        if (!(diff <= lse_err)) lse_err = std::isnan(diff) ? af::test::kInf : diff;
      }
    }
    if (!(out_err / v_scale <= budget.out)) {
      fail("PagedAttention: sequence " + std::to_string(id) + " (n " + std::to_string(n) +
           ", len " + std::to_string(len) + ") out error " + sci(out_err / v_scale) + " > budget " +
           sci(budget.out));
    }
    if (!(lse_err <= budget.lse)) {
      fail("PagedAttention: sequence " + std::to_string(id) + " lse error " + sci(lse_err) +
           " > budget " + sci(budget.lse));
    }
  }
  ++stats.paged_attention_compared;
  if constexpr (kBf16Activations) ++stats.paged_bf16_activation_compared;
  if constexpr (!std::is_same_v<S, float>) {
    ReducedCacheStats& reduced = reduced_cache_stats<S>();
    if (reduced.dot_compared > dots_before) ++reduced.paged_dot_compared;
  }
  // The thread count changes nothing.
  if (use_device) {
    af::Tensor<T, 3> serial(out.dimensions());
    af::PagedAttention<T, S> serial_attn(options);
    serial_attn(q, cache, batch, serial, masks);
    check(af::test::bitwise_equal(serial, out),
          "PagedAttention: pooled result differs from the serial one");
  }
}

// S is the cache's storage: float, bf16 (float keys and values rounded as appended) or
// QInt8 (quantized as appended).
template <typename S>
void fuzz_paged(FuzzedDataProvider& fdp) {
  using T = float;
  // Mostly a valid pool of a few blocks (so that running out of them is common); one
  // input in eight draws the constructor's arguments freely.
  const bool free_args = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  const Index n_blocks = fdp.ConsumeIntegralInRange<Index>(free_args ? -1 : 1, 5);
  const Index block_size =
      free_args ? pick<Index>(fdp, {16, 32, 0, 8, 24, -16}) : pick<Index>(fdp, {16, 32});
  const Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 2);
  const Index head_dim = cache_head_dim<S>(fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 8));
  const bool record = fdp.ConsumeBool();
  std::optional<af::PagedKVCache<S>> made_cache;
  const Outcome made =
      outcome_of([&] { made_cache.emplace(n_blocks, block_size, n_kv_heads, head_dim, record); });
  Expected ctor;
  ctor.bad(n_blocks <= 0 || n_kv_heads <= 0 || head_dim <= 0, "non-positive size");
  ctor.bad(block_size <= 0 || block_size % 16 != 0, "block_size not a positive multiple of 16");
  check_outcome(ctor, made, "PagedKVCache constructor");
  if (made != Outcome::kOk) return;
  af::PagedKVCache<S>& cache = *made_cache;

  PagedShadow shadow(n_blocks, block_size);
  std::set<af::SeqId> issued;     // handles are never reused
  std::vector<af::SeqId> freed;   // for calls naming a sequence that is gone
  af::PagedAttention<T, S> attn;  // reused: its scratch outlives calls of other shapes
  // Over a bf16 cache, bf16 activations too (otherwise an unused second float one).
  std::conditional_t<std::is_same_v<S, Eigen::bfloat16>, af::PagedAttention<S, S>,
                     af::PagedAttention<T, S>>
      attn_16;
  std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  // A live sequence, or now and then (always, when none is live) one the cache does not hold.
  const std::function<af::SeqId()> pick_seq = [&]() -> af::SeqId {
    const std::vector<af::SeqId> live = shadow.ids();
    if (live.empty() || fdp.ConsumeIntegralInRange<int>(0, 9) == 0) {
      return pick<af::SeqId>(fdp, {issued.empty() ? 0 : *issued.rbegin() + 1, -1,
                                   freed.empty() ? 1000 : freed.back()});
    }
    return live[fdp.ConsumeIntegralInRange<std::size_t>(0, live.size() - 1)];
  };
  const auto issue = [&](af::SeqId id) {
    check(issued.insert(id).second, "PagedKVCache: a sequence handle was issued twice");
  };
  // k_new, v_new (Hkv, total, D) and doc ids (1, total) for `total` packed tokens, with at
  // most one broken part; the verdict on them goes into e.
  struct NewTokens {
    af::Tensor<T, 3> k, v, k_storage;
    af::ConstView<T, 3> k_view, v_view;
    af::Tensor<af::DocId, 2> ids;
    af::DocIdView ids_view;
  };
  // (Filled in place: the views point into the tensors next to them.)
  const auto new_tokens = [&](NewTokens& t, Index total, int broken, Expected& e) {
    t.k = af::test::random_uniform<T, 3>(
        {n_kv_heads + (broken == 1 ? 1 : 0), total, head_dim + (broken == 2 ? 1 : 0)}, ++seed);
    t.v = af::test::random_uniform<T, 3>({n_kv_heads, total + (broken == 3 ? 1 : 0), head_dim},
                                         ++seed);
    t.k_view = t.k;
    t.v_view = t.v;
    e.bad(broken >= 1 && broken <= 3, "k_new / v_new shape");
    if (broken == 4 && total > 0) {
      // The same rows read with a stride of 2 in the last dimension: rejected, never read.
      t.k_storage = af::Tensor<T, 3>(n_kv_heads, total, 2 * head_dim);
      t.k_view = af::ConstView<T, 3>(t.k_storage.data(), {n_kv_heads, total, head_dim},
                                     {total * 2 * head_dim, 2 * head_dim, 2});
      e.bad(true, "k_new with a strided last dimension");
    } else if (broken == 7) {
      // Projections written (total, Hkv, D), read transposed: valid.
      t.k_storage = af::Tensor<T, 3>(total, n_kv_heads, head_dim);
      for (Index h = 0; h < n_kv_heads; ++h)
        for (Index p = 0; p < total; ++p)
          for (Index d = 0; d < head_dim; ++d) t.k_storage(p, h, d) = t.k(h, p, d);
      t.k_view = af::ConstView<T, 3>(t.k_storage).transpose(0, 1);
    }
    const bool give_ids = broken == 5 ? !record : record;
    t.ids = paged_doc_ids(give_ids ? total + (broken == 6 ? 1 : 0) : 0, ++seed);
    if (give_ids) t.ids_view = t.ids;
    // An ids tensor without elements is absent; a cache that records ids needs them only
    // for tokens to record.
    const bool has_ids = t.ids_view.has_value();
    e.bad(record && !has_ids && total > 0, "doc ids missing for a cache that records them");
    e.bad(!record && has_ids, "doc ids given to a cache that does not record them");
    e.bad(record && has_ids && t.ids.dimension(1) != total, "doc_ids_new shape");
  };

  const int n_ops = fdp.ConsumeIntegralInRange<int>(1, 16);
  for (int op = 0; op < n_ops && fdp.remaining_bytes() > 0; ++op) {
    const PagedSnapshot before(cache);
    const int kind = fdp.ConsumeIntegralInRange<int>(0, 9);
    Expected e;
    Outcome o = Outcome::kOk;
    if (kind == 8 || kind == 9) {
      // Over a bf16 cache every other call takes bf16 activations: the seed decides, so no
      // input byte is consumed and the seed corpus decodes as before.
      ++seed;
      if (std::is_same_v<S, Eigen::bfloat16> && seed % 2 == 0) {
        fuzz_paged_attention(fdp, cache, shadow, attn_16, pick_seq, seed);
      } else {
        fuzz_paged_attention(fdp, cache, shadow, attn, pick_seq, seed);
      }
      continue;
    }
    if (kind == 0) {
      af::SeqId id = -1;
      o = outcome_of([&] { id = cache.add_sequence(); });
      check_outcome(e, o, "PagedKVCache::add_sequence");
      issue(id);
      shadow.add(id);
    } else if (kind <= 2) {
      // One sequence: mostly a few tokens, sometimes more than the pool holds.
      const af::SeqId id = pick_seq();
      const Index n = fdp.ConsumeIntegralInRange<int>(0, 7) == 0
                          ? fdp.ConsumeIntegralInRange<Index>(0, (n_blocks + 1) * block_size)
                          : fdp.ConsumeIntegralInRange<Index>(0, block_size + 3);
      const int broken = fdp.ConsumeIntegralInRange<int>(0, 15);
      NewTokens t;
      new_tokens(t, n, broken, e);
      e.bad(!shadow.contains(id), "unknown sequence");
      e.overflow = !e.invalid && shadow.blocks_needed({id}, {n}) > shadow.free_blocks();
      o = outcome_of([&] { cache.append(id, t.k_view, t.v_view, t.ids_view); });
      check_outcome(e, o, "PagedKVCache::append");
      if (o == Outcome::kOk) shadow.append(id, paged_rows<S>(t.k, t.v, t.ids, 0, n));
    } else if (kind <= 4) {
      // Several sequences packed (sometimes one twice, or one unknown), sometimes with
      // malformed cu_seqlens.
      const int m = fdp.ConsumeIntegralInRange<int>(0, 3);
      af::RaggedBatch batch{{}, {0}};
      std::vector<Index> n;
      for (int s = 0; s < m; ++s) {
        const af::SeqId id =
            s > 0 && fdp.ConsumeIntegralInRange<int>(0, 7) == 0 ? batch.seqs[0] : pick_seq();
        e.bad(!shadow.contains(id), "unknown sequence");
        e.bad(std::find(batch.seqs.begin(), batch.seqs.end(), id) != batch.seqs.end(),
              "duplicate sequence");
        batch.seqs.push_back(id);
        n.push_back(fdp.ConsumeIntegralInRange<int>(0, 7) == 0
                        ? fdp.ConsumeIntegralInRange<Index>(0, (n_blocks + 1) * block_size)
                        : fdp.ConsumeIntegralInRange<Index>(0, block_size / 2));
        batch.cu_seqlens.push_back(batch.cu_seqlens.back() + n.back());
      }
      const Index total = batch.cu_seqlens.back();
      const int broken = fdp.ConsumeIntegralInRange<int>(0, 19);
      if (broken == 10) {
        batch.cu_seqlens.pop_back();
      } else if (broken == 11) {
        batch.cu_seqlens.push_back(total);
      } else if (broken == 12) {
        for (Index& c : batch.cu_seqlens) ++c;
      } else if (broken == 13 && m > 0) {
        const std::size_t s =
            fdp.ConsumeIntegralInRange<std::size_t>(1, static_cast<std::size_t>(m));
        batch.cu_seqlens[s] = batch.cu_seqlens[s - 1] - 1;
      }
      e.bad(broken >= 10 && broken <= 13 && !(broken == 13 && m == 0), "malformed cu_seqlens");
      NewTokens t;
      new_tokens(t, total, broken < 10 ? broken : 0, e);
      e.overflow = !e.invalid && shadow.blocks_needed(batch.seqs, n) > shadow.free_blocks();
      o = outcome_of([&] { cache.append(batch, t.k_view, t.v_view, t.ids_view); });
      check_outcome(e, o, "PagedKVCache::append (ragged)");
      if (o == Outcome::kOk) {
        for (Index s = 0; s < batch.size(); ++s) {
          shadow.append(batch.seqs[static_cast<std::size_t>(s)],
                        paged_rows<S>(t.k, t.v, t.ids, batch.first_token(s), batch.new_tokens(s)));
        }
      }
    } else if (kind == 5) {
      const af::SeqId parent = pick_seq();
      e.bad(!shadow.contains(parent), "unknown sequence");
      af::SeqId child = -1;
      o = outcome_of([&] { child = cache.fork(parent); });
      check_outcome(e, o, "PagedKVCache::fork");
      if (o == Outcome::kOk) {
        issue(child);
        shadow.fork(parent, child);
      }
    } else if (kind == 6) {
      const af::SeqId id = pick_seq();
      const Index len = shadow.len(id);
      const Index new_len = fdp.ConsumeIntegralInRange<Index>(-1, len + 2);
      e.bad(!shadow.contains(id), "unknown sequence");
      e.bad(new_len < 0 || new_len > len, "truncate outside [0, seq_len]");
      o = outcome_of([&] { cache.truncate(id, new_len); });
      check_outcome(e, o, "PagedKVCache::truncate");
      if (o == Outcome::kOk) shadow.truncate(id, new_len);
    } else {
      const af::SeqId id = pick_seq();
      e.bad(!shadow.contains(id), "unknown sequence");
      o = outcome_of([&] { cache.free_sequence(id); });
      check_outcome(e, o, "PagedKVCache::free_sequence");
      if (o == Outcome::kOk) {
        shadow.free_sequence(id);
        freed.push_back(id);
      }
    }
    ++stats.calls[kPagedScenario];
    if (o != Outcome::kOk) {
      ++stats.rejected[kPagedScenario];
      check(PagedSnapshot(cache) == before, "a rejected PagedKVCache call changed the pool");
    } else {
      ++stats.compared[kPagedScenario];
    }
    check_paged_pool(cache, shadow);
  }
}

template void fuzz_paged<float>(FuzzedDataProvider& fdp);
template void fuzz_paged<Eigen::bfloat16>(FuzzedDataProvider& fdp);
template void fuzz_paged<af::QInt8>(FuzzedDataProvider& fdp);

}  // namespace fuzz
