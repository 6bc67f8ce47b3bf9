"""Batch statistics merged across data-parallel ranks: the synchronised normalisations.

Under data parallelism each rank sees 1/N of the global batch. Every normalisation that reads "the batch"
(paper-mode DomainNorm per domain, released-mode DomainNorm over the whole batch, the tower
``DomainBatchNorm1d``, shared ``BatchNorm1d``, the hyper-network's BatchNorm) must use the statistics of
the global batch, or N ranks train a different model than one process on the same rows.

How: each rank reduces its rows to per-group moments ``(count, mean, M2)`` with the statistics pass of the
backend that runs the op (the kernel backends' own kernels; :class:`~hamur_fast.ops.contract.NormPasses`), one
``all_gather`` per normalisation brings every rank's moments, Chan's merge combines them:

    n = sum_r n_r,   mean = sum_r n_r mean_r / n,   M2 = sum_r [M2_r + n_r (mean_r - mean)^2]

and the backend's normalise pass applies them. A group (domain) absent on a rank has ``n_r = 0`` and drops out
of every sum; one absent everywhere has ``n = 0``, mean 0 and variance 0, like the single-process kernels. The
backward is the one of ``torch.nn.SyncBatchNorm``, per group: the backend's grad-sums pass gives each rank's
per-group sums of dy and dy * xhat, one ``all_reduce`` adds them over the ranks, and the backend's input-grad
pass uses them with the global count. Parameter gradients stay this rank's own (DDP averages them).

Synchronisation is switched on for a block of code by :func:`synchronised` (the distributed trainer wraps
each forward in it); outside it every function here is the plain single-process computation.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from .contract import GroupStats, Plan, update_running_stats, variance_divisor
from .eager import NORM_PASSES as EAGER_PASSES  # BatchNorm layers have no backend of their own
from .eager import adapter_projection

_ACTIVE_GROUP = None  # the process group whose ranks share batch statistics, while synchronised() is active
_COUNTS_CACHE: dict = {}  # id(domain tensor) -> (domain, global counts), within one synchronised() block


@contextlib.contextmanager
def synchronised(group):
    """Within the block, every normalisation merges its batch statistics over the ranks of ``group``
    (a ``torch.distributed`` process group; None or a one-rank group leaves everything local)."""
    global _ACTIVE_GROUP
    before = _ACTIVE_GROUP
    _ACTIVE_GROUP = group if group is not None and dist.get_world_size(group) > 1 else None
    try:
        yield
    finally:
        _ACTIVE_GROUP = before
        if before is None:  # leaving the outermost block
            _COUNTS_CACHE.clear()


def active_group():
    """The process group statistics are merged over right now, or None (single-process semantics)."""
    return _ACTIVE_GROUP


def domain_counts(domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Rows per domain in the batch: this rank's, or every rank's while synchronised (one small all_reduce
    per domain tensor and block: all the layers of a model share it)."""
    # index_add_, not one_hot: O(B) memory whatever the number of domains.
    counts = torch.zeros(num_domains, dtype=torch.long, device=domain.device).index_add_(
        0, domain, torch.ones(domain.shape[0], dtype=torch.long, device=domain.device))
    group = active_group()
    if group is None:
        return counts
    cached = _COUNTS_CACHE.get((id(domain), num_domains))
    if cached is None or cached[0] is not domain:
        dist.all_reduce(counts, group=group)
        cached = _COUNTS_CACHE[(id(domain), num_domains)] = (domain, counts)
    return cached[1]


# ----------------------------------------------------------------------------- the synchronised normalisation
def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Chan's merge over the leading (rank) axis: (R, G), (R, G, C), (R, G, C) -> (G,), (G, C), (G, C)."""
    total = count.sum(dim=0)
    weight = (count / total.clamp(min=1)).unsqueeze(2)  # n_r / n; 0 where a rank has no rows of the group
    merged_mean = (weight * mean).sum(dim=0)
    spread = count.unsqueeze(2) * (mean - merged_mean) ** 2
    return total, merged_mean, (m2 + spread).sum(dim=0)


def all_gather_stats(stats: GroupStats, group) -> GroupStats:
    """Every rank's (count, mean, M2), one all_gather of one packed message, merged by Chan's formula."""
    width = stats.mean.shape[1]
    packed = torch.cat([stats.count.to(stats.mean.dtype).unsqueeze(1), stats.mean, stats.m2], dim=1).contiguous()
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    gathered = torch.stack(gathered)
    return GroupStats(*merge_moments(gathered[..., 0], gathered[..., 1:1 + width], gathered[..., 1 + width:]))


def _merged(local: GroupStats, group, unbiased: bool, eps: float):
    """Every rank's statistics merged, and the rstd they normalise with."""
    stats = all_gather_stats(local, group)
    count = stats.count.unsqueeze(1)
    return stats, torch.rsqrt(stats.m2 / variance_divisor(count, unbiased) + eps)


def _all_reduced(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, group):
    """Per-group sums of dy and dy * xhat over every rank's rows (one all_reduce): every rank's loss reaches the
    global statistics, so each row's input gradient needs them all."""
    packed = torch.stack([sum_dy, sum_dy_xhat])
    dist.all_reduce(packed, group=group)
    return packed[0], packed[1]


class _SynchronisedNorm(torch.autograd.Function):
    """y = weight[g] (o - mean[g]) rstd[g] + bias[g] with the statistics of every rank's rows, by a backend's
    split passes (:class:`~hamur_fast.ops.contract.NormPasses`) with the collectives between them:

    forward:  statistics -> all_gather + Chan merge -> normalise
    backward: grad_sums  -> all_reduce(sum_dy, sum_dy_xhat) -> input_grad with the global count

    The weight and bias gradients are this rank's own sums: DDP all-reduces parameter gradients itself. The
    merged GroupStats come out as non-differentiable outputs (for the running statistics)."""

    @staticmethod
    def forward(ctx, o, weight, bias, groups, num_groups, unbiased, eps, passes, group):
        stats, rstd = _merged(passes.statistics(o, groups, num_groups), group, unbiased, eps)
        y = passes.normalise(o, groups, weight.reshape(num_groups, -1), bias.reshape(num_groups, -1), stats.mean,
                             rstd)
        ctx.save_for_backward(o, weight, groups, stats.count, stats.mean, rstd)
        ctx.settings = num_groups, unbiased, passes, group
        ctx.mark_non_differentiable(*stats)
        return (y, *stats)

    @staticmethod
    def backward(ctx, dy, *_unused_grads):
        o, weight, groups, count, mean, rstd = ctx.saved_tensors
        num_groups, unbiased, passes, group = ctx.settings
        sum_dy, sum_dy_xhat = passes.grad_sums(dy, o, groups, mean, rstd, num_groups)
        grad_o = passes.input_grad(dy, o, groups, weight.reshape(num_groups, -1), mean, rstd, count,
                                   *_all_reduced(sum_dy, sum_dy_xhat, group), unbiased)
        grad_weight = sum_dy_xhat.reshape(weight.shape).to(weight.dtype)
        grad_bias = sum_dy.reshape(weight.shape).to(weight.dtype)
        return grad_o, grad_weight, grad_bias, None, None, None, None, None, None


class _SynchronisedCell(torch.autograd.Function):
    """The adapter cell y = x + DomainNorm(o) with the statistics of every rank's rows, by a backend's cell
    passes (:class:`~hamur_fast.ops.contract.CellPasses`): the same collectives between the same seams as
    :class:`_SynchronisedNorm`; the norm weight and bias gradients are this rank's own sums."""

    @staticmethod
    def forward(ctx, x, rep, domain, plan, passes, group, *params):
        local, saved = passes.project(x, rep, domain, params, plan)
        stats, rstd = _merged(local, group, plan.unbiased, plan.eps)
        y = passes.normalise(x, domain, params, saved, stats.mean, rstd, plan)
        ctx.save_for_backward(x, rep, domain, stats.count, stats.mean, rstd, *params, *saved)
        ctx.settings = plan, passes, group, len(params)
        ctx.mark_non_differentiable(*stats)
        return (y, *stats)

    @staticmethod
    def backward(ctx, dy, *_unused_grads):
        x, rep, domain, count, mean, rstd, *rest = ctx.saved_tensors
        plan, passes, group, num_params = ctx.settings
        params, saved = tuple(rest[:num_params]), tuple(rest[num_params:])
        sum_dy, sum_dy_xhat = passes.grad_sums(dy, domain, params, saved, mean, rstd, plan)
        grads = passes.input_grads(dy, x, rep, domain, params, saved, count, mean, rstd,
                                   *_all_reduced(sum_dy, sum_dy_xhat, group), plan)
        norm_weight = params[6]
        norm_grads = (sum_dy_xhat.reshape(norm_weight.shape).to(norm_weight.dtype),
                      sum_dy.reshape(norm_weight.shape).to(norm_weight.dtype))
        return (grads[0], grads[1], None, None, None, None, *grads[2:], *norm_grads)


def synchronised_norm(o, groups, num_groups, weight, bias, unbiased: bool, eps: float, passes, group):
    """Normalise o (B, h) with the statistics of every rank's rows of each group (``groups`` None: one group of
    all rows); weight/bias (G, h), or (h,) for one group. Returns (y, merged GroupStats)."""
    y, *stats = _SynchronisedNorm.apply(o, weight, bias, groups, num_groups, unbiased, eps, passes, group)
    return y, GroupStats(*stats)


def domain_norm(o, domain, weight, bias, running_mean, running_var, plan: Plan, passes, group):
    """DomainNorm with the statistics of the global batch (a ``plan`` with batch statistics: training, and
    released mode in eval) by a backend's split passes; what the checked op runs while :func:`synchronised` is on.

    paper: per-domain statistics (biased variance), per-domain affine (D, h), running statistics updated (when
    the plan says so) from the merged per-domain (count, mean, M2). released: whole-batch statistics with the
    unbiased variance, shared affine (h,)."""
    if not plan.per_domain:
        return synchronised_norm(o, None, 1, weight, bias, plan.unbiased, plan.eps, passes, group)[0]
    y, stats = synchronised_norm(o, domain, weight.shape[0], weight, bias, plan.unbiased, plan.eps, passes, group)
    if plan.update_running:
        update_running_stats(running_mean, running_var, stats, plan.momentum)
    return y


def hyper_adapter(x, rep, domain, params, running_mean, running_var, plan: Plan, backend, group):
    """The adapter cell with the statistics of the global batch, what the checked op runs while
    :func:`synchronised` is on: by ``backend``'s cell passes when it has them, else the projection by autograd
    over torch ops and the normalisation by the backend's norm passes."""
    *projection, norm_weight, norm_bias = params
    if backend.cell_passes is None:
        o = adapter_projection(x, rep, domain, *projection, per_domain=plan.per_domain)
        return x + domain_norm(o, domain, norm_weight, norm_bias, running_mean, running_var, plan,
                               backend.norm_passes, group)
    y, *stats = _SynchronisedCell.apply(x, rep, domain, plan, backend.cell_passes, group,
                                        *params)
    if plan.update_running:
        update_running_stats(running_mean, running_var, GroupStats(*stats), plan.momentum)
    return y


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm`` on (B, C), with the global batch's statistics while :func:`synchronised` is active (the
    torch backend's passes: biased variance, one group)."""
    group = active_group()
    if group is None or not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if weight is None:  # affine=False: the identity affine map, whose gradients nobody reads
        weight, bias = x.new_ones(x.shape[1]), x.new_zeros(x.shape[1])
    y, stats = synchronised_norm(x, None, 1, weight, bias, False, eps, EAGER_PASSES, group)
    if running_mean is not None:  # one group: the running statistics seen as (1, C)
        update_running_stats(running_mean.view(1, -1), running_var.view(1, -1), stats, momentum)
    return y


def mean_and_covariance(x: torch.Tensor):
    """``(count, mean (C,), biased covariance (C, C))`` of the rows of x (B, C): this rank's, or every rank's
    while :func:`synchronised` is active. Two-pass (centred on the global mean, so no cancellation); the two
    ``all_reduce`` calls are ``torch.distributed.nn``'s, whose backward sums the gradients over the ranks, as the
    backward of a statistic of every rank's rows must (as :class:`_SynchronisedNorm` sums its dy sums)."""
    group = active_group()
    count = torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)
    if group is None:
        mean = x.mean(dim=0)
        centred = x - mean
        return count, mean, centred.t() @ centred / count
    dist.all_reduce(count, group=group)
    mean = dist_nn.all_reduce(x.sum(dim=0), group=group) / count
    centred = x - mean
    return count, mean, dist_nn.all_reduce(centred.t() @ centred, group=group) / count
