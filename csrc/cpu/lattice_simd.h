// float inner loops with a compile-time row width, written with GCC/Clang vector extensions so a
// whole value row (NB blocks of 8 floats) lives in registers: one AVX register per block when
// compiled for AVX2, two SSE registers otherwise. Included only by lattice_kernels.cpp, whose
// functions inline all of these (so 32-byte vectors never cross a call boundary).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "lattice_kernels.h"

namespace wsss {
namespace simd {

static_assert(kLanes == 8, "one f8 holds one block of kLanes floats");
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

WSSS_ALWAYS_INLINE f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

WSSS_ALWAYS_INLINE void store(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

// Non-temporal store of one block (16-byte aligned; SSE, so it compiles for the x86-64 baseline
// ISA; a plain store elsewhere).
WSSS_ALWAYS_INLINE void store_stream(float* p, f8 v) {
#if defined(__SSE__)
  _mm_stream_ps(p, __m128{v[0], v[1], v[2], v[3]});
  _mm_stream_ps(p + 4, __m128{v[4], v[5], v[6], v[7]});
#else
  store(p, v);
#endif
}

WSSS_ALWAYS_INLINE void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

WSSS_ALWAYS_INLINE f8 broadcast(float x) { return f8{x, x, x, x, x, x, x, x}; }

// Lane permutations for the horizontal reductions.
#if defined(__clang__)
#define WSSS_PERMUTE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define WSSS_PERMUTE(v, ...) __builtin_shuffle(v, i8{__VA_ARGS__})
#endif

// Maximum / sum of the 8 lanes, in every lane (butterfly: halves, pairs, neighbours).
WSSS_ALWAYS_INLINE f8 hmax_all(f8 v) {
  f8 t = WSSS_PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = v > t ? v : t;
  t = WSSS_PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = v > t ? v : t;
  t = WSSS_PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v > t ? v : t;
}

WSSS_ALWAYS_INLINE f8 hsum_all(f8 v) {
  v += WSSS_PERMUTE(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += WSSS_PERMUTE(v, 2, 3, 0, 1, 6, 7, 4, 5);
  return v + WSSS_PERMUTE(v, 1, 0, 3, 2, 5, 4, 7, 6);
}

// Software prefetch of one value row (it spans two cache lines unless aligned): the lattice
// loops read rows at data-dependent addresses the hardware prefetcher cannot predict.
template <int NB>
WSSS_ALWAYS_INLINE void prefetch_row(const float* p) {
  __builtin_prefetch(p);
  __builtin_prefetch(p + NB * kLanes - 1);
}

// How many vertices / points ahead the loops prefetch.
constexpr int kPrefetchVertices = 8;
constexpr int kPrefetchPoints = 4;

// exp(x) for x <= 0, ~1 ulp: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes
// coefficients). Below exp(-87) the result is ~1e-38 instead of 0, which cannot change a
// softmax whose largest term is 1.
WSSS_ALWAYS_INLINE f8 exp_nonpositive(f8 x) {
  const f8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  f8 r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  f8 p = broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  i8 e = __builtin_convertvector(n, i8);
  e = e < -126 ? -126 : e;
  const i8 bits = (e + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log(x) for normal x > 0, ~2 ulp: x = m 2^e with m in [sqrt(1/2), sqrt(2)), then a degree-8
// polynomial in m - 1 (Cephes coefficients).
WSSS_ALWAYS_INLINE f8 log_positive(f8 x) {
  i8 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  i8 e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  f8 m;
  std::memcpy(&m, &bits, sizeof(m));
  const i8 small = m < 0.707106781186547524f;
  e = e + small;  // small lanes are -1
  f8 ef = __builtin_convertvector(e, f8);
  m = small ? m + m - 1.0f : m - 1.0f;
  const f8 z = m * m;
  f8 y = broadcast(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + ef * 0.693359375f;
}

// Gather splat (see detail::splat_range): vertex rows [v0, v1), accumulated in registers.
template <int NB>
WSSS_ALWAYS_INLINE void splat_range(const int32_t* offset, const int32_t* point, const float* weight, const float* in,
                                    float* out, int64_t v0, int64_t v1) {
  constexpr int L = NB * kLanes;
  for (int64_t v = v0; v < v1; ++v) {
    if (v + kPrefetchVertices < v1)
      for (int32_t t = offset[v + kPrefetchVertices]; t < offset[v + kPrefetchVertices + 1]; ++t)
        prefetch_row<NB>(in + static_cast<int64_t>(point[t]) * L);
    f8 acc[NB] = {};
    for (int32_t t = offset[v]; t < offset[v + 1]; ++t) {
      const f8 w = broadcast(weight[t]);
      const float* src = in + static_cast<int64_t>(point[t]) * L;
      for (int b = 0; b < NB; ++b) acc[b] += w * load(src + b * kLanes);
    }
    for (int b = 0; b < NB; ++b) store(out + v * L + b * kLanes, acc[b]);
  }
}

// One blur direction (see detail::blur_range) with a compile-time row width. Stream: write nxt
// with non-temporal stores (for value arrays much larger than the caches, whose lines would
// otherwise be read for ownership before being overwritten).
template <int NB, bool Stream>
WSSS_ALWAYS_INLINE void blur_rows(const int32_t* nb, const float* cur, float* nxt, int64_t v0, int64_t v1) {
  constexpr int L = NB * kLanes;
  const f8 half = broadcast(0.5f);
  for (int64_t v = v0; v < v1; ++v) {
    if (v + kPrefetchVertices < v1) {
      prefetch_row<NB>(cur + static_cast<int64_t>(nb[2 * (v + kPrefetchVertices)]) * L);
      prefetch_row<NB>(cur + static_cast<int64_t>(nb[2 * (v + kPrefetchVertices) + 1]) * L);
    }
    const float* a = cur + static_cast<int64_t>(nb[2 * v]) * L;
    const float* c = cur + static_cast<int64_t>(nb[2 * v + 1]) * L;
    for (int b = 0; b < NB; ++b) {
      const f8 x = load(cur + v * L + b * kLanes) + half * (load(a + b * kLanes) + load(c + b * kLanes));
      if (Stream)
        store_stream(nxt + v * L + b * kLanes, x);
      else
        store(nxt + v * L + b * kLanes, x);
    }
  }
  if (Stream) stream_fence();
}

template <int NB>
WSSS_ALWAYS_INLINE void blur_range(const int32_t* nb, const float* cur, float* nxt, int64_t v0, int64_t v1,
                                   bool stream) {
  if (stream)
    blur_rows<NB, true>(nb, cur, nxt, v0, v1);
  else
    blur_rows<NB, false>(nb, cur, nxt, v0, v1);
}

template <int NB>
WSSS_ALWAYS_INLINE void slice_accumulate(const detail::SliceView<float>& s, int64_t i, float scale, f8* acc) {
  constexpr int L = NB * kLanes;
  const float a = s.alpha * scale;
  for (int k = 0; k < s.d1; ++k) {
    const f8 w = broadcast(a * s.weight[i * s.d1 + k]);
    const float* src = s.values + static_cast<int64_t>(s.vertex[i * s.d1 + k]) * L;
    for (int b = 0; b < NB; ++b) acc[b] += w * load(src + b * kLanes);
  }
}

template <int NB>
WSSS_ALWAYS_INLINE void slice_range(const detail::SliceView<float>& s, float* out, int64_t i0, int64_t i1) {
  constexpr int L = NB * kLanes;
  for (int64_t i = i0; i < i1; ++i) {
    f8 acc[NB] = {};
    slice_accumulate<NB>(s, i, 1.0f, acc);
    for (int b = 0; b < NB; ++b) store(out + i * L + b * kLanes, acc[b]);
  }
}

// What the row pass reads of one CrfKernel, copied into locals: stores into Q and the scatter
// buffers then cannot alias them, so they stay in registers.
struct RowKernel {
  const int32_t* vertex;
  const float* weight;
  const float* values;  // blurred message (null: none)
  const float* eta;
  float* scatter;
  float alpha, w;
  int d1;
  bool message, prefetch;

  explicit RowKernel(const CrfKernel& k)
      : vertex(k.lattice.vertex), weight(k.lattice.weight), values(k.lattice.values), eta(k.eta), scatter(k.scatter),
        alpha(k.lattice.alpha), w(k.weight), d1(k.lattice.d1), message(k.eta && k.lattice.values),
        prefetch(k.eta && k.lattice.values && k.prefetch) {}
};

// acc += alpha w eta_i sum_k b_ik values[v_ik]; D1 > 0 fixes the corner count at compile time.
template <int NB, int D1>
WSSS_ALWAYS_INLINE void slice_add(const RowKernel& k, int64_t i, f8* acc) {
  constexpr int L = NB * kLanes;
  const int d1 = D1 > 0 ? D1 : k.d1;
  const float a = k.alpha * (k.w * k.eta[i]);
  for (int c = 0; c < d1; ++c) {
    const f8 wc = broadcast(a * k.weight[i * d1 + c]);
    const float* src = k.values + static_cast<int64_t>(k.vertex[i * d1 + c]) * L;
    for (int b = 0; b < NB; ++b) acc[b] += wc * load(src + b * kLanes);
  }
}

template <int NB, int D1>
WSSS_ALWAYS_INLINE void prefetch_corners(const RowKernel& k, int64_t i) {
  const int d1 = D1 > 0 ? D1 : k.d1;
  for (int c = 0; c < d1; ++c) prefetch_row<NB>(k.values + static_cast<int64_t>(k.vertex[i * d1 + c]) * NB * kLanes);
}

// scatter[v_ik] += eta_i b_ik x for the corners of point i.
template <int NB, int D1>
WSSS_ALWAYS_INLINE void scatter_add(const RowKernel& k, int64_t i, const f8* x) {
  constexpr int L = NB * kLanes;
  const int d1 = D1 > 0 ? D1 : k.d1;
  const float e = k.eta[i];
  for (int c = 0; c < d1; ++c) {
    const f8 wc = broadcast(e * k.weight[i * d1 + c]);
    float* dst = k.scatter + static_cast<int64_t>(k.vertex[i * d1 + c]) * L;
    for (int b = 0; b < NB; ++b) store(dst + b * kLanes, load(dst + b * kLanes) + wc * x[b]);
  }
}

// Mean-field row pass (see crf_row_pass) with the corner counts DG, DB of the two kernels (0:
// read at run time): softmax over the first K lanes, padding lanes 0; max and sum reduced
// lane-wise first (no long dependency chains).
template <int NB, int DG, int DB>
WSSS_ALWAYS_INLINE void crf_rows(const float* neg_unary, int64_t K, const RowKernel& g, const RowKernel& bl, float* q,
                                 int64_t i0, int64_t i1) {
  constexpr int L = NB * kLanes;
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const f8 lowest = broadcast(-3.0e38f);
  const int32_t k32 = static_cast<int32_t>(K);
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kPrefetchPoints < i1) {
      if (g.prefetch) prefetch_corners<NB, DG>(g, i + kPrefetchPoints);
      if (bl.prefetch) prefetch_corners<NB, DB>(bl, i + kPrefetchPoints);
    }
    f8 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = load(neg_unary + i * L + b * kLanes);
    if (g.message) slice_add<NB, DG>(g, i, acc);
    if (bl.message) slice_add<NB, DB>(bl, i, acc);
    f8 m = lowest;
    for (int b = 0; b < NB; ++b) {
      const f8 v = (lane + b * kLanes) < k32 ? acc[b] : lowest;
      m = v > m ? v : m;
    }
    const f8 mx = hmax_all(m);
    f8 sum = {};
    for (int b = 0; b < NB; ++b) {
      f8 d = acc[b] - mx;
      d = d < 0.0f ? d : 0.0f;
      const f8 e = exp_nonpositive(d);
      acc[b] = (lane + b * kLanes) < k32 ? e : 0.0f;
      sum += acc[b];
    }
    const f8 inv = 1.0f / hsum_all(sum);
    for (int b = 0; b < NB; ++b) acc[b] *= inv;
    if (q)
      for (int b = 0; b < NB; ++b) store(q + i * L + b * kLanes, acc[b]);
    if (g.scatter) scatter_add<NB, DG>(g, i, acc);
    if (bl.scatter) scatter_add<NB, DB>(bl, i, acc);
  }
}

// The dense CRF's kernels are a 2-d Gaussian (3 corners) and a 5-d bilateral one (6 corners).
template <int NB>
WSSS_ALWAYS_INLINE void crf_row_pass(const float* neg_unary, int64_t K, const CrfKernel& g, const CrfKernel& bl,
                                     float* q, int64_t i0, int64_t i1) {
  const RowKernel rg(g), rb(bl);
  if ((!g.eta || rg.d1 == 3) && (!bl.eta || rb.d1 == 6))
    crf_rows<NB, 3, 6>(neg_unary, K, rg, rb, q, i0, i1);
  else
    crf_rows<NB, 0, 0>(neg_unary, K, rg, rb, q, i0, i1);
}

// neg_unary rows = log(clip(p, 1e-5, 1)) for rows [i0, i1), 8 points at a time per class.
WSSS_ALWAYS_INLINE void log_probs(const float* probs, int64_t n, int64_t K, float* neg_unary, int64_t ld, int64_t i0,
                                  int64_t i1) {
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
    for (int64_t k = 0; k < K; ++k) {
      f8 p = load(probs + k * n + i);
      p = p < 1e-5f ? 1e-5f : p;
      p = p > 1.0f ? 1.0f : p;
      const f8 lg = log_positive(p);
      for (int l = 0; l < kLanes; ++l) neg_unary[(i + l) * ld + k] = lg[l];
    }
    for (int l = 0; l < kLanes; ++l) std::fill(neg_unary + (i + l) * ld + K, neg_unary + (i + l + 1) * ld, 0.0f);
  }
  for (; i < i1; ++i) {
    for (int64_t k = 0; k < K; ++k)
      neg_unary[i * ld + k] = std::log(std::min(std::max(probs[k * n + i], 1e-5f), 1.0f));
    std::fill(neg_unary + i * ld + K, neg_unary + (i + 1) * ld, 0.0f);
  }
}

}  // namespace simd
}  // namespace wsss
