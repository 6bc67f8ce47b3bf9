"""Serving: eval-mode folding, the bucketed CUDA-graph :class:`Predictor`, model export, whole-model artifacts."""
from .export import export_checkpoint, export_model, load_exported
from .folding import fold_for_inference, needs_whole_batch
from .predictor import Predictor
from .serving import export_checkpoint_serving, export_serving, load_serving

__all__ = ["Predictor", "fold_for_inference", "needs_whole_batch", "export_model", "export_checkpoint",
           "load_exported", "export_serving", "export_checkpoint_serving", "load_serving"]
