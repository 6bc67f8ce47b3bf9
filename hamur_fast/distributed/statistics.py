"""Batch statistics merged across data-parallel ranks: the synchronised normalisations.

Under data parallelism each rank sees 1/N of the global batch. Every normalisation that reads "the batch"
(paper-mode DomainNorm per domain, released-mode DomainNorm over the whole batch, the tower
``DomainBatchNorm1d``, shared ``BatchNorm1d``, the hyper-network's BatchNorm) must use the statistics of
the global batch, or N ranks train a different model than one process on the same rows.

How: each rank reduces its rows to per-group moments ``(count, mean, M2)`` (two-pass, stable), one
``all_gather`` per normalisation brings every rank's moments, and Chan's merge combines them:

    n = sum_r n_r,   mean = sum_r n_r mean_r / n,   M2 = sum_r [M2_r + n_r (mean_r - mean)^2]

A group (domain) absent on a rank has ``n_r = 0`` and drops out of every sum; one absent everywhere has
``n = 0``, mean 0 and variance 0, like the single-process kernels. The backward is the one of
``torch.nn.SyncBatchNorm``, per group: the gradients each rank's loss sends to the global mean and variance
are summed over ranks (one ``all_reduce``), then each row gets ``dmean / n + dvar * 2 (x - mean) / n``.

Synchronisation is switched on for a block of code by :func:`synchronised` (the distributed trainer wraps
each forward in it); outside it every function here is the plain single-process computation.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from ..ops.contract import GroupStats, Plan, update_running_stats

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


# ----------------------------------------------------------------------------- moments
def local_moments(x: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """Per-group ``(count (G,), mean (G, C), M2 (G, C))`` of the rows of x (B, C); two-pass."""
    onehot = F.one_hot(groups, num_groups).to(x.dtype)  # (B, G)
    count = onehot.sum(dim=0)
    mean = (onehot.t() @ x) / count.clamp(min=1).unsqueeze(1)
    centred = x - mean[groups]
    return count, mean, onehot.t() @ (centred * centred)


def merge_moments(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Chan's merge over the leading (rank) axis: (R, G), (R, G, C), (R, G, C) -> (G,), (G, C), (G, C)."""
    total = count.sum(dim=0)
    weight = (count / total.clamp(min=1)).unsqueeze(2)  # n_r / n; 0 where a rank has no rows of the group
    merged_mean = (weight * mean).sum(dim=0)
    spread = count.unsqueeze(2) * (mean - merged_mean) ** 2
    return total, merged_mean, (m2 + spread).sum(dim=0)


class _GlobalMoments(torch.autograd.Function):
    """(x (B, C) on this rank, groups (B,)) -> global count (G,), mean (G, C), biased variance (G, C)."""

    @staticmethod
    def forward(ctx, x, groups, num_groups, group):
        count, mean, m2 = local_moments(x.detach(), groups, num_groups)
        width = x.shape[1]
        packed = torch.cat([count.unsqueeze(1), mean, m2], dim=1)  # (G, 1 + 2C): one message per rank
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed.contiguous(), group=group)
        gathered = torch.stack(gathered)
        total, mean, m2 = merge_moments(gathered[..., 0], gathered[..., 1:1 + width], gathered[..., 1 + width:])
        var = m2 / total.clamp(min=1).unsqueeze(1)
        ctx.save_for_backward(x, groups, total, mean)
        ctx.group = group
        ctx.mark_non_differentiable(total)
        return total, mean, var

    @staticmethod
    def backward(ctx, _grad_count, grad_mean, grad_var):
        x, groups, total, mean = ctx.saved_tensors
        # Every rank's loss reaches the global mean and variance: sum those gradients over the ranks.
        packed = torch.cat([grad_mean, grad_var], dim=1).contiguous()
        dist.all_reduce(packed, group=ctx.group)
        grad_mean, grad_var = packed.chunk(2, dim=1)
        inverse = 1.0 / total.clamp(min=1).unsqueeze(1)
        grad_x = (grad_mean * inverse)[groups] + (2 * grad_var * inverse)[groups] * (x - mean[groups])
        return grad_x, None, None, None


def global_moments(x: torch.Tensor, groups: torch.Tensor, num_groups: int, group):
    """Differentiable global (count, mean, biased variance) per group over every rank's rows."""
    return _GlobalMoments.apply(x, groups, num_groups, group)


def _group_stats(count, mean, var) -> GroupStats:
    """The contract's detached (count, mean, M2) of the merged statistics."""
    return GroupStats(count.detach(), mean.detach(), (var * count.unsqueeze(1)).detach())


# ----------------------------------------------------------------------------- synchronised normalisations
def domain_norm(o, domain, weight, bias, running_mean, running_var, plan: Plan, group):
    """DomainNorm with the statistics of the global batch (a ``plan`` with batch statistics: training, and
    released mode in eval); what the checked op runs in place of a backend while :func:`synchronised` is on.

    paper: per-domain statistics, per-domain affine (D, h), running statistics updated (when the plan says so)
    from the global per-domain (count, mean, M2). released: whole-batch statistics with the unbiased variance,
    shared affine (h,)."""
    if not plan.per_domain:
        count, mean, var = global_moments(o, torch.zeros_like(domain), 1, group)
        unbiased = var * count / (count - 1).clamp(min=1)  # one row: variance 0 (the released code: NaN)
        return torch.addcmul(bias, (o - mean) * torch.rsqrt(unbiased + plan.eps), weight)
    count, mean, var = global_moments(o, domain, weight.shape[0], group)
    if plan.update_running:
        update_running_stats(running_mean, running_var, _group_stats(count, mean, var), plan.momentum)
    scale = weight * torch.rsqrt(var + plan.eps)
    return torch.addcmul(bias[domain], o - mean[domain], scale[domain])


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``F.batch_norm`` on (B, C), with the global batch's statistics while :func:`synchronised` is active."""
    group = active_group()
    if group is None or not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    count, mean, var = global_moments(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1, group)
    if running_mean is not None:  # one group: the running statistics seen as (1, C)
        update_running_stats(running_mean.view(1, -1), running_var.view(1, -1), _group_stats(count, mean, var),
                             momentum)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if weight is None else torch.addcmul(bias, out, weight)


def mean_and_covariance(x: torch.Tensor):
    """``(count, mean (C,), biased covariance (C, C))`` of the rows of x (B, C): this rank's, or every rank's
    while :func:`synchronised` is active. Two-pass (centred on the global mean, so no cancellation); the two
    ``all_reduce`` calls are ``torch.distributed.nn``'s, whose backward sums the gradients over the ranks, as the
    backward of a statistic of every rank's rows must (the convention of :class:`_GlobalMoments`)."""
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


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics span every rank while :func:`synchronised` is active.

    ``updates_per_step`` keeps the hyper-network's released-mode behaviour (running statistics advanced
    D times per step: one update with momentum ``1 - (1 - m)^D``, see ``RepeatedUpdateBatchNorm1d``).
    Parameters, buffers and state_dict keys are those of the ``BatchNorm1d`` it replaces."""

    updates_per_step = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(self.updates_per_step)
        if self.momentum is None:  # cumulative moving average, as BatchNorm1d(momentum=None)
            momentum = 1.0 / float(self.num_batches_tracked)
        elif self.updates_per_step == 1:
            momentum = self.momentum
        else:
            momentum = 1.0 - (1.0 - self.momentum) ** self.updates_per_step
        return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)


def convert_batch_norms(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` inside ``module`` (in place) by a :class:`SyncBatchNorm1d` sharing
    its parameters and buffers; returns ``module`` (or the replacement, if ``module`` itself is one)."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, SyncBatchNorm1d):
        converted = SyncBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        converted.updates_per_step = getattr(module, "updates_per_step", 1)
        converted.__dict__["_parameters"] = module._parameters
        converted.__dict__["_buffers"] = module._buffers
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replacement = convert_batch_norms(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
