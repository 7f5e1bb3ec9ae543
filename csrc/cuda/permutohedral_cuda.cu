// CUDA kernels of wsss::permutohedral_filter and wsss::dense_crf (SPEC §6.2, §6.3).
//
// Lattice construction on the GPU: every (point, remainder) pair computes its vertex key; the
// keys go into an open-addressing hash table with atomicCAS (the first pair to claim a slot owns
// the vertex); owners are numbered with a prefix sum, and the blur neighbours are looked up in
// the same table. The vertex count is copied to the host once per build, so the vertex buffers
// and the launches over vertices have their real size. A lattice keeps its value buffers across
// filters (the dense CRF's iterations reuse them), and the images of a dense_crf batch run on
// separate streams. Splat uses atomicAdd, so float results can differ in the last bits between
// runs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../cpu/lattice_embed.h"

namespace wsss {
namespace {

constexpr int kThreads = 256;
// Streams a dense_crf batch is spread over.
constexpr int64_t kMaxConcurrentImages = 4;

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

__device__ __forceinline__ uint64_t hash_key(const int32_t* key, int d) {
  uint64_t h = 0x243F6A8885A308D3ull;
  for (int c = 0; c < d; ++c) h = (h ^ static_cast<uint32_t>(key[c])) * 0x100000001B3ull;
  return h ^ (h >> 29);
}

__device__ __forceinline__ bool same_key(const int32_t* a, const int32_t* b, int d) {
  for (int c = 0; c < d; ++c)
    if (a[c] != b[c]) return false;
  return true;
}

// Elevation, simplex and barycentric weights per point; the key of each of its d+1 vertices.
template <typename scalar_t>
__global__ void embed_kernel(const scalar_t* __restrict__ features, int64_t n, int d, scalar_t* __restrict__ weight,
                             int32_t* __restrict__ keys) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int d1 = d + 1;
  scalar_t scale[kMaxFeatureDim];
  for (int j = 0; j < d; ++j)
    scale[j] = sqrt(scalar_t(2) / scalar_t(3)) * scalar_t(d1) / sqrt(scalar_t((j + 1) * (j + 2)));
  int32_t rem0[kMaxFeatureDim + 1], rank[kMaxFeatureDim + 1];
  lattice_embed_point(features + i * d, d, scale, rem0, rank, weight + i * d1);
  for (int k = 0; k <= d; ++k) {
    int32_t* key = keys + (i * d1 + k) * d;
    for (int c = 0; c < d; ++c) key[c] = rem0[c] + (rank[c] <= d - k ? k : k - d1);
  }
}

// Each (point, remainder) entry finds or claims the table slot of its key; owner[e] is the
// entry that claimed it. Table slots hold entry ids, -1 when empty.
__global__ void insert_kernel(const int32_t* __restrict__ keys, int64_t entries, int d, int32_t* table, int64_t mask,
                              int32_t* __restrict__ owner) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= entries) return;
  const int32_t* key = keys + e * d;
  for (uint64_t h = hash_key(key, d) & mask;; h = (h + 1) & mask) {
    int32_t cur = table[h];
    if (cur < 0) {
      cur = atomicCAS(&table[h], -1, static_cast<int32_t>(e));
      if (cur < 0) {
        owner[e] = static_cast<int32_t>(e);
        return;
      }
    }
    // Keys were written by an earlier kernel, so reading another entry's key is safe.
    if (same_key(keys + static_cast<int64_t>(cur) * d, key, d)) {
      owner[e] = cur;
      return;
    }
  }
}

// vertex[e] = dense id of its owner; rep[v] = the owning entry of vertex v.
__global__ void number_kernel(const int32_t* __restrict__ owner, const int32_t* __restrict__ dense, int64_t entries,
                              int32_t* __restrict__ vertex, int32_t* __restrict__ rep) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= entries) return;
  const int32_t o = owner[e];
  vertex[e] = dense[o];
  if (o == e) rep[dense[e]] = static_cast<int32_t>(e);
}

__device__ __forceinline__ int32_t find_vertex(const int32_t* key, const int32_t* keys, int d, const int32_t* table,
                                               int64_t mask, const int32_t* dense) {
  for (uint64_t h = hash_key(key, d) & mask;; h = (h + 1) & mask) {
    const int32_t cur = table[h];
    if (cur < 0) return -1;
    if (same_key(keys + static_cast<int64_t>(cur) * d, key, d)) return dense[cur];
  }
}

// Blur neighbours of vertex v along direction j: key -/+ (1,..,1) -/+ (d+1) e_j; -1 if absent.
__global__ void neighbor_kernel(const int32_t* __restrict__ keys, const int32_t* __restrict__ rep, int64_t m, int d,
                                const int32_t* __restrict__ table, int64_t mask, const int32_t* __restrict__ dense,
                                int32_t* __restrict__ neighbors) {
  const int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (v >= m) return;
  const int32_t* k0 = keys + static_cast<int64_t>(rep[v]) * d;
  int32_t n1[kMaxFeatureDim], n2[kMaxFeatureDim];
  for (int j = 0; j <= d; ++j) {
    for (int c = 0; c < d; ++c) {
      n1[c] = k0[c] - 1;
      n2[c] = k0[c] + 1;
    }
    if (j < d) {
      n1[j] = k0[j] + d;
      n2[j] = k0[j] - d;
    }
    neighbors[(j * m + v) * 2] = find_vertex(n1, keys, d, table, mask, dense);
    neighbors[(j * m + v) * 2 + 1] = find_vertex(n2, keys, d, table, mask, dense);
  }
}

// vals[vertex[e]] += weight[e] * scale[i] * in[i], one thread per (entry, channel).
template <typename scalar_t>
__global__ void splat_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ in_scale,
                             const int32_t* __restrict__ vertex, const scalar_t* __restrict__ weight, int64_t entries,
                             int d1, int64_t C, scalar_t* __restrict__ vals) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= entries * C) return;
  const int64_t e = t / C, c = t % C, i = e / d1;
  const scalar_t w = in_scale ? weight[e] * in_scale[i] : weight[e];
  atomicAdd(&vals[static_cast<int64_t>(vertex[e]) * C + c], w * in[i * C + c]);
}

template <typename scalar_t>
__global__ void blur_kernel(const scalar_t* __restrict__ cur, const int32_t* __restrict__ nb, int64_t m, int64_t C,
                            scalar_t* __restrict__ nxt) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= m * C) return;
  const int64_t v = t / C, c = t % C;
  const int32_t a = nb[2 * v], b = nb[2 * v + 1];
  const scalar_t va = a >= 0 ? cur[a * C + c] : scalar_t(0);
  const scalar_t vb = b >= 0 ? cur[b * C + c] : scalar_t(0);
  nxt[t] = cur[t] + scalar_t(0.5) * (va + vb);
}

// out[i] = alpha * out_scale[i] * sum_k weight[i,k] vals[vertex[i,k]] (+ out if accumulate).
template <typename scalar_t>
__global__ void slice_kernel(const scalar_t* __restrict__ vals, const int32_t* __restrict__ vertex,
                             const scalar_t* __restrict__ weight, int64_t n, int d1, int64_t C, scalar_t alpha,
                             scalar_t* __restrict__ out) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= n * C) return;
  const int64_t i = t / C, c = t % C;
  scalar_t acc = 0;
  for (int k = 0; k < d1; ++k) acc += weight[i * d1 + k] * vals[static_cast<int64_t>(vertex[i * d1 + k]) * C + c];
  out[t] = alpha * acc;
}

template <typename scalar_t>
class CudaLattice {
 public:
  // features: (n, d) contiguous on the current device; runs on the current stream. Copies the
  // vertex count to the host (one synchronisation of that stream).
  void build(const at::Tensor& features) {
    n_ = features.size(0);
    d_ = static_cast<int>(features.size(1));
    TORCH_CHECK(d_ >= 1 && d_ <= kMaxFeatureDim, "permutohedral lattice: feature dim must be in 1..", kMaxFeatureDim);
    const int64_t entries = n_ * (d_ + 1);
    TORCH_CHECK(entries < (int64_t(1) << 30), "permutohedral lattice: too many points (", n_, ")");
    auto stream = c10::cuda::getCurrentCUDAStream();
    const auto iopt = features.options().dtype(at::kInt);
    weight_ = at::empty({entries}, features.options());
    at::Tensor keys = at::empty({entries, d_}, iopt);
    embed_kernel<scalar_t><<<blocks_for(n_), kThreads, 0, stream>>>(features.data_ptr<scalar_t>(), n_, d_,
                                                                     weight_.data_ptr<scalar_t>(),
                                                                     keys.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    int64_t capacity = 1024;
    while (capacity < 2 * entries) capacity <<= 1;
    at::Tensor table = at::full({capacity}, -1, iopt);
    at::Tensor owner = at::empty({entries}, iopt);
    insert_kernel<<<blocks_for(entries), kThreads, 0, stream>>>(keys.data_ptr<int32_t>(), entries, d_,
                                                                 table.data_ptr<int32_t>(), capacity - 1,
                                                                 owner.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor is_owner = owner.eq(at::arange(entries, iopt)).to(at::kInt);
    const at::Tensor dense = at::cumsum(is_owner, 0, at::kInt).sub_(1);
    m_ = static_cast<int64_t>(dense[entries - 1].item<int32_t>()) + 1;
    vertex_ = at::empty({entries}, iopt);
    at::Tensor rep = at::empty({m_}, iopt);
    number_kernel<<<blocks_for(entries), kThreads, 0, stream>>>(owner.data_ptr<int32_t>(), dense.data_ptr<int32_t>(),
                                                                 entries, vertex_.data_ptr<int32_t>(),
                                                                 rep.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    neighbors_ = at::empty({d_ + 1, m_, 2}, iopt);
    neighbor_kernel<<<blocks_for(m_), kThreads, 0, stream>>>(
        keys.data_ptr<int32_t>(), rep.data_ptr<int32_t>(), m_, d_, table.data_ptr<int32_t>(), capacity - 1,
        dense.data_ptr<int32_t>(), neighbors_.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // out (n, C) = lattice filter of in_scale ⊙ in (n, C); transpose: blur directions reversed.
  void filter(const at::Tensor& in, at::Tensor& out, bool transpose, const scalar_t* in_scale = nullptr) {
    const int64_t C = in.size(1);
    auto stream = c10::cuda::getCurrentCUDAStream();
    reserve(C, in.options());
    at::Tensor cur = cur_, nxt = nxt_;
    cur.zero_();
    splat_kernel<scalar_t><<<blocks_for(n_ * (d_ + 1) * C), kThreads, 0, stream>>>(
        in.data_ptr<scalar_t>(), in_scale, vertex_.data_ptr<int32_t>(), weight_.data_ptr<scalar_t>(),
        n_ * (d_ + 1), d_ + 1, C, cur.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int step = 0; step <= d_; ++step) {
      const int j = transpose ? d_ - step : step;
      blur_kernel<scalar_t><<<blocks_for(m_ * C), kThreads, 0, stream>>>(
          cur.data_ptr<scalar_t>(), neighbors_.data_ptr<int32_t>() + static_cast<int64_t>(j) * m_ * 2, m_, C,
          nxt.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(cur, nxt);
    }
    const scalar_t alpha = scalar_t(1) / (scalar_t(1) + std::pow(scalar_t(2), scalar_t(-d_)));
    slice_kernel<scalar_t><<<blocks_for(n_ * C), kThreads, 0, stream>>>(
        cur.data_ptr<scalar_t>(), vertex_.data_ptr<int32_t>(), weight_.data_ptr<scalar_t>(), n_, d_ + 1, C, alpha,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  // Vertex value buffers (m, C), allocated once and reused by every filter with C channels.
  void reserve(int64_t C, const at::TensorOptions& options) {
    if (cur_.defined() && cur_.size(0) == m_ && cur_.size(1) == C) return;
    cur_ = at::empty({m_, C}, options);
    nxt_ = at::empty({m_, C}, options);
  }

  int64_t n_ = 0, m_ = 0;
  int d_ = 0;
  at::Tensor weight_, vertex_, neighbors_;
  at::Tensor cur_, nxt_;
};

at::Tensor permutohedral_filter_cuda(const at::Tensor& features, const at::Tensor& values, bool transpose) {
  TORCH_CHECK(features.dim() == 3 && values.dim() == 3, "permutohedral_filter: features (B,N,d) and values (B,N,C) expected");
  TORCH_CHECK(features.size(0) == values.size(0) && features.size(1) == values.size(1),
              "permutohedral_filter: features and values disagree on (B,N)");
  TORCH_CHECK(features.scalar_type() == values.scalar_type(), "permutohedral_filter: features and values dtypes differ");
  TORCH_CHECK(features.is_contiguous() && values.is_contiguous(), "permutohedral_filter: inputs must be contiguous");
  TORCH_CHECK(features.device() == values.device(), "permutohedral_filter: inputs on different devices");
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty_like(values);
  if (values.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "permutohedral_filter_cuda", [&] {
    CudaLattice<scalar_t> lattice;
    for (int64_t b = 0; b < values.size(0); ++b) {
      lattice.build(features[b]);
      at::Tensor out_b = out[b];
      lattice.filter(values[b], out_b, transpose);
    }
  });
  return out;
}

// Makes each of `waiters` wait (on the device) for the work queued so far on `stream`.
void wait_for(const c10::cuda::CUDAStream& stream, const std::vector<c10::cuda::CUDAStream>& waiters) {
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, stream.stream()));
  for (const auto& waiter : waiters) C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));  // released once the waits are done
}

// SPEC §6.3 on one image: image (3,H,W) uint8, probs (K,H,W) float32 -> Q (K,H,W).
at::Tensor dense_crf_cuda_image(const at::Tensor& image, const at::Tensor& probs, int64_t num_iter, double pos_xy_std,
                                double pos_w, double bi_xy_std, double bi_rgb_std, double bi_w) {
  const int64_t K = probs.size(0), H = probs.size(1), W = probs.size(2), N = H * W;
  const auto fopt = probs.options();
  const at::Tensor ys = at::arange(H, fopt).view({H, 1}).expand({H, W}).reshape({N});
  const at::Tensor xs = at::arange(W, fopt).view({1, W}).expand({H, W}).reshape({N});
  const at::Tensor rgb = image.reshape({3, N}).t().to(at::kFloat);
  const at::Tensor feat_g = at::stack({xs.div(pos_xy_std), ys.div(pos_xy_std)}, 1).contiguous();
  const at::Tensor feat_b =
      at::cat({at::stack({xs.div(bi_xy_std), ys.div(bi_xy_std)}, 1), rgb.div(bi_rgb_std)}, 1).contiguous();
  CudaLattice<float> lat_g, lat_b;
  lat_g.build(feat_g);
  lat_b.build(feat_b);
  const at::Tensor ones = at::ones({N, 1}, fopt);
  at::Tensor norm_g = at::empty({N, 1}, fopt), norm_b = at::empty({N, 1}, fopt);
  lat_g.filter(ones, norm_g, false);
  lat_b.filter(ones, norm_b, false);
  const at::Tensor eta_g = norm_g.add_(1e-20).rsqrt_(), eta_b = norm_b.add_(1e-20).rsqrt_();
  const at::Tensor neg_unary = probs.reshape({K, N}).t().clamp(1e-5, 1.0).log().contiguous();
  // Every buffer of the mean-field loop is allocated once here.
  at::Tensor q = at::softmax(neg_unary, 1);
  at::Tensor logits = at::empty_like(neg_unary), scaled = at::empty_like(neg_unary), msg = at::empty_like(neg_unary);
  for (int64_t it = 0; it < num_iter; ++it) {
    logits.copy_(neg_unary);
    if (pos_w != 0.0) {
      at::mul_out(scaled, q, eta_g);
      lat_g.filter(scaled, msg, false);
      logits.addcmul_(msg, eta_g, pos_w);
    }
    if (bi_w != 0.0) {
      at::mul_out(scaled, q, eta_b);
      lat_b.filter(scaled, msg, false);
      logits.addcmul_(msg, eta_b, bi_w);
    }
    at::softmax_out(q, logits, 1);
  }
  return q.t().reshape({K, H, W});
}

at::Tensor dense_crf_cuda(const at::Tensor& image, const at::Tensor& probs, int64_t num_iter, double pos_xy_std,
                          double pos_w, double bi_xy_std, double bi_rgb_std, double bi_w, int64_t num_threads) {
  TORCH_CHECK(image.dim() == 4 && image.size(1) == 3 && image.scalar_type() == at::kByte,
              "dense_crf: image must be (B,3,H,W) uint8");
  TORCH_CHECK(probs.dim() == 4 && probs.scalar_type() == at::kFloat, "dense_crf: probs must be (B,K,H,W) float32");
  TORCH_CHECK(image.size(0) == probs.size(0) && image.size(2) == probs.size(2) && image.size(3) == probs.size(3),
              "dense_crf: image and probs disagree");
  TORCH_CHECK(image.device() == probs.device(), "dense_crf: inputs on different devices");
  TORCH_CHECK(num_iter >= 0, "dense_crf: num_iter must be >= 0");
  const c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor out = at::empty_like(probs);
  if (probs.numel() == 0) return out;
  // The images of a batch run concurrently, each on a stream of the pool. Every side stream
  // first waits for the work queued so far on the caller's stream (which produced the inputs),
  // and the caller's stream waits for all of them at the end; the memory of each image's
  // temporaries belongs to its stream.
  const int64_t B = probs.size(0);
  const c10::cuda::CUDAStream main = c10::cuda::getCurrentCUDAStream();
  std::vector<c10::cuda::CUDAStream> streams;
  for (int64_t s = 0; s < std::min<int64_t>(B, kMaxConcurrentImages) && B > 1; ++s)
    streams.push_back(c10::cuda::getStreamFromPool(false, probs.device().index()));
  if (!streams.empty()) wait_for(main, streams);
  for (int64_t b = 0; b < B; ++b) {
    const c10::cuda::CUDAStream stream = streams.empty() ? main : streams[b % streams.size()];
    const c10::cuda::CUDAStreamGuard stream_guard(stream);
    out[b].copy_(dense_crf_cuda_image(image[b], probs[b], num_iter, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w));
  }
  for (const auto& stream : streams) wait_for(stream, {main});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wsss, CUDA, m) {
  m.impl("permutohedral_filter", &permutohedral_filter_cuda);
  m.impl("dense_crf", &dense_crf_cuda);
}

}  // namespace wsss
