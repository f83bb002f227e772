// libFuzzer target for the validating entry points of attnforge.
//
// Each input is decoded (FuzzedDataProvider) into one of four scenarios, with small
// shapes so an input runs in well under a millisecond:
//   SDPA       shapes, options (scale, causal, window, softcap, empty-row policy, path),
//              doc ids, kv doc ids, padding, an optional thread pool, and at most one
//              deliberately broken argument; called through scaled_dot_product_attention,
//              scaled_dot_product_attention_with_lse and a reused Sdpa object writing
//              into caller buffers.
//   KVCache    a cache (with or without document ids) and a sequence of updates (some of
//              wrong shape or overflowing), truncates and resets, against a shadow model;
//              a QInt8 cache also serves Sdpa<float, QInt8> calls after each operation,
//              checked against the brute force on its dequantized keys and values.
//   Attention  a module (some constructor arguments invalid), options, and forward steps
//              with and without a cache, doc ids and padding, some invalid.
//   Paged      a PagedKVCache of a few blocks (with or without document ids) and a sequence
//              of add_sequence, appends to one sequence and ragged appends to several
//              (some of wrong shape, naming unknown or repeated sequences, with malformed
//              cu_seqlens, or needing more blocks than are free), forks, truncates and
//              frees, against a shadow model of every sequence's rows and of which blocks
//              fork and copy-on-write share; and PagedAttention calls over ragged batches
//              of its sequences, checked per sequence against the brute force.
// The two cache scenarios run over a float cache, a bf16 cache (float keys and values
// rounded to bf16 as they are appended) or a QInt8 cache (quantized as they are appended):
// the shadow then holds each row as the cache must hold it, rounded (bit for bit the
// rounding to nearest even) or quantized and dequantized (within half a quantization step
// of each value), which the harness checks, and the brute force runs on those values, so
// the accuracy budget is the float one (the storage error is the cache's, not the
// kernels'). Where the decode path multiplies the stored form by dot products (int8 on
// quantized queries, bf16 on bf16-rounded queries and softmax weights), the brute force
// runs on the queries it multiplies and the bf16 weights' rounding adds to the budget
// (accuracy_budget.hpp, 5. and 6.). A reduced cache's head_dim comes from its own sizes
// (cache_head_dim): for QInt8 rows spanning several scale groups, for bf16 multiples of
// 32, which the bf16 dot products need, and odd sizes. Over a bf16 pool, every other
// PagedAttention call takes bf16 queries and outputs (fused: the bf16 dot-product prefill
// over key tiles split across the pool's runs), held to with_bf16_activations' budget.
// Every call must either throw std::invalid_argument / std::length_error exactly when the
// harness's own reading of docs/design.md says the arguments are invalid, leaving outputs and
// the cache untouched, or succeed with a result within the stated accuracy budget
// (tests/accuracy_budget.hpp) of the double brute force (tests/test_util.hpp). Inputs
// may contain NaN/Inf; then only the absence of crashes, hangs and out-of-bounds access
// (ASan/UBSan) and the shape of the result are checked. A failed check aborts, so
// libFuzzer keeps the input as a crash.
//
// This file decodes an input's scenario; fuzz_sdpa.cpp (SDPA and Attention),
// fuzz_kv_cache.cpp and fuzz_paged.cpp hold the scenarios, fuzz_harness.hpp what they share.
// Build: the `fuzz` CMake preset (clang, -fsanitize=fuzzer,address,undefined);
// run: scripts/test.sh fuzz (README.md, "Reliability").
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "fuzz_harness.hpp"

namespace {

// A cache scenario over a cache of storage S, counting the inputs that run over a reduced
// one.
template <typename S>
void run_cache_scenario(fuzz::Scenario scenario, FuzzedDataProvider& fdp) {
  if constexpr (!std::is_same_v<S, float>) ++fuzz::reduced_cache_stats<S>().inputs[scenario];
  scenario == fuzz::kCacheScenario ? fuzz::fuzz_kv_cache<S>(fdp) : fuzz::fuzz_paged<S>(fdp);
}

// The cache's storage from the input's last byte (see below): 3 QInt8, 2 bf16, else float.
void run_cache_scenario(fuzz::Scenario scenario, int storage, FuzzedDataProvider& fdp) {
  switch (storage) {
    case 3:
      run_cache_scenario<attnforge::QInt8>(scenario, fdp);
      break;
    case 2:
      run_cache_scenario<Eigen::bfloat16>(scenario, fdp);
      break;
    default:
      run_cache_scenario<float>(scenario, fdp);
      break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  // The input's last byte picks the scenario (byte % 5, as the seed corpus was written)
  // and, for the two cache scenarios, the cache's storage by byte / 5 % 4: 3 QInt8, 2 bf16,
  // float otherwise. Every seed decodes as it did before reduced caches existed; the cache
  // seeds whose byte says QInt8 or bf16 now run over such a cache (those saying bf16 ran
  // over a float cache until bf16 caches were fuzzed).
  const std::uint8_t choice = fdp.ConsumeIntegral<std::uint8_t>();
  const int storage = choice / 5 % 4;
  switch (choice % 5) {
    case 0:
      fuzz::fuzz_sdpa<float>(fdp);
      break;
    case 1:
      fuzz::fuzz_sdpa<double>(fdp);
      break;
    case 2:
      run_cache_scenario(fuzz::kCacheScenario, storage, fdp);
      break;
    case 3:
      fuzz::fuzz_attention(fdp);
      break;
    default:
      run_cache_scenario(fuzz::kPagedScenario, storage, fdp);
      break;
  }
  return 0;
}
