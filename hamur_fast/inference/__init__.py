"""Serving: eval-mode folding, the bucketed CUDA-graph :class:`Predictor`, and model export."""
from .export import export_checkpoint, export_model, load_exported
from .folding import fold_for_inference, needs_whole_batch
from .predictor import Predictor

__all__ = ["Predictor", "fold_for_inference", "needs_whole_batch", "export_model", "export_checkpoint",
           "load_exported"]
