// Permutohedral lattice on the CPU (SPEC §6.2: Adams et al. 2010 in Krähenbühl's formulation).
//
// build() (lattice_build.h) finds each point's simplex, the vertices, each vertex's list of
// points and the blur neighbours; one lattice then serves any number of filters (the
// mean-field iterations of the dense CRF). Values are rows of ld = padded_channels(C) entries,
// zero in the padding. Every method is a team call (parallel.h): inside a team_region all
// threads call it and share the work; outside one it runs serially.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "lattice_build.h"
#include "lattice_buffer.h"
#include "lattice_kernels.h"
#include "parallel.h"

namespace wsss {

// Value arrays at least this large are written by the blur with non-temporal stores: they do
// not stay in the caches until the next pass reads them anyway.
constexpr int64_t kStreamingBytes = int64_t(8) << 20;

// The scatter splat's per-part buffers (all parts together) must fit in about this much cache.
constexpr int64_t kScatterBytes = int64_t(6) << 20;

template <typename scalar_t>
class PermutohedralLattice {
  using Kernels = LatticeKernels<scalar_t>;

 public:
  // features: n x d row-major; n >= 1, 1 <= d <= kMaxFeatureDim, n (d+1) < 2^31 (callers check).
  void build(const scalar_t* features, int64_t n, int d) {
    builder_.build(features, n, d, s_);
    team_single([&] { blurred_ = nullptr; });
  }

  int64_t num_vertices() const { return s_.m; }
  int64_t num_points() const { return s_.n; }

  // Multiplies the gather splat's weights of point i by scale[i] (the dense CRF's symmetric
  // normalisation eta, folded in once instead of every iteration).
  void scale_splat(const scalar_t* scale) {
    team_for(static_cast<int64_t>(s_.splat_point.size()), 16 * kRowsPerChunk, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) s_.splat_weight[t] *= scale[s_.splat_point[t]];
    });
  }

  // out[i] = lattice filter of the constant 1 at point i (the dense CRF's normalisation), with
  // one value per vertex instead of a padded row.
  void filter_ones(scalar_t* out) {
    team_single([&] { reserve_values(1); });
    const int64_t m = s_.m;
    scalar_t* cur = buf_a_.data();
    scalar_t* nxt = buf_b_.data();
    team_for(m, 4 * kRowsPerChunk, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        scalar_t acc = 0;
        for (int32_t t = s_.splat_offset[v]; t < s_.splat_offset[v + 1]; ++t) acc += s_.splat_weight[t];
        cur[v] = acc;
      }
    });
    for (int j = 0; j <= s_.d; ++j) {
      const int32_t* nb = &s_.neighbors[static_cast<size_t>(j) * m * 2];
      team_for(m, 4 * kRowsPerChunk, [&](int64_t v0, int64_t v1) {
        for (int64_t v = v0; v < v1; ++v) nxt[v] = cur[v] + scalar_t(0.5) * (cur[nb[2 * v]] + cur[nb[2 * v + 1]]);
      });
      std::swap(cur, nxt);
    }
    const detail::SliceView<scalar_t> view = slice_view();
    const int d1 = s_.d + 1;
    team_for(s_.n, 4 * kRowsPerChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t acc = 0;
        for (int k = 0; k < d1; ++k) acc += view.weight[i * d1 + k] * cur[view.vertex[i * d1 + k]];
        out[i] = view.alpha * acc;
      }
    });
  }

  // Gather splat of in (n rows of ld): vertex value = sum over its entries, in point order, of
  // weight * in[point].
  void splat(const scalar_t* in, int64_t ld) {
    team_single([&] { reserve_values(ld); });
    team_for(s_.m, kRowsPerChunk, [&](int64_t v0, int64_t v1) {
      Kernels::splat(s_.splat_offset.data(), s_.splat_point.data(), s_.splat_weight.data(), in, buf_a_.data(), ld,
                     v0, v1);
    });
  }

  // Scatter splat, for loops that produce the values point by point (the dense CRF's row pass):
  // the points are split into `parts` fixed ranges (part_begin), part t splats its points in
  // order into partial(t) (zeroed by zero_partial(t)), and finish_scatter() sums the parts in
  // part order into the splat values. Cheaper than the gather splat while the vertex values fit
  // in the caches (no second pass over the point values), but the sums depend on `parts`.
  bool prefer_scatter(int64_t ld, int parts) const {
    return static_cast<int64_t>(sizeof(scalar_t)) * parts * (s_.m + 1) * ld <= kScatterBytes;
  }

  void begin_scatter(int64_t ld, int parts) {
    team_single([&] {
      reserve_values(ld);
      parts_ = parts;
      const size_t size = static_cast<size_t>(parts) * (s_.m + 1) * ld;
      if (partial_.size() < size) partial_.resize(size);
    });
  }

  int64_t part_begin(int t) const { return s_.n * t / parts_; }
  scalar_t* partial(int t) { return partial_.data() + static_cast<size_t>(t) * (s_.m + 1) * ld_; }
  void zero_partial(int t) { std::fill(partial(t), partial(t) + s_.m * ld_, scalar_t(0)); }

  // shared: the team shares the work (a team call); otherwise the calling thread does it all.
  void finish_scatter(bool shared = true) {
    const size_t stride = static_cast<size_t>(s_.m + 1) * ld_;
    loop(shared, s_.m, kRowsPerChunk, [&](int64_t v0, int64_t v1) {
      scalar_t* __restrict dst = buf_a_.data();
      std::copy(partial_.data() + v0 * ld_, partial_.data() + v1 * ld_, dst + v0 * ld_);
      for (int t = 1; t < parts_; ++t) {
        const scalar_t* __restrict src = partial_.data() + t * stride;
        for (int64_t x = v0 * ld_; x < v1 * ld_; ++x) dst[x] += src[x];
      }
    });
  }

  // Whether the values are too large for the caches: the loops that read them prefetch, the
  // blur writes them with non-temporal stores.
  bool values_exceed_caches(int64_t ld) const {
    return static_cast<int64_t>(sizeof(scalar_t)) * (s_.m + 1) * ld >= kStreamingBytes;
  }

  // The d+1 blur passes (SPEC §6.2 "Blur"), each reading the previous pass's values; transpose
  // runs the directions in reverse order, which is the exact adjoint of the forward filter.
  // shared as for finish_scatter (a lattice small enough for one thread's passes is blurred
  // without a barrier per pass).
  void blur(bool transpose, bool shared = true) {
    const int d = s_.d;
    const int64_t m = s_.m;
    scalar_t* cur = buf_a_.data();
    scalar_t* nxt = buf_b_.data();
    const bool stream = values_exceed_caches(ld_);
    for (int step = 0; step <= d; ++step) {
      const int j = transpose ? d - step : step;
      const int32_t* nb = &s_.neighbors[static_cast<size_t>(j) * m * 2];
      loop(shared, m, kRowsPerChunk,
           [&](int64_t v0, int64_t v1) { Kernels::blur(nb, cur, nxt, ld_, v0, v1, stream); });
      std::swap(cur, nxt);
    }
    if (shared)
      team_single([&] { blurred_ = cur; });
    else
      blurred_ = cur;
  }

  // The blurred values of the last blur() (null before) with the simplex corners and weights
  // that slicing needs.
  detail::SliceView<scalar_t> slice_view() const {
    const scalar_t alpha = scalar_t(1) / (scalar_t(1) + std::pow(scalar_t(2), scalar_t(-s_.d)));
    return {s_.vertex.data(), s_.weight.data(), blurred_, s_.d + 1, alpha};
  }

  // out = alpha sum_k b_ik blurred[vertex_ik] (SPEC §6.2 "Slice"), n rows of ld.
  void slice(scalar_t* out) {
    const detail::SliceView<scalar_t> view = slice_view();
    team_for(s_.n, kRowsPerChunk, [&](int64_t i0, int64_t i1) { Kernels::slice(view, out, ld_, i0, i1); });
  }

  // out = lattice filter of in (SPEC §6.2, unnormalised), both n rows of ld.
  void filter(const scalar_t* in, scalar_t* out, int64_t ld, bool transpose) {
    splat(in, ld);
    blur(transpose);
    slice(out);
  }

 private:
  template <typename F>
  static void loop(bool shared, int64_t n, int64_t chunk, const F& f) {
    if (shared)
      team_for(n, chunk, f);
    else if (n > 0)
      f(0, n);
  }

  // Value buffers of m + 1 rows of ld (the last row is the zero row of missing neighbours).
  void reserve_values(int64_t ld) {
    const size_t rows = static_cast<size_t>(s_.m) + 1, size = rows * ld;
    if (buf_a_.size() < size) {
      buf_a_.resize(size);
      buf_b_.resize(size);
    }
    std::fill(buf_a_.begin() + (rows - 1) * ld, buf_a_.begin() + size, scalar_t(0));
    std::fill(buf_b_.begin() + (rows - 1) * ld, buf_b_.begin() + size, scalar_t(0));
    ld_ = ld;
  }

  LatticeStructure<scalar_t> s_;
  LatticeBuilder<scalar_t> builder_;
  Buffer<scalar_t> buf_a_, buf_b_;  // splat / blur ping-pong
  Buffer<scalar_t> partial_;        // scatter splat: parts x (m + 1) x ld
  int64_t ld_ = 0;
  int parts_ = 1;
  const scalar_t* blurred_ = nullptr;
};

}  // namespace wsss
