"""Low-latency prediction: a folded eval copy, bucketed batch sizes and one CUDA graph per bucket."""
from __future__ import annotations

import bisect
import os
import threading

import torch
from torch import nn

from .. import _checks
from .folding import fold_for_inference, needs_whole_batch

DEFAULT_BUCKETS = (1, 8, 64, 512, 4096)


class Predictor:
    """Serve ``predict(e, domain) -> probabilities (B,)`` equal to ``model.eval()(e, domain)``.

    ``model_or_checkpoint``: a multi-domain model of :mod:`hamur_fast.models` (anything with
    ``input_dim``, ``num_domains`` and ``forward(e, domain) -> probabilities``), or the path of a
    checkpoint written by :mod:`hamur_fast.train` (its best weights are served; ``predictor.features``
    is then the checkpoint's feature embedding, turning ``(sparse ids, dense)`` into ``e``; it is
    None for a model). The model is copied and folded (see :mod:`hamur_fast.inference.folding`); the
    original is untouched.

    On CUDA, a batch is padded to the next size in ``batch_buckets`` and runs as one replay of that
    bucket's CUDA graph (captured once, here); a batch larger than the biggest bucket runs in chunks.
    On CPU, the folded copy runs under ``torch.inference_mode`` on the exact rows (padding exists
    only to reuse a graph), in chunks of the biggest bucket.

    Released-mode models (whose DomainNorm standardises over the whole batch even in eval) always
    run the exact batch in one piece, without padding, chunking or graphs: anything else would
    change their predictions. Their folding (tower and hyper-network BatchNorm) stays exact.

    One Predictor may be called from many threads at once: the "ids already checked" flag is private to
    each call (see :func:`hamur_fast._checks.domain_values_checked`), the eager path keeps no state, and
    each CUDA graph (whose input and output buffers are shared) is replayed by one thread at a time.
    """

    def __init__(self, model_or_checkpoint, device: torch.device | str | None = None,
                 batch_buckets=DEFAULT_BUCKETS, use_cuda_graphs: bool = True):
        model, self.features = _load(model_or_checkpoint, device)
        self.input_dim, self.num_domains = model.input_dim, model.num_domains
        self.batch_buckets = _check_buckets(batch_buckets)
        self.model = fold_for_inference(model, device)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.whole_batch = needs_whole_batch(self.model)
        self.graphs = {}
        if use_cuda_graphs and self.device.type == "cuda" and not self.whole_batch:
            self._capture_graphs()

    def __call__(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.predict(e, domain)

    def predict(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Probabilities (B,) on the predictor's device for e (B, input_dim) and domain (B,) int ids."""
        self._check_inputs(e, domain)
        with torch.inference_mode(), _checks.domain_values_checked():
            if self.whole_batch:
                return self._eager(e, domain)
            largest = self.batch_buckets[-1]
            if e.shape[0] <= largest:
                return self._run(e, domain)
            chunks = [self._run(e[s:s + largest], domain[s:s + largest]) for s in range(0, e.shape[0], largest)]
            return torch.cat(chunks)

    def _run(self, e, domain):
        if not self.graphs:
            return self._eager(e, domain)
        bucket = self.batch_buckets[bisect.bisect_left(self.batch_buckets, e.shape[0])]
        return self.graphs[bucket].replay(e, domain)  # its copy_ moves and casts the inputs

    def _eager(self, e, domain):
        return self.model(e.to(self.device, self.dtype), domain.to(self.device, torch.int64))

    def _check_inputs(self, e, domain) -> None:
        _checks.check_float("e", e, 2)
        batch = _checks.check_batch("e", e)
        if e.shape[1] != self.input_dim:
            raise ValueError(f"e must have shape (B, {self.input_dim}), got {tuple(e.shape)}")
        # Checked on the caller's device: ids still on the host cost no device synchronisation.
        _checks.check_domain(domain, batch, self.num_domains)

    def _capture_graphs(self) -> None:
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool the largest one reserved.
        for size in reversed(self.batch_buckets):
            try:
                self.graphs[size] = _BucketGraph(self.model, size, self.input_dim, self.dtype, self.device, pool)
            except RuntimeError as err:
                raise RuntimeError(f"{type(self.model).__name__} could not be captured in a CUDA graph (does its "
                                   f"forward read values back to the host?): {err}. Pass use_cuda_graphs=False "
                                   "to serve it eagerly") from err
            pool = self.graphs[size].graph.pool()


class _BucketGraph:
    """One CUDA graph of the folded model for a fixed batch size, with static input and output buffers."""

    WARMUP_RUNS = 2

    def __init__(self, model: nn.Module, size: int, input_dim: int, dtype, device, pool):
        with torch.inference_mode(), _checks.domain_values_checked():
            self.e = torch.zeros(size, input_dim, dtype=dtype, device=device)
            self.domain = torch.zeros(size, dtype=torch.int64, device=device)  # id 0 is valid for every model
            # Warm-up on a side stream (lazy initialisation, cuBLAS workspaces) keeps it out of the capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP_RUNS):
                    model(self.e, self.domain)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = model(self.e, self.domain)
        # The static buffers are shared: copy in, replay and copy out must not interleave across threads.
        self.lock = threading.Lock()

    def replay(self, e: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        rows = e.shape[0]
        with self.lock:
            # Rows past `rows` keep the previous call's (valid) inputs: in a model that passes
            # `needs_whole_batch() == False` rows never interact, so they cannot affect the real rows.
            self.e[:rows].copy_(e)
            self.domain[:rows].copy_(domain)
            self.graph.replay()
            return self.out[:rows].clone()


def _load(model_or_checkpoint, device):
    """(model, feature embedding or None) from a model or a checkpoint path."""
    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        # Imported here: the training stack (data readers, pandas) is needed only to read a checkpoint.
        from ..train import load_trained

        trainer, _ = load_trained(model_or_checkpoint, None if device is None else str(device))
        return trainer.model.core, trainer.model.features.eval()
    if not isinstance(model_or_checkpoint, nn.Module):
        raise ValueError(f"Predictor takes a model (an nn.Module of hamur_fast.models) or a checkpoint path, "
                         f"got {type(model_or_checkpoint).__name__}")
    if not all(hasattr(model_or_checkpoint, a) for a in ("input_dim", "num_domains")):
        raise ValueError("the model must expose input_dim and num_domains (any hamur_fast.models model does)")
    return model_or_checkpoint, None


def _check_buckets(batch_buckets) -> tuple:
    buckets = tuple(sorted(set(int(b) for b in batch_buckets)))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"batch_buckets must be a non-empty collection of positive sizes, got {batch_buckets!r}")
    return buckets
