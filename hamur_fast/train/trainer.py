"""Training: fit with early stopping on validation AUC, evaluate, predict, checkpoint and resume."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import MultiDomainData, TensorSplit
from ..data.tensors import Batch
from ..features import CTRModel
from .captured_step import CapturedTrainStep
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .diagnostics import AdapterDiagnostics
from .files import write_csv, write_json
from .metrics import domain_metrics

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Released defaults (SPEC section 4): Adam, lr 1e-3, weight decay 1e-5, early stopping on val AUC."""

    epochs: int = 50
    batch_size: int = 2048
    eval_batch_size: int = 16384
    lr: float = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"  # "adam" or "adamw"
    patience: int = 10  # epochs without a better validation AUC before stopping
    grad_clip: float | None = None  # max global gradient norm
    seed: int = 2022
    device: str = "auto"  # "auto" = cuda when available
    bf16: bool = False  # bf16 autocast for the forward pass (meant for GPUs)
    pin_memory: bool = False
    progress: bool = True
    # Each training step as one CUDA graph replay (hamur_fast.train.captured_step); batches must keep one
    # size, so the last partial batch of an epoch is skipped. Off CUDA the same step runs eagerly.
    cuda_graph: bool = False

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.cuda_graph and (self.bf16 or self.grad_clip):
            raise ValueError("cuda_graph does not combine with bf16 or grad_clip (they are not in the captured step)")
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, options: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown train option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)


def auxiliary_losses(model) -> dict:
    """The extra training losses a model reports for its latest forward (``MultiDomainModel.auxiliary_losses``;
    a :class:`CTRModel` asks its core): name -> scalar tensor, empty for most models."""
    report = getattr(getattr(model, "core", model), "auxiliary_losses", None)
    return report() if callable(report) else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Trains a :class:`CTRModel`. ``run_dir`` (optional) receives ``checkpoint.pt`` after every epoch,
    ``metrics.csv``/``metrics.json`` (one row per epoch) and ``learning_curves.png``; ``run_config`` (the
    data/model/train sections) and the feature map go into the checkpoint so that it is self-contained."""

    def __init__(self, model: CTRModel, config: TrainConfig, feature_map, run_dir=None, run_config=None):
        self.config, self.feature_map = config, feature_map
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.run_config = run_config or {}
        self.optimizer = self._make_optimizer()
        self.captured_step = (CapturedTrainStep(_BatchFields(self.model), self.optimizer, config.batch_size,
                                                self.device) if config.cuda_graph else None)
        self.epoch, self.best_auc, self.best_epoch, self.bad_epochs = 0, -math.inf, 0, 0
        self.history: list = []
        self.best_state = copy.deepcopy(self.model.state_dict())
        # Adapter diagnostics per epoch (hamur_fast.train.diagnostics); a captured step runs no Python hooks.
        self.diagnostics = AdapterDiagnostics(self.model)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        kind = torch.optim.Adam if self.config.optimizer == "adam" else torch.optim.AdamW
        options = dict(lr=self.config.lr, weight_decay=self.config.weight_decay)
        if self.config.cuda_graph and self.device.type == "cuda":
            options["capturable"] = True  # the step counter lives on the GPU, inside the graph
        try:
            return kind(self.model.parameters(), fused=True, **options)
        except RuntimeError:  # no fused kernel for this device or dtype
            return kind(self.model.parameters(), **options)

    # ------------------------------------------------------------------ fit
    def fit(self, data: MultiDomainData) -> list:
        """Train until ``epochs`` or early stopping, then restore the best weights (by validation AUC)
        whether or not stopping triggered. Returns the per-epoch history."""
        if self.epoch == 0:
            torch.manual_seed(self.config.seed)  # dropout draws; a resumed run restores the saved state instead
        while self.epoch < self.config.epochs and self.bad_epochs < self.config.patience:
            started = time.perf_counter()
            if self.captured_step is None:
                self.diagnostics.start()
            loss, auxiliary = self._train_epoch(data.train)
            seconds = time.perf_counter() - started
            adapter = self.diagnostics.summary()
            val = self.evaluate(data.val)
            self.epoch += 1
            self._track_best(val["auc"])
            self.history.append({"epoch": self.epoch, "train_loss": loss, "seconds": round(seconds, 3),
                                 "rows_per_s": round(len(data.train) / seconds, 1),
                                 **{f"train_{name}": value for name, value in auxiliary.items()},
                                 **{f"val_{k}": v for k, v in val.items() if not k.startswith("rows")}, **adapter})
            self._write_epoch_outputs()
        self.model.load_state_dict(self.best_state)
        if self.run_dir is not None:
            self.save(self.run_dir / CHECKPOINT_NAME)
            from .plots import plot_learning_curves  # matplotlib only when plots are written
            plot_learning_curves(self.history, self.run_dir / "learning_curves.png",
                                 f"{self.run_config.get('model', {}).get('name', 'model')}: learning curves")
        return self.history

    def _train_epoch(self, split: TensorSplit) -> tuple:
        """(mean click loss, {name: mean auxiliary loss}) over the epoch's rows."""
        self.model.train()
        total, rows, auxiliary = 0.0, 0, {}
        bar = tqdm(total=len(split), unit="rows", unit_scale=True, desc=f"epoch {self.epoch + 1}",
                   disable=not self.config.progress, leave=False)
        for batch in split.batches(self.config.batch_size, shuffle=True, seed=self.config.seed, epoch=self.epoch,
                                   device=self.device, pin_memory=self.config.pin_memory):
            if len(batch.domain) < 2:
                continue  # batch normalisation cannot train on a single row
            if self.captured_step is not None and len(batch.domain) != self.config.batch_size:
                continue  # a captured step has static shapes
            loss, extra = self._step(batch)
            total, rows = total + loss * len(batch.domain), rows + len(batch.domain)
            for name, value in extra.items():
                auxiliary[name] = auxiliary.get(name, 0.0) + value * len(batch.domain)
            bar.update(len(batch.domain))
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.close()
        return total / max(rows, 1), {name: value / max(rows, 1) for name, value in auxiliary.items()}

    def _step(self, batch) -> tuple:
        """One optimizer step; returns (click loss, {name: auxiliary loss}) as floats. The model's auxiliary
        losses (``auxiliary_losses()``, e.g. AdaSparse's sparsity regulariser) are added to the minimised loss."""
        if self.captured_step is not None:
            loss = self.captured_step.step((batch.sparse, batch.dense), batch.domain, batch.label).item()
            if auxiliary_losses(self.model):
                raise ValueError("cuda_graph does not include the model's auxiliary losses; train it without cuda_graph")
            return loss, {}
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            logits = self.model.logits(batch)
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch.label)
        extra = {name: value.float() for name, value in auxiliary_losses(self.model).items()}
        (loss + sum(extra.values())).backward()
        self.diagnostics.after_backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return loss.item(), {name: value.item() for name, value in extra.items()}

    def _track_best(self, val_auc: float) -> None:
        if val_auc > self.best_auc:  # NaN (one-class validation set) never counts as better
            self.best_auc, self.best_epoch, self.bad_epochs = val_auc, self.epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1

    def _write_epoch_outputs(self) -> None:
        if self.run_dir is None:
            return
        write_csv(self.run_dir / "metrics.csv", self.history)
        write_json(self.run_dir / "metrics.json", self.history)
        self.save(self.run_dir / CHECKPOINT_NAME)

    # ------------------------------------------------------------------ evaluate / predict
    @torch.no_grad()
    def predict(self, split: TensorSplit) -> torch.Tensor:
        """Click probabilities (N,) on CPU, in the split's row order."""
        self.model.eval()
        out = []
        for batch in split.batches(self.config.eval_batch_size, device=self.device):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                out.append(self.model(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def evaluate(self, split: TensorSplit) -> dict:
        """Overall and per-domain AUC and logloss (see :func:`domain_metrics`)."""
        if split.label is None:
            raise ValueError("cannot evaluate a split without labels")
        prob = self.predict(split)
        return domain_metrics(split.label.numpy(), prob.numpy(), split.domain.numpy(), self.feature_map.num_domains)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> None:
        save_checkpoint(path, {
            "config": {**self.run_config, "train": asdict(self.config)},
            "feature_map": self.feature_map.to_dict(),
            "model": self.model.state_dict(),
            "best_model": self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "progress": {"epoch": self.epoch, "best_auc": self.best_auc, "best_epoch": self.best_epoch,
                         "bad_epochs": self.bad_epochs, "history": self.history,
                         "rng": torch.get_rng_state(), "adapter_init": self.diagnostics.initial},
        })

    def restore(self, payload: dict) -> None:
        """Continue from a checkpoint (see :func:`load_checkpoint`): weights, optimizer, early-stopping state,
        history and the random state, so that on CPU the remaining epochs match an uninterrupted run."""
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            progress = payload["progress"]
            self.epoch, self.best_auc = int(progress["epoch"]), float(progress["best_auc"])
            self.best_epoch, self.bad_epochs = int(progress["best_epoch"]), int(progress["bad_epochs"])
            self.history = list(progress["history"])
            self.best_state = payload["best_model"]
            torch.set_rng_state(progress["rng"])
            if "adapter_init" in progress:
                self.diagnostics.initial = progress["adapter_init"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint does not fit this model or trainer: {err}") from None


__all__ = ["TrainConfig", "Trainer", "load_checkpoint", "CheckpointError", "CHECKPOINT_NAME"]


class _BatchFields(torch.nn.Module):
    """A CTRModel seen as ``logits(sparse, dense, domain)``: the tensors-only call a captured step drives."""

    def __init__(self, model: CTRModel):
        super().__init__()
        self.model, self.num_domains = model, model.num_domains

    def logits(self, sparse, dense, domain):
        return self.model.logits(Batch(sparse, dense, domain, None))
