// What the CPU the program runs on does well, asked once at run time, for the choices
// between kernel variants that give the same result up to rounding. Each answer is a
// fixed rule about the CPU, not a timing, so a program gives the same bits on every run.
#pragma once

namespace attnforge::detail {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ATTNFORGE_CPU_QUERY(expression)    \
  static const bool answer = (expression); \
  return answer
#else
#define ATTNFORGE_CPU_QUERY(expression) return false
#endif

// Whether this CPU (and OS) runs AVX512-BF16 (with AVX-512 F and BW). The bf16 kernels
// also need to be compiled in (kHasBf16DotKernel, bf16_dot.hpp).
inline bool cpu_has_avx512_bf16() {
  ATTNFORGE_CPU_QUERY(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512bf16"));
}

// Whether this CPU (and OS) runs AVX-512 VNNI (with AVX-512 F, BW and VL). The int8 kernels
// also need to be compiled in (kHasInt8DotKernel, int8_dot.hpp).
inline bool cpu_has_avx512_vnni() {
  ATTNFORGE_CPU_QUERY(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"));
}

// Whether the bf16 dot products beat converting bf16 to float on this CPU, which is when
// vdpbf16ps issues at twice the fp32 FMA rate: AMD's AVX512-BF16 cores (Zen 4 and later)
// issue two per cycle; Intel's (Cooper Lake, Sapphire and Emerald Rapids) issue one next
// to two FMAs, so there the conversion path is the faster one.
inline bool cpu_prefers_bf16_dot() {
  ATTNFORGE_CPU_QUERY(cpu_has_avx512_bf16() && __builtin_cpu_is("amd"));
}

// Whether the decode should stream the cache into L2 two blocks ahead of its reads rather
// than into L1 one block ahead (DecodeStream): AMD Zen 4 (family 19h), where the requests
// into L1 left the kernels well short of the memory's rate out of DRAM. docs/design.md,
// "Decode streams the cache once", has the measurements on both kinds of core.
inline bool cpu_prefers_l2_stream() { ATTNFORGE_CPU_QUERY(__builtin_cpu_is("amdfam19h")); }

// Whether the decode should stream the next block into L2 rather than into L1, asking for
// V's lines while it scores and K's while it accumulates (DecodeStream::kL2NextBlockCrossed):
// Intel cores, where both read DRAM faster than the stream into L1. docs/design.md,
// "Decode streams the cache once", has the measurements.
inline bool cpu_prefers_l2_next_block() { ATTNFORGE_CPU_QUERY(__builtin_cpu_is("intel")); }

#undef ATTNFORGE_CPU_QUERY

}  // namespace attnforge::detail
