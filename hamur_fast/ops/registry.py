"""Backend registry: which implementations of the adapter ops exist, and which one ``"auto"`` picks.

A backend is two functions, ``hyper_adapter`` and ``domain_norm`` (signatures as in
:mod:`hamur_fast.ops.reference`), a ``supports(device)`` predicate, and ``auto_priority(device)``: the
rank "auto" gives it on that device (lower wins; None means "auto" never picks it there, e.g. the
slow reference, or Triton running under the CPU interpreter). Kernel backends register themselves
here when their import succeeds, so the package works with whatever subset was built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    hyper_adapter: Callable
    domain_norm: Callable
    supports: Callable[[torch.device], bool]
    auto_priority: Callable[[torch.device], int | None]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends usable in this process, e.g. ``["reference", "torch"]``."""
    return list(_BACKENDS)


def resolve(name: str, device: torch.device) -> Backend:
    """Return the backend called ``name`` (or the best one for ``device`` when ``name == "auto"``)."""
    if name == "auto":
        best, best_rank = None, None
        # A plain loop, not min(key=...): torch.compile traces it, so a compiled model has no graph break here.
        for backend in _BACKENDS.values():
            rank = backend.auto_priority(device) if backend.supports(device) else None
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = backend, rank
        return best
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available here; available: {available_backends()}")
    backend = _BACKENDS[name]
    if not backend.supports(device):
        raise ValueError(f"backend {name!r} does not support tensors on device {device}")
    return backend


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not available here; choose 'auto' or one of {available_backends()}")
    return name
