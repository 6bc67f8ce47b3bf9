// Fusion level 2 on the CPU (SPEC section 6): the adapter cell's rank-k core on representation matrices
// generated where they are used, I_b = ReLU((g_b - centre) W^T + c) viewed (k, k), forward and backward, so
// that no (B, k*k) tensor exists. Names follow the contract's vocabulary (hamur_fast/ops/contract.py):
//   q = p I_b,  z = q DR[d] + db[d],  a = sigmoid(z),  u = a UL[d],  v = u I_b.
// The dense products around the core (p = x DL, o = v UR + ub) and DomainNorm run as the existing grouped
// linear op and compiled_norm_forward (hamur_fast/ops/backends/compiled_generated.py).
//
// Rows go in blocks of kBlockRows: a block's I is one GEMM ((R, p) x (p, k*k), then ReLU in place) into a
// scratch of kBlockRows * k * k elements, whatever the batch; each row of the block then runs its core while
// its I_b sits in cache. Backward regenerates the block's I, runs each row's core backward, overwrites I_b with
// the gradient of the pre-activation (dZ_b = dI_b where I_b > 0, else 0), and the block's generator gradients
// are two GEMMs on the scratch: grad_g = dZ W and grad_W += dZ^T (g - centre). Per-thread chunks accumulate
// the weight gradients and are summed in chunk order, so results do not depend on scheduling.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace {

using at::Tensor;
// cpu_primitives.h's vector loops, row core and row chunks (and its HAMUR_ROW_PASS / HAMUR_INLINE).
using cpu::axpy;
using cpu::mat_vec;
using cpu::parallel_chunks;

constexpr int64_t kBlockRows = 64;  // rows per generated block (and per thread at least): scratch (64, k*k)

// ------------------------------------------------------------------------------------ shapes
struct CoreShape {
  int64_t batch, rank, bottleneck, features, groups;  // features: p, the width of g
  bool per_domain;
  int64_t towers;  // T: p and v are (B, T*k), T towers' rows on the same I_b (the released MLP's towers)
  // saved layout, per row and tower: [q (k) | a (s) | u (k)]
  int64_t stride() const { return 2 * rank + bottleneck; }
  int64_t row_stride() const { return towers * stride(); }
  int64_t q() const { return 0; }
  int64_t a() const { return rank; }
  int64_t u() const { return rank + bottleneck; }
};

CoreShape core_shape(const Tensor& p, const Tensor& g, const Tensor& down_right, bool per_domain) {
  const int64_t rank = down_right.size(-2);
  return {p.size(0), rank, down_right.size(-1), g.size(1), per_domain ? down_right.size(0) : 1, per_domain,
          p.size(1) / rank};
}

// scratch[:end - first] = ReLU((g[first:end] - centre) W^T + c): the block's I, one row of k*k per batch row.
Tensor generate_block(const Tensor& g, const Tensor& centre, const Tensor& gen_weight, const Tensor& gen_bias,
                      Tensor& scratch, int64_t first, int64_t end) {
  Tensor block = scratch.narrow(0, 0, end - first);
  at::addmm_out(block, gen_bias, g.narrow(0, first, end - first) - centre, gen_weight.t());
  block.clamp_min_(0);
  return block;
}

// ------------------------------------------------------------------------------------ forward
// Rows [first, end) of one block, every tower on the row's I_b; rep holds the block's I, row first's at rep.
template <typename T>
HAMUR_ROW_PASS void core_forward_rows(const CoreShape& shape, const T* rep, int64_t first, int64_t end,
                                            const int64_t* domain, const T* p, const T* down_right,
                                            const T* down_bias, const T* up_left, T* saved, T* v) {
  const int64_t k = shape.rank, s = shape.bottleneck, tk = shape.towers * k;
  for (int64_t b = first; b < end; ++b) {
    const int64_t d = shape.per_domain ? domain[b] : 0;
    for (int64_t t = 0; t < shape.towers; ++t) {
      T* row_saved = saved + b * shape.row_stride() + t * shape.stride();
      cpu::rank_core_row(k, s, rep + (b - first) * k * k, down_right + d * k * s, down_bias + d * s,
                         up_left + d * s * k, p + b * tk + t * k, row_saved + shape.q(), row_saved + shape.a(),
                         row_saved + shape.u(), v + b * tk + t * k);
    }
  }
}

std::tuple<Tensor, Tensor> generated_core_forward_cpu(const Tensor& p_in, const Tensor& g_in, const Tensor& centre_in,
                                                      const Tensor& gen_weight_in, const Tensor& gen_bias_in,
                                                      const Tensor& domain_in, const Tensor& down_right_in,
                                                      const Tensor& down_bias_in, const Tensor& up_left_in,
                                                      bool per_domain) {
  checks::compiled_generated_core_forward(c10::DeviceType::CPU, p_in, g_in, centre_in, gen_weight_in, gen_bias_in,
                                          domain_in, down_right_in, down_bias_in, up_left_in, per_domain);
  const Tensor p = p_in.contiguous(), g = g_in.contiguous(), centre = centre_in.contiguous();
  const Tensor gen_weight = gen_weight_in.contiguous(), gen_bias = gen_bias_in.contiguous();
  const Tensor domain = domain_in.contiguous(), dr = down_right_in.contiguous(), ul = up_left_in.contiguous();
  const Tensor db = down_bias_in.contiguous();
  const CoreShape shape = core_shape(p, g, dr, per_domain);
  const int64_t* domain_p = domain.data_ptr<int64_t>();
  cpu::check_groups(cpu::Rows{domain_p, per_domain}, shape.batch, shape.groups);  // before any table is indexed
  const int64_t k = shape.rank;
  Tensor v = at::empty({shape.batch, shape.towers * k}, p.options());
  Tensor saved = at::empty({shape.batch, shape.row_stride()}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "generated_core_forward_cpu", [&] {
    const scalar_t *p_p = p.data_ptr<scalar_t>(), *dr_p = dr.data_ptr<scalar_t>();
    const scalar_t *db_p = db.data_ptr<scalar_t>(), *ul_p = ul.data_ptr<scalar_t>();
    scalar_t *saved_p = saved.data_ptr<scalar_t>(), *v_p = v.data_ptr<scalar_t>();
    parallel_chunks(shape.batch, cpu::num_chunks(shape.batch, kBlockRows), [&](int64_t, int64_t first, int64_t end) {
      Tensor scratch = at::empty({std::min(kBlockRows, end - first), k * k}, p.options());
      for (int64_t block_first = first; block_first < end; block_first += kBlockRows) {
        const int64_t block_end = std::min(end, block_first + kBlockRows);
        const Tensor rep = generate_block(g, centre, gen_weight, gen_bias, scratch, block_first, block_end);
        core_forward_rows(shape, rep.data_ptr<scalar_t>(), block_first, block_end, domain_p, p_p, dr_p, db_p, ul_p,
                          saved_p, v_p);
      }
    });
  });
  return {v, saved};
}

// ------------------------------------------------------------------------------------ backward
// Per-chunk accumulators of the weight gradients (summed in chunk order).
template <typename T>
struct CoreGrads {
  std::vector<T> down_right, down_bias, up_left;  // ([D,] k, s), ([D,] s), ([D,] s, k)
  Tensor gen_weight;                              // (k*k, p)
};

// One row: for each tower t, from grad_v_t forms grad_p_t and accumulates the factor gradients (I_b intact);
// then overwrites rep (I_b) with dZ_b = sum_t (p_t (x) grad_q_t + u_t (x) grad_v_t) where I_b > 0, else 0.
// work: scratch of (T + 2) k + s: [grad_u | grad_z | grad_q of each tower | one row of dZ].
template <typename T>
HAMUR_INLINE void core_backward_row(const CoreShape& shape, T* __restrict rep, const T* __restrict p, const T* __restrict saved,
                       const T* __restrict grad_v, const T* __restrict down_right, const T* __restrict up_left,
                       T* __restrict grad_dr, T* __restrict grad_db, T* __restrict grad_ul, T* __restrict work,
                       T* __restrict grad_p) {
  const int64_t k = shape.rank, s = shape.bottleneck, towers = shape.towers;
  T* grad_u = work;
  T* grad_z = work + k;
  T* grad_qs = work + k + s;
  T* dz = grad_qs + towers * k;
  for (int64_t t = 0; t < towers; ++t) {
    const T* q = saved + t * shape.stride() + shape.q();
    const T* a = saved + t * shape.stride() + shape.a();
    const T* gv = grad_v + t * k;
    T* grad_q = grad_qs + t * k;
    mat_vec(grad_u, rep, gv, k, k);
    mat_vec(grad_z, up_left, grad_u, s, k);
    for (int64_t j = 0; j < s; ++j) grad_z[j] *= a[j] * (T(1) - a[j]);
    mat_vec(grad_q, down_right, grad_z, k, s);
    mat_vec(grad_p + t * k, rep, grad_q, k, k);
    for (int64_t j = 0; j < k; ++j) axpy(grad_dr + j * s, q[j], grad_z, s);
    axpy(grad_db, T(1), grad_z, s);
    for (int64_t j = 0; j < s; ++j) axpy(grad_ul + j * k, a[j], grad_u, k);
  }
  for (int64_t i = 0; i < k; ++i) {
    T* __restrict row = rep + i * k;
    if (towers == 1) {  // one pass, no dZ row: the paper cell and every cell but the released MLP's towers
      const T pi = p[i], ui = saved[shape.u() + i];
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) row[j] = row[j] > T(0) ? pi * grad_qs[j] + ui * grad_v[j] : T(0);
      continue;
    }
    for (int64_t j = 0; j < k; ++j) dz[j] = T(0);
    for (int64_t t = 0; t < towers; ++t) {
      const T pi = p[t * k + i], ui = saved[t * shape.stride() + shape.u() + i];
      const T* __restrict grad_q = grad_qs + t * k;
      const T* __restrict gv = grad_v + t * k;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) dz[j] += pi * grad_q[j] + ui * gv[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) row[j] = row[j] > T(0) ? dz[j] : T(0);
  }
}

// Rows [first, end) of one block; rep holds the block's I (row first's at rep), overwritten with dZ.
template <typename T>
HAMUR_ROW_PASS void core_backward_rows(const CoreShape& shape, T* rep, int64_t first, int64_t end,
                                             const int64_t* domain, const T* p, const T* saved, const T* grad_v,
                                             const T* down_right, const T* up_left, CoreGrads<T>& acc, T* work,
                                             T* grad_p) {
  const int64_t k = shape.rank, s = shape.bottleneck, tk = shape.towers * k;
  for (int64_t b = first; b < end; ++b) {
    const int64_t d = shape.per_domain ? domain[b] : 0;
    core_backward_row(shape, rep + (b - first) * k * k, p + b * tk, saved + b * shape.row_stride(), grad_v + b * tk,
                      down_right + d * k * s, up_left + d * s * k, acc.down_right.data() + d * k * s,
                      acc.down_bias.data() + d * s, acc.up_left.data() + d * s * k, work, grad_p + b * tk);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generated_core_backward_cpu(
    const Tensor& grad_v_in, const Tensor& p_in, const Tensor& saved_in, const Tensor& g_in, const Tensor& centre_in,
    const Tensor& gen_weight_in, const Tensor& gen_bias_in, const Tensor& domain_in, const Tensor& down_right_in,
    const Tensor& up_left_in, bool per_domain) {
  checks::compiled_generated_core_backward(c10::DeviceType::CPU, grad_v_in, p_in, saved_in, g_in, centre_in,
                                           gen_weight_in, gen_bias_in, domain_in, down_right_in, up_left_in,
                                           per_domain);
  const Tensor grad_v = grad_v_in.contiguous(), p = p_in.contiguous(), saved = saved_in.contiguous();
  const Tensor g = g_in.contiguous(), centre = centre_in.contiguous(), gen_weight = gen_weight_in.contiguous();
  const Tensor gen_bias = gen_bias_in.contiguous(), domain = domain_in.contiguous();
  const Tensor dr = down_right_in.contiguous(), ul = up_left_in.contiguous();
  const CoreShape shape = core_shape(p, g, dr, per_domain);
  const int64_t k = shape.rank, s = shape.bottleneck, kk = k * k;
  const int64_t* domain_p = domain.data_ptr<int64_t>();
  cpu::check_groups(cpu::Rows{domain_p, per_domain}, shape.batch, shape.groups);  // before any table is indexed
  Tensor grad_p = at::empty_like(p), grad_g = at::empty_like(g);
  Tensor grad_dr = at::empty_like(dr), grad_ul = at::empty_like(ul);
  Tensor grad_db = per_domain ? at::empty({shape.groups, s}, p.options()) : at::empty({s}, p.options());
  Tensor grad_gen_weight = at::zeros_like(gen_weight), grad_gen_bias = at::zeros({kk}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "generated_core_backward_cpu", [&] {
    const int64_t chunks = cpu::num_chunks(shape.batch, kBlockRows);
    std::vector<CoreGrads<scalar_t>> partial(chunks);
    std::vector<Tensor> partial_gen_bias(chunks);
    const scalar_t *p_p = p.data_ptr<scalar_t>(), *saved_p = saved.data_ptr<scalar_t>();
    const scalar_t *grad_v_p = grad_v.data_ptr<scalar_t>(), *dr_p = dr.data_ptr<scalar_t>();
    const scalar_t* ul_p = ul.data_ptr<scalar_t>();
    scalar_t* grad_p_p = grad_p.data_ptr<scalar_t>();
    parallel_chunks(shape.batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
      CoreGrads<scalar_t>& acc = partial[c];
      acc.down_right.assign(shape.groups * k * s, scalar_t(0));
      acc.down_bias.assign(shape.groups * s, scalar_t(0));
      acc.up_left.assign(shape.groups * s * k, scalar_t(0));
      acc.gen_weight = at::zeros_like(gen_weight);
      partial_gen_bias[c] = at::zeros({kk}, p.options());
      std::vector<scalar_t> work((shape.towers + 2) * k + s);
      Tensor scratch = at::empty({std::min(kBlockRows, end - first), kk}, p.options());
      for (int64_t block_first = first; block_first < end; block_first += kBlockRows) {
        const int64_t block_end = std::min(end, block_first + kBlockRows), rows = block_end - block_first;
        Tensor dz = generate_block(g, centre, gen_weight, gen_bias, scratch, block_first, block_end);
        core_backward_rows(shape, dz.data_ptr<scalar_t>(), block_first, block_end, domain_p, p_p, saved_p, grad_v_p,
                           dr_p, ul_p, acc, work.data(), grad_p_p);
        // The generator's gradients of the block, from dZ (rows, k*k) now in the scratch.
        Tensor grad_g_block = grad_g.narrow(0, block_first, rows);
        at::mm_out(grad_g_block, dz, gen_weight);
        acc.gen_weight.addmm_(dz.t(), g.narrow(0, block_first, rows) - centre);
        partial_gen_bias[c].add_(dz.sum(0));
      }
    });
    at::NoGradGuard no_grad;
    std::vector<scalar_t> sum_dr(shape.groups * k * s, 0), sum_db(shape.groups * s, 0), sum_ul(shape.groups * s * k, 0);
    for (int64_t c = 0; c < chunks; ++c) {  // chunk order: independent of scheduling
      for (size_t i = 0; i < sum_dr.size(); ++i) sum_dr[i] += partial[c].down_right[i];
      for (size_t i = 0; i < sum_db.size(); ++i) sum_db[i] += partial[c].down_bias[i];
      for (size_t i = 0; i < sum_ul.size(); ++i) sum_ul[i] += partial[c].up_left[i];
      grad_gen_weight.add_(partial[c].gen_weight);
      grad_gen_bias.add_(partial_gen_bias[c]);
    }
    std::copy(sum_dr.begin(), sum_dr.end(), grad_dr.data_ptr<scalar_t>());
    std::copy(sum_db.begin(), sum_db.end(), grad_db.data_ptr<scalar_t>());
    std::copy(sum_ul.begin(), sum_ul.end(), grad_ul.data_ptr<scalar_t>());
  });
  // Z = (g - centre) W^T + c: the centre's gradient is minus the sum of g's.
  at::NoGradGuard no_grad;
  Tensor grad_centre = -grad_g.sum(0);
  return {grad_p, grad_g, grad_centre, grad_gen_weight, grad_gen_bias, grad_dr, grad_db, grad_ul};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hamur_fast, m) {
  // Fusion level 2's rank-k core (csrc/cpu/generated_cpu.cpp): v and saved = [q | a | u] (B, 2k + s) from
  // p = x DL and I_b = ReLU((g_b - centre) gen_weight^T + gen_bias) generated inside; per_domain as in ops.cpp.
  // p (B, T*k) holds T towers' rows (shared factors): v (B, T*k), saved (B, T*(2k + s)), I_b generated once.
  m.def(
      "compiled_generated_core_forward(Tensor p, Tensor g, Tensor centre, Tensor gen_weight, Tensor gen_bias, "
      "Tensor domain, Tensor down_right, Tensor down_bias, Tensor up_left, bool per_domain) -> "
      "(Tensor v, Tensor saved)");
  m.def(
      "compiled_generated_core_backward(Tensor grad_v, Tensor p, Tensor saved, Tensor g, Tensor centre, "
      "Tensor gen_weight, Tensor gen_bias, Tensor domain, Tensor down_right, Tensor up_left, bool per_domain) -> "
      "(Tensor grad_p, Tensor grad_g, Tensor grad_centre, Tensor grad_gen_weight, Tensor grad_gen_bias, "
      "Tensor grad_down_right, Tensor grad_down_bias, Tensor grad_up_left)");
}

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_generated_core_forward", &generated_core_forward_cpu);
  m.impl("compiled_generated_core_backward", &generated_core_backward_cpu);
}

}  // namespace hamur_fast
