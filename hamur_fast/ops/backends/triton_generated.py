"""Fusion level 2 of backend "triton": custom ops over the kernels of kernels/adapter_generated.py.

``torch.ops.hamur_fast.triton_generated_cell_forward`` / ``_backward`` with fake implementations and an
autograd formula, and ``generated_cell``, the level-2 function of the contract
(:mod:`hamur_fast.ops.contract`), attached to the "triton" backend with ``fused_generation=True``.
"""
from __future__ import annotations

import dataclasses

import torch

from ...kernels import adapter_generated as kernels
from ..contract import GroupStats, Plan
from ..registry import get_backend, register_backend
from .triton import triton_cell_forward


# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("hamur_fast::triton_generated_cell_forward", mutates_args=())
def triton_generated_cell_forward(x: torch.Tensor, g: torch.Tensor, centre: torch.Tensor, gen_weight: torch.Tensor,
                       gen_bias: torch.Tensor, domain: torch.Tensor, down_left: torch.Tensor,
                       down_right: torch.Tensor, down_bias: torch.Tensor, up_left: torch.Tensor,
                       up_right: torch.Tensor, up_bias: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, running_mean: torch.Tensor | None,
                       running_var: torch.Tensor | None, per_domain: bool, batch_statistics: bool, unbiased: bool,
                       eps: float, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)
    return kernels.generated_cell_forward(x, g, centre, gen_weight, gen_bias, domain, params, running_mean, running_var,
                                          Plan.of_flags(per_domain, batch_statistics, unbiased, eps), precision)


@triton_generated_cell_forward.register_fake
def _(x, g, centre, gen_weight, gen_bias, domain, down_left, down_right, down_bias, up_left, up_right, up_bias,
      norm_weight, norm_bias, running_mean, running_var, per_domain, batch_statistics, unbiased, eps, precision):
    # The outputs of level 1's cell: its fake, on a stand-in for I of the right shape (a view, no memory).
    rank = down_left.shape[-1]
    return triton_cell_forward(x, x.new_zeros(()).expand(x.shape[0], rank, rank), domain, down_left, down_right,
                               down_bias, up_left, up_right, up_bias, norm_weight, norm_bias, running_mean,
                               running_var, per_domain, batch_statistics, unbiased, eps)


@torch.library.custom_op("hamur_fast::triton_generated_cell_backward", mutates_args=())
def triton_generated_cell_backward(dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, centre: torch.Tensor,
                       gen_weight: torch.Tensor, gen_bias: torch.Tensor, domain: torch.Tensor,
                       down_left: torch.Tensor, down_right: torch.Tensor, down_bias: torch.Tensor,
                       up_left: torch.Tensor, up_right: torch.Tensor, up_bias: torch.Tensor,
                       norm_weight: torch.Tensor, norm_bias: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                       order: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                       per_domain: bool, batch_statistics: bool, unbiased: bool, eps: float, precision: str
                       ) -> list[torch.Tensor]:
    params = (down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)
    return list(kernels.generated_cell_backward(dy, x, g, centre, gen_weight, gen_bias, domain, params, q, v, order,
                                                count, mean, rstd,
                                                Plan.of_flags(per_domain, batch_statistics, unbiased, eps), precision))


@triton_generated_cell_backward.register_fake
def _(dy, x, g, centre, gen_weight, gen_bias, domain, down_left, down_right, down_bias, up_left, up_right,
      up_bias, norm_weight, norm_bias, q, v, order, count, mean, rstd, per_domain, batch_statistics, unbiased, eps,
      precision):
    return [torch.empty_like(t) for t in (x, g, centre, gen_weight, gen_bias, down_left, down_right, down_bias,
                                          up_left, up_right, up_bias, norm_weight, norm_bias)]


def _setup(ctx, inputs, output):
    x, g, centre, gen_weight, gen_bias, domain, *params = inputs[:14]
    _, q, v, order, count, mean, _, rstd = output
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, g, centre, gen_weight, gen_bias, domain, *params, q, v, order, count, mean, rstd)
    ctx.flags = inputs[16:]  # (per_domain, batch_statistics, unbiased, eps, precision)


def _backward(ctx, dy, *_aux_grads):
    saved = ctx.saved_tensors
    grads = triton_generated_cell_backward(dy, *saved, *ctx.flags)
    dx, dg, d_centre, d_gen_weight, d_gen_bias, *param_grads = grads
    return (dx, dg, d_centre, d_gen_weight, d_gen_bias, None, *param_grads, None, None, None, None, None, None, None)


triton_generated_cell_forward.register_autograd(_backward, setup_context=_setup)


def generated_cell(x, rep, domain, params, running_mean, running_var, plan, precision):
    """Level 2 of backend "triton" (``rep``: a hamur_fast.ops.generated.GeneratedRep; arguments validated)."""
    running = (None, None) if plan.batch_statistics else (running_mean, running_var)
    y, _q, _v, _order, count, mean, m2, _rstd = triton_generated_cell_forward(
        x, rep.g, rep.centre, rep.weight, rep.bias, domain, *params, *running, *plan.flags(), precision)
    return y, (GroupStats(count, mean, m2) if plan.batch_statistics else None)


_triton = get_backend("triton")
register_backend(dataclasses.replace(_triton, generated_cell=generated_cell,
                                     capabilities=dataclasses.replace(_triton.capabilities, fused_generation=True)))
