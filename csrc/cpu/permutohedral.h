// Permutohedral lattice on the CPU (SPEC §6.2: Adams et al. 2010 in Krähenbühl's formulation).
//
// build() embeds N feature vectors of dimension d, finds each one's enclosing simplex and its
// d+1 vertices, and indexes the vertices with a hash table; it also precomputes everything the
// filter needs (gather lists for the splat, blur neighbours), so one lattice serves any number
// of filter() calls (the mean-field iterations of the dense CRF). filter() runs
// splat -> d+1 blur passes -> slice for C value channels at once; values are stored pixel-major
// (N x C) so each pass streams whole C-vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <c10/util/Exception.h>

#include "parallel.h"

namespace wsss {

constexpr int kMaxFeatureDim = 16;

template <typename scalar_t>
class PermutohedralLattice {
 public:
  // features: n x d row-major. Thread count as in parallel_chunks.
  void build(const scalar_t* features, int64_t n, int d, int num_threads) {
    TORCH_CHECK(d >= 1 && d <= kMaxFeatureDim, "permutohedral lattice: feature dim must be in 1..",
                kMaxFeatureDim, ", got ", d);
    TORCH_CHECK(n * (d + 1) < (int64_t(1) << 31), "permutohedral lattice: too many points (", n, ")");
    d_ = d;
    n_ = n;
    num_threads_ = num_threads;
    const int d1 = d + 1;
    vertex_.resize(n * d1);
    weight_.resize(n * d1);
    rem0_.resize(n * d1);
    rank_.resize(n * d1);

    // 1) Elevation, enclosing simplex and barycentric weights: independent per point.
    parallel_chunks(n, 1024, num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) embed_point(features + i * d, i);
    });

    // 2) Vertex keys into the hash table, in point order (sequential: it assigns the ids).
    keys_.clear();
    table_.assign(initial_capacity(n), -1);
    int32_t key[kMaxFeatureDim];
    for (int64_t i = 0; i < n; ++i) {
      const int32_t* rem0 = &rem0_[i * d1];
      const int32_t* rank = &rank_[i * d1];
      for (int k = 0; k <= d; ++k) {
        for (int c = 0; c < d; ++c) key[c] = rem0[c] + (rank[c] <= d - k ? k : k - d1);
        vertex_[i * d1 + k] = find_or_insert(key);
      }
    }
    m_ = static_cast<int64_t>(keys_.size()) / d;
    rem0_.clear();
    rem0_.shrink_to_fit();
    rank_.clear();
    rank_.shrink_to_fit();

    // 3) Gather lists: for each vertex, its (point, weight) contributions in point order, so the
    //    splat is a race-free parallel gather that sums in the same order as a serial scatter.
    splat_begin_.assign(m_ + 1, 0);
    for (int64_t e = 0; e < n * d1; ++e) ++splat_begin_[vertex_[e] + 1];
    for (int64_t v = 0; v < m_; ++v) splat_begin_[v + 1] += splat_begin_[v];
    splat_point_.resize(n * d1);
    splat_weight_.resize(n * d1);
    {
      std::vector<int32_t> fill(splat_begin_.begin(), splat_begin_.end() - 1);
      for (int64_t e = 0; e < n * d1; ++e) {
        const int32_t pos = fill[vertex_[e]]++;
        splat_point_[pos] = static_cast<int32_t>(e / d1);
        splat_weight_[pos] = weight_[e];
      }
    }

    // 4) Blur neighbours along each of the d+1 lattice directions; a missing vertex points to
    //    the sentinel row m_ whose values stay zero.
    neighbors_.resize(static_cast<size_t>(d1) * m_ * 2);
    parallel_chunks(m_, 256, num_threads, [&](int64_t begin, int64_t end) {
      int32_t n1[kMaxFeatureDim], n2[kMaxFeatureDim];
      for (int64_t v = begin; v < end; ++v) {
        const int32_t* k0 = &keys_[v * d];
        for (int j = 0; j <= d; ++j) {
          for (int c = 0; c < d; ++c) {
            n1[c] = k0[c] - 1;
            n2[c] = k0[c] + 1;
          }
          if (j < d) {
            n1[j] = k0[j] + d;
            n2[j] = k0[j] - d;
          }
          const int32_t a = find(n1), b = find(n2);
          neighbors_[(j * m_ + v) * 2] = a < 0 ? static_cast<int32_t>(m_) : a;
          neighbors_[(j * m_ + v) * 2 + 1] = b < 0 ? static_cast<int32_t>(m_) : b;
        }
      }
    });
    table_.clear();
    table_.shrink_to_fit();
  }

  int64_t num_vertices() const { return m_; }
  int64_t num_points() const { return n_; }

  // out[i] (+)= out_weight * out_scale[i] * alpha * sum_k b_ik * blur(splat(in_scale ⊙ in))[v_ik]
  // for C channels; in/out are n x C row-major. in_scale/out_scale may be null (= ones).
  // transpose applies the blur directions in reverse order, which is the exact adjoint.
  void filter(const scalar_t* in, scalar_t* out, int64_t C, bool transpose, const scalar_t* in_scale = nullptr,
              const scalar_t* out_scale = nullptr, scalar_t out_weight = scalar_t(1), bool accumulate = false) {
    const int d1 = d_ + 1;
    const int64_t rows = m_ + 1;  // + sentinel
    if (static_cast<int64_t>(buf_a_.size()) < rows * C) {
      buf_a_.resize(rows * C);
      buf_b_.resize(rows * C);
    }
    scalar_t* cur = buf_a_.data();
    scalar_t* nxt = buf_b_.data();
    std::fill(cur + m_ * C, cur + rows * C, scalar_t(0));
    std::fill(nxt + m_ * C, nxt + rows * C, scalar_t(0));

    // Splat (gather form).
    parallel_chunks(m_, 64, num_threads_, [&](int64_t begin, int64_t end) {
      for (int64_t v = begin; v < end; ++v) {
        scalar_t* dst = cur + v * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = scalar_t(0);
        for (int32_t e = splat_begin_[v]; e < splat_begin_[v + 1]; ++e) {
          const int32_t p = splat_point_[e];
          const scalar_t w = in_scale ? splat_weight_[e] * in_scale[p] : splat_weight_[e];
          const scalar_t* src = in + static_cast<int64_t>(p) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += w * src[c];
        }
      }
    });

    // Blur: d+1 passes, each reading the previous pass's values.
    for (int step = 0; step <= d_; ++step) {
      const int j = transpose ? d_ - step : step;
      const int32_t* nb = &neighbors_[static_cast<size_t>(j) * m_ * 2];
      parallel_chunks(m_, 256, num_threads_, [&](int64_t begin, int64_t end) {
        for (int64_t v = begin; v < end; ++v) {
          const scalar_t* a = cur + static_cast<int64_t>(nb[2 * v]) * C;
          const scalar_t* b = cur + static_cast<int64_t>(nb[2 * v + 1]) * C;
          const scalar_t* s = cur + v * C;
          scalar_t* dst = nxt + v * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = s[c] + scalar_t(0.5) * (a[c] + b[c]);
        }
      });
      std::swap(cur, nxt);
    }

    // Slice.
    const scalar_t alpha = scalar_t(1) / (scalar_t(1) + std::pow(scalar_t(2), scalar_t(-d_)));
    parallel_chunks(n_, 256, num_threads_, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* dst = out + i * C;
        const scalar_t s = alpha * out_weight * (out_scale ? out_scale[i] : scalar_t(1));
        if (!accumulate)
          for (int64_t c = 0; c < C; ++c) dst[c] = scalar_t(0);
        for (int k = 0; k < d1; ++k) {
          const scalar_t w = s * weight_[i * d1 + k];
          const scalar_t* src = cur + static_cast<int64_t>(vertex_[i * d1 + k]) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] += w * src[c];
        }
      }
    });
  }

 private:
  // SPEC §6.2 "Elevate", "Enclosing simplex", "Barycentric weights" for point i.
  void embed_point(const scalar_t* f, int64_t i) {
    const int d = d_, d1 = d_ + 1;
    scalar_t elevated[kMaxFeatureDim + 1];
    scalar_t bary[kMaxFeatureDim + 2];
    int32_t rem0[kMaxFeatureDim + 1], rank[kMaxFeatureDim + 1];
    // Elevate onto the hyperplane sum(e) = 0, scaled so the lattice has the expected std.
    const scalar_t inv_std = std::sqrt(scalar_t(2) / scalar_t(3)) * scalar_t(d1);
    scalar_t tail = 0;  // sum of c_j for j >= current index
    for (int j = d; j > 0; --j) {
      const scalar_t cj = f[j - 1] * (inv_std / std::sqrt(scalar_t(j) * scalar_t(j + 1)));
      elevated[j] = tail - scalar_t(j) * cj;
      tail += cj;
    }
    elevated[0] = tail;
    // Nearest remainder-0 lattice point: round each coordinate to a multiple of d+1
    // (exact halves go down).
    int32_t sum = 0;
    for (int c = 0; c <= d; ++c) {
      const scalar_t q = elevated[c] / scalar_t(d1);
      const scalar_t lo = std::floor(q), hi = std::ceil(q);
      const scalar_t r = (hi * d1 - elevated[c] < elevated[c] - lo * d1) ? hi : lo;
      rem0[c] = static_cast<int32_t>(r) * d1;
      sum += static_cast<int32_t>(r);
    }
    // Rank of each residual (how many are larger; ties broken by index).
    for (int c = 0; c <= d; ++c) rank[c] = 0;
    for (int a = 0; a < d; ++a) {
      const scalar_t ra = elevated[a] - rem0[a];
      for (int b = a + 1; b <= d; ++b) {
        if (ra < elevated[b] - rem0[b])
          ++rank[a];
        else
          ++rank[b];
      }
    }
    // Bring the point back onto the plane when the rounded coordinates do not sum to zero.
    for (int c = 0; c <= d; ++c) {
      rank[c] += sum;
      if (rank[c] < 0) {
        rank[c] += d1;
        rem0[c] += d1;
      } else if (rank[c] > d) {
        rank[c] -= d1;
        rem0[c] -= d1;
      }
    }
    for (int k = 0; k <= d + 1; ++k) bary[k] = 0;
    for (int c = 0; c <= d; ++c) {
      const scalar_t v = (elevated[c] - rem0[c]) / scalar_t(d1);
      bary[d - rank[c]] += v;
      bary[d - rank[c] + 1] -= v;
    }
    bary[0] += scalar_t(1) + bary[d + 1];
    for (int k = 0; k <= d; ++k) {
      weight_[i * d1 + k] = bary[k];
      rem0_[i * d1 + k] = rem0[k];
      rank_[i * d1 + k] = rank[k];
    }
  }

  static int64_t initial_capacity(int64_t n) {
    int64_t cap = 1024;
    while (cap < n) cap <<= 1;
    return cap;
  }

  uint64_t hash(const int32_t* key) const {
    uint64_t h = 0x243F6A8885A308D3ull;
    for (int c = 0; c < d_; ++c) h = (h ^ static_cast<uint32_t>(key[c])) * 0x100000001B3ull;
    return h ^ (h >> 31);
  }

  bool same_key(int32_t id, const int32_t* key) const {
    const int32_t* k = &keys_[static_cast<size_t>(id) * d_];
    for (int c = 0; c < d_; ++c)
      if (k[c] != key[c]) return false;
    return true;
  }

  int32_t find(const int32_t* key) const {
    const uint64_t mask = table_.size() - 1;
    for (uint64_t h = hash(key) & mask;; h = (h + 1) & mask) {
      const int32_t id = table_[h];
      if (id < 0) return -1;
      if (same_key(id, key)) return id;
    }
  }

  int32_t find_or_insert(const int32_t* key) {
    const uint64_t mask = table_.size() - 1;
    for (uint64_t h = hash(key) & mask;; h = (h + 1) & mask) {
      const int32_t id = table_[h];
      if (id < 0) {
        const int32_t fresh = static_cast<int32_t>(keys_.size() / d_);
        keys_.insert(keys_.end(), key, key + d_);
        table_[h] = fresh;
        if (2 * static_cast<int64_t>(fresh + 1) > static_cast<int64_t>(table_.size())) grow();
        return fresh;
      }
      if (same_key(id, key)) return id;
    }
  }

  void grow() {
    table_.assign(table_.size() * 2, -1);
    const uint64_t mask = table_.size() - 1;
    const int32_t count = static_cast<int32_t>(keys_.size() / d_);
    for (int32_t id = 0; id < count; ++id) {
      uint64_t h = hash(&keys_[static_cast<size_t>(id) * d_]) & mask;
      while (table_[h] >= 0) h = (h + 1) & mask;
      table_[h] = id;
    }
  }

  int d_ = 0;
  int64_t n_ = 0, m_ = 0;
  int num_threads_ = 1;
  std::vector<int32_t> vertex_;     // n x (d+1): vertex id of each simplex corner
  std::vector<scalar_t> weight_;    // n x (d+1): barycentric weights
  std::vector<int32_t> rem0_, rank_;  // build-time only
  std::vector<int32_t> keys_;       // m x d: first d coordinates of each vertex
  std::vector<int32_t> table_;      // build-time hash table of vertex ids
  std::vector<int32_t> splat_begin_, splat_point_;
  std::vector<scalar_t> splat_weight_;
  std::vector<int32_t> neighbors_;  // (d+1) x m x 2
  std::vector<scalar_t> buf_a_, buf_b_;
};

}  // namespace wsss
