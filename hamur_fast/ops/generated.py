"""Fusion level 2: the hyper-network's last layer fused into the adapter cell (SPEC section 6).

The representation matrix of row b is ``I_b = ReLU(BN(g_b W^T + c))`` reshaped to (k, k), with ``g`` (B, p)
the hyper-network's last hidden layer, ``W`` (k*k, p) and ``c`` (k*k,) its last Linear and BN the last
BatchNorm1d. Level 1 writes I (B, k*k) to memory and the cell reads it back; level 2 hands the cell ``g``
and the generator's parameters, and a fused backend forms ``I_b`` where it is used.

How every backend but the oracle sees the generator: BatchNorm is a per-channel affine map, so
``BN(z) = (g - m) W'^T + c'`` with
- training: ``m = mean(g)``, ``W' = W * scale``, ``c' = beta``, ``scale = gamma / sqrt(var_z + eps)``, where
  ``var_z[j] = W_j Cov(g) W_j^T`` (biased): exact batch statistics of ``z = g W^T + c`` from the mean and the
  (p x p) covariance of ``g``, never from a (B, k*k) reduction. ``c`` cancels (its gradient is 0, as in BN);
- eval: ``m = 0``, ``W' = W * scale``, ``c' = c * scale + beta - running_mean * scale`` with the running
  statistics (the generator BN folded into W and c).
:func:`fold_generator` computes ``(m, W', c')`` with ordinary differentiable torch ops (O(B p^2 + k^2 p^2)),
so autograd carries the gradients of ``W, c, gamma, beta`` and of ``g`` through its mean and covariance.
A backend then computes the cell on ``I = ReLU((g - m) W'^T + c')``: :func:`generated_cell` (a backend whose
table has the fused form keeps I out of memory, every other one materialises I: :mod:`hamur_fast.ops.compose`).
The float64
``reference`` backend does not use this identity: it materialises ``z``, normalises it over the batch
and is the oracle the identity is tested against.

The generator's running statistics advance ``updates`` times per training step (released mode: D, as the
released code evaluates the hyper-network once per domain) with the closed form of
``RepeatedUpdateBatchNorm1d``; a batch of one row updates nothing (no unbiased variance).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _checks
from . import compose
from .backends import reference
from .contract import GroupStats, make_plan, update_running_stats
from .registry import resolve

PRECISIONS = ("ieee", "tf32", "bf16")


class Generator(NamedTuple):
    """The hyper-network's last layer: Linear(p, k*k) -> BatchNorm1d(k*k) -> ReLU.

    ``norm_weight``/``norm_bias``/``running_mean``/``running_var`` may all be None (a BatchNorm folded
    away for inference: ``I = ReLU(g W^T + c)``); ``running_*`` alone may be None (batch statistics only).
    """
    weight: torch.Tensor
    bias: torch.Tensor
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    momentum: float = 0.1
    eps: float = 1e-5
    updates: int = 1


class GeneratedRep(NamedTuple):
    """What a fused cell receives instead of I: ``I = ReLU((g - centre) weight^T + bias)`` viewed (B, k, k)."""
    g: torch.Tensor
    centre: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    rank: int

    def select_rows(self, index: torch.Tensor) -> "GeneratedRep":
        """The representation of rows ``index`` (I's per-row input g gathered; the folded generator is shared)."""
        return self._replace(g=self.g.index_select(0, index))

    def materialise(self) -> torch.Tensor:
        """The (B, k, k) matrix itself (level 1; eager backends and checks)."""
        return torch.relu(F.linear(self.g - self.centre, self.weight, self.bias)).view(-1, self.rank, self.rank)


def supports_fused_generation(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """True when backend ``name`` on ``device`` runs level 2 without materialising I."""
    try:
        impl = resolve(name, device, dtype)
    except ValueError:
        return False
    return impl.passes.generated_forward is not None and impl.capabilities.fused_generation


# --------------------------------------------------------------------------------------------------
# The generator's BatchNorm as an affine map (SPEC section 6)
# --------------------------------------------------------------------------------------------------
def batch_moments(g: torch.Tensor):
    """Mean (p,) and biased covariance (p, p) of the rows of g, two-pass (centred products)."""
    mean = g.mean(dim=0)
    centred = g - mean
    return mean, centred.t() @ centred / g.shape[0]


def generator_batch_stats(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Exact batch mean and biased variance of ``z = g W^T + c`` from the moments of g (no (B, k*k) tensor).

    Returns (mean_g, mean_z, var_z)."""
    mean_g, cov = batch_moments(g)
    mean_z = weight @ mean_g + bias
    var_z = ((weight @ cov) * weight).sum(dim=1).clamp(min=0)  # W_j Cov W_j^T; rounding may dip below 0
    return mean_g, mean_z, var_z


def fold_generator(g: torch.Tensor, gen: Generator, training: bool) -> GeneratedRep:
    """(centre, W', c') of ``BN(g W^T + c) = (g - centre) W'^T + c'``; advances the running statistics in
    training (in place, ``gen.updates`` times)."""
    rank = int(round(gen.weight.shape[0] ** 0.5))
    if gen.norm_weight is None:  # BatchNorm folded away: a plain Linear
        return GeneratedRep(g, g.new_zeros(g.shape[1]), gen.weight, gen.bias, rank)
    use_batch_stats = training or gen.running_mean is None
    if use_batch_stats:
        mean_g, mean_z, var_z = generator_batch_stats(g, gen.weight, gen.bias)
        scale = gen.norm_weight * torch.rsqrt(var_z + gen.eps)
        if training and gen.running_mean is not None:
            update_generator_running_stats(gen, mean_z.detach(), var_z.detach(), g.shape[0])
        # c cancels: BN(z) = (z - mean_z) * scale + beta and z - mean_z = (g - mean_g) W^T. The 0 * c keeps c
        # in the graph, so that it gets a zero gradient (not None) like under nn.BatchNorm1d: optimizers with
        # weight decay then treat it the same at both levels.
        return GeneratedRep(g, mean_g, gen.weight * scale.unsqueeze(1), gen.norm_bias + 0.0 * gen.bias, rank)
    scale = gen.norm_weight * torch.rsqrt(gen.running_var + gen.eps)
    shift = gen.norm_bias - gen.running_mean * scale
    return GeneratedRep(g, g.new_zeros(g.shape[1]), gen.weight * scale.unsqueeze(1), gen.bias * scale + shift,
                        rank)


def update_generator_running_stats(gen: Generator, mean_z, var_z, batch: int) -> None:
    """BatchNorm1d's update through the contract's one rule (one group of ``batch`` rows; none for B=1),
    ``gen.updates`` identical steps in closed form: one step with momentum ``1 - (1 - m)^n``."""
    count = mean_z.new_full((1,), float(batch))
    stats = GroupStats(count, mean_z.unsqueeze(0), (var_z * batch).unsqueeze(0))
    update_running_stats(gen.running_mean.view(1, -1), gen.running_var.view(1, -1), stats,
                         1.0 - (1.0 - gen.momentum) ** gen.updates)


# --------------------------------------------------------------------------------------------------
# Checked entry points
# --------------------------------------------------------------------------------------------------
def _check_generator(g: torch.Tensor, gen: Generator, rank: int) -> None:
    width = g.shape[1]
    _checks.check_float("gen_weight", gen.weight, 2)
    _checks.check_shape("gen_weight", gen.weight, (rank * rank, width))
    _checks.check_float("gen_bias", gen.bias)
    _checks.check_shape("gen_bias", gen.bias, (rank * rank,))
    if (gen.norm_weight is None) != (gen.norm_bias is None):
        raise ValueError("gen_norm_weight and gen_norm_bias must be given together (or both None)")
    if (gen.running_mean is None) != (gen.running_var is None):
        raise ValueError("gen_running_mean and gen_running_var must be given together (or both None)")
    if gen.norm_weight is None and gen.running_mean is not None:
        raise ValueError("generator running statistics need gen_norm_weight and gen_norm_bias")
    for name in ("norm_weight", "norm_bias", "running_mean", "running_var"):
        tensor = getattr(gen, name)
        if tensor is not None:
            _checks.check_float(f"gen_{name}", tensor)
            _checks.check_shape(f"gen_{name}", tensor, (rank * rank,))
    if not isinstance(gen.updates, int) or gen.updates < 1:
        raise ValueError(f"gen_updates must be an int >= 1, got {gen.updates!r}")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def hyper_adapter_generated(x, g, domain, gen_weight, gen_bias, gen_norm_weight, gen_norm_bias,
                            gen_running_mean, gen_running_var, down_left, down_right, down_bias, up_left,
                            up_right, up_bias, norm_weight, norm_bias, running_mean=None, running_var=None, *,
                            mode="paper", training=True, momentum=0.1, eps=1e-5, gen_momentum=0.1,
                            gen_eps=1e-5, gen_updates=1, backend="auto", num_domains=None, precision="ieee"):
    """The adapter cell on ``I_b = ReLU(BN(g_b W^T + c))`` generated inside the op (fusion level 2).

    Shapes: x (B, h), g (B, p), domain (B,), gen_weight (k*k, p) (``nn.Linear`` layout), gen_bias and the
    generator BatchNorm's weight, bias, running_mean, running_var (k*k,); the cell's parameters and running
    statistics as in :func:`hamur_fast.ops.hyper_adapter`. Returns y (B, h), what the level-1 cell returns
    for ``rep = I``. In training, the cell's running statistics (paper mode) and the generator's
    (``gen_updates`` times, SPEC section 3) are updated in place. ``precision`` ("ieee", "tf32", "bf16")
    is the generator products' precision on fused backends (tf32/bf16: opt-in, SPEC section 7).
    """
    from . import check_cell_args  # imported here: hamur_fast.ops imports this module

    _checks.check_float("g", g, 2)
    _checks.check_batch("g", g)
    if g.shape[0] != x.shape[0]:
        raise ValueError(f"g must have the batch of x ({x.shape[0]} rows), got shape {tuple(g.shape)}")
    _checks.check_float("down_left", down_left)
    rank = down_left.shape[-1]
    gen = Generator(gen_weight, gen_bias, gen_norm_weight, gen_norm_bias, gen_running_mean, gen_running_var,
                    gen_momentum, gen_eps, gen_updates)
    _check_generator(g, gen, rank)
    check_precision(precision)
    if g.dtype != x.dtype or gen_weight.dtype != x.dtype:
        raise ValueError(f"g, gen_weight and x must share one dtype, got {g.dtype}, {gen_weight.dtype}, {x.dtype}")
    _checks.check_same_device(x=x, g=g, gen_weight=gen_weight)
    params = (down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)
    # The level-1 checks on the cell's arguments, with a (B, k, k) stand-in for I that costs no memory.
    stand_in = x.new_zeros(()).expand(x.shape[0], rank, rank)  # I's shape for the checks, no memory
    width, _, bottleneck = check_cell_args(x, stand_in, domain, params, running_mean, running_var, mode,
                                           num_domains)
    plan = make_plan(mode, training, running_mean is not None, momentum, eps)
    impl = resolve(backend, x.device, x.dtype, width=width, rank=rank, bottleneck=bottleneck)
    if impl.name == "reference":  # the oracle: z materialised and normalised over the batch, no moment identity
        y, stats = reference.hyper_adapter_generated(x, g, domain.long(), gen, params, running_mean, running_var,
                                                     plan, training)
    else:
        y, stats = compose.generated_cell(impl, x, fold_generator(g, gen, training), domain.long(), params,
                                          running_mean, running_var, plan, precision)
    if plan.update_running:
        update_running_stats(running_mean, running_var, stats, plan.momentum)
    return y


def generated_cell(x, rep: GeneratedRep, domain, params, running_mean=None, running_var=None, *, mode="paper",
                   training=True, momentum=0.1, eps=1e-5, backend="auto", precision="ieee"):
    """One adapter cell on an already folded generator (``fold_generator``): how a model with several cells
    sharing one ``g`` runs level 2: the generator is folded (and its statistics advanced) once per step,
    and every cell regenerates I from ``g``. Arguments checked by the layer (HyperAdapter)."""
    width, rank, bottleneck = x.shape[1], rep.rank, params[1].shape[-1]
    plan = make_plan(mode, training, running_mean is not None, momentum, eps)
    impl = resolve(backend, x.device, x.dtype, width=width, rank=rank, bottleneck=bottleneck)
    y, stats = compose.generated_cell(impl, x, rep, domain.long(), params, running_mean, running_var, plan, precision)
    if plan.update_running:
        update_running_stats(running_mean, running_var, stats, plan.momentum)
    return y
