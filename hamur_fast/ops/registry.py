"""Which backends exist in this process, and which one a call gets.

Backends register themselves (:mod:`hamur_fast.ops.backends`); one that cannot be imported (no triton,
extension not built) is recorded with the reason, so ``hamur-fast doctor`` can say why it is missing.

:func:`resolve` picks the backend for one call from its device, dtype and sizes:
- an explicit name must be registered and its :class:`~hamur_fast.ops.contract.Capabilities` must cover
  the call, else ``ValueError`` names the limit;
- ``"auto"`` takes, in ``auto_rank`` order for the device type, the first backend that covers the call
  and, when it declares ``self_check``, whose self-check passed on that device and dtype. The check
  (:mod:`hamur_fast.ops.selfcheck`) runs once per backend, device and dtype; a failure warns once,
  naming the backend and the error, and "auto" falls back to the next backend.
"""
from __future__ import annotations

import warnings

import torch

from .contract import Backend

_BACKENDS: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, str] = {}
_SELF_CHECKS: dict[tuple, bool] = {}  # (backend name, device, dtype) -> passed


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)


def record_unavailable(name: str, reason: str) -> None:
    """A backend that this installation does not offer, and why (shown by ``hamur-fast doctor``)."""
    if name not in _BACKENDS:
        _UNAVAILABLE[name] = reason


def unavailable_backends() -> dict[str, str]:
    return dict(_UNAVAILABLE)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the registered backends, e.g. ``["reference", "torch", "cpu"]``; with ``device``, only
    those that run on that device (``available_backends("cpu")``)."""
    if device is None:
        return list(_BACKENDS)
    device_type = torch.device(device).type
    return [name for name, b in _BACKENDS.items() if device_type in b.capabilities.devices]


def auto_backends(device: torch.device | str) -> list[str]:
    """The backends "auto" may pick on ``device``'s type, best first (before limits and self-checks)."""
    device_type = torch.device(device).type
    ranked = [(b.capabilities.auto_rank[device_type], name) for name, b in _BACKENDS.items()
              if device_type in b.capabilities.auto_rank]
    return [name for _, name in sorted(ranked)]


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available here; available: {available_backends()}")
    return _BACKENDS[name]


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available here; choose 'auto' or one of {available_backends()}")
    return name


def resolve(name: str, device: torch.device, dtype: torch.dtype = torch.float32, width: int | None = None,
            rank: int | None = None, bottleneck: int | None = None) -> Backend:
    """The backend that runs a call on ``device`` in ``dtype`` (sizes: the adapter cell's h, k, s)."""
    if name != "auto":
        backend = get_backend(name)
        limit = backend.capabilities.limit(device, dtype, width, rank, bottleneck)
        if limit is not None:
            raise ValueError(f"backend {name!r} does not cover this call: {limit}")
        return backend
    rejected: list[str] = []
    while True:
        # A plain loop, not min(key=...)/sorted: torch.compile traces this, so a compiled model has no graph break.
        best, best_rank = None, None
        for backend in _BACKENDS.values():
            rank_here = backend.capabilities.auto_rank.get(device.type)
            if rank_here is None or backend.name in rejected:
                continue
            if backend.capabilities.limit(device, dtype, width, rank, bottleneck) is not None:
                continue
            if best_rank is None or rank_here < best_rank:
                best, best_rank = backend, rank_here
        if best is None:
            raise ValueError(f"no backend covers a call on {device} in {dtype} with h={width} k={rank} "
                             f"s={bottleneck}; available: {available_backends()}")
        if not best.capabilities.self_check or self_check_passed(best, device, dtype):
            return best
        rejected.append(best.name)


def self_check_passed(backend: Backend, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` passed its self-check on ``device`` in ``dtype``; runs the check the first time.

    While torch.compile traces or a CUDA graph is captured nothing can be run: an unchecked backend then
    counts as not passed (and is checked at the next eager call).
    """
    if device.type == "meta":
        return True  # meta tensors hold no values: the call is shape-only and there is nothing to check
    key = (backend.name, str(device), dtype)
    verdict = _SELF_CHECKS.get(key)
    if verdict is not None:
        return verdict
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    from .collectives import synchronised
    from .selfcheck import self_check  # the check calls the ops, which import this module

    with synchronised(None):  # checks this process's kernels, even inside a data-parallel step
        result = self_check(backend, device, dtype)
    _SELF_CHECKS[key] = result.ok
    if not result.ok:
        warnings.warn(f"hamur_fast: backend {backend.name!r} failed its self-check on {device} in {dtype} "
                      f"({result.error}); backend='auto' falls back to another backend", RuntimeWarning,
                      stacklevel=3)
    return result.ok

