"""Fusion level 2 of backend "cpu": the cell on I generated inside the C++ core (csrc/cpu/generated_cpu.cpp).

``torch.ops.hamur_fast.compiled_generated_core_forward`` / ``_backward`` run the rank-k core (q = p I, a, u,
v = u I) on ``I_b = ReLU((g_b - centre) W'^T + c')`` formed block by block, so no (B, k*k) tensor exists,
forward or backward. Around it: ``p = x DL`` and ``o = v UR + ub`` as the grouped per-domain linear op (and their
gradients by hand), and DomainNorm as the compiled kernels' forward and backward. This module adds the fused level
2 to the "cpu" backend's table (contract: Passes; composed by :mod:`hamur_fast.ops.compose`) with
``fused_generation=True``, and ``hyper_adapter_all_towers``: the released MLP's T tower cells as one composed call
whose rows hold the T towers side by side (x (B, T*h), p and v (B, T*k)), so each I_b is generated once for all
towers. The generator products are computed in IEEE float32/float64 whatever ``precision`` asks (tf32 and bf16 are
GPU relaxations).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import compose, eager, grouped_linear
from ..contract import Plan
from ..registry import available_backends, get_backend, register_backend

ops = torch.ops.hamur_fast
if not hasattr(ops, "compiled_generated_core_forward") or "cpu" not in available_backends():
    # an extension built from older sources, or without CPU kernels: "cpu" keeps level 1 (doctor shows why)
    raise ImportError("hamur_fast._C has no compiled_generated_core_forward: rebuild it with "
                      "pip install --no-build-isolation -e .", name="hamur_fast._C")


def _dense(x, domain, weight, bias, per_domain):
    """x W[d] (+ b[d]) per row: the grouped linear op in paper mode, one matmul with shared factors."""
    if per_domain:
        return grouped_linear.torch_form(x, domain, weight, bias)
    rows = x.reshape(-1, weight.shape[0])  # (B*T, in): the T towers side by side in a row share the factor
    out = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    return out.reshape(x.shape[0], -1)


def _dense_grads(grad, x, segments, weight):
    """(grad x, grad weight, grad bias) of :func:`_dense`: per domain, the sums over its rows of x[b]^T grad[b].

    ``segments``: :func:`~hamur_fast.ops.grouped_linear.host_segments` of the rows in paper mode (read once per
    backward for both per-domain products), None with shared factors. Per domain, x and grad are gathered once in
    domain order (unless already in it); each domain's segment gives its weight gradient, its bias gradient (a column
    sum) and its rows' grad x (one GEMM each); grad x goes back to row order with one index_copy. No scatter-add:
    every row is written once."""
    if segments is None:
        rows, grad_rows = x.reshape(-1, weight.shape[0]), grad.reshape(-1, weight.shape[1])
        return (grad_rows @ weight.t()).reshape(x.shape), rows.t() @ grad_rows, grad_rows.sum(dim=0)
    num_domains = weight.shape[0]
    order, sizes = segments
    if order is not None:
        x, grad = x.index_select(0, order), grad.index_select(0, order)
    x_parts, grad_parts = x.split(sizes), grad.split(sizes)
    grad_weight, grad_bias = weight.new_zeros(weight.shape), grad.new_zeros(num_domains, grad.shape[1])
    grad_x_sorted = x.new_zeros(x.shape)
    grad_x_parts = grad_x_sorted.split(sizes)
    for d in range(num_domains):
        if sizes[d]:
            torch.mm(x_parts[d].t(), grad_parts[d], out=grad_weight[d])
            torch.sum(grad_parts[d], dim=0, out=grad_bias[d])
            torch.mm(grad_parts[d], weight[d].t(), out=grad_x_parts[d])
    grad_x = grad_x_sorted if order is None else torch.empty_like(x).index_copy_(0, order, grad_x_sorted)
    return grad_x, grad_weight, grad_bias


def generated_forward(x, generator, domain, params, running_mean, running_var, plan, precision):
    """saved = (p, v, the core's [q | a | u], o)."""
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = params
    p = _dense(x, domain, down_left, None, plan.per_domain)
    v, core = ops.compiled_generated_core_forward(p, *generator, domain, down_right, down_bias, up_left,
                                                  plan.per_domain)
    o = _dense(v, domain, up_right, up_bias, plan.per_domain)
    normed, count, mean, m2, rstd = ops.compiled_norm_forward(o, domain, norm_weight, norm_bias, running_mean,
                                                              running_var, *plan.flags())
    return x + normed, count, mean, m2, rstd, p, v, core, o


def generated_backward(dy, x, generator, domain, params, saved, count, mean, rstd, plan, precision):
    down_left, down_right, _down_bias, up_left, up_right, _up_bias, norm_weight, _norm_bias = params
    p, v, core, o = saved
    grad_o, grad_nw, grad_nb = ops.compiled_norm_backward(dy, o, domain, norm_weight, count, mean, rstd,
                                                          *plan.flags())
    segments = grouped_linear.host_segments(domain, up_right.shape[0]) if plan.per_domain else None
    grad_v, grad_ur, grad_ub = _dense_grads(grad_o, v, segments, up_right)
    grad_p, *generator_grads, grad_dr, grad_db, grad_ul = ops.compiled_generated_core_backward(
        grad_v, p, core, *generator, domain, down_right, up_left, plan.per_domain)
    grad_px, grad_dl, _ = _dense_grads(grad_p, x, segments, down_left)
    return (dy + grad_px, *generator_grads, grad_dl, grad_dr, grad_db, grad_ul, grad_ur, grad_ub, grad_nw, grad_nb)


def generated_saved_like(x, rank, params, plan):
    """Empty (p, v, core, o) for the composed ops' fakes; x (B, T*h) holds T towers (h: down_left's rows)."""
    towers = x.shape[1] // params[0].shape[-2]
    p = x.new_empty((x.shape[0], towers * rank))
    core = x.new_empty((x.shape[0], towers * (2 * rank + params[1].shape[-1])))
    return p, torch.empty_like(p), core, torch.empty_like(x)


def released_cell_all_towers(x, rep, params, eps):
    """The released cell on T towers' outputs x (T, B, h) (contract: ``hyper_adapter_all_towers``).

    On a GeneratedRep: one composed level-2 call on rows that hold the T towers side by side (B, T*h). The shared
    factors act on each tower's slice, the core generates I_b once per row for all T, and the released DomainNorm
    normalises each of the T*h columns over the whole batch, which is each tower over its own batch; the norm's
    weight and bias are tiled over the towers (autograd sums their gradients back). The hyper-network's
    (B, k*k) output, its BatchNorm and ReLU never exist. On I itself: the torch backend's batched form (I read
    once for all towers, measured faster than one C++ cell call per tower).
    """
    if isinstance(rep, torch.Tensor):  # I itself (level 1); else a hamur_fast.ops.generated.GeneratedRep
        return eager.released_cell_all_towers(x, rep, params, eps)
    towers, batch, width = x.shape
    *factors, norm_weight, norm_bias = params
    side_by_side = x.transpose(0, 1).reshape(batch, towers * width)
    no_domain = torch.zeros(batch, dtype=torch.long, device=x.device)  # shared factors: the ids are never read
    plan = Plan(per_domain=False, batch_statistics=True, unbiased=True, eps=float(eps))
    y, _stats = compose.generated_cell(get_backend("cpu"), side_by_side, rep, no_domain,
                                       (*factors, norm_weight.repeat(towers), norm_bias.repeat(towers)), None, None,
                                       plan, "ieee")
    return y.view(batch, towers, width).transpose(0, 1)


_cpu = get_backend("cpu")
register_backend(dataclasses.replace(
    _cpu, passes=_cpu.passes._replace(generated_forward=generated_forward, generated_backward=generated_backward,
                                      generated_saved_like=generated_saved_like),
    hyper_adapter_all_towers=released_cell_all_towers,
    capabilities=dataclasses.replace(_cpu.capabilities, fused_generation=True)))
