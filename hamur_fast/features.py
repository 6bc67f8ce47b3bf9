"""The feature stage: a batch of ids and dense values -> the instance embedding ``e`` (SPEC section 1).

``e`` = the embeddings of every sparse field (the domain indicator's own embedding included) concatenated,
then the scaled dense features appended, so the dense values are the last ``num_dense`` columns (where the
Wide & Deep backbone reads its wide input).
"""
from __future__ import annotations

import torch
from torch import nn

from . import _checks, models
from .data import Batch, FeatureMap

WIDE_DEEP_MODELS = {"wide_deep", "hamur_wide_deep"}


class FeatureEmbedding(nn.Module):
    """One embedding table per sparse field (row 0 is the shared "unseen value" row)."""

    def __init__(self, feature_map: FeatureMap, embed_dim: int = 16):
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.fields = feature_map.sparse_fields
        self.tables = nn.ModuleList(nn.Embedding(size, embed_dim) for size in feature_map.vocab_sizes)
        for table in self.tables:
            # The released examples (torch-rechub) draw embeddings from N(0, 1e-4^2).
            nn.init.normal_(table.weight, std=1e-4)
        self.output_dim = len(self.tables) * embed_dim + feature_map.num_dense

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        columns = [table(sparse[:, i]) for i, table in enumerate(self.tables)]
        return torch.cat([*columns, dense.to(columns[0].dtype if columns else dense.dtype)], dim=1)


class CTRModel(nn.Module):
    """Features then a zoo model: ``forward(batch) -> click probabilities (B,)``, ``logits(batch)``.

    ``core`` is any model mapping ``(e, domain) -> probabilities`` with a ``.logits(e, domain)`` method
    (every model of :func:`hamur_fast.models.build`); its ``input_dim`` must be ``features.output_dim``.
    """

    def __init__(self, feature_map: FeatureMap, core: nn.Module, embed_dim: int = 16, features: nn.Module | None = None):
        super().__init__()
        # ``features``: another feature stage with the same output, e.g. hamur_fast.features_torchrec's.
        self.features = FeatureEmbedding(feature_map, embed_dim) if features is None else features
        self.core = core
        self.num_domains = feature_map.num_domains

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.core.logits(self.features(batch.sparse, batch.dense), batch.domain)

    def forward(self, batch: Batch) -> torch.Tensor:
        return torch.sigmoid(self.logits(batch))


def embedding_width(feature_map: FeatureMap, embed_dim: int) -> int:
    return len(feature_map.sparse_fields) * embed_dim + feature_map.num_dense


def check_model_section(model_config: dict) -> tuple:
    """``(name, embed_dim, the zoo model's keywords)`` of a model section, every name, keyword and range checked
    (a ValueError naming the option) without building anything: what a run checks before reading its data."""
    options = dict(model_config)
    name = options.pop("name", None)
    if name is None:
        raise ValueError(f"the model section needs a name; available: {', '.join(models.available())}")
    embed_dim = options.pop("embed_dim", 16)
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"model.embed_dim must be a whole number >= 1, got {_checks.shown(embed_dim)}")
    models.registry.check_arguments(name, options)
    return name, embed_dim, options


def build_ctr_model(feature_map: FeatureMap, model_config: dict) -> CTRModel:
    """A :class:`CTRModel` from a config's ``model:`` section: ``name``, ``embed_dim`` (16) and the zoo
    model's own keyword arguments. Wide & Deep models read the dense features as their wide input."""
    name, embed_dim, options = check_model_section(model_config)
    if name in WIDE_DEEP_MODELS:
        options.setdefault("wide_dim", feature_map.num_dense)
    core = models.build(name, embedding_width(feature_map, embed_dim), feature_map.num_domains, **options)
    return CTRModel(feature_map, core, embed_dim)
