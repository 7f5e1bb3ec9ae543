// Permutohedral lattice on the CPU (SPEC §6.2: Adams et al. 2010 in Krähenbühl's formulation).
//
// build() embeds N feature vectors of dimension d, finds each one's enclosing simplex and its
// d+1 vertices, and indexes the vertices with a hash table; it also precomputes the blur
// neighbours, so one lattice serves any number of filters (the mean-field iterations of the
// dense CRF). Values are pixel-major rows of ld = padded_channels(C) entries, zero in the
// padding, so each pass streams whole C-vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <c10/util/Exception.h>

#include "lattice_kernels.h"
#include "parallel.h"

namespace wsss {

// Below this many scalar operations per thread a loop runs serially: a parallel region costs
// more, especially on a loaded machine.
constexpr int64_t kMinWorkPerThread = 1 << 18;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(work_per_item, 1));
}

// Open-addressing hash set of int32 ids whose keys live elsewhere (linear probing, at most half
// full). A slot holds the id and 32 bits of its hash, which rejects most mismatches without
// touching the key and lets the table grow without rehashing keys.
class IdTable {
 public:
  // Sized for about `expected` ids before the first growth.
  void reset(int64_t expected) {
    int64_t capacity = 1024;
    while (capacity < 2 * expected) capacity <<= 1;
    slots_.assign(capacity, Slot{0, -1});
    count_ = 0;
  }

  template <typename Eq>
  int32_t find(uint64_t hash, const Eq& eq) const {
    const uint64_t mask = slots_.size() - 1;
    const uint32_t tag = static_cast<uint32_t>(hash >> 32);
    for (uint64_t h = hash & mask;; h = (h + 1) & mask) {
      const Slot& s = slots_[h];
      if (s.id < 0) return -1;
      if (s.tag == tag && eq(s.id)) return s.id;
    }
  }

  // Returns the id of an equal key, or inserts `fresh` and returns it.
  template <typename Eq>
  int32_t find_or_insert(uint64_t hash, int32_t fresh, const Eq& eq) {
    const uint64_t mask = slots_.size() - 1;
    const uint32_t tag = static_cast<uint32_t>(hash >> 32);
    for (uint64_t h = hash & mask;; h = (h + 1) & mask) {
      Slot& s = slots_[h];
      if (s.id < 0) {
        s = Slot{tag, fresh};
        hashes_low_.resize(std::max<size_t>(hashes_low_.size(), static_cast<size_t>(fresh) + 1));
        hashes_low_[fresh] = static_cast<uint32_t>(hash);
        if (2 * ++count_ > static_cast<int64_t>(slots_.size())) grow();
        return fresh;
      }
      if (s.tag == tag && eq(s.id)) return s.id;
    }
  }

  void release() {
    std::vector<Slot>().swap(slots_);
    std::vector<uint32_t>().swap(hashes_low_);
  }

 private:
  struct Slot {
    uint32_t tag;
    int32_t id;
  };

  void grow() {
    std::vector<Slot> old(slots_.size() * 2, Slot{0, -1});
    old.swap(slots_);
    const uint64_t mask = slots_.size() - 1;
    for (const Slot& s : old) {
      if (s.id < 0) continue;
      const uint64_t hash = (static_cast<uint64_t>(s.tag) << 32) | hashes_low_[s.id];
      uint64_t h = hash & mask;
      while (slots_[h].id >= 0) h = (h + 1) & mask;
      slots_[h] = s;
    }
  }

  std::vector<Slot> slots_;
  std::vector<uint32_t> hashes_low_;  // low hash bits by id, for grow()
  int64_t count_ = 0;
};

// Small fixed-size key comparison (std::equal on ints becomes a memcmp call).
inline bool ints_equal(const int32_t* a, const int32_t* b, int n) {
  for (int c = 0; c < n; ++c)
    if (a[c] != b[c]) return false;
  return true;
}

inline uint64_t hash_ints(const int32_t* key, int n, uint64_t h = 0x243F6A8885A308D3ull) {
  for (int c = 0; c < n; ++c) h = (h ^ static_cast<uint32_t>(key[c])) * 0x100000001B3ull;
  return h ^ (h >> 29);
}

template <typename scalar_t>
class PermutohedralLattice {
  using Kernels = LatticeKernels<scalar_t>;

 public:
  // features: n x d row-major. num_threads as in parallel_chunks (also used by the filters).
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
    std::vector<int32_t> rem0(n * d1), rank(n * d1);

    // 1) Elevation, enclosing simplex and barycentric weights: independent per point.
    scalar_t scale[kMaxFeatureDim];
    for (int j = 0; j < d; ++j)
      scale[j] = std::sqrt(scalar_t(2) / scalar_t(3)) * scalar_t(d1) / std::sqrt(scalar_t((j + 1) * (j + 2)));
    parallel_chunks(n, grain_for(d * d1 * 4), num_threads, [&](int64_t i0, int64_t i1) {
      Kernels::embed(features, d, scale, rem0.data(), rank.data(), weight_.data(), i0, i1);
    });

    // 2) Vertex ids, in point order (serial: this numbers the vertices). Points in the same
    //    simplex share all d+1 vertices, so simplices are looked up first (one probe per point)
    //    and vertex keys only for simplices not seen before.
    keys_.clear();
    // Natural images have far fewer simplices and vertices than points; n/4 avoids most growth.
    vertex_table_.reset(n / 4);
    simplex_table_.reset(n / 4);
    int32_t key[kMaxFeatureDim];
    const auto same_simplex = [&](int64_t a, int64_t b) {
      return ints_equal(&rem0[a * d1], &rem0[b * d1], d1) && ints_equal(&rank[a * d1], &rank[b * d1], d1);
    };
    for (int64_t i = 0; i < n; ++i) {
      if (i > 0 && same_simplex(i, i - 1)) {
        std::copy(&vertex_[(i - 1) * d1], &vertex_[i * d1], &vertex_[i * d1]);
        continue;
      }
      const uint64_t h = hash_ints(&rank[i * d1], d1, hash_ints(&rem0[i * d1], d));
      const int32_t first = simplex_table_.find_or_insert(h, static_cast<int32_t>(i),
                                                         [&](int32_t j) { return same_simplex(i, j); });
      if (first != i) {
        std::copy(&vertex_[first * d1], &vertex_[(first + 1) * d1], &vertex_[i * d1]);
        continue;
      }
      for (int k = 0; k <= d; ++k) {
        // SPEC §6.2 "Vertices": remainder-k vertex of the simplex.
        for (int c = 0; c < d; ++c) key[c] = rem0[i * d1 + c] + (rank[i * d1 + c] <= d - k ? k : k - d1);
        const int32_t fresh = static_cast<int32_t>(keys_.size() / d);
        const int32_t id = vertex_table_.find_or_insert(hash_ints(key, d), fresh, [&](int32_t v) {
          return ints_equal(key, &keys_[static_cast<size_t>(v) * d], d);
        });
        if (id == fresh) keys_.insert(keys_.end(), key, key + d);
        vertex_[i * d1 + k] = id;
      }
    }
    simplex_table_.release();
    m_ = static_cast<int64_t>(keys_.size()) / d;

    // 3) Blur neighbours along each of the d+1 lattice directions (SPEC §6.2 "Blur"); a missing
    //    vertex points to the sentinel row m_, whose values stay zero.
    neighbors_.resize(static_cast<size_t>(d1) * m_ * 2);
    parallel_chunks(m_, grain_for(d1 * d * 8), num_threads, [&](int64_t v0, int64_t v1) {
      int32_t n1[kMaxFeatureDim], n2[kMaxFeatureDim];
      const auto lookup = [&](const int32_t* k) {
        const int32_t id = vertex_table_.find(hash_ints(k, d), [&](int32_t v) {
          return ints_equal(k, &keys_[static_cast<size_t>(v) * d], d);
        });
        return id < 0 ? static_cast<int32_t>(m_) : id;
      };
      for (int64_t v = v0; v < v1; ++v) {
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
          neighbors_[(j * m_ + v) * 2] = lookup(n1);
          neighbors_[(j * m_ + v) * 2 + 1] = lookup(n2);
        }
      }
    });
    vertex_table_.release();
    std::vector<int32_t>().swap(keys_);
  }

  int64_t num_vertices() const { return m_; }
  int64_t num_points() const { return n_; }

  // Splat in_scale ⊙ in (n rows of ld) onto the lattice and run the d+1 blur passes; the result
  // stays in the lattice for slice_view(). transpose runs the directions in reverse order, which
  // is the exact adjoint of the forward filter.
  void splat_blur(const scalar_t* in, int64_t ld, bool transpose, const scalar_t* in_scale = nullptr) {
    const int parts = splat_parts(ld);
    begin_splat(ld, parts);
    parallel_chunks(parts, 1, parts, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        zero_partial(static_cast<int>(t));
        Kernels::scatter(vertex_.data(), weight_.data(), d_ + 1, in_scale, in, partial(static_cast<int>(t)), ld,
                         n_ * t / parts, n_ * (t + 1) / parts);
      }
    });
    finish_splat_blur(transpose);
  }

  // Caller-driven splat, for loops that produce the values row by row (the dense CRF): after
  // begin_splat(ld, parts), part t zeroes partial(t) with zero_partial(t) and scatters points
  // [n t / parts, n (t+1) / parts) into it; finish_splat_blur() sums the parts (in part order,
  // so the result does not depend on scheduling) and blurs. The partial buffers never alias the
  // blurred values of the previous round, so a row pass may slice those while it splats.
  int splat_parts(int64_t ld) const {
    return static_cast<int>(std::min<int64_t>(num_threads_, std::max<int64_t>(1, n_ / grain_for((d_ + 1) * ld))));
  }

  void begin_splat(int64_t ld, int parts) {
    const int64_t rows = m_ + 1;  // + the zero sentinel row
    ld_ = ld;
    parts_ = parts;
    if (static_cast<int64_t>(buf_a_.size()) < rows * ld) {
      buf_a_.resize(rows * ld);
      buf_b_.resize(rows * ld);
    }
    if (static_cast<int>(partial_.size()) < parts) partial_.resize(parts);
    for (int t = 0; t < parts; ++t)
      if (static_cast<int64_t>(partial_[t].size()) < rows * ld) partial_[t].resize(rows * ld);
  }

  scalar_t* partial(int t) { return partial_[t].data(); }

  void zero_partial(int t) { std::fill(partial_[t].begin(), partial_[t].begin() + (m_ + 1) * ld_, scalar_t(0)); }

  void finish_splat_blur(bool transpose) {
    const int64_t ld = ld_, rows = m_ + 1;
    if (parts_ == 1) {
      buf_a_.swap(partial_[0]);
    } else {
      std::vector<scalar_t*> ptrs(parts_);
      for (int t = 0; t < parts_; ++t) ptrs[t] = partial_[t].data();
      parallel_chunks(rows, grain_for(parts_ * ld), num_threads_, [&](int64_t v0, int64_t v1) {
        Kernels::reduce(ptrs.data(), parts_, buf_a_.data(), ld, v0, v1);
      });
    }
    scalar_t* cur = buf_a_.data();
    scalar_t* nxt = buf_b_.data();
    std::fill(nxt + m_ * ld, nxt + rows * ld, scalar_t(0));
    for (int step = 0; step <= d_; ++step) {
      const int j = transpose ? d_ - step : step;
      const int32_t* nb = &neighbors_[static_cast<size_t>(j) * m_ * 2];
      parallel_chunks(m_, grain_for(3 * ld), num_threads_,
                      [&](int64_t v0, int64_t v1) { Kernels::blur(nb, cur, nxt, ld, v0, v1); });
      std::swap(cur, nxt);
    }
    blurred_ = cur;
  }

  // The blurred values of the last finish_splat_blur() (null before) with the simplex corners
  // and weights that slicing and splatting need.
  detail::SliceView<scalar_t> slice_view() const {
    const scalar_t alpha = scalar_t(1) / (scalar_t(1) + std::pow(scalar_t(2), scalar_t(-d_)));
    return {vertex_.data(), weight_.data(), blurred_, d_ + 1, alpha};
  }

  // out = lattice filter of in (SPEC §6.2, unnormalised), both n rows of ld.
  void filter(const scalar_t* in, scalar_t* out, int64_t ld, bool transpose) {
    splat_blur(in, ld, transpose);
    const detail::SliceView<scalar_t> view = slice_view();
    parallel_chunks(n_, grain_for((d_ + 1) * ld), num_threads_,
                    [&](int64_t i0, int64_t i1) { Kernels::slice(view, out, ld, i0, i1); });
  }

 private:
  int d_ = 0;
  int64_t n_ = 0, m_ = 0;
  int num_threads_ = 1;
  std::vector<int32_t> vertex_;   // n x (d+1): vertex id of each simplex corner
  std::vector<scalar_t> weight_;  // n x (d+1): barycentric weights
  std::vector<int32_t> keys_;     // build only: m x d, first d coordinates of each vertex
  IdTable vertex_table_, simplex_table_;  // build only
  std::vector<int32_t> neighbors_;        // (d+1) x m x 2
  std::vector<scalar_t> buf_a_, buf_b_;
  std::vector<std::vector<scalar_t>> partial_;  // per-part splat buffers
  int64_t ld_ = 0;
  int parts_ = 1;
  const scalar_t* blurred_ = nullptr;
};

}  // namespace wsss
