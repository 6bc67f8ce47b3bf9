"""Batch statistics merged across data-parallel ranks: the collectives of the synchronised normalisations.

Under data parallelism each rank sees 1/N of the global batch. Every normalisation that reads "the batch"
(paper-mode DomainNorm per domain, released-mode DomainNorm over the whole batch, the tower
``DomainBatchNorm1d``, shared ``BatchNorm1d``, the hyper-network's BatchNorm) must use the statistics of
the global batch, or N ranks train a different model than one process on the same rows.

How (composed by :mod:`hamur_fast.ops.compose`): each rank reduces its rows to per-group moments
``(count, mean, M2)`` with the statistics pass of the backend that runs the op (its table's), one
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

from .contract import GroupStats

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


def all_reduce_sums(sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, group):
    """Per-group sums of dy and dy * xhat over every rank's rows (one all_reduce): every rank's loss reaches the
    global statistics, so each row's input gradient needs them all."""
    packed = torch.stack([sum_dy, sum_dy_xhat])
    dist.all_reduce(packed, group=group)
    return packed[0], packed[1]


def mean_and_covariance(x: torch.Tensor):
    """``(count, mean (C,), biased covariance (C, C))`` of the rows of x (B, C): this rank's, or every rank's
    while :func:`synchronised` is active. Two-pass (centred on the global mean, so no cancellation); the two
    ``all_reduce`` calls are ``torch.distributed.nn``'s, whose backward sums the gradients over the ranks, as the
    backward of a statistic of every rank's rows must (as the split normalisation sums its dy sums)."""
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
