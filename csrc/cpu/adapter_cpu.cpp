// CPU kernel of the HAMUR adapter cell's training forward (SPEC sections 2, 3 and 6, level 1), float32 and
// float64. Schemas: csrc/cpu/ops.cpp; shared primitives and the design: cpu_primitives.h.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace cpu {
namespace {

// Forward rank-k core for original rows [first, end), row b's hidden in slot slot_of[b]. Walking rows in
// their original order streams rep from memory in order (group order would jump between rows' I_b).
template <typename T>
HAMUR_ROW_PASS void rank_core_rows(const CellShape& shape, const Rows& slots, const int64_t* slot_of, const T* rep,
                                   const Factors<T>& f, T* hidden, int64_t first, int64_t end) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  for (int64_t b = first; b < end; ++b) {
    const int64_t i = slot_of[b], d = slots.group(i);
    if (b + 1 < end) prefetch(hidden + slot_of[b + 1] * shape.stride(), shape.stride(), /*for_write=*/true);
    rank_core_row(shape, rep + b * k * k, f.down_right + d * k * s, f.down_bias + d * s, f.up_left + d * s * k,
                  hidden + i * shape.stride());
  }
}

// ------------------------------------------------------------------------------------ forward
// Outputs in group order (slot i = original row order[i]): o, hidden; y in the original order.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_forward_cpu(
    const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in, const Tensor& down_left_in,
    const Tensor& down_right_in, const Tensor& down_bias_in, const Tensor& up_left_in, const Tensor& up_right_in,
    const Tensor& up_bias_in, const Tensor& norm_weight_in, const Tensor& norm_bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain,
    bool batch_statistics, bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_cell_forward(c10::DeviceType::CPU, x_in, rep_in, domain_in, down_left_in, down_right_in,
                                down_bias_in, up_left_in, up_right_in, up_bias_in, norm_weight_in, norm_bias_in,
                                stat_mean, stat_var, plan);
  const Tensor x = x_in.contiguous(), rep = rep_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dl = down_left_in.contiguous(), dr = down_right_in.contiguous(), db = down_bias_in.contiguous();
  const Tensor ul = up_left_in.contiguous(), ur = up_right_in.contiguous(), ub = up_bias_in.contiguous();
  const Tensor norm_weight = norm_weight_in.contiguous(), norm_bias = norm_bias_in.contiguous();
  const CellShape shape = cell_shape(x, rep, dr, per_domain, norm_weight);
  const int64_t h = shape.width, k = shape.rank;
  const std::vector<int64_t> counts = count_rows(Rows{domain.data_ptr<int64_t>(), per_domain}, shape.batch, shape.groups);
  const GroupOrder order = order_by_group(Rows{domain.data_ptr<int64_t>(), per_domain}, counts, x.options());
  const Rows slots{order.slot_group.data(), per_domain};
  Tensor y = at::empty_like(x), o = at::empty_like(x);
  Tensor hidden = at::empty({shape.batch, shape.stride()}, x.options());
  Tensor count = at::empty({shape.groups}, x.options()), mean = at::empty({shape.groups, h}, x.options());
  Tensor m2 = at::empty_like(mean), rstd = at::empty_like(mean);
  // u = x.U, one GEMM per domain over its rows.
  const Tensor x_sorted = gather_rows(x, order);
  for (int64_t g = 0; g < shape.groups; ++g) {
    if (order.rows(g) == 0) continue;
    Tensor u = slots_of(hidden, order, g).narrow(1, shape.u(), k);
    at::mm_out(u, slots_of(x_sorted, order, g), param_of(dl, g, per_domain));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_forward_cpu_core", [&] {
    const Factors<scalar_t> f = factors<scalar_t>(dl, dr, db, ul, ur, ub);
    const scalar_t* rep_p = rep.data_ptr<scalar_t>();
    scalar_t* hidden_p = hidden.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      rank_core_rows(shape, slots, order.slot_of.data(), rep_p, f, hidden_p, first, end);
    });
  });
  // o = r.V' + b', one GEMM per domain.
  for (int64_t g = 0; g < shape.groups; ++g) {
    if (order.rows(g) == 0) continue;
    Tensor o_g = slots_of(o, order, g);
    at::addmm_out(o_g, param_of(ub, g, per_domain), slots_of(hidden, order, g).narrow(1, shape.r(), k),
                  param_of(ur, g, per_domain));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_forward_cpu_norm", [&] {
    const scalar_t* o_p = o.data_ptr<scalar_t>();
    statistics(o_p, slots, shape.batch, h, counts, stat_mean, stat_var, plan, count, mean, m2, rstd);
    normalise_rows(o_p, order.order.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), slots, shape.batch, h, norm_weight,
                   norm_bias, mean, rstd, y.data_ptr<scalar_t>());
  });
  return {y, o, hidden, order.order, count, mean, m2, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_cell_forward", &adapter_forward_cpu);
}

}  // namespace cpu
}  // namespace hamur_fast
