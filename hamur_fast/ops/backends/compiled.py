"""backends "cpu" and "cuda": the compiled core ``hamur_fast._C`` (C++ and CUDA sources in csrc/).

Importing ``hamur_fast._C`` registers the ``torch.ops.hamur_fast.compiled_*`` operators (schemas: csrc/cpu/ops.cpp)
with their CPU kernels, and their CUDA kernels when the extension was built with CUDA. This module adds
what the dispatcher needs from Python: fake (meta) implementations, so torch.compile and torch.export
trace through the ops, and autograd formulas that call the fused backward kernels. It raises ImportError
when the extension was not built; :mod:`hamur_fast.ops` then carries on without these backends.

The kernels compute in float32 or float64 (float64 stays float64); half-precision inputs are computed in
float32 and cast back.
The split passes of a data-parallel step (contract: NormPasses) are compiled_norm_statistics,
compiled_norm_normalise, the group sums of compiled_norm_backward and compiled_norm_input_grad.
"""
from __future__ import annotations

import torch

from ..._layout import import_compiled_core

# Registers torch.ops.hamur_fast.compiled_*; where this checkout has no build, an ImportError naming hamur_fast._C,
# which backends/__init__.py records as the reason "cpu" and "cuda" are unavailable.
import_compiled_core()
from ..contract import FLOAT_DTYPES, Backend, Capabilities, GroupStats, NormPasses, Plan
from ..registry import record_unavailable, register_backend
from .. import eager, grouped_linear

ops = torch.ops.hamur_fast
_stale = [name for name in ("compiled_norm_statistics", "compiled_norm_normalise", "compiled_norm_input_grad")
          if not hasattr(ops, name)]
if _stale:  # an extension built from older sources: say so (doctor shows it) rather than fail at import
    raise ImportError(f"hamur_fast._C is older than its sources (no {', '.join(_stale)}): rebuild it with "
                      "pip install --no-build-isolation -e .", name="hamur_fast._C")

# "auto" ranks (lower wins; "torch" is 100, "triton" 10 on CUDA). On the CPU "cpu" is picked because
# benchmarks/bench_layers.py measured it faster than "torch" (benchmarks/RESULTS.md). "cuda" is chosen by
# name only (backend="cuda") until a GPU run of the backend tests and benchmarks/bench_cuda_infer.py shows it
# correct and faster than "triton" there.
CPU_AUTO_RANK = 50


def has_kernel(device_type: str) -> bool:
    """Whether the extension registered kernels for ``device_type`` ("CPU" or "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("hamur_fast::compiled_cell_forward", device_type)


# ----------------------------------------------------------------------------- fake (meta) implementations
# Every forward and backward takes the plan as its flags (Plan.flags: per_domain, batch_statistics, unbiased, eps)
# and hands statistics in the contract's order, count, mean, m2, rstd.
def _statistics_like(t, num_groups):
    table = t.new_empty((num_groups, t.shape[1]))
    return t.new_empty((num_groups,)), table, torch.empty_like(table), torch.empty_like(table)


@torch.library.register_fake("hamur_fast::compiled_cell_forward")
def _adapter_forward_fake(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias,
                          norm_weight, norm_bias, stat_mean, stat_var, per_domain, batch_statistics, unbiased, eps):
    hidden = x.new_empty((x.shape[0], 4 * rep.shape[1] + down_right.shape[-1]))
    order = x.new_empty((x.shape[0],), dtype=torch.int64)
    num_groups = norm_weight.shape[0] if per_domain else 1
    return (torch.empty_like(x), torch.empty_like(x), hidden, order, *_statistics_like(x, num_groups))


@torch.library.register_fake("hamur_fast::compiled_cell_backward")
def _adapter_backward_fake(grad_y, x, rep, domain, down_left, down_right, up_left, up_right, norm_weight, o,
                           hidden, order, count, mean, rstd, per_domain, batch_statistics, unbiased, eps):
    bottleneck = down_right.shape[-1]
    bias_shape = (norm_weight.shape[0], bottleneck) if per_domain else (bottleneck,)
    return (torch.empty_like(x), torch.empty_like(rep), torch.empty_like(down_left), torch.empty_like(down_right),
            x.new_empty(bias_shape), torch.empty_like(up_left), torch.empty_like(up_right),
            torch.empty_like(norm_weight), torch.empty_like(norm_weight), torch.empty_like(norm_weight))


@torch.library.register_fake("hamur_fast::compiled_cell_infer")
def _adapter_infer_fake(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias,
                        norm_weight, norm_bias, running_mean, running_var, eps):
    return torch.empty_like(x)


@torch.library.register_fake("hamur_fast::compiled_norm_forward")
def _domain_norm_forward_fake(o, domain, weight, bias, stat_mean, stat_var, per_domain, batch_statistics, unbiased,
                              eps):
    return (torch.empty_like(o), *_statistics_like(o, weight.shape[0] if per_domain else 1))


@torch.library.register_fake("hamur_fast::compiled_norm_backward")
def _domain_norm_backward_fake(grad_y, o, domain, weight, count, mean, rstd, per_domain, batch_statistics, unbiased,
                               eps):
    return torch.empty_like(o), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.register_fake("hamur_fast::compiled_norm_statistics")
def _norm_statistics_fake(o, domain, num_groups, per_domain):
    return _statistics_like(o, num_groups if per_domain else 1)[:3]


@torch.library.register_fake("hamur_fast::compiled_norm_normalise")
def _norm_normalise_fake(o, domain, weight, bias, mean, rstd, per_domain):
    return torch.empty_like(o)


@torch.library.register_fake("hamur_fast::compiled_norm_input_grad")
def _norm_input_grad_fake(grad_y, o, domain, weight, count, mean, rstd, sum_dy, sum_dy_xhat, per_domain, unbiased):
    return torch.empty_like(o)


# ----------------------------------------------------------------------------- autograd
# Only y is differentiable; o, hidden, order and the statistics are saved for backward and for the
# running-statistics update.
def _adapter_setup_context(ctx, inputs, output):
    x, rep, domain, down_left, down_right, _down_bias, up_left, up_right, _up_bias, norm_weight = inputs[:10]
    _y, o, hidden, order, count, mean, _m2, rstd = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, rep, domain, down_left, down_right, up_left, up_right, norm_weight, o, hidden,
                          order, count, mean, rstd)
    ctx.flags = inputs[13:]


def _adapter_backward(ctx, grad_y, *_unused_grads):
    grads = ops.compiled_cell_backward(grad_y, *ctx.saved_tensors, *ctx.flags)
    grad_x, grad_rep, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub, grad_nw, grad_nb = grads
    return (grad_x, grad_rep, None, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub, grad_nw, grad_nb,
            None, None, None, None, None, None)


torch.library.register_autograd("hamur_fast::compiled_cell_forward", _adapter_backward,
                                setup_context=_adapter_setup_context)


def _norm_setup_context(ctx, inputs, output):
    o, domain, weight = inputs[:3]
    _y, count, mean, _m2, rstd = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(o, domain, weight, count, mean, rstd)
    ctx.flags = inputs[6:]


def _norm_backward(ctx, grad_y, *_unused_grads):
    grad_o, grad_weight, grad_bias = ops.compiled_norm_backward(grad_y, *ctx.saved_tensors, *ctx.flags)
    return grad_o, None, grad_weight, grad_bias, None, None, None, None, None, None


torch.library.register_autograd("hamur_fast::compiled_norm_forward", _norm_backward, setup_context=_norm_setup_context)


# ----------------------------------------------------------------------------- backend functions
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _statistics_given(plan, running_mean, running_var, dtype):
    """The statistics to normalise with: the running ones when the plan says so, else None (the batch's)."""
    if plan.batch_statistics:
        return None, None
    return running_mean.to(dtype), running_var.to(dtype)


def _group_stats(plan, count, mean, m2) -> GroupStats | None:
    return GroupStats(count, mean, m2) if plan.batch_statistics else None


def hyper_adapter(x, rep, domain, params, running_mean, running_var, plan):
    dtype = _compute_dtype(x.dtype)
    x_c, rep_c = x.to(dtype), rep.to(dtype)
    params = tuple(p.to(dtype) for p in params)
    stat_mean, stat_var = _statistics_given(plan, running_mean, running_var, dtype)
    if stat_mean is not None and not _needs_grad(x_c, rep_c, *params):
        return ops.compiled_cell_infer(x_c, rep_c, domain, *params, stat_mean, stat_var, plan.eps).to(x.dtype), None
    y, _o, _hidden, _order, count, mean, m2, _rstd = ops.compiled_cell_forward(
        x_c, rep_c, domain, *params, stat_mean, stat_var, *plan.flags())
    return y.to(x.dtype), _group_stats(plan, count, mean, m2)


def domain_norm(o, domain, weight, bias, running_mean, running_var, plan):
    dtype = _compute_dtype(o.dtype)
    stat_mean, stat_var = _statistics_given(plan, running_mean, running_var, dtype)
    y, count, mean, m2, _rstd = ops.compiled_norm_forward(o.to(dtype), domain, weight.to(dtype), bias.to(dtype),
                                                          stat_mean, stat_var, *plan.flags())
    return y.to(o.dtype), _group_stats(plan, count, mean, m2)


# ----------------------------------------------------------------------------- the split passes (contract: NormPasses)
# The CPU kernels: compiled_norm_statistics, compiled_norm_normalise, the group sums of compiled_norm_backward
# (its weight and bias gradients; without batch statistics its grad o is a by-product), compiled_norm_input_grad.
# groups None (one group of all rows) is per_domain=False with any ids: the kernels then never read them.
def _split_rows(o, groups):
    """(o in the compute dtype, the int64 ids the kernels take, per_domain)."""
    o_c = o.to(_compute_dtype(o.dtype))
    if groups is None:
        return o_c, torch.zeros(o.shape[0], dtype=torch.long, device=o.device), False
    return o_c, groups, True


def group_statistics(o, groups, num_groups) -> GroupStats:
    o_c, ids, per_domain = _split_rows(o, groups)
    return GroupStats(*ops.compiled_norm_statistics(o_c, ids, num_groups, per_domain))


def normalise(o, groups, weight, bias, mean, rstd):
    o_c, ids, per_domain = _split_rows(o, groups)
    dtype = o_c.dtype
    return ops.compiled_norm_normalise(o_c, ids, weight.to(dtype), bias.to(dtype), mean.to(dtype), rstd.to(dtype),
                                      per_domain).to(o.dtype)


def grad_sums(dy, o, groups, mean, rstd, num_groups):
    o_c, ids, per_domain = _split_rows(o, groups)
    dtype = o_c.dtype
    ones = torch.ones_like(mean, dtype=dtype)  # weight and count only shape the grad o this pass drops
    sums_only = Plan(per_domain, batch_statistics=False, unbiased=not per_domain, eps=0.0)
    _grad_o, sum_dy_xhat, sum_dy = ops.compiled_norm_backward(dy.to(dtype), o_c, ids, ones,
                                                              o_c.new_zeros(mean.shape[0]), mean.to(dtype),
                                                              rstd.to(dtype), *sums_only.flags())
    return sum_dy, sum_dy_xhat


def input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, unbiased):
    o_c, ids, per_domain = _split_rows(o, groups)
    dtype = o_c.dtype
    tables = (t.to(dtype) for t in (weight, count, mean, rstd, sum_dy, sum_dy_xhat))
    return ops.compiled_norm_input_grad(dy.to(dtype), o_c, ids, *tables, per_domain, unbiased).to(o.dtype)


NORM_PASSES = NormPasses(group_statistics, normalise, grad_sums, input_grad)


def _capabilities(device_type: str, auto_rank: dict) -> Capabilities:
    return Capabilities(devices=frozenset({device_type}), dtypes=FLOAT_DTYPES, auto_rank=auto_rank, fused_cell=True,
                        self_check=True)


if has_kernel("CPU"):
    register_backend(Backend("cpu", hyper_adapter, domain_norm, _capabilities("cpu", {"cpu": CPU_AUTO_RANK}),
                             norm_passes=NORM_PASSES, grouped_linear=grouped_linear.torch_form))
else:
    record_unavailable("cpu", "the extension hamur_fast._C was built without its CPU kernels")
if has_kernel("CUDA"):
    # The split passes have CPU kernels only: on CUDA this backend's data-parallel normalisation runs the torch
    # backend's passes (between the same collectives).
    register_backend(Backend("cuda", hyper_adapter, domain_norm, _capabilities("cuda", {}),
                             norm_passes=eager.NORM_PASSES, grouped_linear=grouped_linear.torch_form))
else:
    record_unavailable("cuda", "the extension hamur_fast._C was built without CUDA kernels (no CUDA torch or no "
                               "matching nvcc at build time)")
