// Downstream smoke test for the installed package (see run_consumer_test.cmake): one
// Attention forward pass through a RotaryEmbedding, as a user's program would run it.

// Usage requirements that must travel with attnforge::attnforge. Checked before the first
// attnforge include, because tensor.hpp defines EIGEN_USE_THREADS itself when it is missing.
static_assert(__cplusplus >= 201703L, "attnforge::attnforge must request C++17");
#ifndef EIGEN_USE_THREADS
#error "attnforge::attnforge must define EIGEN_USE_THREADS"
#endif

#include <attnforge/attnforge.hpp>
#include <cmath>
#include <cstdio>
#include <exception>

int main() {
  namespace af = attnforge;
  const af::Index dim = 64, n_heads = 4, n_kv_heads = 2, seq_len = 8;
  try {
    af::Attention<float> attention(dim, n_heads, n_kv_heads);
    attention.reset_parameters(123);
    const af::RotaryEmbedding<float> rope(attention.head_dim(), seq_len);
    af::Tensor<float, 3> x(1, seq_len, dim);
    x.setRandom();
    const af::Tensor<float, 3> out = attention.forward(x, rope, /*start_pos=*/0);

    if (out.dimension(0) != 1 || out.dimension(1) != seq_len || out.dimension(2) != dim) {
      std::fprintf(
          stderr, "attnforge_consumer: output has shape (%ld, %ld, %ld), expected (1, %ld, %ld)\n",
          static_cast<long>(out.dimension(0)), static_cast<long>(out.dimension(1)),
          static_cast<long>(out.dimension(2)), static_cast<long>(seq_len), static_cast<long>(dim));
      return 1;
    }
    for (af::Index i = 0; i < out.size(); ++i) {
      if (!std::isfinite(out.data()[i])) {
        std::fprintf(stderr, "attnforge_consumer: output element %ld is not finite\n",
                     static_cast<long>(i));
        return 1;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attnforge_consumer: %s\n", e.what());
    return 1;
  }
  std::printf("attnforge_consumer: Attention<float> forward (1, %ld, %ld): OK\n",
              static_cast<long>(seq_len), static_cast<long>(dim));
  return 0;
}
