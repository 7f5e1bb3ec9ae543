// Inner loops of the CPU lattice and of the dense CRF, written once as inline templates.
//
// float is the hot path (dense CRF, energy loss): LatticeKernels<float> is implemented in
// lattice_kernels.cpp, compiled for AVX2+FMA and for the baseline ISA with the choice made at run
// time, so the extension needs no -march flag and runs on any x86-64. double (tests, gradcheck)
// calls the templates directly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "lattice_embed.h"

#if defined(__GNUC__) || defined(__clang__)
#define WSSS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define WSSS_ALWAYS_INLINE inline
#endif

namespace wsss {
// Value rows are padded to whole blocks of kLanes, zero in the padding, so the channel loops
// have a fixed-width body.
constexpr int kLanes = 8;

inline int64_t padded_channels(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

namespace detail {

template <typename T>
WSSS_ALWAYS_INLINE void axpy(T* __restrict dst, const T* __restrict src, T w, int64_t ld) {
  for (int64_t c = 0; c < ld; c += kLanes)
    for (int l = 0; l < kLanes; ++l) dst[c + l] += w * src[c + l];
}

template <typename T>
WSSS_ALWAYS_INLINE void embed_range(const T* features, int d, const T* scale, int32_t* rem0, int32_t* rank, T* bary,
                                    int64_t i0, int64_t i1) {
  const int d1 = d + 1;
  if (d == 2) {
    for (int64_t i = i0; i < i1; ++i)
      lattice_embed_point<T, 2>(features + i * 2, 2, scale, rem0 + i * 3, rank + i * 3, bary + i * 3);
  } else if (d == 5) {
    for (int64_t i = i0; i < i1; ++i)
      lattice_embed_point<T, 5>(features + i * 5, 5, scale, rem0 + i * 6, rank + i * 6, bary + i * 6);
  } else {
    for (int64_t i = i0; i < i1; ++i)
      lattice_embed_point(features + i * d, d, scale, rem0 + i * d1, rank + i * d1, bary + i * d1);
  }
}

// Splat, gather form: out[v] = sum over v's entries t (in point order) of weight[t] * in[point[t]],
// for vertices [v0, v1).
template <typename T>
WSSS_ALWAYS_INLINE void splat_range(const int32_t* offset, const int32_t* point, const T* weight, const T* in, T* out,
                                    int64_t ld, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v) {
    T* dst = out + v * ld;
    std::fill(dst, dst + ld, T(0));
    for (int32_t t = offset[v]; t < offset[v + 1]; ++t)
      axpy(dst, in + static_cast<int64_t>(point[t]) * ld, weight[t], ld);
  }
}

// One blur direction: nxt[v] = cur[v] + 0.5 (cur[n1] + cur[n2]); a missing neighbour is the
// zero row.
template <typename T>
WSSS_ALWAYS_INLINE void blur_range(const int32_t* nb, const T* cur, T* nxt, int64_t ld, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v) {
    const T* __restrict a = cur + static_cast<int64_t>(nb[2 * v]) * ld;
    const T* __restrict b = cur + static_cast<int64_t>(nb[2 * v + 1]) * ld;
    const T* __restrict s = cur + v * ld;
    T* __restrict dst = nxt + v * ld;
    for (int64_t c = 0; c < ld; c += kLanes)
      for (int l = 0; l < kLanes; ++l) dst[c + l] = s[c + l] + T(0.5) * (a[c + l] + b[c + l]);
  }
}

// What slicing needs from a lattice after its blur.
template <typename T>
struct SliceView {
  const int32_t* vertex;  // n x (d+1)
  const T* weight;        // n x (d+1)
  const T* values;        // blurred vertex values, rows of ld
  int d1;
  T alpha;
};

// dst[0..ld) += scale * alpha * sum_k b_ik values[v_ik].
template <typename T>
WSSS_ALWAYS_INLINE void slice_point(const SliceView<T>& s, int64_t i, T scale, T* __restrict dst, int64_t ld) {
  const T a = s.alpha * scale;
  for (int k = 0; k < s.d1; ++k)
    axpy(dst, s.values + static_cast<int64_t>(s.vertex[i * s.d1 + k]) * ld, a * s.weight[i * s.d1 + k], ld);
}

template <typename T>
WSSS_ALWAYS_INLINE void slice_range(const SliceView<T>& s, T* out, int64_t ld, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    std::fill(out + i * ld, out + (i + 1) * ld, T(0));
    slice_point(s, i, T(1), out + i * ld, ld);
  }
}

}  // namespace detail

// Entry points over index ranges.
template <typename T>
struct LatticeKernels {
  static void embed(const T* f, int d, const T* scale, int32_t* rem0, int32_t* rank, T* bary, int64_t i0, int64_t i1) {
    detail::embed_range(f, d, scale, rem0, rank, bary, i0, i1);
  }
  static void splat(const int32_t* offset, const int32_t* point, const T* weight, const T* in, T* out, int64_t ld,
                    int64_t v0, int64_t v1) {
    detail::splat_range(offset, point, weight, in, out, ld, v0, v1);
  }
  static void blur(const int32_t* nb, const T* cur, T* nxt, int64_t ld, int64_t v0, int64_t v1, bool /*stream*/) {
    detail::blur_range(nb, cur, nxt, ld, v0, v1);
  }
  static void slice(const detail::SliceView<T>& s, T* out, int64_t ld, int64_t i0, int64_t i1) {
    detail::slice_range(s, out, ld, i0, i1);
  }
};

template <>
struct LatticeKernels<float> {
  static void embed(const float* f, int d, const float* scale, int32_t* rem0, int32_t* rank, float* bary, int64_t i0,
                    int64_t i1);
  static void splat(const int32_t* offset, const int32_t* point, const float* weight, const float* in, float* out,
                    int64_t ld, int64_t v0, int64_t v1);
  // stream: write nxt with non-temporal stores (rows 16-byte aligned).
  static void blur(const int32_t* nb, const float* cur, float* nxt, int64_t ld, int64_t v0, int64_t v1, bool stream);
  static void slice(const detail::SliceView<float>& s, float* out, int64_t ld, int64_t i0, int64_t i1);
};

// One pairwise kernel in a mean-field row pass of the dense CRF (SPEC §6.3).
struct CrfKernel {
  detail::SliceView<float> lattice;  // corners, weights and the blurred message (values null: none)
  const float* eta;                  // symmetric normalisation per point (null: kernel unused)
  float weight;                      // Potts weight w
  float* scatter;                    // if set, splat eta_i q_i here (vertex rows of ld)
  bool prefetch;                     // prefetch the message rows (values far larger than the caches)
};

// Rows [i0, i1), rows of ld floats with zero padding:
//   q_i = softmax_K(neg_unary_i + sum over kernels with a message of w eta_i slice(i));
// q_i is stored in q (unless null) and, for kernels with a scatter buffer, splatted into it
// (eta_i b_ik q_i added to the row of each corner v_ik, points in order).
void crf_row_pass(const float* neg_unary, int64_t ld, int64_t K, const CrfKernel& g, const CrfKernel& b, float* q,
                  int64_t i0, int64_t i1);

// neg_unary row i = log(clip(p, 1e-5, 1)) of probs (K x n, class-major), zero padding.
void crf_log_probs(const float* probs, int64_t n, int64_t K, float* neg_unary, int64_t ld, int64_t i0, int64_t i1);

}  // namespace wsss
