// What the CPU the program runs on does well, asked once at run time, for the choices
// between kernel variants that give the same result up to rounding. Each answer is a
// fixed rule about the CPU, not a timing, so a program gives the same bits on every run.
#pragma once

namespace attnforge::detail {

// Whether this CPU executes a 512-bit vector operation as two 256-bit halves, so that
// a 512-bit FMA costs what two 256-bit ones do: AMD's first AVX-512 cores (Zen 4, family
// 19h). Intel's AVX-512 cores and Zen 5 run them whole.
inline bool cpu_splits_512bit_ops() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool splits = __builtin_cpu_is("amdfam19h");
  return splits;
#else
  return false;
#endif
}

}  // namespace attnforge::detail
