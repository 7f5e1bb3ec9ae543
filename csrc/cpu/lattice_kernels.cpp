// float entry points of the lattice and dense-CRF inner loops. On x86-64 with GCC or Clang each
// is compiled twice, for AVX2+FMA and for the baseline ISA, and the CPU picks one at run time;
// the build needs no -march flag and the binary runs on any x86-64. Rows of up to
// kMaxFixedBlocks * kLanes channels use the register-resident loops of lattice_simd.h.
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only in always-inlined helpers
#endif

#include "lattice_kernels.h"

#include <type_traits>
#include <vector>

#include "lattice_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WSSS_AVX2_CLONES 1
#else
#define WSSS_AVX2_CLONES 0
#endif

namespace wsss {
namespace {

constexpr int kMaxFixedBlocks = 12;

#if WSSS_AVX2_CLONES
bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
// Defines NAME (the dispatcher) over NAME##_avx2 and NAME##_base, both inlining NAME##_body.
#define WSSS_DISPATCH(NAME, PARAMS, ARGS)                                 \
  __attribute__((target("avx2,fma"))) void NAME##_avx2 PARAMS { NAME##_body ARGS; } \
  void NAME##_base PARAMS { NAME##_body ARGS; }                           \
  void NAME PARAMS {                                                      \
    if (cpu_has_avx2_fma())                                               \
      NAME##_avx2 ARGS;                                                   \
    else                                                                  \
      NAME##_base ARGS;                                                   \
  }
#else
#define WSSS_DISPATCH(NAME, PARAMS, ARGS) \
  void NAME PARAMS { NAME##_body ARGS; }
#endif

// Calls Op::fixed<NB>(args...) for the compile-time NB equal to nb, or Op::generic(ld, args...)
// beyond kMaxFixedBlocks. Everything is force-inlined so that the whole chain is compiled for
// the ISA of the calling clone.
template <typename Op, int NB = 1, typename... Args>
WSSS_ALWAYS_INLINE void with_blocks(int nb, const Args&... args) {
  if constexpr (NB > kMaxFixedBlocks) {
    Op::generic(int64_t(nb) * kLanes, args...);
  } else {
    if (nb == NB)
      Op::template fixed<NB>(args...);
    else
      with_blocks<Op, NB + 1>(nb, args...);
  }
}

struct SplatOp {
  template <int NB>
  static WSSS_ALWAYS_INLINE void fixed(const int32_t* offset, const int32_t* point, const float* weight,
                                       const float* in, float* out, int64_t v0, int64_t v1) {
    simd::splat_range<NB>(offset, point, weight, in, out, v0, v1);
  }
  static WSSS_ALWAYS_INLINE void generic(int64_t ld, const int32_t* offset, const int32_t* point, const float* weight,
                                         const float* in, float* out, int64_t v0, int64_t v1) {
    detail::splat_range(offset, point, weight, in, out, ld, v0, v1);
  }
};

struct BlurOp {
  template <int NB>
  static WSSS_ALWAYS_INLINE void fixed(const int32_t* nb, const float* cur, float* nxt, int64_t v0, int64_t v1,
                                       bool stream) {
    simd::blur_range<NB>(nb, cur, nxt, v0, v1, stream);
  }
  static WSSS_ALWAYS_INLINE void generic(int64_t ld, const int32_t* nb, const float* cur, float* nxt, int64_t v0,
                                         int64_t v1, bool) {
    detail::blur_range(nb, cur, nxt, ld, v0, v1);
  }
};

struct SliceOp {
  template <int NB>
  static WSSS_ALWAYS_INLINE void fixed(const detail::SliceView<float>& s, float* out, int64_t i0, int64_t i1) {
    simd::slice_range<NB>(s, out, i0, i1);
  }
  static WSSS_ALWAYS_INLINE void generic(int64_t ld, const detail::SliceView<float>& s, float* out, int64_t i0,
                                         int64_t i1) {
    detail::slice_range(s, out, ld, i0, i1);
  }
};

struct RowPassOp {
  template <int NB>
  static WSSS_ALWAYS_INLINE void fixed(const float* neg_unary, int64_t K, const CrfKernel& g, const CrfKernel& b,
                                       float* q, int64_t i0, int64_t i1) {
    simd::crf_row_pass<NB>(neg_unary, K, g, b, q, i0, i1);
  }
  // Generic width: the same pass through a row buffer.
  static void generic(int64_t ld, const float* neg_unary, int64_t K, const CrfKernel& g, const CrfKernel& b, float* q,
                      int64_t i0, int64_t i1) {
    std::vector<float> row(ld);
    for (int64_t i = i0; i < i1; ++i) {
      std::memcpy(row.data(), neg_unary + i * ld, sizeof(float) * ld);
      for (const CrfKernel* c : {&g, &b})
        if (c->eta && c->lattice.values) detail::slice_point(c->lattice, i, c->weight * c->eta[i], row.data(), ld);
      float mx = row[0];
      for (int64_t k = 1; k < K; ++k) mx = std::max(mx, row[k]);
      float sum = 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += (row[k] = std::exp(row[k] - mx));
      for (int64_t k = 0; k < K; ++k) row[k] /= sum;
      if (q) std::memcpy(q + i * ld, row.data(), sizeof(float) * ld);
      for (const CrfKernel* c : {&g, &b})
        if (c->scatter)
          for (int k = 0; k < c->lattice.d1; ++k)
            detail::axpy(c->scatter + static_cast<int64_t>(c->lattice.vertex[i * c->lattice.d1 + k]) * ld, row.data(),
                         c->eta[i] * c->lattice.weight[i * c->lattice.d1 + k], ld);
    }
  }
};

WSSS_ALWAYS_INLINE void embed_f32_body(const float* f, int d, const float* scale, int32_t* rem0, int32_t* rank,
                                       float* bary, int64_t i0, int64_t i1) {
  detail::embed_range(f, d, scale, rem0, rank, bary, i0, i1);
}

WSSS_ALWAYS_INLINE void splat_f32_body(const int32_t* offset, const int32_t* point, const float* weight,
                                       const float* in, float* out, int64_t ld, int64_t v0, int64_t v1) {
  with_blocks<SplatOp>(static_cast<int>(ld / kLanes), offset, point, weight, in, out, v0, v1);
}

WSSS_ALWAYS_INLINE void blur_f32_body(const int32_t* nb, const float* cur, float* nxt, int64_t ld, int64_t v0,
                                      int64_t v1, bool stream) {
  with_blocks<BlurOp>(static_cast<int>(ld / kLanes), nb, cur, nxt, v0, v1, stream);
}

WSSS_ALWAYS_INLINE void slice_f32_body(const detail::SliceView<float>& s, float* out, int64_t ld, int64_t i0,
                                       int64_t i1) {
  with_blocks<SliceOp>(static_cast<int>(ld / kLanes), s, out, i0, i1);
}

WSSS_ALWAYS_INLINE void crf_row_pass_f32_body(const float* neg_unary, int64_t ld, int64_t K, const CrfKernel& g,
                                              const CrfKernel& b, float* q, int64_t i0, int64_t i1) {
  with_blocks<RowPassOp>(static_cast<int>(ld / kLanes), neg_unary, K, g, b, q, i0, i1);
}

WSSS_ALWAYS_INLINE void log_probs_f32_body(const float* probs, int64_t n, int64_t K, float* neg_unary, int64_t ld,
                                           int64_t i0, int64_t i1) {
  simd::log_probs(probs, n, K, neg_unary, ld, i0, i1);
}

WSSS_DISPATCH(embed_f32,
              (const float* f, int d, const float* scale, int32_t* rem0, int32_t* rank, float* bary, int64_t i0,
               int64_t i1),
              (f, d, scale, rem0, rank, bary, i0, i1))
WSSS_DISPATCH(splat_f32,
              (const int32_t* offset, const int32_t* point, const float* weight, const float* in, float* out,
               int64_t ld, int64_t v0, int64_t v1),
              (offset, point, weight, in, out, ld, v0, v1))
WSSS_DISPATCH(blur_f32,
              (const int32_t* nb, const float* cur, float* nxt, int64_t ld, int64_t v0, int64_t v1, bool stream),
              (nb, cur, nxt, ld, v0, v1, stream))
WSSS_DISPATCH(slice_f32, (const detail::SliceView<float>& s, float* out, int64_t ld, int64_t i0, int64_t i1),
              (s, out, ld, i0, i1))
WSSS_DISPATCH(crf_row_pass_f32,
              (const float* neg_unary, int64_t ld, int64_t K, const CrfKernel& g, const CrfKernel& b, float* q,
               int64_t i0, int64_t i1),
              (neg_unary, ld, K, g, b, q, i0, i1))
WSSS_DISPATCH(log_probs_f32,
              (const float* probs, int64_t n, int64_t K, float* neg_unary, int64_t ld, int64_t i0, int64_t i1),
              (probs, n, K, neg_unary, ld, i0, i1))

}  // namespace

void LatticeKernels<float>::embed(const float* f, int d, const float* scale, int32_t* rem0, int32_t* rank, float* bary,
                                  int64_t i0, int64_t i1) {
  embed_f32(f, d, scale, rem0, rank, bary, i0, i1);
}

void LatticeKernels<float>::splat(const int32_t* offset, const int32_t* point, const float* weight, const float* in,
                                  float* out, int64_t ld, int64_t v0, int64_t v1) {
  splat_f32(offset, point, weight, in, out, ld, v0, v1);
}

void LatticeKernels<float>::blur(const int32_t* nb, const float* cur, float* nxt, int64_t ld, int64_t v0, int64_t v1,
                                 bool stream) {
  blur_f32(nb, cur, nxt, ld, v0, v1, stream);
}

void LatticeKernels<float>::slice(const detail::SliceView<float>& s, float* out, int64_t ld, int64_t i0, int64_t i1) {
  slice_f32(s, out, ld, i0, i1);
}

void crf_row_pass(const float* neg_unary, int64_t ld, int64_t K, const CrfKernel& g, const CrfKernel& b, float* q,
                  int64_t i0, int64_t i1) {
  crf_row_pass_f32(neg_unary, ld, K, g, b, q, i0, i1);
}

void crf_log_probs(const float* probs, int64_t n, int64_t K, float* neg_unary, int64_t ld, int64_t i0, int64_t i1) {
  log_probs_f32(probs, n, K, neg_unary, ld, i0, i1);
}

}  // namespace wsss
