"""The package's eager math: the fastest adapter cell and DomainNorm we know how to write in plain PyTorch.

Backend "torch" is these functions (:mod:`hamur_fast.ops.backends.torch`); layers, models, folding and the
split composition (:mod:`hamur_fast.ops.compose`) import them from here. Compared with the
released einsum math it
- multiplies right-to-left through the rank-k space (O(hk + k^2 + ks) per row, never a (B, h, s) tensor),
- selects per-domain factors by the grouped per-domain GEMM of ops/grouped_linear.py (no per-row weight
  copies, cost independent of the number of domains),
- reduces per-domain statistics by scatter-add (no Python loop, no host-device sync, O(B) whatever D),
- returns the per-domain (count, mean, M2) without reading anything back, so it is CUDA-graph capturable.
Gradients come from autograd.
"""
from __future__ import annotations

import torch

from . import grouped_linear
from .contract import GroupStats, Passes, variance_divisor


def project_per_domain(v: torch.Tensor, weight: torch.Tensor, domain: torch.Tensor,
                       per_domain: bool = True) -> torch.Tensor:
    """Row b of the result is ``v[b] @ weight[d_b]``, weight (D, in, out); ``v @ weight`` for a shared (in, out)
    weight (``per_domain`` False)."""
    if not per_domain:
        return v @ weight
    if weight.shape[0] == 1:
        return v @ weight[0]
    return grouped_linear.torch_form(v, domain, weight, None)  # the grouped GEMM: cost ~ B, whatever D is


def _per_row(param: torch.Tensor, domain: torch.Tensor, per_domain: bool) -> torch.Tensor:
    return param[domain] if per_domain else param


def _through_rep(v: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
    """Row-wise ``v[b] @ rep[b]`` for v (B, k), rep (B, k, k)."""
    return torch.bmm(v.unsqueeze(1), rep).squeeze(1)


def ids_in_range(domain: torch.Tensor, num_domains: int):
    """(ids safe to index with, which rows had a valid id), without a host sync. With value checks off or
    under torch.compile an id may be out of range: its row computes with domain 0's factors, is left out of
    every statistic, and comes out NaN (domain_norm)."""
    valid = (domain >= 0) & (domain < num_domains)
    return torch.where(valid, domain, 0), valid


def domain_statistics(o: torch.Tensor, domain: torch.Tensor, num_domains: int, valid: torch.Tensor):
    """Per-domain count, mean and M2 of the valid rows of ``o`` (two-pass, stable), and the centred rows.

    Sums by ``index_add`` (scatter-add): O(B h) work and memory whatever the number of domains.
    """
    weight = valid.to(o.dtype)
    count = o.new_zeros(num_domains).index_add(0, domain, weight)
    mean = o.new_zeros(num_domains, o.shape[1]).index_add(0, domain, o * weight.unsqueeze(1)) \
        / count.clamp(min=1).unsqueeze(1)
    centred = o - mean[domain]
    m2 = o.new_zeros(num_domains, o.shape[1]).index_add(0, domain, centred * centred * weight.unsqueeze(1))
    return count, mean, m2, centred


def domain_norm(o, domain, weight, bias, running_mean, running_var, plan):
    if not plan.per_domain:
        mean = o.mean(dim=0)
        centred = o - mean
        m2 = (centred * centred).sum(dim=0)
        stats = GroupStats(o.new_full((1,), o.shape[0]), mean.detach()[None], m2.detach()[None])
        var = m2 / variance_divisor(o.shape[0], plan.unbiased)
        return torch.addcmul(bias, centred * torch.rsqrt(var + plan.eps), weight), stats

    domain, valid = ids_in_range(domain, weight.shape[0])
    if plan.batch_statistics:
        count, mean, m2, centred = domain_statistics(o, domain, weight.shape[0], valid)
        scale = weight * torch.rsqrt(m2 / variance_divisor(count, plan.unbiased).unsqueeze(1) + plan.eps)
        stats = GroupStats(count.detach(), mean.detach(), m2.detach())
        out = torch.addcmul(bias[domain], centred, scale[domain])
    else:  # running statistics: they fold into one per-domain affine map
        scale = weight * torch.rsqrt(running_var + plan.eps)
        shift = bias - running_mean * scale
        out, stats = torch.addcmul(shift[domain], o, scale[domain]), None
    return torch.where(valid.unsqueeze(1), out, float("nan")), stats


# ----------------------------------------------------------------------------- the split passes
# DomainNorm as separate passes (contract: Passes), so that a collective can sit between them. groups None is
# one group of all rows; an id outside [0, G) joins no statistic or sum and its row comes out NaN.
def _rows_of(groups, num_groups, o):
    """(group of each row, safe to index with; which rows are valid, or None when all are)."""
    if groups is None:
        return o.new_zeros(o.shape[0], dtype=torch.long), None
    return ids_in_range(groups, num_groups)


def _nan_invalid(out, valid):
    return out if valid is None else torch.where(valid.unsqueeze(1), out, float("nan"))


@torch.no_grad()
def group_statistics(o, groups, num_groups) -> GroupStats:
    rows, valid = _rows_of(groups, num_groups, o)
    count, mean, m2, _ = domain_statistics(o, rows, num_groups, torch.ones_like(rows, dtype=torch.bool)
                                           if valid is None else valid)
    return GroupStats(count, mean, m2)


@torch.no_grad()
def normalise(o, groups, weight, bias, mean, rstd):
    rows, valid = _rows_of(groups, mean.shape[0], o)
    return _nan_invalid(torch.addcmul(bias[rows], o - mean[rows], (weight * rstd)[rows]), valid)


@torch.no_grad()
def grad_sums(dy, o, groups, mean, rstd, num_groups):
    rows, valid = _rows_of(groups, num_groups, o)
    if valid is not None:
        dy = torch.where(valid.unsqueeze(1), dy, 0.0)
    dy_xhat = dy * (o - mean[rows]) * rstd[rows]
    sums = dy.new_zeros(2, num_groups, o.shape[1])
    return sums[0].index_add_(0, rows, dy), sums[1].index_add_(0, rows, dy_xhat)


@torch.no_grad()
def input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, unbiased):
    rows, valid = _rows_of(groups, mean.shape[0], o)
    n = count.clamp(min=1).unsqueeze(1)
    n_var = variance_divisor(count, unbiased).unsqueeze(1)
    xhat = (o - mean[rows]) * rstd[rows]
    out = (weight * rstd)[rows] * (dy - (sum_dy / n)[rows] - xhat * (sum_dy_xhat / n_var)[rows])
    return _nan_invalid(out, valid)


PASSES = Passes(group_statistics, normalise, grad_sums, input_grad)  # no fused forms: autograd composes them


def adapter_projection(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias, *,
                       per_domain: bool):
    """The cell before normalisation: o = ((sigmoid(((x U) I) V + b) U') I) V' + b'; the factors carry a leading
    domain axis when ``per_domain`` (paper mode), none in released mode."""
    def low_rank(v, left, right):  # ((v left) I) right, right-to-left through the rank-k space
        inner = project_per_domain(v, left, domain, per_domain)
        return project_per_domain(_through_rep(inner, rep), right, domain, per_domain)

    a = torch.sigmoid(low_rank(x, down_left, down_right) + _per_row(down_bias, domain, per_domain))
    return low_rank(a, up_left, up_right) + _per_row(up_bias, domain, per_domain)


def hyper_adapter(x, rep, domain, params, running_mean, running_var, plan):
    *projection, norm_weight, norm_bias = params
    safe_domain = ids_in_range(domain, norm_weight.shape[0])[0] if plan.per_domain else domain
    o = adapter_projection(x, rep, safe_domain, *projection, per_domain=plan.per_domain)
    normed, stats = domain_norm(o, domain, norm_weight, norm_bias, running_mean, running_var, plan)
    return x + normed, stats


def released_cell_all_towers(x, rep, params, eps):
    """The released-mode cell applied to every tower's output at once: x (T, B, h) -> (T, B, h).

    The released code runs its one (shared) cell on each tower's whole-batch output in turn; here
    the T applications are one set of batched products, with whole-batch statistics per tower.
    """
    down_left, down_right, down_bias, up_left, up_right, up_bias, weight, bias = params

    def through_rep(v):  # row b of every tower times rep[b]: (T, B, k) -> (T, B, k)
        return torch.bmm(v.transpose(0, 1), rep).transpose(0, 1)

    a = torch.sigmoid(through_rep(x @ down_left) @ down_right + down_bias)
    o = through_rep(a @ up_left) @ up_right + up_bias
    centred = o - o.mean(dim=1, keepdim=True)
    var = (centred * centred).sum(dim=1, keepdim=True) / variance_divisor(o.shape[1], True)
    return x + torch.addcmul(bias, centred * torch.rsqrt(var + eps), weight)

