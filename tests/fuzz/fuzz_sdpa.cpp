// The fuzz target's SDPA and Attention scenarios (fuzz_attention.cpp describes them).
#include "fuzz_harness.hpp"

namespace fuzz {

// ---------------------------------------------------------------------------------------
// SDPA.

template <typename T>
std::string describe(const af::SdpaOptions& o, const af::Tensor<T, 4>& q, const af::Tensor<T, 4>& k,
                     int entry, bool pooled) {
  const char* paths[] = {"kAuto", "kReference", "kFused", "kDecode"};
  return std::string(sizeof(T) == 4 ? "float" : "double") + " q " +
         af::detail::shape_string(q.dimensions()) + " k " +
         af::detail::shape_string(k.dimensions()) + " path " + paths[static_cast<int>(o.path)] +
         " causal " + std::to_string(o.causal) + " window " + std::to_string(o.window) +
         " softcap " + sci(o.softcap) + " scale " +
         (o.scale ? sci(*o.scale) : std::string("default")) + " attend_all " +
         std::to_string(o.empty_rows == af::EmptyRowPolicy::kAttendAll) + " entry " +
         std::to_string(entry) + " pooled " + std::to_string(pooled);
}

enum class Break {
  kNone,
  kKBatch,
  kKHeadDim,
  kHeadsNotDividing,
  kVShape,
  kDocIdsShape,
  kKvDocIdsShape,
  kKvDocIdsAlone,
  kPaddingShape,
  kQStride,
  kOutShape,
  kLseShape,
  kAttnMaskShape,
  kAttnBiasShape,
  kPerHeadCount,
  kCount
};

// attn_mask / attn_bias of (B|1, H|1, Sq, Skv) with random broadcast dimensions (one more
// query row when broken); ALiBi slopes and sinks (one value short when broken).
template <typename Mask>
void fuzz_element_masks(FuzzedDataProvider& fdp, Index batch, Index n_heads, Index q_len,
                        Index kv_len, Break broken, std::uint32_t seed, af::Tensor<Mask, 4>& mask,
                        af::Tensor<float, 4>& bias, af::SdpaOptions& options) {
  const int kinds = fdp.ConsumeIntegralInRange<int>(0, 7);  // bits: mask, bias, per-head options
  std::mt19937 gen(seed + 7);
  const auto dims = [&](bool bad) {
    return std::array<Index, 4>{fdp.ConsumeBool() ? batch : 1, fdp.ConsumeBool() ? n_heads : 1,
                                q_len + (bad ? 1 : 0), kv_len};
  };
  if ((kinds & 1) != 0 || broken == Break::kAttnMaskShape) {
    mask = af::Tensor<Mask, 4>(dims(broken == Break::kAttnMaskShape));
    const int density = fdp.ConsumeIntegralInRange<int>(0, 4);  // 0: all closed
    for (Index i = 0; i < mask.size(); ++i)
      mask.data()[i] = static_cast<Mask>(static_cast<int>(gen() % 4) < density);
  }
  if ((kinds & 2) != 0 || broken == Break::kAttnBiasShape) {
    bias = af::Tensor<float, 4>(dims(broken == Break::kAttnBiasShape));
    const double magnitude = pick<double>(fdp, {0.5, 2.0, 30.0});
    for (Index i = 0; i < bias.size(); ++i) {
      bias.data()[i] = gen() % 8 == 0
                           ? -std::numeric_limits<float>::infinity()
                           : static_cast<float>(magnitude * (af::test::uniform01(gen) - 0.5));
    }
  }
  if ((kinds & 4) != 0 || broken == Break::kPerHeadCount) {
    const Index count = n_heads - (broken == Break::kPerHeadCount ? 1 : 0);
    for (Index h = 0; h < count; ++h) {
      if (fdp.ConsumeBool())
        options.alibi_slopes.push_back(pick<double>(fdp, {0.0, 0.01, 0.125, 0.5, 2.0}));
    }
    if (!options.alibi_slopes.empty())
      options.alibi_slopes.resize(static_cast<std::size_t>(count), 0.25);
    if (fdp.ConsumeBool() || options.alibi_slopes.empty()) {
      for (Index h = 0; h < count; ++h)
        options.sinks.push_back(pick<double>(fdp, {-30.0, -1.0, 0.0, 2.0, 40.0}));
    }
  }
}

template <typename T>
void fuzz_sdpa(FuzzedDataProvider& fdp) {
  using Acc = af::acc_t<T>;
  const Index batch = pick<Index>(fdp, {1, 1, 1, 2, 2, 0});
  Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(1, 3);
  const Index n_rep = fdp.ConsumeIntegralInRange<Index>(1, 5);
  const Index head_dim = fdp.ConsumeIntegralInRange<Index>(1, 24);
  const bool long_kv = fdp.ConsumeIntegralInRange<int>(0, 15) == 0;  // several decode chunks
  const Index q_len = fdp.ConsumeIntegralInRange<Index>(0, long_kv ? 2 : 24);
  const Index kv_len = long_kv ? fdp.ConsumeIntegralInRange<Index>(1000, 2100)
                               : fdp.ConsumeIntegralInRange<Index>(0, 40);
  const Break broken = fdp.ConsumeIntegralInRange<int>(0, 3) != 0
                           ? Break::kNone
                           : static_cast<Break>(fdp.ConsumeIntegralInRange<int>(
                                 0, static_cast<int>(Break::kCount) - 1));
  if (broken == Break::kHeadsNotDividing && n_kv_heads == 1) n_kv_heads = 2;
  const Index n_heads = n_kv_heads * n_rep + (broken == Break::kHeadsNotDividing ? 1 : 0);

  // Options: valid values mostly; one input in four draws from lists with invalid ones.
  af::SdpaOptions options;
  const bool free_options = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr Index kMaxIndex = std::numeric_limits<Index>::max();
  if (fdp.ConsumeIntegralInRange<int>(0, 9) > 0) {
    options.scale = free_options ? pick<double>(fdp, {0.0, 0.3, 1.0, -0.7, 1e3, kNaN, kInf})
                                 : pick<double>(fdp, {0.0, 0.05, 0.3, 1.0, 3.0, -0.7});
  }
  options.causal = fdp.ConsumeBool() && (free_options || q_len <= kv_len);
  options.window = free_options ? pick<Index>(fdp, {0, 1, 5, 1500, kMaxIndex, -1})
                                : pick<Index>(fdp, {0, 0, 0, 1, 2, 3, 5, 17, 64, 1500, kMaxIndex});
  options.softcap = free_options ? pick<double>(fdp, {0.0, 2.0, 1e6, -1.0, kNaN, kInf})
                                 : pick<double>(fdp, {0.0, 0.0, 0.0, 0.5, 2.0, 30.0, 1e6});
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path = pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kReference,
                                          af::SdpaPath::kFused, af::SdpaPath::kDecode});

  // Shapes of k and v (one of them possibly broken).
  const Index k_batch = batch + (broken == Break::kKBatch ? 1 : 0);
  const Index k_head_dim = head_dim + (broken == Break::kKHeadDim ? 1 : 0);
  af::Tensor<T, 4> q(batch, n_heads, q_len, head_dim);
  af::Tensor<T, 4> k(k_batch, n_kv_heads, kv_len, k_head_dim);
  af::Tensor<T, 4> v(k_batch, n_kv_heads, kv_len + (broken == Break::kVShape ? 1 : 0), k_head_dim);
  const bool specials = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  const double magnitude = pick<double>(fdp, {1.0, 1.0, 1.0, 4.0, 30.0, 100.0});
  const std::uint32_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  fill(q, seed, magnitude, specials, fdp);
  fill(k, seed + 1, magnitude, specials, fdp);
  fill(v, seed + 2, 1.0, specials, fdp);

  // Masks. Key ids: runs of equal ids (packed documents) or small random ids, sometimes at
  // the int64 limits; the queries' ids are the keys' at the queries' positions, or random.
  af::test::DenseMasks dense;
  dense.causal = options.causal;
  dense.window = options.window;
  const int docs = fdp.ConsumeIntegralInRange<int>(0, 3);  // 0: none
  af::Tensor<af::DocId, 2> q_ids, kv_ids;
  af::Masks masks;
  if (docs > 0) {
    const af::DocId base = fdp.ConsumeBool() ? 0 : std::numeric_limits<af::DocId>::max() - 1000;
    kv_ids = af::Tensor<af::DocId, 2>(batch, kv_len + (broken == Break::kKvDocIdsShape ? 1 : 0));
    for (Index i = 0; i < kv_ids.size(); ++i) {
      kv_ids.data()[i] = base + (docs == 1 ? (i % std::max<Index>(1, kv_ids.dimension(1))) / 7
                                           : fdp.ConsumeIntegralInRange<af::DocId>(0, 3));
    }
    q_ids = af::Tensor<af::DocId, 2>(batch, q_len + (broken == Break::kDocIdsShape ? 1 : 0));
    for (Index b = 0; b < q_ids.dimension(0); ++b) {
      for (Index i = 0; i < q_ids.dimension(1); ++i) {
        const Index j = kv_len - q_len + i;
        q_ids(b, i) = docs != 3 && j >= 0 && j < kv_ids.dimension(1)
                          ? kv_ids(b, j)
                          : base + fdp.ConsumeIntegralInRange<af::DocId>(0, 4);
      }
    }
    const bool pass_kv_ids =
        q_len != kv_len || fdp.ConsumeBool() || broken == Break::kKvDocIdsShape;
    if (broken != Break::kKvDocIdsAlone) masks.doc_ids = q_ids;
    if (pass_kv_ids || broken == Break::kKvDocIdsAlone) masks.kv_doc_ids = kv_ids;
    // A mask tensor without elements is indistinguishable from an absent one (a view is
    // present when it has data): the library treats it as absent, and so does the model.
    if (masks.doc_ids.has_value()) dense.q_docs = q_ids;
    if (masks.doc_ids.has_value() && masks.kv_doc_ids.has_value()) dense.kv_docs = kv_ids;
  }
  af::Tensor<bool, 2> padding;
  if (fdp.ConsumeBool() || broken == Break::kPaddingShape) {
    padding = af::Tensor<bool, 2>(batch, kv_len + (broken == Break::kPaddingShape ? 2 : 0));
    const int density = fdp.ConsumeIntegralInRange<int>(0, 4);  // 0: all padded
    std::mt19937 gen(seed + 3);
    for (Index i = 0; i < padding.size(); ++i)
      padding.data()[i] = static_cast<int>(gen() % 4) < density;
    masks.key_padding_mask = padding;
    if (masks.key_padding_mask.has_value()) dense.key_padding = padding;
  }

  // Element masks (bool or uint8), score biases, ALiBi and sinks.
  af::Tensor<bool, 4> bool_mask;
  af::Tensor<std::uint8_t, 4> byte_mask;
  af::Tensor<float, 4> bias;
  if (fdp.ConsumeBool()) {
    fuzz_element_masks(fdp, batch, n_heads, q_len, kv_len, broken, seed, bool_mask, bias, options);
    if (bool_mask.size() > 0) masks.attn_mask = bool_mask;
  } else {
    fuzz_element_masks(fdp, batch, n_heads, q_len, kv_len, broken, seed, byte_mask, bias, options);
    if (byte_mask.size() > 0) masks.attn_mask = byte_mask;
  }
  if (bias.size() > 0) masks.attn_bias = bias;
  if (masks.attn_mask.has_value()) {
    af::Tensor<bool, 4> as_bool(masks.attn_mask.dimensions());
    for (Index i = 0; i < as_bool.size(); ++i) {
      as_bool.data()[i] = bool_mask.size() > 0 ? bool_mask.data()[i] : byte_mask.data()[i] != 0;
    }
    dense.attn_mask = as_bool;
  }
  if (masks.attn_bias.has_value()) dense.attn_bias = bias;

  // The harness's own reading of docs/design.md's validation rules.
  Expected expected;
  expected.bad(masks.attn_mask.has_value() && broken == Break::kAttnMaskShape, "attn_mask shape");
  expected.bad(masks.attn_bias.has_value() && broken == Break::kAttnBiasShape, "attn_bias shape");
  expected.bad(
      broken == Break::kPerHeadCount && (!options.alibi_slopes.empty() || !options.sinks.empty()),
      "alibi_slopes / sinks count");
  expected.bad(k_batch != batch || v.dimension(0) != batch, "batch sizes differ");
  expected.bad(k_head_dim != head_dim, "head_dim differs");
  expected.bad(v.dimensions() != k.dimensions(), "k and v shapes differ");
  expected.bad(n_heads % n_kv_heads != 0 || n_heads == 0, "kv heads do not divide heads");
  expected.bad(options.scale && !std::isfinite(*options.scale), "non-finite scale");
  expected.bad(!(options.softcap >= 0.0) || !std::isfinite(options.softcap), "bad softcap");
  expected.bad(options.window < 0, "negative window");
  expected.bad(options.causal && q_len > kv_len, "causal with Sq > Skv");
  const bool has_q_ids = masks.doc_ids.has_value(), has_kv_ids = masks.kv_doc_ids.has_value();
  expected.bad(!has_q_ids && has_kv_ids, "kv_doc_ids without doc_ids");
  expected.bad(has_q_ids && broken == Break::kDocIdsShape, "doc_ids shape");
  expected.bad(has_q_ids && has_kv_ids && broken == Break::kKvDocIdsShape, "kv_doc_ids shape");
  expected.bad(has_q_ids && !has_kv_ids && q_len != kv_len, "doc_ids without kv ids, Sq != Skv");
  expected.bad(masks.key_padding_mask.has_value() && broken == Break::kPaddingShape,
               "padding shape");
  // An empty q skips the q-side checks only where the library documents it; here every
  // listed rule applies whatever the sizes, so the verdict stands for empty tensors too.

  const bool use_device = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const Eigen::ThreadPoolDevice* device = use_device ? &pool_device() : nullptr;
  const int entry = fdp.ConsumeIntegralInRange<int>(0, 2);

  af::Tensor<T, 4> out;
  af::Tensor<Acc, 3> lse;
  bool have_lse = false;
  Outcome outcome = Outcome::kOk;
  if (entry == 0) {
    outcome = outcome_of(
        [&] { out = af::scaled_dot_product_attention(q, k, v, options, masks, device); });
  } else if (entry == 1) {
    outcome = outcome_of([&] {
      auto r = af::scaled_dot_product_attention_with_lse(q, k, v, options, masks, device);
      out = r.out;
      lse = r.lse;
    });
    have_lse = true;
  } else {
    // A reused object (scratch sized by an earlier, different call) writing into caller
    // buffers filled with a sentinel; a rejected call must leave them as they were.
    af::Sdpa<T> sdpa(options, device);
    af::SdpaOptions warm = options;
    warm.causal = false;
    warm.window = 0;
    warm.softcap = 0.0;
    warm.scale.reset();
    warm.alibi_slopes.clear();
    warm.sinks.clear();
    sdpa.set_options(warm);
    const af::Tensor<T, 4> wq = af::test::random_normal<T, 4>({1, 2, 9, 4}, 5);
    const af::Tensor<T, 4> wkv = af::test::random_normal<T, 4>({1, 1, 70, 4}, 6);
    (void)sdpa(wq, wkv, wkv);
    sdpa.set_options(options);
    out = af::Tensor<T, 4>(batch, n_heads, q_len + (broken == Break::kOutShape ? 1 : 0), head_dim);
    lse = af::Tensor<Acc, 3>(batch, n_heads, q_len + (broken == Break::kLseShape ? 1 : 0));
    out.setConstant(T(7));
    lse.setConstant(Acc(7));
    expected.bad(broken == Break::kOutShape, "out shape");
    // lse is optional: without elements it counts as absent (as the masks do).
    expected.bad(broken == Break::kLseShape && lse.size() > 0, "lse shape");
    if (broken == Break::kQStride && q.size() > 0) {
      // q seen with a last-dimension stride of 2: must be rejected, not read.
      const af::ConstView<T, 4> strided(
          q.data(), {batch, n_heads, q_len, (head_dim + 1) / 2},
          {n_heads * q_len * head_dim, q_len * head_dim, head_dim, 2});
      const Outcome o = outcome_of([&] { sdpa(strided, k, v, af::StridedView<T, 4>(out), masks); });
      check(o == Outcome::kInvalid, "q with a strided last dimension was not rejected");
      return;
    }
    outcome = outcome_of(
        [&] { sdpa(q, k, v, af::StridedView<T, 4>(out), masks, af::StridedView<Acc, 3>(lse)); });
    have_lse = true;
    if (outcome != Outcome::kOk) {
      for (Index i = 0; i < out.size(); ++i)
        check(out.data()[i] == T(7), "rejected call wrote out");
      for (Index i = 0; i < lse.size(); ++i)
        check(lse.data()[i] == Acc(7), "rejected call wrote lse");
    }
  }
  check_outcome(expected, outcome, "sdpa");
  ++stats.calls[kSdpaScenario];
  if (outcome != Outcome::kOk) {
    ++stats.rejected[kSdpaScenario];
    return;
  }

  check(out.dimension(0) == batch && out.dimension(1) == n_heads && out.dimension(2) == q_len &&
            out.dimension(3) == head_dim,
        "out has the wrong shape");
  if (out.size() == 0) return;
  if (specials) {
    // NaN never turns into a number: a row whose query, or the key of a key it may attend
    // to, holds a NaN has a NaN score, so its output and lse must be NaN on every path
    // (README.md, "NaN and Inf inputs").
    const Index n_rep_ok = n_heads / n_kv_heads;
    const auto has_nan = [](const T* row, Index n) {
      for (Index d = 0; d < n; ++d) {
        if (std::isnan(row[d])) return true;
      }
      return false;
    };
    const bool attend_all = options.empty_rows == af::EmptyRowPolicy::kAttendAll;
    for (Index b = 0; b < batch; ++b) {
      for (Index h = 0; h < n_heads; ++h) {
        const auto allowed = af::test::dense_allowed(dense, b, h, q_len, kv_len);
        for (Index i = 0; i < q_len; ++i) {
          const auto& row = allowed[static_cast<std::size_t>(i)];
          const bool empty = std::none_of(row.begin(), row.end(), [](bool x) { return x; });
          if (empty && (!attend_all || kv_len == 0)) continue;  // no score at all
          bool reads_nan = has_nan(&q(b, h, i, 0), head_dim);
          for (Index j = 0; j < kv_len && !reads_nan; ++j) {
            if (empty || row[static_cast<std::size_t>(j)]) {
              reads_nan = has_nan(&k(b, h / n_rep_ok, j, 0), head_dim);
            }
          }
          if (!reads_nan) continue;
          for (Index d = 0; d < head_dim; ++d) {
            if (!std::isnan(out(b, h, i, d))) {
              fail("row (" + std::to_string(b) + ", " + std::to_string(h) + ", " +
                   std::to_string(i) + ") has a NaN score but out[" + std::to_string(d) + "] = " +
                   sci(out(b, h, i, d)) + "; " + describe(options, q, k, entry, device != nullptr));
            }
          }
          if (have_lse) check(std::isnan(lse(b, h, i)), "a row with a NaN score has a non-NaN lse");
        }
      }
    }
    return;
  }

  // Against the brute force, within the stated budget.
  const auto [exact, budget, v_scale] = reference_of(q, k, v, dense, options);
  const double out_err = af::test::max_abs_diff(out, exact.out) / v_scale;
  if (!(out_err <= budget.out)) {
    fail("out error " + sci(out_err) + " > budget " + sci(budget.out));
  }
  if (have_lse) {
    const double lse_err = af::test::max_abs_diff(lse, exact.lse);
    if (!(lse_err <= budget.lse)) {
      fail("lse error " + sci(lse_err) + " > budget " + sci(budget.lse));
    }
  }
  ++stats.compared[kSdpaScenario];
  // Rows with no allowed key: exactly 0 under kZeros.
  if (options.empty_rows != af::EmptyRowPolicy::kAttendAll) {
    for (Index r = 0; r < exact.lse.size(); ++r) {
      if (exact.lse.data()[r] != -af::test::kInf) continue;
      for (Index d = 0; d < head_dim; ++d)
        check(out.data()[r * head_dim + d] == T(0), "empty row not 0");
    }
  }
  // The thread count changes nothing.
  if (device != nullptr) {
    const af::Tensor<T, 4> serial = af::scaled_dot_product_attention(q, k, v, options, masks);
    check(af::test::bitwise_equal(serial, out), "pooled result differs from the serial one");
  }
}

// ---------------------------------------------------------------------------------------
// Attention.

// max over rows of sum |w[r, :]| (the infinity norm: |W x|_max <= it * |x|_max).
double row_norm(const af::ConstView<float, 2>& w) {
  double worst = 0.0;
  for (Index r = 0; r < w.dimension(0); ++r) {
    double sum = 0.0;
    for (Index c = 0; c < w.dimension(1); ++c) sum += std::abs(static_cast<double>(w(r, c)));
    worst = std::max(worst, sum);
  }
  return worst;
}

void fuzz_attention(FuzzedDataProvider& fdp) {
  using T = float;
  // Mostly a valid module (so forward is exercised); one input in four draws every
  // constructor argument freely, invalid combinations included.
  const bool free_args = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const Index n_kv_heads = fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 3);
  const Index n_heads = free_args ? fdp.ConsumeIntegralInRange<Index>(0, 6)
                                  : n_kv_heads * fdp.ConsumeIntegralInRange<Index>(1, 3);
  const Index head_dim_arg =
      free_args ? pick<Index>(fdp, {0, 0, 2, 4, 6, 8, 3, -2}) : pick<Index>(fdp, {2, 4, 6, 8, 0});
  const Index dim = head_dim_arg == 0 && !free_args
                        ? n_heads * 2 * fdp.ConsumeIntegralInRange<Index>(1, 4)
                        : fdp.ConsumeIntegralInRange<Index>(free_args ? 0 : 1, 40);
  const bool qk_norm = fdp.ConsumeBool();
  const double norm_eps =
      free_args
          ? pick<double>(fdp, {1e-5, 1e-5, 0.0, -1.0, std::numeric_limits<double>::quiet_NaN()})
          : 1e-5;
  Expected ctor;
  const Index head_dim = head_dim_arg == 0 && n_heads > 0 ? dim / n_heads : head_dim_arg;
  ctor.bad(dim <= 0 || n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0, "non-positive size");
  ctor.bad(n_kv_heads > 0 && n_heads % n_kv_heads != 0, "heads not a multiple of kv heads");
  ctor.bad(head_dim % 2 != 0, "odd head_dim");
  ctor.bad(!(norm_eps > 0.0), "norm_eps");
  std::optional<af::Attention<T>> fast, ref;
  const Outcome made =
      outcome_of([&] { fast.emplace(dim, n_heads, n_kv_heads, head_dim_arg, qk_norm, norm_eps); });
  check_outcome(ctor, made, "Attention constructor");
  if (made != Outcome::kOk) return;
  ref.emplace(dim, n_heads, n_kv_heads, head_dim_arg, qk_norm, norm_eps);
  const std::uint64_t seed = fdp.ConsumeIntegral<std::uint32_t>();
  fast->reset_parameters(seed);
  ref->reset_parameters(seed);

  af::SdpaOptions options;
  const bool free_options = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  options.window = free_options
                       ? pick<Index>(fdp, {0, 3, std::numeric_limits<Index>::max(), -2})
                       : pick<Index>(fdp, {0, 0, 0, 1, 3, 9, std::numeric_limits<Index>::max()});
  options.softcap = free_options ? pick<double>(fdp, {0.0, 5.0, -1.0})
                                 : pick<double>(fdp, {0.0, 0.0, 0.0, 5.0, 50.0});
  if (fdp.ConsumeBool()) {
    options.scale = free_options ? pick<double>(fdp, {0.1, std::numeric_limits<double>::infinity()})
                                 : pick<double>(fdp, {0.1, 1.0});
  }
  options.empty_rows =
      fdp.ConsumeBool() ? af::EmptyRowPolicy::kAttendAll : af::EmptyRowPolicy::kZeros;
  options.path =
      pick<af::SdpaPath>(fdp, {af::SdpaPath::kAuto, af::SdpaPath::kFused, af::SdpaPath::kDecode});
  // ALiBi slopes and sinks: per-head options, one value per query head (or one short).
  const Index per_head = n_heads - (free_options && fdp.ConsumeBool() ? 1 : 0);
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0)
    options.alibi_slopes.assign(static_cast<std::size_t>(std::max<Index>(per_head, 0)), 0.125);
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0)
    options.sinks.assign(static_cast<std::size_t>(std::max<Index>(per_head, 0)), 1.5);
  // The module is always causal: set_sdpa_options rejects causal = false.
  options.causal = !free_options || fdp.ConsumeIntegralInRange<int>(0, 3) != 0;
  // set_sdpa_options validates: it throws exactly for bad options and keeps the old ones.
  Expected option_check;
  option_check.bad(!options.causal, "causal = false");
  option_check.bad(options.window < 0, "window");
  option_check.bad(options.softcap < 0, "softcap");
  option_check.bad(options.scale && !std::isfinite(*options.scale), "scale");
  option_check.bad(
      (!options.alibi_slopes.empty() &&
       static_cast<Index>(options.alibi_slopes.size()) != n_heads) ||
          (!options.sinks.empty() && static_cast<Index>(options.sinks.size()) != n_heads),
      "alibi_slopes / sinks count");
  const af::SdpaOptions before = fast->sdpa_options();
  const Outcome set = outcome_of([&] { fast->set_sdpa_options(options); });
  check_outcome(option_check, set, "Attention::set_sdpa_options");
  if (set != Outcome::kOk) {
    if (fast->sdpa_options().causal != before.causal ||
        fast->sdpa_options().window != before.window ||
        fast->sdpa_options().softcap != before.softcap) {
      fail("Attention::set_sdpa_options changed the options it rejected");
    }
    return;
  }
  af::SdpaOptions ref_options = options;
  ref_options.path = af::SdpaPath::kReference;
  ref->set_sdpa_options(ref_options);
  if (fdp.ConsumeBool()) fast->set_device(&pool_device());

  // The cache (sometimes of the wrong geometry) and the session's steps.
  const Index batch = fdp.ConsumeIntegralInRange<Index>(1, 2);
  const int cache_kind =
      pick<int>(fdp, {0, 1, 2, 0, 1, 2, 3});  // none, plain, records ids, mismatched
  const Index max_len = fdp.ConsumeIntegralInRange<Index>(1, 16);
  std::optional<af::KVCache<T>> fast_cache, ref_cache;
  if (cache_kind > 0) {
    const Index cache_heads = n_kv_heads + (cache_kind == 3 ? 1 : 0);
    fast_cache.emplace(batch, max_len, cache_heads, head_dim, cache_kind == 2);
    ref_cache.emplace(batch, max_len, cache_heads, head_dim, cache_kind == 2);
  }
  const af::RotaryEmbedding<T> rope(
      head_dim + (fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? 2 : 0), 24);
  double x_max = 0.0;  // over every step so far: bounds the cached values too
  const double wv_norm = row_norm(fast->weights().wv), wo_norm = row_norm(fast->weights().wo);
  const double wq_norm = row_norm(fast->weights().wq), wk_norm = row_norm(fast->weights().wk);
  Index pos = 0;
  const int steps = fdp.ConsumeIntegralInRange<int>(1, 3);
  for (int step = 0; step < steps && fdp.remaining_bytes() > 0; ++step) {
    const Index seq_len = fdp.ConsumeIntegralInRange<Index>(0, 6);
    // Mostly consistent arguments; one step in four may break any of them.
    const bool free_step = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
    const Index x_dim = dim + (free_step && fdp.ConsumeBool() ? 1 : 0);
    const Index start = free_step && fdp.ConsumeBool() ? 20 : pos;
    af::Tensor<T, 3> x = af::test::random_uniform<T, 3>({batch, seq_len, x_dim},
                                                        static_cast<std::uint32_t>(seed + step));
    const bool give_ids =
        free_step || !fast_cache ? fdp.ConsumeBool() : fast_cache->records_doc_ids();
    const bool give_padding = fdp.ConsumeBool();
    const Index cached = fast_cache ? fast_cache->seq_len() : 0;
    const Index pad_len = cached + seq_len + (free_step && fdp.ConsumeBool() ? 1 : 0);
    af::Tensor<af::DocId, 2> ids(batch, seq_len);
    for (Index i = 0; i < ids.size(); ++i) ids.data()[i] = (pos * batch + i) / 5;
    af::Tensor<bool, 2> padding(batch, pad_len);
    for (Index i = 0; i < padding.size(); ++i) padding.data()[i] = (i * 7 + step) % 5 != 0;
    const af::ConstView<af::DocId, 2> ids_arg =
        give_ids ? af::ConstView<af::DocId, 2>(ids) : af::ConstView<af::DocId, 2>();
    const af::ConstView<bool, 2> pad_arg =
        give_padding ? af::ConstView<bool, 2>(padding) : af::ConstView<bool, 2>();
    // Empty mask tensors count as absent (see fuzz_sdpa).
    const bool has_ids = ids_arg.has_value(), has_padding = pad_arg.has_value();

    Expected e;
    e.bad(rope.head_dim() != head_dim, "rope head_dim");
    e.bad(start + seq_len > rope.cos().dimension(0), "positions beyond the rope table");
    e.bad(x_dim != dim, "x's last dimension");
    e.bad(has_padding && pad_len != cached + seq_len, "padding length");
    if (fast_cache) {
      e.bad(fast_cache->n_kv_heads() != n_kv_heads, "cache geometry");
      e.bad(has_ids != fast_cache->records_doc_ids(), "doc ids iff the cache records them");
      e.overflow = cached + seq_len > max_len;
    }
    const af::Tensor<T, 4> keys_before =
        fast_cache ? fast_cache->key_storage() : af::Tensor<T, 4>();
    const Index len_before = fast_cache ? fast_cache->seq_len() : 0;
    af::Tensor<T, 3> out_fast, out_ref;
    const Outcome o = outcome_of([&] {
      out_fast =
          fast->forward(x, rope, start, fast_cache ? &*fast_cache : nullptr, ids_arg, pad_arg);
    });
    check_outcome(e, o, "Attention::forward");
    ++stats.calls[kAttentionScenario];
    if (o != Outcome::kOk) {
      ++stats.rejected[kAttentionScenario];
      if (fast_cache) {
        check(fast_cache->seq_len() == len_before &&
                  af::test::bitwise_equal(fast_cache->key_storage(), keys_before),
              "a rejected forward changed the cache");
      }
      continue;
    }
    out_ref = ref->forward(x, rope, start, ref_cache ? &*ref_cache : nullptr, ids_arg, pad_arg);
    if (fast_cache) {
      // Keys and values are computed before the SDPA path matters: identical caches.
      check(af::test::bitwise_equal(fast_cache->key_storage(), ref_cache->key_storage()) &&
                af::test::bitwise_equal(fast_cache->value_storage(), ref_cache->value_storage()),
            "caches of the fast and the reference module differ");
    }
    pos = start + seq_len;
    x_max = std::max(x_max, af::test::max_abs(x));
    // Bound on the SDPA difference, carried through wo: |q_d|, |k_d| <= |x| * ||w||_inf
    // (with QK-norm <= sqrt(D) * max|norm weight| = sqrt(D), the weights being ones),
    // times sqrt(2) for RoPE's rotation of a pair; |v| <= |x| * ||wv||_inf.
    const double d = static_cast<double>(head_dim);
    const double q_max = std::sqrt(2.0) * (qk_norm ? std::sqrt(d) : x_max * wq_norm);
    const double k_max = std::sqrt(2.0) * (qk_norm ? std::sqrt(d) : x_max * wk_norm);
    const double scale = options.scale.value_or(1.0 / std::sqrt(d));
    af::test::BudgetInputs in;
    in.head_dim = head_dim;
    in.max_keys = (fast_cache ? fast_cache->seq_len() : seq_len);
    in.max_score = std::abs(scale) * d * q_max * k_max;
    in.softcap = options.softcap;
    in.max_abs_lse = in.max_score + std::log(static_cast<double>(std::max<Index>(1, in.max_keys)));
    const double sdpa_bound = af::test::sdpa_budget<T>(options.path, in).out +
                              af::test::sdpa_budget<T>(af::SdpaPath::kReference, in).out;
    // The output projection itself is the same float code in both modules.
    const double bound = sdpa_bound * x_max * wv_norm * wo_norm;
    ++stats.compared[kAttentionScenario];
    const double err = af::test::max_abs_diff(out_fast, out_ref);
    if (!(err <= bound)) {
      fail("Attention::forward differs from the reference path by " + sci(err) + " > " +
           sci(bound));
    }
  }
}

template void fuzz_sdpa<float>(FuzzedDataProvider& fdp);
template void fuzz_sdpa<double>(FuzzedDataProvider& fdp);

}  // namespace fuzz
