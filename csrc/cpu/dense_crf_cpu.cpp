// CPU kernel of wsss::dense_crf: mean-field inference of the fully connected CRF with a
// Gaussian (xy) and a bilateral (xy+rgb) kernel and Potts compatibility, exactly as SPEC §6.3.
//
// Each kernel's lattice is built once per image and reused for every iteration; all K labels go
// through one splat/blur/slice; the symmetric normalisation eta is folded into the splat weights
// once, and into the slice as a per-point scale. One iteration is a row pass over the pixels
// (slice both messages, softmax) and, per kernel, a splat of the new Q and the blur passes.
// How a kernel is splatted depends on its lattice's size: one that fits in the caches (few
// vertices: smooth kernels, e.g. sxy 3 / srgb 13) is splatted from the row pass into one buffer
// per thread; a large one (about a vertex per pixel at the official sxy 1 and srgb 3) by a
// gather over the stored Q, which needs no per-thread copies of the lattice. The whole call is
// one OpenMP region whose loops are shared dynamically among the threads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "lattice_buffer.h"
#include "parallel.h"
#include "permutohedral.h"

namespace wsss {
namespace {

using Lattice = PermutohedralLattice<float>;

// Buffers of one image, reused across the images of a batch.
struct CrfWorkspace {
  Buffer<float> feat_g, feat_b;  // N x 2, N x 5 features (SPEC §6.3)
  Buffer<float> norm;            // N: the filter response to the constant 1
  Buffer<float> eta_g, eta_b;    // N: symmetric normalisation per kernel
  Buffer<float> neg_unary, q;    // N x ld: log(clip(p)) and the current Q
  Lattice lat_g, lat_b;
};

// SPEC §6.3: kernel features of image rows [y0, y1), x = column, y = row, colour channels in
// image order.
void crf_features(const uint8_t* image, int64_t H, int64_t W, float pos_xy_std, float bi_xy_std, float bi_rgb_std,
                  float* gauss, float* bilateral, int64_t y0, int64_t y1) {
  const int64_t N = H * W;
  for (int64_t y = y0; y < y1; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const int64_t i = y * W + x;
      gauss[i * 2 + 0] = static_cast<float>(x) / pos_xy_std;
      gauss[i * 2 + 1] = static_cast<float>(y) / pos_xy_std;
      bilateral[i * 5 + 0] = static_cast<float>(x) / bi_xy_std;
      bilateral[i * 5 + 1] = static_cast<float>(y) / bi_xy_std;
      for (int c = 0; c < 3; ++c) bilateral[i * 5 + 2 + c] = static_cast<float>(image[c * N + i]) / bi_rgb_std;
    }
}

// Team call: build the lattice of one kernel and fold eta = 1 / sqrt(Phi(1) + 1e-20) into its
// splat weights.
void prepare_kernel(Lattice& lattice, const float* features, int d, int64_t N, CrfWorkspace& ws, float* eta) {
  lattice.build(features, N, d);
  lattice.filter_ones(ws.norm.data());
  team_for(N, 4 * kRowsPerChunk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) eta[i] = 1.0f / std::sqrt(ws.norm[i] + 1e-20f);
  });
  lattice.scale_splat(eta);
}

// How the two kernels' messages are computed in one dense_crf call (team-wide constants).
struct MessagePlan {
  bool use[2];      // Gaussian, bilateral: weight != 0
  bool scatter[2];  // splatted from the row pass (lattice fits in the caches)
  bool small;       // every used kernel is scattered: each is summed and blurred by one thread
  int parts;        // scatter parts (one per thread)
};

// Team call: one mean-field row pass (SPEC §6.3): q = softmax(-unary + messages); splats q into
// the scatter buffers of the kernels in plan.scatter when `splat` is set. q_out may be null.
void row_pass(CrfWorkspace& ws, const MessagePlan& plan, const CrfKernel& g, const CrfKernel& b, int64_t N,
              int64_t K, int64_t ld, bool splat, float* q_out) {
  if (splat && (plan.scatter[0] || plan.scatter[1])) {
    team_for(plan.parts, 1, [&](int64_t t0, int64_t t1) {
      for (int t = static_cast<int>(t0); t < t1; ++t) {
        CrfKernel gt = g, bt = b;
        if (plan.scatter[0]) {
          ws.lat_g.zero_partial(t);
          gt.scatter = ws.lat_g.partial(t);
        }
        if (plan.scatter[1]) {
          ws.lat_b.zero_partial(t);
          bt.scatter = ws.lat_b.partial(t);
        }
        const Lattice& lat = plan.scatter[0] ? ws.lat_g : ws.lat_b;
        crf_row_pass(ws.neg_unary.data(), ld, K, gt, bt, q_out, lat.part_begin(t), lat.part_begin(t + 1));
      }
    });
  } else {
    team_for(N, kRowsPerChunk, [&](int64_t i0, int64_t i1) {
      crf_row_pass(ws.neg_unary.data(), ld, K, g, b, q_out, i0, i1);
    });
  }
}

// Team call: the splat of the current Q (from the scatter buffers or by a gather over q) and the
// blur of each used kernel.
void splat_and_blur(CrfWorkspace& ws, const MessagePlan& plan, const float* q, int64_t ld) {
  Lattice* lattices[2] = {&ws.lat_g, &ws.lat_b};
  if (plan.small) {  // two barriers in all, instead of one per blur pass
    team_for(2, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        if (!plan.use[k]) continue;
        lattices[k]->finish_scatter(false);
        lattices[k]->blur(false, false);
      }
    });
    return;
  }
  for (int k = 0; k < 2; ++k) {
    if (!plan.use[k]) continue;
    if (plan.scatter[k])
      lattices[k]->finish_scatter();
    else
      lattices[k]->splat(q, ld);
    lattices[k]->blur(false);
  }
}

void dense_crf_image(const uint8_t* image, const float* probs, float* out, int64_t H, int64_t W, int64_t K,
                     int64_t num_iter, float pos_xy_std, float pos_w, float bi_xy_std, float bi_rgb_std, float bi_w,
                     int threads, CrfWorkspace& ws) {
  const int64_t N = H * W;
  const int64_t ld = padded_channels(K);
  const bool use_g = pos_w != 0.0f, use_b = bi_w != 0.0f;
  ws.feat_g.resize(N * 2);
  ws.feat_b.resize(N * 5);
  ws.norm.resize(N);
  ws.eta_g.resize(N);
  ws.eta_b.resize(N);
  ws.neg_unary.resize(N * ld);
  ws.q.resize(N * ld);
  float* q = ws.q.data();
  team_region(threads, [&] {
    team_for(H, std::max<int64_t>(1, kRowsPerChunk / W), [&](int64_t y0, int64_t y1) {
      crf_features(image, H, W, pos_xy_std, bi_xy_std, bi_rgb_std, ws.feat_g.data(), ws.feat_b.data(), y0, y1);
      crf_log_probs(probs, N, K, ws.neg_unary.data(), ld, y0 * W, y1 * W);
    });
    if (use_g) prepare_kernel(ws.lat_g, ws.feat_g.data(), 2, N, ws, ws.eta_g.data());
    if (use_b) prepare_kernel(ws.lat_b, ws.feat_b.data(), 5, N, ws, ws.eta_b.data());

    MessagePlan plan;
    plan.parts = team_size();
    plan.use[0] = use_g;
    plan.use[1] = use_b;
    plan.scatter[0] = use_g && ws.lat_g.prefer_scatter(ld, plan.parts);
    plan.scatter[1] = use_b && ws.lat_b.prefer_scatter(ld, plan.parts);
    plan.small = (plan.scatter[0] || !use_g) && (plan.scatter[1] || !use_b);
    if (plan.scatter[0]) ws.lat_g.begin_scatter(ld, plan.parts);
    if (plan.scatter[1]) ws.lat_b.begin_scatter(ld, plan.parts);
    const bool gather = (use_g && !plan.scatter[0]) || (use_b && !plan.scatter[1]);

    // Mean field (SPEC §6.3): Q = softmax(-unary), then num_iter times
    // Q = softmax(-unary + sum_kernels w eta ⊙ Phi(eta ⊙ Q)).
    CrfKernel g{use_g ? ws.lat_g.slice_view() : detail::SliceView<float>{}, use_g ? ws.eta_g.data() : nullptr, pos_w,
                nullptr, use_g && ws.lat_g.values_exceed_caches(ld)};
    CrfKernel b{use_b ? ws.lat_b.slice_view() : detail::SliceView<float>{}, use_b ? ws.eta_b.data() : nullptr, bi_w,
                nullptr, use_b && ws.lat_b.values_exceed_caches(ld)};
    g.lattice.values = b.lattice.values = nullptr;  // no messages before the first iteration
    for (int64_t it = 0; it < num_iter; ++it) {
      row_pass(ws, plan, g, b, N, K, ld, true, gather ? q : nullptr);  // Q itself only for a gather
      splat_and_blur(ws, plan, q, ld);
      if (use_g) g.lattice = ws.lat_g.slice_view();
      if (use_b) b.lattice = ws.lat_b.slice_view();
    }
    row_pass(ws, plan, g, b, N, K, ld, false, q);
    team_for(N, 4 * kRowsPerChunk, [&](int64_t i0, int64_t i1) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = i0; i < i1; ++i) out[k * N + i] = q[i * ld + k];
    });
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
  TORCH_CHECK(H * W <= kMaxLatticePoints, "dense_crf: image too large (", H, "x", W, "); at most ",
              kMaxLatticePoints, " pixels");
  at::Tensor out = at::empty_like(probs);
  if (B * K * H * W == 0) return out;
  const int threads = resolve_num_threads(num_threads);
  CrfWorkspace ws;
  for (int64_t b = 0; b < B; ++b) {
    dense_crf_image(image.data_ptr<uint8_t>() + b * 3 * H * W, probs.data_ptr<float>() + b * K * H * W,
                    out.data_ptr<float>() + b * K * H * W, H, W, K, num_iter, static_cast<float>(pos_xy_std),
                    static_cast<float>(pos_w), static_cast<float>(bi_xy_std), static_cast<float>(bi_rgb_std),
                    static_cast<float>(bi_w), threads, ws);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss, CPU, m) {
  m.impl("dense_crf", &dense_crf_cpu);
}

}  // namespace wsss
