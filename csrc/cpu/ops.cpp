// The hamur_fast operator library: schemas, and the Python module hamur_fast._C that loads them.
//
// Kernels register per device in csrc/cpu/*.cpp and csrc/cuda/adapter_cuda.cpp; autograd and
// fake (meta) implementations are registered from Python in hamur_fast/ops/backends/compiled.py.
// Names follow the one scheme of every hamur_fast operator, <implementation>_<op>_<pass>, and the
// intermediates the one vocabulary (p, q, z, a, u, v, o, count, mean, m2, rstd): both are tabulated in
// hamur_fast/ops/contract.py.
//
// Conventions shared by every op:
//   The plan (csrc/plan.h; Plan in hamur_fast/ops/contract.py) comes as (per_domain, batch_statistics, unbiased,
//   eps): per_domain = true is SPEC section 2 (paper: parameters carry a leading domain axis D, statistics per
//   domain), false SPEC section 3 (released: no domain axis, one statistics group of the whole batch);
//   batch_statistics = false normalises with stat_mean / stat_var (paper-mode eval with running statistics),
//   which are given exactly then; unbiased divides m2 by count - 1 (released) rather than count.
//   Statistics come per statistics group (G = D or 1) in one order, count, mean, m2, rstd: the rows, their
//   mean, the sum of squared deviations, 1/sqrt(var + eps); backward and the running-statistics update read them.
//   compiled_cell_forward also returns, for backward, a slot order of the rows: order (B,) int64 (slot i holds
//   original row order[i]; the CPU kernels group rows by statistics group, stably, the CUDA kernels keep
//   the identity), and o (B, h) and hidden (B, 4k + s) in that slot order;
//   hidden holds each row's p = x DL, q = p I, u = a UL, v = u I and a = sigmoid(q DR + db), the rank-k and
//   bottleneck intermediates (O(k) per row, never O(h*s)).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain module: importing hamur_fast._C runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(hamur_fast, m) {
  m.def(
      "compiled_cell_forward(Tensor x, Tensor rep, Tensor domain, Tensor down_left, Tensor down_right, "
      "Tensor down_bias, Tensor up_left, Tensor up_right, Tensor up_bias, Tensor norm_weight, "
      "Tensor norm_bias, Tensor? stat_mean, Tensor? stat_var, bool per_domain, bool batch_statistics, "
      "bool unbiased, float eps) -> "
      "(Tensor y, Tensor o, Tensor hidden, Tensor order, Tensor count, Tensor mean, Tensor m2, Tensor rstd)");
  m.def(
      "compiled_cell_backward(Tensor grad_y, Tensor x, Tensor rep, Tensor domain, Tensor down_left, "
      "Tensor down_right, Tensor up_left, Tensor up_right, Tensor norm_weight, Tensor o, Tensor hidden, "
      "Tensor order, Tensor count, Tensor mean, Tensor rstd, bool per_domain, bool batch_statistics, "
      "bool unbiased, float eps) -> "
      "(Tensor grad_x, Tensor grad_rep, Tensor grad_down_left, Tensor grad_down_right, "
      "Tensor grad_down_bias, Tensor grad_up_left, Tensor grad_up_right, Tensor grad_up_bias, "
      "Tensor grad_norm_weight, Tensor grad_norm_bias)");
  // Eval with running statistics, no autograd: the whole cell with DomainNorm folded into a per-domain
  // affine map, nothing saved.
  m.def(
      "compiled_cell_infer(Tensor x, Tensor rep, Tensor domain, Tensor down_left, Tensor down_right, "
      "Tensor down_bias, Tensor up_left, Tensor up_right, Tensor up_bias, Tensor norm_weight, "
      "Tensor norm_bias, Tensor running_mean, Tensor running_var, float eps) -> Tensor");
  m.def(
      "compiled_norm_forward(Tensor o, Tensor domain, Tensor weight, Tensor bias, Tensor? stat_mean, "
      "Tensor? stat_var, bool per_domain, bool batch_statistics, bool unbiased, float eps) -> "
      "(Tensor y, Tensor count, Tensor mean, Tensor m2, Tensor rstd)");
  m.def(
      "compiled_norm_backward(Tensor grad_y, Tensor o, Tensor domain, Tensor weight, Tensor count, Tensor mean, "
      "Tensor rstd, bool per_domain, bool batch_statistics, bool unbiased, float eps) -> "
      "(Tensor grad_o, Tensor grad_weight, Tensor grad_bias)");
  // The split passes a data-parallel step runs with collectives between them: this rank's per-group
  // (count, mean, M2); the normalisation with given (every rank's) mean and rstd; the input gradient from
  // given count and group sums of grad_y and grad_y * xhat (the sums: compiled_norm_backward's weight and
  // bias gradients).
  m.def(
      "compiled_norm_statistics(Tensor o, Tensor domain, int num_groups, bool per_domain) -> "
      "(Tensor count, Tensor mean, Tensor m2)");
  m.def(
      "compiled_norm_normalise(Tensor o, Tensor domain, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, "
      "bool per_domain) -> Tensor y");
  m.def(
      "compiled_norm_input_grad(Tensor grad_y, Tensor o, Tensor domain, Tensor weight, Tensor count, "
      "Tensor mean, Tensor rstd, Tensor sum_dy, Tensor sum_dy_xhat, bool per_domain, bool unbiased) -> "
      "Tensor grad_o");
  // The released towers' BatchNorm1d + ReLU on z (D, B, C), per tower d and column c over the B rows
  // (csrc/cpu/tower_norm_relu_cpu.cpp): y = relu(BN(z)) as a (D, B, C) view of a (B, D, C) tensor; training
  // updates running_mean / running_var in place as BatchNorm1d (momentum, unbiased variance), eval normalises
  // with them. mean, rstd (D, C): what backward reads.
  m.def(
      "compiled_tower_norm_relu_forward(Tensor z, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
      "Tensor(b!) running_var, bool training, float momentum, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "compiled_tower_norm_relu_backward(Tensor grad_y, Tensor z, Tensor weight, Tensor bias, Tensor mean, "
      "Tensor rstd, bool training) -> (Tensor grad_z, Tensor grad_weight, Tensor grad_bias)");
}
