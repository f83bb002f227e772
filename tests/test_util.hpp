// Helpers shared by the attnforge tests: deterministic random tensors, error measures,
// caller thread pools, and an independent brute-force attention in double precision.
//
// The brute force is written from docs/design.md's formulas alone, as plainly as possible: it
// builds the whole (Sq, Skv) allowed-matrix of every batch row, then a softmax over the
// allowed keys. Tests may build dense masks (they are the independent check); the
// library itself never does.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "attnforge/attnforge.hpp"

namespace attnforge::test {

inline constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------
// Deterministic random tensors: std::mt19937 is specified bit-exactly, and the mappings
// below are written out (the std:: distributions are implementation-defined), so every
// platform draws the same values for a seed. They are also several times faster, which
// matters for the large cases under ASan.

// Uniform in [0, 1) from one 32-bit draw.
inline double uniform01(std::mt19937& gen) { return static_cast<double>(gen()) * 0x1.0p-32; }

// Sorted packed-document ids: each row is runs of one id, each run 1 to max_run tokens.
inline Tensor<DocId, 2> packed_doc_ids(Index batch, Index len, Index max_run, std::mt19937& gen) {
  const auto run_length = [&] {
    return 1 + static_cast<Index>(gen() % static_cast<std::uint32_t>(max_run));
  };
  Tensor<DocId, 2> ids(batch, len);
  for (Index b = 0; b < batch; ++b) {
    DocId doc = 0;
    Index left = run_length();
    for (Index j = 0; j < len; ++j, --left) {
      if (left == 0) {
        ++doc;
        left = run_length();
      }
      ids(b, j) = doc;
    }
  }
  return ids;
}

template <typename T, int Rank>
Tensor<T, Rank> random_uniform(const std::array<Index, Rank>& dims, std::uint32_t seed,
                               double lo = -1.0, double hi = 1.0) {
  Tensor<T, Rank> t(dims);
  std::mt19937 gen(seed);
  for (Index i = 0; i < t.size(); ++i)
    t.data()[i] = static_cast<T>(lo + (hi - lo) * uniform01(gen));
  return t;
}

// Normal(0, stddev^2) by the Box-Muller transform.
template <typename T, int Rank>
Tensor<T, Rank> random_normal(const std::array<Index, Rank>& dims, std::uint32_t seed,
                              double stddev = 1.0) {
  constexpr double kTwoPi = 6.283185307179586477;
  Tensor<T, Rank> t(dims);
  std::mt19937 gen(seed);
  for (Index i = 0; i < t.size(); i += 2) {
    const double radius = stddev * std::sqrt(-2.0 * std::log(1.0 - uniform01(gen)));  // 1 - u > 0
    const double angle = kTwoPi * uniform01(gen);
    t.data()[i] = static_cast<T>(radius * std::cos(angle));
    if (i + 1 < t.size()) t.data()[i + 1] = static_cast<T>(radius * std::sin(angle));
  }
  return t;
}

// Normal(0, 1) float values rounded to T (a 16-bit type, or float itself).
template <typename T, int Rank>
Tensor<T, Rank> rounded_normal(const std::array<Index, Rank>& dims, std::uint32_t seed) {
  const Tensor<float, Rank> f = random_normal<float, Rank>(dims, seed);
  Tensor<T, Rank> t(dims);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<T>(f.data()[i]);
  return t;
}

template <typename T, int Rank>
Tensor<double, Rank> to_double(const Tensor<T, Rank>& t) {
  Tensor<double, Rank> out(t.dimensions());
  for (Index i = 0; i < t.size(); ++i) out.data()[i] = static_cast<double>(t.data()[i]);
  return out;
}

// ---------------------------------------------------------------------------------------
// Error measures. Each returns +inf when the shapes differ, so a shape bug fails loudly.

template <typename A, typename B>
bool same_dims(const A& a, const B& b) {
  if (a.dimensions().size() != b.dimensions().size()) return false;
  for (std::size_t i = 0; i < a.dimensions().size(); ++i) {
    if (static_cast<Index>(a.dimensions()[i]) != static_cast<Index>(b.dimensions()[i])) {
      return false;
    }
  }
  return true;
}

// max |a - b| over all elements; NaN anywhere counts as an infinite error.
template <typename A, typename B>
double max_abs_diff(const A& a, const B& b) {
  if (!same_dims(a, b)) return kInf;
  double worst = 0.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]);
    const double y = static_cast<double>(b.data()[i]);
    if (x == y) continue;  // also equal infinities
    const double d = std::abs(x - y);
    if (!(d <= worst)) worst = std::isnan(d) ? kInf : d;
  }
  return worst;
}

// The output's scale: max |t|.
template <typename A>
double max_abs(const A& t) {
  double m = 0.0;
  for (Index i = 0; i < t.size(); ++i) m = std::max(m, std::abs(static_cast<double>(t.data()[i])));
  return m;
}

// max |actual - reference| relative to the reference's scale max |reference|. An all-zero
// reference (e.g. every row empty) makes this the absolute error over a tiny floor.
template <typename A, typename B>
double error_relative_to_scale(const A& actual, const B& reference) {
  constexpr double kTiny = 1e-30;
  return max_abs_diff(actual, reference) / std::max(max_abs(reference), kTiny);
}

// For log-sum-exp values: -inf must match -inf exactly; finite values are compared
// relative to max(1, |reference|).
template <typename A, typename B>
double lse_error(const A& actual, const B& reference) {
  if (!same_dims(actual, reference)) return kInf;
  double worst = 0.0;
  for (Index i = 0; i < actual.size(); ++i) {
    const double x = static_cast<double>(actual.data()[i]);
    const double r = static_cast<double>(reference.data()[i]);
    if (std::isinf(r) || std::isinf(x) || std::isnan(x)) {
      if (x != r) return kInf;
      continue;
    }
    worst = std::max(worst, std::abs(x - r) / std::max(1.0, std::abs(r)));
  }
  return worst;
}

template <typename A>
bool has_nan(const A& t) {
  for (Index i = 0; i < t.size(); ++i) {
    if (std::isnan(static_cast<double>(t.data()[i]))) return true;
  }
  return false;
}

// Same shape and the same bytes (so -inf == -inf, and +0 != -0 would be caught).
template <typename A, typename B>
bool bitwise_equal(const A& a, const B& b) {
  using Sa = std::remove_const_t<std::remove_pointer_t<decltype(a.data())>>;
  using Sb = std::remove_const_t<std::remove_pointer_t<decltype(b.data())>>;
  static_assert(std::is_same_v<Sa, Sb>, "bitwise_equal compares tensors of one element type");
  if (!same_dims(a, b)) return false;
  return a.size() == 0 ||
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(Sa)) == 0;
}

// ---------------------------------------------------------------------------------------
// Caller-owned thread pools, created once per process (threads are costly under ASan).

inline const Eigen::ThreadPoolDevice& pool_device(int n_threads) {
  struct Pool {
    explicit Pool(int n) : pool(n), device(&pool, n) {}
    Eigen::ThreadPool pool;
    Eigen::ThreadPoolDevice device;
  };
  static std::array<std::unique_ptr<Pool>, 8> pools;
  auto& slot = pools.at(static_cast<std::size_t>(n_threads));
  if (!slot) slot = std::make_unique<Pool>(n_threads);
  return slot->device;
}

// ---------------------------------------------------------------------------------------
// The brute-force reference.

struct DenseMasks {
  bool causal = false;
  Index window = 0;                            // 0: none
  std::optional<Tensor<DocId, 2>> q_docs;      // (B, Sq)
  std::optional<Tensor<DocId, 2>> kv_docs;     // (B, Skv); absent: q_docs are the key ids too
  std::optional<Tensor<bool, 2>> key_padding;  // (B, Skv), true = may attend
  std::optional<Tensor<bool, 4>> attn_mask;    // (B|1, H|1, Sq, Skv), true = may attend
  std::optional<Tensor<float, 4>> attn_bias;   // (B|1, H|1, Sq, Skv), added; -inf excludes
};

struct DenseOptions {
  std::optional<double> scale;  // default 1 / sqrt(D)
  double softcap = 0.0;         // 0: off
  bool attend_all_when_empty = false;
  std::vector<double> alibi_slopes;  // (H) or empty
  std::vector<double> sinks;         // (H) or empty
};

// Element (b, h, i, j) of a (B|1, H|1, Sq, Skv) tensor, broadcasting dimensions of size 1.
template <typename T>
T broadcast_at(const Tensor<T, 4>& t, Index b, Index h, Index i, Index j) {
  return t(t.dimension(0) == 1 ? 0 : b, t.dimension(1) == 1 ? 0 : h, i, j);
}

struct DenseResult {
  Tensor<double, 4> out;    // (B, H, Sq, D)
  Tensor<double, 3> lse;    // (B, H, Sq)
  Tensor<double, 4> probs;  // (B, H, Sq, Skv)
  Index empty_rows = 0;     // (b, h, i) rows with no allowed key, before any policy
};

// docs/design.md: query i sits at pos(i) = Skv - Sq + i; causal allows j <= pos(i); a window W
// requires pos(i) - j < W; doc ids must be equal; padding must be true.
inline std::vector<std::vector<bool>> dense_allowed(const DenseMasks& m, Index b, Index q_len,
                                                    Index kv_len) {
  std::vector<std::vector<bool>> allowed(static_cast<std::size_t>(q_len),
                                         std::vector<bool>(static_cast<std::size_t>(kv_len)));
  for (Index i = 0; i < q_len; ++i) {
    const Index pos = kv_len - q_len + i;
    for (Index j = 0; j < kv_len; ++j) {
      bool ok = true;
      if (m.causal && !(j <= pos)) ok = false;
      if (m.window > 0 && !(pos - j < m.window)) ok = false;
      if (m.q_docs) {
        const DocId kv_doc = m.kv_docs ? (*m.kv_docs)(b, j) : (*m.q_docs)(b, j);
        if ((*m.q_docs)(b, i) != kv_doc) ok = false;
      }
      if (m.key_padding && !(*m.key_padding)(b, j)) ok = false;
      allowed[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)] = ok;
    }
  }
  return allowed;
}

// docs/design.md: the score is scale * <q, k>, softcapped, plus attn_bias and ALiBi's
// -slope_h * (pos(i) - j); keys allowed by every rule (and with a bias > -inf) take part;
// a sink logit joins the denominator without a value. A row with no allowed key gives 0
// (lse -inf, or the sink), or under attend-all every key with no mask and no bias.
// dense_allowed for one head: also attn_mask and a -inf attn_bias.
inline std::vector<std::vector<bool>> dense_allowed(const DenseMasks& m, Index b, Index h, Index q_len,
                                                    Index kv_len) {
  std::vector<std::vector<bool>> allowed = dense_allowed(m, b, q_len, kv_len);
  for (Index i = 0; i < q_len; ++i) {
    for (Index j = 0; j < kv_len; ++j) {
      const bool element = (!m.attn_mask || broadcast_at(*m.attn_mask, b, h, i, j)) &&
                           (!m.attn_bias || broadcast_at(*m.attn_bias, b, h, i, j) != -std::numeric_limits<float>::infinity());
      if (!element) allowed[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)] = false;
    }
  }
  return allowed;
}

inline DenseResult dense_sdpa(const Tensor<double, 4>& q, const Tensor<double, 4>& k,
                              const Tensor<double, 4>& v, const DenseMasks& masks = {},
                              const DenseOptions& options = {}) {
  const Index batch = q.dimension(0), n_heads = q.dimension(1), q_len = q.dimension(2);
  const Index head_dim = q.dimension(3), n_kv_heads = k.dimension(1), kv_len = k.dimension(2);
  const Index n_rep = n_heads / n_kv_heads;
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim)));
  DenseResult r;
  r.out = Tensor<double, 4>(batch, n_heads, q_len, head_dim);
  r.lse = Tensor<double, 3>(batch, n_heads, q_len);
  r.probs = Tensor<double, 4>(batch, n_heads, q_len, kv_len);
  r.out.setZero();
  r.probs.setZero();
  std::vector<double> scores(static_cast<std::size_t>(kv_len));
  for (Index b = 0; b < batch; ++b) {
    for (Index h = 0; h < n_heads; ++h) {
      const auto allowed = dense_allowed(masks, b, h, q_len, kv_len);
      const Index g = h / n_rep;  // repeat_interleave(n_rep, dim=1)
      const double sink = options.sinks.empty() ? -kInf : options.sinks[static_cast<std::size_t>(h)];
      for (Index i = 0; i < q_len; ++i) {
        std::vector<bool> row = allowed[static_cast<std::size_t>(i)];
        const bool empty = std::none_of(row.begin(), row.end(), [](bool x) { return x; });
        const bool attend_all = empty && options.attend_all_when_empty && kv_len > 0;
        if (empty) {
          ++r.empty_rows;
          if (!attend_all) {
            r.lse(b, h, i) = sink;  // out and probs stay 0
            continue;
          }
          row.assign(row.size(), true);
        }
        const double* q_row = &q(b, h, i, 0);
        double row_max = sink;
        for (Index j = 0; j < kv_len; ++j) {
          if (!row[static_cast<std::size_t>(j)]) continue;
          const double* k_row = &k(b, g, j, 0);
          double dot = 0.0;
          for (Index d = 0; d < head_dim; ++d) dot += q_row[d] * k_row[d];
          double s = scale * dot;
          if (options.softcap > 0.0) s = options.softcap * std::tanh(s / options.softcap);
          if (!attend_all) {
            if (masks.attn_bias) s += broadcast_at(*masks.attn_bias, b, h, i, j);
            const double pos = static_cast<double>(kv_len - q_len + i);
            if (!options.alibi_slopes.empty()) s -= options.alibi_slopes[static_cast<std::size_t>(h)] * (pos - static_cast<double>(j));
          }
          scores[static_cast<std::size_t>(j)] = s;
          row_max = std::max(row_max, s);
        }
        double sum = std::exp(sink - row_max);
        for (Index j = 0; j < kv_len; ++j) {
          if (row[static_cast<std::size_t>(j)]) {
            sum += std::exp(scores[static_cast<std::size_t>(j)] - row_max);
          }
        }
        r.lse(b, h, i) = row_max + std::log(sum);
        for (Index j = 0; j < kv_len; ++j) {
          if (!row[static_cast<std::size_t>(j)]) continue;
          const double p = std::exp(scores[static_cast<std::size_t>(j)] - row_max) / sum;
          r.probs(b, h, i, j) = p;
          const double* v_row = &v(b, g, j, 0);
          double* out_row = &r.out(b, h, i, 0);
          for (Index d = 0; d < head_dim; ++d) out_row[d] += p * v_row[d];
        }
      }
    }
  }
  return r;
}

// The library's mask arguments viewing the tensors held by `m` (which must outlive them).
inline Masks library_masks(const DenseMasks& m) {
  Masks masks;
  if (m.q_docs) masks.doc_ids = *m.q_docs;
  if (m.kv_docs) masks.kv_doc_ids = *m.kv_docs;
  if (m.key_padding) masks.key_padding_mask = *m.key_padding;
  if (m.attn_mask) masks.attn_mask = *m.attn_mask;
  if (m.attn_bias) masks.attn_bias = *m.attn_bias;
  return masks;
}

// The queries of several B = 1 problems (each seqs[s].q (1, H, n_s, D), n_s =
// batch.new_tokens(s)) packed as PagedAttention takes them, (total, H, D), and each
// problem's Masks with the keys' document ids left to the cache's records.
template <typename Seq>
std::pair<Tensor<float, 3>, std::vector<Masks>> pack_ragged_queries(const std::vector<Seq>& seqs,
                                                                    const RaggedBatch& batch) {
  const Index n_heads = seqs.front().q.dimension(1), head_dim = seqs.front().q.dimension(3);
  std::pair<Tensor<float, 3>, std::vector<Masks>> packed{
      Tensor<float, 3>(batch.total_tokens(), n_heads, head_dim), {}};
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    const Index first = batch.first_token(static_cast<Index>(s));
    for (Index h = 0; h < n_heads; ++h)
      for (Index i = 0; i < batch.new_tokens(static_cast<Index>(s)); ++i)
        for (Index d = 0; d < head_dim; ++d) packed.first(first + i, h, d) = seqs[s].q(0, h, i, d);
    Masks m = library_masks(seqs[s].masks);
    m.kv_doc_ids = {};
    packed.second.push_back(m);
  }
  return packed;
}

// The fused kernel's tile plan of a problem with H = 1 (tile classes and key spans do
// not depend on the heads without element masks).
inline detail::TilePlan tile_plan(const DenseMasks& m, const Masks& masks, Index batch, Index q_len,
                                  Index kv_len, Index positions, Index key_tile) {
  detail::TilePlan plan;
  plan.build(detail::MaskPolicy(detail::MaskRules{m.causal, m.window}, masks, batch, 1, q_len, kv_len),
             positions, key_tile);
  return plan;
}

inline SdpaOptions library_options(const DenseMasks& m, const DenseOptions& o,
                                   SdpaPath path = SdpaPath::kAuto) {
  SdpaOptions options;
  options.scale = o.scale;
  options.causal = m.causal;
  options.window = m.window;
  options.softcap = o.softcap;
  options.empty_rows =
      o.attend_all_when_empty ? EmptyRowPolicy::kAttendAll : EmptyRowPolicy::kZeros;
  options.path = path;
  options.alibi_slopes = o.alibi_slopes;
  options.sinks = o.sinks;
  return options;
}

// The default path, the reference, and each fast kernel explicitly (so each stays covered
// whatever kAuto picks for a size; the decode kernel is correct for any Sq, only slower).
inline constexpr SdpaPath kAllPaths[] = {SdpaPath::kAuto, SdpaPath::kReference, SdpaPath::kFused,
                                         SdpaPath::kDecode};

inline const char* path_name(SdpaPath path) {
  switch (path) {
    case SdpaPath::kReference:
      return "kReference";
    case SdpaPath::kFused:
      return "kFused";
    case SdpaPath::kDecode:
      return "kDecode";
    default:
      return "kAuto";
  }
}

}  // namespace attnforge::test
