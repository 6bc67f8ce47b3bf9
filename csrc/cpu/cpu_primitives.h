// Shared primitives of the CPU kernels (csrc/cpu/*.cpp): vector helpers, row chunks, row grouping by
// domain, the rank-k core of one row, DomainNorm statistics and gradient terms. Each op family is its own
// translation unit including this header, so that the build compiles them in parallel.
//
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
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../plan.h"

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
namespace cpu {

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

// out[r] (n) = v[r] (m) . M[r] (m, n) + bias (n, or null) for kRows rows at once, M[r] row-major. With one
// shared matrix (kOwnMatrix false: M[0] serves every row; the dense projections x.DL and v.UR of a row
// block), each element of M loaded serves all kRows rows, so a block costs one pass over M at FMA rather
// than load throughput. With a matrix per row (the rows' own I_b), the kRows * kVectors accumulators are
// independent chains the core interleaves, instead of one row's chain waiting on each FMA's latency.
template <typename T, int kRows, int kVectors, bool kOwnMatrix>
HAMUR_INLINE void rows_mat_strip(T* const* out, const T* const* v, const T* const* M, const T* bias, int64_t m,
                                 int64_t n, int64_t first_col, int64_t width) {
  constexpr int64_t kLanes = 64 / sizeof(T);
  Vec512<T> acc[kRows][kVectors] = {};
  // Full-vector loads may run past the strip's last column into the next row of M (those lanes are
  // discarded); rows whose loads would run past the end of M itself take the scalar path below.
  const int64_t vector_rows = rows_in_reach(m, n, first_col, kVectors * kLanes);
  for (int64_t i = 0; i < vector_rows; ++i) {
    Vec512<T> column[kVectors];
    if (!kOwnMatrix)
      for (int t = 0; t < kVectors; ++t) column[t] = load_vec(M[0] + i * n + first_col + t * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const T vi = v[r][i];
      for (int t = 0; t < kVectors; ++t)
        acc[r][t] += vi * (kOwnMatrix ? load_vec(M[r] + i * n + first_col + t * kLanes) : column[t]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const T* Mr = M[kOwnMatrix ? r : 0];
    T lanes[kVectors * kLanes];
    __builtin_memcpy(lanes, acc[r], sizeof(lanes));
    for (int64_t i = vector_rows; i < m; ++i)
      for (int64_t j = 0; j < width; ++j) lanes[j] += v[r][i] * Mr[i * n + first_col + j];
    if (bias != nullptr)
      for (int64_t j = 0; j < width; ++j) lanes[j] += bias[first_col + j];
    for (int64_t j = 0; j < width; ++j) out[r][first_col + j] = lanes[j];
  }
}

// Strips of up to kStrip vectors: kRows * kStrip accumulators stay in registers (16 of 32 on AVX-512).
template <typename T, int kRows, bool kOwnMatrix>
HAMUR_INLINE void rows_mat_strips(T* const* out, const T* const* v, const T* const* M, const T* bias, int64_t m,
                                  int64_t n) {
  constexpr int64_t kLanes = 64 / sizeof(T), kStrip = 4;
  for (int64_t first = 0; first < n; first += kStrip * kLanes) {
    const int64_t width = std::min(kStrip * kLanes, n - first);
    switch ((width + kLanes - 1) / kLanes) {
      case 1: rows_mat_strip<T, kRows, 1, kOwnMatrix>(out, v, M, bias, m, n, first, width); break;
      case 2: rows_mat_strip<T, kRows, 2, kOwnMatrix>(out, v, M, bias, m, n, first, width); break;
      case 3: rows_mat_strip<T, kRows, 3, kOwnMatrix>(out, v, M, bias, m, n, first, width); break;
      default: rows_mat_strip<T, kRows, 4, kOwnMatrix>(out, v, M, bias, m, n, first, width); break;
    }
  }
}

// kRows rows times one shared matrix M (m, n), plus bias (or null).
template <typename T, int kRows>
HAMUR_INLINE void rows_mat(T* const* out, const T* const* v, const T* M, const T* bias, int64_t m, int64_t n) {
  const T* const shared[1] = {M};
  rows_mat_strips<T, kRows, false>(out, v, shared, bias, m, n);
}

// kRows rows, each times its own matrix M[r] (m, n).
template <typename T, int kRows>
HAMUR_INLINE void rows_own_mat(T* const* out, const T* const* v, const T* const* M, int64_t m, int64_t n) {
  rows_mat_strips<T, kRows, true>(out, v, M, nullptr, m, n);
}

// One row: out (n) = v (m) . M (m, n).
template <typename T>
HAMUR_INLINE void vec_mat(T* __restrict out, const T* __restrict v, const T* __restrict M, int64_t m, int64_t n) {
  T* const out_rows[1] = {out};
  const T* const v_rows[1] = {v};
  rows_mat<T, 1>(out_rows, v_rows, M, nullptr, m, n);
}

// exp of float lanes: Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial, 2^n built in
// the exponent bits), within 2 ulp of the exact value; the argument is clamped to [-87.3, 88.3], whose
// exp is a normal float. GCC does not vectorise calls to std::exp without -ffast-math.
HAMUR_INLINE Vec512<float> exp_lanes(Vec512<float> x) {
  typedef int32_t Vec512i __attribute__((vector_size(64)));
  x = x < 88.3762626647949f ? x : 88.3762626647949f;
  x = x > -87.3365478515625f ? x : -87.3365478515625f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Vec512<float> n = (x * 1.44269504088896341f + kRound) - kRound;
  const Vec512<float> r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Vec512<float> y = 1.9875691500E-4f * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * (r * r) + r + 1.0f;
  const Vec512i bits = (__builtin_convertvector(n, Vec512i) + 127) << 23;
  Vec512<float> scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// a = sigmoid(a) in place (n).
HAMUR_INLINE void sigmoid_row(float* a, int64_t n) {
  constexpr int64_t kLanes = 16;
  for (int64_t j = 0; j < n; j += kLanes) {
    float lanes[kLanes] = {};
    const int64_t width = std::min(kLanes, n - j);
    for (int64_t t = 0; t < width; ++t) lanes[t] = a[j + t];
    const Vec512<float> z = load_vec(lanes);
    const Vec512<float> sig = 1.0f / (1.0f + exp_lanes(-z));
    __builtin_memcpy(lanes, &sig, sizeof(lanes));
    for (int64_t t = 0; t < width; ++t) a[j + t] = lanes[t];
  }
}

HAMUR_INLINE void sigmoid_row(double* a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) a[j] = 1.0 / (1.0 + std::exp(-a[j]));
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

// How far ahead the light passes over group order (one short row of work per row: DomainNorm sums and
// gradients, the residual write, row copies) fetch the original rows they jump to: one row ahead would
// arrive late.
constexpr int64_t kRowsAhead = 4;

// ------------------------------------------------------------------------------------ row chunks
// Below this many rows per thread the fork/join costs more than the rows.
constexpr int64_t kMinRowsPerChunk = 32;

inline int64_t num_chunks(int64_t rows, int64_t min_rows_per_chunk = kMinRowsPerChunk) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / min_rows_per_chunk));
}

// fn(chunk, first_row, end_row) for each of `chunks` contiguous, balanced row ranges, in parallel.
// Any ATen op in fn (level 2's block GEMMs, on tensors that may require grad) runs outside autograd, in every
// worker thread (grad mode is thread-local).
template <typename F>
void parallel_chunks(int64_t rows, int64_t chunks, const F& fn) {
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    at::NoGradGuard no_grad;
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
  // hidden row layout [p | q | u | v | a] (the contract's letters), see csrc/cpu/ops.cpp
  int64_t stride() const { return 4 * rank + bottleneck; }
  int64_t p() const { return 0; }
  int64_t q() const { return rank; }
  int64_t u() const { return 2 * rank; }
  int64_t v() const { return 3 * rank; }
  int64_t a() const { return 4 * rank; }
};

inline CellShape cell_shape(const Tensor& x, const Tensor& rep, const Tensor& down_right, bool per_domain,
                            const Tensor& norm_weight) {
  return {x.size(0), x.size(1), rep.size(1), down_right.size(-1), per_domain ? norm_weight.size(0) : 1};
}

// Every domain id is read before any table is indexed with it: the Python-side check may be off
// (hf.set_value_checks(False)) or skipped (torch.compile), and reading B ids costs nothing on the CPU.
inline void check_groups(const Rows& rows, int64_t batch, int64_t groups) {
  if (!rows.per_domain) return;  // released mode never indexes by domain
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(rows.domain[b] >= 0 && rows.domain[b] < groups, "domain id ", rows.domain[b], " at row ", b,
                " is out of range for ", groups, " domains");
}

inline std::vector<int64_t> count_rows(const Rows& rows, int64_t batch, int64_t groups) {
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

inline GroupOrder order_by_group(const Rows& rows, const std::vector<int64_t>& count,
                                  const at::TensorOptions& options) {
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
inline GroupOrder saved_order(const Tensor& order, const Tensor& count) {
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
inline Tensor gather_rows(const Tensor& t, const GroupOrder& order) {
  Tensor out = at::empty_like(t);
  const int64_t n = t.size(1), bytes = n * static_cast<int64_t>(t.element_size());
  const char* src = static_cast<const char*>(t.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* rows = order.order.data_ptr<int64_t>();
  at::parallel_for(0, t.size(0), kMinRowsPerChunk, [&](int64_t first, int64_t end) {
    for (int64_t i = first; i < end; ++i) {
      if (i + kRowsAhead < end) prefetch(src + rows[i + kRowsAhead] * bytes, bytes, /*for_write=*/false);
      std::memcpy(dst + i * bytes, src + rows[i] * bytes, bytes);
    }
  });
  return out;
}

inline Tensor param_of(const Tensor& param, int64_t g, bool per_domain) { return per_domain ? param[g] : param; }

// The slots of group g of a (B, ...) tensor in group order.
inline Tensor slots_of(const Tensor& t, const GroupOrder& order, int64_t g) {
  return t.narrow(0, order.start[g], order.rows(g));
}

// ------------------------------------------------------------------------------------ rank-k core
// The cell's per-row middle, between the dense projections (level 1's eval, level 2): from p = x.DL it forms
// q = p.I, a = sigmoid(q.DR + db), u = a.UL, v = u.I (k and s long; I (k, k), DR (k, s), UL (s, k)).
template <typename T>
HAMUR_INLINE void rank_core_row(int64_t k, int64_t s, const T* __restrict rep, const T* __restrict down_right,
                                const T* __restrict down_bias, const T* __restrict up_left, const T* __restrict p,
                                T* __restrict q, T* __restrict a, T* __restrict u, T* __restrict v) {
  vec_mat(q, p, rep, k, k);
  vec_mat(a, q, down_right, k, s);
  for (int64_t j = 0; j < s; ++j) a[j] += down_bias[j];
  sigmoid_row(a, s);
  vec_mat(u, a, up_left, s, k);
  vec_mat(v, u, rep, k, k);
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

// Fills count, mean, m2, rstd (per group, the contract's order) from o's rows with batch statistics (empty groups:
// mean 0, m2 0), or mean and rstd from the given running statistics (m2 0).
template <typename T>
void statistics(const T* o, const Rows& rows, int64_t batch, int64_t width, const std::vector<int64_t>& counts,
                const c10::optional<Tensor>& stat_mean, const c10::optional<Tensor>& stat_var, const NormPlan& plan,
                Tensor& count, Tensor& mean, Tensor& m2, Tensor& rstd) {
  const int64_t groups = static_cast<int64_t>(counts.size());
  for (int64_t g = 0; g < groups; ++g) count.data_ptr<T>()[g] = static_cast<T>(counts[g]);
  if (!plan.batch_statistics) {
    mean.copy_(*stat_mean);
    m2.zero_();
    rstd.copy_(at::rsqrt(*stat_var + plan.eps));
    return;
  }
  std::vector<double> mean_acc, sq_acc;
  batch_moments(o, rows, batch, width, groups, counts, mean_acc, sq_acc);
  Tensor var = at::empty_like(mean);  // the variance normalised with, divided in double as the moments are kept
  T *mean_p = mean.data_ptr<T>(), *m2_p = m2.data_ptr<T>(), *var_p = var.data_ptr<T>();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t divisor = std::max<int64_t>(counts[g] - (plan.unbiased ? 1 : 0), 1);
    for (int64_t j = 0; j < width; ++j) {
      const int64_t i = g * width + j;
      mean_p[i] = static_cast<T>(mean_acc[i]);
      m2_p[i] = static_cast<T>(sq_acc[i]);
      var_p[i] = static_cast<T>(sq_acc[i] / divisor);
    }
  }
  rstd.copy_(at::rsqrt(var + plan.eps));
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
      if (order != nullptr && i + kRowsAhead < end) {
        if (residual != nullptr) prefetch(residual + order[i + kRowsAhead] * width, width, /*for_write=*/false);
        prefetch(out + order[i + kRowsAhead] * width, width, /*for_write=*/true);
      }
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

// ------------------------------------------------------------------------------------ backward
// DomainNorm backward. With xhat = (o - mean) * rstd and out = weight * xhat + bias:
//   grad_bias = sum(gy), grad_weight = sum(gy * xhat) over each group's rows;
//   with batch statistics (var = sum(centred^2) / m, m = n biased or n - 1 unbiased)
//     grad_o = rstd * weight * (gy - grad_bias / n - xhat * grad_weight / m),
//   with given statistics grad_o = rstd * weight * gy.
// NormGrad holds the per-group terms so that grad_o costs a few FMAs per element. The centring happens
// before the gain rstd * weight (up to 1/sqrt(eps)) multiplies in, so a one-row group gets exactly 0.
// xhat is centred again by its own group mean (0 in exact arithmetic): the float mean's rounding,
// multiplied by rstd in xhat and again by the gain, would otherwise leave the group's sum of grad_o (the
// up_bias gradient, 0 by construction) at ~rstd^2 * ulp(o): 2.5e-4 in a 2-row domain, against torch's 4e-6.
template <typename T>
struct NormGrad {
  std::vector<T> grad_weight, grad_bias;  // (G, h)
  // grad_o = gain * (gy - mean_gy - (xhat - mean_xhat) * xhat_coef)
  std::vector<T> gain, mean_gy, xhat_coef, mean_xhat;
  const T *mean, *rstd;

  inline void grad_o_row(int64_t g, int64_t width, const T* __restrict gy, const T* __restrict o,
                         T* __restrict out) const {
    const int64_t offset = g * width;
    const T* __restrict row_gain = gain.data() + offset;
    const T* __restrict row_mean_gy = mean_gy.data() + offset;
    const T* __restrict row_xhat_coef = xhat_coef.data() + offset;
    const T* __restrict row_mean_xhat = mean_xhat.data() + offset;
    const T* __restrict row_mean = mean + offset;
    const T* __restrict row_rstd = rstd + offset;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const T xhat = (o[j] - row_mean[j]) * row_rstd[j] - row_mean_xhat[j];
      out[j] = row_gain[j] * (gy[j] - row_mean_gy[j] - xhat * row_xhat_coef[j]);
    }
  }
};

// The per-group terms of grad_o from the group sums of gy and gy * xhat (G, h): this rank's, or, in a
// data-parallel step, every rank's (with the global count). unbiased: the variance divides by n - 1.
// sum_xhat (this rank's group sums of xhat, or null: no re-centring) feeds mean_xhat.
template <typename T, typename S>
NormGrad<T> norm_grad_terms(const S* sum_gy, const S* sum_gy_xhat, int64_t groups, int64_t width, const T* weight,
                            const T* mean, const T* rstd, const T* count, bool batch_statistics, bool unbiased,
                            const S* sum_xhat = nullptr) {
  const int64_t n = groups * width;
  NormGrad<T> out{std::vector<T>(n), std::vector<T>(n), std::vector<T>(n), std::vector<T>(n, T(0)),
                  std::vector<T>(n, T(0)), std::vector<T>(n, T(0)), mean, rstd};
  for (int64_t g = 0; g < groups; ++g) {
    const double rows_in_group = count[g];
    const double var_denominator = unbiased ? std::max(rows_in_group - 1, 1.0) : std::max(rows_in_group, 1.0);
    for (int64_t j = 0; j < width; ++j) {
      const int64_t i = g * width + j;
      out.grad_bias[i] = static_cast<T>(sum_gy[i]);
      out.grad_weight[i] = static_cast<T>(sum_gy_xhat[i]);
      out.gain[i] = weight[i] * rstd[i];
      if (batch_statistics && rows_in_group > 0) {
        out.mean_gy[i] = static_cast<T>(sum_gy[i] / rows_in_group);
        out.xhat_coef[i] = static_cast<T>(sum_gy_xhat[i] / var_denominator);
        if (sum_xhat != nullptr) out.mean_xhat[i] = static_cast<T>(sum_xhat[i] / rows_in_group);
      }
    }
  }
  return out;
}

// gy row i is gy + gy_order[i] * width (gy_order null: row i), o and `rows` are indexed by i.
template <typename T>
NormGrad<T> norm_grad(const T* gy, const int64_t* gy_order, const T* o, const Rows& rows, int64_t batch,
                      int64_t width, int64_t groups, const T* weight, const T* mean, const T* rstd, const T* count,
                      const NormPlan& plan) {
  const int64_t chunks = num_chunks(batch), n = groups * width;
  std::vector<double> partial(chunks * 3 * n, 0.0);  // per chunk: sum(gy), sum(gy * xhat), sum(xhat)
  parallel_chunks(batch, chunks, [&](int64_t c, int64_t first, int64_t end) {
    double* acc = partial.data() + c * 3 * n;
    for (int64_t i = first; i < end; ++i) {
      if (gy_order != nullptr && i + kRowsAhead < end)
        prefetch(gy + gy_order[i + kRowsAhead] * width, width, /*for_write=*/false);
      const int64_t offset = rows.group(i) * width;
      double* __restrict sum_gy = acc + offset;
      double* __restrict sum_gy_xhat = acc + n + offset;
      double* __restrict sum_xhat = acc + 2 * n + offset;
      const T* __restrict row_gy = gy + (gy_order != nullptr ? gy_order[i] : i) * width;
      const T* __restrict row_o = o + i * width;
      const T* __restrict row_mean = mean + offset;
      const T* __restrict row_rstd = rstd + offset;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T xhat = (row_o[j] - row_mean[j]) * row_rstd[j];
        sum_gy[j] += row_gy[j];
        sum_gy_xhat[j] += static_cast<double>(row_gy[j]) * xhat;
        sum_xhat[j] += xhat;
      }
    }
  });
  std::vector<double> sums(3 * n, 0.0);  // sum(gy), sum(gy * xhat), sum(xhat)
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < 3 * n; ++i) sums[i] += partial[c * 3 * n + i];
  return norm_grad_terms<T>(sums.data(), sums.data() + n, groups, width, weight, mean, rstd, count,
                            plan.batch_statistics, plan.unbiased, sums.data() + 2 * n);
}

template <typename T>
Tensor to_tensor(const std::vector<T>& values, at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  std::copy(values.begin(), values.end(), t.data_ptr<T>());
  return t;
}
}  // namespace cpu
}  // namespace hamur_fast
