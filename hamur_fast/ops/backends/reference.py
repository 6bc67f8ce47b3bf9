"""backend="reference": the plainest correct adapter cell, the oracle for every fast path.

It follows SPEC sections 2 and 3 literally: it forms each row's adapter weights
``U_d I_b V_d`` as the paper's Fig. 2 draws them (a (B, h, s) tensor: fine for tests, far too
big for training) and normalises domain by domain in a Python loop. It works in any dtype,
float64 included, on any device, and is differentiable by plain autograd. "auto" never picks it.
"""
from __future__ import annotations

import torch

from ..contract import FLOAT_DTYPES, Backend, Capabilities, GroupStats
from ..registry import register_backend
from ..eager import PASSES
from .. import grouped_linear


def _per_row(param: torch.Tensor, domain: torch.Tensor, released: bool) -> torch.Tensor:
    """Row b's copy of a parameter: shared in released mode, domain d_b's slice in paper mode."""
    if released:
        return param.expand(domain.shape[0], *param.shape)
    return param[domain]


def _check_ids(domain, num_domains):
    """The plainest answer to an out-of-range id (value checks off, torch.compile): an error."""
    if bool(((domain < 0) | (domain >= num_domains)).any()):
        raise ValueError(f"domain ids must lie in [0, {num_domains})")


def domain_norm(o, domain, weight, bias, running_mean, running_var, plan):
    if not plan.per_domain:
        # Whole mixed batch, unbiased variance (torch.var's default), train and eval alike.
        # One row has no unbiased variance; we take 0 there (the released code returns NaN).
        mean = o.mean(dim=0)
        m2 = ((o - mean) ** 2).sum(dim=0)
        var = m2 / max(o.shape[0] - 1, 1)
        stats = GroupStats(o.new_full((1,), o.shape[0]), mean.detach()[None], m2.detach()[None])
        return weight * (o - mean) / torch.sqrt(var + plan.eps) + bias, stats

    num_domains, width = weight.shape
    _check_ids(domain, num_domains)
    out = torch.zeros_like(o)
    count = o.new_zeros(num_domains)
    means, m2s = o.new_zeros(num_domains, width), o.new_zeros(num_domains, width)
    for d in range(num_domains):
        rows = domain == d
        if not rows.any():
            continue
        if plan.batch_statistics:
            mean, var = o[rows].mean(dim=0), o[rows].var(dim=0, unbiased=False)
            count[d] = rows.sum()
            means[d], m2s[d] = mean.detach(), var.detach() * count[d]
        else:
            mean, var = running_mean[d], running_var[d]
        normalised = weight[d] * (o - mean) / torch.sqrt(var + plan.eps) + bias[d]
        out = torch.where(rows.unsqueeze(1), normalised, out)
    return out, (GroupStats(count, means, m2s) if plan.batch_statistics else None)


def hyper_adapter(x, rep, domain, params, running_mean, running_var, plan):
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = params
    released = not plan.per_domain
    if not released:
        _check_ids(domain, norm_weight.shape[0])
    w_down = torch.einsum(
        "bhk,bkj,bjs->bhs", _per_row(down_left, domain, released), rep, _per_row(down_right, domain, released)
    )
    a = torch.sigmoid(torch.einsum("bh,bhs->bs", x, w_down) + _per_row(down_bias, domain, released))
    w_up = torch.einsum(
        "bsk,bkj,bjh->bsh", _per_row(up_left, domain, released), rep, _per_row(up_right, domain, released)
    )
    o = torch.einsum("bs,bsh->bh", a, w_up) + _per_row(up_bias, domain, released)
    normed, stats = domain_norm(o, domain, norm_weight, norm_bias, running_mean, running_var, plan)
    return x + normed, stats


# The oracle has no passes of its own: a data-parallel step on it runs the torch backend's split passes.
register_backend(Backend("reference", hyper_adapter, domain_norm,
                         Capabilities(devices=frozenset({"cpu", "cuda"}), dtypes=FLOAT_DTYPES), passes=PASSES,
                         grouped_linear=grouped_linear.reference))


def hyper_adapter_generated(x, g, domain, gen, params, running_mean, running_var, plan, training):
    """Fusion level 2 as the plainest code (the oracle): materialise z = g W^T + c, BatchNorm it over the
    batch (or with the running statistics), ReLU, reshape to I (B, k, k), then the cell above. The
    generator's running statistics advance ``gen.updates`` times by the literal update, one after another."""
    batch = g.shape[0]
    z = g @ gen.weight.t() + gen.bias
    if gen.norm_weight is not None:
        if training or gen.running_mean is None:
            mean, var = z.mean(dim=0), z.var(dim=0, unbiased=False)
            if training and gen.running_mean is not None and batch >= 2:
                with torch.no_grad():
                    for _ in range(gen.updates):
                        gen.running_mean.copy_((1 - gen.momentum) * gen.running_mean + gen.momentum * mean)
                        gen.running_var.copy_((1 - gen.momentum) * gen.running_var
                                              + gen.momentum * var * batch / (batch - 1))
        else:
            mean, var = gen.running_mean, gen.running_var
        z = (z - mean) / torch.sqrt(var + gen.eps) * gen.norm_weight + gen.norm_bias
    rank = int(round(z.shape[1] ** 0.5))
    return hyper_adapter(x, torch.relu(z).view(batch, rank, rank), domain, params, running_mean, running_var, plan)
