"""A backend against the float64 reference on one device and dtype, in a few milliseconds.

Small odd sizes (B=23, h=13, k=5, s=6, D=3; every domain has several rows, so no group is ill-conditioned),
both modes, training (batch statistics) and paper-mode eval (running statistics): the adapter cell's
output and all ten gradients, and DomainNorm's output and its three gradients. "auto" runs it once per
kernel backend, device and dtype before using the backend (:mod:`hamur_fast.ops.registry`);
``hamur-fast doctor`` runs it for every backend and times it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .contract import Backend

SIZES = dict(batch=23, width=13, rank=5, bottleneck=6, num_domains=3)
CASES = (("paper", True), ("paper", False), ("released", True))
# Relative error allowed against the float64 reference (max |diff| / max |reference| per tensor).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 2e-2}


@dataclass(frozen=True)
class CheckResult:
    backend: str
    device: str
    dtype: torch.dtype
    ok: bool
    max_error: float  # the largest relative error over every compared tensor (nan when the check raised)
    error: str  # why it failed, "" when it passed
    microseconds: float | None  # one adapter-cell forward+backward at the check's sizes (when timed)


def _inputs(mode: str, dtype: torch.dtype):
    """fp32-representable inputs drawn from a private generator (the global RNG is not touched)."""
    g = torch.Generator().manual_seed(1234)
    b, h, k, s, d = (SIZES[key] for key in ("batch", "width", "rank", "bottleneck", "num_domains"))
    lead = (d,) if mode == "paper" else ()

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).double()

    x, rep = rand(b, h), rand(b, k, k).relu()
    domain = torch.arange(b) % d
    params = [rand(*lead, h, k, scale=h ** -0.5), rand(*lead, k, s, scale=k ** -0.5), rand(*lead, s, scale=0.1),
              rand(*lead, s, k, scale=s ** -0.5), rand(*lead, k, h, scale=k ** -0.5), rand(*lead, h, scale=0.1),
              rand(*lead, h, scale=0.1, shift=1.0), rand(*lead, h, scale=0.1)]
    stats = [rand(d, h, scale=0.1), rand(d, h, scale=0.1, shift=1.0).abs()] if mode == "paper" else [None, None]
    return x, rep, domain, params, stats, rand(b, h)


def _cell_run(name, dtype, device, mode, training):
    from . import hyper_adapter

    x, rep, domain, params, stats, upstream = _inputs(mode, dtype)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, rep, *params)]
    running = [s.to(device=device, dtype=dtype) if s is not None else None for s in stats]
    y = hyper_adapter(leaves[0], leaves[1], domain.to(device), *leaves[2:], *running, mode=mode,
                      training=training, backend=name)
    y.backward(upstream.to(device=device, dtype=dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _norm_run(name, dtype, device, mode, training):
    from . import domain_norm

    x, _, domain, params, stats, upstream = _inputs(mode, dtype)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, params[6], params[7])]
    running = [s.to(device=device, dtype=dtype) if s is not None else None for s in stats]
    y = domain_norm(leaves[0], domain.to(device), leaves[1], leaves[2], *running, mode=mode, training=training,
                    backend=name)
    y.backward(upstream.to(device=device, dtype=dtype))
    return [y.detach()] + [t.grad for t in leaves]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    """max |diff| / max |expected|; a tensor that is zero by construction (up_bias's gradient under batch
    statistics) is measured against ``floor``, the scale of the run's largest tensor."""
    scale = max(expected.abs().max().item(), floor)
    return (actual.detach().cpu().double() - expected).abs().max().item() / scale


def _compare(backend: Backend, device: torch.device, dtype: torch.dtype) -> float:
    worst = 0.0
    for run in (_cell_run, _norm_run):
        for mode, training in CASES:
            expected = run("reference", torch.float64, torch.device("cpu"), mode, training)
            got = run(backend.name, dtype, device, mode, training)
            floor = max(e.abs().max().item() for e in expected)
            for i, (a, e) in enumerate(zip(got, expected)):
                if a is None or a.shape != e.shape or not torch.isfinite(a).all():
                    raise AssertionError(f"{run.__name__[1:5]} {mode} training={training}: tensor {i} is missing, "
                                         f"misshapen or not finite")
                worst = max(worst, _relative_error(a, e, floor))
    return worst


def _time_cell(backend: Backend, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Median microseconds of one paper-mode training forward+backward (inputs built once, outside the clock)."""
    from . import hyper_adapter

    x, rep, domain, params, stats, upstream = _inputs("paper", dtype)
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, rep, *params)]
    running = [s.to(device=device, dtype=dtype) for s in stats]
    domain, upstream = domain.to(device), upstream.to(device=device, dtype=dtype)

    def once():
        y = hyper_adapter(leaves[0], leaves[1], domain, *leaves[2:], *running, backend=backend.name)
        torch.autograd.grad(y, leaves, upstream)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def self_check(backend: Backend, device: torch.device, dtype: torch.dtype, timing_repeats: int = 0) -> CheckResult:
    """Compare ``backend`` with the reference; with ``timing_repeats`` > 0 also time it (median)."""
    device = torch.device(device)
    tolerance = TOLERANCE[dtype]
    # Whatever the caller's context (no_grad, inference_mode, autocast), the check needs plain autograd.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        try:
            worst = _compare(backend, device, dtype)
        except Exception as err:  # noqa: BLE001  (any failure of a kernel is a failed check, named)
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return CheckResult(backend.name, str(device), dtype, False, float("nan"),
                               f"{type(err).__name__}: {message}", None)
        ok = worst <= tolerance
        error = "" if ok else f"relative error {worst:.2e} above {tolerance:.0e}"
        micros = _time_cell(backend, device, dtype, timing_repeats) if ok and timing_repeats > 0 else None
    return CheckResult(backend.name, str(device), dtype, ok, worst, error, micros)
