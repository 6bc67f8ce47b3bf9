"""backend="triton": the table of passes over the Triton kernels of :mod:`hamur_fast.kernels`.

The launchers (kernels/adapter_cell.py, kernels/domain_norm.py, kernels/adapter_generated.py) do the GPU work;
the fused forms of the cell and the norm are their split passes in a row (below), the level-2 cell has kernels of
its own. :mod:`hamur_fast.ops.compose` composes them into the ops (the fused forms as custom ops, so torch.compile and
torch.export trace them as single ops; the split passes a data-parallel step runs with collectives between them).
Intermediates: :mod:`hamur_fast.ops.contract`.

The kernels compute in float32 (``tl.dot`` in IEEE precision) and store in the input's dtype, so float64 is
not among the declared dtypes: "auto" sends float64 to a backend that computes in float64, and
``backend="triton"`` with float64 raises. On the CPU the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` before triton is imported), for tests; "auto" never picks them there.
"""
from __future__ import annotations

import os

import torch

from ...kernels import adapter_cell as cell_kernels
from ...kernels import arg_checks
from ...kernels import adapter_generated as generated_kernels
from ...kernels import domain_norm as norm_kernels
from ..grouped_linear import grouped_linear_kernel
from ..contract import Backend, Capabilities, GroupStats, Passes
from ..registry import register_backend

# The largest adapter-cell sizes the kernels take within the sm_90 shared-memory limit (232,448 bytes per
# block): the kernels tile h, and hold whole k and s per row block (kernels/adapter_cell.py).
MAX_WIDTH, MAX_RANK, MAX_BOTTLENECK = cell_kernels.MAX_WIDTH, cell_kernels.MAX_RANK, cell_kernels.MAX_BOTTLENECK


# The fused forms, composed of the split launchers with this process's statistics (paper-mode eval: the running
# ones). saved = (q, v, order): q and v (B, k) fp32 in sorted order, order (B,) in paper mode, empty in released mode.
def _statistics(op, stats, running_mean, running_var, plan):
    if plan.batch_statistics:
        return stats
    return norm_kernels.running_statistics(op, running_mean, running_var, plan.eps)


def _norm_grads(weight, sum_dy, sum_dy_xhat):
    return sum_dy_xhat.reshape(weight.shape).to(weight.dtype), sum_dy.reshape(weight.shape).to(weight.dtype)


def norm_forward(o, domain, weight, bias, running_mean, running_var, plan, empty=torch.empty):
    arg_checks.norm("triton_norm_forward", o, domain)  # domain: (B,) int64 also where one group reads no id
    groups, num_groups = (domain, weight.shape[0]) if plan.per_domain else (None, 1)
    stats = norm_kernels.group_statistics(o, groups, num_groups, plan.eps, plan.unbiased, empty) \
        if plan.batch_statistics else None
    count, mean, m2, rstd = _statistics("triton_norm_forward", stats, running_mean, running_var, plan)
    return norm_kernels.normalise(o, groups, weight, bias, mean, rstd, empty), count, mean, m2, rstd


def norm_backward(dy, o, domain, weight, count, mean, rstd, plan, empty=torch.empty):
    arg_checks.norm("triton_norm_backward", o, domain)
    groups = domain if plan.per_domain else None
    sum_dy, sum_dy_xhat = norm_kernels.grad_sums(dy, o, groups, mean, rstd, mean.shape[0], empty)
    do = norm_kernels.input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, plan.unbiased,
                                 plan.batch_statistics, empty)
    return (do, *_norm_grads(weight, sum_dy, sum_dy_xhat))


def cell_forward(x, rep, domain, params, running_mean, running_var, plan, empty=torch.empty):
    stats, saved = cell_kernels.cell_statistics(x, rep, domain, params, plan, empty)
    count, mean, m2, rstd = _statistics("triton_cell_forward", stats, running_mean, running_var, plan)
    y = cell_kernels.cell_normalise(x, domain, params, saved, mean, rstd, plan, empty)
    return (y, count, mean, m2, rstd, *saved)


def cell_backward(dy, x, rep, domain, params, saved, count, mean, rstd, plan, empty=torch.empty):
    sum_dy, sum_dy_xhat = cell_kernels.cell_grad_sums(dy, domain, params, saved, mean, rstd, plan, empty)
    grads = cell_kernels.cell_input_grads(dy, x, rep, domain, params, saved, count, mean, rstd, sum_dy, sum_dy_xhat,
                                          plan, empty)
    return grads + _norm_grads(params[6], sum_dy, sum_dy_xhat)


def saved_like(x, rank, params, plan):
    """Empty (q, v, order) for the composed ops' fakes."""
    q = x.new_empty((x.shape[0], rank), dtype=torch.float32)
    return q, torch.empty_like(q), x.new_empty((x.shape[0] if plan.per_domain else 0,), dtype=torch.int64)


def norm_statistics(o, groups, num_groups):
    return GroupStats(*norm_kernels.group_statistics(o, groups, num_groups)[:3])


# The fused cell's kernels at their seams (kernels/adapter_cell.py, in the contract's signatures): project (with this
# process's partial statistics, merged locally) | normalise; norm sums | main kernel and the factor gradients.
def cell_project(x, rep, domain, params, plan):
    stats, saved = cell_kernels.cell_statistics(x, rep, domain, params, plan)
    return GroupStats(*stats[:3]), saved


PASSES = Passes(
    norm_statistics, norm_kernels.normalise, norm_kernels.grad_sums, norm_kernels.input_grad,
    cell_project=cell_project, cell_normalise=cell_kernels.cell_normalise,
    cell_grad_sums=cell_kernels.cell_grad_sums, cell_input_grads=cell_kernels.cell_input_grads,
    norm_forward=norm_forward, norm_backward=norm_backward,
    cell_forward=cell_forward, cell_backward=cell_backward,
    generated_forward=generated_kernels.generated_cell_forward,
    generated_backward=generated_kernels.generated_cell_backward,
    cell_saved_like=saved_like, generated_saved_like=saved_like,
    statistics_dtype=lambda dtype: torch.float32)

# meta stands in for the GPU: a model built there runs this backend's composed ops shape-only (their fakes), so
# FlopCounterMode and MemTracker measure the GPU path without a GPU. CPU tensors only under the interpreter.
_DEVICES = {"cuda", "meta"} | ({"cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
register_backend(Backend("triton", None, None, Capabilities(
    devices=frozenset(_DEVICES), dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    max_width=MAX_WIDTH, max_rank=MAX_RANK, max_bottleneck=MAX_BOTTLENECK, auto_rank={"cuda": 10, "meta": 10},
    fused_cell=True, self_check=True, fused_generation=True), passes=PASSES, grouped_linear=grouped_linear_kernel))
