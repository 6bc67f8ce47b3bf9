// CPU kernels of the HAMUR adapter cell and DomainNorm (SPEC sections 2, 3 and 6, level 1), float32 and
// float64. Schemas and conventions: csrc/cpu/ops.cpp.
//
// Every product goes right-to-left through the rank-k space, so a row costs O(hk + k^2 + ks) and no
// (B, h, s) tensor exists. Training rows are first ordered by domain (a stable counting sort), so that the
// products with per-domain dense factors (x.U, r.V', and their gradients: the O(hk) work) are one BLAS
// GEMM per domain over contiguous rows, weight gradients included (no per-row rank-1 updates). The per-row
// rank-k core, where each row has its own I_b, is one fused pass that reads I_b from memory once: forward
// uses it for p = u.I and r = q.I while it sits in L1, backward for both gradient terms and the single
// write of grad_rep. Row passes run in parallel over rows; reductions (statistics, DomainNorm gradients)
// accumulate per fixed row chunk and are summed in chunk order, so results do not depend on scheduling.
// The eval kernel (adapter_infer) is one fused pass per row with DomainNorm folded into an affine map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Row passes are compiled three times, for AVX-512, AVX2 + FMA and baseline x86-64, and the loader picks the
// best one this CPU runs (GCC function multi-versioning): one build works on any x86-64 machine and uses
// wide vectors where they exist. The per-row helpers are forced inline so they take the caller's ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HAMUR_ROW_PASS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HAMUR_ROW_PASS
#endif
#define HAMUR_INLINE inline __attribute__((always_inline))
// 512-bit vector values only live inside always-inline helpers, so no call passes one by value.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace hamur_fast {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------ vector primitives
// Short, contiguous, restrict-qualified loops the compiler turns into SIMD (omp simd lets it reorder the
// reductions in dot).

template <typename T>
HAMUR_INLINE void axpy(T* __restrict out, T alpha, const T* __restrict v, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += alpha * v[j];
}

template <typename T>
HAMUR_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

// out (n) = v (m) . M (m, n), M row-major. A plain axpy per row of M would store `out` and load it back on
// every one of the m steps (a store-to-load chain that dominated the row passes), so the output is cut
// into strips of up to kStrip vectors held in registers for the whole sum over i. Vectors are GCC
// vector-extension types of 512 bits: one register on AVX-512, two on AVX2, four on SSE.
template <typename T>
struct Vec512Of;
template <>
struct Vec512Of<float> {
  typedef float type __attribute__((vector_size(64), aligned(4)));
};
template <>
struct Vec512Of<double> {
  typedef double type __attribute__((vector_size(64), aligned(8)));
};
template <typename T>
using Vec512 = typename Vec512Of<T>::type;

// Sum of a vector's lanes by halving in registers (no round trip through memory).
HAMUR_INLINE float lane_sum(Vec512<float> v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  const Vec8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

HAMUR_INLINE double lane_sum(Vec512<double> v) {
  typedef double Vec4 __attribute__((vector_size(32)));
  const Vec4 s4 = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

template <typename T>
HAMUR_INLINE Vec512<T> load_vec(const T* p) {
  Vec512<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Rows of M (m rows of n) whose first `reach` elements from `first_col` can be loaded as whole vectors
// without leaving M: all rows when the strip fits in a row, else all but the last few.
HAMUR_INLINE int64_t rows_in_reach(int64_t m, int64_t n, int64_t first_col, int64_t reach_cols) {
  const int64_t reach = first_col + reach_cols;
  if (reach <= n) return m;
  if (m * n < reach) return 0;  // not even row 0 (m = 1 and a row shorter than a vector strip)
  return std::min<int64_t>(m, (m * n - reach) / n + 1);
}

template <typename T, int kVectors>
HAMUR_INLINE void vec_mat_strip(T* __restrict out, const T* __restrict v, const T* __restrict M, int64_t m,
                                int64_t n, int64_t first_col, int64_t width) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  Vec512<T> acc[kVectors] = {};
  // Full-vector loads may run past the strip's last column into the next row of M (those lanes are
  // discarded); rows whose loads would run past the end of M itself take the scalar path below.
  const int64_t vector_rows = rows_in_reach(m, n, first_col, kVectors * kLanes);
  for (int64_t i = 0; i < vector_rows; ++i) {
    const T* row = M + i * n + first_col;
    const T vi = v[i];
    for (int t = 0; t < kVectors; ++t) acc[t] += vi * load_vec(row + t * kLanes);
  }
  T lanes[kVectors * kLanes];
  __builtin_memcpy(lanes, acc, sizeof(lanes));
  for (int64_t i = vector_rows; i < m; ++i)
    for (int64_t j = 0; j < width; ++j) lanes[j] += v[i] * M[i * n + first_col + j];
  for (int64_t j = 0; j < width; ++j) out[first_col + j] = lanes[j];
}

template <typename T>
HAMUR_INLINE void vec_mat(T* __restrict out, const T* __restrict v, const T* __restrict M, int64_t m, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T), kStrip = 4;
  for (int64_t first = 0; first < n; first += kStrip * kLanes) {
    const int64_t width = std::min(kStrip * kLanes, n - first);
    switch ((width + kLanes - 1) / kLanes) {
      case 1: vec_mat_strip<T, 1>(out, v, M, m, n, first, width); break;
      case 2: vec_mat_strip<T, 2>(out, v, M, m, n, first, width); break;
      case 3: vec_mat_strip<T, 3>(out, v, M, m, n, first, width); break;
      default: vec_mat_strip<T, 4>(out, v, M, m, n, first, width); break;
    }
  }
}

template <typename T, int kVectors>
HAMUR_INLINE void mat_vec_rows(T* __restrict out, const T* __restrict M, const T* __restrict v, int64_t m,
                               int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  // v zero-padded to whole vectors: the lanes a load takes from M's next row are multiplied by 0.
  T padded[kVectors * kLanes] = {};
  for (int64_t j = 0; j < n; ++j) padded[j] = v[j];  // a short loop, not a memcpy call
  Vec512<T> vv[kVectors];
  for (int t = 0; t < kVectors; ++t) vv[t] = load_vec(padded + t * kLanes);
  const int64_t vector_rows = rows_in_reach(m, n, 0, kVectors * kLanes);
  for (int64_t i = 0; i < vector_rows; ++i) {
    Vec512<T> acc = load_vec(M + i * n) * vv[0];
    for (int t = 1; t < kVectors; ++t) acc += load_vec(M + i * n + t * kLanes) * vv[t];
    out[i] = lane_sum(acc);
  }
  for (int64_t i = vector_rows; i < m; ++i) out[i] = dot(M + i * n, v, n);
}

// out (m) = M (m, n) . v (n): one vector dot product per row of M.
template <typename T>
HAMUR_INLINE void mat_vec(T* __restrict out, const T* __restrict M, const T* __restrict v, int64_t m, int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  switch ((n + kLanes - 1) / kLanes) {
    case 1: mat_vec_rows<T, 1>(out, M, v, m, n); break;
    case 2: mat_vec_rows<T, 2>(out, M, v, m, n); break;
    case 3: mat_vec_rows<T, 3>(out, M, v, m, n); break;
    case 4: mat_vec_rows<T, 4>(out, M, v, m, n); break;
    default:
      for (int64_t i = 0; i < m; ++i) out[i] = dot(M + i * n, v, n);
  }
}

// out (m, m) = outer(v1, w1) + outer(v2, w2), written once.
template <typename T>
HAMUR_INLINE void write_two_outers(T* __restrict out, const T* __restrict v1, const T* __restrict w1,
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
HAMUR_INLINE void residual_affine_row(const T* __restrict x, const T* __restrict o, const T* __restrict scale,
                                const T* __restrict shift, int64_t n, T* __restrict y) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] + o[j] * scale[j] + shift[j];
}

// out (n) = a + b.
template <typename T>
HAMUR_INLINE void add_rows(const T* __restrict a, const T* __restrict b, int64_t n, T* __restrict out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = a[j] + b[j];
}

// Row passes walk rows in their original order while their saved vectors sit in group order, so the next
// row's vectors are fetched ahead (the hardware prefetcher cannot guess the jump).
template <typename T>
HAMUR_INLINE void prefetch(const T* p, int64_t n, bool for_write) {
  for (int64_t j = 0; j < n; j += 64 / static_cast<int64_t>(sizeof(T))) {
    if (for_write) {
      __builtin_prefetch(p + j, 1);
    } else {
      __builtin_prefetch(p + j, 0);
    }
  }
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

// ------------------------------------------------------------------------------------ shapes and order
// Row b uses parameter slice / statistics group `group(b)`: its domain in paper mode, 0 in released mode
// (one shared parameter set, one whole-batch statistics group).
struct Rows {
  const int64_t* domain;
  bool per_domain;
  int64_t group(int64_t b) const { return per_domain ? domain[b] : 0; }
};

struct CellShape {
  int64_t batch, width, rank, bottleneck, groups;
  // hidden row layout, see csrc/cpu/ops.cpp
  int64_t stride() const { return 4 * rank + bottleneck; }
  int64_t u() const { return 0; }
  int64_t p() const { return rank; }
  int64_t q() const { return 2 * rank; }
  int64_t r() const { return 3 * rank; }
  int64_t a() const { return 4 * rank; }
};

CellShape cell_shape(const Tensor& x, const Tensor& rep, const Tensor& down_right, bool per_domain,
                     const Tensor& norm_weight) {
  return {x.size(0), x.size(1), rep.size(1), down_right.size(-1), per_domain ? norm_weight.size(0) : 1};
}

// Every domain id is read before any table is indexed with it: the Python-side check may be off
// (hf.set_value_checks(False)) or skipped (torch.compile), and reading B ids costs nothing on the CPU.
void check_groups(const Rows& rows, int64_t batch, int64_t groups) {
  if (!rows.per_domain) return;  // released mode never indexes by domain
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(rows.domain[b] >= 0 && rows.domain[b] < groups, "domain id ", rows.domain[b], " at row ", b,
                " is out of range for ", groups, " domains");
}

std::vector<int64_t> count_rows(const Rows& rows, int64_t batch, int64_t groups) {
  check_groups(rows, batch, groups);
  std::vector<int64_t> count(groups, 0);
  for (int64_t b = 0; b < batch; ++b) ++count[rows.group(b)];
  return count;
}

// Rows grouped by statistics group, stable: slot i holds original row order[i] (and row b sits in slot
// slot_of[b]); group g owns slots [start[g], start[g + 1]) and slot_group[i] is the group of slot i.
struct GroupOrder {
  Tensor order;
  std::vector<int64_t> start, slot_group, slot_of;
  int64_t rows(int64_t g) const { return start[g + 1] - start[g]; }
};

GroupOrder order_by_group(const Rows& rows, const std::vector<int64_t>& count, const at::TensorOptions& options) {
  const int64_t groups = static_cast<int64_t>(count.size());
  GroupOrder out{at::empty({0}, options.dtype(at::kLong)), std::vector<int64_t>(groups + 1, 0), {}, {}};
  for (int64_t g = 0; g < groups; ++g) out.start[g + 1] = out.start[g] + count[g];
  const int64_t batch = out.start[groups];
  out.order = at::empty({batch}, options.dtype(at::kLong));
  out.slot_group.resize(batch);
  out.slot_of.resize(batch);
  int64_t* order = out.order.data_ptr<int64_t>();
  std::vector<int64_t> next(out.start.begin(), out.start.end() - 1);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t g = rows.group(b);
    out.slot_group[next[g]] = g;
    out.slot_of[b] = next[g];
    order[next[g]++] = b;
  }
  return out;
}

// The same grouping rebuilt in backward from the saved order and counts.
GroupOrder saved_order(const Tensor& order, const Tensor& count) {
  const Tensor counts = count.round().to(at::kLong).contiguous();
  const int64_t groups = counts.numel(), batch = order.numel();
  GroupOrder out{order, std::vector<int64_t>(groups + 1, 0), std::vector<int64_t>(batch), std::vector<int64_t>(batch)};
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(counts.data_ptr<int64_t>()[g] >= 0, "adapter_backward: the saved counts must be >= 0");
    out.start[g + 1] = out.start[g] + counts.data_ptr<int64_t>()[g];
  }
  TORCH_CHECK(out.start[groups] == batch, "adapter_backward: the saved counts do not add up to the batch");
  for (int64_t g = 0; g < groups; ++g)
    std::fill(out.slot_group.begin() + out.start[g], out.slot_group.begin() + out.start[g + 1], g);
  const int64_t* rows = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(rows[i] >= 0 && rows[i] < batch, "adapter_backward: the saved order is not a permutation");
    out.slot_of[rows[i]] = i;
  }
  return out;
}

// Rows of a contiguous (B, n) tensor in group order (a parallel row copy; index_select runs one thread).
Tensor gather_rows(const Tensor& t, const GroupOrder& order) {
  Tensor out = at::empty_like(t);
  const int64_t n = t.size(1), bytes = n * static_cast<int64_t>(t.element_size());
  const char* src = static_cast<const char*>(t.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* rows = order.order.data_ptr<int64_t>();
  at::parallel_for(0, t.size(0), kMinRowsPerChunk, [&](int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) std::memcpy(dst + i * bytes, src + rows[i] * bytes, bytes);
  });
  return out;
}

Tensor param_of(const Tensor& param, int64_t g, bool per_domain) { return per_domain ? param[g] : param; }

// The slots of group g of a (B, ...) tensor in group order.
Tensor slots_of(const Tensor& t, const GroupOrder& order, int64_t g) {
  return t.narrow(0, order.start[g], order.rows(g));
}

// ------------------------------------------------------------------------------------ rank-k core
// The cell's per-row middle, between the dense projections: from u = x.U (already in hidden) it forms
// p = u.I, a = sigmoid(p.V + b), q = a.U', r = q.I in hidden (layout in CellShape).
template <typename T>
HAMUR_INLINE void rank_core_row(const CellShape& shape, const T* __restrict rep, const T* __restrict down_right,
                          const T* __restrict down_bias, const T* __restrict up_left, T* __restrict hidden) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  T* u = hidden + shape.u();
  T* p = hidden + shape.p();
  T* q = hidden + shape.q();
  T* r = hidden + shape.r();
  T* a = hidden + shape.a();
  vec_mat(p, u, rep, k, k);
  vec_mat(a, p, down_right, k, s);
  for (int64_t j = 0; j < s; ++j) a[j] = T(1) / (T(1) + std::exp(-(a[j] + down_bias[j])));
  vec_mat(q, a, up_left, s, k);
  vec_mat(r, q, rep, k, k);
}

template <typename T>
struct Factors {
  const T *down_left, *down_right, *down_bias, *up_left, *up_right, *up_bias;
};

template <typename T>
Factors<T> factors(const Tensor& dl, const Tensor& dr, const Tensor& db, const Tensor& ul, const Tensor& ur,
                   const Tensor& ub) {
  return {dl.data_ptr<T>(), dr.data_ptr<T>(), db.data_ptr<T>(), ul.data_ptr<T>(), ur.data_ptr<T>(), ub.data_ptr<T>()};
}

// The whole cell for one row, fused (eval): o = (rank_core(x.U)).V' + b'; hidden is scratch.
template <typename T>
HAMUR_INLINE void project_row(const CellShape& shape, const Factors<T>& f, int64_t d, const T* __restrict x,
                        const T* __restrict rep, T* __restrict hidden, T* __restrict o) {
  const int64_t h = shape.width, k = shape.rank, s = shape.bottleneck;
  vec_mat(hidden + shape.u(), x, f.down_left + d * h * k, h, k);
  rank_core_row(shape, rep, f.down_right + d * k * s, f.down_bias + d * s, f.up_left + d * s * k, hidden);
  vec_mat(o, hidden + shape.r(), f.up_right + d * k * h, k, h);
  axpy(o, T(1), f.up_bias + d * h, h);
}

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

// ------------------------------------------------------------------------------------ statistics
// Per-group mean and M2 (sum of squared deviations) of o's rows, in double: two passes over o (no
// E[o^2] - E[o]^2 cancellation), accumulated per chunk. Empty groups get mean 0, M2 0.
template <typename T>
void batch_moments(const T* o, const Rows& rows, int64_t batch, int64_t width, int64_t groups,
                   const std::vector<int64_t>& count, std::vector<double>& mean_acc, std::vector<double>& sq_acc) {
  const int64_t chunks = num_chunks(batch), n = groups * width;
  std::vector<double> partial(chunks * n, 0.0);
  mean_acc.assign(n, 0.0);
  sq_acc.assign(n, 0.0);
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
}

// Per-group mean and normalising variance of o's rows (batch_moments). Empty groups get mean 0, var 0.
template <typename T>
void batch_statistics(const T* o, const Rows& rows, int64_t batch, int64_t width, int64_t groups,
                      const std::vector<int64_t>& count, T* mean, T* var) {
  std::vector<double> mean_acc, sq_acc;
  batch_moments(o, rows, batch, width, groups, count, mean_acc, sq_acc);
  for (int64_t g = 0; g < groups; ++g) {
    // Paper mode normalises with the biased variance, released mode with the unbiased one (torch.var).
    const int64_t denominator = rows.per_domain ? std::max<int64_t>(count[g], 1) : std::max<int64_t>(count[g] - 1, 1);
    for (int64_t j = 0; j < width; ++j) {
      mean[g * width + j] = static_cast<T>(mean_acc[g * width + j]);
      var[g * width + j] = static_cast<T>(sq_acc[g * width + j] / denominator);
    }
  }
}

// Fills mean, rstd, var, count (per group) from o's rows, or from the given statistics.
template <typename T>
void statistics(const T* o, const Rows& rows, int64_t batch, int64_t width, const std::vector<int64_t>& counts,
                const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, double eps,
                Tensor& mean, Tensor& rstd, Tensor& var, Tensor& count) {
  const int64_t groups = static_cast<int64_t>(counts.size());
  for (int64_t g = 0; g < groups; ++g) count.data_ptr<T>()[g] = static_cast<T>(counts[g]);
  if (stat_mean.has_value()) {
    mean.copy_(*stat_mean);
    var.copy_(*stat_var);
  } else {
    batch_statistics(o, rows, batch, width, groups, counts, mean.data_ptr<T>(), var.data_ptr<T>());
  }
  rstd.copy_(at::rsqrt(var + eps));
}

// out[order[i]] = residual[order[i]] + (o[i] - mean) * weight * rstd + bias with slot i's group (`rows`
// indexes slots); order null means the identity, residual null means none.
template <typename T>
void normalise_rows(const T* o, const int64_t* order, const T* residual, const Rows& rows, int64_t batch,
                    int64_t width, const Tensor& weight, const Tensor& bias, const Tensor& mean, const Tensor& rstd,
                    T* out) {
  const Tensor scale = (weight.reshape(rstd.sizes()) * rstd).contiguous();
  const T* scale_p = scale.data_ptr<T>();
  const T* bias_p = bias.data_ptr<T>();
  const T* mean_p = mean.data_ptr<T>();
  at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) {
      const int64_t offset = rows.group(i) * width;
      const int64_t b = order != nullptr ? order[i] : i;
      const T* __restrict row = o + i * width;
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

// ------------------------------------------------------------------------------------ forward
// Outputs in group order (slot i = original row order[i]): o, hidden; y in the original order.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_forward_cpu(
    const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in, const Tensor& down_left_in,
    const Tensor& down_right_in, const Tensor& down_bias_in, const Tensor& up_left_in, const Tensor& up_right_in,
    const Tensor& up_bias_in, const Tensor& norm_weight_in, const Tensor& norm_bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain, double eps) {
  checks::compiled_cell_forward(c10::DeviceType::CPU, x_in, rep_in, domain_in, down_left_in, down_right_in,
                                down_bias_in, up_left_in, up_right_in, up_bias_in, norm_weight_in, norm_bias_in,
                                stat_mean, stat_var, per_domain);
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
  Tensor mean = at::empty({shape.groups, h}, x.options());
  Tensor rstd = at::empty_like(mean), var = at::empty_like(mean);
  Tensor count = at::empty({shape.groups}, x.options());
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
    statistics(o_p, slots, shape.batch, h, counts, stat_mean, stat_var, eps, mean, rstd, var, count);
    normalise_rows(o_p, order.order.data_ptr<int64_t>(), x.data_ptr<scalar_t>(), slots, shape.batch, h, norm_weight,
                   norm_bias, mean, rstd, y.data_ptr<scalar_t>());
  });
  return {y, o, hidden, order.order, mean, rstd, var, count};
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

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> domain_norm_forward_cpu(
    const Tensor& o_in, const Tensor& domain_in, const Tensor& weight_in, const Tensor& bias_in,
    const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, bool per_domain, double eps) {
  checks::compiled_norm_forward(c10::DeviceType::CPU, o_in, domain_in, weight_in, bias_in, stat_mean, stat_var,
                                per_domain);
  const Tensor o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = per_domain ? weight.size(0) : 1;
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  const std::vector<int64_t> counts = count_rows(rows, batch, groups);
  Tensor y = at::empty_like(o);
  Tensor mean = at::empty({groups, width}, o.options());
  Tensor rstd = at::empty_like(mean), var = at::empty_like(mean);
  Tensor count = at::empty({groups}, o.options());
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_forward_cpu", [&] {
    const scalar_t* o_p = o.data_ptr<scalar_t>();
    statistics(o_p, rows, batch, width, counts, stat_mean, stat_var, eps, mean, rstd, var, count);
    normalise_rows<scalar_t>(o_p, nullptr, nullptr, rows, batch, width, weight, bias, mean, rstd,
                             y.data_ptr<scalar_t>());
  });
  return {y, mean, rstd, var, count};
}

// ------------------------------------------------------------------------------------ backward
// DomainNorm backward. With xhat = (o - mean) * rstd and out = weight * xhat + bias:
//   grad_bias = sum(gy), grad_weight = sum(gy * xhat) over each group's rows;
//   with batch statistics (var = sum(centred^2) / m, m = n biased or n - 1 unbiased)
//     grad_o = rstd * weight * (gy - grad_bias / n - xhat * grad_weight / m),
//   with given statistics grad_o = rstd * weight * gy.
// NormGrad holds the per-group terms so that grad_o costs a few FMAs per element. The centring happens
// before the gain rstd * weight (up to 1/sqrt(eps)) multiplies in, so a one-row group gets exactly 0.
template <typename T>
struct NormGrad {
  std::vector<T> grad_weight, grad_bias;  // (G, h)
  std::vector<T> gain, mean_gy, xhat_coef;  // grad_o = gain * (gy - mean_gy - xhat * xhat_coef)
  const T *mean, *rstd;

  inline void grad_o_row(int64_t g, int64_t width, const T* __restrict gy, const T* __restrict o,
                         T* __restrict out) const {
    const int64_t offset = g * width;
    const T* __restrict row_gain = gain.data() + offset;
    const T* __restrict row_mean_gy = mean_gy.data() + offset;
    const T* __restrict row_xhat_coef = xhat_coef.data() + offset;
    const T* __restrict row_mean = mean + offset;
    const T* __restrict row_rstd = rstd + offset;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const T xhat = (o[j] - row_mean[j]) * row_rstd[j];
      out[j] = row_gain[j] * (gy[j] - row_mean_gy[j] - xhat * row_xhat_coef[j]);
    }
  }
};

// The per-group terms of grad_o from the group sums of gy and gy * xhat (G, h): this rank's, or, in a
// data-parallel step, every rank's (with the global count). unbiased: the variance divides by n - 1.
template <typename T, typename S>
NormGrad<T> norm_grad_terms(const S* sum_gy, const S* sum_gy_xhat, int64_t groups, int64_t width, const T* weight,
                            const T* mean, const T* rstd, const T* count, bool batch_stats, bool unbiased) {
  const int64_t n = groups * width;
  NormGrad<T> out{std::vector<T>(n), std::vector<T>(n), std::vector<T>(n), std::vector<T>(n, T(0)),
                  std::vector<T>(n, T(0)), mean, rstd};
  for (int64_t g = 0; g < groups; ++g) {
    const double rows_in_group = count[g];
    const double var_denominator = unbiased ? std::max(rows_in_group - 1, 1.0) : std::max(rows_in_group, 1.0);
    for (int64_t j = 0; j < width; ++j) {
      const int64_t i = g * width + j;
      out.grad_bias[i] = static_cast<T>(sum_gy[i]);
      out.grad_weight[i] = static_cast<T>(sum_gy_xhat[i]);
      out.gain[i] = weight[i] * rstd[i];
      if (batch_stats && rows_in_group > 0) {
        out.mean_gy[i] = static_cast<T>(sum_gy[i] / rows_in_group);
        out.xhat_coef[i] = static_cast<T>(sum_gy_xhat[i] / var_denominator);
      }
    }
  }
  return out;
}

// gy row i is gy + gy_order[i] * width (gy_order null: row i), o and `rows` are indexed by i.
template <typename T>
NormGrad<T> norm_grad(const T* gy, const int64_t* gy_order, const T* o, const Rows& rows, int64_t batch,
                      int64_t width, int64_t groups, const T* weight, const T* mean, const T* rstd, const T* count,
                      bool batch_stats) {
  const int64_t chunks = num_chunks(batch), n = groups * width;
  std::vector<double> partial(chunks * 2 * n, 0.0);  // per chunk: sum(gy) then sum(gy * xhat)
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    double* acc = partial.data() + c * 2 * n;
    for (int64_t i = first; i < end; ++i) {
      const int64_t offset = rows.group(i) * width;
      double* __restrict sum_gy = acc + offset;
      double* __restrict sum_gy_xhat = acc + n + offset;
      const T* __restrict row_gy = gy + (gy_order != nullptr ? gy_order[i] : i) * width;
      const T* __restrict row_o = o + i * width;
      const T* __restrict row_mean = mean + offset;
      const T* __restrict row_rstd = rstd + offset;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        sum_gy[j] += row_gy[j];
        sum_gy_xhat[j] += static_cast<double>(row_gy[j]) * ((row_o[j] - row_mean[j]) * row_rstd[j]);
      }
    }
  });
  std::vector<double> sums(2 * n, 0.0);  // sum(gy) then sum(gy * xhat)
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < 2 * n; ++i) sums[i] += partial[c * 2 * n + i];
  return norm_grad_terms<T>(sums.data(), sums.data() + n, groups, width, weight, mean, rstd, count, batch_stats,
                            /*unbiased=*/!rows.per_domain);
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
  checks::compiled_norm_backward(c10::DeviceType::CPU, grad_y_in, o_in, domain_in, weight_in, mean_in, rstd_in,
                                 count_in, per_domain);
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
                  mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(), batch_stats);
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

// The split passes of DomainNorm that a data-parallel step runs with a collective between them
// (hamur_fast/distributed/statistics.py): this rank's per-group (count, mean, M2), the normalisation with
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
  for (const Tensor* t : {&weight, &bias, &mean, &rstd})
    TORCH_CHECK(t->numel() == groups * width && t->scalar_type() == o.scalar_type(),
                "compiled_norm_normalise: every per-group table must be (G, h) in o's dtype");
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
                                  const Tensor& weight_in, const Tensor& mean_in, const Tensor& rstd_in,
                                  const Tensor& count_in, const Tensor& sum_dy_in, const Tensor& sum_dy_xhat_in,
                                  bool per_domain, bool unbiased) {
  checks::compiled_norm_input_grad(c10::DeviceType::CPU, grad_y_in, o_in, domain_in, weight_in, mean_in, rstd_in,
                                   count_in, sum_dy_in, sum_dy_xhat_in, per_domain);
  const Tensor gy = grad_y_in.contiguous(), o = o_in.contiguous(), domain = domain_in.contiguous();
  const Tensor weight = weight_in.contiguous(), mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const Tensor count = count_in.contiguous(), sum_dy = sum_dy_in.contiguous(), sum_dy_xhat = sum_dy_xhat_in.contiguous();
  const int64_t batch = o.size(0), width = o.size(1), groups = mean.size(0);
  for (const Tensor* t : {&weight, &rstd, &sum_dy, &sum_dy_xhat})
    TORCH_CHECK(t->numel() == groups * width && t->scalar_type() == o.scalar_type(),
                "compiled_norm_input_grad: every per-group table must be (G, h) in o's dtype");
  TORCH_CHECK(count.numel() == groups && count.scalar_type() == o.scalar_type(), "count must be (G,) in o's dtype");
  const Rows rows{domain.data_ptr<int64_t>(), per_domain};
  check_groups(rows, batch, groups);
  Tensor grad_o = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "domain_norm_input_grad_cpu", [&] {
    const NormGrad<scalar_t> ng = norm_grad_terms<scalar_t>(
        sum_dy.data_ptr<scalar_t>(), sum_dy_xhat.data_ptr<scalar_t>(), groups, width, weight.data_ptr<scalar_t>(),
        mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(), /*batch_stats=*/true,
        unbiased);
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *o_p = o.data_ptr<scalar_t>();
    scalar_t* grad_o_p = grad_o.data_ptr<scalar_t>();
    at::parallel_for(0, batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      for (int64_t b = first; b < end; ++b)
        ng.grad_o_row(rows.group(b), width, gy_p + b * width, o_p + b * width, grad_o_p + b * width);
    });
  });
  return grad_o;
}

// Backward of the rank-k core for one row (hidden as saved by forward). From grad_r = d loss / d r it
// forms grad_q = I.grad_r, grad_z (pre-sigmoid), grad_p = V.grad_z, grad_u = I.grad_p, and writes
// grad_rep = u (x) grad_p + q (x) grad_r once. grad is this row of the (B, 2k + s) gradient buffer
// [grad_q | grad_z | grad_u]. The factors come transposed (up_left_t (k, s), down_right_t (s, k)) so
// that their products are register-strip vec_mats rather than dot products.
template <typename T>
HAMUR_INLINE void rank_core_backward_row(const CellShape& shape, const T* __restrict rep,
                                         const T* __restrict down_right_t, const T* __restrict up_left_t,
                                         const T* __restrict hidden, const T* __restrict grad_r, T* __restrict grad,
                                         T* __restrict grad_p, T* __restrict grad_rep) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  const T* a = hidden + shape.a();
  T* grad_q = grad;
  T* grad_z = grad + k;
  T* grad_u = grad + k + s;
  mat_vec(grad_q, rep, grad_r, k, k);
  vec_mat(grad_z, grad_q, up_left_t, k, s);
  for (int64_t j = 0; j < s; ++j) grad_z[j] *= a[j] * (T(1) - a[j]);
  vec_mat(grad_p, grad_z, down_right_t, s, k);
  mat_vec(grad_u, rep, grad_p, k, k);
  write_two_outers(grad_rep, hidden + shape.u(), grad_p, hidden + shape.q(), grad_r, k);
}

// Backward rank-k core for original rows [first, end) (rep read and grad_rep written in order), row b's
// saved and gradient vectors in slot slot_of[b]; grad_p is scratch (k).
template <typename T>
HAMUR_ROW_PASS void rank_core_backward_rows(const CellShape& shape, const Rows& slots, const int64_t* slot_of,
                                            const T* rep, const T* down_right_t, const T* up_left_t, const T* hidden,
                                            const T* grad_r, T* grad_core, T* grad_p, T* grad_rep, int64_t first,
                                            int64_t end) {
  const int64_t k = shape.rank, s = shape.bottleneck;
  for (int64_t b = first; b < end; ++b) {
    const int64_t i = slot_of[b], d = slots.group(i);
    if (b + 1 < end) {
      const int64_t next = slot_of[b + 1];
      prefetch(hidden + next * shape.stride(), shape.stride(), /*for_write=*/false);
      prefetch(grad_r + next * k, k, /*for_write=*/false);
      prefetch(grad_core + next * (2 * k + s), 2 * k + s, /*for_write=*/true);
    }
    rank_core_backward_row(shape, rep + b * k * k, down_right_t + d * s * k, up_left_t + d * k * s,
                           hidden + i * shape.stride(), grad_r + i * k, grad_core + i * (2 * k + s), grad_p,
                           grad_rep + b * k * k);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> adapter_backward_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& rep_in, const Tensor& domain_in,
    const Tensor& down_left_in, const Tensor& down_right_in, const Tensor& up_left_in, const Tensor& up_right_in,
    const Tensor& norm_weight_in, const Tensor& o_in, const Tensor& hidden_in, const Tensor& order_in,
    const Tensor& mean_in, const Tensor& rstd_in, const Tensor& count_in, bool per_domain, bool batch_stats) {
  checks::compiled_cell_backward(c10::DeviceType::CPU, grad_y_in, x_in, rep_in, domain_in, down_left_in, down_right_in,
                                 up_left_in, up_right_in, norm_weight_in, o_in, hidden_in, order_in, mean_in, rstd_in,
                                 count_in, per_domain);
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
  Tensor grad_r = at::empty({shape.batch, k}, x.options());
  Tensor grad_core = at::empty({shape.batch, 2 * k + s}, x.options());  // [grad_q | grad_z | grad_u]
  Tensor grad_rep = at::empty_like(rep), grad_norm_weight, grad_norm_bias;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu_norm", [&] {
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *o_p = o.data_ptr<scalar_t>();
    const NormGrad<scalar_t> ng = norm_grad(gy_p, order_p, o_p, slots, shape.batch, h, shape.groups,
                                            norm_weight.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                            rstd.data_ptr<scalar_t>(), count_in.contiguous().data_ptr<scalar_t>(),
                                            batch_stats);
    scalar_t* grad_o_p = grad_o.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      for (int64_t i = first; i < end; ++i)
        ng.grad_o_row(slots.group(i), h, gy_p + order_p[i] * h, o_p + i * h, grad_o_p + i * h);
    });
    grad_norm_weight = to_tensor(ng.grad_weight, norm_weight.sizes(), x.options());
    grad_norm_bias = to_tensor(ng.grad_bias, norm_weight.sizes(), x.options());
  });
  // grad_r = grad_o.V'^T, one GEMM per domain.
  for (int64_t g = 0; g < shape.groups; ++g) {
    if (order.rows(g) == 0) continue;
    Tensor grad_r_g = slots_of(grad_r, order, g);
    at::mm_out(grad_r_g, slots_of(grad_o, order, g), param_of(ur, g, per_domain).t());
  }
  const Tensor down_right_t = dr.transpose(-1, -2).contiguous(), up_left_t = ul.transpose(-1, -2).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu_core", [&] {
    const scalar_t *rep_p = rep.data_ptr<scalar_t>(), *dr_p = down_right_t.data_ptr<scalar_t>();
    const scalar_t *ul_p = up_left_t.data_ptr<scalar_t>(), *hidden_p = hidden.data_ptr<scalar_t>();
    const scalar_t* grad_r_p = grad_r.data_ptr<scalar_t>();
    scalar_t *grad_core_p = grad_core.data_ptr<scalar_t>(), *grad_rep_p = grad_rep.data_ptr<scalar_t>();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      std::vector<scalar_t> grad_p(k);
      rank_core_backward_rows(shape, slots, order.slot_of.data(), rep_p, dr_p, ul_p, hidden_p, grad_r_p, grad_core_p,
                              grad_p.data(), grad_rep_p, first, end);
    });
  });
  // The dense products' gradients, one GEMM each per domain: grad_x = gy + grad_u.U^T and the factor
  // gradients as (rows' inputs)^T . (rows' output gradients).
  Tensor grad_dl = at::zeros_like(dl), grad_dr = at::zeros_like(dr), grad_ul = at::zeros_like(ul);
  Tensor grad_ur = at::zeros_like(ur), grad_ub = at::zeros_like(norm_weight);
  Tensor grad_db = per_domain ? at::zeros({shape.groups, s}, x.options()) : at::zeros({s}, x.options());
  Tensor grad_x_sorted = at::empty({shape.batch, h}, x.options());
  const Tensor x_sorted = gather_rows(x, order);
  for (int64_t g = 0; g < shape.groups; ++g) {
    if (order.rows(g) == 0) continue;
    const Tensor hidden_g = slots_of(hidden, order, g), core_g = slots_of(grad_core, order, g);
    const Tensor grad_o_g = slots_of(grad_o, order, g);
    const Tensor grad_q = core_g.narrow(1, 0, k), grad_z = core_g.narrow(1, k, s), grad_u = core_g.narrow(1, k + s, k);
    Tensor grad_x_g = slots_of(grad_x_sorted, order, g);
    Tensor grad_dl_g = param_of(grad_dl, g, per_domain), grad_dr_g = param_of(grad_dr, g, per_domain);
    Tensor grad_ul_g = param_of(grad_ul, g, per_domain), grad_ur_g = param_of(grad_ur, g, per_domain);
    Tensor grad_db_g = param_of(grad_db, g, per_domain), grad_ub_g = param_of(grad_ub, g, per_domain);
    at::mm_out(grad_x_g, grad_u, param_of(dl, g, per_domain).t());
    at::mm_out(grad_dl_g, slots_of(x_sorted, order, g).t(), grad_u);
    at::mm_out(grad_dr_g, hidden_g.narrow(1, shape.p(), k).t(), grad_z);
    at::mm_out(grad_ul_g, hidden_g.narrow(1, shape.a(), s).t(), grad_q);
    at::mm_out(grad_ur_g, hidden_g.narrow(1, shape.r(), k).t(), grad_o_g);
    at::sum_out(grad_db_g, grad_z, 0);
    at::sum_out(grad_ub_g, grad_o_g, 0);
  }
  // grad_x = gy + (grad_u.U^T) back in the original row order.
  Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adapter_backward_cpu_grad_x", [&] {
    const scalar_t *gy_p = gy.data_ptr<scalar_t>(), *sorted_p = grad_x_sorted.data_ptr<scalar_t>();
    scalar_t* grad_x_p = grad_x.data_ptr<scalar_t>();
    const int64_t* slot_of = order.slot_of.data();
    at::parallel_for(0, shape.batch, kMinRowsPerChunk, [&](int64_t first, int64_t end) {
      for (int64_t b = first; b < end; ++b) add_rows(gy_p + b * h, sorted_p + slot_of[b] * h, h, grad_x_p + b * h);
    });
  });
  return {grad_x, grad_rep, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub, grad_norm_weight, grad_norm_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(hamur_fast, CPU, m) {
  m.impl("compiled_cell_forward", &adapter_forward_cpu);
  m.impl("compiled_cell_backward", &adapter_backward_cpu);
  m.impl("compiled_cell_infer", &adapter_infer_cpu);
  m.impl("compiled_norm_forward", &domain_norm_forward_cpu);
  m.impl("compiled_norm_backward", &domain_norm_backward_cpu);
  m.impl("compiled_norm_statistics", &domain_norm_statistics_cpu);
  m.impl("compiled_norm_normalise", &domain_norm_normalise_cpu);
  m.impl("compiled_norm_input_grad", &domain_norm_input_grad_cpu);
}

}  // namespace hamur_fast
