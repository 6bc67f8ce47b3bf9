"""Training: fit with early stopping on validation AUC, evaluate, predict, checkpoint and resume.

Honest runs: a configuration that cannot train stops with an error before the first epoch (a split with one
class, batches too small to train on, an output directory that cannot take the checkpoints), and a run whose
loss stops being finite stops with :class:`TrainingError` at that step. Runs are reproducible by default:
the same seed and thread count give the same numbers (``deterministic``), and the checkpoint records every
setting a resume needs (threads included), the last weights (where a resume continues) and the best ones.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import _checks
from ..data import DataError, MultiDomainData, TensorSplit
from ..data.fingerprint import data_fingerprint
from ..data.tensors import Batch
from ..features import CTRModel
from .captured_step import CapturedTrainStep
from . import report
from .checkpoint import (CheckpointError, check_optimizer_state, check_progress, check_weights, load_checkpoint,
                         save_checkpoint)
from .diagnostics import AdapterDiagnostics
from .files import check_writable, locked_directory, write_csv, write_json
from .metrics import domain_metrics

CHECKPOINT_NAME = "checkpoint.pt"
# More intra-op threads than any machine has cores; beyond it thread pools fail to start (or crash). A fixed
# bound, not this machine's core count, so that a checkpoint from a bigger machine still loads here.
MAX_THREADS = 1024
# The seeds torch.manual_seed takes without wrapping around.
MAX_SEED = 2**63 - 1


class TrainingError(RuntimeError):
    """The run could not train: the loss or the validation metrics stopped being finite."""


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
    # A domain with fewer rows than this in a split gets no AUC there ("n/a"): a handful of rows is noise.
    min_domain_rows: int = 50
    grad_clip: float | None = None  # max global gradient norm
    seed: int = 2022
    device: str = "auto"  # "auto" = cuda when available
    # Intra-op CPU threads, set process-wide when the Trainer is built; None keeps the current setting. The
    # checkpoint records the count used, and a resume sets it again: results depend on it.
    threads: int | None = None
    # torch.use_deterministic_algorithms during fit: on the CPU, several threads otherwise accumulate the
    # gradients of per-domain gathers in a varying order, and two runs with one seed differ.
    deterministic: bool = True
    bf16: bool = False  # bf16 autocast for the forward pass (meant for GPUs)
    pin_memory: bool = False
    progress: bool = True
    # Each training step as one CUDA graph replay (hamur_fast.train.captured_step); batches must keep one
    # size, so the last partial batch of an epoch is skipped. Off CUDA the same step runs eagerly.
    cuda_graph: bool = False

    def __post_init__(self):
        for option in fields(self):  # YAML and --set hand over text such as "1e-3": numbers are parsed here
            setattr(self, option.name, _coerce(option.name, getattr(self, option.name), option.type))
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.cuda_graph and (self.bf16 or self.grad_clip):
            raise ValueError("cuda_graph does not combine with bf16 or grad_clip (they are not in the captured step)")
        for name in ("epochs", "eval_batch_size", "patience", "min_domain_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"train.threads must be >= 1 and <= {MAX_THREADS}, got {self.threads}")
        if self.batch_size < 2:
            raise ValueError(f"train.batch_size must be >= 2, got {self.batch_size}: batch normalisation cannot "
                             "train on one row, so every batch would be skipped")
        for name in ("lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"train.grad_clip (the largest gradient norm) must be > 0, or null for no clipping, "
                             f"got {self.grad_clip}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"train.seed must be between 0 and 2**63 - 1, got {self.seed}")
        resolve_device(self.device)  # an unknown or absent device fails here, before any data is read

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


_OPTION_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(name: str, value, annotation: str):
    """``value`` as the option's type (``"int | None"`` allows None); text that spells a number is parsed."""
    kind = _OPTION_TYPES[annotation.split(" |")[0]]
    if value is None and "None" in annotation:
        return None
    if kind is bool or kind is str:
        if isinstance(value, kind):
            return value
        raise ValueError(f"train.{name} must be {'true or false' if kind is bool else 'text'}, "
                         f"got {_checks.shown(value)}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ValueError(f"train.{name} must be a{'n integer' if kind is int else ' number'}, "
                         f"got {_checks.shown(value)}")
    if kind is int:
        if number != int(number):
            raise ValueError(f"train.{name} must be an integer, got {_checks.shown(value)}")
        return int(number)
    return float(number)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; a device that cannot be used is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:1 ... or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r} was asked for, but this torch has no usable MPS (Apple GPU) "
                             "support; use --device cpu or auto")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r} is not supported: use cpu, cuda, cuda:N or auto")
    return device


def require_both_classes(split: TensorSplit, name: str) -> None:
    """AUC needs positives and negatives: a split with one class cannot judge (or report) a model."""
    if split.label is None:
        raise DataError(f"the {name} split has no labels")
    positives = int(split.label.sum())
    if positives in (0, len(split)):
        raise DataError(f"the {name} split has one class only ({len(split):,} rows, all labelled "
                        f"{int(split.label[0])}): its AUC is undefined; use more data or another split")


def _package_version() -> str:
    import hamur_fast  # the package, once imported, knows its version

    return hamur_fast.__version__


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool):
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)  # never an error for an op without one
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class Trainer:
    """Trains a :class:`CTRModel`. ``run_dir`` (optional) receives ``checkpoint.pt`` after every epoch,
    ``metrics.csv``/``metrics.json`` (one row per epoch) and ``learning_curves.png``; ``run_config`` (the
    data/model/train sections) and the feature map go into the checkpoint so that it is self-contained."""

    def __init__(self, model: CTRModel, config: TrainConfig, feature_map, run_dir=None, run_config=None):
        self.config, self.feature_map = config, feature_map
        self.device = resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.model = model.to(self.device)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.run_config = run_config or {}
        self.optimizer = self._make_optimizer()
        self.captured_step = (CapturedTrainStep(LogitsModule(self.model), self.optimizer, config.batch_size,
                                                self.device) if config.cuda_graph else None)
        self.epoch, self.best_auc, self.best_epoch, self.bad_epochs = 0, -math.inf, 0, 0
        self.history: list = []
        self.best_state = copy.deepcopy(self.model.state_dict())
        self.data_fingerprint: str | None = None  # of the data this run trained on; a resume must match it
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
        whether or not stopping triggered. Returns the per-epoch history.

        The checkpoint written after each epoch holds the last weights (a resume continues from them) and
        the best ones. Raises before the first epoch when the data or the output directory cannot serve the
        run, and :class:`TrainingError` as soon as the loss or the validation metrics are not finite."""
        self._check_trainable(data)
        with self._locked_run_dir(), _deterministic_algorithms(self.config.deterministic):
            if self.epoch == 0:
                torch.manual_seed(self.config.seed)  # dropout draws; a resumed run restores the saved state
            while self.epoch < self.config.epochs and self.bad_epochs < self.config.patience:
                started = time.perf_counter()
                if self.captured_step is None:
                    self.diagnostics.start()
                loss, auxiliary = self._train_epoch(data.train)
                seconds = time.perf_counter() - started
                adapter = self.diagnostics.summary()
                val = self.evaluate(data.val)
                if not (math.isfinite(val["auc"]) and math.isfinite(val["logloss"])):
                    raise TrainingError(f"validation metrics are not finite after epoch {self.epoch + 1} "
                                        f"(AUC {val['auc']}, logloss {val['logloss']}): the model diverged; "
                                        f"lower train.lr (now {self.config.lr:g})")
                self.epoch += 1
                self._track_best(val["auc"])
                self.history.append({"epoch": self.epoch, "train_loss": loss, "seconds": round(seconds, 3),
                                     "rows_per_s": round(len(data.train) / seconds, 1),
                                     **{f"train_{name}": value for name, value in auxiliary.items()},
                                     **{f"val_{k}": v for k, v in val.items() if not k.startswith("rows")}, **adapter})
                report.log.info(report.epoch_line(self.history[-1], self.config.epochs, self.best_auc,
                                                  self.best_epoch))
                self._write_epoch_outputs()
        report.log.info(report.stop_line(self.epoch, self.config.epochs, self.bad_epochs, self.config.patience,
                                         self.best_auc, self.best_epoch))
        self.model.load_state_dict(self.best_state)
        if self.run_dir is not None:
            from .plots import plot_learning_curves  # matplotlib only when plots are written
            plot_learning_curves(self.history, self.run_dir / "learning_curves.png",
                                 f"{self.run_config.get('model', {}).get('name', 'model')}: learning curves",
                                 data.train.domain_counts(self.feature_map.num_domains))
        return self.history

    def _data_fingerprint(self, data: MultiDomainData) -> str:
        """The digest a resume checks (a data-parallel trainer, holding a shard, returns the whole data's)."""
        return data_fingerprint(data)

    def _check_trainable(self, data: MultiDomainData) -> None:
        """Everything that would make the run fail, or succeed having done nothing, checked before epoch 1."""
        fingerprint = self._data_fingerprint(data)
        if self.data_fingerprint is not None and fingerprint != self.data_fingerprint:
            raise DataError("these data differ from the data the checkpoint's run was trained on (another file, "
                            "split or feature map): a resume must continue on the same data")
        self.data_fingerprint = fingerprint
        rows, size = len(data.train), self.config.batch_size
        trained = rows // size * size if self.captured_step is not None else rows - (rows % size == 1)
        if trained == 0:
            raise DataError(f"the train split has {rows} row(s): no batch of train.batch_size={size} can train "
                            f"(batches of one row are skipped{', captured steps need full batches' if self.captured_step is not None else ''})")
        require_both_classes(data.train, "train")
        require_both_classes(data.val, "val")
        if self.run_dir is not None:
            check_writable(self.run_dir, self._checkpoint_bytes())

    def _checkpoint_bytes(self) -> int:
        """About the size of one checkpoint: the last and best weights and Adam's two moments."""
        state = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return 4 * state + (1 << 20)

    def _locked_run_dir(self):
        return locked_directory(self.run_dir) if self.run_dir is not None else contextlib.nullcontext()

    def _train_epoch(self, split: TensorSplit) -> tuple:
        """(mean click loss, {name: mean auxiliary loss}) over the epoch's rows."""
        self.model.train()
        total, rows, auxiliary = 0.0, 0, {}
        bar = tqdm(total=len(split), unit="rows", unit_scale=True, desc=f"epoch {self.epoch + 1}",
                   disable=not self.config.progress, leave=False)
        for batch in self._training_batches(split):
            if len(batch.domain) < 2:
                continue  # batch normalisation cannot train on a single row
            if self.captured_step is not None and len(batch.domain) != self.config.batch_size:
                continue  # a captured step has static shapes
            loss, extra = self._step(batch)
            if not math.isfinite(loss):
                bar.close()
                raise TrainingError(f"the training loss became {loss} in epoch {self.epoch + 1} after "
                                    f"{rows:,} rows: the run diverged; lower train.lr (now {self.config.lr:g}) "
                                    "or set train.grad_clip (the checkpoint keeps the last finite epoch)")
            total, rows = total + loss * len(batch.domain), rows + len(batch.domain)
            for name, value in extra.items():
                auxiliary[name] = auxiliary.get(name, 0.0) + value * len(batch.domain)
            bar.update(len(batch.domain))
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.close()
        return total / max(rows, 1), {name: value / max(rows, 1) for name, value in auxiliary.items()}

    def _training_batches(self, split: TensorSplit):
        """One epoch's batches, shuffled by (seed, epoch) (a data-parallel trainer takes this rank's share)."""
        return split.batches(self.config.batch_size, shuffle=True, seed=self.config.seed, epoch=self.epoch,
                             device=self.device, pin_memory=self.config.pin_memory)

    def _forward_logits(self, batch) -> torch.Tensor:
        """The training forward (a data-parallel trainer runs it through DDP)."""
        return self.model.logits(batch)

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
            logits = self._forward_logits(batch)
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
            out.append(self._probabilities(batch).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _probabilities(self, batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.model(batch).float()

    def evaluate(self, split: TensorSplit) -> dict:
        """Overall and per-domain AUC and logloss (see :func:`domain_metrics`)."""
        if split.label is None:
            raise ValueError("cannot evaluate a split without labels")
        prob = self.predict(split)
        return domain_metrics(split.label.numpy(), prob.numpy(), split.domain.numpy(), self.feature_map.num_domains,
                              self.config.min_domain_rows)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> None:
        """The checkpoint: ``model`` = the last weights (where a resume continues), ``best_model`` = the best
        by validation AUC, and in ``train`` every setting a resume needs, the thread count as used."""
        settings = {**asdict(self.config), "threads": self.config.threads or torch.get_num_threads()}
        save_checkpoint(path, {
            "config": {**self.run_config, "train": settings},
            "feature_map": self.feature_map.to_dict(),
            "model": self.model.state_dict(),
            "best_model": self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "progress": {"epoch": self.epoch, "best_auc": self.best_auc, "best_epoch": self.best_epoch,
                         "bad_epochs": self.bad_epochs, "history": self.history,
                         "rng": torch.get_rng_state(), "adapter_init": self.diagnostics.initial,
                         "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "run": {"data_fingerprint": self.data_fingerprint, "torch": str(torch.__version__),
                    "hamur_fast": _package_version(), "device": str(self.device)},
        })

    def restore(self, payload: dict) -> None:
        """Continue from a checkpoint (see :func:`load_checkpoint`): the last weights, optimizer, early-stopping
        state, history and the random state, so that the remaining epochs match an uninterrupted run (same
        device, threads and torch version; a difference is warned about). Every part is checked against this
        model and optimizer first (:func:`hamur_fast.train.checkpoint.check_weights` and the like)."""
        check_weights(payload["model"], self.model, "the checkpoint's last weights")
        check_weights(payload["best_model"], self.model, "the checkpoint's best weights")
        check_optimizer_state(payload["optimizer"], self.optimizer)
        check_progress(payload["progress"])
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            progress = payload["progress"]
            self.epoch, self.best_auc = int(progress["epoch"]), float(progress["best_auc"])
            self.best_epoch, self.bad_epochs = int(progress["best_epoch"]), int(progress["bad_epochs"])
            self.history = list(progress["history"])
            self.best_state = payload["best_model"]
            torch.set_rng_state(progress["rng"])
            if progress.get("cuda_rng") and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(progress["cuda_rng"])
            if "adapter_init" in progress:
                self.diagnostics.initial = progress["adapter_init"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint does not fit this model or trainer: {err}") from None
        run = payload.get("run", {})
        self.data_fingerprint = run.get("data_fingerprint")
        for key, now in (("torch", str(torch.__version__)), ("device", str(self.device))):
            if run.get(key) not in (None, now):
                warnings.warn(f"the run was trained with {key} {run[key]} and continues with {now}: the remaining "
                              "epochs may differ from an uninterrupted run", stacklevel=2)


__all__ = ["TrainConfig", "Trainer", "TrainingError", "load_checkpoint", "CheckpointError", "CHECKPOINT_NAME"]


class LogitsModule(torch.nn.Module):
    """A CTRModel seen as ``logits(sparse, dense, domain)``: the tensors-only call a captured step drives, and the
    forward of a data-parallel step (DDP prepares its gradient reduction in ``forward``)."""

    def __init__(self, model: CTRModel):
        super().__init__()
        self.model, self.num_domains = model, model.num_domains

    def logits(self, sparse, dense, domain):
        return self.model.logits(Batch(sparse, dense, domain, None))

    forward = logits
