// CPU kernel of wsss::permutohedral_filter (SPEC §6.2).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "permutohedral.h"

namespace wsss {
namespace {

at::Tensor permutohedral_filter_cpu(const at::Tensor& features, const at::Tensor& values, bool transpose) {
  TORCH_CHECK(features.dim() == 3 && values.dim() == 3, "permutohedral_filter: features (B,N,d) and values (B,N,C) expected, got ",
              features.sizes(), " and ", values.sizes());
  TORCH_CHECK(features.size(0) == values.size(0) && features.size(1) == values.size(1),
              "permutohedral_filter: features ", features.sizes(), " and values ", values.sizes(), " disagree on (B,N)");
  TORCH_CHECK(features.scalar_type() == values.scalar_type(), "permutohedral_filter: features and values dtypes differ");
  TORCH_CHECK(features.is_contiguous() && values.is_contiguous(), "permutohedral_filter: inputs must be contiguous");
  const int64_t B = values.size(0), N = values.size(1), C = values.size(2);
  const int d = static_cast<int>(features.size(2));
  TORCH_CHECK(d >= 1 && d <= kMaxFeatureDim, "permutohedral_filter: feature dim must be in 1..", kMaxFeatureDim,
              ", got ", d);
  TORCH_CHECK(N <= kMaxLatticePoints, "permutohedral_filter: at most ", kMaxLatticePoints, " points, got ", N);
  at::Tensor out = at::empty_like(values);
  if (N == 0 || C == 0) return out.zero_();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "permutohedral_filter_cpu", [&] {
    const int threads = resolve_num_threads(0);
    const int64_t ld = padded_channels(C);
    // Several images: one thread per image, each image on a team of one. One image: a team of
    // all threads shares the lattice's loops.
    const int64_t outer = std::min<int64_t>(B, threads);
    const int inner = outer > 1 ? 1 : threads;
    parallel_chunks(B, 1, static_cast<int>(outer), [&](int64_t b0, int64_t b1) {
      // The lattice streams rows padded to whole SIMD blocks.
      std::vector<scalar_t> in(N * ld, scalar_t(0)), res(N * ld);
      PermutohedralLattice<scalar_t> lattice;
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* src = values.data_ptr<scalar_t>() + b * N * C;
        scalar_t* dst = out.data_ptr<scalar_t>() + b * N * C;
        for (int64_t i = 0; i < N; ++i) std::copy(src + i * C, src + (i + 1) * C, in.data() + i * ld);
        const scalar_t* f = features.data_ptr<scalar_t>() + b * N * d;
        team_region(inner, [&] {
          lattice.build(f, N, d);
          lattice.filter(in.data(), res.data(), ld, transpose);
        });
        for (int64_t i = 0; i < N; ++i) std::copy(res.data() + i * ld, res.data() + i * ld + C, dst + i * C);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("permutohedral_filter", &permutohedral_filter_cpu);
}

}  // namespace wsss
