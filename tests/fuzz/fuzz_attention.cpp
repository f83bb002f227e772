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
// The two cache scenarios run over a float cache, or over a QInt8 cache (float keys and
// values quantized as they are appended): its shadow then holds each row as the cache must
// hold it, quantized and dequantized (within half a quantization step of each value, which
// the harness checks), and the brute force runs on those values, so the accuracy budget is
// the float one (the quantization error is the cache's, not the kernels'). A QInt8 cache's
// head_dim comes from wider sizes (cache_head_dim), so its rows span several scale groups.
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

#include "fuzz_harness.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider fdp(data, size);
  // The input's last byte picks the scenario (byte % 5, as the seed corpus was written)
  // and, for the two cache scenarios, the cache's storage: QInt8 when byte / 5 % 4 == 3,
  // float otherwise. Every seed decodes as it did before QInt8 caches existed; the cache
  // seeds whose byte says QInt8 now run over a QInt8 cache.
  const std::uint8_t choice = fdp.ConsumeIntegral<std::uint8_t>();
  const bool qint8 = choice / 5 % 4 == 3;
  switch (choice % 5) {
    case 0:
      fuzz::fuzz_sdpa<float>(fdp);
      break;
    case 1:
      fuzz::fuzz_sdpa<double>(fdp);
      break;
    case 2:
      fuzz::stats.qint8_inputs[fuzz::kCacheScenario] += qint8;
      qint8 ? fuzz::fuzz_kv_cache<attnforge::QInt8>(fdp) : fuzz::fuzz_kv_cache<float>(fdp);
      break;
    case 3:
      fuzz::fuzz_attention(fdp);
      break;
    default:
      fuzz::stats.qint8_inputs[fuzz::kPagedScenario] += qint8;
      qint8 ? fuzz::fuzz_paged<attnforge::QInt8>(fdp) : fuzz::fuzz_paged<float>(fdp);
      break;
  }
  return 0;
}
