// Packed documents: several documents share each row of S tokens, and doc_ids keep them
// apart. Each document's output in the packed batch must equal running that document alone,
// both for scaled_dot_product_attention and for Attention::forward.
//
//   packed_documents [--quick]
#include <cstdio>
#include <cstring>
#include <vector>

#include "attnforge/attnforge.hpp"

namespace af = attnforge;
using af::Index;

namespace {

// Rows [start, start + len) of batch row b, as a (1, ..., len, D) view: no copy.
template <typename T, int Rank>
af::ConstView<T, Rank> document(const af::Tensor<T, Rank>& t, Index b, Index start, Index len) {
  return af::ConstView<T, Rank>(t).narrow(0, b, 1).narrow(Rank - 2, start, len);
}

template <int Rank>
float max_abs_diff(const af::Tensor<float, Rank>& a, const af::ConstView<float, Rank>& b) {
  const af::Tensor<float, 0> diff = (a - b.to_tensor()).abs().maximum();
  return diff();
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc == 2 && !std::strcmp(argv[1], "--quick");
  if (argc > 1 && !quick) {
    std::fprintf(stderr, "usage: packed_documents [--quick]\n");
    return 2;
  }
  const Index seq_len = quick ? 64 : 256, n_heads = quick ? 4 : 8, n_kv_heads = 2;
  const Index head_dim = quick ? 32 : 64;
  const Index dim = n_heads * head_dim;
  // Document lengths of each batch row (each sums to seq_len); the rows are laid out
  // differently, and a one-token document is the smallest case there is.
  const std::vector<std::vector<Index>> layouts =
      quick ? std::vector<std::vector<Index>>{{20, 30, 14}, {5, 1, 40, 18}}
            : std::vector<std::vector<Index>>{{100, 60, 96}, {17, 1, 200, 38}};
  const Index batch = static_cast<Index>(layouts.size());

  af::Tensor<af::DocId, 2> doc_ids(batch, seq_len);
  for (Index b = 0; b < batch; ++b) {
    Index pos = 0;
    for (std::size_t doc = 0; doc < layouts[b].size(); ++doc) {
      for (Index i = 0; i < layouts[b][doc]; ++i) doc_ids(b, pos++) = static_cast<af::DocId>(doc);
    }
  }

  // Random GQA inputs; Eigen's setRandom is deterministic from run to run.
  af::Tensor<float, 4> q(batch, n_heads, seq_len, head_dim);
  af::Tensor<float, 4> k(batch, n_kv_heads, seq_len, head_dim);
  af::Tensor<float, 4> v(batch, n_kv_heads, seq_len, head_dim);
  af::Tensor<float, 3> x(batch, seq_len, dim);
  q.setRandom(), k.setRandom(), v.setRandom(), x.setRandom();

  af::SdpaOptions causal;
  causal.causal = true;
  af::Masks masks;
  masks.doc_ids = doc_ids;
  const af::Tensor<float, 4> sdpa_packed = af::scaled_dot_product_attention(q, k, v, causal, masks);
  // Without doc_ids every document also sees the ones packed before it: the leak that the
  // mask prevents, shown for contrast.
  const af::Tensor<float, 4> sdpa_leaky = af::scaled_dot_product_attention(q, k, v, causal);

  af::Attention<float> attention(dim, n_heads, n_kv_heads);
  attention.reset_parameters(1);
  af::RotaryEmbedding<float> rope(head_dim, seq_len);
  // The packed rows use positions 0..S-1, as a training loop feeding packed rows does.
  const af::Tensor<float, 3> attn_packed = attention.forward(x, rope, 0, nullptr, doc_ids);

  // Alone, a document starts at position 0; packed, it starts at `start`. RoPE scores depend
  // only on the distance between query and key, so the two agree up to float rounding (the
  // rotation tables at other angles, products over other row counts): ~1e-7 on outputs of
  // order 1. A document that saw its neighbours would be off by O(1), as the last column shows.
  const float tolerance = 1e-5f;
  bool ok = true;
  std::printf("row doc  tokens        sdpa diff  attention diff  without doc_ids\n");
  for (Index b = 0; b < batch; ++b) {
    Index start = 0;
    for (std::size_t doc = 0; doc < layouts[b].size(); ++doc) {
      const Index len = layouts[b][doc];
      const af::Tensor<float, 4> sdpa_alone =
          af::scaled_dot_product_attention(document(q, b, start, len), document(k, b, start, len),
                                           document(v, b, start, len), causal);
      const af::Tensor<float, 3> attn_alone = attention.forward(document(x, b, start, len), rope, 0);
      const float sdpa_diff = max_abs_diff(sdpa_alone, document(sdpa_packed, b, start, len));
      const float attn_diff = max_abs_diff(attn_alone, document(attn_packed, b, start, len));
      const float leak_diff = max_abs_diff(sdpa_alone, document(sdpa_leaky, b, start, len));
      ok = ok && sdpa_diff <= tolerance && attn_diff <= tolerance;
      std::printf("%3ld %3zu  [%3ld, %3ld)  %9.2g  %14.2g  %15.2g\n", b, doc, start, start + len,
                  sdpa_diff, attn_diff, leak_diff);
      start += len;
    }
  }
  std::printf("packed == alone for every document (tolerance %g): %s\n", tolerance,
              ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
