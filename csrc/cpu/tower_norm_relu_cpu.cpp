// CPU kernels of the released towers' BatchNorm1d + ReLU (hamur_fast/nn/domain_layers.py,
// DomainBatchNorm1d.all_domains_relu), float32 and float64. Schemas: csrc/cpu/ops.cpp.
//
// z (D, B, C) holds D towers' pre-activations of the same B rows; tower d's BatchNorm1d normalises each column c
// over the B rows of slice d, exactly as nn.BatchNorm1d (biased variance to normalise; running statistics
// updated with the unbiased one and momentum; eval with running statistics), then the affine map and the ReLU:
//   y = max(z * scale + shift, 0),  scale = weight * rstd,  shift = bias - mean * scale.
// The ATen form of the same op permutes z to (B, D*C) (a copy), normalises (two passes), applies the ReLU (one
// more) and, backward, runs the ReLU's and the normalisation's gradients as separate passes. Here forward is one
// read of z for the statistics and one read + write for y; backward one read of (grad_y, z) for the column sums
// and one more read + write for grad_z. z is read in whatever (D, B) strides it has (the towers' first layer
// makes it a view of a (B, D*C) product), and y is written as a view of a (B, D*C) tensor, the layout the
// released adapter cell reads without a copy. Only z, mean and rstd are saved: the ReLU mask is recomputed from
// z with the forward's own scale, shift and expression.
//
// Reductions accumulate in double per fixed row chunk and are summed in chunk order, so results do not depend on
// scheduling. The statistics take blocks of kBlockRows rows of a tower (in L1), a two-pass mean and M2 per block,
// merged by Chan's formula: no E[z^2] - E[z]^2 cancellation, one pass over memory.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace cpu {
namespace {

constexpr int64_t kBlockRows = 32;

// z, grad_y, y, grad_z as (D, B, C) with C contiguous: element (d, b, c) at data + d * tower + b * row + c.
template <typename T>
struct Slices {
  T* data;
  int64_t tower, row;
  HAMUR_INLINE T* at(int64_t d, int64_t b) const { return data + d * tower + b * row; }
};

template <typename T>
Slices<T> slices(const Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1)};
}

// The one expression of the pre-activation, shared by forward (y) and backward (the ReLU mask).
template <typename T>
HAMUR_INLINE T pre_activation(T z, T scale, T shift) {
  return z * scale + shift;
}

// grad_y where the pre-activation is > 0, else 0; grad_y read unconditionally, so that the select vectorises
// (a conditional load is control flow the vectoriser may give up on).
template <typename T>
HAMUR_INLINE T relu_grad(T grad_y, T pre) {
  return pre > T(0) ? grad_y : T(0);
}

void check_main_input(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", arg, " must be a dense (strided) tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": this kernel runs on CPU tensors, got ", arg, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", arg,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, op, ": ", arg, " must be 3-D (D, B, C), got shape ", t.sizes());
}

// (D, C) tables in z's dtype, on its device, contiguous: the kernels index them flat.
void check_tables(const char* op, const Tensor& z, std::initializer_list<std::pair<const char*, const Tensor*>> tables) {
  const checks::Op check{op, z};
  for (const auto& [arg, t] : tables) {
    checks::check_float(check, arg, *t, {z.size(0), z.size(2)});
    TORCH_CHECK(t->is_contiguous(), op, ": ", arg, " must be contiguous");
  }
}

// One chunk's per-column (mean, M2) of every tower over rows [first, end), into acc_mean / acc_m2 (D * C, zeroed);
// block_mean, block_m2: scratch (C).
template <typename T>
HAMUR_ROW_PASS void chunk_moments(const Slices<const T>& z, int64_t towers, int64_t width, int64_t first, int64_t end,
                                  double* acc_mean_p, double* acc_m2_p, double* __restrict block_mean,
                                  double* __restrict block_m2) {
  for (int64_t d = 0; d < towers; ++d) {
    double* __restrict acc_mean = acc_mean_p + d * width;
    double* __restrict acc_m2 = acc_m2_p + d * width;
    for (int64_t start = first; start < end; start += kBlockRows) {
      const int64_t stop = std::min(end, start + kBlockRows), rows = stop - start, seen = start - first;
      std::fill(block_mean, block_mean + width, 0.0);
      std::fill(block_m2, block_m2 + width, 0.0);
      for (int64_t b = start; b < stop; ++b) {
        const T* __restrict row = z.at(d, b);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) block_mean[j] += row[j];
      }
      const double inv_rows = 1.0 / rows;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) block_mean[j] *= inv_rows;
      for (int64_t b = start; b < stop; ++b) {
        const T* __restrict row = z.at(d, b);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const double centred = row[j] - block_mean[j];
          block_m2[j] += centred * centred;
        }
      }
      // Chan's merge of the rows seen so far (acc) and this block
      const double total = static_cast<double>(seen + rows), block_share = rows / total,
                   cross = static_cast<double>(seen) * rows / total;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const double delta = block_mean[j] - acc_mean[j];
        acc_mean[j] += delta * block_share;
        acc_m2[j] += block_m2[j] + delta * delta * cross;
      }
    }
  }
}

// Each tower's per-column (mean, M2) over the B rows, in double, (D * C) each: per chunk, merged in chunk order.
template <typename T>
void column_moments(const Slices<const T>& z, int64_t towers, int64_t batch, int64_t width, std::vector<double>& mean,
                    std::vector<double>& m2) {
  const int64_t chunks = num_chunks(batch), n = towers * width;
  std::vector<double> chunk_mean(chunks * n, 0.0), chunk_m2(chunks * n, 0.0), scratch(chunks * 2 * width);
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    chunk_moments<T>(z, towers, width, first, end, chunk_mean.data() + c * n, chunk_m2.data() + c * n,
                     scratch.data() + c * 2 * width, scratch.data() + c * 2 * width + width);
  });
  mean.assign(chunk_mean.begin(), chunk_mean.begin() + n);
  m2.assign(chunk_m2.begin(), chunk_m2.begin() + n);
  for (int64_t c = 1; c < chunks; ++c) {
    const double seen = static_cast<double>(batch * c / chunks);
    const double rows = static_cast<double>(batch * (c + 1) / chunks) - seen, total = seen + rows;
    for (int64_t i = 0; i < n; ++i) {
      const double delta = chunk_mean[c * n + i] - mean[i];
      mean[i] += delta * rows / total;
      m2[i] += chunk_m2[c * n + i] + delta * delta * seen * rows / total;
    }
  }
}

// scale = weight * rstd, shift = bias - mean * scale, from the tensors the backward gets back (so both passes
// recompute the same pre-activation bit for bit).
template <typename T>
void scale_shift(const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& rstd,
                 std::vector<T>& scale, std::vector<T>& shift) {
  const int64_t n = weight.numel();
  const T *w = weight.data_ptr<T>(), *b = bias.data_ptr<T>(), *m = mean.data_ptr<T>(), *r = rstd.data_ptr<T>();
  scale.resize(n);
  shift.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    scale[i] = w[i] * r[i];
    shift[i] = b[i] - m[i] * scale[i];
  }
}

// y = relu(z * scale + shift) on rows [first, end).
template <typename T>
HAMUR_ROW_PASS void normalise_relu_rows(const Slices<const T>& z, const Slices<T>& y, int64_t towers, int64_t width,
                                        const T* scale_p, const T* shift_p, int64_t first, int64_t end) {
  for (int64_t b = first; b < end; ++b)
    for (int64_t d = 0; d < towers; ++d) {
      const T* __restrict row = z.at(d, b);
      const T* __restrict scale = scale_p + d * width;
      const T* __restrict shift = shift_p + d * width;
      T* __restrict out = y.at(d, b);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T pre = pre_activation(row[j], scale[j], shift[j]);
        out[j] = pre > T(0) ? pre : T(0);
      }
    }
}

// Per (d, c), on rows [first, end): the sums of a and of a * xhat, a = grad_y where the pre-activation is > 0,
// into acc_a / acc_a_xhat (D * C, zeroed). Blocks of kBlockRows rows are summed in T (inner loops of one type
// vectorise fully), then added to the double accumulators; block_a, block_a_xhat: scratch (C).
template <typename T>
HAMUR_ROW_PASS void masked_grad_sums_rows(const Slices<const T>& gy, const Slices<const T>& z, int64_t towers,
                                          int64_t width, const T* scale_p, const T* shift_p, const T* mean_p,
                                          const T* rstd_p, int64_t first, int64_t end, double* acc_a_p,
                                          double* acc_a_xhat_p, T* __restrict block_a, T* __restrict block_a_xhat) {
  for (int64_t d = 0; d < towers; ++d) {
    const int64_t offset = d * width;
    double* __restrict acc_a = acc_a_p + offset;
    double* __restrict acc_a_xhat = acc_a_xhat_p + offset;
    const T* __restrict scale = scale_p + offset;
    const T* __restrict shift = shift_p + offset;
    const T* __restrict mean = mean_p + offset;
    const T* __restrict rstd = rstd_p + offset;
    for (int64_t start = first; start < end; start += kBlockRows) {
      const int64_t stop = std::min(end, start + kBlockRows);
      std::fill(block_a, block_a + width, T(0));
      std::fill(block_a_xhat, block_a_xhat + width, T(0));
      for (int64_t b = start; b < stop; ++b) {
        const T* __restrict row_gy = gy.at(d, b);
        const T* __restrict row_z = z.at(d, b);
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const T a = relu_grad(row_gy[j], pre_activation(row_z[j], scale[j], shift[j]));
          block_a[j] += a;
          block_a_xhat[j] += a * ((row_z[j] - mean[j]) * rstd[j]);
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        acc_a[j] += block_a[j];
        acc_a_xhat[j] += block_a_xhat[j];
      }
    }
  }
}

// grad_z = gain * (a - mean_a - xhat * xhat_coef) on rows [first, end), gain = weight * rstd = scale, a = grad_y
// where the pre-activation is > 0 (with running statistics mean_a and xhat_coef are 0: grad_z = gain * a).
template <typename T>
HAMUR_ROW_PASS void masked_input_grad_rows(const Slices<const T>& gy, const Slices<const T>& z, const Slices<T>& gz,
                                           int64_t towers, int64_t width, const T* scale_p, const T* shift_p,
                                           const T* mean_p, const T* rstd_p, const T* mean_a_p,
                                           const T* xhat_coef_p, int64_t first, int64_t end) {
  for (int64_t b = first; b < end; ++b)
    for (int64_t d = 0; d < towers; ++d) {
      const int64_t offset = d * width;
      const T* __restrict scale = scale_p + offset;
      const T* __restrict shift = shift_p + offset;
      const T* __restrict mean = mean_p + offset;
      const T* __restrict rstd = rstd_p + offset;
      const T* __restrict mean_a = mean_a_p + offset;
      const T* __restrict xhat_coef = xhat_coef_p + offset;
      const T* __restrict row_gy = gy.at(d, b);
      const T* __restrict row_z = z.at(d, b);
      T* __restrict out = gz.at(d, b);
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T a = relu_grad(row_gy[j], pre_activation(row_z[j], scale[j], shift[j]));
        const T xhat = (row_z[j] - mean[j]) * rstd[j];
        out[j] = scale[j] * (a - mean_a[j] - xhat * xhat_coef[j]);
      }
    }
}

// (y, mean, rstd); training: batch statistics (B >= 2), the running statistics updated in place as BatchNorm1d's.
std::tuple<Tensor, Tensor, Tensor> tower_norm_relu_forward_cpu(const Tensor& z_in, const Tensor& weight,
                                                              const Tensor& bias, Tensor& running_mean,
                                                              Tensor& running_var, bool training, double momentum,
                                                              double eps) {
  constexpr const char* op = "compiled_tower_norm_relu_forward";
  check_main_input(op, "z", z_in);
  check_tables(op, z_in, {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean},
                          {"running_var", &running_var}});
  const int64_t towers = z_in.size(0), batch = z_in.size(1), width = z_in.size(2);
  TORCH_CHECK(!training || batch >= 2, op, ": training needs at least 2 rows per tower, got ", batch);
  const Tensor z = z_in.stride(2) == 1 ? z_in : z_in.contiguous();
  // y as (D, B, C) over a (B, D, C) tensor: the towers of a row side by side, the released cell's layout
  const Tensor y = at::empty({batch, towers, width}, z.options()).permute({1, 0, 2});
  Tensor mean = at::empty({towers, width}, z.options()), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), op, [&] {
    using T = scalar_t;
    const int64_t n = towers * width;
    T *mean_p = mean.data_ptr<T>(), *rstd_p = rstd.data_ptr<T>();
    T *running_mean_p = running_mean.data_ptr<T>(), *running_var_p = running_var.data_ptr<T>();
    if (training) {
      std::vector<double> moments_mean, moments_m2;
      column_moments<T>(slices<const T>(z), towers, batch, width, moments_mean, moments_m2);
      for (int64_t i = 0; i < n; ++i) {  // ATen's batch_norm_cpu_update_stats_template, in double
        mean_p[i] = static_cast<T>(moments_mean[i]);
        rstd_p[i] = static_cast<T>(1.0 / std::sqrt(moments_m2[i] / batch + eps));
        running_mean_p[i] = static_cast<T>(momentum * moments_mean[i] + (1 - momentum) * running_mean_p[i]);
        running_var_p[i] =
            static_cast<T>(momentum * moments_m2[i] / (batch - 1) + (1 - momentum) * running_var_p[i]);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        mean_p[i] = running_mean_p[i];
        rstd_p[i] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(running_var_p[i]) + eps));
      }
    }
    std::vector<T> scale, shift;
    scale_shift<T>(weight, bias, mean, rstd, scale, shift);
    const Slices<const T> z_rows = slices<const T>(z);
    const Slices<T> y_rows = slices<T>(y);
    at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      normalise_relu_rows<T>(z_rows, y_rows, towers, width, scale.data(), shift.data(), first, end);
    });
  });
  return {y, mean, rstd};
}

// (grad_z, grad_weight, grad_bias) from grad_y and what forward saved (z, mean, rstd); training: with the batch
// statistics' own gradient terms (biased variance), else running statistics (constants).
std::tuple<Tensor, Tensor, Tensor> tower_norm_relu_backward_cpu(const Tensor& grad_y_in, const Tensor& z_in,
                                                               const Tensor& weight, const Tensor& bias,
                                                               const Tensor& mean, const Tensor& rstd,
                                                               bool training) {
  constexpr const char* op = "compiled_tower_norm_relu_backward";
  check_main_input(op, "z", z_in);
  check_main_input(op, "grad_y", grad_y_in);
  checks::check_float({op, z_in}, "grad_y", grad_y_in, z_in.sizes());
  check_tables(op, z_in, {{"weight", &weight}, {"bias", &bias}, {"mean", &mean}, {"rstd", &rstd}});
  const int64_t towers = z_in.size(0), batch = z_in.size(1), width = z_in.size(2);
  const Tensor z = z_in.stride(2) == 1 ? z_in : z_in.contiguous();
  const Tensor gy = grad_y_in.stride(2) == 1 ? grad_y_in : grad_y_in.contiguous();
  Tensor grad_z = at::empty_like(z);
  if (grad_z.stride(2) != 1) grad_z = at::empty(z.sizes(), z.options());
  Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), op, [&] {
    using T = scalar_t;
    const int64_t n = towers * width;
    std::vector<T> scale, shift;
    scale_shift<T>(weight, bias, mean, rstd, scale, shift);
    const T *mean_p = mean.data_ptr<T>(), *rstd_p = rstd.data_ptr<T>();
    const Slices<const T> gy_rows = slices<const T>(gy), z_rows = slices<const T>(z);
    const int64_t chunks = num_chunks(batch);
    std::vector<double> partial(chunks * 2 * n, 0.0);  // per chunk: sum(a), sum(a * xhat)
    std::vector<T> scratch(chunks * 2 * width);
    parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
      double* acc = partial.data() + c * 2 * n;
      T* block = scratch.data() + c * 2 * width;
      masked_grad_sums_rows<T>(gy_rows, z_rows, towers, width, scale.data(), shift.data(), mean_p, rstd_p, first,
                               end, acc, acc + n, block, block + width);
    });
    std::vector<double> sum_a(n, 0.0), sum_a_xhat(n, 0.0);
    for (int64_t c = 0; c < chunks; ++c)  // chunk order: deterministic
      for (int64_t i = 0; i < n; ++i) {
        sum_a[i] += partial[c * 2 * n + i];
        sum_a_xhat[i] += partial[c * 2 * n + n + i];
      }
    std::vector<T> mean_a(n, T(0)), xhat_coef(n, T(0));
    T *grad_weight_p = grad_weight.data_ptr<T>(), *grad_bias_p = grad_bias.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      grad_bias_p[i] = static_cast<T>(sum_a[i]);
      grad_weight_p[i] = static_cast<T>(sum_a_xhat[i]);
      if (training && batch > 0) {
        mean_a[i] = static_cast<T>(sum_a[i] / batch);
        xhat_coef[i] = static_cast<T>(sum_a_xhat[i] / batch);
      }
    }
    const Slices<T> gz_rows = slices<T>(grad_z);
    at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      masked_input_grad_rows<T>(gy_rows, z_rows, gz_rows, towers, width, scale.data(), shift.data(), mean_p, rstd_p,
                                mean_a.data(), xhat_coef.data(), first, end);
    });
  });
  return {grad_z, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_tower_norm_relu_forward", &tower_norm_relu_forward_cpu);
  m.impl("compiled_tower_norm_relu_backward", &tower_norm_relu_backward_cpu);
}

}  // namespace cpu
}  // namespace hamur_fast
