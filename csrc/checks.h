// Argument checks shared by every hamur_fast op entry point, CPU and CUDA (schemas: csrc/cpu/ops.cpp).
//
// A kernel indexes its tables with sizes read from *other* arguments (the rank from rep, the number of
// domains from norm_weight...), so one mis-shaped argument would read or write past a buffer. Every entry
// function therefore checks every tensor's layout, device, dtype and exact shape here, before any kernel runs:
// O(1) per argument, a TORCH_CHECK error naming the op and the argument. The domain-id *values* are checked by
// the kernels themselves (CPU: while counting rows; CUDA: rows with a bad id get NaN).
#pragma once

#include <ATen/ATen.h>

#include "plan.h"

#include <vector>

namespace hamur_fast {
namespace checks {

// The op being checked, and its main (B, h) input (x or o), whose device and dtype every table must share.
struct Op {
  const char* name;
  const at::Tensor& like;
};

inline void check_dense_on_device(const Op& op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op.name, ": ", arg, " is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided, op.name, ": ", arg, " must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(t.device() == op.like.device(), op.name, ": ", arg, " must be on ", op.like.device(),
              " like the op's main input, got ", t.device());
}

inline void check_shape(const Op& op, const char* arg, const at::Tensor& t, at::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, op.name, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
}

// A float table of exactly `shape`, on the main input's device and in its dtype.
inline void check_float(const Op& op, const char* arg, const at::Tensor& t, at::IntArrayRef shape) {
  check_dense_on_device(op, arg, t);
  TORCH_CHECK(t.scalar_type() == op.like.scalar_type(), op.name, ": ", arg, " must be ", op.like.scalar_type(),
              " like the op's main input, got ", t.scalar_type());
  check_shape(op, arg, t, shape);
}

inline void check_int64(const Op& op, const char* arg, const at::Tensor& t, at::IntArrayRef shape) {
  check_dense_on_device(op, arg, t);
  TORCH_CHECK(t.scalar_type() == at::kLong, op.name, ": ", arg, " must be int64, got ", t.scalar_type());
  check_shape(op, arg, t, shape);
}

// The main input: a float32 or float64 tensor of `dims` axes (`axes` names them) on a device of `device_type`.
inline void check_main_input(const Op& op, const char* arg, c10::DeviceType device_type, int64_t dims = 2,
                             const char* axes = "(B, h)") {
  const at::Tensor& t = op.like;
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op.name, ": ", arg, " must be a dense (strided) tensor");
  TORCH_CHECK(t.device().type() == device_type, op.name, ": this kernel runs on ", c10::DeviceTypeName(device_type),
              " tensors, got ", arg, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op.name, ": ", arg,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, op.name, ": ", arg, " must be ", dims, "-D ", axes, ", got shape ", t.sizes());
}

// `inner` with a leading domain axis of `groups` in paper mode (per_domain), as it is in released mode.
inline std::vector<int64_t> per_group(bool per_domain, int64_t groups, at::IntArrayRef inner) {
  std::vector<int64_t> shape;
  if (per_domain) shape.push_back(groups);
  shape.insert(shape.end(), inner.begin(), inner.end());
  return shape;
}

struct CellSizes {
  int64_t batch, width, rank, bottleneck, groups;
};

// The tensors every adapter-cell op takes: x (B, h), rep (B, k, k), domain (B,) int64 and the factors
// down_left (D, h, k), down_right (D, k, s), up_left (D, s, k), up_right (D, k, h), norm_weight (D, h) in paper
// mode (per_domain), the same without the leading D in released mode. The sizes come from x, rep, down_right
// and norm_weight once their ranks are checked.
inline CellSizes check_cell(const Op& op, c10::DeviceType device_type, const at::Tensor& rep,
                            const at::Tensor& domain, const at::Tensor& down_left, const at::Tensor& down_right,
                            const at::Tensor& up_left, const at::Tensor& up_right, const at::Tensor& norm_weight,
                            bool per_domain) {
  check_main_input(op, "x", device_type);
  const int64_t factor_dim = per_domain ? 3 : 2;
  TORCH_CHECK(rep.dim() == 3, op.name, ": rep must be 3-D (B, k, k), got shape ", rep.sizes());
  TORCH_CHECK(down_right.dim() == factor_dim, op.name, ": down_right must be ", factor_dim, "-D, got shape ",
              down_right.sizes());
  TORCH_CHECK(norm_weight.dim() == factor_dim - 1, op.name, ": norm_weight must be ", factor_dim - 1,
              "-D, got shape ", norm_weight.sizes());
  const CellSizes n{op.like.size(0), op.like.size(1), rep.size(1), down_right.size(-1),
                    per_domain ? norm_weight.size(0) : 1};
  TORCH_CHECK(n.rank >= 1 && n.bottleneck >= 1 && n.groups >= 1, op.name, ": rank k, bottleneck s and the number ",
              "of domains must be >= 1, got k=", n.rank, " s=", n.bottleneck, " D=", n.groups);
  check_float(op, "rep", rep, {n.batch, n.rank, n.rank});
  check_int64(op, "domain", domain, {n.batch});
  check_float(op, "down_left", down_left, per_group(per_domain, n.groups, {n.width, n.rank}));
  check_float(op, "down_right", down_right, per_group(per_domain, n.groups, {n.rank, n.bottleneck}));
  check_float(op, "up_left", up_left, per_group(per_domain, n.groups, {n.bottleneck, n.rank}));
  check_float(op, "up_right", up_right, per_group(per_domain, n.groups, {n.rank, n.width}));
  check_float(op, "norm_weight", norm_weight, per_group(per_domain, n.groups, {n.width}));
  return n;
}

// The biases of a forward pass: down_bias (D, s), up_bias (D, h), norm_bias (D, h) (no D in released mode).
inline void check_cell_biases(const Op& op, const CellSizes& n, bool per_domain, const at::Tensor& down_bias,
                              const at::Tensor& up_bias, const at::Tensor& norm_bias) {
  check_float(op, "down_bias", down_bias, per_group(per_domain, n.groups, {n.bottleneck}));
  check_float(op, "up_bias", up_bias, per_group(per_domain, n.groups, {n.width}));
  check_float(op, "norm_bias", norm_bias, per_group(per_domain, n.groups, {n.width}));
}

// Given statistics (running mean and variance): both exactly when the plan normalises without batch statistics,
// each (G, h).
inline void check_given_statistics(const Op& op, int64_t groups, int64_t width, const c10::optional<at::Tensor>& mean,
                                   const c10::optional<at::Tensor>& var, const NormPlan& plan) {
  TORCH_CHECK(mean.has_value() == var.has_value(), op.name, ": stat_mean and stat_var come together or not at all");
  TORCH_CHECK(mean.has_value() != plan.batch_statistics, op.name,
              plan.batch_statistics ? ": batch statistics take no stat_mean / stat_var"
                                    : ": running statistics need stat_mean and stat_var");
  if (!mean.has_value()) return;
  check_float(op, "stat_mean", *mean, {groups, width});
  check_float(op, "stat_var", *var, {groups, width});
}

// What a cell backward reads from its forward: o (B, h), hidden (B, 4k + s), order (B,) int64, count (G,),
// mean and rstd (G, h), and the incoming gradient grad_y (B, h).
inline void check_cell_saved(const Op& op, const CellSizes& n, const at::Tensor& grad_y, const at::Tensor& o,
                             const at::Tensor& hidden, const at::Tensor& order, const at::Tensor& count,
                             const at::Tensor& mean, const at::Tensor& rstd) {
  check_float(op, "grad_y", grad_y, {n.batch, n.width});
  check_float(op, "o", o, {n.batch, n.width});
  check_float(op, "hidden", hidden, {n.batch, 4 * n.rank + n.bottleneck});
  check_int64(op, "order", order, {n.batch});
  check_float(op, "count", count, {n.groups});
  check_float(op, "mean", mean, {n.groups, n.width});
  check_float(op, "rstd", rstd, {n.groups, n.width});
}

// DomainNorm's inputs o (B, h) and domain (B,) int64; returns (B, h).
inline std::pair<int64_t, int64_t> check_norm_input(const Op& op, c10::DeviceType device_type,
                                                    const at::Tensor& domain) {
  check_main_input(op, "o", device_type);
  check_int64(op, "domain", domain, {op.like.size(0)});
  return {op.like.size(0), op.like.size(1)};
}

// A per-group table of DomainNorm: (G, h); in released mode (one group) also (h,).
inline void check_group_table(const Op& op, const char* arg, const at::Tensor& t, int64_t groups, int64_t width,
                              bool per_domain) {
  if (!per_domain && groups == 1 && t.dim() == 1) {
    check_float(op, arg, t, {width});
  } else {
    check_float(op, arg, t, {groups, width});
  }
}

// The number of statistics groups a DomainNorm table implies: its leading size in paper mode, else 1.
inline int64_t norm_groups(const Op& op, const at::Tensor& table, bool per_domain) {
  TORCH_CHECK(table.dim() == 1 || table.dim() == 2, op.name, ": per-group tables must be (G, h) or (h,), got shape ",
              table.sizes());
  const int64_t groups = per_domain ? (table.dim() == 2 ? table.size(0) : 0) : 1;
  TORCH_CHECK(groups >= 1, op.name, ": paper mode (per_domain) needs (D, h) tables with D >= 1, got shape ",
              table.sizes());
  return groups;
}

// ------------------------------------------------------------------------------------ one check per op
// Called first thing by the op's CPU and CUDA entry functions, with the arguments in schema order.

inline void compiled_cell_forward(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& rep,
                                  const at::Tensor& domain, const at::Tensor& down_left, const at::Tensor& down_right,
                                  const at::Tensor& down_bias, const at::Tensor& up_left, const at::Tensor& up_right,
                                  const at::Tensor& up_bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                  const c10::optional<at::Tensor>& stat_mean, const c10::optional<at::Tensor>& stat_var,
                                  const NormPlan& plan) {
  const Op op{"compiled_cell_forward", x};
  const CellSizes n = check_cell(op, device_type, rep, domain, down_left, down_right, up_left, up_right, norm_weight,
                                 plan.per_domain);
  check_cell_biases(op, n, plan.per_domain, down_bias, up_bias, norm_bias);
  check_given_statistics(op, n.groups, n.width, stat_mean, stat_var, plan);
}

inline void compiled_cell_infer(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& rep,
                                const at::Tensor& domain, const at::Tensor& down_left, const at::Tensor& down_right,
                                const at::Tensor& down_bias, const at::Tensor& up_left, const at::Tensor& up_right,
                                const at::Tensor& up_bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                                const at::Tensor& running_mean, const at::Tensor& running_var) {
  const Op op{"compiled_cell_infer", x};  // paper mode only: running statistics exist per domain
  const CellSizes n = check_cell(op, device_type, rep, domain, down_left, down_right, up_left, up_right, norm_weight,
                                 /*per_domain=*/true);
  check_cell_biases(op, n, /*per_domain=*/true, down_bias, up_bias, norm_bias);
  check_float(op, "running_mean", running_mean, {n.groups, n.width});
  check_float(op, "running_var", running_var, {n.groups, n.width});
}

inline void compiled_cell_backward(c10::DeviceType device_type, const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& rep, const at::Tensor& domain, const at::Tensor& down_left,
                                   const at::Tensor& down_right, const at::Tensor& up_left, const at::Tensor& up_right,
                                   const at::Tensor& norm_weight, const at::Tensor& o, const at::Tensor& hidden,
                                   const at::Tensor& order, const at::Tensor& count, const at::Tensor& mean,
                                   const at::Tensor& rstd, const NormPlan& plan) {
  const Op op{"compiled_cell_backward", x};
  const CellSizes n = check_cell(op, device_type, rep, domain, down_left, down_right, up_left, up_right, norm_weight,
                                 plan.per_domain);
  check_cell_saved(op, n, grad_y, o, hidden, order, count, mean, rstd);
}

inline void compiled_norm_forward(c10::DeviceType device_type, const at::Tensor& o, const at::Tensor& domain,
                                  const at::Tensor& weight, const at::Tensor& bias,
                                  const c10::optional<at::Tensor>& stat_mean, const c10::optional<at::Tensor>& stat_var,
                                  const NormPlan& plan) {
  const Op op{"compiled_norm_forward", o};
  const int64_t width = check_norm_input(op, device_type, domain).second;
  const int64_t groups = norm_groups(op, weight, plan.per_domain);
  check_group_table(op, "weight", weight, groups, width, plan.per_domain);
  check_group_table(op, "bias", bias, groups, width, plan.per_domain);
  check_given_statistics(op, groups, width, stat_mean, stat_var, plan);
}

// The statistics tables (count, mean, rstd) are (G,) and (G, h); weight also (h,) in released mode.
inline void compiled_norm_backward(c10::DeviceType device_type, const at::Tensor& grad_y, const at::Tensor& o,
                                   const at::Tensor& domain, const at::Tensor& weight, const at::Tensor& count,
                                   const at::Tensor& mean, const at::Tensor& rstd, const NormPlan& plan) {
  const Op op{"compiled_norm_backward", o};
  const auto rows = check_norm_input(op, device_type, domain);
  const int64_t groups = norm_groups(op, mean, plan.per_domain);
  check_float(op, "grad_y", grad_y, {rows.first, rows.second});
  check_group_table(op, "weight", weight, groups, rows.second, plan.per_domain);
  check_float(op, "count", count, {groups});
  check_float(op, "mean", mean, {groups, rows.second});
  check_float(op, "rstd", rstd, {groups, rows.second});
}

inline void compiled_norm_statistics(c10::DeviceType device_type, const at::Tensor& o, const at::Tensor& domain,
                                     int64_t num_groups) {
  const Op op{"compiled_norm_statistics", o};
  check_norm_input(op, device_type, domain);
  TORCH_CHECK(num_groups >= 1, op.name, ": num_groups must be >= 1, got ", num_groups);
}

inline void compiled_norm_normalise(c10::DeviceType device_type, const at::Tensor& o, const at::Tensor& domain,
                                    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,
                                    const at::Tensor& rstd, bool per_domain) {
  const Op op{"compiled_norm_normalise", o};
  const int64_t width = check_norm_input(op, device_type, domain).second, groups = norm_groups(op, mean, per_domain);
  check_group_table(op, "weight", weight, groups, width, per_domain);
  check_group_table(op, "bias", bias, groups, width, per_domain);
  check_float(op, "mean", mean, {groups, width});
  check_float(op, "rstd", rstd, {groups, width});
}

inline void compiled_norm_input_grad(c10::DeviceType device_type, const at::Tensor& grad_y, const at::Tensor& o,
                                     const at::Tensor& domain, const at::Tensor& weight, const at::Tensor& count,
                                     const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& sum_dy,
                                     const at::Tensor& sum_dy_xhat, bool per_domain) {
  const Op op{"compiled_norm_input_grad", o};
  const auto rows = check_norm_input(op, device_type, domain);
  const int64_t width = rows.second, groups = norm_groups(op, mean, per_domain);
  check_float(op, "grad_y", grad_y, {rows.first, width});
  check_group_table(op, "weight", weight, groups, width, per_domain);
  check_float(op, "count", count, {groups});
  check_float(op, "mean", mean, {groups, width});
  check_float(op, "rstd", rstd, {groups, width});
  check_float(op, "sum_dy", sum_dy, {groups, width});
  check_float(op, "sum_dy_xhat", sum_dy_xhat, {groups, width});
}


// Fusion level 2's rank-k core (csrc/cpu/generated_cpu.cpp): p (B, k) and the generator's g (B, P), centre (P,),
// gen_weight (k*k, P), gen_bias (k*k,), domain (B,) int64, and the factors down_right (D, k, s), down_bias (D, s),
// up_left (D, s, k) in paper mode (per_domain), without the leading D in released mode.
// p (B, T*k): T towers' rows side by side on the same I_b (released-mode towers; T = 1 otherwise).
struct CoreSizes {
  int64_t batch, rank, bottleneck, features, groups, towers;
};

inline CoreSizes check_generated_core(const Op& op, c10::DeviceType device_type, const at::Tensor& g,
                                      const at::Tensor& centre, const at::Tensor& gen_weight,
                                      const at::Tensor& gen_bias, const at::Tensor& domain,
                                      const at::Tensor& down_right, const at::Tensor& up_left, bool per_domain) {
  check_main_input(op, "p", device_type);
  const int64_t factor_dim = per_domain ? 3 : 2;
  TORCH_CHECK(g.dim() == 2, op.name, ": g must be 2-D (B, P), got shape ", g.sizes());
  TORCH_CHECK(down_right.dim() == factor_dim, op.name, ": down_right must be ", factor_dim, "-D, got shape ",
              down_right.sizes());
  const int64_t rank = down_right.size(-2), width = op.like.size(1);
  TORCH_CHECK(rank >= 1 && width >= rank && width % rank == 0, op.name, ": p must be (B, T*k) for T >= 1 towers ",
              "of rank k=", rank, " (down_right's rows), got shape ", op.like.sizes());
  const CoreSizes n{op.like.size(0), rank, down_right.size(-1), g.size(1), per_domain ? down_right.size(0) : 1,
                    width / rank};
  TORCH_CHECK(n.bottleneck >= 1 && n.groups >= 1, op.name, ": bottleneck s and the number ",
              "of domains must be >= 1, got s=", n.bottleneck, " D=", n.groups);
  TORCH_CHECK(!per_domain || n.towers == 1, op.name, ": several towers (p (B, T*k), T > 1) need shared factors ",
              "(per_domain false)");
  check_float(op, "g", g, {n.batch, n.features});
  check_float(op, "centre", centre, {n.features});
  check_float(op, "gen_weight", gen_weight, {n.rank * n.rank, n.features});
  check_float(op, "gen_bias", gen_bias, {n.rank * n.rank});
  check_int64(op, "domain", domain, {n.batch});
  check_float(op, "down_right", down_right, per_group(per_domain, n.groups, {n.rank, n.bottleneck}));
  check_float(op, "up_left", up_left, per_group(per_domain, n.groups, {n.bottleneck, n.rank}));
  return n;
}

inline void compiled_generated_core_forward(c10::DeviceType device_type, const at::Tensor& p, const at::Tensor& g,
                                            const at::Tensor& centre, const at::Tensor& gen_weight,
                                            const at::Tensor& gen_bias, const at::Tensor& domain,
                                            const at::Tensor& down_right, const at::Tensor& down_bias,
                                            const at::Tensor& up_left, bool per_domain) {
  const Op op{"compiled_generated_core_forward", p};
  const CoreSizes n = check_generated_core(op, device_type, g, centre, gen_weight, gen_bias, domain, down_right,
                                           up_left, per_domain);
  check_float(op, "down_bias", down_bias, per_group(per_domain, n.groups, {n.bottleneck}));
}

// saved: [q (k) | a (s) | u (k)] per row and tower, as the forward returned it.
inline void compiled_generated_core_backward(c10::DeviceType device_type, const at::Tensor& grad_v,
                                             const at::Tensor& p, const at::Tensor& saved, const at::Tensor& g,
                                             const at::Tensor& centre, const at::Tensor& gen_weight,
                                             const at::Tensor& gen_bias, const at::Tensor& domain,
                                             const at::Tensor& down_right, const at::Tensor& up_left, bool per_domain) {
  const Op op{"compiled_generated_core_backward", p};
  const CoreSizes n = check_generated_core(op, device_type, g, centre, gen_weight, gen_bias, domain, down_right,
                                           up_left, per_domain);
  check_float(op, "grad_v", grad_v, {n.batch, n.towers * n.rank});
  check_float(op, "saved", saved, {n.batch, n.towers * (2 * n.rank + n.bottleneck)});
}

// The released towers' BatchNorm + ReLU (csrc/cpu/tower_norm_relu_cpu.cpp): z (D, B, C); the per-tower tables
// (D, C), contiguous (the kernels index them flat).
inline void check_tower_tables(const Op& op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tables) {
  for (const auto& [arg, t] : tables) {
    check_float(op, arg, *t, {op.like.size(0), op.like.size(2)});
    TORCH_CHECK(t->is_contiguous(), op.name, ": ", arg, " must be contiguous");
  }
}

inline void compiled_tower_norm_relu_forward(c10::DeviceType device_type, const at::Tensor& z,
                                             const at::Tensor& weight, const at::Tensor& bias,
                                             const at::Tensor& running_mean, const at::Tensor& running_var) {
  const Op op{"compiled_tower_norm_relu_forward", z};
  check_main_input(op, "z", device_type, 3, "(D, B, C)");
  check_tower_tables(op, {{"weight", &weight}, {"bias", &bias}, {"running_mean", &running_mean},
                          {"running_var", &running_var}});
}

inline void compiled_tower_norm_relu_backward(c10::DeviceType device_type, const at::Tensor& grad_y,
                                              const at::Tensor& z, const at::Tensor& weight, const at::Tensor& bias,
                                              const at::Tensor& mean, const at::Tensor& rstd) {
  const Op op{"compiled_tower_norm_relu_backward", z};
  check_main_input(op, "z", device_type, 3, "(D, B, C)");
  check_float(op, "grad_y", grad_y, z.sizes());
  check_tower_tables(op, {{"weight", &weight}, {"bias", &bias}, {"mean", &mean}, {"rstd", &rstd}});
}

}  // namespace checks
}  // namespace hamur_fast
