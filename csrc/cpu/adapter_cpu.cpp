// CPU kernels of the HAMUR adapter cell and DomainNorm (SPEC sections 2, 3 and 6, level 1), float32 and
// float64. Schemas and conventions: csrc/cpu/ops.cpp.
//
// Every per-row product goes right-to-left through the rank-k space, so a row costs O(hk + k^2 + ks) and
// no (B, h, s) tensor exists. A row's representation matrix I_b (k*k contiguous values) is read from memory
// once per pass: forward uses it for both projections while it sits in L1, backward for both gradient
// terms and for writing grad_rep. Rows are split into at most one contiguous chunk per thread; reductions
// (statistics, parameter gradients) accumulate per chunk and are summed in chunk order, so results do not
// depend on thread scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace hamur_fast {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------ vector primitives
// Short, contiguous, restrict-qualified loops the compiler turns into SIMD (omp simd lets it reorder the
// reductions in dot).

template <typename T>
inline void axpy(T* __restrict out, T alpha, const T* __restrict v, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += alpha * v[j];
}

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// out (n) = v (m) . M (m, n): m axpys along M's contiguous rows.
template <typename T>
inline void vec_mat(T* __restrict out, const T* __restrict v, const T* __restrict M, int64_t m, int64_t n) {
  std::fill(out, out + n, T(0));
  for (int64_t i = 0; i < m; ++i) axpy(out, v[i], M + i * n, n);
}

// out (m) = M (m, n) . v (n): m dot products along M's contiguous rows.
template <typename T>
inline void mat_vec(T* __restrict out, const T* __restrict M, const T* __restrict v, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) out[i] = dot(M + i * n, v, n);
}

// acc (m, n) += outer(v (m), w (n)).
template <typename T>
inline void add_outer(T* __restrict acc, const T* __restrict v, const T* __restrict w, int64_t m, int64_t n) {
  for (int64_t i = 0; i < m; ++i) axpy(acc + i * n, v[i], w, n);
}

// out (m, m) = outer(v1, w1) + outer(v2, w2), written once.
template <typename T>
inline void write_two_outers(T* __restrict out, const T* __restrict v1, const T* __restrict w1,
                             const T* __restrict v2, const T* __restrict w2, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    T* __restrict row = out + i * m;
    const T a = v1[i], b = v2[i];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) row[j] = a * w1[j] + b * w2[j];
  }
}

// y = x + o * scale + shift (n).
template <typename T>
inline void residual_affine_row(const T* __restrict x, const T* __restrict o, const T* __restrict scale,
                                const T* __restrict shift, int64_t n, T* __restrict y) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] + o[j] * scale[j] + shift[j];
}

// ------------------------------------------------------------------------------------ row chunks
// Below this many rows per thread the fork/join costs more than the rows.
constexpr int64_t kMinRowsPerChunk = 32;

int64_t num_chunks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinRowsPerChunk));
}

// fn(chunk, first_row, end_row) for each of `chunks` contiguous, balanced row ranges, in parallel.
template <typename F>
void parallel_chunks(int64_t rows, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) fn(c, rows * c / chunks, rows * (c + 1) / chunks);
  });
}

// ------------------------------------------------------------------------------------ shapes
// Row b uses parameter slice / statistics group `group(b)`: its domain in paper mode, 0 in released mode
// (one shared parameter set, one whole-batch statistics group).
struct Rows {
  const int64_t* domain;
  bool per_domain;
  int64_t group(int64_t b) const { return per_domain ? domain[b] : 0; }
};

struct CellShape {
  int64_t batch, width, rank, bottleneck, groups;
  int64_t hidden_stride() const { return 4 * rank + bottleneck; }
};

template <typename T>
struct Factors {
  const T *down_left, *down_right, *down_bias, *up_left, *up_right, *up_bias;
};

CellShape cell_shape(const Tensor& x, const Tensor& rep, const Tensor& down_right, bool per_domain,
                     const Tensor& norm_weight) {
  return {x.size(0), x.size(1), rep.size(1), down_right.size(-1), per_domain ? norm_weight.size(0) : 1};
}

std::vector<int64_t> count_rows(const Rows& rows, int64_t batch, int64_t groups) {
  std::vector<int64_t> count(groups, 0);
  for (int64_t b = 0; b < batch; ++b) ++count[rows.group(b)];
  return count;
}

// ------------------------------------------------------------------------------------ forward
// One row of the cell before normalisation; fills hidden = [u | p | q | r | a] and o.
template <typename T>
inline void project_row(const CellShape& shape, const Factors<T>& f, int64_t d, const T* __restrict x,
                        const T* __restrict rep, T* __restrict hidden, T* __restrict o) {
  const int64_t h = shape.width, k = shape.rank, s = shape.bottleneck;
  T* u = hidden;
  T* p = u + k;
  T* q = p + k;
  T* r = q + k;
  T* a = r + k;
  vec_mat(u, x, f.down_left + d * h * k, h, k);
  vec_mat(p, u, rep, k, k);
  vec_mat(a, p, f.down_right + d * k * s, k, s);
  const T* down_bias = f.down_bias + d * s;
  for (int64_t j = 0; j < s; ++j) a[j] = T(1) / (T(1) + std::exp(-(a[j] + down_bias[j])));
  vec_mat(q, a, f.up_left + d * s * k, s, k);
  vec_mat(r, q, rep, k, k);
  vec_mat(o, r, f.up_right + d * k * h, k, h);
  axpy(o, T(1), f.up_bias + d * h, h);
}

// Per-group mean and normalising variance of o's rows: two passes over o (no E[o^2] - E[o]^2
// cancellation), accumulated in double per chunk. Empty groups get mean 0, var 0.
template <typename T>
void batch_statistics(const T* o, const Rows& rows, int64_t batch, int64_t width, int64_t groups,
                      const std::vector<int64_t>& count, T* mean, T* var) {
  const int64_t chunks = num_chunks(batch), n = groups * width;
  std::vector<double> partial(chunks * n, 0.0), mean_acc(n, 0.0), sq_acc(n, 0.0);
  auto reduce_partials = [&](std::vector<double>& total) {
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t j = 0; j < n; ++j) total[j] += partial[c * n + j];
    std::fill(partial.begin(), partial.end(), 0.0);
  };
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    double* acc = partial.data() + c * n;
    for (int64_t b = first; b < end; ++b) {
      double* __restrict row_acc = acc + rows.group(b) * width;
      const T* __restrict row = o + b * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) row_acc[j] += row[j];
    }
  });
  reduce_partials(mean_acc);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < width; ++j) mean_acc[g * width + j] /= std::max<int64_t>(count[g], 1);
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    double* acc = partial.data() + c * n;
    for (int64_t b = first; b < end; ++b) {
      const int64_t g = rows.group(b);
      double* __restrict row_acc = acc + g * width;
      const double* __restrict row_mean = mean_acc.data() + g * width;
      const T* __restrict row = o + b * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const double centred = row[j] - row_mean[j];
        row_acc[j] += centred * centred;
      }
    }
  });
  reduce_partials(sq_acc);
  for (int64_t g = 0; g < groups; ++g) {
    // Paper mode normalises with the biased variance, released mode with the unbiased one (torch.var).
    const int64_t denominator = rows.per_domain ? std::max<int64_t>(count[g], 1) : std::max<int64_t>(count[g] - 1, 1);
    for (int64_t j = 0; j < width; ++j) {
      mean[g * width + j] = static_cast<T>(mean_acc[g * width + j]);
      var[g * width + j] = static_cast<T>(sq_acc[g * width + j] / denominator);
    }
  }
}

// Fills mean, rstd, var, count (per group) from the batch, or from the given statistics.
template <typename T>
void statistics(const T* o, const Rows& rows, int64_t batch, int64_t width, int64_t groups,
                const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, double eps,
                Tensor& mean, Tensor& rstd, Tensor& var, Tensor& count) {
  const std::vector<int64_t> counts = count_rows(rows, batch, groups);
  for (int64_t g = 0; g < groups; ++g) count.data_ptr<T>()[g] = static_cast<T>(counts[g]);
  if (stat_mean.has_value()) {
    mean.copy_(*stat_mean);
    var.copy_(*stat_var);
  } else {
    batch_statistics(o, rows, batch, width, groups, counts, mean.data_ptr<T>(), var.data_ptr<T>());
  }
  rstd.copy_(at::rsqrt(var + eps));
}

// out = residual + (o - mean) * weight * rstd + bias, with the row's group; residual may be null.
template <typename T>
void normalise_rows(const T* o, const T* residual, const Rows& rows, int64_t batch, int64_t width,
                    const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& rstd, T* out) {
  const Tensor scale = (weight.reshape(rstd.sizes()) * rstd).contiguous();
  const T* scale_p = scale.data_ptr<T>();
  const T* bias_p = bias.data_ptr<T>();
  const T* mean_p = mean.data_ptr<T>();
  at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
    for (int64_t b = first; b < end; ++b) {
      const int64_t offset = rows.group(b) * width;
      const T* __restrict row = o + b * width;
      const T* __restrict row_scale = scale_p + offset;
      const T* __restrict row_bias = bias_p + offset;
      const T* __restrict row_mean = mean_p + offset;
      T* __restrict row_out = out + b * width;
      if (residual != nullptr) {
        const T* __restrict row_residual = residual + b * width;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j)
          row_out[j] = row_residual[j] + (row[j] - row_mean[j]) * row_scale[j] + row_bias[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) row_out[j] = (row[j] - row_mean[j]) * row_scale[j] + row_bias[j];
      }
    }
  });
}

template <typename T>
Factors<T> factors(const Tensor& dl, const Tensor& dr, const Tensor& db, const Tensor& ul, const Tensor& ur,
                   const Tensor& ub) {
  return {dl.data_ptr<T>(), dr.data_ptr<T>(), db.data_ptr<T>(), ul.data_ptr<T>(), ur.data_ptr<T>(), ub.data_ptr<T>()};
}

void check_cpu_inputs(const Tensor& x, const Tensor& domain) {
  TORCH_CHECK(x.device().is_cpu(), "hamur_fast CPU kernel got a tensor on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hamur_fast CPU kernels take float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(domain.scalar_type() == at::kLong, "domain must be int64, got ", domain.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_forward_cpu(
    const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in, const Tensor& down_left_in,
    const Tensor& down_right_in, const Tensor& down_bias_in, const Tensor& up_left_in, const Tensor& up_right_in,
    const Tensor& up_bias_in, const Tensor& norm_weight_in, const Tensor& norm_bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain, double eps) {
  check_cpu_inputs(x_in, domain_in);
  const Tensor x = x_in.contiguous(), rep = rep_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dl = down_left_in.contiguous(), dr = down_right_in.contiguous(), db = down_bias_in.contiguous();
  const Tensor ul = up_left_in.contiguous(), ur = up_right_in.contiguous(), ub = up_bias_in.contiguous();
  const Tensor norm_weight = norm_weight_in.contiguous(), norm_bias = norm_bias_in.contiguous();
  const CellShape shape = cell_shape(x, rep, dr, per_domain, norm_weight);
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  Tensor y = at::empty_like(x), o = at::empty_like(x);
  Tensor hidden = at::empty({shape.batch, shape.hidden_stride()}, x.options());
  Tensor mean = at::empty({shape.groups, shape.width}, x.options());
  Tensor rstd = at::empty_like(mean), var = at::empty_like(mean);
  Tensor count = at::empty({shape.groups}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_forward_cpu", [&] {
    const Factors<scalar_t> f = factors<scalar_t>(dl, dr, db, ul, ur, ub);
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    const scalar_t* rep_p = rep.data_ptr<scalar_t>();
    scalar_t* o_p = o.data_ptr<scalar_t>();
    scalar_t* hidden_p = hidden.data_ptr<scalar_t>();
    const int64_t h = shape.width, kk = shape.rank * shape.rank, stride = shape.hidden_stride();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      for (int64_t b = first; b < end; ++b)
        project_row(shape, f, rows.group(b), x_p + b * h, rep_p + b * kk, hidden_p + b * stride, o_p + b * h);
    });
    statistics(o_p, rows, shape.batch, h, shape.groups, stat_mean, stat_var, eps, mean, rstd, var, count);
    normalise_rows(o_p, x_p, rows, shape.batch, h, norm_weight, norm_bias, mean, rstd, y.data_ptr<scalar_t>());
  });
  return {y, o, hidden, mean, rstd, var, count};
}

Tensor adapter_infer_cpu(const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in,
                         const Tensor& down_left_in, const Tensor& down_right_in, const Tensor& down_bias_in,
                         const Tensor& up_left_in, const Tensor& up_right_in, const Tensor& up_bias_in,
                         const Tensor& norm_weight, const Tensor& norm_bias, const Tensor& running_mean,
                         const Tensor& running_var, double eps) {
  check_cpu_inputs(x_in, domain_in);
  const Tensor x = x_in.contiguous(), rep = rep_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dl = down_left_in.contiguous(), dr = down_right_in.contiguous(), db = down_bias_in.contiguous();
  const Tensor ul = up_left_in.contiguous(), ur = up_right_in.contiguous(), ub = up_bias_in.contiguous();
  const CellShape shape = cell_shape(x, rep, dr, /*per_domain=*/true, norm_weight);
  const Rows rows{domain.data_ptr<int64_t>(), true};
  // DomainNorm with running statistics is one per-domain affine map: y = x + o * scale + shift.
  const Tensor scale = (norm_weight * at::rsqrt(running_var + eps)).contiguous();
  const Tensor shift = (norm_bias - running_mean * scale).contiguous();
  Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_infer_cpu", [&] {
    const Factors<scalar_t> f = factors<scalar_t>(dl, dr, db, ul, ur, ub);
    const scalar_t *x_p = x.data_ptr<scalar_t>(), *rep_p = rep.data_ptr<scalar_t>();
    const scalar_t *scale_p = scale.data_ptr<scalar_t>(), *shift_p = shift.data_ptr<scalar_t>();
    scalar_t* y_p = y.data_ptr<scalar_t>();
    const int64_t h = shape.width, kk = shape.rank * shape.rank;
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      std::vector<scalar_t> hidden(shape.hidden_stride()), o(h);
      for (int64_t b = first; b < end; ++b) {
        const int64_t d = rows.group(b);
        project_row(shape, f, d, x_p + b * h, rep_p + b * kk, hidden.data(), o.data());
        residual_affine_row(x_p + b * h, o.data(), scale_p + d * h, shift_p + d * h, h, y_p + b * h);
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> domain_norm_forward_cpu(
    const Tensor& o_in, const Tensor& domain_in, const Tensor& weight_in, const Tensor& bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain, double eps) {
  check_cpu_inputs(o_in, domain_in);
  const Tensor o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = per_domain ? weight.size(0) : 1;
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  Tensor y = at::empty_like(o);
  Tensor mean = at::empty({groups, width}, o.options());
  Tensor rstd = at::empty_like(mean), var = at::empty_like(mean);
  Tensor count = at::empty({groups}, o.options());
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_forward_cpu", [&] {
    const scalar_t* o_p = o.data_ptr<scalar_t>();
    statistics(o_p, rows, batch, width, groups, stat_mean, stat_var, eps, mean, rstd, var, count);
    normalise_rows<scalar_t>(o_p, nullptr, rows, batch, width, weight, bias, mean, rstd, y.data_ptr<scalar_t>());
  });
  return {y, mean, rstd, var, count};
}

// ------------------------------------------------------------------------------------ backward
// DomainNorm backward. With xhat = (o - mean) * rstd and out = weight * xhat + bias:
//   grad_bias = sum(gy), grad_weight = sum(gy * xhat) over each group's rows;
//   with batch statistics (var = sum(centred^2) / m, m = n biased or n - 1 unbiased)
//     grad_o = rstd * weight * (gy - grad_bias / n - xhat * grad_weight / m),
//   with given statistics grad_o = rstd * weight * gy.
// NormGrad holds the per-group terms so that grad_o costs a few FMAs per element.
template <typename T>
struct NormGrad {
  std::vector<T> grad_weight, grad_bias;  // (G, h)
  std::vector<T> gain, mean_term, xhat_term;  // grad_o = gain * gy - mean_term - xhat * xhat_term
  const T *mean, *rstd;

  inline void grad_o_row(int64_t g, int64_t width, const T* __restrict gy, const T* __restrict o,
                         T* __restrict out) const {
    const int64_t offset = g * width;
    const T* __restrict row_gain = gain.data() + offset;
    const T* __restrict row_mean_term = mean_term.data() + offset;
    const T* __restrict row_xhat_term = xhat_term.data() + offset;
    const T* __restrict row_mean = mean + offset;
    const T* __restrict row_rstd = rstd + offset;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const T xhat = (o[j] - row_mean[j]) * row_rstd[j];
      out[j] = row_gain[j] * gy[j] - row_mean_term[j] - xhat * row_xhat_term[j];
    }
  }
};

template <typename T>
NormGrad<T> norm_grad(const T* gy, const T* o, const Rows& rows, int64_t batch, int64_t width, int64_t groups,
                      const T* weight, const T* mean, const T* rstd, const T* count, bool batch_stats) {
  const int64_t chunks = num_chunks(batch), n = groups * width;
  std::vector<double> partial(chunks * 2 * n, 0.0);  // per chunk: sum(gy) then sum(gy * xhat)
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    double* acc = partial.data() + c * 2 * n;
    for (int64_t b = first; b < end; ++b) {
      const int64_t offset = rows.group(b) * width;
      double* __restrict sum_gy = acc + offset;
      double* __restrict sum_gy_xhat = acc + n + offset;
      const T* __restrict row_gy = gy + b * width;
      const T* __restrict row_o = o + b * width;
      const T* __restrict row_mean = mean + offset;
      const T* __restrict row_rstd = rstd + offset;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        sum_gy[j] += row_gy[j];
        sum_gy_xhat[j] += static_cast<double>(row_gy[j]) * ((row_o[j] - row_mean[j]) * row_rstd[j]);
      }
    }
  });
  NormGrad<T> out{std::vector<T>(n), std::vector<T>(n), std::vector<T>(n), std::vector<T>(n, T(0)),
                  std::vector<T>(n, T(0)), mean, rstd};
  for (int64_t g = 0; g < groups; ++g) {
    const double rows_in_group = count[g];
    const double var_denominator = rows.per_domain ? std::max(rows_in_group, 1.0) : std::max(rows_in_group - 1, 1.0);
    for (int64_t j = 0; j < width; ++j) {
      const int64_t i = g * width + j;
      double sum_gy = 0, sum_gy_xhat = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        sum_gy += partial[c * 2 * n + i];
        sum_gy_xhat += partial[c * 2 * n + n + i];
      }
      const double gain = static_cast<double>(weight[i]) * rstd[i];
      out.grad_bias[i] = static_cast<T>(sum_gy);
      out.grad_weight[i] = static_cast<T>(sum_gy_xhat);
      out.gain[i] = static_cast<T>(gain);
      if (batch_stats && rows_in_group > 0) {
        out.mean_term[i] = static_cast<T>(gain * sum_gy / rows_in_group);
        out.xhat_term[i] = static_cast<T>(gain * sum_gy_xhat / var_denominator);
      }
    }
  }
  return out;
}

template <typename T>
Tensor to_tensor(const std::vector<T>& values, at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  std::copy(values.begin(), values.end(), t.data_ptr<T>());
  return t;
}

std::tuple<Tensor, Tensor, Tensor> domain_norm_backward_cpu(const Tensor& grad_y_in, const Tensor& o_in,
                                                            const Tensor& domain_in, const Tensor& weight_in,
                                                            const Tensor& mean_in, const Tensor& rstd_in,
                                                            const Tensor& count_in, bool per_domain, bool batch_stats) {
  check_cpu_inputs(o_in, domain_in);
  const Tensor gy = grad_y_in.contiguous(), o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const Tensor count = count_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = mean.size(0);
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  Tensor grad_o = at::empty_like(o), grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_backward_cpu", [&] {
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *o_p = o.data_ptr<scalar_t>();
    const NormGrad<scalar_t> ng =
        norm_grad(gy_p, o_p, rows, batch, width, groups, weight.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                  rstd.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(), batch_stats);
    scalar_t* grad_o_p = grad_o.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      for (int64_t b = first; b < end; ++b)
        ng.grad_o_row(rows.group(b), width, gy_p + b * width, o_p + b * width, grad_o_p + b * width);
    });
    grad_weight = to_tensor(ng.grad_weight, weight.sizes(), o.options());
    grad_bias = to_tensor(ng.grad_bias, weight.sizes(), o.options());
  });
  return {grad_o, grad_weight, grad_bias};
}

// Offsets of each parameter's gradient inside one chunk's accumulator block (all G parameter sets).
struct GradLayout {
  int64_t down_left, down_right, down_bias, up_left, up_right, up_bias, total;
  GradLayout(const CellShape& s) {
    const int64_t h = s.width, k = s.rank, b = s.bottleneck, g = s.groups;
    down_left = 0;
    down_right = down_left + g * h * k;
    down_bias = down_right + g * k * b;
    up_left = down_bias + g * b;
    up_right = up_left + g * b * k;
    up_bias = up_right + g * k * h;
    total = up_bias + g * h;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in,
    const Tensor& down_left_in, const Tensor& down_right_in, const Tensor& up_left_in, const Tensor& up_right_in,
    const Tensor& norm_weight_in, const Tensor& o_in, const Tensor& hidden_in, const Tensor& mean_in,
    const Tensor& rstd_in, const Tensor& count_in, bool per_domain, bool batch_stats) {
  check_cpu_inputs(x_in, domain_in);
  const Tensor gy = grad_y_in.contiguous(), x = x_in.contiguous(), rep = rep_in.contiguous();
  const Tensor domain = domain_in.contiguous(), dl = down_left_in.contiguous(), dr = down_right_in.contiguous();
  const Tensor ul = up_left_in.contiguous(), ur = up_right_in.contiguous(), norm_weight = norm_weight_in.contiguous();
  const Tensor o = o_in.contiguous(), hidden = hidden_in.contiguous(), mean = mean_in.contiguous();
  const Tensor rstd = rstd_in.contiguous(), count = count_in.contiguous();
  const CellShape shape = cell_shape(x, rep, dr, per_domain, norm_weight);
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  const GradLayout layout(shape);
  const int64_t chunks = num_chunks(shape.batch);
  Tensor grad_x = at::empty_like(x), grad_rep = at::empty_like(rep);
  Tensor partial = at::zeros({chunks, layout.total}, x.options());
  Tensor grad_norm_weight, grad_norm_bias;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu", [&] {
    using T = scalar_t;
    const T *gy_p = gy.data_ptr<T>(), *x_p = x.data_ptr<T>(), *rep_p = rep.data_ptr<T>();
    const T *dl_p = dl.data_ptr<T>(), *dr_p = dr.data_ptr<T>(), *ul_p = ul.data_ptr<T>(), *ur_p = ur.data_ptr<T>();
    const T *o_p = o.data_ptr<T>(), *hidden_p = hidden.data_ptr<T>();
    T *grad_x_p = grad_x.data_ptr<T>(), *grad_rep_p = grad_rep.data_ptr<T>();
    const NormGrad<T> ng = norm_grad(gy_p, o_p, rows, shape.batch, shape.width, shape.groups,
                                     norm_weight.data_ptr<T>(), mean.data_ptr<T>(), rstd.data_ptr<T>(),
                                     count.data_ptr<T>(), batch_stats);
    const int64_t h = shape.width, k = shape.rank, s = shape.bottleneck, kk = k * k;
    const int64_t stride = shape.hidden_stride();
    parallel_chunks(shape.batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
      T* acc = partial.data_ptr<T>() + c * layout.total;
      std::vector<T> scratch(h + 4 * k + s);
      T* grad_o = scratch.data();
      T* grad_r = grad_o + h;
      T* grad_q = grad_r + k;
      T* grad_p = grad_q + k;
      T* grad_u = grad_p + k;
      T* grad_z = grad_u + k;
      for (int64_t b = first; b < end; ++b) {
        const int64_t d = rows.group(b);
        const T* row_x = x_p + b * h;
        const T* row_rep = rep_p + b * kk;
        const T* u = hidden_p + b * stride;
        const T* p = u + k;
        const T* q = p + k;
        const T* r = q + k;
        const T* a = r + k;
        ng.grad_o_row(d, h, gy_p + b * h, o_p + b * h, grad_o);
        // o = r . up_right + up_bias
        axpy(acc + layout.up_bias + d * h, T(1), grad_o, h);
        add_outer(acc + layout.up_right + d * k * h, r, grad_o, k, h);
        mat_vec(grad_r, ur_p + d * k * h, grad_o, k, h);
        // r = q . I
        mat_vec(grad_q, row_rep, grad_r, k, k);
        // q = a . up_left; a = sigmoid(z), z = p . down_right + down_bias
        add_outer(acc + layout.up_left + d * s * k, a, grad_q, s, k);
        mat_vec(grad_z, ul_p + d * s * k, grad_q, s, k);
        for (int64_t j = 0; j < s; ++j) grad_z[j] *= a[j] * (T(1) - a[j]);
        axpy(acc + layout.down_bias + d * s, T(1), grad_z, s);
        add_outer(acc + layout.down_right + d * k * s, p, grad_z, k, s);
        mat_vec(grad_p, dr_p + d * k * s, grad_z, k, s);
        // p = u . I, and both uses of I_b meet in one write of grad_rep
        mat_vec(grad_u, row_rep, grad_p, k, k);
        write_two_outers(grad_rep_p + b * kk, u, grad_p, q, grad_r, k);
        // u = x . down_left; y = x + DomainNorm(o)
        add_outer(acc + layout.down_left + d * h * k, row_x, grad_u, h, k);
        T* row_grad_x = grad_x_p + b * h;
        mat_vec(row_grad_x, dl_p + d * h * k, grad_u, h, k);
        axpy(row_grad_x, T(1), gy_p + b * h, h);
      }
    });
    grad_norm_weight = to_tensor(ng.grad_weight, norm_weight.sizes(), x.options());
    grad_norm_bias = to_tensor(ng.grad_bias, norm_weight.sizes(), x.options());
  });
  const Tensor total = partial.sum(0);
  auto grad_of = [&](int64_t offset, at::IntArrayRef sizes) {
    return total.narrow(0, offset, c10::multiply_integers(sizes)).view(sizes).clone();
  };
  // Bias gradients take the parameters' shapes: (D, s) and (D, h) in paper mode, (s,) and (h,) released.
  const std::vector<int64_t> down_bias_sizes = per_domain ? std::vector<int64_t>{shape.groups, shape.bottleneck}
                                                          : std::vector<int64_t>{shape.bottleneck};
  return {grad_x, grad_rep, grad_of(layout.down_left, dl.sizes()), grad_of(layout.down_right, dr.sizes()),
          grad_of(layout.down_bias, down_bias_sizes), grad_of(layout.up_left, ul.sizes()),
          grad_of(layout.up_right, ur.sizes()), grad_of(layout.up_bias, norm_weight.sizes()),
          grad_norm_weight, grad_norm_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("adapter_forward", &adapter_forward_cpu);
  m.impl("adapter_backward", &adapter_backward_cpu);
  m.impl("adapter_infer", &adapter_infer_cpu);
  m.impl("domain_norm_forward", &domain_norm_forward_cpu);
  m.impl("domain_norm_backward", &domain_norm_backward_cpu);
}

}  // namespace hamur_fast
