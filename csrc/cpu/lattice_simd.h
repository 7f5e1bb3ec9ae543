// float inner loops with a compile-time row width, written with GCC/Clang vector extensions so a
// whole value row (NB blocks of 8 floats) lives in registers: one AVX register per block when
// compiled for AVX2, two SSE registers otherwise. Included only by lattice_kernels.cpp, whose
// functions inline all of these (so 32-byte vectors never cross a call boundary).
#pragma once

#include <cstdint>
#include <cstring>

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

WSSS_ALWAYS_INLINE f8 broadcast(float x) { return f8{x, x, x, x, x, x, x, x}; }

WSSS_ALWAYS_INLINE float hmax(f8 v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

WSSS_ALWAYS_INLINE float hsum(f8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

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

template <int NB>
WSSS_ALWAYS_INLINE void scatter_range(const int32_t* vertex, const float* weight, int d1, const float* in_scale,
                                      const float* in, float* out, int64_t i0, int64_t i1) {
  constexpr int L = NB * kLanes;
  for (int64_t i = i0; i < i1; ++i) {
    f8 x[NB];
    for (int b = 0; b < NB; ++b) x[b] = load(in + i * L + b * kLanes);
    const float s = in_scale ? in_scale[i] : 1.0f;
    for (int k = 0; k < d1; ++k) {
      const f8 w = broadcast(s * weight[i * d1 + k]);
      float* dst = out + static_cast<int64_t>(vertex[i * d1 + k]) * L;
      for (int b = 0; b < NB; ++b) store(dst + b * kLanes, load(dst + b * kLanes) + w * x[b]);
    }
  }
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

// dst[v_ik] += s b_ik x for the d+1 corners of point i.
template <int NB>
WSSS_ALWAYS_INLINE void scatter_row(const detail::SliceView<float>& lat, int64_t i, float s, const f8* x,
                                    float* out) {
  constexpr int L = NB * kLanes;
  for (int k = 0; k < lat.d1; ++k) {
    const f8 w = broadcast(s * lat.weight[i * lat.d1 + k]);
    float* dst = out + static_cast<int64_t>(lat.vertex[i * lat.d1 + k]) * L;
    for (int b = 0; b < NB; ++b) store(dst + b * kLanes, load(dst + b * kLanes) + w * x[b]);
  }
}

// Mean-field row pass (see crf_row_pass): softmax over the first K lanes, padding lanes 0; max
// and sum reduced lane-wise first (no long dependency chains).
template <int NB>
WSSS_ALWAYS_INLINE void crf_row_pass(const float* neg_unary, int64_t K, const CrfKernel& g, const CrfKernel& bl,
                                     float* q, int64_t i0, int64_t i1) {
  constexpr int L = NB * kLanes;
  const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const f8 lowest = broadcast(-3.0e38f);
  const int32_t k32 = static_cast<int32_t>(K);
  const bool msg_g = g.eta && g.lattice.values, msg_b = bl.eta && bl.lattice.values;
  const bool splat_g = g.eta && g.splat, splat_b = bl.eta && bl.splat;
  for (int64_t i = i0; i < i1; ++i) {
    f8 acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = load(neg_unary + i * L + b * kLanes);
    if (msg_g) slice_accumulate<NB>(g.lattice, i, g.weight * g.eta[i], acc);
    if (msg_b) slice_accumulate<NB>(bl.lattice, i, bl.weight * bl.eta[i], acc);
    f8 m = lowest;
    for (int b = 0; b < NB; ++b) {
      const f8 v = (lane + b * kLanes) < k32 ? acc[b] : lowest;
      m = v > m ? v : m;
    }
    const float mx = hmax(m);
    f8 sum = {};
    for (int b = 0; b < NB; ++b) {
      f8 d = acc[b] - mx;
      d = d < 0.0f ? d : 0.0f;
      const f8 e = exp_nonpositive(d);
      acc[b] = (lane + b * kLanes) < k32 ? e : 0.0f;
      sum += acc[b];
    }
    const f8 inv = broadcast(1.0f / hsum(sum));
    for (int b = 0; b < NB; ++b) acc[b] *= inv;
    if (q)
      for (int b = 0; b < NB; ++b) store(q + i * L + b * kLanes, acc[b]);
    if (splat_g) scatter_row<NB>(g.lattice, i, g.eta[i], acc, g.splat);
    if (splat_b) scatter_row<NB>(bl.lattice, i, bl.eta[i], acc, bl.splat);
  }
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
