// CUDA kernels of the HAMUR adapter cell and DomainNorm (declarations and conventions: adapter_kernels.h).
//
// Row kernels run one thread block per row: the row's I_b (k*k contiguous values) is read from global
// memory once, with coalesced loads, into shared memory, and serves both rank-k products (forward) or
// both gradient terms and the one write of grad_rep (backward). Each phase of the right-to-left chain
// x.U -> .I -> .V -> sigmoid -> .U' -> .I -> .V' spreads over the whole block: vector-matrix phases give
// consecutive threads consecutive columns (coalesced) and split long sums among several threads per
// output; matrix-vector phases (backward) give each row to a warp and reduce with shuffles. Column
// kernels (statistics, DomainNorm gradients) give a block 32 columns and 8 row lanes and reduce in double,
// in two passes over o (no E[o^2] - E[o]^2). Nothing uses atomics, so results are deterministic.
#include <cuda_runtime.h>

#include "adapter_kernels.h"

namespace hamur_fast {
namespace cuda {
namespace {

constexpr int kRowThreads = 128;
constexpr int kColumnTile = 32;
constexpr int kRowLanes = 8;

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float rsqrt_of(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_of(double v) { return rsqrt(v); }

// Row b's statistics group: its domain (paper) or 0 (released); -1 for an id outside [0, groups), which the
// Python-side check misses when value checks are off or under torch.compile. Such a row indexes no table,
// joins no statistic, and gets NaN outputs (y, grad_x, grad_rep) and zero internal gradients.
__device__ __forceinline__ int64_t group_of(const int64_t* domain, bool per_domain, int64_t groups, int64_t b) {
  if (!per_domain) return 0;
  const int64_t d = domain[b];
  return d >= 0 && d < groups ? d : -1;
}

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return static_cast<T>(__longlong_as_double(0x7ff8000000000000ll));
}

// out[j] = sum_i v[i] * M[i * n + j] for j < n (M row-major m x n). Consecutive threads take consecutive
// columns (coalesced reads of M). When the block has at least twice as many threads as outputs, each
// output's sum over i is split among blockDim / n threads, so a 128-long sum into 35 outputs keeps 105
// threads busy instead of 35; the partial sums meet in `scratch` (blockDim values). Every thread of the
// block must call it (it synchronises).
template <typename T>
__device__ __forceinline__ void block_vec_mat(T* out, const T* v, const T* M, int64_t m, int64_t n, T* scratch) {
  const int64_t parts = n > 0 ? blockDim.x / n : 1;
  if (parts < 2) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      T acc = 0;
#pragma unroll 8
      for (int64_t i = 0; i < m; ++i) acc += v[i] * M[i * n + j];
      out[j] = acc;
    }
    return;
  }
  const int64_t j = threadIdx.x % n, part = threadIdx.x / n;
  T acc = 0;
  if (part < parts) {
#pragma unroll 8
    for (int64_t i = part; i < m; i += parts) acc += v[i] * M[i * n + j];
  }
  scratch[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x < n) {
    T sum = 0;
    for (int64_t q = 0; q < parts; ++q) sum += scratch[q * n + threadIdx.x];
    out[threadIdx.x] = sum;
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// out[i] = sum_j M[i * n + j] * v[j] for i < m: one warp per row of M, its lanes along the row (coalesced),
// then a warp shuffle reduction. Every thread of the block must call it (whole warps stay converged).
template <typename T>
__device__ __forceinline__ void block_mat_vec(T* out, const T* M, const T* v, int64_t m, int64_t n) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x / 32;
  for (int64_t i = threadIdx.x / 32; i < m; i += warps) {
    T acc = 0;
    for (int64_t j = lane; j < n; j += 32) acc += M[i * n + j] * v[j];
    acc = warp_sum(acc);
    if (lane == 0) out[i] = acc;
  }
}

template <typename T>
__device__ __forceinline__ void block_load(T* dst, const T* src, int64_t n) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dst[j] = src[j];
}

// The forward chain for row blockIdx.x up to o. kInfer: write y = x + o * scale + shift with the folded
// running statistics; else write hidden and o.
template <typename T, bool kInfer>
__global__ void __launch_bounds__(kRowThreads) project_rows_kernel(
    CellDims dims, CellFactors<T> f, const T* __restrict__ x, const T* __restrict__ rep,
    const int64_t* __restrict__ domain, T* __restrict__ hidden, T* __restrict__ o, const T* __restrict__ norm_weight,
    const T* __restrict__ norm_bias, const T* __restrict__ running_mean, const T* __restrict__ running_var, T eps,
    T* __restrict__ y) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];  // aligned for double
  T* shared = reinterpret_cast<T*>(shared_bytes);
  const int64_t h = dims.width, k = dims.rank, s = dims.bottleneck;
  const int64_t b = blockIdx.x;
  const int64_t d = group_of(domain, dims.per_domain, dims.groups, b);
  if (d < 0) {  // the whole block takes this branch: no barrier is split
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      if constexpr (kInfer) {
        y[b * h + j] = quiet_nan<T>();
      } else {
        o[b * h + j] = T(0);
      }
    }
    if constexpr (!kInfer) {
      for (int64_t j = threadIdx.x; j < 4 * k + s; j += blockDim.x) hidden[b * (4 * k + s) + j] = T(0);
    }
    return;
  }
  T* x_s = shared;     // h
  T* rep_s = x_s + h;  // k * k
  T* u = rep_s + k * k;
  T* p = u + k;
  T* q = p + k;
  T* r = q + k;
  T* a = r + k;          // s
  T* scratch = a + s;    // blockDim partial sums
  block_load(x_s, x + b * h, h);
  block_load(rep_s, rep + b * k * k, k * k);
  __syncthreads();
  block_vec_mat(u, x_s, f.down_left + d * h * k, h, k, scratch);
  __syncthreads();
  block_vec_mat(p, u, rep_s, k, k, scratch);
  __syncthreads();
  block_vec_mat(a, p, f.down_right + d * k * s, k, s, scratch);
  __syncthreads();
  const T* down_bias = f.down_bias + d * s;
  for (int64_t j = threadIdx.x; j < s; j += blockDim.x) a[j] = T(1) / (T(1) + exp_of(-(a[j] + down_bias[j])));
  __syncthreads();
  block_vec_mat(q, a, f.up_left + d * s * k, s, k, scratch);
  __syncthreads();
  block_vec_mat(r, q, rep_s, k, k, scratch);
  __syncthreads();
  const T* up_right = f.up_right + d * k * h;
  const T* up_bias = f.up_bias + d * h;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    T acc = up_bias[j];
#pragma unroll 8
    for (int64_t i = 0; i < k; ++i) acc += r[i] * up_right[i * h + j];
    if constexpr (kInfer) {
      const int64_t c = d * h + j;
      const T scale = norm_weight[c] * rsqrt_of(running_var[c] + eps);
      y[b * h + j] = x_s[j] + (acc - running_mean[c]) * scale + norm_bias[c];
    } else {
      o[b * h + j] = acc;
    }
  }
  if constexpr (!kInfer) {
    const int64_t stride = 4 * k + s;
    for (int64_t j = threadIdx.x; j < stride; j += blockDim.x) hidden[b * stride + j] = u[j];  // u..a contiguous
  }
}

// Reduce part[kRowLanes][kColumnTile] over the row lanes into part[0][tx].
__device__ __forceinline__ void reduce_lanes(double (*part)[kColumnTile + 1]) {
  __syncthreads();
  if (threadIdx.y == 0) {
    double total = part[0][threadIdx.x];
    for (int t = 1; t < kRowLanes; ++t) total += part[t][threadIdx.x];
    part[0][threadIdx.x] = total;
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kColumnTile * kRowLanes) column_stats_kernel(
    const T* __restrict__ o, const int64_t* __restrict__ domain, bool per_domain, int64_t batch, int64_t width,
    int64_t groups, double eps, T* __restrict__ mean, T* __restrict__ var, T* __restrict__ rstd,
    T* __restrict__ count) {
  __shared__ double part[kRowLanes][kColumnTile + 1];
  __shared__ double rows_part[kRowLanes][kColumnTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  const bool active = col < width;
  for (int64_t g = 0; g < groups; ++g) {
    double sum = 0, rows = 0;
    for (int64_t b = threadIdx.y; b < batch; b += kRowLanes) {
      if (group_of(domain, per_domain, groups, b) != g) continue;
      rows += 1;
      if (active) sum += static_cast<double>(o[b * width + col]);
    }
    part[threadIdx.y][threadIdx.x] = sum;
    rows_part[threadIdx.y][threadIdx.x] = rows;
    reduce_lanes(part);
    reduce_lanes(rows_part);
    const double n = rows_part[0][threadIdx.x];
    const double group_mean = n > 0 ? part[0][threadIdx.x] / n : 0.0;
    __syncthreads();  // everyone has read the totals before part is reused
    double squares = 0;
    if (active) {
      for (int64_t b = threadIdx.y; b < batch; b += kRowLanes) {
        if (group_of(domain, per_domain, groups, b) != g) continue;
        const double centred = static_cast<double>(o[b * width + col]) - group_mean;
        squares += centred * centred;
      }
    }
    part[threadIdx.y][threadIdx.x] = squares;
    reduce_lanes(part);
    if (threadIdx.y == 0 && active) {
      // Paper mode normalises with the biased variance, released mode with the unbiased one (torch.var).
      const double denominator = per_domain ? (n > 1 ? n : 1.0) : (n > 2 ? n - 1 : 1.0);
      const double v = part[0][threadIdx.x] / denominator;
      mean[g * width + col] = static_cast<T>(group_mean);
      var[g * width + col] = static_cast<T>(v);
      rstd[g * width + col] = static_cast<T>(1.0 / sqrt(v + eps));
      if (col == 0) count[g] = static_cast<T>(n);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void normalise_kernel(const T* __restrict__ o, const T* __restrict__ residual,
                                 const int64_t* __restrict__ domain, bool per_domain, int64_t groups,
                                 int64_t batch, int64_t width,
                                 const T* __restrict__ weight, const T* __restrict__ bias, const T* __restrict__ mean,
                                 const T* __restrict__ rstd, T* __restrict__ out) {
  const int64_t total = batch * width;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / width, j = e - b * width;
    const int64_t g = group_of(domain, per_domain, groups, b);
    if (g < 0) {
      out[e] = quiet_nan<T>();
      continue;
    }
    const int64_t c = g * width + j;
    const T base = residual != nullptr ? residual[e] : T(0);
    out[e] = base + (o[e] - mean[c]) * weight[c] * rstd[c] + bias[c];
  }
}

template <typename T>
__global__ void __launch_bounds__(kColumnTile * kRowLanes) norm_grad_kernel(
    const T* __restrict__ grad_y, const T* __restrict__ o, const int64_t* __restrict__ domain, bool per_domain,
    bool batch_stats, int64_t batch, int64_t width, int64_t groups, const T* __restrict__ mean,
    const T* __restrict__ rstd, const T* __restrict__ count, T* __restrict__ grad_weight, T* __restrict__ grad_bias,
    T* __restrict__ mean_gy, T* __restrict__ xhat_coef) {
  __shared__ double part_gy[kRowLanes][kColumnTile + 1];
  __shared__ double part_gy_xhat[kRowLanes][kColumnTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  const bool active = col < width;
  for (int64_t g = 0; g < groups; ++g) {
    double sum_gy = 0, sum_gy_xhat = 0;
    if (active) {
      const double m = mean[g * width + col], rs = rstd[g * width + col];
      for (int64_t b = threadIdx.y; b < batch; b += kRowLanes) {
        if (group_of(domain, per_domain, groups, b) != g) continue;
        const double gy = grad_y[b * width + col];
        sum_gy += gy;
        sum_gy_xhat += gy * ((static_cast<double>(o[b * width + col]) - m) * rs);
      }
    }
    part_gy[threadIdx.y][threadIdx.x] = sum_gy;
    part_gy_xhat[threadIdx.y][threadIdx.x] = sum_gy_xhat;
    reduce_lanes(part_gy);
    reduce_lanes(part_gy_xhat);
    if (threadIdx.y == 0 && active) {
      const int64_t c = g * width + col;
      const double n = count[g];
      const double var_denominator = per_domain ? (n > 1 ? n : 1.0) : (n > 2 ? n - 1 : 1.0);
      grad_bias[c] = static_cast<T>(part_gy[0][threadIdx.x]);
      grad_weight[c] = static_cast<T>(part_gy_xhat[0][threadIdx.x]);
      mean_gy[c] = static_cast<T>(batch_stats && n > 0 ? part_gy[0][threadIdx.x] / n : 0.0);
      xhat_coef[c] = static_cast<T>(batch_stats && n > 0 ? part_gy_xhat[0][threadIdx.x] / var_denominator : 0.0);
    }
    __syncthreads();
  }
}

// grad_o of DomainNorm for one element; the centring happens before the gain weight * rstd (up to
// 1/sqrt(eps)) multiplies in, so a one-row group gets exactly 0.
template <typename T>
__device__ __forceinline__ T grad_o_element(T gy, T o, int64_t c, const T* weight, const T* mean, const T* rstd,
                                            const T* mean_gy, const T* xhat_coef) {
  const T xhat = (o - mean[c]) * rstd[c];
  return weight[c] * rstd[c] * (gy - mean_gy[c] - xhat * xhat_coef[c]);
}

template <typename T>
__global__ void grad_o_kernel(const T* __restrict__ grad_y, const T* __restrict__ o, const int64_t* __restrict__ domain,
                              bool per_domain, int64_t groups, int64_t batch, int64_t width,
                              const T* __restrict__ weight,
                              const T* __restrict__ mean, const T* __restrict__ rstd, const T* __restrict__ mean_gy,
                              const T* __restrict__ xhat_coef, T* __restrict__ grad_o) {
  const int64_t total = batch * width;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / width, j = e - b * width;
    const int64_t g = group_of(domain, per_domain, groups, b);
    grad_o[e] = g < 0 ? quiet_nan<T>()
                      : grad_o_element(grad_y[e], o[e], g * width + j, weight, mean, rstd, mean_gy, xhat_coef);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) backward_rows_kernel(
    CellDims dims, CellFactors<T> f, const T* __restrict__ norm_weight, const T* __restrict__ x,
    const T* __restrict__ rep, const int64_t* __restrict__ domain, const T* __restrict__ grad_y,
    const T* __restrict__ o, const T* __restrict__ hidden, const T* __restrict__ mean, const T* __restrict__ rstd,
    const T* __restrict__ mean_gy, const T* __restrict__ xhat_coef, T* __restrict__ grad_o,
    T* __restrict__ grad_core, T* __restrict__ grad_rep, T* __restrict__ grad_x) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];  // aligned for double
  T* shared = reinterpret_cast<T*>(shared_bytes);
  const int64_t h = dims.width, k = dims.rank, s = dims.bottleneck;
  const int64_t b = blockIdx.x;
  const int64_t d = group_of(domain, dims.per_domain, dims.groups, b);
  if (d < 0) {  // NaN where the row's gradient is handed back, zeros where the factor gradients sum rows
    for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
      grad_o[b * h + j] = T(0);
      grad_x[b * h + j] = quiet_nan<T>();
    }
    for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) grad_rep[b * k * k + e] = quiet_nan<T>();
    for (int64_t j = threadIdx.x; j < 2 * k + s; j += blockDim.x) grad_core[b * (2 * k + s) + j] = T(0);
    return;
  }
  T* go = shared;          // h
  T* rep_s = go + h;       // k * k
  T* row = rep_s + k * k;  // u, p, q, r (k each), a (s): this row's hidden
  T* grad_r = row + 4 * k + s;
  T* grad_q = grad_r + k;  // grad_q, grad_z, grad_u contiguous like grad_core's row
  T* grad_z = grad_q + k;
  T* grad_u = grad_z + s;
  T* grad_p = grad_u + k;
  const T* u = row;
  const T* q = row + 2 * k;
  const T* a = row + 4 * k;
  const int64_t stride = 4 * k + s;
  for (int64_t j = threadIdx.x; j < h; j += blockDim.x) {
    const T g = grad_o_element(grad_y[b * h + j], o[b * h + j], d * h + j, norm_weight, mean, rstd, mean_gy,
                               xhat_coef);
    go[j] = g;
    grad_o[b * h + j] = g;
  }
  block_load(rep_s, rep + b * k * k, k * k);
  block_load(row, hidden + b * stride, stride);
  __syncthreads();
  block_mat_vec(grad_r, f.up_right + d * k * h, go, k, h);  // o = r.V' + b'
  __syncthreads();
  block_mat_vec(grad_q, rep_s, grad_r, k, k);  // r = q.I
  __syncthreads();
  block_mat_vec(grad_z, f.up_left + d * s * k, grad_q, s, k);  // q = a.U', a = sigmoid(z)
  __syncthreads();
  for (int64_t j = threadIdx.x; j < s; j += blockDim.x) grad_z[j] *= a[j] * (T(1) - a[j]);
  __syncthreads();
  block_mat_vec(grad_p, f.down_right + d * k * s, grad_z, k, s);  // z = p.V + b
  __syncthreads();
  block_mat_vec(grad_u, rep_s, grad_p, k, k);  // p = u.I
  __syncthreads();
  for (int64_t e = threadIdx.x; e < k * k; e += blockDim.x) {
    const int64_t i = e / k, j = e - i * k;
    grad_rep[b * k * k + e] = u[i] * grad_p[j] + q[i] * grad_r[j];
  }
  block_mat_vec(go, f.down_left + d * h * k, grad_u, h, k);  // u = x.U (go is free again: reuse it)
  __syncthreads();
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) grad_x[b * h + i] = grad_y[b * h + i] + go[i];
  for (int64_t j = threadIdx.x; j < 2 * k + s; j += blockDim.x) grad_core[b * (2 * k + s) + j] = grad_q[j];
}

int64_t elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535;
}

// Dynamic shared memory beyond the default 48 KiB needs an explicit opt-in per kernel.
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, bool kInfer>
cudaError_t launch_rows(const CellDims& dims, const CellFactors<T>& f, const T* x, const T* rep,
                        const int64_t* domain, T* hidden, T* o, const T* norm_weight, const T* norm_bias,
                        const T* running_mean, const T* running_var, double eps, T* y, cudaStream_t stream) {
  if (dims.batch == 0) return cudaSuccess;
  const int64_t k = dims.rank;
  const size_t bytes = sizeof(T) * (dims.width + k * k + 4 * k + dims.bottleneck + kRowThreads);
  const cudaError_t allowed = allow_shared(project_rows_kernel<T, kInfer>, bytes);
  if (allowed != cudaSuccess) return allowed;
  project_rows_kernel<T, kInfer><<<dims.batch, kRowThreads, bytes, stream>>>(
      dims, f, x, rep, domain, hidden, o, norm_weight, norm_bias, running_mean, running_var, static_cast<T>(eps), y);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_project_rows(const CellDims& dims, const CellFactors<T>& f, const T* x, const T* rep,
                                const int64_t* domain, T* hidden, T* o, cudaStream_t stream) {
  return launch_rows<T, false>(dims, f, x, rep, domain, hidden, o, nullptr, nullptr, nullptr, nullptr, 0.0, nullptr,
                               stream);
}

template <typename T>
cudaError_t launch_infer(const CellDims& dims, const CellFactors<T>& f, const T* x, const T* rep,
                         const int64_t* domain, const T* norm_weight, const T* norm_bias, const T* running_mean,
                         const T* running_var, double eps, T* y, cudaStream_t stream) {
  return launch_rows<T, true>(dims, f, x, rep, domain, nullptr, nullptr, norm_weight, norm_bias, running_mean,
                              running_var, eps, y, stream);
}

template <typename T>
cudaError_t launch_column_stats(const T* o, const int64_t* domain, bool per_domain, int64_t batch, int64_t width,
                                int64_t groups, double eps, T* mean, T* var, T* rstd, T* count, cudaStream_t stream) {
  const dim3 block(kColumnTile, kRowLanes);
  const unsigned int blocks = static_cast<unsigned int>((width + kColumnTile - 1) / kColumnTile);
  column_stats_kernel<T><<<blocks, block, 0, stream>>>(o, domain, per_domain, batch, width, groups, eps, mean, var,
                                                        rstd, count);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_normalise(const T* o, const T* residual, const int64_t* domain, bool per_domain, int64_t groups,
                             int64_t batch, int64_t width, const T* weight, const T* bias, const T* mean,
                             const T* rstd, T* out, cudaStream_t stream) {
  if (batch * width == 0) return cudaSuccess;
  normalise_kernel<T><<<elementwise_blocks(batch * width), 256, 0, stream>>>(
      o, residual, domain, per_domain, groups, batch, width, weight, bias, mean, rstd, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_norm_grad(const T* grad_y, const T* o, const int64_t* domain, bool per_domain, bool batch_stats,
                             int64_t batch, int64_t width, int64_t groups, const T* mean, const T* rstd,
                             const T* count, T* grad_weight, T* grad_bias, T* mean_gy, T* xhat_coef,
                             cudaStream_t stream) {
  const dim3 block(kColumnTile, kRowLanes);
  const unsigned int blocks = static_cast<unsigned int>((width + kColumnTile - 1) / kColumnTile);
  norm_grad_kernel<T><<<blocks, block, 0, stream>>>(grad_y, o, domain, per_domain, batch_stats, batch, width, groups,
                                                    mean, rstd, count, grad_weight, grad_bias, mean_gy, xhat_coef);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_o(const T* grad_y, const T* o, const int64_t* domain, bool per_domain, int64_t groups,
                          int64_t batch, int64_t width, const T* weight, const T* mean, const T* rstd,
                          const T* mean_gy, const T* xhat_coef, T* grad_o, cudaStream_t stream) {
  if (batch * width == 0) return cudaSuccess;
  grad_o_kernel<T><<<elementwise_blocks(batch * width), 256, 0, stream>>>(
      grad_y, o, domain, per_domain, groups, batch, width, weight, mean, rstd, mean_gy, xhat_coef, grad_o);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_rows(const CellDims& dims, const CellFactors<T>& f, const T* norm_weight, const T* x,
                                 const T* rep, const int64_t* domain, const T* grad_y, const T* o, const T* hidden,
                                 const T* mean, const T* rstd, const T* mean_gy, const T* xhat_coef, T* grad_o,
                                 T* grad_core, T* grad_rep, T* grad_x, cudaStream_t stream) {
  if (dims.batch == 0) return cudaSuccess;
  const int64_t k = dims.rank, s = dims.bottleneck;
  const size_t bytes = sizeof(T) * (dims.width + k * k + (4 * k + s) + (4 * k + s));
  const cudaError_t allowed = allow_shared(backward_rows_kernel<T>, bytes);
  if (allowed != cudaSuccess) return allowed;
  backward_rows_kernel<T><<<dims.batch, kRowThreads, bytes, stream>>>(dims, f, norm_weight, x, rep, domain, grad_y,
                                                                      o, hidden, mean, rstd, mean_gy, xhat_coef,
                                                                      grad_o, grad_core, grad_rep, grad_x);
  return cudaGetLastError();
}

#define HAMUR_FAST_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_project_rows<T>(const CellDims&, const CellFactors<T>&, const T*, const T*,            \
                                              const int64_t*, T*, T*, cudaStream_t);                                 \
  template cudaError_t launch_infer<T>(const CellDims&, const CellFactors<T>&, const T*, const T*, const int64_t*,   \
                                       const T*, const T*, const T*, const T*, double, T*, cudaStream_t);            \
  template cudaError_t launch_column_stats<T>(const T*, const int64_t*, bool, int64_t, int64_t, int64_t, double, T*, \
                                              T*, T*, T*, cudaStream_t);                                             \
  template cudaError_t launch_normalise<T>(const T*, const T*, const int64_t*, bool, int64_t, int64_t, int64_t,     \
                                           const T*, const T*, const T*, const T*, T*, cudaStream_t);                \
  template cudaError_t launch_norm_grad<T>(const T*, const T*, const int64_t*, bool, bool, int64_t, int64_t,         \
                                           int64_t, const T*, const T*, const T*, T*, T*, T*, T*, cudaStream_t);     \
  template cudaError_t launch_grad_o<T>(const T*, const T*, const int64_t*, bool, int64_t, int64_t, int64_t,        \
                                        const T*, const T*, const T*, const T*, const T*, T*, cudaStream_t);         \
  template cudaError_t launch_backward_rows<T>(const CellDims&, const CellFactors<T>&, const T*, const T*, const T*, \
                                               const int64_t*, const T*, const T*, const T*, const T*, const T*,     \
                                               const T*, const T*, T*, T*, T*, T*, cudaStream_t);

HAMUR_FAST_INSTANTIATE(float)
HAMUR_FAST_INSTANTIATE(double)
#undef HAMUR_FAST_INSTANTIATE

}  // namespace cuda
}  // namespace hamur_fast
