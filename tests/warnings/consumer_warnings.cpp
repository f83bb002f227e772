// A consumer translation unit that calls every public entry point of attnforge for float
// and Eigen::bfloat16 (and the mixed float-over-bf16, float-over-fp16 and float-over-QInt8
// cache combinations), so that every kernel a user can reach is instantiated.
// run_warnings_test.cmake compiles it with exactly a consumer's flags (-Wall -Wextra
// -Wpedantic -march=native -Werror; g++ at -O2, clang++ at -O0, tests/CMakeLists.txt says
// why), once with g++ and once with clang++, then runs it.
// Shapes are tiny: the point is the compile; the run only shows that the calls are
// well-formed.
#include <attnforge/attnforge.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <type_traits>

namespace af = attnforge;

namespace {

// Deterministic values in [-1, 1) for any element type (a small LCG; no <random> needed).
template <typename T, int Rank>
void fill(af::Tensor<T, Rank>& t, unsigned seed) {
  unsigned state = seed * 2654435761u + 1u;
  for (af::Index i = 0; i < t.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    t.data()[i] = static_cast<T>(static_cast<float>(state >> 8) * 0x1.0p-23f - 1.0f);
  }
}

template <typename T, int Rank>
bool all_finite(const af::Tensor<T, Rank>& t) {
  for (af::Index i = 0; i < t.size(); ++i) {
    if (!std::isfinite(static_cast<float>(t.data()[i]))) return false;
  }
  return true;
}

int failures = 0;

template <typename T, int Rank>
void check(const char* what, const af::Tensor<T, Rank>& t) {
  if (!all_finite(t)) {
    std::fprintf(stderr, "consumer_warnings: %s has a non-finite element\n", what);
    ++failures;
  }
}

constexpr af::Index kBatch = 1, kHeads = 4, kKvHeads = 2, kHeadDim = 64, kDim = 128;
constexpr af::Index kSeq = 24, kMaxSeq = 64;
// Keys of the SDPA calls. (A compile-time length: g++ 12 warns -Walloc-size-larger-than on
// the masks' allocation when it is read from k at run time.)
constexpr af::Index kSdpaKvLen = kSeq + 8;

// RoPE: tables, the free functions, RotaryEmbedding (both apply overloads).
template <typename T>
void rope_entry_points() {
  const auto [cos_table, sin_table] =
      af::precompute_rope_frequencies<T>(kHeadDim, kMaxSeq, 10000.0);
  af::Tensor<T, 4> x(kBatch, kHeads, kSeq, kHeadDim);
  fill(x, 1);
  const auto cos_rows = af::ConstView<T, 2>(cos_table).narrow(0, 0, kSeq);
  const auto sin_rows = af::ConstView<T, 2>(sin_table).narrow(0, 0, kSeq);
  af::Tensor<T, 4> rotated = af::apply_rope(x, cos_rows, sin_rows);
  af::Tensor<T, 4> interleaved = af::apply_rope(x, cos_rows, sin_rows, af::RopeStyle::kInterleaved);
  af::apply_rope_inplace(af::StridedView<T, 4>(x), cos_rows, sin_rows, af::RopeStyle::kHalfSplit);
  check("apply_rope", rotated);
  check("apply_rope (interleaved)", interleaved);
  check("apply_rope_inplace", x);

  const af::RotaryEmbedding<T> rope(kHeadDim, kMaxSeq, 10000.0, af::RopeStyle::kHalfSplit);
  af::Tensor<T, 4> y(kBatch, kHeads, kSeq, kHeadDim);
  fill(y, 2);
  af::Tensor<T, 4> y_out(y.dimensions());
  rope.apply(af::StridedView<T, 4>(y), /*start_pos=*/3);
  rope.apply(af::ConstView<T, 4>(y), af::StridedView<T, 4>(y_out), /*start_pos=*/3);
  check("RotaryEmbedding::apply", y_out);
}

// Every SDPA entry point on every path and mask kind over k and v (B, Hkv, kSdpaKvLen, D)
// of KV: T, or bf16 / QInt8 under float q.
template <typename T, typename KV, typename K, typename V>
void sdpa_calls(const K& k, const V& v, const Eigen::ThreadPoolDevice* device) {
  const af::Index kv_len = kSdpaKvLen;
  af::Tensor<T, 4> q(kBatch, kHeads, kSeq, kHeadDim);
  fill(q, 3);
  af::Tensor<af::DocId, 2> q_docs(kBatch, kSeq), kv_docs(kBatch, kv_len);
  for (af::Index j = 0; j < kv_len; ++j) kv_docs(0, j) = j < kv_len / 2 ? 0 : 1;
  for (af::Index i = 0; i < kSeq; ++i) q_docs(0, i) = kv_docs(0, kv_len - kSeq + i);
  af::Tensor<bool, 2> padding(kBatch, kv_len);
  for (af::Index j = 0; j < kv_len; ++j) padding(0, j) = j != 5;

  af::Tensor<bool, 4> attn_mask(1, kHeads, kSeq, kv_len);
  for (af::Index i = 0; i < attn_mask.size(); ++i) attn_mask.data()[i] = i % 7 != 0;
  af::Tensor<float, 4> attn_bias(kBatch, 1, kSeq, kv_len);
  fill(attn_bias, 6);
  af::Tensor<std::int32_t, 2> q_docs32 = q_docs.cast<std::int32_t>();
  af::Tensor<std::uint8_t, 2> padding8 = padding.cast<std::uint8_t>();

  af::Masks masks;
  masks.doc_ids = q_docs;
  masks.kv_doc_ids = kv_docs;
  masks.key_padding_mask = padding;
  af::Masks element_masks;
  element_masks.doc_ids = q_docs32;
  element_masks.kv_doc_ids = kv_docs;
  element_masks.key_padding_mask = padding8;
  element_masks.attn_mask = attn_mask;
  element_masks.attn_bias = attn_bias;

  for (const af::SdpaPath path : {af::SdpaPath::kAuto, af::SdpaPath::kFused, af::SdpaPath::kDecode,
                                  af::SdpaPath::kReference}) {
    for (int variant = 0; variant < 4; ++variant) {
      af::SdpaOptions options;
      options.path = path;
      options.causal = variant != 0;
      options.window = variant == 2 ? 7 : 0;
      options.softcap = variant == 3 ? 20.0 : 0.0;
      options.empty_rows =
          variant == 3 ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
      check("scaled_dot_product_attention",
            af::scaled_dot_product_attention(q, k, v, options, masks, device));
      check("scaled_dot_product_attention (no masks)",
            af::scaled_dot_product_attention(q, k, v, options));
      af::SdpaResult<T> with_lse =
          af::scaled_dot_product_attention_with_lse(q, k, v, options, masks, device);
      check("scaled_dot_product_attention_with_lse", with_lse.out);

      af::SdpaOptions per_head = options;
      per_head.alibi_slopes.assign(kHeads, 0.25);
      per_head.sinks.assign(kHeads, 1.0);
      check("scaled_dot_product_attention (element masks, ALiBi, sinks)",
            af::scaled_dot_product_attention(q, k, v, per_head, element_masks, device));

      af::Sdpa<T, KV> sdpa(options, device);
      check("Sdpa::operator()", sdpa(q, k, v, masks));
      af::Tensor<T, 4> out(q.dimensions());
      af::Tensor<af::acc_t<T>, 3> lse(kBatch, kHeads, kSeq);
      sdpa(q, k, v, af::StridedView<T, 4>(out), masks, af::StridedView<af::acc_t<T>, 3>(lse));
      check("Sdpa::operator() into out", out);
    }
  }
  if constexpr (std::is_same_v<T, KV>) {
    af::SdpaOptions options;
    options.causal = true;
    check("attention_weights", af::attention_weights(q, k, options, masks, device));
    // bf16 prefill with each tile-product choice (the dot products where the CPU has them).
    for (const af::Bf16Kernel kernel : {af::Bf16Kernel::kAuto, af::Bf16Kernel::kConvert}) {
      options.bf16_kernel = kernel;
      options.path = af::SdpaPath::kFused;
      check("scaled_dot_product_attention (bf16 kernel)",
            af::scaled_dot_product_attention(q, k, v, options));
    }
  }
}

template <typename T, typename KV>
void sdpa_entry_points(const Eigen::ThreadPoolDevice* device) {
  const af::Index kv_len = kSdpaKvLen;
  if constexpr (std::is_same_v<KV, af::QInt8>) {
    // Quantized keys and values exist only as the rows of a QInt8 cache (each row's scales
    // follow its values), so they come from one, quantized from float.
    af::Tensor<float, 4> k(kBatch, kKvHeads, kv_len, kHeadDim), v(k.dimensions());
    fill(k, 4), fill(v, 5);
    af::KVCache<af::QInt8> cache(kBatch, kv_len, kKvHeads, kHeadDim);
    const af::KVPrefix<af::QInt8> kv = cache.update(k, v);
    sdpa_calls<T, KV>(kv.keys, kv.values, device);
  } else {
    af::Tensor<KV, 4> k(kBatch, kKvHeads, kv_len, kHeadDim), v(k.dimensions());
    fill(k, 4), fill(v, 5);
    sdpa_calls<T, KV>(k, v, device);
  }
}

// RMSNorm: the module (copy and in place) and the function.
template <typename T>
void norm_entry_points() {
  af::RMSNorm<T> norm(kHeadDim, 1e-6);
  af::Tensor<T, 1> weight(kHeadDim);
  fill(weight, 12);
  norm.weight() = weight;
  af::Tensor<T, 3> x(kBatch, kSeq, kHeadDim);
  fill(x, 13);
  check("RMSNorm::forward", norm.forward(x));
  check("rms_norm", af::rms_norm(x, weight, 1e-5));
  norm.forward_inplace(x);
  check("RMSNorm::forward_inplace", x);
}

// KVCache: update (with and without recorded doc ids), prefix, truncate, reset; a bf16 or
// fp16 cache also takes float keys and values (rounded as they are appended), a QInt8 cache
// takes only those (quantized as they are appended).
template <typename T>
void kv_cache_entry_points() {
  using Input = std::conditional_t<std::is_same_v<T, af::QInt8>, float, T>;
  af::KVCache<T> cache(kBatch, kMaxSeq, kKvHeads, kHeadDim);
  af::Tensor<Input, 4> k_new(kBatch, kKvHeads, 5, kHeadDim), v_new(kBatch, kKvHeads, 5, kHeadDim);
  fill(k_new, 6), fill(v_new, 7);
  af::KVPrefix<T> prefix = cache.update(k_new, v_new);
  cache.update(k_new, v_new);
  cache.truncate(7);
  prefix = cache.prefix();
  if (prefix.keys.dimension(2) != 7) ++failures;
  cache.reset();

  af::KVCache<T> recording(kBatch, kMaxSeq, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  af::Tensor<af::DocId, 2> ids(kBatch, 5);
  ids.setValues({{0, 0, 1, 1, 1}});
  recording.update(k_new, v_new, ids);
  if (recording.doc_ids().dimension(1) != 5) ++failures;

  if constexpr (std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>) {
    af::Tensor<float, 4> k_float(kBatch, kKvHeads, 5, kHeadDim),
        v_float(kBatch, kKvHeads, 5, kHeadDim);
    fill(k_float, 8), fill(v_float, 9);
    cache.update(k_float, v_float);
    recording.update(k_float, v_float, ids);
    if (cache.seq_len() != 5 || recording.seq_len() != 10) ++failures;
  }
}

// Attention: constructor, parameters, both forward overloads with and without a cache,
// doc ids and padding, forward_into, bind_weights; Cache is T, or bf16 / QInt8 under float.
template <typename T, typename CacheT>
void attention_entry_points(const Eigen::ThreadPoolDevice* device) {
  af::Attention<T> attn(kDim, kHeads, kKvHeads, /*head_dim=*/0, /*qk_norm=*/true, 1e-5);
  attn.reset_parameters(11);
  attn.set_device(device);
  af::SdpaOptions options;
  options.causal = true;
  options.softcap = 30.0;
  options.alibi_slopes.assign(kHeads, 0.125);
  options.sinks.assign(kHeads, 0.5);
  attn.set_sdpa_options(options);
  const af::RotaryEmbedding<T> rope(attn.head_dim(), kMaxSeq);
  af::Tensor<T, 3> x(kBatch, kSeq, kDim), token(kBatch, 1, kDim);
  fill(x, 8), fill(token, 9);
  af::Tensor<af::DocId, 2> docs(kBatch, kSeq);
  for (af::Index i = 0; i < kSeq; ++i) docs(0, i) = i < 10 ? 0 : 1;
  af::Tensor<bool, 2> padding(kBatch, kSeq);
  for (af::Index i = 0; i < kSeq; ++i) padding(0, i) = i >= 2;

  // Without a cache: rope tables, then a RotaryEmbedding; doc ids; padding.
  check("Attention::forward(tables)",
        attn.forward(x, rope.cos_rows(0, kSeq), rope.sin_rows(0, kSeq)));
  check("Attention::forward(rope)", attn.forward(x, rope, 0));
  check("Attention::forward(doc_ids)",
        attn.forward(x, rope, 0, static_cast<af::KVCache<T>*>(nullptr), docs));
  check("Attention::forward(padding)",
        attn.forward(x, rope, 0, static_cast<af::KVCache<T>*>(nullptr), {}, padding));

  // With a cache: prefill, a decode step through each overload, then forward_into.
  af::KVCache<CacheT> cache(kBatch, kMaxSeq, kKvHeads, attn.head_dim());
  check("Attention::forward(cache prefill)", attn.forward(x, rope, 0, &cache));
  check("Attention::forward(cache step)", attn.forward(token, rope, cache.seq_len(), &cache));
  const af::Index pos = cache.seq_len();
  check("Attention::forward(tables, cache)",
        attn.forward(token, rope.cos_rows(pos, 1), rope.sin_rows(pos, 1), &cache));
  af::Tensor<T, 3> out(kBatch, 1, kDim);
  const af::Index pos2 = cache.seq_len();
  attn.forward_into(token, rope.cos_rows(pos2, 1), rope.sin_rows(pos2, 1),
                    af::StridedView<T, 3>(out), &cache);
  check("Attention::forward_into(cache)", out);
  af::Tensor<T, 3> out_x(kBatch, kSeq, kDim);
  attn.forward_into(x, rope.cos_rows(0, kSeq), rope.sin_rows(0, kSeq),
                    af::StridedView<T, 3>(out_x));
  check("Attention::forward_into", out_x);

  // A cache that records doc ids, fed a packed chunk; padding over cached + new keys.
  af::KVCache<CacheT> recording(kBatch, kMaxSeq, kKvHeads, attn.head_dim(),
                                /*record_doc_ids=*/true);
  check("Attention::forward(cache, doc_ids)", attn.forward(x, rope, 0, &recording, docs));
  af::KVCache<CacheT> padded(kBatch, kMaxSeq, kKvHeads, attn.head_dim());
  check("Attention::forward(cache, padding)", attn.forward(x, rope, 0, &padded, {}, padding));

  // Every mask kind through forward(x, rope, start_pos, cache, masks).
  af::Tensor<std::uint8_t, 4> attn_mask(1, kHeads, kSeq, kSeq);
  for (af::Index i = 0; i < attn_mask.size(); ++i) attn_mask.data()[i] = i % 5 != 0;
  af::Tensor<float, 4> attn_bias(kBatch, kHeads, kSeq, kSeq);
  fill(attn_bias, 10);
  af::Masks masks;
  masks.doc_ids = docs;
  masks.attn_mask = attn_mask;
  masks.attn_bias = attn_bias;
  af::KVCache<CacheT> masked(kBatch, kMaxSeq, kKvHeads, attn.head_dim(), /*record_doc_ids=*/true);
  check("Attention::forward(masks)", attn.forward(x, rope, 0, &masked, masks));

  // Weights: checked assignment, and the caller's memory.
  af::Tensor<T, 2> wq = attn.wq().tensor(), wk = attn.wk().tensor(), wv = attn.wv().tensor(),
                   wo = attn.wo().tensor();
  af::Tensor<T, 1> q_norm = attn.q_norm().tensor(), k_norm = attn.k_norm().tensor();
  attn.wq() = wq;
  attn.k_norm() = k_norm;
  af::AttentionWeights<T> weights;
  weights.wq = wq;
  weights.wk = wk;
  weights.wv = wv;
  weights.wo = wo;
  weights.q_norm = q_norm;
  weights.k_norm = k_norm;
  af::Attention<T> bound(kDim, kHeads, kKvHeads, 0, /*qk_norm=*/true);
  bound.bind_weights(weights);
  check("Attention::forward(bound weights)", bound.forward(x, rope, 0));
}

// Serving: a PagedKVCache (add, append one and many, fork, truncate, free), PagedAttention
// over a ragged batch (a prefill next to a decode step, with lse), and the module's ragged
// forward; Cache is T, or bf16 / QInt8 under float.
template <typename T, typename CacheT>
void paged_entry_points(const Eigen::ThreadPoolDevice* device) {
  af::PagedKVCache<CacheT> cache(8, 16, kKvHeads, kHeadDim, /*record_doc_ids=*/true);
  const af::SeqId a = cache.add_sequence(), b = cache.add_sequence();
  af::Tensor<T, 3> k(kKvHeads, 20, kHeadDim), v(kKvHeads, 20, kHeadDim);
  fill(k, 12), fill(v, 13);
  af::Tensor<af::DocId, 2> ids(1, 20);
  ids.setZero();
  const af::RaggedBatch prompt{{a, b}, {0, 19, 20}};
  cache.append(prompt, af::ConstView<T, 3>(k), af::ConstView<T, 3>(v), ids);
  const af::SeqId c = cache.fork(a);
  cache.truncate(c, 17);
  af::Tensor<T, 3> k1(kKvHeads, 1, kHeadDim), v1(kKvHeads, 1, kHeadDim);
  fill(k1, 14), fill(v1, 15);
  af::Tensor<af::DocId, 2> id1(1, 1);
  id1.setZero();
  cache.append(c, af::ConstView<T, 3>(k1), af::ConstView<T, 3>(v1), id1);

  af::SdpaOptions options;
  options.causal = true;
  af::PagedAttention<T, CacheT> paged(options, device);
  af::Tensor<T, 3> q(20, kHeads, kHeadDim), out(20, kHeads, kHeadDim);
  fill(q, 16);
  af::Tensor<af::acc_t<T>, 2> lse(kHeads, 20);
  paged(q, cache, prompt, af::StridedView<T, 3>(out), {}, af::StridedView<af::acc_t<T>, 2>(lse));
  check("PagedAttention", out);
  cache.free_sequence(c);
  cache.free_sequence(a);
  cache.free_sequence(b);

  af::Attention<T> attn(kDim, kHeads, kKvHeads, 0, /*qk_norm=*/true);
  attn.set_device(device);
  const af::RotaryEmbedding<T> rope(attn.head_dim(), kMaxSeq);
  af::PagedKVCache<CacheT> serving(8, 16, kKvHeads, attn.head_dim());
  const af::SeqId s0 = serving.add_sequence(), s1 = serving.add_sequence();
  af::Tensor<T, 2> x(kSeq, kDim);
  fill(x, 17);
  check("Attention::forward(ragged prefill)",
        attn.forward(x, rope, serving, af::RaggedBatch{{s0, s1}, {0, kSeq - 4, kSeq}}));
  af::Tensor<T, 2> step(2, kDim), step_out(2, kDim);
  fill(step, 18);
  attn.forward_into(step, rope, af::StridedView<T, 2>(step_out), serving,
                    af::RaggedBatch{{s0, s1}, {0, 1, 2}});
  check("Attention::forward_into(ragged step)", step_out);
}

}  // namespace

int main() {
  try {
    Eigen::ThreadPool pool(2);
    const Eigen::ThreadPoolDevice device(&pool, 2);
    for (const Eigen::ThreadPoolDevice* dev :
         {static_cast<const Eigen::ThreadPoolDevice*>(nullptr), &device}) {
      sdpa_entry_points<float, float>(dev);
      sdpa_entry_points<Eigen::bfloat16, Eigen::bfloat16>(dev);
      sdpa_entry_points<float, Eigen::bfloat16>(dev);
      attention_entry_points<float, float>(dev);
      attention_entry_points<Eigen::bfloat16, Eigen::bfloat16>(dev);
      attention_entry_points<float, Eigen::bfloat16>(dev);
      paged_entry_points<float, float>(dev);
      paged_entry_points<Eigen::bfloat16, Eigen::bfloat16>(dev);
      paged_entry_points<float, Eigen::bfloat16>(dev);
      sdpa_entry_points<float, af::QInt8>(dev);
      attention_entry_points<float, af::QInt8>(dev);
      paged_entry_points<float, af::QInt8>(dev);
      sdpa_entry_points<float, Eigen::half>(dev);
      attention_entry_points<float, Eigen::half>(dev);
      paged_entry_points<float, Eigen::half>(dev);
    }
    rope_entry_points<float>();
    rope_entry_points<Eigen::bfloat16>();
    norm_entry_points<float>();
    norm_entry_points<Eigen::bfloat16>();
    kv_cache_entry_points<float>();
    kv_cache_entry_points<Eigen::bfloat16>();
    kv_cache_entry_points<af::QInt8>();
    kv_cache_entry_points<Eigen::half>();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "consumer_warnings: %s\n", e.what());
    return 1;
  }
  if (failures != 0) {
    std::fprintf(stderr, "consumer_warnings: %d checks failed\n", failures);
    return 1;
  }
  std::printf(
      "consumer_warnings: every entry point ran (float, bf16, float over a bf16, an fp16 or a "
      "QInt8 cache)\n");
  return 0;
}
