"""Input validation shared by every layer, op and model.

Shape and dtype checks cost nothing and always run. Checking domain-id *values*
reads the tensor, which is a host-device synchronisation on a GPU; it runs by
default, is skipped automatically while a CUDA graph is being captured or
torch.compile is tracing, and can be switched off with
``hamur_fast.set_value_checks(False)`` on hot serving paths.
"""
from __future__ import annotations

import contextlib
import contextvars
import reprlib

import torch

_VALUE_CHECKS = True
# Per call, not per process: a context variable is private to each thread (and asyncio task), so one
# caller's "already checked" block can never switch the check off for a concurrent caller.
_ALREADY_CHECKED = contextvars.ContextVar("hamur_fast_domain_values_checked", default=False)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What an error message echoes of a user's value: a few elements, a few levels, a few dozen characters, so that a
# huge value (a YAML alias bomb expands to billions of elements) costs nothing to report.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def shown(value) -> str:
    """``repr(value)``, bounded in length and in the work it takes (for error messages)."""
    return _SHOWN.repr(value)


def set_value_checks(enabled: bool) -> None:
    """Turn the domain-id range check (a device sync on GPU) on or off globally."""
    global _VALUE_CHECKS
    _VALUE_CHECKS = bool(enabled)


@contextlib.contextmanager
def domain_values_checked():
    """Inside this block, layers skip the domain-id value check: the caller (a model) already did it once.

    The flag belongs to the current thread / task only (a ``contextvars.ContextVar``). Code being compiled
    runs no value check at all, and torch.compile cannot trace a ContextVar: it is left alone there."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _ALREADY_CHECKED.set(True)
    try:
        yield
    finally:
        _ALREADY_CHECKED.reset(token)


def value_checks_active(t: torch.Tensor) -> bool:
    """Whether check_domain reads the values of ``t`` in this call (see the module docstring)."""
    if not _VALUE_CHECKS or torch.compiler.is_compiling() or _ALREADY_CHECKED.get():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return t.device.type != "meta"


def check_float(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_domain(domain, batch: int, num_domains: int | None) -> None:
    """domain: (B,) integer tensor with values in [0, num_domains) (no upper bound when None)."""
    if not isinstance(domain, torch.Tensor):
        raise ValueError(f"domain must be a torch.Tensor of int64 ids, got {type(domain).__name__}")
    if domain.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"domain must be an int64 (or int32) tensor, got dtype {domain.dtype}")
    if tuple(domain.shape) != (batch,):
        raise ValueError(f"domain must have shape ({batch},) to match the batch, got {tuple(domain.shape)}")
    if batch == 0 or not value_checks_active(domain):
        return
    lo, hi = torch.aminmax(domain)
    lo, hi = int(lo), int(hi)
    if lo < 0:
        raise ValueError(f"domain ids must be >= 0, got {lo}")
    if num_domains is not None and hi >= num_domains:
        raise ValueError(f"domain id {hi} is out of range for num_domains={num_domains}")


def check_batch(name: str, t: torch.Tensor) -> int:
    if t.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (B=0); at least one row is needed")
    return t.shape[0]


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
