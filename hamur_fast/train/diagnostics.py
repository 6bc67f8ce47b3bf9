"""Adapter diagnostics: does the HAMUR adapter learn anything? Per cell and per domain:

- ``ratio``: the size of the cell's contribution relative to its input, ``||y - x|| / ||x||`` with
  ``y - x = DomainNorm(o)`` (the cell is ``y = x + DomainNorm(o)``), both norms taken over all rows of
  the domain the cell ran on in the epoch (root of summed squares);
- ``grad``: the gradient norm reaching the domain's factors (the four matrices U, V, U', V' together),
  the mean over the epoch's steps; ``hyper_grad``: the same for the whole hyper-network;
- ``shift``: how far the domain's factors moved from their initialisation, ``||W - W0|| / ||W0||``.

Released-mode factors are shared by the domains: their ``grad`` and ``shift`` are reported once, as
domain ``shared``. Everything accumulates on the device (no host sync per step); values are read once
per epoch. The contribution is observed on each :class:`HyperAdapter` call (a forward hook) and on each
``forward_all_towers`` call (released-mode towers: there only each row's own tower counts, as in the
model's output). The paper-mode ablation ``tower_norm="released"`` calls tower d's cell on the whole batch
as domain d, so there domain d's ratio spans every row through tower d.
"""
from __future__ import annotations

import math

import torch

from ..nn import HyperAdapter, HyperNetwork

FACTORS = ("down_left", "down_right", "up_left", "up_right")


class AdapterDiagnostics:
    """Collects the diagnostics of every adapter cell of ``model`` (none: every method is a no-op).

    ``start()`` before the steps of an epoch, ``after_backward()`` after each ``loss.backward()``,
    ``summary()`` at the end of the epoch (flat ``{name: float}``, also stops the forward hooks).
    ``initial`` (the factors at initialisation, saved in checkpoints) is what ``shift`` is measured from.
    """

    def __init__(self, model: torch.nn.Module, initial: dict | None = None):
        self.cells = [m for m in model.modules() if isinstance(m, HyperAdapter)]
        self.hyper = [p for m in model.modules() if isinstance(m, HyperNetwork) for p in m.parameters()]
        self.initial = initial if initial is not None else self.snapshot()
        self._hooks, self._steps, self._sums = [], 0, None

    def __bool__(self) -> bool:
        return bool(self.cells)

    def snapshot(self) -> dict:
        return {f"adapter{i}.{name}": getattr(cell, name).detach().clone()
                for i, cell in enumerate(self.cells) for name in FACTORS}

    # ------------------------------------------------------------------ collecting
    def start(self) -> None:
        self.stop()
        if not self.cells:
            return
        device = self.cells[0].down_left.device
        self._sums = {i: torch.zeros(2, cell.num_domains, device=device, dtype=torch.float64)
                      for i, cell in enumerate(self.cells)}  # [summed ||y - x||^2, summed ||x||^2] per domain
        self._grad = {i: torch.zeros(_groups(cell), device=device, dtype=torch.float64)
                      for i, cell in enumerate(self.cells)}
        self._hyper_grad = torch.zeros((), device=device, dtype=torch.float64)
        self._steps = 0
        self._hooks = [cell.register_forward_hook(self._observer(i)) for i, cell in enumerate(self.cells)]
        for i, cell in enumerate(self.cells):
            cell.forward_all_towers = self._all_towers_observer(i, cell)  # an instance attribute, removed by stop()
        self._inside_all_towers = False

    def _record(self, index: int, x, y, domain) -> None:
        with torch.no_grad():
            contribution = (y.float() - x.float()).square().sum(dim=1).double()
            size = x.float().square().sum(dim=1).double()
            self._sums[index].index_add_(1, domain, torch.stack([contribution, size]))

    def _observer(self, index: int):
        def observe(cell, args, output):
            if not self._inside_all_towers:
                self._record(index, args[0], output, args[2])
        return observe

    def _all_towers_observer(self, index: int, cell: HyperAdapter):
        original = type(cell).forward_all_towers.__get__(cell)

        def forward_all_towers(x, rep, domain):
            self._inside_all_towers = True
            try:
                y = original(x, rep, domain)
            finally:
                self._inside_all_towers = False
            own = domain.view(1, -1, 1).expand(1, -1, x.shape[2])  # each row's own tower
            self._record(index, x.gather(0, own)[0], y.gather(0, own)[0], domain)
            return y
        return forward_all_towers

    @torch.no_grad()
    def after_backward(self) -> None:
        if not self._hooks:
            return
        for i, cell in enumerate(self.cells):
            self._grad[i] += _per_group_norm([getattr(cell, name).grad for name in FACTORS], _groups(cell))
        grads = [p.grad for p in self.hyper if p.grad is not None]
        if grads:
            self._hyper_grad += torch.sqrt(sum(g.double().square().sum() for g in grads))
        self._steps += 1

    def stop(self) -> None:
        if self._hooks:
            for cell in self.cells:
                del cell.forward_all_towers
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def summary(self) -> dict:
        """The epoch's diagnostics as ``{adapter<i>_<what>_<domain>: float, hyper_grad: float}``
        ({} when nothing was collected since ``start()``)."""
        self.stop()
        if self._sums is None:
            return {}
        out = {}
        steps = max(self._steps, 1)
        for i, cell in enumerate(self.cells):
            contribution, size = self._sums[i].sqrt().cpu().tolist()
            for d in range(cell.num_domains):
                out[f"adapter{i}_ratio_d{d}"] = contribution[d] / size[d] if size[d] > 0 else math.nan
            labels = _group_labels(cell)
            grads = (self._grad[i] / steps).cpu().tolist() if self._steps else [math.nan] * len(labels)
            shifts = self._shift(i, cell)
            for label, grad, shift in zip(labels, grads, shifts):
                out[f"adapter{i}_grad_{label}"] = grad
                out[f"adapter{i}_shift_{label}"] = shift
        if self.hyper:
            out["hyper_grad"] = float(self._hyper_grad / steps) if self._steps else math.nan
        self._sums = None
        return out

    @torch.no_grad()
    def _shift(self, index: int, cell: HyperAdapter) -> list:
        now = [getattr(cell, name) for name in FACTORS]
        then = [self.initial[f"adapter{index}.{name}"].to(p.device) for name, p in zip(FACTORS, now)]
        moved = _per_group_norm([a - b for a, b in zip(now, then)], _groups(cell))
        start = _per_group_norm(then, _groups(cell))
        return (moved / start.clamp(min=1e-30)).cpu().tolist()


def _groups(cell: HyperAdapter) -> int:
    """Per-domain factors (paper mode): one group per domain; shared factors (released mode): one group."""
    return cell.num_domains if cell.mode == "paper" else 1


def _group_labels(cell: HyperAdapter) -> list:
    return [f"d{d}" for d in range(cell.num_domains)] if _groups(cell) > 1 else ["shared"]


def _per_group_norm(tensors: list, groups: int) -> torch.Tensor:
    """L2 norm over several tensors together, per leading-axis group (one group when they are shared)."""
    total = None
    for t in tensors:
        if t is None:
            continue
        square = t.detach().double().square().reshape(groups, -1).sum(dim=1)
        total = square if total is None else total + square
    if total is None:
        return torch.zeros(groups, dtype=torch.float64)
    return total.sqrt()


def diagnose(model: torch.nn.Module, batches, initial: dict | None = None) -> dict:
    """The diagnostics of ``model`` in eval mode over ``batches`` of ``(inputs, label)``, where
    ``model.logits(inputs)`` gives the logits: the contribution ratio, the gradient norms of the mean
    BCE loss of each batch (averaged over batches; no parameter changes) and the shift from ``initial``."""
    diagnostics = AdapterDiagnostics(model, initial)
    model.eval()
    diagnostics.start()
    for inputs, label in batches:
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logits(inputs).float(), label)
        loss.backward()
        diagnostics.after_backward()
    model.zero_grad(set_to_none=True)
    return diagnostics.summary()


def format_diagnostics(values: dict) -> str:
    """A Markdown table: one row per adapter cell and domain (ratio, grad, shift), then the hyper-network."""
    rows = {}
    for key, value in values.items():
        if key.startswith("adapter"):
            cell, what, domain = key.split("_", 2)
            rows.setdefault((cell, domain), {})[what] = value
    lines = ["| cell | domain | contribution ‖y-x‖/‖x‖ | factor gradient norm | factor shift ‖W-W0‖/‖W0‖ |",
             "|---|---|---|---|---|"]
    for (cell, domain), stats in rows.items():
        cells = [_number(stats.get(what)) for what in ("ratio", "grad", "shift")]
        lines.append(f"| {cell} | {domain} | " + " | ".join(cells) + " |")
    if "hyper_grad" in values:
        lines.append(f"\nhyper-network gradient norm: {_number(values['hyper_grad'])}")
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def checkpoint_report(trainer, payload: dict, split, split_name: str) -> str:
    """``hamur-fast eval --diagnostics``: the diagnostics of the checkpoint's best weights on ``split``
    (eval mode; gradients of the mean loss per batch), then those recorded while training at the best epoch."""
    batches = ((batch, batch.label) for batch in split.batches(trainer.config.eval_batch_size, device=trainer.device))
    progress = payload.get("progress", {})
    now = diagnose(trainer.model, batches, progress.get("adapter_init"))
    if not now:
        return "adapter diagnostics: this model has no adapter cells"
    parts = [f"adapter diagnostics on the {split_name} split (best weights, eval mode):\n\n{format_diagnostics(now)}"]
    best = int(progress.get("best_epoch", 0))
    recorded = [row for row in progress.get("history", []) if row.get("epoch") == best]
    if recorded and any(key.startswith("adapter") for key in recorded[0]):
        parts.append(f"recorded while training, epoch {best} (the best):\n\n{format_diagnostics(recorded[0])}")
    return "\n\n".join(parts)
