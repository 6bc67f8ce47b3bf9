"""A training step that runs as one CUDA graph replay: forward, BCE loss, backward and optimizer step.

Every op of the step has static shapes and none reads a value back to the host (no ``.item()``, no
``nonzero``; the model's domain-id check is skipped while a graph is captured), so the whole step
can be captured once and replayed: one launch per step instead of hundreds of kernel launches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _checks


def _as_tuple(e) -> tuple:
    return tuple(e) if isinstance(e, (tuple, list)) else (e,)


def bce_step(model: nn.Module, optimizer: torch.optim.Optimizer, e, domain, label) -> torch.Tensor:
    """One plain eager step (the reference the captured step must equal): returns the mean BCE loss.

    ``e`` is the model's input tensor, or a tuple of them (e.g. sparse ids and dense features):
    the model is called as ``model.logits(*e, domain)``.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(model.logits(*_as_tuple(e), domain), label)
    loss.backward()
    optimizer.step()
    return loss.detach()


class CapturedTrainStep:
    """``step(e, domain, label) -> loss`` for a fixed ``batch_size``; a CUDA graph on CUDA, eager on CPU.

    ``model`` has ``logits(e, domain)`` (every :mod:`hamur_fast.models` model); ``optimizer`` must be
    capturable on CUDA (``torch.optim.Adam(params, capturable=True)``: its step counter lives on the
    GPU). On CUDA the first ``warmup_steps`` calls run eagerly on a side stream (real steps on the
    given batches: allocator and cuBLAS warm-up must happen outside a capture), the next call
    captures the step and replays it, and every later call copies the batch into static buffers and
    replays. Losses therefore equal those of :func:`bce_step` called on the same batches.

    Every batch must have exactly ``batch_size`` rows (drop or pad the last partial batch). Returns a
    fresh loss tensor on the device each call, never synchronising with the host.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                 device: torch.device | str, warmup_steps: int = 3):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (a capture needs warmed-up state), got {warmup_steps}")
        self.model, self.optimizer, self.batch_size = model, optimizer, batch_size
        self.device = torch.device(device)
        self.num_domains = getattr(model, "num_domains", None)
        self.capture = self.device.type == "cuda"
        if self.capture:
            _check_capturable(optimizer)
        self.warmup_steps, self.steps_done = warmup_steps, 0
        self.graph = None

    def step(self, e, domain: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``e``: the input tensor, or a tuple of input tensors (``model.logits(*e, domain)``)."""
        self._check_batch(e, domain, label)
        if not self.capture:
            return bce_step(self.model, self.optimizer, [t.to(self.device) for t in _as_tuple(e)],
                            domain.to(self.device), label.to(self.device))
        if self.steps_done < self.warmup_steps:
            loss = self._warmup_step(e, domain, label)
        else:
            if self.graph is None:
                self._capture(e, domain, label)
            for static, value in zip(self.static_e, _as_tuple(e)):
                static.copy_(value)
            self.static_domain.copy_(domain)
            self.static_label.copy_(label)
            self.graph.replay()
            loss = self.static_loss.clone()  # the static loss is overwritten by the next replay
        self.steps_done += 1
        return loss

    __call__ = step

    def _warmup_step(self, e, domain, label):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = bce_step(self.model, self.optimizer, [t.to(self.device) for t in _as_tuple(e)],
                            domain.to(self.device), label.to(self.device))
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _capture(self, e, domain, label):
        self.static_e = tuple(torch.empty_like(t, device=self.device) for t in _as_tuple(e))
        self.static_domain = torch.empty_like(domain, device=self.device)
        self.static_label = torch.empty_like(label, device=self.device)
        # Gradients set to None before capture are allocated inside the graph's pool by the captured
        # backward, which then writes (not accumulates) them on every replay.
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = F.binary_cross_entropy_with_logits(self.model.logits(*self.static_e, self.static_domain),
                                                      self.static_label)
            loss.backward()
            self.optimizer.step()
        self.static_loss = loss.detach()

    def _check_batch(self, e, domain, label) -> None:
        for t in _as_tuple(e):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != self.batch_size:
                rows = t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None
                raise ValueError(f"every batch must have batch_size={self.batch_size} rows (static shapes), "
                                 f"got {rows}; drop or pad the last partial batch")
        _checks.check_float("label", label, 1)
        _checks.check_shape("label", label, (self.batch_size,))
        # A replay runs no Python checks, so bad ids are caught here, but only where that is free: ids the
        # caller holds on the CPU are read there; reading ids that already live on the GPU would sync with the
        # host every step (the kernels stay memory-safe for any id: a bad one gives NaN or an error in its row).
        if domain.device.type == "cpu":
            _checks.check_domain(domain, self.batch_size, self.num_domains)
        else:
            with _checks.domain_values_checked():  # dtype and shape only
                _checks.check_domain(domain, self.batch_size, self.num_domains)
        if self.graph is not None:
            for static, t in zip(self.static_e, _as_tuple(e)):
                if (t.dtype, t.shape) != (static.dtype, static.shape):
                    raise ValueError(f"inputs must keep dtype {static.dtype} and shape {tuple(static.shape)} "
                                     f"of the captured step, got {t.dtype} {tuple(t.shape)}")


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "capturable" in group and not group["capturable"]:
            raise ValueError(f"{type(optimizer).__name__} must be built with capturable=True to run inside a "
                             "CUDA graph (e.g. torch.optim.Adam(params, lr=1e-3, capturable=True))")
