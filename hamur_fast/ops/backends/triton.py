"""backend="triton": custom ops over the Triton kernels of :mod:`hamur_fast.kernels`.

The launchers (kernels/adapter_cell.py, kernels/domain_norm.py) do the GPU work; here they become
``torch.ops.hamur_fast.triton_*`` operators with fake implementations (so torch.compile and torch.export
trace them as single ops) and autograd formulas that call the backward launchers. Intermediates and
operator names: :mod:`hamur_fast.ops.contract`. The split passes a data-parallel step runs with collectives
between them (NormPasses, CellPasses) are the same kernels' launchers called one by one.

The kernels compute in float32 (``tl.dot`` in IEEE precision) and store in the input's dtype, so float64 is
not among the declared dtypes: "auto" sends float64 to a backend that computes in float64, and
``backend="triton"`` with float64 raises. On the CPU the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` before triton is imported), for tests; "auto" never picks them there.
"""
from __future__ import annotations

import os

import torch

from ...kernels import adapter_cell as cell_kernels
from ...kernels import domain_norm as norm_kernels
from ..grouped_linear import grouped_linear_kernel
from ..contract import Backend, Capabilities, CellPasses, GroupStats, NormPasses, Plan
from ..registry import register_backend

# The largest adapter-cell sizes the kernels take within the sm_90 shared-memory limit (232,448 bytes per
# block): the kernels tile h, and hold whole k and s per row block (kernels/adapter_cell.py).
MAX_WIDTH, MAX_RANK, MAX_BOTTLENECK = cell_kernels.MAX_WIDTH, cell_kernels.MAX_RANK, cell_kernels.MAX_BOTTLENECK


# ----------------------------------------------------------------------------- the adapter cell
# Every op takes the plan as its flags (Plan.flags: per_domain, batch_statistics, unbiased, eps), the launchers
# the Plan itself.
@torch.library.custom_op("hamur_fast::triton_cell_forward", mutates_args=())
def triton_cell_forward(x: torch.Tensor, rep: torch.Tensor, domain: torch.Tensor, down_left: torch.Tensor,
                        down_right: torch.Tensor, down_bias: torch.Tensor, up_left: torch.Tensor,
                        up_right: torch.Tensor, up_bias: torch.Tensor, norm_weight: torch.Tensor,
                        norm_bias: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        per_domain: bool, batch_statistics: bool, unbiased: bool, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, q, v, order, count, mean, m2, rstd); q, v (B, k) fp32 in sorted order, saved for backward."""
    params = (down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)
    return cell_kernels.adapter_cell_forward(x, rep, domain, params, running_mean, running_var,
                                             Plan.of_flags(per_domain, batch_statistics, unbiased, eps))


@triton_cell_forward.register_fake
def _(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias,
      running_mean, running_var, per_domain, batch_statistics, unbiased, eps):
    batch, rank = x.shape[0], rep.shape[1]
    num_groups = norm_weight.shape[0] if per_domain else 1
    saved = x.new_empty((batch, rank), dtype=torch.float32)
    order = x.new_empty((batch if per_domain else 0,), dtype=torch.int64)
    return (torch.empty_like(x), saved, torch.empty_like(saved), order, *_statistics_like(x, num_groups))


def _statistics_like(t, num_groups):
    """Fake (count, mean, m2, rstd): fp32, (G,) and (G, h)."""
    table = t.new_empty((num_groups, t.shape[1]), dtype=torch.float32)
    return t.new_empty((num_groups,), dtype=torch.float32), table, torch.empty_like(table), torch.empty_like(table)


@torch.library.custom_op("hamur_fast::triton_cell_backward", mutates_args=())
def triton_cell_backward(dy: torch.Tensor, x: torch.Tensor, rep: torch.Tensor, domain: torch.Tensor,
                         down_left: torch.Tensor, down_right: torch.Tensor, down_bias: torch.Tensor,
                         up_left: torch.Tensor, up_right: torch.Tensor, up_bias: torch.Tensor,
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                         order: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                         per_domain: bool, batch_statistics: bool, unbiased: bool, eps: float) -> list[torch.Tensor]:
    params = (down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)
    return list(cell_kernels.adapter_cell_backward(dy, x, rep, domain, params, q, v, order, count, mean, rstd,
                                                   Plan.of_flags(per_domain, batch_statistics, unbiased, eps)))


@triton_cell_backward.register_fake
def _(dy, x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias,
      q, v, order, count, mean, rstd, per_domain, batch_statistics, unbiased, eps):
    return [torch.empty_like(t) for t in (x, rep, down_left, down_right, down_bias, up_left, up_right,
                                          up_bias, norm_weight, norm_bias)]


def _setup_cell(ctx, inputs, output):
    x, rep, domain, *params = inputs[:11]
    _, q, v, order, count, mean, _, rstd = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, rep, domain, *params, q, v, order, count, mean, rstd)
    ctx.flags = inputs[13:]


def _cell_backward(ctx, dy, *_unused_grads):
    x, rep, domain, *rest = ctx.saved_tensors
    params, (q, v, order, count, mean, rstd) = rest[:8], rest[8:]
    dx, drep, *param_grads = triton_cell_backward(dy, x, rep, domain, *params, q, v, order, count, mean, rstd,
                                                  *ctx.flags)
    return (dx, drep, None, *param_grads, None, None, None, None, None, None)


triton_cell_forward.register_autograd(_cell_backward, setup_context=_setup_cell)


# ----------------------------------------------------------------------------- DomainNorm
@torch.library.custom_op("hamur_fast::triton_norm_forward", mutates_args=())
def triton_norm_forward(o: torch.Tensor, domain: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                        per_domain: bool, batch_statistics: bool, unbiased: bool, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, count, mean, m2, rstd)."""
    return norm_kernels.domain_norm_forward(o, domain, weight, bias, running_mean, running_var,
                                            Plan.of_flags(per_domain, batch_statistics, unbiased, eps))


@triton_norm_forward.register_fake
def _(o, domain, weight, bias, running_mean, running_var, per_domain, batch_statistics, unbiased, eps):
    return (torch.empty_like(o), *_statistics_like(o, weight.shape[0] if per_domain else 1))


@torch.library.custom_op("hamur_fast::triton_norm_backward", mutates_args=())
def triton_norm_backward(dy: torch.Tensor, o: torch.Tensor, domain: torch.Tensor, weight: torch.Tensor,
                         count: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, per_domain: bool,
                         batch_statistics: bool, unbiased: bool, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return norm_kernels.domain_norm_backward(dy, o, domain, weight, count, mean, rstd,
                                             Plan.of_flags(per_domain, batch_statistics, unbiased, eps))


@triton_norm_backward.register_fake
def _(dy, o, domain, weight, count, mean, rstd, per_domain, batch_statistics, unbiased, eps):
    return torch.empty_like(o), torch.empty_like(weight), torch.empty_like(weight)


def _setup_norm(ctx, inputs, output):
    o, domain, weight = inputs[:3]
    _, count, mean, _, rstd = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(o, domain, weight, count, mean, rstd)
    ctx.flags = inputs[6:]


def _norm_backward(ctx, dy, *_unused_grads):
    o, domain, weight, count, mean, rstd = ctx.saved_tensors
    do, dweight, dbias = triton_norm_backward(dy, o, domain, weight, count, mean, rstd, *ctx.flags)
    return do, None, dweight, dbias, None, None, None, None, None, None


triton_norm_forward.register_autograd(_norm_backward, setup_context=_setup_norm)


# ----------------------------------------------------------------------------- backend functions
def _running(plan, running_mean, running_var):
    return (None, None) if plan.batch_statistics else (running_mean, running_var)


def hyper_adapter(x, rep, domain, params, running_mean, running_var, plan):
    y, _q, _v, _order, count, mean, m2, _rstd = triton_cell_forward(
        x, rep, domain, *params, *_running(plan, running_mean, running_var), *plan.flags())
    return y, (GroupStats(count, mean, m2) if plan.batch_statistics else None)


def domain_norm(o, domain, weight, bias, running_mean, running_var, plan):
    y, count, mean, m2, _rstd = triton_norm_forward(o, domain, weight, bias, *_running(plan, running_mean, running_var),
                                                    *plan.flags())
    return y, (GroupStats(count, mean, m2) if plan.batch_statistics else None)


def group_statistics(o, groups, num_groups):
    return GroupStats(*norm_kernels.group_statistics(o, groups, num_groups))


# The split passes are DomainNorm's kernels (kernels/domain_norm.py) launched one by one.
NORM_PASSES = NormPasses(group_statistics, norm_kernels.normalise, norm_kernels.grad_sums, norm_kernels.input_grad)

# The fused cell's kernels at their seams (kernels/adapter_cell.py): project (with this process's partial
# statistics, merged locally) | normalise; norm sums | main kernel and the factor gradients. saved = (q, v, order).
def cell_project(x, rep, domain, params, plan):
    stats, saved = cell_kernels.cell_statistics(x, rep, domain, params, plan)
    return GroupStats(*stats), saved


def cell_normalise(x, domain, params, saved, mean, rstd, plan):
    _q, v, order = saved
    return cell_kernels.cell_normalise(x, domain, params, v, order, mean, rstd, plan)


def cell_grad_sums(dy, domain, params, saved, mean, rstd, plan):
    _q, v, order = saved
    return cell_kernels.cell_grad_sums(dy, domain, params, v, order, mean, rstd, plan)


def cell_input_grads(dy, x, rep, domain, params, saved, count, mean, rstd, sum_dy, sum_dy_xhat, plan):
    return cell_kernels.cell_input_grads(dy, x, rep, domain, params, *saved, count, mean, rstd, sum_dy, sum_dy_xhat,
                                         plan)


CELL_PASSES = CellPasses(cell_project, cell_normalise, cell_grad_sums, cell_input_grads)

# meta stands in for the GPU: a model built there runs this backend's custom ops shape-only (their fakes), so
# FlopCounterMode and MemTracker measure the GPU path without a GPU. CPU tensors only under the interpreter.
_DEVICES = {"cuda", "meta"} | ({"cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
register_backend(Backend("triton", hyper_adapter, domain_norm, Capabilities(
    devices=frozenset(_DEVICES), dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    max_width=MAX_WIDTH, max_rank=MAX_RANK, max_bottleneck=MAX_BOTTLENECK, auto_rank={"cuda": 10, "meta": 10},
    fused_cell=True, self_check=True), norm_passes=NORM_PASSES, grouped_linear=grouped_linear_kernel,
    cell_passes=CELL_PASSES))
