// scaled_dot_product_attention: validate the inputs, resolve the options, choose a path.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

#include "attnforge/detail/kernel_config.hpp"
#include "attnforge/detail/mask_policy.hpp"
#include "attnforge/detail/online_softmax.hpp"
#include "attnforge/detail/sdpa_decode.hpp"
#include "attnforge/detail/sdpa_kernel.hpp"
#include "attnforge/detail/sdpa_reference.hpp"
#include "attnforge/mask.hpp"
#include "attnforge/sdpa_options.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge {

namespace detail {

// Checks the option values and resolves the defaults (scale = 1 / sqrt(head_dim)).
inline SdpaParams resolve_options(const char* where, const SdpaOptions& options, Index head_dim) {
  SdpaParams params;
  params.scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim)));
  if (!std::isfinite(params.scale)) {
    throw_invalid_argument(where, ": scale must be finite, got ", params.scale);
  }
  if (!(options.softcap >= 0.0) || !std::isfinite(options.softcap)) {
    throw_invalid_argument(where, ": softcap must be >= 0 and finite (0 = off), got ",
                           options.softcap);
  }
  if (options.window < 0) {
    throw_invalid_argument(where, ": window must be >= 0 (0 = no window), got ", options.window);
  }
  params.softcap = options.softcap;
  params.rules = MaskRules{options.causal, options.window};
  params.empty_rows = options.empty_rows;
  for (const auto& [name, values] :
       {std::pair<const char*, const std::vector<double>*>{"alibi_slopes", &options.alibi_slopes},
        std::pair<const char*, const std::vector<double>*>{"sinks", &options.sinks}}) {
    for (const double x : *values) {
      if (!std::isfinite(x)) throw_invalid_argument(where, ": ", name, " must be finite, got ", x);
    }
  }
  params.alibi_slopes = options.alibi_slopes.empty() ? nullptr : options.alibi_slopes.data();
  params.sinks = options.sinks.empty() ? nullptr : options.sinks.data();
  return params;
}

// Checks the per-head options against the number of query heads.
inline void check_per_head_options(const char* where, const SdpaOptions& options, Index n_heads) {
  for (const auto& [name, values] :
       {std::pair<const char*, const std::vector<double>*>{"alibi_slopes", &options.alibi_slopes},
        std::pair<const char*, const std::vector<double>*>{"sinks", &options.sinks}}) {
    if (!values->empty() && static_cast<Index>(values->size()) != n_heads) {
      throw_invalid_argument(where, ": ", name, " has ", values->size(),
                             " values, expected one per query head (H = ", n_heads, ") or none");
    }
  }
}

// Checks q (B, H, Sq, D), k and v (B, Hkv, Skv, D), the options and the masks, and
// returns the resolved parameters. Nothing is written before this succeeds.
template <typename T, typename KV>
SdpaParams validate_sdpa(const char* where, const ConstView<T, 4>& q, const ConstView<KV, 4>& k,
                         const ConstView<KV, 4>& v, const SdpaOptions& options,
                         const Masks& masks) {
  if (!q.has_value() && q.size() != 0) throw_invalid_argument(where, ": q is missing");
  const auto shape = [](const auto& t) { return shape_string(t.dimensions()); };
  for (const auto& [name, view] : {std::pair<const char*, const ConstView<KV, 4>*>{"k", &k},
                                   std::pair<const char*, const ConstView<KV, 4>*>{"v", &v}}) {
    if (view->dimension(0) != q.dimension(0)) {
      throw_invalid_argument(where, ": ", name, " has batch size ", view->dimension(0),
                             " but q has ", q.dimension(0), " (q ", shape(q), ", ", name, " ",
                             shape(*view), ")");
    }
    if (view->dimension(3) != q.dimension(3)) {
      throw_invalid_argument(where, ": ", name, " has head_dim ", view->dimension(3), " but q has ",
                             q.dimension(3), " (q ", shape(q), ", ", name, " ", shape(*view), ")");
    }
    if (view->stride(3) != 1) {
      throw_invalid_argument(where, ": ", name, " needs a contiguous last dimension");
    }
    // A quantized row's scales follow its values (qint8.hpp), found from stride(2): a view
    // of other rows, or one narrowed in the head dimension, would read the wrong bytes as
    // scales. With head_dim a multiple of 4 (check_qint8_head_dim), the stride identifies
    // whole stored rows.
    if (is_qint8_v<KV>) check_qint8_head_dim(where, view->dimension(3));
    if (is_qint8_v<KV> && view->stride(2) != qint8_row_bytes(view->dimension(3))) {
      throw_invalid_argument(where, ": ", name, " is a QInt8 view ", shape(*view),
                             " with row stride ", view->stride(2), "; its rows must be stored rows",
                             " of ", qint8_row_bytes(view->dimension(3)),
                             " bytes (values, then scales), as KVCache<QInt8>::prefix() gives");
    }
  }
  if (q.stride(3) != 1) throw_invalid_argument(where, ": q needs a contiguous last dimension");
  if (k.dimensions() != v.dimensions()) {
    throw_invalid_argument(where, ": k has shape ", shape(k), " but v has shape ", shape(v));
  }
  if (q.dimension(3) <= 0)
    throw_invalid_argument(where, ": head_dim must be positive, q is ", shape(q));
  if (k.dimension(1) <= 0 || q.dimension(1) % k.dimension(1) != 0) {
    throw_invalid_argument(where, ": k has ", k.dimension(1), " heads, which does not divide q's ",
                           q.dimension(1), " heads (q ", shape(q), ", k ", shape(k), ")");
  }
  SdpaParams params = resolve_options(where, options, q.dimension(3));
  check_per_head_options(where, options, q.dimension(1));
  validate_masks(where, params.rules, masks, q.dimension(0), q.dimension(1), q.dimension(2),
                 k.dimension(2));
  // A window of Skv or more excludes nothing (pos(i) - j <= Skv - 1 for every key), so
  // it is clamped there: the same mask, and the kernels' position +- window arithmetic
  // cannot overflow Index for a window such as INT64_MAX.
  params.rules.window = std::min(params.rules.window, std::max<Index>(k.dimension(2), 1));
  return params;
}

// Whether a call multiplies bf16 with the AVX512-BF16 dot products (see Bf16Kernel): the
// prefill kernel's tiles when q, k and v are bf16 and head_dim is even; the decode
// kernel's blocks when k and v are bf16 (q bf16 or float), the build is AVX-512 and
// head_dim is a multiple of 32. kDotProduct insists (std::invalid_argument where neither
// can run) and kConvert declines. kAuto takes them in a decode (`decode`) wherever they
// run: it is bound by memory and by widening bf16 to float, which they save on any CPU
// that has them. In a prefill, bound by the multiplies, it takes them only on a CPU that
// issues them at twice the fp32 FMA rate (cpu_prefers_bf16_dot).
template <typename T, typename KV>
bool use_bf16_dot(const char* where, const SdpaOptions& options, Index head_dim, bool decode) {
  constexpr bool kBf16Cache =
      std::is_same_v<KV, Eigen::bfloat16> && std::is_same_v<acc_t<T>, float>;
  constexpr bool kBf16 = kBf16Cache && std::is_same_v<T, Eigen::bfloat16>;
  const bool cpu = kHasBf16DotKernel && cpu_has_avx512_bf16();
  const bool prefill = kBf16 && FusedBlocking<acc_t<T>>::kLanes % 16 == 0 && head_dim % 2 == 0;
  const bool decode_fits = bf16_dot_decode_fits<acc_t<T>, KV>(head_dim);
  const bool available = cpu && (prefill || decode_fits);
  switch (options.bf16_kernel) {
    case Bf16Kernel::kDotProduct:
      if (kBf16Cache && !available) {
        throw_invalid_argument(where,
                               ": Bf16Kernel::kDotProduct needs AVX512-BF16, and head_dim even "
                               "(bf16 queries) or a multiple of 32 in an AVX-512 build (head_dim ",
                               head_dim, ")");
      }
      return available;
    case Bf16Kernel::kConvert:
      return false;
    case Bf16Kernel::kAuto:
    default:
      return decode ? cpu && decode_fits : cpu && prefill && cpu_prefers_bf16_dot();
  }
}

// Whether decode calls over a QInt8 cache score with int8 dot products (see Int8Kernel):
// float queries, an AVX-512 build (the decode block is then the kernel's 16 keys) and
// AVX-512 VNNI, at any head_dim a QInt8 cache holds (a multiple of 4: a row may end
// mid-group); kDotProduct insists, kDequantize declines.
template <typename T, typename KV>
bool use_int8_dot(const char* where, const SdpaOptions& options, Index head_dim) {
  constexpr bool kInt8 = is_qint8_v<KV> && std::is_same_v<acc_t<T>, float>;
  const bool available = kInt8 && kHasInt8DotKernel && simd::kWidth<float> == kInt8DotKeys &&
                         head_dim % 4 == 0 && cpu_has_avx512_vnni();
  if (options.int8_kernel == Int8Kernel::kDotProduct && kInt8 && !available) {
    throw_invalid_argument(where,
                           ": Int8Kernel::kDotProduct needs AVX-512 VNNI and an AVX-512 build "
                           "(head_dim ",
                           head_dim, ")");
  }
  return available && options.int8_kernel != Int8Kernel::kDequantize;
}

}  // namespace detail

// The attention operator with its options and reusable scratch. One instance per
// thread (or per layer) is the intended use; operator() is not safe to call
// concurrently on the same instance.
// T is the element type of q and out, KV that of k and v (e.g. a bf16 KVCache under
// float activations); both are computed in acc_t<T>.
template <typename T, typename KV = T>
class ScaledDotProductAttention {
 public:
  using Acc = acc_t<T>;
  using Compute = acc_t<T>;

  explicit ScaledDotProductAttention(SdpaOptions options = {},
                                     const Eigen::ThreadPoolDevice* device = nullptr)
      : options_(options), device_(device) {}

  const SdpaOptions& options() const { return options_; }
  void set_options(const SdpaOptions& options) { options_ = options; }
  const Eigen::ThreadPoolDevice* device() const { return device_; }
  void set_device(const Eigen::ThreadPoolDevice* device) { device_ = device; }

  // q (B, H, Sq, D), k and v (B, Hkv, Skv, D) -> out (B, H, Sq, D); any of them may be a
  // strided view (a KVCache prefix, a projection seen through transpose()).
  // lse (B, H, Sq) is written when given.
  void operator()(const ConstView<T, 4>& q, const ConstView<KV, 4>& k, const ConstView<KV, 4>& v,
                  const StridedView<T, 4>& out, const Masks& masks = {},
                  const StridedView<Acc, 3>& lse = {}) {
    constexpr const char* kWhere = "scaled_dot_product_attention";
    detail::SdpaParams params = detail::validate_sdpa(kWhere, q, k, v, options_, masks);
    params.int8_dot = detail::use_int8_dot<T, KV>(kWhere, options_, q.dimension(3));
    detail::check_shape(kWhere, "out", out, q.dimensions(), "q's shape (B, H, Sq, D)");
    if (lse.has_value()) {
      detail::check_shape(kWhere, "lse", lse, {q.dimension(0), q.dimension(1), q.dimension(2)},
                          "(B, H, Sq)");
    }
    empty_rows_.clear();
    if (q.size() == 0) return;
    const detail::MaskPolicy policy(params.rules, masks, q.dimension(0), q.dimension(1),
                                    q.dimension(2), k.dimension(2), params.alibi_slopes);
    if (options_.path == SdpaPath::kReference || detail::simd::kWidth<Compute> == 1) {
      detail::sdpa_reference(q, k, v, detail::ReferenceOutputs<T, Acc>{out, lse, {}}, params,
                             policy, device_);
      return;
    }
    const Index n_rep = q.dimension(1) / k.dimension(1);
    const bool decode = options_.path == SdpaPath::kDecode ||
                        (options_.path == SdpaPath::kAuto &&
                         detail::decode_applies<Compute>(q.dimension(2), n_rep));
    params.bf16_dot = use_bf16_dot(q.dimension(3), decode);
    const detail::KernelProblem<T, KV> problem{q, k, v, out, lse, params};
    if (decode) {
      detail::flash_decode(problem, policy, device_, decode_workspace_, tuning_, empty_rows_);
    } else {
      detail::flash_attention(problem, policy, device_, workspace_, tuning_);
      for (const auto& worker : workspace_.workers) {
        empty_rows_.insert(empty_rows_.end(), worker.empty_rows.begin(), worker.empty_rows.end());
      }
    }
    if (detail::attends_all_when_empty(params.empty_rows, k.dimension(2))) {
      attend_all_in_empty_rows(q, k, v, out, lse, params);
    }
  }

  Tensor<T, 4> operator()(const ConstView<T, 4>& q, const ConstView<KV, 4>& k,
                          const ConstView<KV, 4>& v, const Masks& masks = {}) {
    Tensor<T, 4> out(q.dimensions());
    (*this)(q, k, v, StridedView<T, 4>(out), masks);
    return out;
  }

  // Keys per key tile of the fused kernel; 0 = the default. For tuning only: every value
  // gives the same result up to rounding.
  void set_key_tile(Index key_tile) { tuning_.key_tile = std::max<Index>(0, key_tile); }
  // The packet width of the decode kernel's scores; kAuto chooses by build. For tests and
  // tuning only: every value gives the same result up to rounding.
  void set_decode_score_width(detail::DecodeScoreWidth width) {
    tuning_.decode_score_width = width;
  }
  // Where the decode streams the cache ahead of its reads; kAuto chooses by CPU. For tests
  // and tuning only: it changes no result.
  void set_decode_stream(detail::DecodeStream stream) { tuning_.decode_stream = stream; }

 private:
  bool use_bf16_dot(Index head_dim, bool decode) const {
    return detail::use_bf16_dot<T, KV>("scaled_dot_product_attention", options_, head_dim, decode);
  }

  // KempnerForge's guard for rows whose mask allows no key: such a row attends to every
  // key with no mask and no bias. Rare, so these rows are redone one by one on the
  // reference path.
  void attend_all_in_empty_rows(const ConstView<T, 4>& q, const ConstView<KV, 4>& k,
                                const ConstView<KV, 4>& v, const StridedView<T, 4>& out,
                                const StridedView<Acc, 3>& lse, detail::SdpaParams params) {
    params.rules = detail::MaskRules{};
    params.alibi_slopes = nullptr;
    const Index n_rep = q.dimension(1) / k.dimension(1);
    for (const std::array<Index, 3>& row : empty_rows_) {
      // Named copies, not a structured binding: a C++17 lambda cannot capture one (clang
      // rejects it; C++20 allows it).
      const Index b = row[0], h = row[1], i = row[2];
      const auto one = [&](const auto& view, Index index1) {
        return view.narrow(0, b, 1).narrow(1, index1, 1);
      };
      // The row's own sink (one head of the narrowed problem).
      params.sinks = options_.sinks.empty() ? nullptr : options_.sinks.data() + h;
      const detail::ReferenceOutputs<T, Acc> row_out{
          one(out, h).narrow(2, i, 1), lse.has_value() ? one(lse, h).narrow(2, i, 1) : lse, {}};
      const auto q_row = one(q, h).narrow(2, i, 1);
      const auto k_rows = one(k, h / n_rep), v_rows = one(v, h / n_rep);
      const detail::MaskPolicy unmasked(params.rules, Masks{}, 1, 1, 1, k.dimension(2));
      detail::sdpa_reference(q_row, k_rows, v_rows, row_out, params, unmasked, nullptr);
    }
  }

  SdpaOptions options_;
  const Eigen::ThreadPoolDevice* device_ = nullptr;
  detail::KernelTuning tuning_;
  detail::KernelWorkspace<Compute> workspace_;
  detail::DecodeWorkspace<Compute> decode_workspace_;
  detail::EmptyRows empty_rows_;  // rows with no allowed key, last call
};

template <typename T, typename KV = T>
using Sdpa = ScaledDotProductAttention<T, KV>;

template <typename T>
struct SdpaResult {
  Tensor<T, 4> out;         // (B, H, Sq, D)
  Tensor<acc_t<T>, 3> lse;  // (B, H, Sq); -inf for rows with no allowed key
};

namespace detail {
template <typename X>
using scalar_of_t = typename view_traits<X>::scalar;
// The one mixed combination: float activations over a bf16/fp16/QInt8 cache.
template <typename T, typename KV>
inline constexpr bool is_mixed_precision_v = std::is_same_v<T, float> && is_reduced_storage_v<KV>;
template <typename Q, typename K, typename V, typename = void>
struct is_qkv : std::false_type {};
template <typename Q, typename K, typename V>
struct is_qkv<Q, K, V,
              std::enable_if_t<view_traits<Q>::rank == 4 && view_traits<K>::rank == 4 &&
                               view_traits<V>::rank == 4>>
    : std::bool_constant<std::is_same_v<scalar_of_t<K>, scalar_of_t<V>> &&
                         (std::is_same_v<scalar_of_t<Q>, scalar_of_t<K>> ||
                          is_mixed_precision_v<scalar_of_t<Q>, scalar_of_t<K>>)> {};
template <typename Q, typename K, typename V>
using enable_if_qkv_t = std::enable_if_t<is_qkv<Q, K, V>::value>;
}  // namespace detail

// out[b,h,i,:] = sum_j softmax_j(scale * <q[b,h,i], k[b,h/n_rep,j]>) v[b,h/n_rep,j,:]
// over the keys the options and masks allow. q, k, v may be Tensors, TensorMaps or views.
template <typename Q, typename K, typename V, typename = detail::enable_if_qkv_t<Q, K, V>>
Tensor<detail::scalar_of_t<Q>, 4> scaled_dot_product_attention(
    const Q& q, const K& k, const V& v, const SdpaOptions& options = {}, const Masks& masks = {},
    const Eigen::ThreadPoolDevice* device = nullptr) {
  using T = detail::scalar_of_t<Q>;
  ScaledDotProductAttention<T, detail::scalar_of_t<K>> sdpa(options, device);
  return sdpa(as_const_view(q), as_const_view(k), as_const_view(v), masks);
}

// As scaled_dot_product_attention, also returning the log-sum-exp of the allowed scores
// of every row, so results over disjoint key ranges can be merged exactly.
template <typename Q, typename K, typename V, typename = detail::enable_if_qkv_t<Q, K, V>>
SdpaResult<detail::scalar_of_t<Q>> scaled_dot_product_attention_with_lse(
    const Q& q, const K& k, const V& v, const SdpaOptions& options = {}, const Masks& masks = {},
    const Eigen::ThreadPoolDevice* device = nullptr) {
  using T = detail::scalar_of_t<Q>;
  const auto q_view = as_const_view(q);
  SdpaResult<T> result{
      Tensor<T, 4>(q_view.dimensions()),
      Tensor<acc_t<T>, 3>(q_view.dimension(0), q_view.dimension(1), q_view.dimension(2))};
  ScaledDotProductAttention<T, detail::scalar_of_t<K>> sdpa(options, device);
  sdpa(q_view, as_const_view(k), as_const_view(v), StridedView<T, 4>(result.out), masks,
       StridedView<acc_t<T>, 3>(result.lse));
  return result;
}

// The attention probabilities (B, H, Sq, Skv) through the reference path, for analysis
// (KempnerForge's capture_attention_weights). This is the one call that builds an
// Sq x Skv result, because that result is what it returns.
template <typename Q, typename K, typename = detail::enable_if_qkv_t<Q, K, K>>
Tensor<acc_t<detail::scalar_of_t<Q>>, 4> attention_weights(
    const Q& q, const K& k, const SdpaOptions& options = {}, const Masks& masks = {},
    const Eigen::ThreadPoolDevice* device = nullptr) {
  using T = detail::scalar_of_t<Q>;
  using Acc = acc_t<T>;
  const auto q_view = as_const_view(q);
  const auto k_view = as_const_view(k);
  const detail::SdpaParams params =
      detail::validate_sdpa("attention_weights", q_view, k_view, k_view, options, masks);
  Tensor<Acc, 4> probs(q_view.dimension(0), q_view.dimension(1), q_view.dimension(2),
                       k_view.dimension(2));
  const detail::MaskPolicy policy(params.rules, masks, q_view.dimension(0), q_view.dimension(1),
                                  q_view.dimension(2), k_view.dimension(2), params.alibi_slopes);
  detail::sdpa_reference(q_view, k_view, k_view,
                         detail::ReferenceOutputs<T, Acc>{{}, {}, StridedView<Acc, 4>(probs)},
                         params, policy, device);
  return probs;
}

}  // namespace attnforge
