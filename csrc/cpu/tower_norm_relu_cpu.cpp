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
// scheduling. The two reductions (statistics; backward's column sums) walk a strip of up to 64 columns down blocks of
// kBlockRows rows, the strip's sums in registers and summed in T within a block, then added in double. The
// statistics are a two-pass mean and M2 per block (the block in L1) merged by Chan's formula: no E[z^2] - E[z]^2
// cancellation, one pass over memory.
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
template <typename V>
HAMUR_INLINE V pre_activation(V z, V scale, V shift) {
  return z * scale + shift;
}

// The reductions walk a strip of columns at a time down a block of rows, the strip's sums and the tables' values
// held in registers: kVectors values of V, a Vec512<T> (cpu_primitives.h), or T itself for the last columns.
template <typename V, typename T>
HAMUR_INLINE V load_as(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// 0 where pre <= 0, else value, lane by lane (also for V = T): the ReLU (value = pre) and its gradient mask
// (value = grad_y), with ATen's NaN rules (relu(NaN) = NaN; threshold_backward passes grad_y where pre is NaN).
// value comes in loaded, so that the select vectorises (a conditional load is control flow the vectoriser may
// give up on).
template <typename V>
HAMUR_INLINE V relu_select(V pre, V value) {
  const V zero{};
  return pre <= zero ? zero : value;
}

// Columns [col, col + kVectors * lanes) of tower d over rows [first, end): blocks of kBlockRows rows, a two-pass
// mean and M2 per block in T (the block in L1), merged into acc_mean / acc_m2 (the chunk's, double) by Chan's rule.
template <typename T, typename V, int kVectors>
HAMUR_INLINE void moments_strip(const Slices<const T>& z, int64_t d, int64_t first, int64_t end, int64_t col,
                                double* __restrict acc_mean, double* __restrict acc_m2) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  for (int64_t start = first; start < end; start += kBlockRows) {
    const int64_t stop = std::min(end, start + kBlockRows), rows = stop - start, seen = start - first;
    V block_mean[kVectors] = {}, block_m2[kVectors] = {};
    for (int64_t b = start; b < stop; ++b)
      for (int t = 0; t < kVectors; ++t) block_mean[t] += load_as<V>(z.at(d, b) + col + t * kLanes);
    const T inv_rows = T(1) / static_cast<T>(rows);
    for (int t = 0; t < kVectors; ++t) block_mean[t] *= inv_rows;
    for (int64_t b = start; b < stop; ++b)
      for (int t = 0; t < kVectors; ++t) {
        const V centred = load_as<V>(z.at(d, b) + col + t * kLanes) - block_mean[t];
        block_m2[t] += centred * centred;
      }
    T means[kVectors * kLanes], m2s[kVectors * kLanes];
    __builtin_memcpy(means, block_mean, sizeof(means));
    __builtin_memcpy(m2s, block_m2, sizeof(m2s));
    const double total = static_cast<double>(seen + rows), block_share = rows / total,
                 cross = static_cast<double>(seen) * rows / total;
    for (int64_t j = 0; j < kVectors * kLanes; ++j) {
      const double delta = means[j] - acc_mean[col + j];
      acc_mean[col + j] += delta * block_share;
      acc_m2[col + j] += m2s[j] + delta * delta * cross;
    }
  }
}

// One chunk's per-column (mean, M2) of every tower over rows [first, end), into acc_mean / acc_m2 (D * C, zeroed).
template <typename T>
HAMUR_ROW_PASS void chunk_moments(const Slices<const T>& z, int64_t towers, int64_t width, int64_t first, int64_t end,
                                  double* acc_mean, double* acc_m2) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  for (int64_t d = 0; d < towers; ++d) {
    double* tower_mean = acc_mean + d * width;
    double* tower_m2 = acc_m2 + d * width;
    int64_t col = 0;
    for (; col + 4 * kLanes <= width; col += 4 * kLanes)
      moments_strip<T, Vec512<T>, 4>(z, d, first, end, col, tower_mean, tower_m2);
    for (; col + kLanes <= width; col += kLanes)
      moments_strip<T, Vec512<T>, 1>(z, d, first, end, col, tower_mean, tower_m2);
    for (; col < width; ++col) moments_strip<T, T, 1>(z, d, first, end, col, tower_mean, tower_m2);
  }
}

// Each tower's per-column (mean, M2) over the B rows, in double, (D * C) each: per chunk, merged in chunk order.
template <typename T>
void column_moments(const Slices<const T>& z, int64_t towers, int64_t batch, int64_t width, std::vector<double>& mean,
                    std::vector<double>& m2) {
  const int64_t chunks = num_chunks(batch), n = towers * width;
  std::vector<double> chunk_mean(chunks * n, 0.0), chunk_m2(chunks * n, 0.0);
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    chunk_moments<T>(z, towers, width, first, end, chunk_mean.data() + c * n, chunk_m2.data() + c * n);
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
        out[j] = relu_select(pre, pre);
      }
    }
}

// Columns [col, col + kVectors * lanes) of tower d over rows [first, end): the sums of a and of a * xhat,
// a = grad_y where the pre-activation is > 0, in T over blocks of kBlockRows rows, then added to acc_a /
// acc_a_xhat (the chunk's, double).
template <typename T, typename V, int kVectors>
HAMUR_INLINE void grad_sums_strip(const Slices<const T>& gy, const Slices<const T>& z, int64_t d, int64_t first,
                                  int64_t end, int64_t col, const T* scale_p, const T* shift_p, const T* mean_p,
                                  const T* rstd_p, double* __restrict acc_a, double* __restrict acc_a_xhat) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(T);
  V scale[kVectors], shift[kVectors], mean[kVectors], rstd[kVectors];
  for (int t = 0; t < kVectors; ++t) {
    scale[t] = load_as<V>(scale_p + col + t * kLanes);
    shift[t] = load_as<V>(shift_p + col + t * kLanes);
    mean[t] = load_as<V>(mean_p + col + t * kLanes);
    rstd[t] = load_as<V>(rstd_p + col + t * kLanes);
  }
  for (int64_t start = first; start < end; start += kBlockRows) {
    const int64_t stop = std::min(end, start + kBlockRows);
    V sum_a[kVectors] = {}, sum_a_xhat[kVectors] = {};
    for (int64_t b = start; b < stop; ++b)
      for (int t = 0; t < kVectors; ++t) {
        const V z_v = load_as<V>(z.at(d, b) + col + t * kLanes);
        const V gy_v = load_as<V>(gy.at(d, b) + col + t * kLanes);
        const V a = relu_select(pre_activation(z_v, scale[t], shift[t]), gy_v);
        sum_a[t] += a;
        sum_a_xhat[t] += a * ((z_v - mean[t]) * rstd[t]);
      }
    T sums[kVectors * kLanes], sums_xhat[kVectors * kLanes];
    __builtin_memcpy(sums, sum_a, sizeof(sums));
    __builtin_memcpy(sums_xhat, sum_a_xhat, sizeof(sums_xhat));
    for (int64_t j = 0; j < kVectors * kLanes; ++j) {
      acc_a[col + j] += sums[j];
      acc_a_xhat[col + j] += sums_xhat[j];
    }
  }
}

// Per (d, c), on rows [first, end): the sums of a and of a * xhat into acc_a / acc_a_xhat (D * C, zeroed).
template <typename T>
HAMUR_ROW_PASS void masked_grad_sums_rows(const Slices<const T>& gy, const Slices<const T>& z, int64_t towers,
                                          int64_t width, const T* scale, const T* shift, const T* mean,
                                          const T* rstd, int64_t first, int64_t end, double* acc_a,
                                          double* acc_a_xhat) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  for (int64_t d = 0; d < towers; ++d) {
    const int64_t o = d * width;
    int64_t col = 0;
    for (; col + 4 * kLanes <= width; col += 4 * kLanes)
      grad_sums_strip<T, Vec512<T>, 4>(gy, z, d, first, end, col, scale + o, shift + o, mean + o, rstd + o,
                                       acc_a + o, acc_a_xhat + o);
    for (; col + kLanes <= width; col += kLanes)
      grad_sums_strip<T, Vec512<T>, 1>(gy, z, d, first, end, col, scale + o, shift + o, mean + o, rstd + o,
                                       acc_a + o, acc_a_xhat + o);
    for (; col < width; ++col)
      grad_sums_strip<T, T, 1>(gy, z, d, first, end, col, scale + o, shift + o, mean + o, rstd + o, acc_a + o,
                               acc_a_xhat + o);
  }
}

// grad_z = gain * (a - mean_a - xhat * xhat_coef) on rows [first, end), gain = weight * rstd = scale, a = grad_y
// where the pre-activation is > 0; with running statistics (kBatchStatistics false) grad_z = gain * a, xhat not
// formed (so a NaN in z does not reach grad_z there, as in ATen).
template <typename T, bool kBatchStatistics>
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
        const T a = relu_select(pre_activation(row_z[j], scale[j], shift[j]), row_gy[j]);
        if constexpr (kBatchStatistics) {
          const T xhat = (row_z[j] - mean[j]) * rstd[j];
          out[j] = scale[j] * (a - mean_a[j] - xhat * xhat_coef[j]);
        } else {
          out[j] = scale[j] * a;
        }
      }
    }
}

// (y, mean, rstd); training: batch statistics (B >= 2), the running statistics updated in place as BatchNorm1d's.
std::tuple<Tensor, Tensor, Tensor> tower_norm_relu_forward_cpu(const Tensor& z_in, const Tensor& weight,
                                                              const Tensor& bias, Tensor& running_mean,
                                                              Tensor& running_var, bool training, double momentum,
                                                              double eps) {
  constexpr const char* op = "compiled_tower_norm_relu_forward";
  checks::compiled_tower_norm_relu_forward(c10::DeviceType::CPU, z_in, weight, bias, running_mean, running_var);
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
  checks::compiled_tower_norm_relu_backward(c10::DeviceType::CPU, grad_y_in, z_in, weight, bias, mean, rstd);
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
    parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
      double* acc = partial.data() + c * 2 * n;
      masked_grad_sums_rows<T>(gy_rows, z_rows, towers, width, scale.data(), shift.data(), mean_p, rstd_p, first,
                               end, acc, acc + n);
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
      if (training) {
        masked_input_grad_rows<T, true>(gy_rows, z_rows, gz_rows, towers, width, scale.data(), shift.data(), mean_p,
                                        rstd_p, mean_a.data(), xhat_coef.data(), first, end);
      } else {
        masked_input_grad_rows<T, false>(gy_rows, z_rows, gz_rows, towers, width, scale.data(), shift.data(), mean_p,
                                         rstd_p, mean_a.data(), xhat_coef.data(), first, end);
      }
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
