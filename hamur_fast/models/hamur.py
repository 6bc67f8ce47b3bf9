"""HAMUR (Li et al., CIKM 2023) on the embedded instance: hyper-network + backbone with adapter cells."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.collectives import active_group
from ..ops import generated, grouped_linear
from ..nn import HyperNetwork
from ..nn.adapter import NORMS, BackendAttribute
from .backbones import BACKBONES, DEFAULT_TOWER_NORM, TOWER_NORMS, WideDeepBackbone
from .base import MultiDomainModel
from .presets import resolve_sizes

# How the representation matrix I is produced (the "hyper" ablation of the paper's section 4.4).
HYPERS = ("dynamic", "static")


class HAMUR(BackendAttribute, MultiDomainModel):
    """HAMUR model core: ``forward(e: (B, input_dim), domain: (B,) int64) -> probabilities (B,)``.

    ``e`` is the instance embedding of SPEC section 1 (sparse-field embeddings concatenated, dense
    features appended). ``backbone`` is "mlp" (per-domain towers), "dcn" or "wide_deep"; ``preset``
    ("movielens", "aliccp" or None = movielens) fills the released sizes of SPEC section 4 and any
    size keyword (dims, adapter_after, hyper_dims, rank, bottleneck, dropout, cross_layers,
    wide_dim, eps) overrides it. ``use_adapter=False`` gives the same backbone without adapters
    (no hyper-network), the baseline HAMUR is measured against.

    Ablation switches (paper and released mode alike):
    - ``hyper="dynamic"``: I_b generated per instance by the hyper-network (SPEC 1);
      ``hyper="static"``: no hyper-network, one learned k x k matrix per domain, ``I_b = static[d_b]``.
    - ``norm="domain"`` (DomainNorm, SPEC 2), ``"layer"``, ``"batch"`` or ``"none"`` inside every cell
      (see :class:`hamur_fast.nn.HyperAdapter`).
    - ``adapter_after=[layer indices]``: the insertion depth of the cells.
    - ``tower_norm`` (MLP backbone, paper mode): the towers' normalisation, one of ``TOWER_NORMS``
      (see :class:`hamur_fast.models.backbones.DomainTowers`); None = the paper-mode default
      (``DEFAULT_TOWER_NORM``), and released mode always runs "released".

    ``fused_generation`` ("auto", True, False): fusion level 2, the hyper-network's last layer computed
    inside every adapter cell from the last hidden layer (see ``uses_fused_generation``); parameters,
    state_dict keys and results do not depend on it.
    """

    def __init__(self, input_dim: int, num_domains: int, backbone: str = "mlp", mode: str = "paper",
                 preset: str | None = None, *, use_adapter: bool = True, hyper: str = "dynamic",
                 norm: str = "domain", tower_norm: str | None = None, backend: str = "auto",
                 fused_generation: bool | str = "auto", **sizes):
        ops.check_mode(mode)
        super().__init__(input_dim, num_domains)
        _check_ablation(use_adapter, hyper, norm)
        tower_norm = _resolve_tower_norm(tower_norm, backbone, mode)
        self.sizes = {**resolve_sizes(backbone, preset, sizes), "hyper": hyper, "norm": norm,
                      "tower_norm": tower_norm}
        self.backbone_name, self.mode = backbone, mode
        self.backbone = BACKBONES[backbone](input_dim, num_domains, self.sizes, mode, use_adapter, backend)
        rank = self.sizes["rank"]
        # Released code runs the hyper-network once per domain: its BN statistics move D times a step.
        repeats = num_domains if mode == "released" else 1
        dynamic, static = use_adapter and hyper == "dynamic", use_adapter and hyper == "static"
        self.hyper = (HyperNetwork(input_dim, self.sizes["hyper_dims"], rank, stat_updates_per_step=repeats)
                      if dynamic else None)
        # Initialised like the hyper-network's output at step 0 (BN'd then ReLU'd: half-normal, half
        # exact zeros), so the static and dynamic variants start from the same kind of matrix.
        self.static_rep = nn.Parameter(torch.randn(num_domains, rank, rank).clamp(min=0)) if static else None
        self.backend = backend
        self.fused_generation = fused_generation

    @property
    def fused_generation(self) -> bool | str:
        """Fusion level 2 (the hyper-network's last layer inside every cell): "auto" (where the backend has a
        fused level 2: "triton", and "cpu" but for the released MLP's cells with an ablation norm), True (any
        backend with level 2; eager ones materialise I) or False (level 1)."""
        return self._fused_generation

    @fused_generation.setter
    def fused_generation(self, value: bool | str) -> None:
        if value not in ("auto", True, False):
            raise ValueError(f"fused_generation must be 'auto', True or False, got {value!r}")
        self._fused_generation = value

    def uses_fused_generation(self, device: torch.device) -> bool:
        if self.hyper is None or not self.hyper.can_generate_in_cells() or self.fused_generation is False:
            return False
        if grouped_linear.autocast_dtype(device) is not None:  # meta-safe (meta has no autocast)
            return False  # the generator's statistics would be taken in the autocast dtype: level 1 there
        if active_group() is not None:
            return False  # a data-parallel step merges the generator BatchNorm's statistics over ranks: level 1
        if self.fused_generation is True:
            return True
        released_towers = self.mode == "released" and self.backbone_name == "mlp"
        if device.type == "cpu" and released_towers and self.sizes["norm"] != "domain":
            # The released towers run the cell once per domain. DomainNorm cells run the D towers as one op that
            # generates I once per row (HyperAdapter.forward_all_towers); the ablation norms' cells run per tower,
            # and on the CPU regenerating I in each of the D cells costs more than writing it once
            # (benchmarks/RESULTS.md, issue 23).
            return False
        return generated.supports_fused_generation(self.backend, device)

    def _hyper_input(self, e: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, WideDeepBackbone):
            return torch.cat(self.backbone.split(e), dim=1)  # concat(wide input, deep input)
        return e

    def representation(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor | None:
        """The representation matrix I (B, k, k) every adapter cell uses; None without adapters."""
        if self.hyper is not None:
            return self.hyper(self._hyper_input(e))
        if self.static_rep is not None:
            return self.static_rep[domain]
        return None

    def compute_logits(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        if self.uses_fused_generation(e.device):
            return self.backbone(e, domain, self.hyper.generated(self._hyper_input(e)))
        return self.backbone(e, domain, self.representation(e, domain))


def _check_ablation(use_adapter: bool, hyper: str, norm: str) -> None:
    if hyper not in HYPERS:
        raise ValueError(f"hyper must be one of {HYPERS}, got {hyper!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not use_adapter and (hyper, norm) != (HYPERS[0], NORMS[0]):
        raise ValueError(f"hyper={hyper!r} and norm={norm!r} configure the adapter cells, "
                         "but this model has none (use_adapter=False)")


def _resolve_tower_norm(tower_norm: str | None, backbone: str, mode: str) -> str | None:
    if tower_norm is None:
        return None if backbone != "mlp" else ("released" if mode == "released" else DEFAULT_TOWER_NORM)
    if tower_norm not in TOWER_NORMS:
        raise ValueError(f"tower_norm must be one of {TOWER_NORMS}, got {tower_norm!r}")
    if backbone != "mlp":
        raise ValueError(f"tower_norm configures the towers of the mlp backbone; backbone {backbone!r} has none")
    if mode == "released" and tower_norm != "released":
        raise ValueError(f"released mode runs the released towers; tower_norm={tower_norm!r} needs mode='paper'")
    return tower_norm
