// Which kernel variants this test binary runs, and a check that the build got the
// instruction set its configuration asked for.
//
// Eigen chooses its packets (and so every vectorized attnforge kernel) from the
// compiler's target macros, so the same sources test different code when built for the
// x86-64 baseline (SSE2), for AVX2 + FMA, or with -march=native (AVX-512 where present).
// CMake's ATTNFORGE_TEST_ISA picks one and passes it here as ATTNFORGE_TEST_ISA_EXPECTED;
// CI runs `attnforge_tests --gtest_filter='KernelVariants.*'` after each build so the log
// shows which variants ran.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "attnforge/attnforge.hpp"
#include "attnforge/detail/bf16_dot.hpp"

#ifndef ATTNFORGE_TEST_ISA_EXPECTED
#define ATTNFORGE_TEST_ISA_EXPECTED "unset"
#endif

namespace attnforge {
namespace {

// The vectorization macros Eigen defined for this translation unit.
struct CompiledIsa {
#ifdef EIGEN_VECTORIZE_AVX512
  static constexpr bool avx512 = true;
#else
  static constexpr bool avx512 = false;
#endif
#ifdef EIGEN_VECTORIZE_AVX2
  static constexpr bool avx2 = true;
#else
  static constexpr bool avx2 = false;
#endif
#ifdef EIGEN_VECTORIZE_FMA
  static constexpr bool fma = true;
#else
  static constexpr bool fma = false;
#endif
#ifdef EIGEN_VECTORIZE_AVX
  static constexpr bool avx = true;
#else
  static constexpr bool avx = false;
#endif
#ifdef EIGEN_VECTORIZE_SSE2
  static constexpr bool sse2 = true;
#else
  static constexpr bool sse2 = false;
#endif
#ifdef EIGEN_VECTORIZE_NEON
  static constexpr bool neon = true;
#else
  static constexpr bool neon = false;
#endif
};

std::string eigen_version() {
#ifdef EIGEN_VERSION_STRING  // Eigen 5
  return EIGEN_VERSION_STRING;
#else
  return std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) + "." +
         std::to_string(EIGEN_MINOR_VERSION);
#endif
}

std::string compiled_macros() {
  std::string s;
  const auto add = [&s](bool on, const char* name) {
    if (on) s += std::string(s.empty() ? "" : " ") + name;
  };
  add(CompiledIsa::avx512, "AVX512");
  add(CompiledIsa::avx2, "AVX2");
  add(CompiledIsa::fma, "FMA");
  add(CompiledIsa::avx, "AVX");
  add(CompiledIsa::sse2, "SSE2");
  add(CompiledIsa::neon, "NEON");
#ifdef EIGEN_VECTORIZE_AVX512BF16
  add(true, "AVX512BF16");
#endif
#ifdef EIGEN_VECTORIZE_AVX512FP16
  add(true, "AVX512FP16");
#endif
  return s.empty() ? "none (scalar)" : s;
}

std::string compiler() {
#if defined(__clang__)
  std::string name = "clang " __clang_version__;
#elif defined(__GNUC__)
  std::string name = "g++ " __VERSION__;
#else
  std::string name = "unknown";
#endif
  while (!name.empty() && name.back() == ' ') name.pop_back();
  return name;
}

// What the library can offer: the kernel compiled in (x86-64 GCC/clang) and a CPU with
// AVX512-BF16.
bool bf16_dot_kernel_usable() { return detail::kHasBf16DotKernel && detail::cpu_has_avx512_bf16(); }

// What the library does: Bf16Kernel::kDotProduct throws std::invalid_argument when this
// build and CPU cannot run the dot-product kernel.
bool bf16_dot_kernel_runs() {
  Tensor<Eigen::bfloat16, 4> q(1, 1, 16, 32), kv(1, 1, 16, 32);
  q.setConstant(Eigen::bfloat16(0.5f));
  kv.setConstant(Eigen::bfloat16(0.25f));
  SdpaOptions options;
  options.path = SdpaPath::kFused;
  options.bf16_kernel = Bf16Kernel::kDotProduct;
  try {
    scaled_dot_product_attention(q, kv, kv, options);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

bool expected_is(const char* isa) { return std::strcmp(ATTNFORGE_TEST_ISA_EXPECTED, isa) == 0; }

TEST(KernelVariants, PrintsTheVariantsThisBinaryRuns) {
  std::printf("[kernel variants] ATTNFORGE_TEST_ISA=%s; Eigen %s; compiler %s\n",
              ATTNFORGE_TEST_ISA_EXPECTED, eigen_version().c_str(), compiler().c_str());
  std::printf("[kernel variants] EIGEN_VECTORIZE_*: %s; packet size float %d, double %d\n",
              compiled_macros().c_str(), Eigen::internal::packet_traits<float>::size,
              Eigen::internal::packet_traits<double>::size);
  std::printf(
      "[kernel variants] AVX512-BF16 dot-product kernel: %s (compiled in: %s, CPU has "
      "avx512_bf16: %s, Bf16Kernel::kAuto takes it: %s)\n",
      bf16_dot_kernel_runs() ? "USED for bf16 prefill"
                             : "not used (bf16 tiles are converted to float)",
      detail::kHasBf16DotKernel ? "yes" : "no", detail::cpu_has_avx512_bf16() ? "yes" : "no",
      !detail::kHasBf16DotKernel       ? "no (not compiled in)"
      : detail::cpu_prefers_bf16_dot() ? "yes"
                                       : "no (converting is faster on this CPU)");
  std::printf(
      "[kernel variants] bf16 dot-product decode (float queries over bf16 caches, D 128): %s "
      "(compiled in: %s, AVX-512 decode block: %s)\n",
      detail::use_bf16_dot<float, Eigen::bfloat16>("kernel variants", SdpaOptions{}, 128,
                                                   /*decode=*/true)
          ? "USED"
          : "not used (blocks are converted to float)",
      detail::kHasBf16DotKernel ? "yes" : "no",
      detail::simd::kWidth<float> == detail::kBf16DotKeys ? "yes" : "no");
  std::printf(
      "[kernel variants] int8 dot-product decode (QInt8 caches, D 128): %s (compiled in: %s, "
      "CPU has avx512_vnni: %s, AVX-512 decode block: %s)\n",
      detail::use_int8_dot<float, QInt8>("kernel variants", SdpaOptions{}, 128)
          ? "USED"
          : "not used (keys are dequantized)",
      detail::kHasInt8DotKernel ? "yes" : "no", detail::cpu_has_avx512_vnni() ? "yes" : "no",
      detail::simd::kWidth<float> == detail::kInt8DotKeys ? "yes" : "no");
  std::fflush(stdout);
  SUCCEED();
}

// Fails when the binary was not built for the instruction set its configuration asked
// for: e.g. a preset whose flags were overridden, or -march=native that did not reach
// this target.
TEST(KernelVariants, BuildHasTheRequestedInstructionSet) {
  const int float_packet = Eigen::internal::packet_traits<float>::size;
  if (expected_is("baseline")) {
#if defined(__x86_64__) || defined(_M_X64)
    EXPECT_TRUE(CompiledIsa::sse2) << "x86-64 baseline must vectorize with SSE2";
    EXPECT_FALSE(CompiledIsa::avx) << "baseline build has AVX: an -m flag leaked into it";
    EXPECT_EQ(float_packet, 4);
#endif
  } else if (expected_is("portable")) {
    // ATTNFORGE_NO_BF16_DOT and ATTNFORGE_NO_INT8_DOT must leave out every x86 intrinsic
    // kernel, so the generic paths are what this binary tests.
    EXPECT_FALSE(detail::kHasBf16DotKernel)
        << "ATTNFORGE_NO_BF16_DOT did not remove the bf16 kernels";
    EXPECT_FALSE(detail::kHasInt8DotKernel)
        << "ATTNFORGE_NO_INT8_DOT did not remove the int8 kernels";
  } else if (expected_is("avx2")) {
    EXPECT_TRUE(CompiledIsa::avx2) << "avx2 build without EIGEN_VECTORIZE_AVX2";
    EXPECT_TRUE(CompiledIsa::fma) << "avx2 build without EIGEN_VECTORIZE_FMA";
    EXPECT_FALSE(CompiledIsa::avx512) << "avx2 build has AVX-512: an -m flag leaked into it";
    EXPECT_EQ(float_packet, 8);
  } else if (expected_is("native")) {
    // -march=native must give Eigen every vector extension this CPU has (the tests run
    // on the machine that built them).
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
      EXPECT_TRUE(CompiledIsa::avx512) << "CPU has AVX-512F but the build has no AVX-512 packets";
      EXPECT_EQ(float_packet, 16);
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      EXPECT_TRUE(CompiledIsa::avx2 && CompiledIsa::fma)
          << "CPU has AVX2 + FMA but the build has no AVX2/FMA packets";
      EXPECT_FALSE(CompiledIsa::avx512);
    }
    EXPECT_TRUE(CompiledIsa::sse2);
#endif
  } else if (expected_is("default")) {
    // The compiler takes no -march=native; nothing to expect.
  } else {
    ADD_FAILURE() << "unknown ATTNFORGE_TEST_ISA_EXPECTED '" << ATTNFORGE_TEST_ISA_EXPECTED
                  << "' (set by CMake's ATTNFORGE_TEST_ISA)";
  }
}

// The bf16 prefill kernel carries its own target attribute, so every build (whatever its
// ISA) must use it where the CPU has AVX512-BF16, and only there.
TEST(KernelVariants, Bf16DotKernelRunsExactlyWhereTheCpuHasIt) {
  EXPECT_EQ(bf16_dot_kernel_runs(), bf16_dot_kernel_usable());
}

}  // namespace
}  // namespace attnforge
