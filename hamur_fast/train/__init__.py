"""Training and evaluation: Trainer (fit / evaluate / predict), metrics, checkpoints, plots, config-driven runs.

matplotlib is imported only when a plot is written.
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .experiment import compare, load_config, load_trained, resume_run, sweep, train_run
from .metrics import auc, domain_metrics, logloss
from .trainer import TrainConfig, Trainer

__all__ = ["Trainer", "TrainConfig", "auc", "logloss", "domain_metrics", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "train_run", "resume_run", "load_trained", "compare", "sweep", "load_config"]
