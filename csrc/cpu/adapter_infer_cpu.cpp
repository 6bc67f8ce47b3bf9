// CPU kernel of the HAMUR adapter cell's eval with running statistics (SPEC sections 2 and 6, level 1),
// float32 and float64. Schemas: csrc/cpu/ops.cpp; shared primitives and the design: cpu_primitives.h.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace cpu {
namespace {

// The whole cell for one row, fused (eval): o = (rank_core(x.DL)).UR + ub; hidden is scratch.
template <typename T>
HAMUR_INLINE void project_row(const CellShape& shape, const Factors<T>& f, int64_t d, const T* __restrict x,
                        const T* __restrict rep, T* __restrict hidden, T* __restrict o) {
  const int64_t h = shape.width, k = shape.rank, s = shape.bottleneck;
  vec_mat(hidden + shape.p(), x, f.down_left + d * h * k, h, k);
  rank_core_row(k, s, rep, f.down_right + d * k * s, f.down_bias + d * s, f.up_left + d * s * k, hidden + shape.p(),
                hidden + shape.q(), hidden + shape.a(), hidden + shape.u(), hidden + shape.v());
  vec_mat(o, hidden + shape.v(), f.up_right + d * k * h, k, h);
  axpy(o, T(1), f.up_bias + d * h, h);
}

// Eval: rows [first, end) of y = x + o * scale + shift, each row's cell fused; hidden and o are scratch.
template <typename T>
HAMUR_ROW_PASS void infer_rows(const CellShape& shape, const Rows& rows, const Factors<T>& f, const T* x,
                               const T* rep, const T* scale, const T* shift, T* hidden, T* o, T* y, int64_t first,
                               int64_t end) {
  const int64_t h = shape.width, kk = shape.rank * shape.rank;
  for (int64_t b = first; b < end; ++b) {
    const int64_t d = rows.group(b);
    project_row(shape, f, d, x + b * h, rep + b * kk, hidden, o);
    residual_affine_row(x + b * h, o, scale + d * h, shift + d * h, h, y + b * h);
  }
}

// Eval with running statistics: each row's whole cell in one fused pass (no sort, no GEMM, nothing saved),
// the latency path for small batches.
Tensor adapter_infer_cpu(const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in,
                         const Tensor& down_left_in, const Tensor& down_right_in, const Tensor& down_bias_in,
                         const Tensor& up_left_in, const Tensor& up_right_in, const Tensor& up_bias_in,
                         const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& running_mean,
                         const Tensor& running_var, double eps) {
  checks::compiled_cell_infer(c10::DeviceType::CPU, x_in, rep_in, domain_in, down_left_in, down_right_in, down_bias_in,
                              up_left_in, up_right_in, up_bias_in, norm_weight, norm_bias, running_mean, running_var);
  const Tensor x = x_in.contiguous(), rep = rep_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dl = down_left_in.contiguous(), dr = down_right_in.contiguous(), db = down_bias_in.contiguous();
  const Tensor ul = up_left_in.contiguous(), ur = up_right_in.contiguous(), ub = up_bias_in.contiguous();
  const CellShape shape = cell_shape(x, rep, dr, /*per_domain=*/true, norm_weight);
  const Rows rows{domain.data_ptr<int64_t>(), true};
  check_groups(rows, shape.batch, shape.groups);
  // DomainNorm with running statistics is one per-domain affine map: y = x + o * scale + shift.
  const Tensor scale = (norm_weight * at::rsqrt(running_var + eps)).contiguous();
  const Tensor shift = (norm_bias - running_mean * scale).contiguous();
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_infer_cpu", [&] {
    const Factors<scalar_t> f = factors<scalar_t>(dl, dr, db, ul, ur, ub);
    const scalar_t *x_p = x.data_ptr<scalar_t>(), *rep_p = rep.data_ptr<scalar_t>();
    const scalar_t *scale_p = scale.data_ptr<scalar_t>(), *shift_p = shift.data_ptr<scalar_t>();
    scalar_t* y_p = y.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      std::vector<scalar_t> hidden(shape.stride()), o(shape.width);
      infer_rows(shape, rows, f, x_p, rep_p, scale_p, shift_p, hidden.data(), o.data(), y_p, first, end);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_cell_infer", &adapter_infer_cpu);
}

}  // namespace cpu
}  // namespace hamur_fast
