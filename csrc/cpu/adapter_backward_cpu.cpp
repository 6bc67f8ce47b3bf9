// CPU kernel of the HAMUR adapter cell's backward (SPEC sections 2, 3 and 6, level 1), float32 and float64.
// Schemas: csrc/cpu/ops.cpp; shared primitives and the design: cpu_primitives.h.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace cpu {
namespace {

// Backward of the rank-k core for one row (hidden as saved by forward). From grad_v = d loss / d v it
// forms grad_u = I.grad_v, grad_z (pre-sigmoid), grad_q = DR.grad_z, grad_p = I.grad_q, and writes
// grad_rep = p (x) grad_q + u (x) grad_v once. grad is this row of the (B, 2k + s) gradient buffer
// [grad_u | grad_z | grad_p]. The factors come transposed (up_left_t (k, s), down_right_t (s, k)) so
// that their products are register-strip vec_mats rather than dot products.
template <typename T>
HAMUR_INLINE void rank_core_backward_row(const CellShape& shape, const T* __restrict rep,
                                         const T* __restrict down_right_t, const T* __restrict up_left_t,
                                         const T* __restrict hidden, const T* __restrict grad_v, T* __restrict grad,
                                         T* __restrict grad_q, T* __restrict grad_rep) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  const T* a = hidden + shape.a();
  T* grad_u = grad;
  T* grad_z = grad + k;
  T* grad_p = grad + k + s;
  mat_vec(grad_u, rep, grad_v, k, k);
  vec_mat(grad_z, grad_u, up_left_t, k, s);
  for (int64_t j = 0; j < s; ++j) grad_z[j] *= a[j] * (T(1) - a[j]);
  vec_mat(grad_q, grad_z, down_right_t, s, k);
  mat_vec(grad_p, rep, grad_q, k, k);
  write_two_outers(grad_rep, hidden + shape.p(), grad_q, hidden + shape.u(), grad_v, k);
}

// Backward rank-k core for original rows [first, end) (rep read and grad_rep written in order), row b's
// saved and gradient vectors in slot slot_of[b] (grad_core's rows core_stride apart); grad_q is scratch (k).
template <typename T>
HAMUR_ROW_PASS void rank_core_backward_rows(const CellShape& shape, const Rows& slots, const int64_t* slot_of,
                                            const T* rep, const T* down_right_t, const T* up_left_t, const T* hidden,
                                            const T* grad_v, T* grad_core, int64_t core_stride, T* grad_q,
                                            T* grad_rep, int64_t first, int64_t end) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  for (int64_t b = first; b < end; ++b) {
    const int64_t i = slot_of[b], d = slots.group(i);
    if (b + 1 < end) {
      const int64_t next = slot_of[b + 1];
      prefetch(hidden + next * shape.stride(), shape.stride(), /*for_write=*/false);
      prefetch(grad_v + next * k, k, /*for_write=*/false);
      prefetch(grad_core + next * core_stride, 2 * k + s, /*for_write=*/true);
    }
    rank_core_backward_row(shape, rep + b * k * k, down_right_t + d * s * k, up_left_t + d * k * s,
                           hidden + i * shape.stride(), grad_v + i * k, grad_core + i * core_stride, grad_q,
                           grad_rep + b * k * k);
  }
}

// Rows per block of the grad_o pass: each element of UR^T loaded serves this many rows (rows_mat).
constexpr int kBlockRows = 4;

// Slots [first, first + kRows), all of group g: grad_o (DomainNorm backward) and grad_v = grad_o.UR^T
// while grad_o's rows are in L1.
template <typename T, int kRows>
HAMUR_INLINE void grad_o_block(const NormGrad<T>& ng, int64_t g, int64_t h, int64_t k, const int64_t* order,
                               const T* gy, const T* o, const T* up_right_t, T* grad_o, T* grad_v, int64_t first) {
  T *grad_o_rows[kRows], *grad_v_rows[kRows];
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = first + r;
    grad_o_rows[r] = grad_o + i * h;
    grad_v_rows[r] = grad_v + i * k;
    ng.grad_o_row(g, h, gy + order[i] * h, o + i * h, grad_o_rows[r]);
  }
  rows_mat<T, kRows>(grad_v_rows, grad_o_rows, up_right_t + g * h * k, nullptr, h, k);
}

// grad_o and grad_v for slots [first, end), in blocks of kBlockRows slots of one group; the next block's
// rows of gy are fetched ahead (in paper mode the slots jump between them).
template <typename T>
HAMUR_ROW_PASS void grad_o_rows(const NormGrad<T>& ng, const GroupOrder& order, int64_t h, int64_t k, const T* gy,
                                const T* o, const T* up_right_t, T* grad_o, T* grad_v, int64_t first, int64_t end) {
  const int64_t* rows = order.order.data_ptr<int64_t>();
  for (int64_t i = first; i < end;) {
    const int64_t g = order.slot_group[i], group_end = std::min(end, order.start[g + 1]);
    for (; i + kBlockRows <= group_end; i += kBlockRows) {
      for (int64_t next = i + kBlockRows; next < std::min(i + 2 * kBlockRows, end); ++next)
        prefetch(gy + rows[next] * h, h, /*for_write=*/false);
      grad_o_block<T, kBlockRows>(ng, g, h, k, rows, gy, o, up_right_t, grad_o, grad_v, i);
    }
    for (; i < group_end; ++i) grad_o_block<T, 1>(ng, g, h, k, rows, gy, o, up_right_t, grad_o, grad_v, i);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in,
    const Tensor& down_left_in, const Tensor& down_right_in, const Tensor& up_left_in, const Tensor& up_right_in,
    const Tensor& norm_weight_in, const Tensor& o_in, const Tensor& hidden_in, const Tensor& order_in,
    const Tensor& count_in, const Tensor& mean_in, const Tensor& rstd_in, bool per_domain, bool batch_statistics,
    bool unbiased, double eps) {
  const NormPlan plan{per_domain, batch_statistics, unbiased, eps};
  checks::compiled_cell_backward(c10::DeviceType::CPU, grad_y_in, x_in, rep_in, domain_in, down_left_in, down_right_in,
                                 up_left_in, up_right_in, norm_weight_in, o_in, hidden_in, order_in, count_in, mean_in,
                                 rstd_in, plan);
  const Tensor gy = grad_y_in.contiguous(), x = x_in.contiguous(), rep = rep_in.contiguous();
  const Tensor dl = down_left_in.contiguous(), dr = down_right_in.contiguous();
  const Tensor ul = up_left_in.contiguous(), ur = up_right_in.contiguous(), norm_weight = norm_weight_in.contiguous();
  const Tensor o = o_in.contiguous(), hidden = hidden_in.contiguous(), mean = mean_in.contiguous();
  const Tensor rstd = rstd_in.contiguous();
  const CellShape shape = cell_shape(x, rep, dr, per_domain, norm_weight);
  const int64_t h = shape.width, k = shape.rank, s = shape.bottleneck;
  const GroupOrder order = saved_order(order_in.contiguous(), count_in);
  const int64_t* order_p = order.order.data_ptr<int64_t>();
  const Rows slots{order.slot_group.data(), per_domain};
  // All (B, .) buffers below are in group order.
  Tensor grad_o = at::empty({shape.batch, h}, x.options());
  Tensor grad_v = at::empty({shape.batch, k}, x.options());
  // grad_core rows [grad_u | grad_z | grad_p], padded to whole 64-byte cache lines: in paper mode the core
  // pass writes them in slot order while each thread walks its own original rows, so neighbouring slots
  // belong to different threads, and a line two rows shared would bounce between the cores.
  const int64_t line = 64 / static_cast<int64_t>(x.element_size());
  const int64_t core_stride = (2 * k + s + line - 1) / line * line;
  Tensor grad_core = at::empty({shape.batch, core_stride}, x.options());
  Tensor grad_rep = at::empty_like(rep), grad_norm_weight, grad_norm_bias;
  const Tensor up_right_t = ur.transpose(-1, -2).contiguous();
  // grad_o and grad_v = grad_o.UR^T in one pass over the slots.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu_norm", [&] {
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *o_p = o.data_ptr<scalar_t>();
    const NormGrad<scalar_t> ng = norm_grad(gy_p, order_p, o_p, slots, shape.batch, h, shape.groups,
                                            norm_weight.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                            rstd.data_ptr<scalar_t>(), count_in.contiguous().data_ptr<scalar_t>(),
                                            plan);
    const scalar_t* up_right_t_p = up_right_t.data_ptr<scalar_t>();
    scalar_t *grad_o_p = grad_o.data_ptr<scalar_t>(), *grad_v_p = grad_v.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      grad_o_rows(ng, order, h, k, gy_p, o_p, up_right_t_p, grad_o_p, grad_v_p, first, end);
    });
    grad_norm_weight = to_tensor(ng.grad_weight, norm_weight.sizes(), x.options());
    grad_norm_bias = to_tensor(ng.grad_bias, norm_weight.sizes(), x.options());
  });
  const Tensor down_right_t = dr.transpose(-1, -2).contiguous(), up_left_t = ul.transpose(-1, -2).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu_core", [&] {
    const scalar_t *rep_p = rep.data_ptr<scalar_t>(), *dr_p = down_right_t.data_ptr<scalar_t>();
    const scalar_t *ul_p = up_left_t.data_ptr<scalar_t>(), *hidden_p = hidden.data_ptr<scalar_t>();
    const scalar_t* grad_v_p = grad_v.data_ptr<scalar_t>();
    scalar_t *grad_core_p = grad_core.data_ptr<scalar_t>(), *grad_rep_p = grad_rep.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      std::vector<scalar_t> grad_q(k);
      rank_core_backward_rows(shape, slots, order.slot_of.data(), rep_p, dr_p, ul_p, hidden_p, grad_v_p, grad_core_p,
                              core_stride, grad_q.data(), grad_rep_p, first, end);
    });
  });
  // The dense products' gradients, one GEMM each per domain: grad_x = gy + grad_p.DL^T and the factor
  // gradients as (rows' inputs)^T . (rows' output gradients). In released mode the slots are the rows:
  // x needs no reordering and grad_x is one GEMM onto gy.
  Tensor grad_dl = at::zeros_like(dl), grad_dr = at::zeros_like(dr), grad_ul = at::zeros_like(ul);
  Tensor grad_ur = at::zeros_like(ur), grad_ub = at::zeros_like(norm_weight);
  Tensor grad_db = per_domain ? at::zeros({shape.groups, s}, x.options()) : at::zeros({s}, x.options());
  Tensor grad_x = per_domain ? at::empty({shape.batch, h}, x.options()) : at::empty_like(x);
  const Tensor x_sorted = per_domain ? gather_rows(x, order) : x;
  for (int64_t g = 0; g < shape.groups; ++g) {
    if (order.rows(g) == 0) continue;
    const Tensor hidden_g = slots_of(hidden, order, g), core_g = slots_of(grad_core, order, g);
    const Tensor grad_o_g = slots_of(grad_o, order, g);
    const Tensor grad_u = core_g.narrow(1, 0, k), grad_z = core_g.narrow(1, k, s), grad_p = core_g.narrow(1, k + s, k);
    Tensor grad_x_g = slots_of(grad_x, order, g);
    Tensor grad_dl_g = param_of(grad_dl, g, per_domain), grad_dr_g = param_of(grad_dr, g, per_domain);
    Tensor grad_ul_g = param_of(grad_ul, g, per_domain), grad_ur_g = param_of(grad_ur, g, per_domain);
    Tensor grad_db_g = param_of(grad_db, g, per_domain), grad_ub_g = param_of(grad_ub, g, per_domain);
    if (per_domain) {
      at::mm_out(grad_x_g, grad_p, param_of(dl, g, per_domain).t());
    } else {
      at::addmm_out(grad_x_g, gy, grad_p, dl.t());
    }
    // MKL's sgemm runs these long-K products ~1.5x faster when the output's rows are the rank k (x^T.grad_p
    // over 1365 rows: 0.24 ms as (h, k), 0.16 ms as (k, h)), so grad_dl and grad_ul are formed transposed.
    grad_dl_g.copy_(at::mm(grad_p.t(), slots_of(x_sorted, order, g)).t());
    at::mm_out(grad_dr_g, hidden_g.narrow(1, shape.q(), k).t(), grad_z);
    grad_ul_g.copy_(at::mm(grad_u.t(), hidden_g.narrow(1, shape.a(), s)).t());
    at::mm_out(grad_ur_g, hidden_g.narrow(1, shape.v(), k).t(), grad_o_g);
    at::sum_out(grad_db_g, grad_z, 0);
    // With batch statistics o's bias cancels in the normalisation: its gradient, the group's sum of
    // grad_o, is exactly 0 (a sum would return the rounding of grad_o, amplified by rstd up to
    // 1/sqrt(eps)); with given statistics it is the sum.
    if (!plan.batch_statistics) at::sum_out(grad_ub_g, grad_o_g, 0);
  }
  if (!per_domain) return {grad_x, grad_rep, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub, grad_norm_weight,
                           grad_norm_bias};
  // Paper mode: grad_x = gy + (grad_p.DL^T), back from group order to the original row order.
  const Tensor grad_x_sorted = grad_x;
  grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu_grad_x", [&] {
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *sorted_p = grad_x_sorted.data_ptr<scalar_t>();
    scalar_t* grad_x_p = grad_x.data_ptr<scalar_t>();
    const int64_t* slot_of = order.slot_of.data();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      for (int64_t b = first; b < end; ++b) {
        if (b + kRowsAhead < end) prefetch(sorted_p + slot_of[b + kRowsAhead] * h, h, /*for_write=*/false);
        add_rows(gy_p + b * h, sorted_p + slot_of[b] * h, h, grad_x_p + b * h);
      }
    });
  });
  return {grad_x, grad_rep, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub, grad_norm_weight, grad_norm_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_cell_backward", &adapter_backward_cpu);
}

}  // namespace cpu
}  // namespace hamur_fast
