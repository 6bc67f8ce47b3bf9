"""backends "cpu" and "cuda": the table of passes over the compiled core ``hamur_fast._C`` (sources in csrc/).

Importing ``hamur_fast._C`` registers the ``torch.ops.hamur_fast.compiled_*`` operators (schemas: csrc/cpu/ops.cpp)
with their CPU kernels, and their CUDA kernels when the extension was built with CUDA. Here they become the
backends' tables (contract: Passes), which :mod:`hamur_fast.ops.compose` composes into the ops and wires into
autograd; the C++ operators run inside the composed ops, so their fakes are the composed ops'. The one
exception, ``compiled_cell_infer`` (the eval cell outside autograd), is called directly, and an exported eval
graph holds it: its fake is here. This module raises ImportError when the extension was not built;
:mod:`hamur_fast.ops` then carries on without these backends.

The kernels compute in float32 or float64 (float64 stays float64); half-precision inputs are computed in
float32 and cast back. The split passes of a data-parallel step are compiled_norm_statistics,
compiled_norm_normalise, the group sums of compiled_norm_backward and compiled_norm_input_grad (CPU kernels only).
"""
from __future__ import annotations

import torch

from ..._layout import import_compiled_core

# Registers torch.ops.hamur_fast.compiled_*; where this checkout has no build, an ImportError naming hamur_fast._C,
# which backends/__init__.py records as the reason "cpu" and "cuda" are unavailable.
import_compiled_core()
from ..contract import FLOAT_DTYPES, Backend, Capabilities, GroupStats, Passes, Plan
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


@torch.library.register_fake("hamur_fast::compiled_cell_infer")
def _cell_infer_fake(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight,
                     norm_bias, running_mean, running_var, eps):
    return torch.empty_like(x)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------- the fused forms (contract: Passes)
# Every forward and backward takes the plan as its flags and hands statistics in the contract's order, count, mean,
# m2, rstd; saved = (o, hidden, order): o and hidden (p, q, u, v, a) in the kernels' slot order.
def cell_forward(x, rep, domain, params, running_mean, running_var, plan):
    y, o, hidden, order, count, mean, m2, rstd = ops.compiled_cell_forward(x, rep, domain, *params, running_mean,
                                                                           running_var, *plan.flags())
    return y, count, mean, m2, rstd, o, hidden, order


def cell_backward(dy, x, rep, domain, params, saved, count, mean, rstd, plan):
    down_left, down_right, _down_bias, up_left, up_right, _up_bias, norm_weight, _norm_bias = params
    return ops.compiled_cell_backward(dy, x, rep, domain, down_left, down_right, up_left, up_right, norm_weight,
                                      *saved, count, mean, rstd, *plan.flags())


def cell_saved_like(x, rank, params, plan):
    """Empty (o, hidden, order) for the composed ops' fakes."""
    hidden = x.new_empty((x.shape[0], 4 * rank + params[1].shape[-1]))
    return torch.empty_like(x), hidden, x.new_empty((x.shape[0],), dtype=torch.int64)


def norm_forward(o, domain, weight, bias, running_mean, running_var, plan):
    return ops.compiled_norm_forward(o, domain, weight, bias, running_mean, running_var, *plan.flags())


def norm_backward(dy, o, domain, weight, count, mean, rstd, plan):
    return ops.compiled_norm_backward(dy, o, domain, weight, count, mean, rstd, *plan.flags())


def cell_infer(x, rep, domain, params, running_mean, running_var, eps):
    return ops.compiled_cell_infer(x, rep, domain, *params, running_mean, running_var, eps)


FUSED = dict(norm_forward=norm_forward, norm_backward=norm_backward, cell_forward=cell_forward,
             cell_backward=cell_backward, cell_saved_like=cell_saved_like, compute_dtype=compute_dtype,
             statistics_dtype=lambda dtype: dtype, cell_infer=cell_infer)


# ----------------------------------------------------------------------------- the split passes (contract: Passes)
# The CPU kernels: compiled_norm_statistics, compiled_norm_normalise, the group sums of compiled_norm_backward
# (its weight and bias gradients; without batch statistics its grad o is a by-product), compiled_norm_input_grad.
# groups None (one group of all rows) is per_domain=False with any ids: the kernels then never read them.
def _split_rows(o, groups):
    """(o in the compute dtype, the int64 ids the kernels take, per_domain)."""
    o_c = o.to(compute_dtype(o.dtype))
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




def _capabilities(device_type: str, auto_rank: dict) -> Capabilities:
    return Capabilities(devices=frozenset({device_type}), dtypes=FLOAT_DTYPES, auto_rank=auto_rank, fused_cell=True,
                        self_check=True)


if has_kernel("CPU"):
    register_backend(Backend("cpu", None, None, _capabilities("cpu", {"cpu": CPU_AUTO_RANK}),
                             passes=Passes(group_statistics, normalise, grad_sums, input_grad, **FUSED),
                             grouped_linear=grouped_linear.torch_form))
else:
    record_unavailable("cpu", "the extension hamur_fast._C was built without its CPU kernels")
if has_kernel("CUDA"):
    # The split passes have CPU kernels only: on CUDA this backend's data-parallel normalisation runs the torch
    # backend's passes (between the same collectives).
    register_backend(Backend("cuda", None, None, _capabilities("cuda", {}), passes=eager.PASSES._replace(**FUSED),
                             grouped_linear=grouped_linear.torch_form))
else:
    record_unavailable("cuda", "the extension hamur_fast._C was built without CUDA kernels (no CUDA torch or no "
                               "matching nvcc at build time)")
