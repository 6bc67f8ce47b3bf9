// CUDA kernels of the adapter cell and DomainNorm: launchers on raw pointers and a cudaStream_t.
//
// This header and adapter_kernels.cu include no torch header (nvcc cannot compile torch's CUDA headers
// against a CPU build of torch, and the kernels need none); csrc/cuda/adapter_cuda.cpp checks tensors and
// calls these launchers. Conventions (per_domain, statistics groups, hidden layout) as in csrc/cpu/ops.cpp.
// Every launcher returns the launch's cudaError_t.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace hamur_fast {
namespace cuda {

struct CellDims {
  int64_t batch, width, rank, bottleneck, groups;
  bool per_domain;  // parameters and statistics per domain (paper) or shared / whole batch (released)
};

template <typename T>
struct CellFactors {
  const T *down_left, *down_right, *down_bias, *up_left, *up_right, *up_bias;
};

// A domain id outside [0, groups) (value checks off, torch.compile) is never used as an index: its row gets
// NaN where the op hands a row back (y, grad_o of DomainNorm, grad_x, grad_rep) and is left out of every
// statistic and factor gradient.
//
// Training forward, one block per row: hidden (B, 4k + s) = [u | p | q | r | a] and o (B, h), rows in order.
template <typename T>
cudaError_t launch_project_rows(const CellDims& dims, const CellFactors<T>& f, const T* x, const T* rep,
                                const int64_t* domain, T* hidden, T* o, cudaStream_t stream);

// Eval: the whole cell in one launch, DomainNorm folded from the running statistics into a per-domain
// affine map (y = x + o * scale + shift), one block per row.
template <typename T>
cudaError_t launch_infer(const CellDims& dims, const CellFactors<T>& f, const T* x, const T* rep,
                         const int64_t* domain, const T* norm_weight, const T* norm_bias, const T* running_mean,
                         const T* running_var, double eps, T* y, cudaStream_t stream);

// Per-group count, mean, normalising variance and 1/sqrt(var + eps) of the rows of o (B, h), two passes.
template <typename T>
cudaError_t launch_column_stats(const T* o, const int64_t* domain, bool per_domain, int64_t batch, int64_t width,
                                int64_t groups, double eps, T* mean, T* var, T* rstd, T* count, cudaStream_t stream);

// out = residual + (o - mean) * weight * rstd + bias with each row's group; residual may be null.
template <typename T>
cudaError_t launch_normalise(const T* o, const T* residual, const int64_t* domain, bool per_domain, int64_t groups,
                             int64_t batch, int64_t width, const T* weight, const T* bias, const T* mean,
                             const T* rstd, T* out, cudaStream_t stream);

// DomainNorm backward terms per group and column: grad_weight = sum(gy * xhat), grad_bias = sum(gy), and
// for grad_o = weight * rstd * (gy - mean_gy - xhat * xhat_coef): mean_gy and xhat_coef (0 unless
// batch_stats).
template <typename T>
cudaError_t launch_norm_grad(const T* grad_y, const T* o, const int64_t* domain, bool per_domain, bool batch_stats,
                             int64_t batch, int64_t width, int64_t groups, const T* mean, const T* rstd,
                             const T* count, T* grad_weight, T* grad_bias, T* mean_gy, T* xhat_coef,
                             cudaStream_t stream);

// grad_o (B, h) from the terms above (DomainNorm alone).
template <typename T>
cudaError_t launch_grad_o(const T* grad_y, const T* o, const int64_t* domain, bool per_domain, int64_t groups,
                          int64_t batch, int64_t width, const T* weight, const T* mean, const T* rstd,
                          const T* mean_gy, const T* xhat_coef, T* grad_o, cudaStream_t stream);

// Cell backward, one block per row: grad_o (B, h), grad_core (B, 2k + s) = [grad_q | grad_z | grad_u]
// (the per-row factors of the weight gradients), grad_rep (B, k, k) and grad_x (B, h).
template <typename T>
cudaError_t launch_backward_rows(const CellDims& dims, const CellFactors<T>& f, const T* norm_weight, const T* x,
                                 const T* rep, const int64_t* domain, const T* grad_y, const T* o, const T* hidden,
                                 const T* mean, const T* rstd, const T* mean_gy, const T* xhat_coef, T* grad_o,
                                 T* grad_core, T* grad_rep, T* grad_x, cudaStream_t stream);

}  // namespace cuda
}  // namespace hamur_fast
