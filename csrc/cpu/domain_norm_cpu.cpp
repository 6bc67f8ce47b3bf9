// CPU kernels of DomainNorm (SPEC sections 2, 3 and 6): forward, backward and the split passes of a
// data-parallel step, float32 and float64.
// Schemas: csrc/cpu/ops.cpp; shared primitives and the design: cpu_primitives.h.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace cpu {
namespace {

// grad_o of every row from the per-group terms (NormGrad), rows in parallel.
template <typename T>
void grad_o_rows(const NormGrad<T>& ng, const Rows& rows, int64_t batch, int64_t width, const T* gy, const T* o,
                 T* grad_o) {
  at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b)
      ng.grad_o_row(rows.group(b), width, gy + b * width, o + b * width, grad_o + b * width);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> domain_norm_forward_cpu(
    const Tensor& o_in, const Tensor& domain_in, const Tensor& weight_in, const Tensor& bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain,
    bool batch_statistics, bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_norm_forward(c10::DeviceType::CPU, o_in, domain_in, weight_in, bias_in, stat_mean, stat_var, plan);
  const Tensor o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = per_domain ? weight.size(0) : 1;
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  const std::vector<int64_t> counts = count_rows(rows, batch, groups);
  Tensor y = at::empty_like(o);
  Tensor count = at::empty({groups}, o.options()), mean = at::empty({groups, width}, o.options());
  Tensor m2 = at::empty_like(mean), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_forward_cpu", [&] {
    const scalar_t* o_p = o.data_ptr<scalar_t>();
    statistics(o_p, rows, batch, width, counts, stat_mean, stat_var, plan, count, mean, m2, rstd);
    normalise_rows<scalar_t>(o_p, nullptr, nullptr, rows, batch, width, weight, bias, mean, rstd,
                             y.data_ptr<scalar_t>());
  });
  return {y, count, mean, m2, rstd};
}

std::tuple<Tensor, Tensor, Tensor> domain_norm_backward_cpu(const Tensor& grad_y_in, const Tensor& o_in,
                                                            const Tensor& domain_in, const Tensor& weight_in,
                                                            const Tensor& count_in, const Tensor& mean_in,
                                                            const Tensor& rstd_in, bool per_domain,
                                                            bool batch_statistics, bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_norm_backward(c10::DeviceType::CPU, grad_y_in, o_in, domain_in, weight_in, count_in, mean_in,
                                 rstd_in, plan);
  const Tensor gy = grad_y_in.contiguous(), o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const Tensor count = count_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = mean.size(0);
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  check_groups(rows, batch, groups);
  Tensor grad_o = at::empty_like(o), grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_backward_cpu", [&] {
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *o_p = o.data_ptr<scalar_t>();
    const NormGrad<scalar_t> ng =
        norm_grad(gy_p, nullptr, o_p, rows, batch, width, groups, weight.data_ptr<scalar_t>(),
                  mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(), plan);
    grad_o_rows(ng, rows, batch, width, gy_p, o_p, grad_o.data_ptr<scalar_t>());
    grad_weight = to_tensor(ng.grad_weight, weight.sizes(), o.options());
    grad_bias = to_tensor(ng.grad_bias, weight.sizes(), o.options());
  });
  return {grad_o, grad_weight, grad_bias};
}

// The split passes of DomainNorm that a data-parallel step runs with a collective between them
// (hamur_fast/ops/collectives.py): this rank's per-group (count, mean, M2), the normalisation with
// given (global) mean and rstd, and the input gradient from given count and group sums. The group sums are
// compiled_norm_backward's weight and bias gradients.
std::tuple<Tensor, Tensor, Tensor> domain_norm_statistics_cpu(const Tensor& o_in, const Tensor& domain_in,
                                                              int64_t num_groups, bool per_domain) {
  checks::compiled_norm_statistics(c10::DeviceType::CPU, o_in, domain_in, num_groups);
  const Tensor o = o_in.contiguous(), domain = domain_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = per_domain ? num_groups : 1;
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  const std::vector<int64_t> counts = count_rows(rows, batch, groups);
  Tensor count = at::empty({groups}, o.options());
  Tensor mean = at::empty({groups, width}, o.options()), m2 = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_statistics_cpu", [&] {
    std::vector<double> mean_acc, sq_acc;
    batch_moments(o.data_ptr<scalar_t>(), rows, batch, width, groups, counts, mean_acc, sq_acc);
    for (int64_t g = 0; g < groups; ++g) count.data_ptr<scalar_t>()[g] = static_cast<scalar_t>(counts[g]);
    std::copy(mean_acc.begin(), mean_acc.end(), mean.data_ptr<scalar_t>());
    std::copy(sq_acc.begin(), sq_acc.end(), m2.data_ptr<scalar_t>());
  });
  return {count, mean, m2};
}

Tensor domain_norm_normalise_cpu(const Tensor& o_in, const Tensor& domain_in, const Tensor& weight_in,
                                 const Tensor& bias_in, const Tensor& mean_in, const Tensor& rstd_in, bool per_domain) {
  checks::compiled_norm_normalise(c10::DeviceType::CPU, o_in, domain_in, weight_in, bias_in, mean_in, rstd_in,
                                  per_domain);
  const Tensor o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = mean.size(0);
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  check_groups(rows, batch, groups);
  Tensor y = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_normalise_cpu", [&] {
    normalise_rows<scalar_t>(o.data_ptr<scalar_t>(), nullptr, nullptr, rows, batch, width, weight, bias, mean, rstd,
                             y.data_ptr<scalar_t>());
  });
  return y;
}

Tensor domain_norm_input_grad_cpu(const Tensor& grad_y_in, const Tensor& o_in, const Tensor& domain_in,
                                  const Tensor& weight_in, const Tensor& count_in, const Tensor& mean_in,
                                  const Tensor& rstd_in, const Tensor& sum_dy_in, const Tensor& sum_dy_xhat_in,
                                  bool per_domain, bool unbiased) {
  checks::compiled_norm_input_grad(c10::DeviceType::CPU, grad_y_in, o_in, domain_in, weight_in, count_in, mean_in,
                                   rstd_in, sum_dy_in, sum_dy_xhat_in, per_domain);
  const Tensor gy = grad_y_in.contiguous(), o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const Tensor count = count_in.contiguous(), sum_dy = sum_dy_in.contiguous(), sum_dy_xhat = sum_dy_xhat_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = mean.size(0);
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  check_groups(rows, batch, groups);
  Tensor grad_o = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_input_grad_cpu", [&] {
    const NormGrad<scalar_t> ng = norm_grad_terms<scalar_t>(
        sum_dy.data_ptr<scalar_t>(), sum_dy_xhat.data_ptr<scalar_t>(), groups, width, weight.data_ptr<scalar_t>(),
        mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(), /*batch_statistics=*/true,
        unbiased);
    grad_o_rows(ng, rows, batch, width, gy.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), grad_o.data_ptr<scalar_t>());
  });
  return grad_o;
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_norm_forward", &domain_norm_forward_cpu);
  m.impl("compiled_norm_backward", &domain_norm_backward_cpu);
  m.impl("compiled_norm_statistics", &domain_norm_statistics_cpu);
  m.impl("compiled_norm_normalise", &domain_norm_normalise_cpu);
  m.impl("compiled_norm_input_grad", &domain_norm_input_grad_cpu);
}

}  // namespace cpu
}  // namespace hamur_fast
