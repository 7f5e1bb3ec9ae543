// CPU kernel of wsss::dense_crf: mean-field inference of the fully connected CRF with a
// Gaussian (xy) and a bilateral (xy+rgb) kernel and Potts compatibility, exactly as SPEC §6.3.
// Each kernel's lattice is built once per image and reused for every iteration; all K labels go
// through one splat/blur/slice; the symmetric normalisation is a per-point scale of the splat
// and slice weights; one fused pass per iteration slices, normalises and splats the new Q.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <vector>

#include "parallel.h"
#include "permutohedral.h"

namespace wsss {
namespace {

// SPEC §6.3: kernel features, x = column, y = row, colour channels in image order.
void crf_features(const uint8_t* image, int64_t H, int64_t W, float pos_xy_std, float bi_xy_std, float bi_rgb_std,
                  std::vector<float>& gauss, std::vector<float>& bilateral) {
  const int64_t N = H * W;
  gauss.resize(N * 2);
  bilateral.resize(N * 5);
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      const int64_t i = y * W + x;
      gauss[i * 2 + 0] = static_cast<float>(x) / pos_xy_std;
      gauss[i * 2 + 1] = static_cast<float>(y) / pos_xy_std;
      bilateral[i * 5 + 0] = static_cast<float>(x) / bi_xy_std;
      bilateral[i * 5 + 1] = static_cast<float>(y) / bi_xy_std;
      for (int c = 0; c < 3; ++c) bilateral[i * 5 + 2 + c] = static_cast<float>(image[c * N + i]) / bi_rgb_std;
    }
  }
}

using Lattice = PermutohedralLattice<float>;

// eta_i = 1 / sqrt(Phi(1)_i + 1e-20): symmetric normalisation of one kernel.
std::vector<float> symmetric_norm(Lattice& lattice, int64_t N, int threads) {
  const int64_t ld = padded_channels(1);
  std::vector<float> ones(N * ld, 0.0f), response(N * ld), norm(N);
  for (int64_t i = 0; i < N; ++i) ones[i * ld] = 1.0f;
  lattice.filter(ones.data(), response.data(), ld, false);
  parallel_chunks(N, grain_for(16), threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) norm[i] = 1.0f / std::sqrt(response[i * ld] + 1e-20f);
  });
  return norm;
}

// Runs first() and second() concurrently on two threads when allowed (each then runs its loops
// serially). The two kernels' lattices are independent, so this gives one fork/join per step
// instead of one per loop, which matters on a loaded machine.
template <typename F1, typename F2>
void run_pair(int threads, const F1& first, const F2& second) {
  parallel_chunks(2, 1, std::min(threads, 2), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) t == 0 ? first() : second();
  });
}

void dense_crf_image(const uint8_t* image, const float* probs, float* out, int64_t H, int64_t W, int64_t K,
                     int64_t num_iter, float pos_xy_std, float pos_w, float bi_xy_std, float bi_rgb_std, float bi_w,
                     int threads) {
  const int64_t N = H * W;
  const int64_t ld = padded_channels(K);
  std::vector<float> feat_g, feat_b;
  crf_features(image, H, W, pos_xy_std, bi_xy_std, bi_rgb_std, feat_g, feat_b);
  Lattice lat_g, lat_b;
  std::vector<float> eta_g, eta_b;
  run_pair(
      threads,
      [&] {
        lat_g.build(feat_g.data(), N, 2, threads);
        eta_g = symmetric_norm(lat_g, N, threads);
      },
      [&] {
        lat_b.build(feat_b.data(), N, 5, threads);
        eta_b = symmetric_norm(lat_b, N, threads);
      });

  // Pixel-major rows of ld floats, zero in the padding: -unary = log(clip(p, 1e-5, 1)), and Q.
  std::unique_ptr<float[]> neg_unary(new float[N * ld]), q(new float[N * ld]);
  parallel_chunks(N, grain_for(K * 16), threads, [&](int64_t b, int64_t e) {
    crf_log_probs(probs, N, K, neg_unary.get(), ld, b, e);
  });

  // Mean field (SPEC §6.3): Q = softmax(-unary), then num_iter times
  // Q = softmax(-unary + sum_kernels w eta ⊙ Phi(eta ⊙ Q)). Each row pass computes the new Q
  // rows and splats them straight into the next round's lattices; Q itself is only stored by
  // the last pass.
  const bool use_g = pos_w != 0.0f, use_b = bi_w != 0.0f;
  const int parts = std::max(lat_g.splat_parts(ld), lat_b.splat_parts(ld));
  CrfKernel g{lat_g.slice_view(), use_g ? eta_g.data() : nullptr, pos_w, nullptr};
  CrfKernel b{lat_b.slice_view(), use_b ? eta_b.data() : nullptr, bi_w, nullptr};
  g.lattice.values = b.lattice.values = nullptr;  // no messages in the first pass
  for (int64_t it = 0; it <= num_iter; ++it) {
    const bool last = it == num_iter;
    if (!last) {
      lat_g.begin_splat(ld, parts);
      lat_b.begin_splat(ld, parts);
    }
    parallel_chunks(parts, 1, parts, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        CrfKernel gt = g, bt = b;
        if (!last) {
          lat_g.zero_partial(static_cast<int>(t));
          lat_b.zero_partial(static_cast<int>(t));
          gt.splat = lat_g.partial(static_cast<int>(t));
          bt.splat = lat_b.partial(static_cast<int>(t));
        }
        crf_row_pass(neg_unary.get(), ld, K, gt, bt, last ? q.get() : nullptr, N * t / parts, N * (t + 1) / parts);
      }
    });
    if (last) break;
    run_pair(
        threads, [&] { if (use_g) lat_g.finish_splat_blur(false); },
        [&] { if (use_b) lat_b.finish_splat_blur(false); });
    g.lattice = lat_g.slice_view();
    b.lattice = lat_b.slice_view();
  }
  parallel_chunks(N, grain_for(K * 2), threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t k = 0; k < K; ++k) out[k * N + i] = q[i * ld + k];
  });
}

at::Tensor dense_crf_cpu(const at::Tensor& image, const at::Tensor& probs, int64_t num_iter, double pos_xy_std,
                         double pos_w, double bi_xy_std, double bi_rgb_std, double bi_w, int64_t num_threads) {
  TORCH_CHECK(image.dim() == 4 && image.size(1) == 3 && image.scalar_type() == at::kByte,
              "dense_crf: image must be (B,3,H,W) uint8, got ", image.sizes(), " ", image.scalar_type());
  TORCH_CHECK(probs.dim() == 4 && probs.scalar_type() == at::kFloat, "dense_crf: probs must be (B,K,H,W) float32");
  TORCH_CHECK(image.size(0) == probs.size(0) && image.size(2) == probs.size(2) && image.size(3) == probs.size(3),
              "dense_crf: image ", image.sizes(), " and probs ", probs.sizes(), " disagree");
  TORCH_CHECK(image.is_contiguous() && probs.is_contiguous(), "dense_crf: inputs must be contiguous");
  TORCH_CHECK(num_iter >= 0, "dense_crf: num_iter must be >= 0");
  const int64_t B = probs.size(0), K = probs.size(1), H = probs.size(2), W = probs.size(3);
  at::Tensor out = at::empty_like(probs);
  if (B * K * H * W == 0) return out;
  const int threads = resolve_num_threads(num_threads);
  for (int64_t b = 0; b < B; ++b) {
    dense_crf_image(image.data_ptr<uint8_t>() + b * 3 * H * W, probs.data_ptr<float>() + b * K * H * W,
                    out.data_ptr<float>() + b * K * H * W, H, W, K, num_iter, static_cast<float>(pos_xy_std),
                    static_cast<float>(pos_w), static_cast<float>(bi_xy_std), static_cast<float>(bi_rgb_std),
                    static_cast<float>(bi_w), threads);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("dense_crf", &dense_crf_cpu);
}

}  // namespace wsss
