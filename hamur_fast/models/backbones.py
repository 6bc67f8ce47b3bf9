"""The three backbones of SPEC section 4, each with optional adapter cells.

Every backbone maps (e: (B, F), domain: (B,), rep: (B, k, k) or None) to logits (B,).
With ``rep=None`` (no adapters) the same classes are the plain baselines.
"""
from __future__ import annotations

import torch
from torch import nn

from ..nn import DomainBatchNorm1d, DomainLinear, HyperAdapter
from ..nn.domain_layers import NoTowerNorm, SharedStatsBatchNorm, TowerLayerNorm, WholeBatchFirstLayerNorm
from ..ops import grouped_linear
from ..ops.generated import GeneratedRep
from .blocks import mlp_layers

# Normalisation in the MLP backbone's towers (the "tower_norm" switch; paper mode only, released mode is
# always "released"). See DomainTowers and benchmarks/RESULTS.md ("Tower normalisation") for the measurements:
# per-domain statistics ("domain", the default before) cost ~0.006 AUC; "shared" and "none" tie for the best
# mean validation AUC (mlp and hamur_mlp, MovieLens sample and synthetic data); "shared" keeps BatchNorm in
# the towers (deep towers untested without it) and was the better of the two for hamur_mlp on both data sets.
TOWER_NORMS = ("domain", "whole", "shared", "layer", "none", "released")
DEFAULT_TOWER_NORM = "shared"


def _adapters(widths: list, adapter_after: list, num_domains: int, sizes: dict, mode: str, backend: str):
    """One adapter cell after each hidden layer listed in ``adapter_after`` (widths[0] is the input)."""
    return nn.ModuleList(
        HyperAdapter(widths[i + 1], sizes["rank"], num_domains, bottleneck=sizes["bottleneck"], mode=mode,
                     eps=sizes["eps"], backend=backend, norm=sizes["norm"])
        for i in adapter_after
    )


class DomainTowers(nn.Module):
    """Per-domain MLP towers ``F -> dims... -> 1`` (Linear, BN, ReLU each) with adapter cells inside.

    paper mode: each row runs through its own domain's tower only (routed), with the tower
    normalisation ``tower_norm`` chooses (CPU eager: on the rows sorted by domain once). released mode: every
    tower runs on the whole mixed batch (so each tower's BatchNorm and each adapter's normalisation see the whole
    batch) and row b keeps tower d_b's output, exactly as the released code.

    ``tower_norm`` (paper mode; a key of ``sizes``; default ``DEFAULT_TOWER_NORM``):
    - "domain": BatchNorm statistics per domain, over the rows routed to the tower;
    - "whole": the released code's statistics (tower d's over the whole batch) with routed compute,
      derived exactly after the first layer from the batch mean and covariance of the input
      (:class:`WholeBatchFirstLayerNorm`); deeper layers cannot be derived (they would need every
      tower on every row) and use the "shared" statistics;
    - "shared": one set of statistics over the whole routed batch, shared by all towers;
    - "layer": LayerNorm per row; "none": Linear -> ReLU;
    - "released": every tower on the whole batch in training (D times the work; adapter cell d on the
      whole batch as domain d), routed in eval, where the result is the same row by row.
    Every variant keeps a per-domain affine map and is row-wise (batch-independent) in eval.
    """

    def __init__(self, input_dim: int, num_domains: int, sizes: dict, mode: str, use_adapter: bool,
                 backend: str):
        super().__init__()
        self.mode, self.num_domains = mode, num_domains
        widths = [input_dim, *sizes["dims"]]
        self.linears = nn.ModuleList(DomainLinear(i, o, num_domains) for i, o in zip(widths, widths[1:]))
        self.tower_norm = sizes.get("tower_norm") or ("released" if mode == "released" else DEFAULT_TOWER_NORM)
        self.norms = _tower_norms(widths[1:], num_domains, self.tower_norm, backend)
        self.out = DomainLinear(widths[-1], 1, num_domains)
        self.adapter_after = list(sizes["adapter_after"]) if use_adapter else []
        self.adapters = _adapters(widths, self.adapter_after, num_domains, sizes, mode, backend)

    @classmethod
    def plain(cls, input_dim: int, num_domains: int, dims) -> "DomainTowers":
        """Towers without adapter cells (paper mode): the per-domain heads of the multi-task baselines.

        Call as ``towers(x, domain, None)``; with empty ``dims`` each tower is one ``Linear(input_dim, 1)``.
        Their statistics stay per domain (``tower_norm`` "domain") whatever the MLP backbone's default.
        """
        sizes = dict(dims=list(dims), adapter_after=[], tower_norm="domain")
        return cls(input_dim, num_domains, sizes, "paper", False, "auto")

    def forward(self, e, domain, rep):
        if self.mode == "released" or (self.tower_norm == "released" and self.training):
            return self._all_towers(e, domain, rep)
        if e.device.type != "cpu" or torch.compiler.is_compiling():
            return self._routed(e, domain, rep)  # the grouped op's sync-free forms: no host sizes
        return self._routed_sorted(e, domain, rep)

    def _routed_sorted(self, e, domain, rep):
        """The routed towers on the rows sorted by domain once (CPU eager: the segment sizes read on the host for
        free): every layer then works on contiguous per-domain segments, with no per-layer gather and scatter
        (forward) or scatter-add (backward); the logits are put back in the input order at the end."""
        order, (*sizes, outside) = grouped_linear.host_segments(domain, self.num_domains)
        if outside:  # ids outside [0, D) (value checks off): the per-layer path, which gives those rows zeros
            return self._routed(e, domain, rep)
        if order is None:  # already in domain order
            return self._routed(e, domain, rep, sizes)
        rep = rep if rep is None else (rep.select_rows(order) if isinstance(rep, GeneratedRep)
                                       else rep.index_select(0, order))
        logits = self._routed(e.index_select(0, order), domain.index_select(0, order), rep, sizes)
        return torch.empty_like(logits).index_copy(0, order, logits)

    def _routed(self, e, domain, rep, sizes=None):
        """Each row through its own domain's tower; ``sizes``: rows sorted by domain (see DomainLinear.routed)."""
        h = e
        cells = iter(self.adapters)
        for j, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            z = linear.routed(h, domain, sizes)
            if isinstance(norm, WholeBatchFirstLayerNorm):
                z = norm.routed_from_input(z, domain, h, linear, sizes)
            else:
                z = norm.routed(z, domain, sizes)
            h = torch.relu(z)
            if j in self.adapter_after:
                h = next(cells)(h, rep, domain)
        return self.out.routed(h, domain, sizes).squeeze(1)

    def _all_towers(self, e, domain, rep):
        h = e
        cells = iter(self.adapters)
        for j, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            h = norm.all_domains_relu(linear.every_domain(h) if j == 0 else linear.all_domains(h))
            if j in self.adapter_after:
                cell = next(cells)
                if self.mode == "released":
                    h = cell.forward_all_towers(h, rep, domain)
                else:  # paper cells: tower d's cell is domain d's, applied to the whole batch
                    h = torch.stack([cell(tower, rep, torch.full_like(domain, d)) for d, tower in enumerate(h)])
        # (D, B): every tower's logit for every row (towers without hidden layers: all read e)
        logits = (self.out.all_domains(h) if self.linears else self.out.every_domain(h)).squeeze(2)
        return logits.gather(0, domain.unsqueeze(0)).squeeze(0)


def _tower_norms(widths: list, num_domains: int, tower_norm: str, backend: str) -> nn.ModuleList:
    """One normalisation per tower layer of width ``widths[j]`` (see DomainTowers)."""
    if tower_norm not in TOWER_NORMS:
        raise ValueError(f"tower_norm must be one of {TOWER_NORMS}, got {tower_norm!r}")
    if tower_norm in ("domain", "released"):
        return nn.ModuleList(DomainBatchNorm1d(w, num_domains, backend=backend) for w in widths)
    if tower_norm == "whole":
        return nn.ModuleList([WholeBatchFirstLayerNorm(widths[0], num_domains),
                              *(SharedStatsBatchNorm(w, num_domains) for w in widths[1:])])
    variant = {"shared": SharedStatsBatchNorm, "layer": TowerLayerNorm}.get(tower_norm)
    if variant is None:  # "none"
        return nn.ModuleList(NoTowerNorm() for _ in widths)
    return nn.ModuleList(variant(w, num_domains) for w in widths)


class SharedMLP(nn.Module):
    """Shared Linear -> BN -> ReLU -> Dropout stack with adapter cells after chosen layers."""

    def __init__(self, input_dim: int, num_domains: int, sizes: dict, mode: str, use_adapter: bool,
                 backend: str):
        super().__init__()
        widths = [input_dim, *sizes["dims"]]
        self.layers = mlp_layers(input_dim, sizes["dims"], sizes["dropout"])
        self.adapter_after = list(sizes["adapter_after"]) if use_adapter else []
        self.adapters = _adapters(widths, self.adapter_after, num_domains, sizes, mode, backend)
        self.output_dim = widths[-1]

    def forward(self, x, domain, rep):
        cells = iter(self.adapters)
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if j in self.adapter_after:
                x = next(cells)(x, rep, domain)
        return x


class CrossNetwork(nn.Module):
    """DCN cross layers: ``x_{l+1} = x_0 * (x_l . w_l) + b_l + x_l`` (Wang et al., 2017, eq. 3)."""

    def __init__(self, input_dim: int, num_layers: int):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(input_dim) / input_dim ** 0.5)
                                        for _ in range(num_layers))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers))

    def forward(self, x0):
        x = x0
        for w, b in zip(self.weights, self.biases):
            x = x0 * (x @ w).unsqueeze(1) + b + x
        return x


class DCNBackbone(nn.Module):
    """Shared CrossNetwork parallel to a shared MLP (adapters on it); LR on their concatenation."""

    def __init__(self, input_dim: int, num_domains: int, sizes: dict, mode: str, use_adapter: bool,
                 backend: str):
        super().__init__()
        self.cross = CrossNetwork(input_dim, sizes["cross_layers"])
        self.mlp = SharedMLP(input_dim, num_domains, sizes, mode, use_adapter, backend)
        self.out = nn.Linear(input_dim + self.mlp.output_dim, 1)

    def forward(self, e, domain, rep):
        return self.out(torch.cat([self.cross(e), self.mlp(e, domain, rep)], dim=1)).squeeze(1)


class WideDeepBackbone(nn.Module):
    """Wide: LR on the dense features (the last ``wide_dim`` columns of e). Deep: MLP on the rest."""

    def __init__(self, input_dim: int, num_domains: int, sizes: dict, mode: str, use_adapter: bool,
                 backend: str):
        super().__init__()
        self.wide_dim = sizes["wide_dim"]
        if not 0 < self.wide_dim < input_dim:
            raise ValueError(f"wide_dim must be in [1, input_dim), got {self.wide_dim} for input_dim={input_dim}")
        self.wide = nn.Linear(self.wide_dim, 1)
        self.deep = SharedMLP(input_dim - self.wide_dim, num_domains, sizes, mode, use_adapter, backend)
        self.deep_out = nn.Linear(self.deep.output_dim, 1)

    def split(self, e):
        return e[:, -self.wide_dim:], e[:, :-self.wide_dim]

    def forward(self, e, domain, rep):
        wide, deep = self.split(e)
        return (self.wide(wide) + self.deep_out(self.deep(deep, domain, rep))).squeeze(1)


BACKBONES = {"mlp": DomainTowers, "dcn": DCNBackbone, "wide_deep": WideDeepBackbone}
