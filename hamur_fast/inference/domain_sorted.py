"""Paper-mode HAMUR eval written for Inductor: rows sorted by domain once, each domain's rows through plain GEMMs.

The folded eval model (:mod:`hamur_fast.inference.folding`) routes every per-domain layer through the
grouped per-domain GEMM, which under ``torch.export`` becomes its sync-free "stacked" form: every domain's
weights against every row, then a gather, D times the FLOPs of each tower layer and adapter factor. An
AOTInductor package of that ran batch 4096 more slowly than the eager model (benchmarks/RESULTS.md, issue 21).

:class:`DomainSortedHAMUR` computes the same function from the same folded weights, row by row:
1. the rows are sorted by domain once (a counting sort) and the segment sizes read on the host (free on the
   CPU; ``torch.export`` keeps them as data-dependent sizes, so the graph holds for any mix of domains);
2. the domain-shared hyper-network runs on all rows; its last layer is a GEMM whose output width k*k is
   zero-padded to a multiple of 16 (torch's CPU GEMM ran 4096 x 64 x 1225 at half the speed of x 1232) and
   whose bias and ReLU are left to the consumers, which Inductor fuses into the per-row products;
3. each domain's segment runs through its own tower: plain ``addmm`` with that domain's weights, the
   adapter cell as four GEMMs with that domain's factors and two per-row ``u @ I_b`` products written as a
   multiply and a sum (one fused loop, no (B, k, k) weight copies);
4. the logits are put back in the input order; a row whose domain id is outside [0, D) scores NaN, as the
   model's own forward does with value checks off.
Every row is computed on its own, so a batch of 1 costs one tower's weights, not D towers'.

It covers HAMUR with the MLP backbone in paper mode whose normalisations all folded away (tower BatchNorms,
DomainNorm with running statistics, the hyper-network's BatchNorms) and a dynamic, static or no
representation; :func:`domain_sorted` returns None for anything else, which then exports as it is.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..models import HAMUR
from ..models.backbones import DomainTowers
from ..nn.domain_layers import NoTowerNorm
from .folding import FoldedHyperAdapter, NormFoldedAway

# Pad the generated representation's width to this many floats (one AVX-512 vector).
_GEMM_WIDTH_MULTIPLE = 16
_HYPER_LAYERS = (nn.Linear, nn.Identity, nn.ReLU, nn.Dropout)


def domain_sorted(core: nn.Module) -> "DomainSortedHAMUR | None":
    """The :class:`DomainSortedHAMUR` of a folded eval model, or None where it does not apply."""
    if type(core) is not HAMUR or core.training or core.mode != "paper" or type(core.backbone) is not DomainTowers:
        return None
    towers = core.backbone
    if not all(isinstance(norm, (NormFoldedAway, NoTowerNorm)) for norm in towers.norms):
        return None
    if not all(type(cell) is FoldedHyperAdapter for cell in towers.adapters):
        return None
    if core.hyper is not None and not _plain_hyper_network(core.hyper.net):
        return None
    return DomainSortedHAMUR(core)


def _plain_hyper_network(net: nn.Sequential) -> bool:
    """Folded Linear -> (BN folded away) -> ReLU -> Dropout blocks, the last one generating I."""
    return (all(type(layer) in _HYPER_LAYERS for layer in net) and len(net) >= 4
            and [type(layer) for layer in net[-4:]] == [nn.Linear, nn.Identity, nn.ReLU, nn.Dropout])


def _no_rows(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """The logits of an empty segment (torch.cond's other branch)."""
    return x.new_zeros(x.shape[0])


class DomainSortedHAMUR(nn.Module):
    """``(e (B, input_dim), domain (B,)) -> probabilities (B,)``, equal to the folded ``core`` row by row."""

    def __init__(self, core: HAMUR):
        super().__init__()
        towers = core.backbone
        self.input_dim, self.num_domains = core.input_dim, core.num_domains
        self.linears, self.out, self.cells = towers.linears, towers.out, towers.adapters
        self.adapter_after = list(towers.adapter_after)
        self.rank = core.sizes["rank"]
        self.register_buffer("static_rep", None if core.static_rep is None else core.static_rep.detach().clone())
        self.hidden = None if core.hyper is None else core.hyper.net[:-4]
        if core.hyper is not None:
            last = core.hyper.net[-4]
            weight = last.weight.detach()
            padding = weight.new_zeros(-weight.shape[0] % _GEMM_WIDTH_MULTIPLE, weight.shape[1])
            self.register_buffer("generator_weight", torch.cat([weight, padding]).t().contiguous())
            self.register_buffer("generator_bias", last.bias.detach().view(self.rank, self.rank).clone())

    def forward(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        valid = (domain >= 0) & (domain < self.num_domains)
        key = torch.where(valid, domain, self.num_domains)  # invalid ids: one last segment, scored NaN
        # A counting sort by domain in fused elementwise loops (an argsort is a library call that alone cost a
        # batch of 1 about 8 us): row b goes to its domain's first position plus its rank among that domain's rows.
        member = key.unsqueeze(1) == torch.arange(self.num_domains + 1, device=key.device)  # (B, D + 1)
        counts = member.sum(0)
        rank = (member.cumsum(0) - 1).mul(member).sum(1)
        position = (counts.cumsum(0) - counts)[key] + rank
        order = torch.empty_like(position).scatter_(0, position, torch.arange(e.shape[0], device=e.device))
        sizes = counts.tolist()
        for size in sizes:
            torch._check(size >= 0)
        torch._check(sum(sizes) == e.shape[0])
        rows = e.index_select(0, order)
        segments = [rows.split(sizes)]
        if self.hidden is not None:
            segments.append((self.hidden(rows) @ self.generator_weight).split(sizes))
        logits = []
        for d, operands in enumerate(zip(*segments)):
            if d == self.num_domains:
                logits.append(torch.full_like(operands[0][:, 0], float("nan")))
            else:  # an empty segment (most of them at batch 1) skips its tower's GEMM calls altogether
                logits.append(torch.cond(operands[0].shape[0] > 0, partial(self._domain_logits, d), _no_rows,
                                         operands))
        sorted_logits = torch.cat(logits)
        return torch.sigmoid(sorted_logits[position])

    def _domain_logits(self, d: int, x: torch.Tensor, generated_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self._tower(x, d, self._representation(generated_rows, d))

    def _representation(self, generated_rows, d: int):
        """I_b of domain d's rows (n, k, k), or its static (k, k) matrix, or None (no adapter cells)."""
        if generated_rows is not None:  # a pointwise tail: Inductor computes it inside the per-row products
            k = self.rank
            return torch.relu(generated_rows[:, :k * k].unflatten(1, (k, k)) + self.generator_bias)
        return None if self.static_rep is None else self.static_rep[d]

    def _tower(self, x: torch.Tensor, d: int, rep) -> torch.Tensor:
        cells = iter(self.cells)
        for j, linear in enumerate(self.linears):
            x = torch.relu(torch.addmm(linear.bias[d], x, linear.weight[d].t()))
            if j in self.adapter_after:
                x = self._cell(next(cells), x, d, rep)
        return torch.addmm(self.out.bias[d], x, self.out.weight[d].t()).squeeze(1)

    def _cell(self, cell: FoldedHyperAdapter, x: torch.Tensor, d: int, rep) -> torch.Tensor:
        """x + ((sigmoid(((x U) I) V + b) U') I) V' + b' (SPEC section 2; the normalisation folded into V', b')."""
        down_left, down_right, down_bias, up_left, up_right, up_bias = (
            getattr(cell, name)[d] if cell.per_domain else getattr(cell, name)
            for name in ("down_left", "down_right", "down_bias", "up_left", "up_right", "up_bias"))

        def through_rep(v):  # row-wise v[b] @ I_b: each row's generated (k, k), or the domain's static one
            return (v.unsqueeze(2) * rep).sum(1) if self.hidden is not None else v @ rep

        a = torch.sigmoid(torch.addmm(down_bias, through_rep(x @ down_left), down_right))
        return x + torch.addmm(up_bias, through_rep(a @ up_left), up_right)
