"""Thin modules over :mod:`hamur_fast.ops`: the adapter cell and DomainNorm."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .. import _checks, ops
from ..ops.collectives import active_group
from ..ops.compose import batch_norm
from ..ops import generated
from ..ops.eager import adapter_projection
from ..ops.registry import check_backend_name, resolve

# Normalisations the adapter cell can apply to its output (the "norm" ablation of HAMUR).
NORMS = ("domain", "layer", "batch", "none")


class BackendAttribute:
    """``backend`` is a constructor argument and a settable attribute, passed on to every sub-layer
    that has one (so ``model.backend = "torch"`` switches a whole model); it never touches parameters."""

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend_name(name)
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = name


class DomainNorm(BackendAttribute, nn.Module):
    """Domain normalisation (SPEC section 2; released form in section 3).

    paper: per-domain batch statistics in training, per-domain running statistics in eval,
    per-domain affine (D, width). released: whole-batch unbiased statistics always, shared affine.
    forward(o: (B, width), domain: (B,) int64) -> (B, width).
    """

    def __init__(self, width: int, num_domains: int, mode: str = "paper", eps: float = 1e-5,
                 momentum: float = 0.1, weight_init: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.mode = ops.check_mode(mode)
        self.width, self.num_domains, self.eps, self.momentum = width, num_domains, eps, momentum
        self.backend = backend
        shape = (num_domains, width) if mode == "paper" else (width,)
        self.weight = nn.Parameter(torch.full(shape, float(weight_init)))
        self.bias = nn.Parameter(torch.zeros(shape))
        if mode == "paper":
            self.register_buffer("running_mean", torch.zeros(shape))
            self.register_buffer("running_var", torch.ones(shape))
        else:
            self.running_mean = self.running_var = None

    def forward(self, o: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return ops.domain_norm(o, domain, self.weight, self.bias, self.running_mean, self.running_var,
                               mode=self.mode, training=self.training, momentum=self.momentum,
                               eps=self.eps, backend=self.backend, num_domains=self.num_domains)

    def extra_repr(self) -> str:
        return f"{self.width}, num_domains={self.num_domains}, mode={self.mode!r}, backend={self.backend!r}"


class HyperAdapter(BackendAttribute, nn.Module):
    """The HAMUR adapter cell: ``y = x + DomainNorm(((sigmoid(((x U) I) V + b) U') I) V' + b')``.

    forward(x: (B, width), rep: (B, rank, rank), domain: (B,) int64) -> (B, width).
    paper mode: per-domain factors, trainable init (N(0, 1/fan_in) factors, norm weight 0.1).
    released mode: shared factors initialised to ones, exactly as the authors' code.

    ``norm`` (an ablation switch) replaces DomainNorm: "layer" (per-row statistics over the width),
    "batch" (statistics of the whole mixed batch, shared running statistics in eval) or "none"
    (``y = x + o``, no normalisation parameters). "layer" and "batch" keep the affine map of
    DomainNorm (per domain in paper mode), so the ablation changes only the statistics. Only
    "domain" runs through the fused ``ops.hyper_adapter`` (every backend); the others compose the
    eager projection with the chosen normalisation.
    """

    def __init__(self, width: int, rank: int, num_domains: int, bottleneck: int = 32,
                 mode: str = "paper", eps: float = 1e-5, backend: str = "auto",
                 momentum: float = 0.1, norm_weight_init: float = 0.1, norm: str = "domain"):
        super().__init__()
        self.mode = ops.check_mode(mode)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        if min(width, rank, num_domains, bottleneck) < 1:
            raise ValueError(f"width, rank, num_domains and bottleneck must be >= 1, "
                             f"got {width}, {rank}, {num_domains}, {bottleneck}")
        self.width, self.rank, self.num_domains, self.bottleneck = width, rank, num_domains, bottleneck
        self.eps, self.momentum = eps, momentum
        self.backend = backend
        lead = (num_domains,) if mode == "paper" else ()
        factor_shapes = {
            "down_left": (width, rank), "down_right": (rank, bottleneck),
            "up_left": (bottleneck, rank), "up_right": (rank, width),
        }
        for name, shape in factor_shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(lead + shape)))
        self.down_bias = nn.Parameter(torch.zeros(lead + (bottleneck,)))
        self.up_bias = nn.Parameter(torch.zeros(lead + (width,)))
        has_affine = norm != "none"
        self.norm_weight = nn.Parameter(torch.empty(lead + (width,))) if has_affine else None
        self.norm_bias = nn.Parameter(torch.zeros(lead + (width,))) if has_affine else None
        if norm == "domain" and mode == "paper":
            stats_shape = lead + (width,)  # DomainNorm: running statistics per domain
        elif norm == "batch":
            stats_shape = (width,)  # one set: the statistics of the mixed batch
        else:
            stats_shape = None  # layer norm, no norm, released DomainNorm: batch-free or always batch
        if stats_shape is not None:
            self.register_buffer("running_mean", torch.zeros(stats_shape))
            self.register_buffer("running_var", torch.ones(stats_shape))
        else:
            self.running_mean = self.running_var = None
        self.reset_parameters(norm_weight_init)

    @torch.no_grad()
    def reset_parameters(self, norm_weight_init: float = 0.1) -> None:
        factors = (self.down_left, self.down_right, self.up_left, self.up_right)
        if self.mode == "released":
            for f in factors:
                f.fill_(1.0)
            norm_weight_init = 1.0
        else:
            # Fan-in scale keeps sigmoid out of saturation; a small non-zero norm weight starts the
            # cell near identity while letting gradients reach every factor at step 0 (SPEC 2).
            for f in factors:
                f.normal_(0.0, 1.0 / math.sqrt(f.shape[-2]))
        self.down_bias.zero_()
        self.up_bias.zero_()
        if self.norm_weight is not None:
            self.norm_weight.fill_(norm_weight_init)
            self.norm_bias.zero_()

    def parameters_in_op_order(self):
        return (self.down_left, self.down_right, self.down_bias, self.up_left, self.up_right,
                self.up_bias, self.norm_weight, self.norm_bias)

    def forward(self, x: torch.Tensor, rep: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """``rep`` is I (B, rank, rank), or a ``GeneratedRep`` (fusion level 2: I generated inside the op)."""
        if isinstance(rep, generated.GeneratedRep):
            return self._forward_generated(x, rep, domain)
        if self.norm == "domain":
            return ops.hyper_adapter(x, rep, domain, *self.parameters_in_op_order(),
                                     self.running_mean, self.running_var, mode=self.mode,
                                     training=self.training, momentum=self.momentum, eps=self.eps,
                                     backend=self.backend, num_domains=self.num_domains)
        self._check_inputs(x, rep, domain)
        projection = self.parameters_in_op_order()[:6]
        return x + self._normalise(adapter_projection(x, rep, domain, *projection, per_domain=self.mode == "paper"),
                                   domain)

    def _forward_generated(self, x, rep, domain):
        if self.norm != "domain" or rep.rank != self.rank:
            return self(x, rep.materialise(), domain)  # the ablation norms (or a shape error) at level 1
        params = self.parameters_in_op_order()
        stand_in = x.new_zeros(()).expand(x.shape[0], self.rank, self.rank)  # I's shape for the checks, no memory
        ops.check_cell_args(x, stand_in, domain, params, self.running_mean, self.running_var, self.mode,
                            self.num_domains)
        return generated.generated_cell(x, rep, domain, params, self.running_mean, self.running_var,
                                        mode=self.mode, training=self.training, momentum=self.momentum,
                                        eps=self.eps, backend=self.backend)

    def forward_all_towers(self, x: torch.Tensor, rep: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """The cell on T towers' outputs x (T, B, width), each normalised over its own whole batch.

        This is how the released MLP model uses its cell (once per domain tower); a backend that offers
        ``hyper_adapter_all_towers`` runs the T applications as one batched computation (on a GeneratedRep
        when it has fusion level 2, I then generated once for all towers), otherwise the cell runs once per tower.
        """
        impl = None
        if self.mode == "released" and self.norm == "domain" and active_group() is None:
            impl = resolve(self.backend, x.device, x.dtype, self.width, self.rank, self.bottleneck)
        if impl is None or impl.hyper_adapter_all_towers is None:
            return torch.stack([self(tower, rep, domain) for tower in x])
        _checks.check_float("x", x, 3)
        if isinstance(rep, generated.GeneratedRep):
            if not impl.capabilities.fused_generation or rep.rank != self.rank:
                return self.forward_all_towers(x, rep.materialise(), domain)
            # fusion level 2: the backend generates I itself, once for all towers
            self._check_inputs(x[0], x.new_zeros(()).expand(x.shape[1], self.rank, self.rank), domain)
        else:
            self._check_inputs(x[0], rep, domain)
        return impl.hyper_adapter_all_towers(x, rep, self.parameters_in_op_order(), self.eps)

    def _check_inputs(self, x, rep, domain) -> None:
        _checks.check_float("x", x, 2)
        _checks.check_shape("x", x, (_checks.check_batch("x", x), self.width))
        _checks.check_float("rep", rep, 3)
        _checks.check_shape("rep", rep, (x.shape[0], self.rank, self.rank))
        _checks.check_domain(domain, x.shape[0], self.num_domains)

    def _normalise(self, o: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        if self.norm == "none":
            return o
        if self.norm == "layer":
            standard = F.layer_norm(o, (self.width,), eps=self.eps)
        else:  # "batch"
            standard = batch_norm(o, self.running_mean, self.running_var, None, None, self.training,
                                  self.momentum, self.eps)
        per_domain = self.mode == "paper"
        weight = self.norm_weight[domain] if per_domain else self.norm_weight
        bias = self.norm_bias[domain] if per_domain else self.norm_bias
        return torch.addcmul(bias, standard, weight)

    def extra_repr(self) -> str:
        return (f"width={self.width}, rank={self.rank}, num_domains={self.num_domains}, "
                f"bottleneck={self.bottleneck}, mode={self.mode!r}, norm={self.norm!r}, backend={self.backend!r}")
