// Tensor-parallel Attention over MPI: each rank owns a contiguous group of KV heads and
// the query heads that share them, so q/k/v projections split by output rows, wo by its
// input columns, and one MPI_Allreduce (sum) of the (B, S, dim) output joins the ranks.
// Each rank's KV cache holds only its own KV heads.
#pragma once

#include <mpi.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "attnforge/attention.hpp"
#include "attnforge/mpi/zigzag.hpp"

namespace attnforge::mpi {

namespace detail {

template <typename T>
MPI_Datatype mpi_datatype() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "TensorParallelAttention sums float or double activations");
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

// Rows [begin, begin + len) of a (rows, cols) matrix.
template <typename T>
Tensor<T, 2> rows_of(const Tensor<T, 2>& w, Index begin, Index len) {
  return w.slice(Eigen::array<Index, 2>{begin, 0}, Eigen::array<Index, 2>{len, w.dimension(1)});
}

template <typename T>
Tensor<T, 2> cols_of(const Tensor<T, 2>& w, Index begin, Index len) {
  return w.slice(Eigen::array<Index, 2>{0, begin}, Eigen::array<Index, 2>{w.dimension(0), len});
}

inline int checked_ranks(MPI_Comm comm, Index n_kv_heads) {
  int ranks = 1;
  MPI_Comm_size(comm, &ranks);
  if (n_kv_heads % ranks != 0) {
    throw std::invalid_argument("TensorParallelAttention: n_kv_heads " +
                                std::to_string(n_kv_heads) + " is not a multiple of the " +
                                std::to_string(ranks) + " ranks of the communicator");
  }
  return ranks;
}

}  // namespace detail

template <typename T>
class TensorParallelAttention {
 public:
  // The global shape of the module; this rank builds the Attention of its heads.
  TensorParallelAttention(Index dim, Index n_heads, Index n_kv_heads, MPI_Comm comm,
                          Index head_dim = 0, bool qk_norm = false, double norm_eps = 1e-5)
      : comm_(comm),
        ranks_(detail::checked_ranks(comm, n_kv_heads)),
        rank_(rank_of(comm)),
        n_heads_(n_heads),
        local_(dim, n_heads / ranks_, n_kv_heads / ranks_,
               head_dim == 0 && n_heads > 0 ? dim / n_heads : head_dim, qk_norm, norm_eps) {}

  // Copies this rank's slices of the full (unsharded) parameters, validated against the
  // global shapes; every rank passes the same full state dict.
  void load_full_weights(const Tensor<T, 2>& wq, const Tensor<T, 2>& wk, const Tensor<T, 2>& wv,
                         const Tensor<T, 2>& wo, const Tensor<T, 1>& q_norm = {},
                         const Tensor<T, 1>& k_norm = {}) {
    const Index d = local_.head_dim();
    const Index q_rows = local_.n_heads() * d;
    const Index kv_rows = local_.n_kv_heads() * d;
    check_full("wq", wq, q_rows * ranks_, local_.dim());
    check_full("wk", wk, kv_rows * ranks_, local_.dim());
    check_full("wv", wv, kv_rows * ranks_, local_.dim());
    check_full("wo", wo, local_.dim(), q_rows * ranks_);
    local_.wq() = detail::rows_of(wq, rank_ * q_rows, q_rows);
    local_.wk() = detail::rows_of(wk, rank_ * kv_rows, kv_rows);
    local_.wv() = detail::rows_of(wv, rank_ * kv_rows, kv_rows);
    local_.wo() = detail::cols_of(wo, rank_ * q_rows, q_rows);
    if (q_norm.size() != 0) local_.q_norm() = q_norm;
    if (k_norm.size() != 0) local_.k_norm() = k_norm;
  }

  // Options of the whole module; per-head alibi_slopes and sinks (H values) are cut to
  // this rank's heads.
  void set_sdpa_options(const SdpaOptions& options) {
    SdpaOptions mine = options;
    mine.alibi_slopes = heads_of(options.alibi_slopes, "alibi_slopes");
    mine.sinks = heads_of(options.sinks, "sinks");
    local_.set_sdpa_options(mine);
  }

  // Attention::forward of this rank's heads, then the sum over ranks (B, S, dim). The
  // cache, when given, is this rank's: n_kv_heads / P heads.
  template <typename Cache>
  Tensor<T, 3> forward(const Tensor<T, 3>& x, const RotaryEmbedding<T>& rope, Index start_pos,
                       Cache* kv_cache, const Masks& masks = {}) {
    Tensor<T, 3> out = local_.forward(x, rope, start_pos, kv_cache, masks);
    MPI_Allreduce(MPI_IN_PLACE, out.data(), static_cast<int>(out.size()),
                  detail::mpi_datatype<T>(), MPI_SUM, comm_);
    return out;
  }

  // The per-rank module (its head counts are n_heads / P and n_kv_heads / P).
  Attention<T>& local() { return local_; }
  const Attention<T>& local() const { return local_; }

 private:
  static int rank_of(MPI_Comm comm) {
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    return rank;
  }

  static void check_full(const char* name, const Tensor<T, 2>& w, Index rows, Index cols) {
    if (w.dimension(0) != rows || w.dimension(1) != cols) {
      throw std::invalid_argument(std::string("TensorParallelAttention::load_full_weights: ") +
                                  name + " is (" + std::to_string(w.dimension(0)) + ", " +
                                  std::to_string(w.dimension(1)) + "), expected (" +
                                  std::to_string(rows) + ", " + std::to_string(cols) + ")");
    }
  }

  std::vector<double> heads_of(const std::vector<double>& per_head, const char* name) const {
    if (per_head.empty()) return {};
    if (static_cast<Index>(per_head.size()) != n_heads_) {
      throw std::invalid_argument(std::string("TensorParallelAttention::set_sdpa_options: ") +
                                  name + " has " + std::to_string(per_head.size()) +
                                  " values, n_heads = " + std::to_string(n_heads_));
    }
    const Index begin = rank_ * local_.n_heads();
    return {per_head.begin() + begin, per_head.begin() + begin + local_.n_heads()};
  }

  MPI_Comm comm_;
  int ranks_;
  int rank_;
  Index n_heads_;
  Attention<T> local_;
};

}  // namespace attnforge::mpi
