// Greedy generation with a small random attention stack: prefill a prompt, decode one token
// at a time with one KVCache per layer, then check the cached run against a cache-free one.
// With --kv-cache bf16 or int8 the same model also generates with bf16 or QInt8 caches
// (float activations) and reports how far that moves it from the float-cache run.
//
//   generate [--quick] [--threads N] [--prompt N] [--tokens M] [--kv-cache fp32|bf16|int8]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "tiny_model.hpp"

namespace af = attnforge;
using examples::TinyModel;
using examples::uniform_pm1;

namespace {

enum class KvCacheKind { kFp32, kBf16, kInt8 };

struct Config {
  examples::ModelConfig model;
  af::Index prompt = -1, tokens = -1;  // -1: the default of the chosen size
  int threads = 1;
  KvCacheKind kv_cache = KvCacheKind::kFp32;
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// One greedy generation of c.tokens tokens after a prompt.
struct Generation {
  std::vector<int> sequence;    // the prompt, then the token fed at each step (and the last)
  std::vector<int> greedy;      // the model's greedy token at each of the c.tokens steps
  af::Tensor<float, 2> hidden;  // (total - 1, dim): the final layer's output at every position
  double prefill_s = 0.0, decode_s = 0.0;
  std::size_t cache_bytes = 0;  // all layers' key and value storage
};

// Prefills the prompt, then decodes one token per step with one KVCache<CacheT> per layer.
// Each step feeds the greedy token, or with `forced` (a sequence of length prompt + tokens)
// forced's token, so that two runs can be compared on identical inputs.
template <typename CacheT>
Generation generate(TinyModel& model, const Config& c, const std::vector<int>& prompt,
                    const std::vector<int>* forced = nullptr) {
  const examples::ModelConfig& m = c.model;
  const af::Index total = c.prompt + c.tokens;
  std::vector<af::KVCache<CacheT>> caches;
  for (af::Index l = 0; l < m.n_layers; ++l) {
    caches.emplace_back(1, total, m.n_kv_heads, m.head_dim());
  }
  Generation g;
  g.sequence = prompt;
  g.hidden = af::Tensor<float, 2>(total - 1, m.dim);
  const auto step = [&](const af::Tensor<float, 3>& h, af::Index last) {
    g.greedy.push_back(model.next_token(&h(0, last, 0)));
    const af::Index pos = static_cast<af::Index>(g.sequence.size());
    g.sequence.push_back(forced ? (*forced)[static_cast<std::size_t>(pos)] : g.greedy.back());
  };

  const auto prefill_start = std::chrono::steady_clock::now();
  af::Tensor<float, 3> h = model.forward(prompt, 0, &caches);
  step(h, c.prompt - 1);
  g.prefill_s = seconds_since(prefill_start);
  std::copy_n(h.data(), h.size(), g.hidden.data());

  // Each step feeds only the newest token; the caches hold the keys and values of the rest.
  const auto decode_start = std::chrono::steady_clock::now();
  for (af::Index pos = c.prompt; pos < total - 1; ++pos) {
    h = model.forward({g.sequence.back()}, pos, &caches);
    step(h, 0);
    std::copy_n(h.data(), m.dim, &g.hidden(pos, 0));
  }
  g.decode_s = seconds_since(decode_start);
  for (const af::KVCache<CacheT>& cache : caches) {
    g.cache_bytes += sizeof(CacheT) * static_cast<std::size_t>(cache.key_storage().size() +
                                                               cache.value_storage().size());
  }
  return g;
}

void print_generation(const Config& c, const Generation& g) {
  std::printf("prefill %ld tokens: %.0f tokens/s; decode %ld tokens: %.0f tokens/s\n", c.prompt,
              c.prompt / g.prefill_s, c.tokens - 1,
              c.tokens > 1 ? (c.tokens - 1) / g.decode_s : 0.0);
  std::printf("generated:");
  for (af::Index i = c.prompt; i < c.prompt + c.tokens; ++i) std::printf(" %d", g.sequence[i]);
  std::printf("\n");
}

// The same sequence in one cache-free pass must give every position the same hidden state
// and the same next token as the cached run.
bool check_without_cache(TinyModel& model, const Config& c, const Generation& g) {
  const af::Index total = c.prompt + c.tokens;
  const af::Tensor<float, 3> full =
      model.forward(std::vector<int>(g.sequence.begin(), g.sequence.end() - 1));
  const af::Tensor<float, 0> max_diff = (full.chip(0, 0) - g.hidden).abs().maximum();
  const af::Tensor<float, 0> max_abs = full.abs().maximum();
  af::Index token_mismatches = 0;
  for (af::Index p = c.prompt - 1; p < total - 1; ++p) {
    token_mismatches += model.next_token(&full(0, p, 0)) != g.sequence[p + 1];
  }
  // The two runs round differently (one row vs many rows per product), which leaves ~1e-6
  // relative; a real fault (wrong position, stale cache row) moves hidden states by O(1).
  const bool ok = token_mismatches == 0 && max_diff() <= 1e-4f * max_abs();
  std::printf(
      "no-cache check: %ld/%ld tokens differ, max |hidden diff| %.3g (max |hidden| %.3g): %s\n",
      token_mismatches, c.tokens, max_diff(), max_abs(), ok ? "OK" : "MISMATCH");
  return ok;
}

// Generates with CacheT caches and compares with the float-cache run `reference`: freely
// (its own greedy tokens; once one differs, the inputs differ and so does everything after),
// and forced along reference's tokens, which measures the hidden states' error on identical
// inputs at every generated step. A report, not a check: how much rounding or quantizing the
// cache moves the model is what the example shows. (This model's queries are sharpened 8x,
// see tiny_model.hpp, so its scores amplify the keys' rounding more than a trained model's
// would: bf16 keys and values, 2^-9 relative, move its hidden states by about 1%.)
template <typename CacheT>
void compare_with_fp32(TinyModel& model, const Config& c, const std::vector<int>& prompt,
                       const Generation& reference, const char* name) {
  const Generation free_run = generate<CacheT>(model, c, prompt);
  const Generation forced_run = generate<CacheT>(model, c, prompt, &reference.sequence);
  std::printf("\nkv cache %s: ", name);
  print_generation(c, free_run);

  af::Index differ = 0, first_differing = -1, forced_differ = 0;
  for (af::Index i = 0; i < c.tokens; ++i) {
    const std::size_t at = static_cast<std::size_t>(c.prompt + i);
    if (free_run.sequence[at] != reference.sequence[at]) {
      if (first_differing < 0) first_differing = i;
      ++differ;
    }
    forced_differ += forced_run.greedy[static_cast<std::size_t>(i)] != reference.sequence[at];
  }
  // The positions whose hidden state chose a generated token: the prompt's last, then every
  // decode step.
  const Eigen::array<af::Index, 2> offsets{c.prompt - 1, 0}, extents{c.tokens, c.model.dim};
  const af::Tensor<float, 0> max_diff =
      (forced_run.hidden.slice(offsets, extents) - reference.hidden.slice(offsets, extents))
          .abs()
          .maximum();
  const af::Tensor<float, 0> max_abs = reference.hidden.slice(offsets, extents).abs().maximum();
  std::printf("%s vs fp32 cache, free generation: %ld/%ld tokens differ", name, differ, c.tokens);
  if (first_differing >= 0) std::printf(" (the first is token %ld)", first_differing + 1);
  std::printf(
      "\n%s vs fp32 cache, fed the fp32 run's tokens: max |hidden diff| %.3g (max |hidden| "
      "%.3g, relative %.2g) over %ld steps; %ld/%ld greedy tokens differ\n",
      name, max_diff(), max_abs(), max_diff() / max_abs(), c.tokens, forced_differ, c.tokens);
  std::printf(
      "cache memory (%ld layers x %ld positions): %s %zu bytes, fp32 %zu bytes (%.3f of fp32)\n",
      c.model.n_layers, c.prompt + c.tokens, name, free_run.cache_bytes, reference.cache_bytes,
      static_cast<double>(free_run.cache_bytes) / static_cast<double>(reference.cache_bytes));
}

}  // namespace

int main(int argc, char** argv) {
  Config c;
  bool quick = false;
  bool usage_error = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else if (i + 1 < argc && !std::strcmp(argv[i], "--threads")) {
      c.threads = std::atoi(argv[++i]);
    } else if (i + 1 < argc && !std::strcmp(argv[i], "--prompt")) {
      c.prompt = std::atol(argv[++i]);
    } else if (i + 1 < argc && !std::strcmp(argv[i], "--tokens")) {
      c.tokens = std::atol(argv[++i]);
    } else if (i + 1 < argc && !std::strcmp(argv[i], "--kv-cache")) {
      const char* kind = argv[++i];
      if (!std::strcmp(kind, "fp32")) {
        c.kv_cache = KvCacheKind::kFp32;
      } else if (!std::strcmp(kind, "bf16")) {
        c.kv_cache = KvCacheKind::kBf16;
      } else if (!std::strcmp(kind, "int8")) {
        c.kv_cache = KvCacheKind::kInt8;
      } else {
        usage_error = true;
      }
    } else {
      usage_error = true;
    }
  }
  examples::ModelConfig& m = c.model;
  if (quick) m.dim = 128, m.n_heads = 4, m.n_layers = 2, m.vocab = 256;
  if (c.prompt == -1) c.prompt = quick ? 16 : 128;
  if (c.tokens == -1) c.tokens = quick ? 16 : 64;
  if (usage_error || c.threads < 1 || c.prompt < 1 || c.tokens < 1) {
    std::fprintf(stderr,
                 "usage: generate [--quick] [--threads N] [--prompt N] [--tokens M] "
                 "[--kv-cache fp32|bf16|int8]\n");
    return 2;
  }

  // The caller owns the threads; the library only borrows them through the device (the
  // calling thread works too, so a pool of N threads gives N workers of which one idles).
  Eigen::ThreadPool pool(c.threads);
  Eigen::ThreadPoolDevice device(&pool, c.threads);
  m.max_seq_len = c.prompt + c.tokens;
  TinyModel model(m, &device);
  std::printf("%ld layers, dim %ld, n_heads %ld, n_kv_heads %ld, vocab %ld, threads %d\n",
              m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.vocab, c.threads);

  std::vector<int> prompt;
  std::uint64_t state = 7;
  for (af::Index i = 0; i < c.prompt; ++i) {
    prompt.push_back(static_cast<int>((uniform_pm1(state) + 1.0f) * 0.5f * (m.vocab - 1)));
  }
  const Generation fp32 = generate<float>(model, c, prompt);
  print_generation(c, fp32);
  const bool ok = check_without_cache(model, c, fp32);

  if (c.kv_cache == KvCacheKind::kBf16) {
    compare_with_fp32<Eigen::bfloat16>(model, c, prompt, fp32, "bf16");
  } else if (c.kv_cache == KvCacheKind::kInt8) {
    compare_with_fp32<af::QInt8>(model, c, prompt, fp32, "int8");
  }
  return ok ? 0 : 1;
}
