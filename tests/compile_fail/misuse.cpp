// API misuse that must not compile: views (and references) that would outlive the tensor
// or object they point into, in-place operations on temporaries, keys of the wrong
// element type for a cache, and QInt8 views of bytes no cache wrote. Each case is built on its own
// (ATTNFORGE_MISUSE = case number) by a CTest test that passes only when the compiler rejects it
// with the expected diagnostic; case 0 is the same code used correctly, so a broken harness cannot
// pass for a rejected misuse.
#include <attnforge/attnforge.hpp>

namespace af = attnforge;

af::Tensor<af::DocId, 2> make_ids() { return af::Tensor<af::DocId, 2>(1, 4); }
af::Tensor<float, 2> make_matrix() { return af::Tensor<float, 2>(4, 4); }

int main() {
  [[maybe_unused]] af::Tensor<af::DocId, 2> ids = make_ids();
  [[maybe_unused]] af::Tensor<float, 2> matrix = make_matrix();
  af::RotaryEmbedding<float> rope(4, 8);
  af::Attention<float> attn(8, 2, 2);
  af::KVCache<float> cache(1, 4, 1, 4);
  af::PagedKVCache<float> paged(2, 16, 1, 4);
  const af::SeqId seq = paged.add_sequence();
  af::KVCache<af::QInt8> quantized(1, 4, 1, 4);
#if ATTNFORGE_MISUSE == 0
  af::Masks masks;
  masks.doc_ids = ids;
  [[maybe_unused]] af::ConstView<float, 2> view = matrix;
  [[maybe_unused]] auto prefix = cache.prefix();
  [[maybe_unused]] auto cos = rope.cos_rows(0, 2);
  [[maybe_unused]] auto wq = attn.wq();
  af::apply_rope_inplace(matrix, rope.cos_rows(0, 4), rope.sin_rows(0, 4));
  af::Tensor<float, 3> x(1, 2, 8);
  x.setZero();
  [[maybe_unused]] auto y = attn.forward(x, rope, 0);
  [[maybe_unused]] auto as_view = af::as_const_view(matrix);
  [[maybe_unused]] const auto& table = paged.block_table(seq);
  [[maybe_unused]] auto keys = paged.keys(seq);
  af::Tensor<float, 4> k_float(1, 1, 1, 4);
  k_float.setZero();
  quantized.update(k_float, k_float);
#elif ATTNFORGE_MISUSE == 1   // doc ids viewing a temporary
  af::Masks masks;
  masks.doc_ids = make_ids();
#elif ATTNFORGE_MISUSE == 2   // a view of a temporary tensor
  [[maybe_unused]] af::ConstView<float, 2> view = make_matrix();
#elif ATTNFORGE_MISUSE == 3   // the prefix of a temporary cache
  [[maybe_unused]] auto prefix = af::KVCache<float>(1, 4, 1, 4).prefix();
#elif ATTNFORGE_MISUSE == 4   // the tables of a temporary RotaryEmbedding
  [[maybe_unused]] auto cos = af::RotaryEmbedding<float>(4, 8).cos_rows(0, 2);
#elif ATTNFORGE_MISUSE == 5   // a weight of a temporary module
  [[maybe_unused]] auto wq = af::Attention<float>(8, 2, 2).wq();
#elif ATTNFORGE_MISUSE == 6   // rotating a temporary in place
  af::apply_rope_inplace(make_matrix(), rope.cos_rows(0, 4), rope.sin_rows(0, 4));
#elif ATTNFORGE_MISUSE == 7   // forward of a temporary input (bound to a view parameter)
  [[maybe_unused]] auto y = attn.forward(af::Tensor<float, 3>(1, 2, 8), rope, 0);
#elif ATTNFORGE_MISUSE == 8   // as_const_view of a temporary
  [[maybe_unused]] auto as_view = af::as_const_view(make_matrix());
#elif ATTNFORGE_MISUSE == 9   // appending to a temporary cache (the returned views dangle)
  af::Tensor<float, 4> k(1, 1, 1, 4);
  af::KVCache<float>(1, 4, 1, 4).update(k, k);
#elif ATTNFORGE_MISUSE == 10  // a padding mask viewing a temporary
  af::Masks masks;
  masks.key_padding_mask = af::Tensor<bool, 2>(1, 4);
#elif ATTNFORGE_MISUSE == 11  // the weights of a temporary module
  [[maybe_unused]] auto weights = af::Attention<float>(8, 2, 2).weights();
#elif ATTNFORGE_MISUSE == 12  // a norm weight of a temporary module
  [[maybe_unused]] auto w = af::RMSNorm<float>(4).weight();
#elif ATTNFORGE_MISUSE == 13  // the block table of a temporary paged cache
  [[maybe_unused]] const auto& table = af::PagedKVCache<float>(2, 16, 1, 4).block_table(seq);
#elif ATTNFORGE_MISUSE == 14  // the paged key rows of a temporary paged cache
  [[maybe_unused]] auto keys = af::PagedKVCache<float>(2, 16, 1, 4).keys(seq);
#elif ATTNFORGE_MISUSE == 15  // QInt8 rows appended to a QInt8 cache (it quantizes floats)
  const af::KVPrefix<af::QInt8> rows = quantized.prefix();
  quantized.update(rows.keys, rows.values);
#elif ATTNFORGE_MISUSE == 16  // QInt8 bytes of a tensor seen as a cache's tiles
  af::Tensor<af::QInt8, 4> bytes(1, 1, 16, 8);
  [[maybe_unused]] af::ConstView<af::QInt8, 4> view(bytes);
#elif ATTNFORGE_MISUSE == 17  // QInt8 bytes at a pointer seen as a cache's tiles
  af::Tensor<af::QInt8, 4> bytes(1, 1, 16, 8);
  [[maybe_unused]] af::ConstView<af::QInt8, 4> view(bytes.data(), {1, 1, 16, 4});
#endif
  (void)seq;
  return 0;
}
