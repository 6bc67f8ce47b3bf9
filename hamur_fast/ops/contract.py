"""The backend contract: what the checked ops hand a backend, what a backend hands back, what it declares.

The checked entry points (:func:`hamur_fast.ops.hyper_adapter`, :func:`hamur_fast.ops.domain_norm`)
validate their arguments, turn (mode, training, running statistics) into one :class:`Plan`, pick a
:class:`Backend` whose :class:`Capabilities` cover the call (:mod:`hamur_fast.ops.registry`), call it,
and then update the running statistics themselves from the :class:`GroupStats` the backend returns
(:func:`update_running_stats`). A backend never decides "batch or running statistics, update or not"
and never writes a running statistic.

The ops as a backend runs them (arguments already validated, ``domain`` int64; ``params`` is the tuple
``(down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)``): an eager backend's
own functions (``Backend.hyper_adapter`` / ``domain_norm``, autograd over torch ops), a kernel backend's the
composition of its passes (:func:`hamur_fast.ops.compose.hyper_adapter` / ``domain_norm``)::

    hyper_adapter(x, rep, domain, params, running_mean, running_var, plan) -> (y, stats)
    domain_norm(o, domain, weight, bias, running_mean, running_var, plan)  -> (y, stats)

``running_mean`` / ``running_var`` are read only without ``plan.batch_statistics``. ``stats`` is the
:class:`GroupStats` of the batch with ``plan.batch_statistics``, else None. Statistics are returned
as (count, mean, M2): the form Chan's parallel formula merges exactly, which is what a cross-process
collective exchanges between a backend's statistics pass and its normalise pass.

What a backend supplies besides (:class:`Passes`, ``Backend.passes``): a table of plain functions over its kernels,
with no autograd and no custom op of their own. :mod:`hamur_fast.ops.compose` composes them into the ops, once:
the fused forms as one custom op per family (cell, norm, generated cell) when the table has them and no merge is
needed, else the split passes with the merge step between them (an all_gather + Chan merge across data-parallel
ranks, :mod:`hamur_fast.ops.collectives`; the identity in one process). ``groups`` is the (B,) int64 statistics
group of each row (paper mode: the domain), or None for one group of all rows (released mode, BatchNorm); the
per-group tables are (G, h) (released mode's (h,) weight is passed as (1, h)); statistics come in the backend's
statistics dtype, and the given ones are handed back in it. ``saved`` is whatever tensors a backend's later passes
need. The split passes of the normalisation (every backend)::

    statistics(o, groups, num_groups)                             -> GroupStats of these rows
    normalise(o, groups, weight, bias, mean, rstd)                -> y = weight[g] (o - mean[g]) rstd[g] + bias[g]
    grad_sums(dy, o, groups, mean, rstd, num_groups)              -> (sum_dy, sum_dy_xhat), each (G, h)
    input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, unbiased) -> do
        do = rstd w (dy - sum_dy / n - xhat sum_dy_xhat / n_var), n = count[g], n_var = n or max(n - 1, 1)

The weight and bias gradients are the (local) ``grad_sums``. The adapter cell split at the same seams (optional;
without them the split form projects by autograd over torch ops and normalises by the passes above)::

    cell_project(x, rep, domain, params, plan)                       -> (GroupStats of o, saved)
    cell_normalise(x, domain, params, saved, mean, rstd, plan)       -> y = x + nw[g] (o - mean[g]) rstd[g] + nb[g]
    cell_grad_sums(dy, domain, params, saved, mean, rstd, plan)      -> (sum_dy, sum_dy_xhat), each (G, h)
    cell_input_grads(dy, x, rep, domain, params, saved, count, mean, rstd, sum_dy, sum_dy_xhat, plan)
                                                                     -> (dx, drep, and the six factors' gradients)

The fused forms (optional; ``generator`` is the folded generator (g, centre, W', c') of fusion level 2)::

    norm_forward(o, domain, weight, bias, running_mean, running_var, plan)   -> (y, count, mean, m2, rstd)
    norm_backward(dy, o, domain, weight, count, mean, rstd, plan)            -> (do, dweight, dbias)
    cell_forward(x, rep, domain, params, running_mean, running_var, plan)    -> (y, count, mean, m2, rstd, *saved)
    cell_backward(dy, x, rep, domain, params, saved, count, mean, rstd, plan) -> the ten input gradients
    generated_forward(x, generator, domain, params, running_mean, running_var, plan, precision)
                                                                             -> (y, count, mean, m2, rstd, *saved)
    generated_backward(dy, x, generator, domain, params, saved, count, mean, rstd, plan, precision)
                                                     -> the gradients of x, g, centre, W', c' and the eight params

``running_mean`` / ``running_var`` are None with ``plan.batch_statistics``. The fakes of the composed ops need the
shapes of ``saved`` (``cell_saved_like`` / ``generated_saved_like(x, rank, params, plan)``, empty tensors) and the
dtypes: ``compute_dtype(dtype)`` is what the fused forms take (inputs are cast to it around the op; None: any),
``statistics_dtype(dtype)`` the statistics' dtype for inputs in ``dtype``. ``cell_infer(x, rep, domain, params,
running_mean, running_var, eps) -> y``, when given, is the eval cell with running statistics outside autograd.

One vocabulary, shared by every backend, its kernels and its saved tensors (SPEC sections 2 and 3; row
b, domain d = domain[b], statistics group g = d in paper mode and g = 0 in released mode, I_b = rep[b]):

=============  ==========  =========================================================================
name           shape       meaning
=============  ==========  =========================================================================
p              (B, k)      x DL[d]                          (DL = down_left)
q              (B, k)      p I_b
z              (B, s)      q DR[d] + db[d]                  (DR = down_right, db = down_bias)
a              (B, s)      sigmoid(z)
u              (B, k)      a UL[d]                          (UL = up_left)
v              (B, k)      u I_b
o              (B, h)      v UR[d] + ub[d]                  (UR = up_right, ub = up_bias): the cell's
                           output before normalisation, the input of ``domain_norm``
y              (B, h)      x + nw[g] (o - mean[g]) rstd[g] + nb[g]   (``domain_norm``: without x +)
count          (G,)        rows per statistics group (G = D paper, 1 released)
mean, m2       (G, h)      per-group mean and sum of squared deviations (M2) of o
rstd           (G, h)      1 / sqrt(var + eps), var = m2 / count (paper) or m2 / max(count - 1, 1)
                           (released), or running_var in paper-mode eval
order          (B,)        row order sorted by group (kernels that group rows); slot i holds row order[i]
=============  ==========  =========================================================================

Every forward and backward operator takes the plan as its last arguments, (per_domain, batch_statistics, unbiased,
eps) (:meth:`Plan.flags`), and statistics come and go in one order, count, mean, m2, rstd.

Registered operators: ``torch.ops.hamur_fast.<implementation>_<op>_<pass>`` for a kernel entry point, and the
composed ops (:mod:`hamur_fast.ops.compose`), which take the backend's name first and run its table:

=============================  ========================  ==================================================
operator                       defined in                returns
=============================  ========================  ==================================================
cell_forward                   ops/compose.py            [y, count, mean, m2, rstd, *saved] (the fused cell)
cell_backward                  ops/compose.py            the ten input gradients (x, rep, params)
norm_forward                   ops/compose.py            y, count, mean, m2, rstd
norm_backward                  ops/compose.py            grad o, grad weight, grad bias
generated_cell_forward         ops/compose.py            [y, count, mean, m2, rstd, *saved] (fusion level 2)
generated_cell_backward        ops/compose.py            grads of x, g, centre, W', c' and the eight params
compiled_cell_forward          csrc/cpu/ops.cpp          y, o, hidden (p, q, u, v, a), order, count, mean,
                                                         m2, rstd
compiled_cell_backward         csrc/cpu/ops.cpp          the ten input gradients
compiled_cell_infer            csrc/cpu/ops.cpp          y (eval with running statistics, no autograd)
compiled_norm_forward          csrc/cpu/ops.cpp          y, count, mean, m2, rstd
compiled_norm_backward         csrc/cpu/ops.cpp          grad o, grad weight, grad bias
compiled_norm_statistics       csrc/cpu/ops.cpp          count, mean, m2 (the statistics pass)
compiled_norm_normalise        csrc/cpu/ops.cpp          y with given mean and rstd (the normalise pass)
compiled_norm_input_grad       csrc/cpu/ops.cpp          grad o from given count and group sums
compiled_tower_norm_relu_      csrc/cpu/ops.cpp          y, mean, rstd: the released towers' BatchNorm1d +
forward                                                  ReLU on z (D, B, C); running statistics in place
compiled_tower_norm_relu_      csrc/cpu/ops.cpp          grad z, grad weight, grad bias
backward
triton_grouped_linear_forward  ops/grouped_linear.py     out (the grouped per-domain linear op, any D)
triton_grouped_linear_backward ops/grouped_linear.py     grad x, grad weight, grad bias
=============================  ========================  ==================================================

The ``compiled_*`` operators run only inside the composed ops (their fakes: the composed ops'), except
``compiled_cell_infer``, which an exported eval graph calls directly (its fake: ops/backends/compiled.py), and
``compiled_tower_norm_relu_forward`` / ``_backward``, which the released towers' DomainBatchNorm1d calls directly on
the CPU (no backend, no plan: BatchNorm1d's own arguments; fakes and autograd: ops/tower_norm_relu.py). And fusion
level 2 of "cpu", in csrc/cpu/generated_cpu.cpp: ``compiled_generated_core_forward`` (v and saved = [q | a | u], the
rank-k core on I generated from g in 64-row blocks) and ``compiled_generated_core_backward`` (the gradients of p,
g, centre, W', c', DR, db and UL).

Fusion level 2 (:mod:`hamur_fast.ops.generated`): a backend whose table has ``generated_forward`` runs the cell on
``I = ReLU((g - centre) W'^T + c')`` (the hyper-network's last layer folded by the entry point) without I in
memory (``Capabilities.fused_generation``); every other backend materialises I and runs its level-1 cell.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

MODES = ("paper", "released")
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Plan:
    """How the normalisation of one call runs, handed explicitly to every backend and kernel (a constexpr in
    Triton, arguments in C++): no kernel infers it from a tensor's rank. The checked ops build it by
    :func:`make_plan`; BatchNorm (one group, biased variance) builds its own.

    per_domain: the statistics groups are the rows' domains (paper) or one group of the whole batch (released).
    batch_statistics: normalise with the batch's statistics, returned as GroupStats; else (paper-mode eval) with
        running_mean / running_var, and no GroupStats.
    unbiased: the variance normalised with is m2 / max(count - 1, 1) (released) or m2 / count (paper, BatchNorm).
    update_running: the entry point will fold the returned GroupStats into the running statistics.
    """

    per_domain: bool
    batch_statistics: bool
    unbiased: bool
    eps: float
    update_running: bool = False
    momentum: float = 0.1

    @classmethod
    def of_flags(cls, per_domain: bool, batch_statistics: bool, unbiased: bool, eps: float) -> "Plan":
        """The plan a custom op's schema carries as plain arguments (:meth:`flags`)."""
        return cls(bool(per_domain), bool(batch_statistics), bool(unbiased), float(eps))

    def flags(self) -> tuple[bool, bool, bool, float]:
        """(per_domain, batch_statistics, unbiased, eps): the plan as a custom op's arguments."""
        return self.per_domain, self.batch_statistics, self.unbiased, self.eps


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def make_plan(mode: str, training: bool, has_running: bool, momentum: float, eps: float) -> Plan:
    """The one place where (mode, training, running statistics present) becomes a plan."""
    check_mode(mode)
    per_domain = mode == "paper"
    running = per_domain and has_running
    return Plan(per_domain=per_domain, batch_statistics=not (running and not training), unbiased=not per_domain,
                eps=float(eps), update_running=running and training, momentum=float(momentum))


def variance_divisor(count, unbiased: bool):
    """What m2 is divided by to give the variance normalised with: count (biased) or count - 1 (unbiased), at least
    1; ``count`` a row count or a tensor of them. The one place of the biased/unbiased rule outside the kernels."""
    if isinstance(count, torch.Tensor):
        return (count - int(unbiased)).clamp(min=1)
    return torch.sym_max(count - int(unbiased), 1)  # an int, or a SymInt while torch.export traces the batch size


class GroupStats(NamedTuple):
    """Per-group batch statistics of o, detached: count (G,), mean (G, h), m2 (G, h)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, stats: GroupStats,
                         momentum: float) -> None:
    """BatchNorm's rule per group, with the unbiased variance, only where the group had >= 2 rows.

    No host sync (``torch.where``, not ``.item()``), so it runs inside CUDA graphs and torch.compile.
    """
    with torch.no_grad():
        count = stats.count.to(running_mean.dtype).unsqueeze(1)
        seen = count >= 2
        mean = stats.mean.to(running_mean.dtype)
        unbiased = stats.m2.to(running_var.dtype) / variance_divisor(count, True)
        running_mean.copy_(torch.where(seen, torch.lerp(running_mean, mean, momentum), running_mean))
        running_var.copy_(torch.where(seen, torch.lerp(running_var, unbiased, momentum), running_var))


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels take. ``None`` means no limit.

    The size limits bound the adapter cell (h = width, k = rank, s = bottleneck); DomainNorm alone is
    limited by devices and dtypes only. ``auto_rank`` orders "auto" per device type (lower first; a
    device type absent from it is never picked by "auto", though an explicit ``backend=`` may still run
    there). ``fused_cell``: the cell's normalisation runs inside the backend's kernels, so folding it
    into the weights for inference saves nothing. ``self_check``: "auto" uses the backend on a device
    and dtype only after its in-process check against the reference passed there.
    """

    devices: frozenset
    dtypes: frozenset
    max_width: int | None = None
    max_rank: int | None = None
    max_bottleneck: int | None = None
    auto_rank: dict = field(default_factory=dict)
    fused_cell: bool = False
    self_check: bool = False
    fused_generation: bool = False

    def limit(self, device: torch.device, dtype: torch.dtype, width: int | None = None, rank: int | None = None,
              bottleneck: int | None = None) -> str | None:
        """None when the call is covered, else the first limit it exceeds, in words."""
        if device.type not in self.devices:
            return f"device {device.type} (takes {sorted(self.devices)})"
        if dtype not in self.dtypes:
            return f"dtype {dtype} (takes {sorted(str(d) for d in self.dtypes)})"
        for what, size, most in (("width h", width, self.max_width), ("rank k", rank, self.max_rank),
                                 ("bottleneck s", bottleneck, self.max_bottleneck)):
            if size is not None and most is not None and size > most:
                return f"{what}={size} (at most {most})"
        return None


def _any_dtype(dtype: torch.dtype) -> None:
    return None


class Passes(NamedTuple):
    """A backend's table of passes: plain functions over its kernels (signatures: the module docstring). The
    composition and its autograd live in :mod:`hamur_fast.ops.compose`; None means the backend has no such form."""

    statistics: Callable
    normalise: Callable
    grad_sums: Callable
    input_grad: Callable
    cell_project: Callable | None = None
    cell_normalise: Callable | None = None
    cell_grad_sums: Callable | None = None
    cell_input_grads: Callable | None = None
    norm_forward: Callable | None = None
    norm_backward: Callable | None = None
    cell_forward: Callable | None = None
    cell_backward: Callable | None = None
    generated_forward: Callable | None = None
    generated_backward: Callable | None = None
    cell_saved_like: Callable | None = None
    generated_saved_like: Callable | None = None
    compute_dtype: Callable = _any_dtype
    statistics_dtype: Callable | None = None
    cell_infer: Callable | None = None


@dataclass(frozen=True)
class Backend:
    """One implementation of every op family (the cell, the norm, the grouped linear op), and what it can do.

    ``passes``: the backend's table (:class:`Passes`). ``hyper_adapter`` / ``domain_norm``: an eager backend's own
    ops (autograd over torch ops), None where the table's fused forms run them (:mod:`hamur_fast.ops.compose`).
    ``grouped_linear(x, domain, weight, bias) -> out``: the backend's form of the grouped per-domain linear op
    (:mod:`hamur_fast.ops.grouped_linear`), so ``backend=`` names one implementation of every op family.
    ``hyper_adapter_all_towers(x (T, B, h), rep, params, eps) -> (T, B, h)``, when not None, runs the
    released-mode cell on T towers' outputs at once (each normalised over its own whole batch).
    """

    name: str
    hyper_adapter: Callable | None
    domain_norm: Callable | None
    capabilities: Capabilities
    passes: Passes
    grouped_linear: Callable
    hyper_adapter_all_towers: Callable | None = None
