"""Functional ops: the HAMUR adapter cell and DomainNorm, checked, planned, then run by a backend.

``hyper_adapter`` and ``domain_norm`` validate every argument (raising ``ValueError`` that names the
argument and the offending value before any compute), turn (mode, training, running statistics) into one
:class:`~hamur_fast.ops.contract.Plan`, pick a backend whose capabilities cover the call
(:func:`~hamur_fast.ops.registry.resolve`), run it, and update the running statistics from the per-domain
(count, mean, M2) the backend returns. While a data-parallel step synchronises batch statistics
(:func:`hamur_fast.distributed.synchronised`), the same backend runs as split passes with the collectives
between them. The composition of a backend's passes: :mod:`hamur_fast.ops.compose`; the contract every backend
follows: :mod:`hamur_fast.ops.contract`; the backends: :mod:`hamur_fast.ops.backends`.
"""
from __future__ import annotations

from .. import _checks
from . import backends, grouped_linear  # noqa: F401  (registers every backend this installation offers)
from .contract import Backend, Capabilities, GroupStats, Plan, check_mode, make_plan, update_running_stats
from .registry import available_backends, register_backend, resolve
from . import collectives, compose

__all__ = ["hyper_adapter", "hyper_adapter_generated", "domain_norm", "available_backends", "register_backend",
           "Backend", "Capabilities", "GroupStats", "Plan"]


def _check_norm_args(o, weight, bias, running_mean, running_var, mode):
    """Validate the normalisation parameters for an input ``o`` of shape (B, h); returns D."""
    width = o.shape[1]
    per_domain = mode == "paper"
    _checks.check_float("norm_weight", weight, 2 if per_domain else 1)
    num_domains = weight.shape[0] if per_domain else 1
    expected = (num_domains, width) if per_domain else (width,)
    _checks.check_shape("norm_weight", weight, expected)
    _checks.check_float("norm_bias", bias)
    _checks.check_shape("norm_bias", bias, expected)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is not None:
        if not per_domain:
            raise ValueError("mode='released' keeps no running statistics; pass running_mean=None")
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            _checks.check_float(name, t)
            _checks.check_shape(name, t, expected)
    return num_domains


def domain_norm(o, domain, weight, bias, running_mean=None, running_var=None, *, mode="paper",
                training=True, momentum=0.1, eps=1e-5, backend="auto", num_domains=None):
    """DomainNorm of SPEC section 2 (paper) or 3 (released) on o (B, h); returns (B, h).

    In paper mode ``weight``/``bias``/running stats are (D, h) and the running stats are updated
    in place during training. In released mode they are (h,) and statistics span the whole batch.
    ``num_domains`` bounds the domain ids in released mode, whose parameters have no domain axis.
    """
    check_mode(mode)
    _checks.check_float("o", o, 2)
    batch = _checks.check_batch("o", o)
    param_domains = _check_norm_args(o, weight, bias, running_mean, running_var, mode)
    _checks.check_domain(domain, batch, param_domains if mode == "paper" else num_domains)
    _checks.check_same_device(o=o, domain=domain, weight=weight)
    plan = make_plan(mode, training, running_mean is not None, momentum, eps)
    impl = resolve(backend, o.device, o.dtype)
    y, stats = compose.domain_norm(impl, o, domain.long(), weight, bias, running_mean, running_var, plan,
                                   collectives.active_group())
    if plan.update_running:
        update_running_stats(running_mean, running_var, stats, plan.momentum)
    return y


def hyper_adapter(x, rep, domain, down_left, down_right, down_bias, up_left, up_right, up_bias,
                  norm_weight, norm_bias, running_mean=None, running_var=None, *, mode="paper",
                  training=True, momentum=0.1, eps=1e-5, backend="auto", num_domains=None):
    """The HAMUR adapter cell (SPEC sections 2 and 3): ``y = x + DomainNorm(o)``.

    Shapes (paper mode, D domains; released mode drops the leading D):
    x (B, h), rep (B, k, k), domain (B,) int64, down_left (D, h, k), down_right (D, k, s),
    down_bias (D, s), up_left (D, s, k), up_right (D, k, h), up_bias (D, h),
    norm_weight / norm_bias / running_mean / running_var (D, h). Returns y (B, h).
    ``num_domains`` bounds the domain ids in released mode, whose parameters have no domain axis.
    """
    params = (down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias)
    if grouped_linear.autocast_dtype(x.device) is not None:  # (meta, where models run shape-only, has no autocast)
        # Like BatchNorm under autocast, the cell (its normalisation above all) runs in the precision of
        # its parameters; autocast hands the activations in lower precision, so they are cast up here.
        x, rep = x.to(down_left.dtype), rep.to(down_left.dtype)
    width, rank, bottleneck = check_cell_args(x, rep, domain, params, running_mean, running_var, mode, num_domains)
    plan = make_plan(mode, training, running_mean is not None, momentum, eps)
    impl = resolve(backend, x.device, x.dtype, width=width, rank=rank, bottleneck=bottleneck)
    y, stats = compose.hyper_adapter(impl, x, rep, domain.long(), params, running_mean, running_var, plan,
                                     collectives.active_group())
    if plan.update_running:
        update_running_stats(running_mean, running_var, stats, plan.momentum)
    return y


def check_cell_args(x, rep, domain, params, running_mean, running_var, mode, num_domains):
    """Validate the adapter cell's arguments (shapes as in :func:`hyper_adapter`) before any compute;
    returns (h, k, s)."""
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = params
    check_mode(mode)
    _checks.check_float("x", x, 2)
    batch = _checks.check_batch("x", x)
    width = x.shape[1]
    _checks.check_float("rep", rep, 3)
    if rep.shape[0] != batch or rep.shape[1] != rep.shape[2]:
        raise ValueError(f"rep must have shape (B, k, k) with B={batch}, got {tuple(rep.shape)}")
    rank = rep.shape[1]
    param_domains = _check_norm_args(x, norm_weight, norm_bias, running_mean, running_var, mode)
    lead = (param_domains,) if mode == "paper" else ()
    _checks.check_float("down_right", down_right)
    bottleneck = down_right.shape[-1]
    expected = {
        "down_left": (down_left, lead + (width, rank)),
        "down_right": (down_right, lead + (rank, bottleneck)),
        "down_bias": (down_bias, lead + (bottleneck,)),
        "up_left": (up_left, lead + (bottleneck, rank)),
        "up_right": (up_right, lead + (rank, width)),
        "up_bias": (up_bias, lead + (width,)),
    }
    for name, (tensor, shape) in expected.items():
        _checks.check_float(name, tensor)
        _checks.check_shape(name, tensor, shape)
    dtypes = {t.dtype for t in (x, rep, down_left, down_right, up_left, up_right)}
    if len(dtypes) > 1:
        raise ValueError(f"x, rep and the factor matrices must share one dtype, got {sorted(map(str, dtypes))}")
    _checks.check_domain(domain, batch, param_domains if mode == "paper" else num_domains)
    _checks.check_same_device(x=x, rep=rep, domain=domain, down_left=down_left)
    return width, rank, bottleneck


from . import generated  # noqa: E402  (level 2 builds on the checks above and on the registered backends)

hyper_adapter_generated = generated.hyper_adapter_generated
