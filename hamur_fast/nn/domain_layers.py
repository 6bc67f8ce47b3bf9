"""Per-domain (tower) layers that run without a Python loop over domains.

Each layer stores the D domains' parameters stacked on a leading axis and offers two ways to run:
- ``routed(x, domain, sizes=None)``: row b goes through domain d_b's layer only (paper-mode towers); with
  ``sizes`` (host ints) the caller has sorted the rows by domain, ``sizes[d]`` rows of domain d first to last,
  and each layer works on those contiguous segments (no per-layer gather or scatter);
- ``all_domains(x)``: every domain's layer sees the whole batch, giving (D, B, ...) (released mode,
  where each tower runs on the whole mixed batch and a row later takes its own tower's output); a tower's first
  layer, whose input all towers share, is ``DomainLinear.every_domain(x)``; ``DomainBatchNorm1d.all_domains_relu``
  is the normalisation and the ReLU after it, fused on the CPU (:mod:`hamur_fast.ops.tower_norm_relu`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.collectives import domain_counts, mean_and_covariance
from ..ops.compose import batch_norm
from ..ops import grouped_linear, tower_norm_relu
from ..ops.all_domains_linear import all_domains_linear


class DomainLinear(nn.Module):
    """D independent ``nn.Linear(in_features, out_features)`` layers, weights (D, out, in)."""

    def __init__(self, in_features: int, out_features: int, num_domains: int):
        super().__init__()
        self.in_features, self.out_features, self.num_domains = in_features, out_features, num_domains
        self.weight = nn.Parameter(torch.empty(num_domains, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_domains, out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's default, per domain
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def routed(self, x: torch.Tensor, domain: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        """Row b through domain d_b's layer only: the grouped per-domain GEMM (cost ~ B, whatever D is)."""
        if sizes is not None:
            return grouped_linear.run_sorted(x, sizes, self.weight.transpose(1, 2), self.bias)
        return grouped_linear.run(x, domain, self.weight.transpose(1, 2), self.bias)

    def all_domains(self, x: torch.Tensor) -> torch.Tensor:
        """x (D, B, in), one slice per domain: slice d through domain d's layer -> (D, B, out)."""
        return all_domains_linear(x, self.weight.transpose(1, 2), self.bias)

    def every_domain(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in) shared by all domains: the whole batch through every domain's layer -> (D, B, out).

        One GEMM with the bias fused; (D, B, out) is a view of the (B, D*out) product, the layout
        DomainBatchNorm1d.all_domains normalises without a copy."""
        flat = torch.addmm(self.bias.view(-1), x, self.weight.view(-1, self.in_features).t())
        return flat.view(x.shape[0], self.num_domains, self.out_features).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, num_domains={self.num_domains}"


class DomainBatchNorm1d(nn.Module):
    """D independent ``nn.BatchNorm1d(num_features)``; statistics per domain (routed) or per tower."""

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.num_features, self.num_domains, self.eps, self.momentum = num_features, num_domains, eps, momentum
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(num_domains, num_features))
        self.bias = nn.Parameter(torch.zeros(num_domains, num_features))
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_domains, dtype=torch.long))

    def routed(self, z: torch.Tensor, domain: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        # sizes unused: the op groups the rows by domain itself (a trivial counting sort on sorted rows)
        if self.training:
            with torch.no_grad():
                seen = domain_counts(domain, self.num_domains) >= 2
                self.num_batches_tracked.add_(seen.long())
        # Per-domain batch normalisation is exactly paper-mode DomainNorm.
        return ops.domain_norm(z, domain, self.weight, self.bias, self.running_mean, self.running_var,
                               mode="paper", training=self.training, momentum=self.momentum, eps=self.eps,
                               backend=self.backend)

    def all_domains(self, z: torch.Tensor) -> torch.Tensor:
        """z: (D, B, C); domain d's statistics span the whole batch of slice d (BatchNorm1d per tower)."""
        num_domains, batch, channels = z.shape
        if self.training:
            self.num_batches_tracked.add_(1)
        flat = z.permute(1, 0, 2).reshape(batch, num_domains * channels)
        out = batch_norm(flat, self.running_mean.view(-1), self.running_var.view(-1),
                           self.weight.reshape(-1), self.bias.reshape(-1), self.training, self.momentum, self.eps)
        return out.view(batch, num_domains, channels).permute(1, 0, 2)

    def all_domains_relu(self, z: torch.Tensor) -> torch.Tensor:
        """``relu(all_domains(z))``: one fused C++ op (two passes over z each way, no (B, D*C) copy of z) where it
        applies (CPU eager, no synchronised statistics: :func:`hamur_fast.ops.tower_norm_relu.applies`)."""
        tables = (self.weight, self.bias, self.running_mean, self.running_var)
        if not tower_norm_relu.applies(z, tables, self.training, self.momentum):
            return torch.relu(self.all_domains(z))
        if self.training:
            self.num_batches_tracked.add_(1)
        return tower_norm_relu.tower_norm_relu(z, *tables, self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}"


# ---------------------------------------------------------------------------- tower-norm variants
# Routed compute (each row through its own domain's tower only) with other normalisation statistics
# than DomainBatchNorm1d's per-domain ones: the "tower_norm" switch of the MLP backbone. Every variant
# keeps a per-domain affine map and is row-wise in eval (running statistics, or per-row LayerNorm).


def _per_domain_affine(standard: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, domain: torch.Tensor,
                       sizes: list[int] | None, centre: torch.Tensor | None = None) -> torch.Tensor:
    """``(standard - centre[d_b]) * weight[d_b] + bias[d_b]`` row by row (no centre: 0); weight, bias, centre (D, C).

    On rows sorted by domain (``sizes``) each segment broadcasts its domain's rows of the tables: no (B, C)
    gathers forward, no scatter-adds backward (the tables' gradients are column sums of the segments)."""
    if sizes is None:
        # index_select: its backward is an index_add (indexing's, an accumulating index_put, 4x slower on the CPU)
        if centre is not None:
            standard = standard - centre.index_select(0, domain)
        return torch.addcmul(bias.index_select(0, domain), standard, weight.index_select(0, domain))
    pieces = standard.split(sizes)
    if centre is not None:
        pieces = [piece - c for piece, c in zip(pieces, centre.unbind(0))]
    return torch.cat([torch.addcmul(b, piece, w) for piece, w, b in zip(pieces, weight.unbind(0), bias.unbind(0))])


class _TowerNormBase(nn.Module):
    """Per-domain affine (D, C) shared by the variants below."""

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.num_domains, self.eps, self.momentum = num_features, num_domains, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_domains, num_features))
        self.bias = nn.Parameter(torch.zeros(num_domains, num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}"


class SharedStatsBatchNorm(_TowerNormBase):
    """Tower BatchNorm with ONE set of statistics shared by all towers: the mean and variance of the
    routed batch (every row through its own domain's tower), one set of running statistics for eval;
    the affine map stays per domain. Costs what per-domain statistics cost (less: no per-domain split)."""

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, num_domains, eps, momentum)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def routed(self, z: torch.Tensor, domain: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        # batch_norm: the global batch's statistics while a data-parallel step synchronises them.
        standard = batch_norm(z, self.running_mean, self.running_var, None, None, self.training, self.momentum,
                              self.eps)
        return _per_domain_affine(standard, self.weight, self.bias, domain, sizes)


class TowerLayerNorm(_TowerNormBase):
    """LayerNorm over each row's features inside its own tower (no batch statistics), per-domain affine."""

    def routed(self, z: torch.Tensor, domain: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        standard = F.layer_norm(z, (self.num_features,), eps=self.eps)
        return _per_domain_affine(standard, self.weight, self.bias, domain, sizes)


class NoTowerNorm(nn.Module):
    """No normalisation in the towers (Linear -> ReLU): the identity, with no parameters."""

    def routed(self, z: torch.Tensor, domain: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        return z


def affine_batch_moments(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Batch mean and biased variance of every tower's ``z_d = x W_d^T + b_d`` over ALL rows of ``x``,
    without computing any ``z_d`` on the whole batch.

    x: (B, F); weight: (D, C, F); bias: (D, C) -> count, mean, var: (D, C). ``z_d`` is affine in ``x``, so
    with ``mu`` and ``S`` the batch mean and biased covariance of ``x``: ``mean_d = W_d mu + b_d`` and
    ``var_d = diag(W_d S W_d^T)`` (SPEC section 6 uses the same identity for the generator). Cost
    O(B F^2 + D C F^2), independent of B times D; autograd through these formulas gives exactly the
    gradients of the direct computation. Under data parallelism (:func:`~hamur_fast.ops.collectives.
    synchronised`) ``mu``, ``S`` and the row count are those of every rank's rows.
    """
    count, mu, covariance = mean_and_covariance(x)  # (F,), (F, F)
    mean = weight @ mu + bias
    var = ((weight @ covariance) * weight).sum(dim=-1)  # row-wise quadratic forms w^T S w
    return count, mean, var.clamp(min=0)


class WholeBatchFirstLayerNorm(_TowerNormBase):
    """Tower BatchNorm after the FIRST tower layer with the statistics the released code has (tower d's
    BatchNorm over the whole mixed batch), derived exactly from the batch mean and covariance of the
    tower input (:func:`affine_batch_moments`) while every row still runs through its own tower only.

    Only the first layer allows this: a deeper layer's input is ``relu(...)`` of tower d's previous layer
    on the whole batch, which has no closed form in the batch moments of ``x``; it would take tower d
    on every row (D times the work). Running statistics per tower (D, C), updated like BatchNorm1d's
    (unbiased variance) from the whole-batch statistics, are used in eval.
    """

    def __init__(self, num_features: int, num_domains: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_features, num_domains, eps, momentum)
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))

    def routed_from_input(self, z: torch.Tensor, domain: torch.Tensor, x: torch.Tensor, linear: "DomainLinear",
                          sizes: list[int] | None = None) -> torch.Tensor:
        """z = linear.routed(x, domain, sizes): (B, C); x: the tower input (B, F) that produced it."""
        if self.training:
            count, mean, var = affine_batch_moments(x, linear.weight, linear.bias)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * (count / (count - 1).clamp(min=1)), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        return _per_domain_affine(z, scale, self.bias, domain, sizes, centre=mean)
