// Options of scaled_dot_product_attention that are not per-token data.
#pragma once

#include <optional>
#include <vector>

#include "attnforge/mask.hpp"
#include "attnforge/tensor.hpp"

namespace attnforge {

// What a query row with no allowed key produces (possible with key_padding_mask or
// doc_ids that do not cover a query's own position).
enum class EmptyRowPolicy {
  // Output 0 and lse = -inf, as FlashAttention and FlexAttention do. A softmax over an
  // empty set has no value; 0 is the additive identity that merges correctly with other
  // partial results, where NaN would poison them.
  kZeros,
  // KempnerForge's guard: such a row attends to all Skv keys with no mask at all.
  kAttendAll,
};

// Which implementation computes the attention. kAuto picks the decode kernel when
// Sq * n_rep is small (a decode step, a few speculative tokens) and the fused prefill
// kernel otherwise; the others exist so tests and benchmarks can compare paths.
enum class SdpaPath {
  kAuto,
  kReference,  // plain loops, double accumulation (the baseline the kernels are tested against)
  kFused,      // the blocked online-softmax kernel (detail/sdpa_kernel.hpp)
  kDecode,     // the split-KV decode kernel for few query rows (detail/sdpa_decode.hpp)
};

// How bf16 is multiplied: the prefill kernel's tiles when q, k and v are bf16, and the
// decode kernel's blocks over bf16 keys and values (bf16 or float queries; an AVX-512
// build, head_dim a multiple of 32). kAuto takes the AVX512-BF16 dot products where the
// CPU has them (checked once at run time) in the decode, which they spare the widening to
// float, and in the prefill only on CPUs that issue them at twice the fp32 FMA rate
// (AMD's; elsewhere the prefill converts, which is faster there); kConvert always
// converts to float and uses the float kernels; kDotProduct insists on the dot products
// (std::invalid_argument where they cannot run). The decode by dot products rounds each
// query row (before the scale, which multiplies the scores) and each softmax weight to
// bf16 (see docs/design.md, "bf16 caches"). Other element types ignore it.
enum class Bf16Kernel { kAuto, kDotProduct, kConvert };

// How the decode path scores float queries against a QInt8 cache. kAuto takes the int8
// dot products (AVX-512 VNNI, checked once at run time) where they run: an AVX-512 build,
// any head_dim; they quantize each query row per step like a cache row (see
// docs/design.md, "Quantized caches"). kDequantize always dequantizes the keys and scores
// in float; kDotProduct insists on the dot products (std::invalid_argument where they
// cannot run). Other cache types ignore it.
enum class Int8Kernel { kAuto, kDotProduct, kDequantize };

struct SdpaOptions {
  // Multiplies <q, k>; default 1 / sqrt(head_dim).
  std::optional<double> scale;
  // Bottom-right aligned: query i (absolute position Skv - Sq + i) sees keys j <= its position.
  bool causal = false;
  // > 0: additionally requires position(i) - j < window.
  Index window = 0;
  // > 0: scores become softcap * tanh(score / softcap) after scaling, before masking.
  double softcap = 0.0;
  EmptyRowPolicy empty_rows = EmptyRowPolicy::kZeros;
  SdpaPath path = SdpaPath::kAuto;
  Bf16Kernel bf16_kernel = Bf16Kernel::kAuto;
  Int8Kernel int8_kernel = Int8Kernel::kAuto;
  // ALiBi (BLOOM, MPT): one slope per query head (H values, empty = off); the score of
  // query i and key j gets -slope[h] * (pos(i) - j), computed on the fly.
  std::vector<double> alibi_slopes;
  // Attention sinks (gpt-oss, StreamingLLM): one logit per query head (H values, empty =
  // off) that joins every row's softmax denominator but contributes no value; lse
  // includes it.
  std::vector<double> sinks;
};

namespace detail {

// Options after defaults are resolved and validated; what the kernels receive.
struct SdpaParams {
  double scale = 1.0;
  double softcap = 0.0;
  MaskRules rules;
  EmptyRowPolicy empty_rows = EmptyRowPolicy::kZeros;
  bool bf16_dot = false;                 // use the AVX512-BF16 dot products (bf16 k and v)
  bool int8_dot = false;                 // decode scores by int8 dot products (QInt8 cache only)
  const double* alibi_slopes = nullptr;  // (H), into the caller's options
  const double* sinks = nullptr;         // (H), into the caller's options
};

}  // namespace detail
}  // namespace attnforge
