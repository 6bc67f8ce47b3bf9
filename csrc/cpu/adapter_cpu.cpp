// CPU kernel of the HAMUR adapter cell's training forward (SPEC sections 2, 3 and 6, level 1), float32 and
// float64. Schemas: csrc/cpu/ops.cpp; shared primitives and the design: cpu_primitives.h.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace cpu {
namespace {

// Rows per block of the fused row pass: each factor element loaded serves this many rows (rows_mat).
constexpr int kBlockRows = 4;

// Slots [first, first + kRows), all of group g: p = x.DL, q = p.I, a = sigmoid(q.DR + db), u = a.UL,
// v = u.I, o = v.UR + ub, each step for the whole block at once (rows_mat); the hidden vectors in slot
// order (what backward reads), x and I read from their original rows. The x and I rows of the next
// `ahead` slots are fetched one row per step, spread over the block's work: fetched all at once they fill
// the core's miss buffers, and the prefetch instructions stall the pass until lines arrive.
template <typename T, int kRows>
HAMUR_INLINE void cell_block(const CellShape& shape, const Factors<T>& f, int64_t g, const int64_t* order,
                             const T* x, const T* rep, T* hidden, T* o, int64_t first, int64_t ahead) {
  const int64_t h = shape.width, k = shape.rank, s = shape.bottleneck;
  const T *x_rows[kRows], *rep_rows[kRows];
  T *p[kRows], *q[kRows], *a[kRows], *u[kRows], *v[kRows], *o_rows[kRows];
  for (int r = 0; r < kRows; ++r) {
    T* row_hidden = hidden + (first + r) * shape.stride();
    x_rows[r] = x + order[first + r] * h;
    rep_rows[r] = rep + order[first + r] * k * k;
    p[r] = row_hidden + shape.p();
    q[r] = row_hidden + shape.q();
    u[r] = row_hidden + shape.u();
    v[r] = row_hidden + shape.v();
    a[r] = row_hidden + shape.a();
    o_rows[r] = o + (first + r) * h;
  }
  auto fetch_ahead = [&](int64_t r) {
    if (r >= ahead) return;
    const int64_t row = order[first + kRows + r];
    prefetch(rep + row * k * k, k * k, /*for_write=*/false);
    prefetch(x + row * h, h, /*for_write=*/false);
  };
  rows_mat<T, kRows>(p, x_rows, f.down_left + g * h * k, nullptr, h, k);
  fetch_ahead(0);
  rows_own_mat<T, kRows>(q, p, rep_rows, k, k);
  fetch_ahead(1);
  rows_mat<T, kRows>(a, q, f.down_right + g * k * s, f.down_bias + g * s, k, s);
  for (int r = 0; r < kRows; ++r) sigmoid_row(a[r], s);
  fetch_ahead(2);
  rows_mat<T, kRows>(u, a, f.up_left + g * s * k, nullptr, s, k);
  fetch_ahead(3);
  rows_own_mat<T, kRows>(v, u, rep_rows, k, k);
  rows_mat<T, kRows>(o_rows, v, f.up_right + g * k * h, f.up_bias + g * h, k, h);
}

// The cell up to o for slots [first, end), in blocks of kBlockRows slots of one group (in released mode
// one group: the slots are the rows). The next block's x and I are fetched ahead: in paper mode the slots
// jump between rows of x and rep.
template <typename T>
HAMUR_ROW_PASS void cell_rows(const CellShape& shape, const GroupOrder& order, const Factors<T>& f, const T* x,
                              const T* rep, T* hidden, T* o, int64_t first, int64_t end) {
  const int64_t* rows = order.order.data_ptr<int64_t>();
  for (int64_t i = first; i < end;) {
    const int64_t g = order.slot_group[i], group_end = std::min(end, order.start[g + 1]);
    for (; i + kBlockRows <= group_end; i += kBlockRows) {
      const int64_t ahead = std::min<int64_t>(kBlockRows, end - i - kBlockRows);
      cell_block<T, kBlockRows>(shape, f, g, rows, x, rep, hidden, o, i, ahead);
    }
    for (; i < group_end; ++i) cell_block<T, 1>(shape, f, g, rows, x, rep, hidden, o, i, /*ahead=*/0);
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
  const int64_t h = shape.width;
  const std::vector<int64_t> counts = count_rows(Rows{domain.data_ptr<int64_t>(), per_domain}, shape.batch, shape.groups);
  const GroupOrder order = order_by_group(Rows{domain.data_ptr<int64_t>(), per_domain}, counts, x.options());
  const Rows slots{order.slot_group.data(), per_domain};
  Tensor y = at::empty_like(x), o = at::empty_like(x);
  Tensor hidden = at::empty({shape.batch, shape.stride()}, x.options());
  Tensor count = at::empty({shape.groups}, x.options()), mean = at::empty({shape.groups, h}, x.options());
  Tensor m2 = at::empty_like(mean), rstd = at::empty_like(mean);
  // One fused pass over the slots: each row block's dense projections and rank-k cores while its I is in L1.
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_forward_cpu_cell", [&] {
    const Factors<scalar_t> f = factors<scalar_t>(dl, dr, db, ul, ur, ub);
    const scalar_t *x_p = x.data_ptr<scalar_t>(), *rep_p = rep.data_ptr<scalar_t>();
    scalar_t *hidden_p = hidden.data_ptr<scalar_t>(), *o_p = o.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      cell_rows(shape, order, f, x_p, rep_p, hidden_p, o_p, first, end);
    });
  });
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
