// The point embedding of the permutohedral lattice (SPEC §6.2), one source for the CPU and
// the CUDA kernels (the CUDA file includes it too).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define WSSS_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define WSSS_HOST_DEVICE inline __attribute__((always_inline))
#else
#define WSSS_HOST_DEVICE inline
#endif

namespace wsss {

constexpr int kMaxFeatureDim = 16;

using std::ceil;
using std::floor;

// SPEC §6.2 "Elevate", "Enclosing simplex" and "Barycentric weights" for one point:
// writes rem0, rank and the barycentric weights (d+1 each).
// scale[j] = sqrt(2/3) (d+1) / sqrt((j+1)(j+2)). D > 0 fixes the dimension at compile time
// (d is then ignored), which lets the compiler unroll everything for the common d = 2 and 5.
template <typename T, int D = 0>
WSSS_HOST_DEVICE void lattice_embed_point(const T* f, int d_runtime, const T* scale, int32_t* rem0, int32_t* rank,
                                          T* bary_out) {
  const int d = D > 0 ? D : d_runtime;
  const int d1 = d + 1;
  const T inv_d1 = T(1) / T(d1);  // multiplying by 1/(d+1) as Krähenbühl's code does
  T elevated[kMaxFeatureDim + 1];
  T resid[kMaxFeatureDim + 1];
  T bary[kMaxFeatureDim + 2];
  T tail = 0;  // sum of c_i for i >= j
  for (int j = d; j > 0; --j) {
    const T cj = f[j - 1] * scale[j - 1];
    elevated[j] = tail - T(j) * cj;
    tail += cj;
  }
  elevated[0] = tail;
  // Nearest remainder-0 point: each coordinate to the nearest multiple of d+1, halves down.
  int32_t sum = 0;
  for (int c = 0; c <= d; ++c) {
    const T q = elevated[c] * inv_d1;
    const T lo = floor(q), hi = ceil(q);
    const T r = (hi * T(d1) - elevated[c] < elevated[c] - lo * T(d1)) ? hi : lo;
    rem0[c] = static_cast<int32_t>(r) * d1;
    sum += static_cast<int32_t>(r);
  }
  // Rank of each residual: how many are larger, ties broken by index. Branch-free, because the
  // comparisons are data dependent and would mispredict half of the time.
  for (int c = 0; c <= d; ++c) {
    resid[c] = elevated[c] - T(rem0[c]);
    rank[c] = 0;
  }
  for (int a = 0; a < d; ++a) {
    for (int b = a + 1; b <= d; ++b) {
      const int32_t a_smaller = resid[a] < resid[b];
      rank[a] += a_smaller;
      rank[b] += 1 - a_smaller;
    }
  }
  // Back onto the plane when the rounded coordinates do not sum to zero.
  for (int c = 0; c <= d; ++c) {
    rank[c] += sum;
    const int32_t wrap = (rank[c] < 0) - (rank[c] > d);
    rank[c] += wrap * d1;
    rem0[c] += wrap * d1;
  }
  for (int k = 0; k <= d + 1; ++k) bary[k] = 0;
  for (int c = 0; c <= d; ++c) {
    const T v = (elevated[c] - T(rem0[c])) * inv_d1;  // rem0 after the wrap
    bary[d - rank[c]] += v;
    bary[d - rank[c] + 1] -= v;
  }
  bary[0] += T(1) + bary[d + 1];
  for (int k = 0; k <= d; ++k) bary_out[k] = bary[k];
}

}  // namespace wsss
