// CUDA implementations of the hamur_fast ops (schemas: csrc/cpu/ops.cpp), compiled by the host compiler.
//
// This file does the tensor work (checks, allocation, the weight-gradient GEMMs through ATen) and calls the
// torch-free launchers of adapter_kernels.cu. It includes no c10/cuda header: the current stream comes
// through the device-generic guard interface, so the file also compiles against a CPU build of torch
// (tests/test_nvcc_compile.py checks that it does).
//
// Rows stay in their original order on the GPU: adapter_forward's `order` output is the identity.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <tuple>

#include "../checks.h"
#include "adapter_kernels.h"

namespace hamur_fast {
namespace {

using at::Tensor;

cudaStream_t current_stream(const Tensor& t) {
  const c10::impl::VirtualGuardImpl guard_impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(guard_impl.getStream(t.device()).native_handle());
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "hamur_fast CUDA kernel ", kernel, " failed: ", cudaGetErrorString(status));
}

cuda::CellDims cell_dims(const Tensor& x, const Tensor& rep, const Tensor& down_right, const Tensor& norm_weight,
                         bool per_domain) {
  return {x.size(0), x.size(1), rep.size(1), down_right.size(-1), per_domain ? norm_weight.size(0) : 1, per_domain};
}

template <typename T>
cuda::CellFactors<T> cell_factors(const Tensor& dl, const Tensor& dr, const Tensor& db, const Tensor& ul,
                                  const Tensor& ur, const Tensor& ub) {
  return {dl.data_ptr<T>(), dr.data_ptr<T>(), db.data_ptr<T>(), ul.data_ptr<T>(), ur.data_ptr<T>(), ub.data_ptr<T>()};
}

// A tensor that lives on and has the dtype of `like`, contiguous.
Tensor prepared(const Tensor& t, const Tensor& like) { return t.to(like.options()).contiguous(); }

// The kernels normalise per domain with the biased variance and one group with the unbiased one.
void check_plan(const NormPlan& plan) {
  TORCH_CHECK(plan.unbiased != plan.per_domain, "the CUDA kernels take unbiased = ", !plan.per_domain,
              " with per_domain = ", plan.per_domain);
}

// Fills count, mean, m2, rstd (the contract's order) from o's rows; with running statistics mean and rstd come
// from the given ones and m2 is 0 (count stays the batch's).
template <typename T>
void statistics(const Tensor& o, const Tensor& domain, const NormPlan& plan, const c10::optional<Tensor>& stat_mean,
                const c10::optional<Tensor>& stat_var, Tensor& count, Tensor& mean, Tensor& m2, Tensor& rstd,
                cudaStream_t stream) {
  check_plan(plan);
  Tensor var = at::empty_like(mean);
  check_launch(cuda::launch_column_stats<T>(o.data_ptr<T>(), domain.data_ptr<int64_t>(), plan.per_domain, o.size(0),
                                            o.size(1), mean.size(0), plan.eps, mean.data_ptr<T>(), var.data_ptr<T>(),
                                            rstd.data_ptr<T>(), count.data_ptr<T>(), stream),
               "column_stats");
  if (plan.batch_statistics) {
    m2.copy_(var * variance_divisor(count, plan.unbiased));
  } else {
    mean.copy_(*stat_mean);
    m2.zero_();
    rstd.copy_(at::rsqrt(*stat_var + plan.eps));
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_forward_cuda(
    const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in, const Tensor& down_left,
    const Tensor& down_right, const Tensor& down_bias, const Tensor& up_left, const Tensor& up_right,
    const Tensor& up_bias, const Tensor& norm_weight_in, const Tensor& norm_bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain,
    bool batch_statistics, bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_cell_forward(c10::DeviceType::CUDA, x_in, rep_in, domain_in, down_left, down_right, down_bias,
                                up_left, up_right, up_bias, norm_weight_in, norm_bias_in, stat_mean, stat_var, plan);
  const c10::DeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), rep = rep_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dl = prepared(down_left, x), dr = prepared(down_right, x), db = prepared(down_bias, x);
  const Tensor ul = prepared(up_left, x), ur = prepared(up_right, x), ub = prepared(up_bias, x);
  const Tensor norm_weight = prepared(norm_weight_in, x), norm_bias = prepared(norm_bias_in, x);
  const cuda::CellDims dims = cell_dims(x, rep, dr, norm_weight, per_domain);
  const cudaStream_t stream = current_stream(x);
  Tensor y = at::empty_like(x), o = at::empty_like(x);
  Tensor hidden = at::empty({dims.batch, 4 * dims.rank + dims.bottleneck}, x.options());
  Tensor order = at::arange(dims.batch, x.options().dtype(at::kLong));
  Tensor count = at::empty({dims.groups}, x.options()), mean = at::empty({dims.groups, dims.width}, x.options());
  Tensor m2 = at::empty_like(mean), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_forward_cuda", [&] {
    check_launch(cuda::launch_project_rows<scalar_t>(dims, cell_factors<scalar_t>(dl, dr, db, ul, ur, ub),
                                                     x.data_ptr<scalar_t>(), rep.data_ptr<scalar_t>(),
                                                     domain.data_ptr<int64_t>(), hidden.data_ptr<scalar_t>(),
                                                     o.data_ptr<scalar_t>(), stream),
                 "project_rows");
    statistics<scalar_t>(o, domain, plan, stat_mean, stat_var, count, mean, m2, rstd, stream);
    check_launch(cuda::launch_normalise<scalar_t>(o.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                  domain.data_ptr<int64_t>(), per_domain, dims.groups, dims.batch,
                                                  dims.width,
                                                  norm_weight.data_ptr<scalar_t>(), norm_bias.data_ptr<scalar_t>(),
                                                  mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                                                  y.data_ptr<scalar_t>(), stream),
                 "normalise");
  });
  return {y, o, hidden, order, count, mean, m2, rstd};
}

Tensor adapter_infer_cuda(const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in, const Tensor& down_left,
                          const Tensor& down_right, const Tensor& down_bias, const Tensor& up_left,
                          const Tensor& up_right, const Tensor& up_bias, const Tensor& norm_weight,
                          const Tensor& norm_bias, const Tensor& running_mean, const Tensor& running_var, double eps) {
  checks::compiled_cell_infer(c10::DeviceType::CUDA, x_in, rep_in, domain_in, down_left, down_right, down_bias, up_left,
                              up_right, up_bias, norm_weight, norm_bias, running_mean, running_var);
  const c10::DeviceGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), rep = rep_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dl = prepared(down_left, x), dr = prepared(down_right, x), db = prepared(down_bias, x);
  const Tensor ul = prepared(up_left, x), ur = prepared(up_right, x), ub = prepared(up_bias, x);
  const Tensor weight = prepared(norm_weight, x), bias = prepared(norm_bias, x);
  const Tensor rmean = prepared(running_mean, x), rvar = prepared(running_var, x);
  const cuda::CellDims dims = cell_dims(x, rep, dr, weight, /*per_domain=*/true);
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_infer_cuda", [&] {
    check_launch(cuda::launch_infer<scalar_t>(dims, cell_factors<scalar_t>(dl, dr, db, ul, ur, ub),
                                              x.data_ptr<scalar_t>(), rep.data_ptr<scalar_t>(),
                                              domain.data_ptr<int64_t>(), weight.data_ptr<scalar_t>(),
                                              bias.data_ptr<scalar_t>(), rmean.data_ptr<scalar_t>(),
                                              rvar.data_ptr<scalar_t>(), eps, y.data_ptr<scalar_t>(),
                                              current_stream(x)),
                 "infer");
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> domain_norm_forward_cuda(
    const Tensor& o_in, const Tensor& domain_in, const Tensor& weight_in, const Tensor& bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain,
    bool batch_statistics, bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_norm_forward(c10::DeviceType::CUDA, o_in, domain_in, weight_in, bias_in, stat_mean, stat_var, plan);
  const c10::DeviceGuard guard(o_in.device());
  const Tensor o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = prepared(weight_in, o), bias = prepared(bias_in, o);
  const int64_t groups = per_domain ? weight.size(0) : 1;
  const cudaStream_t stream = current_stream(o);
  Tensor y = at::empty_like(o);
  Tensor count = at::empty({groups}, o.options()), mean = at::empty({groups, o.size(1)}, o.options());
  Tensor m2 = at::empty_like(mean), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_forward_cuda", [&] {
    statistics<scalar_t>(o, domain, plan, stat_mean, stat_var, count, mean, m2, rstd, stream);
    check_launch(cuda::launch_normalise<scalar_t>(o.data_ptr<scalar_t>(), nullptr, domain.data_ptr<int64_t>(),
                                                  per_domain, groups, o.size(0), o.size(1), weight.data_ptr<scalar_t>(),
                                                  bias.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                                  rstd.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), stream),
                 "normalise");
  });
  return {y, count, mean, m2, rstd};
}

// Per-group terms of DomainNorm's backward: grad_weight, grad_bias, mean_gy, xhat_coef, each (G, h).
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_grad_terms(const Tensor& gy, const Tensor& o, const Tensor& domain,
                                                           const Tensor& count, const Tensor& mean, const Tensor& rstd,
                                                           const NormPlan& plan, cudaStream_t stream) {
  check_plan(plan);
  Tensor grad_weight = at::empty_like(mean), grad_bias = at::empty_like(mean);
  Tensor mean_gy = at::empty_like(mean), xhat_coef = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "norm_grad_cuda", [&] {
    check_launch(cuda::launch_norm_grad<scalar_t>(gy.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                                  domain.data_ptr<int64_t>(), plan.per_domain, plan.batch_statistics,
                                                  o.size(0),
                                                  o.size(1), mean.size(0), mean.data_ptr<scalar_t>(),
                                                  rstd.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(),
                                                  grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
                                                  mean_gy.data_ptr<scalar_t>(), xhat_coef.data_ptr<scalar_t>(),
                                                  stream),
                 "norm_grad");
  });
  return {grad_weight, grad_bias, mean_gy, xhat_coef};
}

std::tuple<Tensor, Tensor, Tensor> domain_norm_backward_cuda(const Tensor& grad_y_in, const Tensor& o_in,
                                                             const Tensor& domain_in, const Tensor& weight_in,
                                                             const Tensor& count_in, const Tensor& mean_in,
                                                             const Tensor& rstd_in, bool per_domain,
                                                             bool batch_statistics, bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_norm_backward(c10::DeviceType::CUDA, grad_y_in, o_in, domain_in, weight_in, count_in, mean_in,
                                 rstd_in, plan);
  const c10::DeviceGuard guard(o_in.device());
  const Tensor gy = grad_y_in.contiguous(), o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = prepared(weight_in, o), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const Tensor count = count_in.contiguous();
  const cudaStream_t stream = current_stream(o);
  Tensor grad_weight, grad_bias, mean_gy, xhat_coef;
  std::tie(grad_weight, grad_bias, mean_gy, xhat_coef) =
      norm_grad_terms(gy, o, domain, count, mean, rstd, plan, stream);
  Tensor grad_o = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_backward_cuda", [&] {
    check_launch(cuda::launch_grad_o<scalar_t>(gy.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                               domain.data_ptr<int64_t>(), per_domain, mean.size(0), o.size(0), o.size(1),
                                               weight.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                               rstd.data_ptr<scalar_t>(), mean_gy.data_ptr<scalar_t>(),
                                               xhat_coef.data_ptr<scalar_t>(), grad_o.data_ptr<scalar_t>(), stream),
                 "grad_o");
  });
  return {grad_o, grad_weight.view(weight_in.sizes()), grad_bias.view(weight_in.sizes())};
}

// sum over the rows of each group of outer(lhs_b, rhs_b): (G, m, n) from lhs (B, m), rhs (B, n) and the
// (B, G) group indicator; one batched GEMM, no host synchronisation.
Tensor per_group_outer(const Tensor& lhs, const Tensor& rhs, const Tensor& indicator) {
  const int64_t groups = indicator.size(1);
  const Tensor masked = indicator.t().unsqueeze(2) * lhs.unsqueeze(0);  // (G, B, m)
  return at::bmm(masked.transpose(1, 2), rhs.unsqueeze(0).expand({groups, rhs.size(0), rhs.size(1)}));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cuda(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in,
    const Tensor& down_left, const Tensor& down_right, const Tensor& up_left, const Tensor& up_right,
    const Tensor& norm_weight_in, const Tensor& o_in, const Tensor& hidden_in, const Tensor& order_in,
    const Tensor& count_in, const Tensor& mean_in, const Tensor& rstd_in, bool per_domain, bool batch_statistics,
    bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_cell_backward(c10::DeviceType::CUDA, grad_y_in, x_in, rep_in, domain_in, down_left, down_right,
                                 up_left, up_right, norm_weight_in, o_in, hidden_in, order_in, count_in, mean_in,
                                 rstd_in, plan);  // order_in: the identity on the GPU, only checked
  const c10::DeviceGuard guard(x_in.device());
  const Tensor gy = grad_y_in.contiguous(), x = x_in.contiguous(), rep = rep_in.contiguous();
  const Tensor domain = domain_in.contiguous(), o = o_in.contiguous(), hidden = hidden_in.contiguous();
  const Tensor dl = prepared(down_left, x), dr = prepared(down_right, x);
  const Tensor ul = prepared(up_left, x), ur = prepared(up_right, x), norm_weight = prepared(norm_weight_in, x);
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous(), count = count_in.contiguous();
  const cuda::CellDims dims = cell_dims(x, rep, dr, norm_weight, per_domain);
  const int64_t k = dims.rank, s = dims.bottleneck;
  const cudaStream_t stream = current_stream(x);
  Tensor grad_norm_weight, grad_norm_bias, mean_gy, xhat_coef;
  std::tie(grad_norm_weight, grad_norm_bias, mean_gy, xhat_coef) =
      norm_grad_terms(gy, o, domain, count, mean, rstd, plan, stream);
  Tensor grad_o = at::empty_like(x), grad_x = at::empty_like(x), grad_rep = at::empty_like(rep);
  Tensor grad_core = at::empty({dims.batch, 2 * k + s}, x.options());  // [grad_q | grad_z | grad_u]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cuda", [&] {
    // Bias pointers are unused by the backward kernel: the factors struct carries the matrices.
    const cuda::CellFactors<scalar_t> f{dl.data_ptr<scalar_t>(), dr.data_ptr<scalar_t>(), nullptr,
                                        ul.data_ptr<scalar_t>(), ur.data_ptr<scalar_t>(), nullptr};
    check_launch(cuda::launch_backward_rows<scalar_t>(
                     dims, f, norm_weight.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), rep.data_ptr<scalar_t>(),
                     domain.data_ptr<int64_t>(), gy.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                     hidden.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(),
                     mean_gy.data_ptr<scalar_t>(), xhat_coef.data_ptr<scalar_t>(), grad_o.data_ptr<scalar_t>(),
                     grad_core.data_ptr<scalar_t>(), grad_rep.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                     stream),
                 "backward_rows");
  });
  // The factor gradients: sums over each domain's rows of (row input) x (row output gradient), as GEMMs.
  const Tensor p = hidden.narrow(1, k, k), r = hidden.narrow(1, 3 * k, k), a = hidden.narrow(1, 4 * k, s);
  const Tensor grad_q = grad_core.narrow(1, 0, k), grad_z = grad_core.narrow(1, k, s);
  const Tensor grad_u = grad_core.narrow(1, k + s, k);
  Tensor grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub;
  if (per_domain) {
    const Tensor indicator = (domain.unsqueeze(1) == at::arange(dims.groups, domain.options())).to(x.scalar_type());
    grad_dl = per_group_outer(x, grad_u, indicator);
    grad_dr = per_group_outer(p, grad_z, indicator);
    grad_ul = per_group_outer(a, grad_q, indicator);
    grad_ur = per_group_outer(r, grad_o, indicator);
    grad_db = indicator.t().mm(grad_z);
    grad_ub = indicator.t().mm(grad_o);
  } else {
    grad_dl = x.t().mm(grad_u);
    grad_dr = p.t().mm(grad_z);
    grad_ul = a.t().mm(grad_q);
    grad_ur = r.t().mm(grad_o);
    grad_db = grad_z.sum(0);
    grad_ub = grad_o.sum(0);
  }
  return {grad_x, grad_rep, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub,
          grad_norm_weight.view(norm_weight_in.sizes()), grad_norm_bias.view(norm_weight_in.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CUDA, m) {
  m.impl("compiled_cell_forward", &adapter_forward_cuda);
  m.impl("compiled_cell_backward", &adapter_backward_cuda);
  m.impl("compiled_cell_infer", &adapter_infer_cuda);
  m.impl("compiled_norm_forward", &domain_norm_forward_cuda);
  m.impl("compiled_norm_backward", &domain_norm_backward_cuda);
}

}  // namespace hamur_fast
