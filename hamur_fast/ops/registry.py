"""Backend registry: which implementations of the adapter ops exist, and which one ``"auto"`` picks.

A backend is a module-like object with two functions, ``hyper_adapter`` and ``domain_norm``
(signatures as in :mod:`hamur_fast.ops.reference`), plus an ``is_available()`` predicate and a
``supports(device)`` predicate. Kernel backends register themselves here when their import succeeds,
so the package works with whatever subset was built.
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
    # Lower runs first when "auto" chooses among backends that support the device.
    auto_priority: int


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends usable in this process, e.g. ``["reference", "torch"]``."""
    return list(_BACKENDS)


def resolve(name: str, device: torch.device) -> Backend:
    """Return the backend called ``name`` (or the best one for ``device`` when ``name == "auto"``)."""
    if name == "auto":
        candidates = [b for b in _BACKENDS.values() if b.auto_priority >= 0 and b.supports(device)]
        return min(candidates, key=lambda b: b.auto_priority)
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
