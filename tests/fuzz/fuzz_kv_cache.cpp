// The fuzz target's KVCache scenario against a shadow model (fuzz_attention.cpp
// describes it).
#include "fuzz_harness.hpp"

namespace fuzz {

// ---------------------------------------------------------------------------------------
// KVCache against a shadow model.

// Sdpa<float, S> over the cache's filled prefix (1 to 4 queries per head, at most the
// cached length; causal or not, any path), against the brute force on the shadow's keys
// and values (B, Hkv, seq_len, D).
template <typename S>
void fuzz_sdpa_over_cache(FuzzedDataProvider& fdp, const af::KVCache<S>& cache,
                          const af::Tensor<float, 4>& keys, const af::Tensor<float, 4>& values,
                          std::uint32_t seed) {
  using T = float;
  const Index batch = cache.batch_size(), n_kv_heads = cache.n_kv_heads(),
              head_dim = cache.head_dim();
  const Index n_heads = n_kv_heads * fdp.ConsumeIntegralInRange<Index>(1, 3);
  // At most the cached length: causal attention aligns the queries bottom-right.
  const Index q_len = fdp.ConsumeIntegralInRange<Index>(1, std::min<Index>(4, cache.seq_len()));
  af::SdpaOptions options;
  options.causal = fdp.ConsumeBool();
  options.window = pick<Index>(fdp, {0, 0, 0, 1, 3});
  options.softcap = pick<double>(fdp, {0.0, 0.0, 0.0, 5.0});
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path = pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kReference,
                                          af::SdpaPath::kFused, af::SdpaPath::kDecode});
  options.int8_kernel = int8_kernel_for<S>(options);
  options.bf16_kernel = bf16_kernel_for<S>(options);
  const bool use_device = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  af::Tensor<T, 4> q(batch, n_heads, q_len, head_dim);
  fill(q, seed, pick<double>(fdp, {1.0, 1.0, 4.0}), false, fdp);
  af::Tensor<T, 4> out(q.dimensions());
  af::Tensor<T, 3> lse(batch, n_heads, q_len);
  af::Sdpa<T, S> sdpa(options, use_device ? &pool_device() : nullptr);
  const af::KVPrefix<S> prefix = cache.prefix();
  sdpa(q, prefix.keys, prefix.values, af::StridedView<T, 4>(out), {}, af::StridedView<T, 3>(lse));

  af::test::DenseMasks dense;
  dense.causal = options.causal;
  dense.window = options.window;
  const auto [exact, budget, v_scale] = reference_over_cache<S>(q, keys, values, dense, options);
  const double out_err = af::test::max_abs_diff(out, exact.out) / v_scale;
  const double lse_err = af::test::max_abs_diff(lse, exact.lse);
  if (!(out_err <= budget.out) || !(lse_err <= budget.lse)) {
    fail("Sdpa over a KVCache: out error " + sci(out_err) + " (budget " + sci(budget.out) +
         "), lse error " + sci(lse_err) + " (budget " + sci(budget.lse) + "); q " +
         af::detail::shape_string(q.dimensions()) + " cached " + std::to_string(cache.seq_len()) +
         " causal " + std::to_string(options.causal) + " window " + std::to_string(options.window));
  }
  ++reduced_cache_stats<S>().cache_sdpa_compared;
}

// S is the cache's storage: float, bf16 (float keys and values rounded as appended) or
// QInt8 (quantized as appended).
template <typename S>
void fuzz_kv_cache(FuzzedDataProvider& fdp) {
  using T = float;
  const Index batch = fdp.ConsumeIntegralInRange<Index>(-1, 2);
  const Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(0, 3);
  const Index head_dim = cache_head_dim<S>(fdp.ConsumeIntegralInRange<Index>(0, 6));
  const Index max_len = fdp.ConsumeIntegralInRange<Index>(-1, 20);
  const bool record = fdp.ConsumeBool();
  std::optional<af::KVCache<S>> cache;
  const Outcome made =
      outcome_of([&] { cache.emplace(batch, max_len, n_kv_heads, head_dim, record); });
  Expected ctor;
  ctor.bad(batch <= 0 || n_kv_heads <= 0 || head_dim <= 0 || max_len <= 0, "non-positive size");
  check_outcome(ctor, made, "KVCache constructor");
  if (made != Outcome::kOk) return;

  // Shadow: what the first seq_len positions must hold (read as float).
  std::vector<T> keys, values;
  std::vector<af::DocId> ids;
  Index seq_len = 0;
  const auto at = [&](Index b, Index h, Index s) {
    return ((b * n_kv_heads + h) * max_len + s) * head_dim;
  };
  keys.assign(static_cast<std::size_t>(batch * n_kv_heads * max_len * head_dim), T(0));
  values = keys;
  ids.assign(static_cast<std::size_t>(batch * max_len), 0);

  std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  const int n_ops = fdp.ConsumeIntegralInRange<int>(1, 10);
  for (int op = 0; op < n_ops && fdp.remaining_bytes() > 0; ++op) {
    const af::Tensor<S, 4> key_snapshot = cache->key_storage();
    const af::Tensor<S, 4> value_snapshot = cache->value_storage();
    const af::Tensor<af::DocId, 2> id_snapshot = cache->doc_id_storage();
    const Index len_before = cache->seq_len();
    const int kind = fdp.ConsumeIntegralInRange<int>(0, 5);
    Expected e;
    Outcome o = Outcome::kOk;
    if (kind <= 3) {
      // update, with at most one broken part.
      const Index new_len = fdp.ConsumeIntegralInRange<Index>(0, 8);
      const int broken = fdp.ConsumeIntegralInRange<int>(0, 12);
      const Index kb = batch + (broken == 1), kh = n_kv_heads + (broken == 2),
                  kd = head_dim + (broken == 3);
      const Index v_len = new_len + (broken == 4);
      af::Tensor<T, 4> k_new = af::test::random_uniform<T, 4>({kb, kh, new_len, kd}, ++seed);
      af::Tensor<T, 4> v_new = af::test::random_uniform<T, 4>({kb, kh, v_len, kd}, ++seed);
      const bool give_ids = broken == 5 ? !record : record;
      af::Tensor<af::DocId, 2> ids_new(batch, new_len + (broken == 6));
      for (Index i = 0; i < ids_new.size(); ++i)
        ids_new.data()[i] = static_cast<af::DocId>(++seed % 5);
      e.bad(broken >= 1 && broken <= 4, "k_new/v_new shape");
      e.bad(give_ids != record, "doc ids given iff the cache records them");
      e.bad(give_ids && broken == 6, "doc_ids_new shape");
      e.overflow = len_before + new_len > max_len;
      // Strided inputs (a transposed projection buffer) are valid too.
      const bool transposed = fdp.ConsumeBool() && broken == 0;
      af::Tensor<T, 4> k_bshd;
      af::ConstView<T, 4> k_view(k_new);
      if (transposed) {
        k_bshd = af::Tensor<T, 4>(kb, new_len, kh, kd);
        for (Index b = 0; b < kb; ++b)
          for (Index h = 0; h < kh; ++h)
            for (Index s = 0; s < new_len; ++s)
              for (Index d = 0; d < kd; ++d) k_bshd(b, s, h, d) = k_new(b, h, s, d);
        k_view = af::ConstView<T, 4>(k_bshd).transpose(1, 2);
      }
      af::KVPrefix<S> prefix;
      o = outcome_of([&] {
        prefix = give_ids ? cache->update(k_view, v_new, ids_new) : cache->update(k_view, v_new);
      });
      check_outcome(e, o, "KVCache::update");
      if (o == Outcome::kOk) {
        for (Index b = 0; b < batch; ++b) {
          for (Index h = 0; h < n_kv_heads; ++h) {
            for (Index s = 0; s < new_len; ++s) {
              stored_row<S>(&k_new(b, h, s, 0), head_dim,
                            &keys[static_cast<std::size_t>(at(b, h, seq_len + s))]);
              stored_row<S>(&v_new(b, h, s, 0), head_dim,
                            &values[static_cast<std::size_t>(at(b, h, seq_len + s))]);
            }
          }
          for (Index s = 0; s < new_len && record; ++s)
            ids[static_cast<std::size_t>(b * max_len + seq_len + s)] = ids_new(b, s);
        }
        seq_len += new_len;
        check(prefix.keys.dimension(2) == seq_len &&
                  prefix.keys.data() == cache->key_storage().data(),
              "update did not return the filled prefix of the cache's storage");
      }
    } else if (kind == 4) {
      const Index to = fdp.ConsumeIntegralInRange<Index>(-2, max_len + 2);
      e.bad(to < 0 || to > len_before, "truncate outside [0, seq_len]");
      o = outcome_of([&] { cache->truncate(to); });
      check_outcome(e, o, "KVCache::truncate");
      if (o == Outcome::kOk) seq_len = to;
    } else {
      cache->reset();
      seq_len = 0;
    }
    ++stats.calls[kCacheScenario];
    if (o == Outcome::kOk) ++stats.compared[kCacheScenario];
    if (o != Outcome::kOk) {
      ++stats.rejected[kCacheScenario];
      check(cache->seq_len() == len_before, "a rejected call changed seq_len");
      check(af::test::bitwise_equal(cache->key_storage(), key_snapshot) &&
                af::test::bitwise_equal(cache->value_storage(), value_snapshot) &&
                af::test::bitwise_equal(cache->doc_id_storage(), id_snapshot),
            "a rejected call changed the cache's storage");
    }
    // The filled prefix always equals the shadow.
    check(cache->seq_len() == seq_len, "seq_len differs from the shadow");
    const af::KVPrefix<S> p = cache->prefix();
    std::vector<T> key_row(static_cast<std::size_t>(head_dim)), value_row(key_row.size());
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < n_kv_heads; ++h) {
        for (Index s = 0; s < seq_len; ++s) {
          // Position by position: a QInt8 cache holds each head's positions in tiles.
          af::detail::load_position<af::detail::QInt8Role::kKey>(p.keys, b, h, s, key_row.data());
          af::detail::load_position<af::detail::QInt8Role::kValue>(p.values, b, h, s,
                                                                   value_row.data());
          check(std::memcmp(key_row.data(), &keys[static_cast<std::size_t>(at(b, h, s))],
                            sizeof(T) * head_dim) == 0 &&
                    std::memcmp(value_row.data(), &values[static_cast<std::size_t>(at(b, h, s))],
                                sizeof(T) * head_dim) == 0,
                "cached keys/values differ from the shadow");
        }
      }
      for (Index s = 0; s < seq_len && record; ++s) {
        check(cache->doc_ids()(b, s) == ids[static_cast<std::size_t>(b * max_len + s)],
              "cached doc ids differ");
      }
    }
    // Attention over what a bf16 or QInt8 cache holds. (Only there: a float cache's inputs
    // keep decoding as they did before reduced caches existed, and its prefix is plain
    // floats, which the SDPA scenario covers.)
    if constexpr (!std::is_same_v<S, float>) {
      if (seq_len == 0) continue;
      af::Tensor<T, 4> shadow_keys(batch, n_kv_heads, seq_len, head_dim),
          shadow_values(shadow_keys.dimensions());
      for (Index b = 0; b < batch; ++b) {
        for (Index h = 0; h < n_kv_heads; ++h) {
          for (Index s = 0; s < seq_len; ++s) {
            const std::size_t from = static_cast<std::size_t>(at(b, h, s));
            std::copy_n(&keys[from], head_dim, &shadow_keys(b, h, s, 0));
            std::copy_n(&values[from], head_dim, &shadow_values(b, h, s, 0));
          }
        }
      }
      fuzz_sdpa_over_cache(fdp, *cache, shadow_keys, shadow_values, ++seed);
    }
  }
}

template void fuzz_kv_cache<float>(FuzzedDataProvider& fdp);
template void fuzz_kv_cache<Eigen::bfloat16>(FuzzedDataProvider& fdp);
template void fuzz_kv_cache<af::QInt8>(FuzzedDataProvider& fdp);

}  // namespace fuzz
