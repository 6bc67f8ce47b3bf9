"""HAMUR (Li et al., CIKM 2023) on the embedded instance: hyper-network + backbone with adapter cells."""
from __future__ import annotations

import torch
from torch import nn

from .. import _checks, ops
from ..nn import HyperNetwork
from .backbones import BACKBONES, WideDeepBackbone
from .presets import resolve_sizes


class HAMUR(nn.Module):
    """HAMUR model core: ``forward(e: (B, input_dim), domain: (B,) int64) -> probabilities (B,)``.

    ``e`` is the instance embedding of SPEC section 1 (sparse-field embeddings concatenated, dense
    features appended). ``backbone`` is "mlp" (per-domain towers), "dcn" or "wide_deep"; ``preset``
    ("movielens", "aliccp" or None = movielens) fills the released sizes of SPEC section 4 and any
    size keyword (dims, adapter_after, hyper_dims, rank, bottleneck, dropout, cross_layers,
    wide_dim, eps) overrides it. ``use_adapter=False`` gives the same backbone without adapters
    (no hyper-network), the baseline HAMUR is measured against.
    """

    def __init__(self, input_dim: int, num_domains: int, backbone: str = "mlp", mode: str = "paper",
                 preset: str | None = None, *, use_adapter: bool = True, backend: str = "auto", **sizes):
        super().__init__()
        ops.check_mode(mode)
        if input_dim < 1 or num_domains < 1:
            raise ValueError(f"input_dim and num_domains must be >= 1, got {input_dim} and {num_domains}")
        self.sizes = resolve_sizes(backbone, preset, sizes)
        self.input_dim, self.num_domains, self.backbone_name, self.mode = input_dim, num_domains, backbone, mode
        self.backbone = BACKBONES[backbone](input_dim, num_domains, self.sizes, mode, use_adapter, backend)
        # Released code runs the hyper-network once per domain: its BN statistics move D times a step.
        repeats = num_domains if mode == "released" else 1
        self.hyper = (HyperNetwork(input_dim, self.sizes["hyper_dims"], self.sizes["rank"],
                                   stat_updates_per_step=repeats) if use_adapter else None)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = ops.check_backend_name(name)
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = name

    def _hyper_input(self, e: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, WideDeepBackbone):
            return torch.cat(self.backbone.split(e), dim=1)  # concat(wide input, deep input)
        return e

    def logits(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        _checks.check_float("e", e, 2)
        batch = _checks.check_batch("e", e)
        if e.shape[1] != self.input_dim:
            raise ValueError(f"e must have shape (B, {self.input_dim}), got {tuple(e.shape)}")
        _checks.check_domain(domain, batch, self.num_domains)
        with _checks.domain_values_checked():
            rep = self.hyper(self._hyper_input(e)) if self.hyper is not None else None
            return self.backbone(e, domain, rep)

    def forward(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(e, domain))
