"""Fusion level 2 of backend "cpu": the cell on I generated inside the C++ core (csrc/cpu/generated_cpu.cpp).

``torch.ops.hamur_fast.compiled_generated_core_forward`` / ``_backward`` run the rank-k core (q = p I, a, u,
v = u I) on ``I_b = ReLU((g_b - centre) W'^T + c')`` formed block by block, so no (B, k*k) tensor exists,
forward or backward. Around it: ``p = x DL`` and ``o = v UR + ub`` as the grouped per-domain linear op, and
DomainNorm as the compiled kernels' ``domain_norm`` (its C++ op with its autograd formula). This module adds
the core's fake implementations and autograd formula and attaches ``generated_cell`` and
``hyper_adapter_all_towers`` (the released MLP's T tower cells as one core call: p (B, T*k), each I_b generated
once for all towers) to the "cpu" backend with ``fused_generation=True``. The generator products are computed in IEEE float32/float64 whatever
``precision`` asks (tf32 and bf16 are GPU relaxations).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import eager, grouped_linear
from ..contract import Plan
from ..registry import available_backends, get_backend, register_backend
from . import compiled

ops = torch.ops.hamur_fast
if not hasattr(ops, "compiled_generated_core_forward") or "cpu" not in available_backends():
    # an extension built from older sources, or without CPU kernels: "cpu" keeps level 1 (doctor shows why)
    raise ImportError("hamur_fast._C has no compiled_generated_core_forward: rebuild it with "
                      "pip install --no-build-isolation -e .", name="hamur_fast._C")


@torch.library.register_fake("hamur_fast::compiled_generated_core_forward")
def _core_forward_fake(p, g, centre, gen_weight, gen_bias, domain, down_right, down_bias, up_left, per_domain):
    rank, bottleneck = down_right.shape[-2:]
    towers = p.shape[1] // rank  # p (B, T*k): T towers' rows on the same I_b
    return torch.empty_like(p), p.new_empty((p.shape[0], towers * (2 * rank + bottleneck)))


@torch.library.register_fake("hamur_fast::compiled_generated_core_backward")
def _core_backward_fake(grad_v, p, saved, g, centre, gen_weight, gen_bias, domain, down_right, up_left, per_domain):
    bottleneck = down_right.shape[-1]
    bias_shape = (down_right.shape[0], bottleneck) if per_domain else (bottleneck,)
    return (torch.empty_like(p), torch.empty_like(g), torch.empty_like(centre), torch.empty_like(gen_weight),
            torch.empty_like(gen_bias), torch.empty_like(down_right), p.new_empty(bias_shape),
            torch.empty_like(up_left))


def _core_setup_context(ctx, inputs, output):
    p, g, centre, gen_weight, gen_bias, domain, down_right, _down_bias, up_left, per_domain = inputs
    _v, saved = output
    ctx.mark_non_differentiable(saved)
    ctx.save_for_backward(p, saved, g, centre, gen_weight, gen_bias, domain, down_right, up_left)
    ctx.per_domain = per_domain


def _core_backward(ctx, grad_v, _grad_saved):
    grads = ops.compiled_generated_core_backward(grad_v, *ctx.saved_tensors, ctx.per_domain)
    grad_p, grad_g, grad_centre, grad_w, grad_c, grad_dr, grad_db, grad_ul = grads
    return grad_p, grad_g, grad_centre, grad_w, grad_c, None, grad_dr, grad_db, grad_ul, None


torch.library.register_autograd("hamur_fast::compiled_generated_core_forward", _core_backward,
                                setup_context=_core_setup_context)


def _dense(x, domain, weight, bias, per_domain):
    """x W[d] (+ b[d]) per row: the grouped linear op in paper mode, one matmul with shared factors."""
    if per_domain:
        return grouped_linear.torch_form(x, domain, weight, bias)
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


def generated_cell(x, rep, domain, params, running_mean, running_var, plan, precision):
    """Level 2 of backend "cpu" (``rep``: a hamur_fast.ops.generated.GeneratedRep; arguments validated)."""
    dtype = compiled._compute_dtype(x.dtype)
    x_c = x.to(dtype)
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = (t.to(dtype) for t in params)
    p = _dense(x_c, domain, down_left, None, plan.per_domain)
    v, _saved = ops.compiled_generated_core_forward(p, rep.g.to(dtype), rep.centre.to(dtype), rep.weight.to(dtype),
                                                    rep.bias.to(dtype), domain, down_right, down_bias, up_left,
                                                    plan.per_domain)
    o = _dense(v, domain, up_right, up_bias, plan.per_domain)
    normed, stats = compiled.domain_norm(o, domain, norm_weight, norm_bias, running_mean, running_var, plan)
    return (x_c + normed).to(x.dtype), stats


def released_cell_all_towers(x, rep, params, eps):
    """The released cell on T towers' outputs x (T, B, h) (contract: ``hyper_adapter_all_towers``).

    On a GeneratedRep one core call runs every tower's row on I_b generated once (p and v (B, T*k)), so the
    hyper-network's (B, k*k) output, its BatchNorm and ReLU never exist; on I itself, the torch backend's
    batched form (I read once for all towers, measured faster than one C++ cell call per tower).
    """
    if isinstance(rep, torch.Tensor):  # I itself (level 1); else a hamur_fast.ops.generated.GeneratedRep
        return eager.released_cell_all_towers(x, rep, params, eps)
    towers, batch, width = x.shape
    dtype = compiled._compute_dtype(x.dtype)
    x_c = x.to(dtype)
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = (t.to(dtype) for t in params)
    rank = down_right.shape[0]
    p = (x_c @ down_left).transpose(0, 1).reshape(batch, towers * rank)  # row b: [p of tower 0 | tower 1 | ...]
    no_domain = torch.zeros(batch, dtype=torch.long, device=x.device)  # shared factors: the ids are never read
    v, _saved = ops.compiled_generated_core_forward(p, rep.g.to(dtype), rep.centre.to(dtype), rep.weight.to(dtype),
                                                    rep.bias.to(dtype), no_domain, down_right, down_bias, up_left,
                                                    False)
    o = torch.baddbmm(up_bias, v.view(batch, towers, rank).transpose(0, 1), up_right.expand(towers, -1, -1))
    # Each tower over its own whole batch (released DomainNorm): the towers as the groups of one kernel call.
    tower_of_row = torch.arange(towers, device=x.device).repeat_interleave(batch)
    plan = Plan(per_domain=True, batch_statistics=True, unbiased=True, eps=float(eps))
    normed, _stats = compiled.domain_norm(o.reshape(towers * batch, width), tower_of_row,
                                          norm_weight.expand(towers, width), norm_bias.expand(towers, width), None,
                                          None, plan)
    return (x_c + normed.view(towers, batch, width)).to(x.dtype)


_cpu = get_backend("cpu")
register_backend(dataclasses.replace(_cpu, generated_cell=generated_cell,
                                     hyper_adapter_all_towers=released_cell_all_towers,
                                     capabilities=dataclasses.replace(_cpu.capabilities, fused_generation=True)))
