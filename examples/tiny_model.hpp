// The small random attention stack the examples run: a Llama-like stack without MLPs,
// x += attention(attention_norm(x)) per layer, the output projection tied to the token
// embedding. generate.cpp drives it over one sequence with a KVCache per layer (float, bf16
// or QInt8), serve.cpp over many sequences with a PagedKVCache per layer.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "attnforge/attnforge.hpp"

namespace examples {

namespace af = attnforge;

struct ModelConfig {
  af::Index dim = 512, n_heads = 8, n_kv_heads = 2, n_layers = 4, vocab = 1024;
  af::Index max_seq_len = 4096;  // of the RoPE tables
  af::Index head_dim() const { return dim / n_heads; }
};

// splitmix64 to [-1, 1): the same numbers on every platform, unlike std:: distributions.
inline float uniform_pm1(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return static_cast<float>(static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-52 - 1.0);
}

class TinyModel {
 public:
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  TinyModel(const ModelConfig& c, const Eigen::ThreadPoolDevice* device)
      : embedding_(c.vocab, c.dim), rope_(c.head_dim(), c.max_seq_len) {
    // Std 0.02 as in GPT-2: small next to what the layers add, so the next token depends on
    // the context and not only on the last token.
    std::uint64_t state = 42;
    for (af::Index i = 0; i < embedding_.size(); ++i) {
      embedding_.data()[i] = 0.035f * uniform_pm1(state);
    }
    for (af::Index l = 0; l < c.n_layers; ++l) {
      af::Attention<float>& layer = layers_.emplace_back(c.dim, c.n_heads, c.n_kv_heads);
      layer.reset_parameters(1000 + static_cast<std::uint64_t>(l));
      // The default init gives near-uniform attention, whose context average hardly moves
      // between steps (greedy decoding would repeat one token); sharper queries fix that.
      layer.wq() = layer.wq().tensor() * 8.0f;
      norms_.emplace_back(c.dim);
      layer.set_device(device);
    }
  }

  af::Index n_layers() const { return static_cast<af::Index>(layers_.size()); }
  af::Index dim() const { return embedding_.dimension(1); }

  // Hidden states (1, S, dim) of tokens at positions [start_pos, start_pos + S), caches[l]
  // being layer l's cache: float, or bf16 / fp16 / QInt8 storage under the same float
  // activations (the keys and values are rounded or quantized as they are appended). Without
  // caches (nullptr) the tokens attend only to each other.
  template <typename CacheT>
  af::Tensor<float, 3> forward(const std::vector<int>& tokens, af::Index start_pos,
                               std::vector<af::KVCache<CacheT>>* caches) {
    const af::Index seq_len = static_cast<af::Index>(tokens.size());
    af::Tensor<float, 3> x(1, seq_len, dim());
    embed(tokens, x.data());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const af::Tensor<float, 3> normed = norms_[l].forward(x);
      x += layers_[l].forward(normed, rope_, start_pos, caches ? &(*caches)[l] : nullptr);
    }
    return x;
  }
  // The hidden states (1, S, dim) of tokens [0, S) attending only to each other.
  af::Tensor<float, 3> forward(const std::vector<int>& tokens) {
    return forward<float>(tokens, 0, nullptr);
  }

  // Hidden states (total, dim) of a ragged batch: tokens holds the new tokens of
  // batch.seqs packed by batch.cu_seqlens; caches[l] is layer l's paged cache, in which
  // every sequence has the same id in every layer.
  af::Tensor<float, 2> forward(const std::vector<int>& tokens, const af::RaggedBatch& batch,
                               std::vector<af::PagedKVCache<float>>& caches) {
    af::Tensor<float, 2> x(static_cast<af::Index>(tokens.size()), dim());
    embed(tokens, x.data());
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const af::Tensor<float, 2> normed = norms_[l].forward(x);
      x += layers_[l].forward(normed, rope_, caches[l], batch);
    }
    return x;
  }

  // Logits hidden . embedding^T, and the token of the given rank among them (0 = greedy).
  int ranked_token(const float* hidden, int rank = 0) const {
    const af::Index vocab = embedding_.dimension(0);
    const Eigen::VectorXf logits = Eigen::Map<const RowMatrix>(embedding_.data(), vocab, dim()) *
                                   Eigen::Map<const Eigen::VectorXf>(hidden, dim());
    std::vector<int> order(static_cast<std::size_t>(vocab));
    for (af::Index i = 0; i < vocab; ++i) order[static_cast<std::size_t>(i)] = static_cast<int>(i);
    std::partial_sort(order.begin(), order.begin() + rank + 1, order.end(),
                      [&](int a, int b) { return logits(a) > logits(b) || (logits(a) == logits(b) && a < b); });
    return order[static_cast<std::size_t>(rank)];
  }
  int next_token(const float* hidden) const { return ranked_token(hidden, 0); }

 private:
  void embed(const std::vector<int>& tokens, float* x) const {
    for (std::size_t s = 0; s < tokens.size(); ++s) {
      std::copy_n(&embedding_(tokens[s], 0), dim(), x + static_cast<af::Index>(s) * dim());
    }
  }

  af::Tensor<float, 2> embedding_;  // (vocab, dim)
  af::RotaryEmbedding<float> rope_;
  std::vector<af::Attention<float>> layers_;
  std::vector<af::RMSNorm<float>> norms_;  // the attention_norm of each layer (weight 1)
};

}  // namespace examples
