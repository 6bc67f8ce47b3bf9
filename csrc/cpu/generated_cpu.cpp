// Fusion level 2 on the CPU (SPEC section 6): the adapter cell's rank-k core on representation matrices
// generated where they are used, I_b = ReLU((g_b - centre) W^T + c) viewed (k, k), forward and backward, so
// that no (B, k*k) tensor exists. Names follow the contract's vocabulary (hamur_fast/ops/contract.py):
//   q = p I_b,  z = q DR[d] + db[d],  a = sigmoid(z),  u = a UL[d],  v = u I_b.
// The dense products around the core (p = x DL, o = v UR + ub) and DomainNorm run as the existing grouped
// linear op and compiled_norm_forward (hamur_fast/ops/backends/compiled_generated.py).
//
// Rows go in blocks of kBlockRows: a block's I is one GEMM ((R, p) x (p, k*k), then ReLU in place) into a
// scratch of kBlockRows * k * k elements, whatever the batch; each row of the block then runs its core while
// its I_b sits in cache, the row's T towers (the released MLP's) as one register-blocked product per matrix, so
// each element of I_b or a factor is loaded once for all T. Backward generates J_b = I_b^T instead (the
// generator's outputs permuted), so that its products with I_b are vector-times-matrix as well; it overwrites
// J_b with dZ_b^T (dZ_b = dI_b where I_b > 0, else 0), and the block's generator gradients are two GEMMs on the
// scratch: grad_g = dZ W and grad_W += dZ^T (g - centre), permuted back at the end. The factor gradients are
// GEMMs over all rows after the pass, from the saved [q | a | u] and the pass's [grad_z | grad_u] rows. Per-thread
// chunks accumulate the generator's weight gradients and are summed in chunk order, so results do not depend on
// scheduling.
#include "cpu_primitives.h"

namespace hamur_fast {
namespace {

using at::Tensor;
// cpu_primitives.h's register-blocked products, row chunks (and its HAMUR_ROW_PASS / HAMUR_INLINE).
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

// scratch[:end - first] = ReLU(centred[first:end] W^T + c), centred = g - centre: the block's I, one row of k*k
// per batch row (or, with W's and c's outputs permuted, I^T).
Tensor generate_block(const Tensor& centred, const Tensor& gen_weight, const Tensor& gen_bias, Tensor& scratch,
                      int64_t first, int64_t end) {
  Tensor block = scratch.narrow(0, 0, end - first);
  at::addmm_out(block, gen_bias, centred.narrow(0, first, end - first), gen_weight.t());
  block.clamp_min_(0);
  return block;
}

// ------------------------------------------------------------------------------------ towers of one row
// A row's T towers go through the core in groups of up to kMaxSharedRows, each group on one shared matrix (I_b,
// or the factors of the row's domain): cpu::rows_mat loads each element once for the whole group.
constexpr int64_t kMaxSharedRows = 4;  // rows_mat's widest block: 4 rows x 4 vectors = 16 accumulators

// out[r] (n) = v[r] (m) . M (m, n) + bias (n, or null) for rows r < `rows` (1 to kMaxSharedRows) on one M.
// Not inlined: one copy per type and ISA serves every product of the core (the build compiles it once).
template <typename T>
HAMUR_ROW_PASS void rows_shared_mat(int64_t rows, T* const* out, const T* const* v, const T* M, const T* bias,
                                  int64_t m, int64_t n) {
  switch (rows) {
    case 1: cpu::rows_mat<T, 1>(out, v, M, bias, m, n); break;
    case 2: cpu::rows_mat<T, 2>(out, v, M, bias, m, n); break;
    case 3: cpu::rows_mat<T, 3>(out, v, M, bias, m, n); break;
    default: cpu::rows_mat<T, 4>(out, v, M, bias, m, n); break;
  }
}

// Pointers to tower t's vectors of one row, for towers [first, first + count).
template <typename T, typename F>
HAMUR_INLINE void tower_pointers(int64_t first, int64_t count, T** out, const F& pointer) {
  for (int64_t i = 0; i < count; ++i) out[i] = pointer(first + i);
}

// ------------------------------------------------------------------------------------ forward
// Rows [first, end) of one block, every tower on the row's I_b; rep holds the block's I, row first's at rep.
template <typename T>
HAMUR_ROW_PASS void core_forward_rows(const CoreShape& shape, const T* rep, int64_t first, int64_t end,
                                      const int64_t* domain, const T* p, const T* down_right, const T* down_bias,
                                      const T* up_left, T* saved, T* v) {
  const int64_t k = shape.rank, s = shape.bottleneck, tk = shape.towers * k;
  for (int64_t b = first; b < end; ++b) {
    const int64_t d = shape.per_domain ? domain[b] : 0;
    const T* rep_b = rep + (b - first) * k * k;
    T* row_saved = saved + b * shape.row_stride();
    for (int64_t t0 = 0; t0 < shape.towers; t0 += kMaxSharedRows) {
      const int64_t n = std::min(kMaxSharedRows, shape.towers - t0);
      const T* p_t[kMaxSharedRows];
      T *q_t[kMaxSharedRows], *a_t[kMaxSharedRows], *u_t[kMaxSharedRows], *v_t[kMaxSharedRows];
      tower_pointers(t0, n, p_t, [&](int64_t t) { return p + b * tk + t * k; });
      tower_pointers(t0, n, q_t, [&](int64_t t) { return row_saved + t * shape.stride() + shape.q(); });
      tower_pointers(t0, n, a_t, [&](int64_t t) { return row_saved + t * shape.stride() + shape.a(); });
      tower_pointers(t0, n, u_t, [&](int64_t t) { return row_saved + t * shape.stride() + shape.u(); });
      tower_pointers(t0, n, v_t, [&](int64_t t) { return v + b * tk + t * k; });
      rows_shared_mat(n, q_t, p_t, rep_b, static_cast<const T*>(nullptr), k, k);  // q = p I
      rows_shared_mat(n, a_t, q_t, down_right + d * k * s, down_bias + d * s, k, s);
      for (int64_t i = 0; i < n; ++i) cpu::sigmoid_row(a_t[i], s);  // a = sigmoid(q DR + db)
      rows_shared_mat(n, u_t, a_t, up_left + d * s * k, static_cast<const T*>(nullptr), s, k);  // u = a UL
      rows_shared_mat(n, v_t, u_t, rep_b, static_cast<const T*>(nullptr), k, k);                 // v = u I
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
  at::NoGradGuard no_grad;
  const Tensor centred = g - centre;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "generated_core_forward_cpu", [&] {
    const scalar_t *p_p = p.data_ptr<scalar_t>(), *dr_p = dr.data_ptr<scalar_t>();
    const scalar_t *db_p = db.data_ptr<scalar_t>(), *ul_p = ul.data_ptr<scalar_t>();
    scalar_t *saved_p = saved.data_ptr<scalar_t>(), *v_p = v.data_ptr<scalar_t>();
    parallel_chunks(shape.batch, cpu::num_chunks(shape.batch, kBlockRows), [&](int64_t, int64_t first, int64_t end) {
      Tensor scratch = at::empty({std::min(kBlockRows, end - first), k * k}, p.options());
      for (int64_t block_first = first; block_first < end; block_first += kBlockRows) {
        const int64_t block_end = std::min(end, block_first + kBlockRows);
        const Tensor rep = generate_block(centred, gen_weight, gen_bias, scratch, block_first, block_end);
        core_forward_rows(shape, rep.data_ptr<scalar_t>(), block_first, block_end, domain_p, p_p, dr_p, db_p, ul_p,
                          saved_p, v_p);
      }
    });
  });
  return {v, saved};
}

// ------------------------------------------------------------------------------------ backward
// Backward works on J_b = I_b^T, generated directly by the generator with its k*k outputs permuted ((i, j) to
// (j, i)): every product with I_b is then a vector times a matrix, v . J_b = I_b v, on rows_shared_mat's
// register-blocked strips, the T towers sharing each load of J_b. dZ_b is formed transposed in J_b's place, and
// the generator's gradients computed in the permuted frame are permuted back at the end.
Tensor transposed_outputs(const Tensor& t, int64_t k) {  // rows (i, j) -> (j, i) of a (k*k, ...) tensor
  std::vector<int64_t> split = t.sizes().vec();  // (k*k, ...) -> (k, k, ...)
  split[0] = k;
  split.insert(split.begin(), k);
  return t.reshape(split).transpose(0, 1).contiguous().reshape(t.sizes());
}

// One row's towers [t0, t0 + n): grad_u = I_b grad_v, grad_z = UL grad_u * a (1 - a), grad_q = DR grad_z and
// grad_p = I_b grad_q, as vectors times J_b and the transposed factors.
struct TowerGroup {
  int64_t first, count;
};

template <typename T>
HAMUR_INLINE void core_backward_towers(const CoreShape& shape, TowerGroup towers, const T* rep_t, const T* saved,
                                       const T* grad_v, const T* down_right_t, const T* up_left_t, T* grads,
                                       T* grad_qs, T* grad_p) {
  const int64_t k = shape.rank, s = shape.bottleneck, n = towers.count;
  const T* gv[kMaxSharedRows];
  T *gu[kMaxSharedRows], *gz[kMaxSharedRows], *gq[kMaxSharedRows], *gp[kMaxSharedRows];
  const T* nothing = nullptr;
  tower_pointers(towers.first, n, gv, [&](int64_t t) { return grad_v + t * k; });
  tower_pointers(towers.first, n, gz, [&](int64_t t) { return grads + t * (s + k); });
  tower_pointers(towers.first, n, gu, [&](int64_t t) { return grads + t * (s + k) + s; });
  tower_pointers(towers.first, n, gq, [&](int64_t t) { return grad_qs + t * k; });
  tower_pointers(towers.first, n, gp, [&](int64_t t) { return grad_p + t * k; });
  rows_shared_mat(n, gu, gv, rep_t, nothing, k, k);
  rows_shared_mat(n, gz, gu, up_left_t, nothing, k, s);
  for (int64_t i = 0; i < n; ++i) {
    const T* __restrict a = saved + (towers.first + i) * shape.stride() + shape.a();
    T* __restrict z = gz[i];
#pragma omp simd
    for (int64_t j = 0; j < s; ++j) z[j] *= a[j] * (T(1) - a[j]);
  }
  rows_shared_mat(n, gq, gz, down_right_t, nothing, s, k);
  rows_shared_mat(n, gp, gq, rep_t, nothing, k, k);
}

// Rows [j0, j0 + kJ) and columns [first, first + width) of dZ_b^T, width in (kVectors - 1, kVectors] vectors:
// at (j, i), the sum over towers of grad_q_t[j] p_t[i] + grad_v_t[j] u_t[i] where J_b > 0, else 0, into rep_t
// (J_b) in place. sides: 2T rows of k_pad, [p_t | u_t] zero-padded to whole vectors, each load serving kJ rows.
// Stores are whole vectors: lanes past the strip keep the values they had (the next row's, or the scratch's
// padding past the last row), so a row's tail costs no lane-by-lane loop.
template <typename T, int kVectors, int kJ>
HAMUR_INLINE void dz_transposed_tile(int64_t k, int64_t towers, int64_t k_pad, T* rep_t, const T* sides,
                                     const T* grad_qs, const T* grad_v, int64_t j0, int64_t first, int64_t width) {
  using Vec = cpu::Vec512<T>;
  constexpr int64_t kLanes = 64 / sizeof(T);
  Vec acc[kJ][kVectors] = {};
  for (int64_t t = 0; t < towers; ++t) {
    const T* p_t = sides + 2 * t * k_pad + first;
    const T* u_t = p_t + k_pad;
    Vec p_v[kVectors], u_v[kVectors];
    for (int v = 0; v < kVectors; ++v) {
      p_v[v] = cpu::load_vec(p_t + v * kLanes);
      u_v[v] = cpu::load_vec(u_t + v * kLanes);
    }
    for (int r = 0; r < kJ; ++r) {
      const T gq = grad_qs[t * k + j0 + r], gv = grad_v[t * k + j0 + r];
      for (int v = 0; v < kVectors; ++v) acc[r][v] += gq * p_v[v] + gv * u_v[v];
    }
  }
  Vec lane;
  for (int64_t i = 0; i < kLanes; ++i) lane[i] = static_cast<T>(i);
  const Vec zero = {};
  for (int r = 0; r < kJ; ++r) {
    T* row = rep_t + (j0 + r) * k + first;
    for (int v = 0; v < kVectors; ++v) {
      const Vec rep = cpu::load_vec(row + v * kLanes);
      const Vec dz = rep > zero ? acc[r][v] : zero;
      const Vec out = lane < static_cast<T>(width - v * kLanes) ? dz : rep;
      __builtin_memcpy(row + v * kLanes, &out, sizeof(out));
    }
  }
}

template <typename T, int kVectors>
HAMUR_INLINE void dz_transposed_strip(int64_t k, int64_t towers, int64_t k_pad, T* rep_t, const T* sides,
                                      const T* grad_qs, const T* grad_v, int64_t first, int64_t width) {
  constexpr int kJ = 2;  // rows of dZ^T at once
  int64_t j = 0;
  for (; j + kJ <= k; j += kJ)
    dz_transposed_tile<T, kVectors, kJ>(k, towers, k_pad, rep_t, sides, grad_qs, grad_v, j, first, width);
  for (; j < k; ++j)
    dz_transposed_tile<T, kVectors, 1>(k, towers, k_pad, rep_t, sides, grad_qs, grad_v, j, first, width);
}

// rep_t (J_b) overwritten with dZ_b^T: dZ_b = sum_t p_t (x) grad_q_t + u_t (x) grad_v_t where I_b > 0, else 0.
// sides: scratch of 2T rows of k rounded up to whole vectors.
template <typename T>
HAMUR_ROW_PASS void write_dz_transposed(const CoreShape& shape, T* rep_t, const T* p, const T* saved,
                                        const T* grad_v, const T* grad_qs, T* sides) {
  constexpr int64_t kLanes = 64 / sizeof(T), kStrip = 4;
  const int64_t k = shape.rank, k_pad = (k + kLanes - 1) / kLanes * kLanes;
  for (int64_t t = 0; t < shape.towers; ++t) {
    T* p_t = sides + 2 * t * k_pad;
    T* u_t = p_t + k_pad;
    for (int64_t i = 0; i < k_pad; ++i) {
      p_t[i] = i < k ? p[t * k + i] : T(0);
      u_t[i] = i < k ? saved[t * shape.stride() + shape.u() + i] : T(0);
    }
  }
  for (int64_t first = 0; first < k; first += kStrip * kLanes) {
    const int64_t width = std::min(kStrip * kLanes, k - first);
    switch ((width + kLanes - 1) / kLanes) {
      case 1: dz_transposed_strip<T, 1>(k, shape.towers, k_pad, rep_t, sides, grad_qs, grad_v, first, width); break;
      case 2: dz_transposed_strip<T, 2>(k, shape.towers, k_pad, rep_t, sides, grad_qs, grad_v, first, width); break;
      case 3: dz_transposed_strip<T, 3>(k, shape.towers, k_pad, rep_t, sides, grad_qs, grad_v, first, width); break;
      default: dz_transposed_strip<T, 4>(k, shape.towers, k_pad, rep_t, sides, grad_qs, grad_v, first, width); break;
    }
  }
}

// Rows [first, end) of one block; rep_t holds the block's J (row first's at rep_t), overwritten with dZ^T. grads
// (B, T (s + k)) receives each row's and tower's [grad_z | grad_u] for the factor gradients after the pass.
// work: scratch of T k + 2T k_pad (work_size).
template <typename T>
HAMUR_ROW_PASS void core_backward_rows(const CoreShape& shape, T* rep_t, int64_t first, int64_t end,
                                       const int64_t* domain, const T* p, const T* saved, const T* grad_v,
                                       const T* down_right_t, const T* up_left_t, T* grads, T* work, T* grad_p) {
  const int64_t k = shape.rank, s = shape.bottleneck, tk = shape.towers * k;
  for (int64_t b = first; b < end; ++b) {
    const int64_t d = shape.per_domain ? domain[b] : 0;
    T* rep_b = rep_t + (b - first) * k * k;
    const T* row_saved = saved + b * shape.row_stride();
    for (int64_t t0 = 0; t0 < shape.towers; t0 += kMaxSharedRows)
      core_backward_towers(shape, TowerGroup{t0, std::min(kMaxSharedRows, shape.towers - t0)}, rep_b, row_saved,
                           grad_v + b * tk, down_right_t + d * s * k, up_left_t + d * k * s,
                           grads + b * shape.towers * (s + k), work, grad_p + b * tk);
    write_dz_transposed(shape, rep_b, p + b * tk, row_saved, grad_v + b * tk, work, work + tk);
  }
}

template <typename T>
int64_t backward_work_size(const CoreShape& shape) {  // grad_q of each tower, then write_dz_transposed's sides
  constexpr int64_t kLanes = 64 / sizeof(T);
  return shape.towers * (shape.rank + 2 * ((shape.rank + kLanes - 1) / kLanes * kLanes));
}

// The factor gradients from the saved [q | a | u] and the pass's [grad_z | grad_u] rows: grad_DR = q^T grad_z,
// grad_UL = a^T grad_u, grad_db = the sum of grad_z, over every row and tower of each group (GEMMs over rows,
// the groups' rows gathered in domain order in paper mode).
void factor_gradients(const CoreShape& shape, const Tensor& saved, const Tensor& grads, const Tensor& domain,
                      Tensor& grad_dr, Tensor& grad_db, Tensor& grad_ul) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  Tensor rows_saved = saved.view({-1, shape.stride()}), rows_grads = grads.view({-1, s + k});
  auto group_sums = [&](const Tensor& group_saved, const Tensor& group_grads, Tensor dr, Tensor db, Tensor ul) {
    const Tensor grad_z = group_grads.narrow(1, 0, s);
    at::mm_out(dr, group_saved.narrow(1, shape.q(), k).t(), grad_z);
    at::mm_out(ul, group_saved.narrow(1, shape.a(), s).t(), group_grads.narrow(1, s, k));
    at::sum_out(db, grad_z, 0);
  };
  if (!shape.per_domain) return group_sums(rows_saved, rows_grads, grad_dr, grad_db, grad_ul);
  const cpu::Rows rows{domain.data_ptr<int64_t>(), true};  // one tower per row (checked)
  const cpu::GroupOrder order =
      cpu::order_by_group(rows, cpu::count_rows(rows, shape.batch, shape.groups), saved.options());
  rows_saved = rows_saved.index_select(0, order.order);
  rows_grads = rows_grads.index_select(0, order.order);
  for (int64_t d = 0; d < shape.groups; ++d)
    group_sums(cpu::slots_of(rows_saved, order, d), cpu::slots_of(rows_grads, order, d), grad_dr[d], grad_db[d],
               grad_ul[d]);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> generated_core_backward_cpu(
    const Tensor& grad_v_in, const Tensor& p_in, const Tensor& saved_in, const Tensor& g_in, const Tensor& centre_in,
    const Tensor& gen_weight_in, const Tensor& gen_bias_in, const Tensor& domain_in, const Tensor& down_right_in,
    const Tensor& up_left_in, bool per_domain) {
  checks::compiled_generated_core_backward(c10::DeviceType::CPU, grad_v_in, p_in, saved_in, g_in, centre_in,
                                           gen_weight_in, gen_bias_in, domain_in, down_right_in, up_left_in,
                                           per_domain);
  const Tensor grad_v = grad_v_in.contiguous(), p = p_in.contiguous(), saved = saved_in.contiguous();
  const Tensor g = g_in.contiguous(), centre = centre_in.contiguous(), domain = domain_in.contiguous();
  const CoreShape shape = core_shape(p, g, down_right_in, per_domain);
  const int64_t k = shape.rank, s = shape.bottleneck, kk = k * k;
  const int64_t* domain_p = domain.data_ptr<int64_t>();
  cpu::check_groups(cpu::Rows{domain_p, per_domain}, shape.batch, shape.groups);  // before any table is indexed
  at::NoGradGuard no_grad;
  const Tensor centred = g - centre;
  const Tensor weight_t = transposed_outputs(gen_weight_in, k), bias_t = transposed_outputs(gen_bias_in, k);
  const Tensor dr_t = down_right_in.transpose(-1, -2).contiguous(), ul_t = up_left_in.transpose(-1, -2).contiguous();
  Tensor grad_p = at::empty_like(p), grad_g = at::empty_like(g);
  Tensor grads = at::empty({shape.batch, shape.towers * (s + k)}, p.options());  // [grad_z | grad_u] per tower
  const int64_t chunks = cpu::num_chunks(shape.batch, kBlockRows);
  std::vector<Tensor> partial_weight(chunks), partial_bias(chunks);  // per chunk, summed in chunk order
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "generated_core_backward_cpu", [&] {
    const scalar_t *p_p = p.data_ptr<scalar_t>(), *saved_p = saved.data_ptr<scalar_t>();
    const scalar_t *grad_v_p = grad_v.data_ptr<scalar_t>(), *dr_p = dr_t.data_ptr<scalar_t>();
    const scalar_t* ul_p = ul_t.data_ptr<scalar_t>();
    scalar_t *grad_p_p = grad_p.data_ptr<scalar_t>(), *grads_p = grads.data_ptr<scalar_t>();
    parallel_chunks(shape.batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
      partial_weight[c] = at::zeros_like(weight_t);
      partial_bias[c] = at::zeros({kk}, p.options());
      std::vector<scalar_t> work(backward_work_size<scalar_t>(shape));
      // one vector of padding past the last row: write_dz_transposed's whole-vector stores may reach into it
      const int64_t scratch_rows = std::min(kBlockRows, end - first);
      Tensor scratch = at::empty({scratch_rows * kk + 64}, p.options()).narrow(0, 0, scratch_rows * kk);
      scratch = scratch.view({scratch_rows, kk});
      for (int64_t block_first = first; block_first < end; block_first += kBlockRows) {
        const int64_t block_end = std::min(end, block_first + kBlockRows), rows = block_end - block_first;
        Tensor dz_t = generate_block(centred, weight_t, bias_t, scratch, block_first, block_end);
        core_backward_rows(shape, dz_t.data_ptr<scalar_t>(), block_first, block_end, domain_p, p_p, saved_p,
                           grad_v_p, dr_p, ul_p, grads_p, work.data(), grad_p_p);
        // The generator's gradients of the block, from dZ^T (rows, k*k) now in the scratch, in J's frame.
        Tensor grad_g_block = grad_g.narrow(0, block_first, rows);
        at::mm_out(grad_g_block, dz_t, weight_t);
        partial_weight[c].addmm_(dz_t.t(), centred.narrow(0, block_first, rows));
        partial_bias[c].add_(dz_t.sum(0));
      }
    });
  });
  Tensor grad_weight_t = partial_weight[0], grad_bias_t = partial_bias[0];
  for (int64_t c = 1; c < chunks; ++c) {  // chunk order: independent of scheduling
    grad_weight_t.add_(partial_weight[c]);
    grad_bias_t.add_(partial_bias[c]);
  }
  Tensor grad_dr = at::empty_like(down_right_in, at::MemoryFormat::Contiguous);
  Tensor grad_ul = at::empty_like(up_left_in, at::MemoryFormat::Contiguous);
  Tensor grad_db = per_domain ? at::empty({shape.groups, s}, p.options()) : at::empty({s}, p.options());
  factor_gradients(shape, saved, grads, domain, grad_dr, grad_db, grad_ul);
  // Z = (g - centre) W^T + c: the centre's gradient is minus the sum of g's.
  Tensor grad_centre = -grad_g.sum(0);
  return {grad_p, grad_g, grad_centre, transposed_outputs(grad_weight_t, k), transposed_outputs(grad_bias_t, k),
          grad_dr, grad_db, grad_ul};
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
