"""Serving the whole CTR model: rows in the training data's raw layout -> click probabilities, one artifact.

Design. Strings never enter the graph: ``torch.export`` and AOTInductor compile tensor programs, and a
vocabulary lookup of text is neither fast nor portable there. So serving has two steps:

1. **Encoding** (outside the graph, documented and shared by Python and C++): each sparse column's value
   becomes its vocabulary id (position in the training vocabulary + 1; id 0 is the reserved "unseen" id),
   the domain column's value becomes its domain id through the domain mapping, dense columns pass as raw
   numbers. Python does it with the checkpoint's own :class:`~hamur_fast.data.FeatureMap` (exactly what
   ``hamur-fast predict --checkpoint`` does); ``examples/serve_cpp`` does it from the same JSON.
2. **The graph** ``(ids (B, S) int64, dense (B, Dn) float32, domain (B,) int64) -> probabilities (B,)``:
   an id outside a column's vocabulary becomes the unseen id (so no input can index outside a table), the
   domain indicator field (domain id + 1) is appended where the schema has one, every field's embedding is
   gathered, the dense values are min-max scaled with the training ranges, and the folded eval model
   (:mod:`hamur_fast.inference.folding`) scores the rows. The scaling and the embeddings are thus inside
   the artifact, the vocabularies beside the graph in the same file.

The feature map travels as one JSON document (:func:`serving_json`: the checkpoint's ``FeatureMap.to_dict()``
plus the graph's input layout), stored inside the artifact: as the extra file ``hamur_fast_serving.json``
of a ``.pt2`` (``torch.export.save(extra_files=...)``) and as the metadata entry ``hamur_fast.serving`` of
an AOTInductor package (``aot_inductor.metadata``; C++ reads it with ``AOTIModelPackageLoader::get_metadata``).
``S`` counts the schema's sparse columns in schema order, ``Dn`` its dense columns.

Formats: ``pt2`` (an ``ExportedProgram``, loaded safely by :func:`~hamur_fast.inference.load_exported`) and
``aoti`` (an AOTInductor package: compiled C++ in a zip, loaded by ``torch._inductor.aoti_load_package`` or
``torch::inductor::AOTIModelPackageLoader``; loading it runs native code, so load only packages you built
or trust). Both are exported with ``backend="torch"``: eval is row-independent in paper mode and folds to
plain ATen ops, so no hamur_fast custom op is left in the graph and a runner needs only libtorch. For the
CPU, a paper-mode HAMUR-MLP is exported in the domain-sorted form of :mod:`hamur_fast.inference.domain_sorted`
(one GEMM per domain and layer on that domain's rows, not every domain's weights against every row).
Released mode standardises DomainNorm over the whole batch even in eval: it exports to ``pt2`` (valid from
B = 2 rows) but is refused for ``aoti``, whose packages are meant for per-row serving.
"""
from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .export import _write_bytes, custom_ops, load_exported
from .domain_sorted import domain_sorted
from .folding import fold_for_inference, needs_whole_batch

SERVING_FORMATS = ("pt2", "aoti")
SERVING_FILE = "hamur_fast_serving.json"  # extra file of a .pt2
SERVING_METADATA = "hamur_fast.serving"  # metadata key of an AOTInductor package


class ServingModel(nn.Module):
    """``(ids, dense, domain) -> probabilities``: embeddings, dense scaling and the folded model in one graph.

    ``features`` is the checkpoint's :class:`~hamur_fast.features.FeatureEmbedding`; ``core`` the (folded)
    zoo model. The tables are concatenated into one, so all fields' rows come from one gather.
    """

    def __init__(self, feature_map, features: nn.Module, core: nn.Module):
        super().__init__()
        tables = getattr(features, "tables", None)
        if tables is None or len(tables) != len(feature_map.sparse_fields):
            raise ValueError("serving exports need the built-in FeatureEmbedding feature stage (one table per "
                             f"sparse field); got {type(features).__name__}")
        sizes = torch.tensor([t.num_embeddings for t in tables])
        self.schema_fields = len(feature_map.schema.sparse)
        self.domain_indicator = not feature_map.schema.domain_is_sparse
        self.register_buffer("table", torch.cat([t.weight.detach() for t in tables]).clone())
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes)
        self.register_buffer("sizes", sizes[:self.schema_fields].clone())
        low, high = (torch.tensor([feature_map.dense_ranges[c][i] for c in feature_map.schema.dense],
                                  dtype=torch.float32) for i in (0, 1))
        self.register_buffer("low", low)
        # The same expression as FeatureMap._scale, so the scaled values are bit-for-bit those of training.
        self.register_buffer("span", torch.where(high > low, high - low, torch.ones_like(low)))
        self.core = core

    def forward(self, ids: torch.Tensor, dense: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return self.core(self.embed(ids, dense, domain), domain)

    def embed(self, ids: torch.Tensor, dense: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """The instance embedding ``e`` (B, input_dim), as the checkpoint's FeatureEmbedding makes it."""
        ids = torch.where((ids >= 0) & (ids < self.sizes), ids, torch.zeros_like(ids))
        if self.domain_indicator:
            ids = torch.cat([ids, (domain + 1).unsqueeze(1)], dim=1)
        rows = self.table[ids + self.offsets]  # (B, fields, embed_dim)
        scaled = (dense.to(self.table.dtype) - self.low) / self.span
        return torch.cat([rows.flatten(1), scaled], dim=1)


def serving_model(ctr_model: nn.Module, feature_map, device="cpu") -> ServingModel:
    """The eval :class:`ServingModel` of a :class:`~hamur_fast.features.CTRModel` (left untouched), in standard
    ops (``backend="torch"`` where the model has a backend switch) and folded; on the CPU, a paper-mode HAMUR-MLP
    is written with its rows sorted by domain (:mod:`hamur_fast.inference.domain_sorted`; on a GPU that form
    would read the segment sizes back to the host on every call)."""
    core = copy.deepcopy(ctr_model.core)
    for module in core.modules():
        if hasattr(module, "backend"):
            module.backend = "torch"
    features = copy.deepcopy(ctr_model.features).to(device)
    folded = fold_for_inference(core, device).eval()
    if torch.device(device).type == "cpu":
        folded = domain_sorted(folded) or folded
    return ServingModel(feature_map, features, folded).eval()


def serving_json(feature_map, device="cpu") -> str:
    """The one JSON document an artifact carries: the feature map, the graph's inputs and its device."""
    return json.dumps({
        "format": 1,
        "device": torch.device(device).type,
        "feature_map": feature_map.to_dict(),
        "inputs": {"ids": list(feature_map.schema.sparse), "dense": list(feature_map.schema.dense),
                   "domain": feature_map.schema.domain},
        "unseen_id": 0,
    }, ensure_ascii=False)


def example_inputs(feature_map, batch: int = 8, device="cpu"):
    """Valid inputs of ``batch`` rows (every domain, unseen ids included) that fix the graph's dtypes."""
    ids = torch.arange(batch * len(feature_map.schema.sparse), device=device).view(batch, -1) % 2
    dense = torch.zeros(batch, feature_map.num_dense, device=device)
    domain = torch.arange(batch, device=device) % feature_map.num_domains
    return ids, dense, domain


def export_serving(ctr_model: nn.Module, feature_map, path, format: str = "pt2", device="cpu") -> Path:
    """Write the whole CTR model (raw ids and dense values -> probabilities) with its feature map to ``path``.

    ``device``: where the artifact computes (an AOTInductor package is compiled for it: ``cuda`` on a GPU)."""
    if format not in SERVING_FORMATS:
        raise ValueError(f"format must be one of {SERVING_FORMATS} for a whole-model export, got {format!r}")
    model = serving_model(ctr_model, feature_map, device)
    if format == "aoti" and needs_whole_batch(model):
        raise ValueError("an AOTInductor package serves rows independently, but this model standardises over "
                         "the whole batch in eval (released-mode DomainNorm): export it as pt2, or use mode=paper")
    program = _export(model, feature_map, device)
    leftover = custom_ops(program)
    if leftover:  # backend="torch" should leave none; a zoo model with its own op would need its library
        raise ValueError(f"the graph still calls the custom op(s) {leftover}; serving artifacts take standard ops")
    path = Path(path)
    document = serving_json(feature_map, device)
    if format == "pt2":
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={SERVING_FILE: document})
        _write_bytes(path, buffer.getvalue())
    else:
        _compile_package(program, path, document)
    return path


def _export(model: ServingModel, feature_map, device):
    batch = torch.export.Dim("batch", min=2 if needs_whole_batch(model) else 1)
    with torch.no_grad():
        return torch.export.export(model, example_inputs(feature_map, device=device),
                                   dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))


def _compile_package(program, path: Path, document: str) -> None:
    """AOTInductor package at ``path``, written to a temporary name first (a killed compile leaves no file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(handle)
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=temporary,
            inductor_configs={"aot_inductor.metadata": {SERVING_METADATA: document}})
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def export_checkpoint_serving(checkpoint, path, format: str = "pt2", device="cpu") -> Path:
    """:func:`export_serving` of a training checkpoint's best weights and feature map."""
    from ..train import load_trained  # the training stack is needed only to read a checkpoint

    trainer, _ = load_trained(checkpoint, "cpu")
    return export_serving(trainer.model, trainer.feature_map, path, format, device)


class ServedModel:
    """A loaded serving artifact: ``predict_frame(frame)`` / ``predict_file(path)`` score raw rows,
    ``__call__(ids, dense, domain)`` scores encoded ones; ``feature_map`` is the artifact's.

    Thread-safe: the feature map is only read, and both runtimes may be called from several threads.
    """

    def __init__(self, run, feature_map, kind: str, device: str):
        self._run, self.feature_map, self.kind, self.device = run, feature_map, kind, torch.device(device)

    def __call__(self, ids: torch.Tensor, dense: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Probabilities (B,), on the artifact's device, of encoded rows (moved there if need be)."""
        with torch.inference_mode():
            return self._run(ids.to(self.device, torch.int64).contiguous(),
                             dense.to(self.device, torch.float32).contiguous(),
                             domain.to(self.device, torch.int64).contiguous())

    def predict_frame(self, frame, where="input") -> torch.Tensor:
        """Probabilities of the rows of a frame in the training data's raw layout (label optional)."""
        return self(*self.encode(frame, where)[:3])

    def encode(self, frame, where="input"):
        """``(ids, dense, domain, split)``: the graph's inputs for a raw frame, and its encoded split."""
        return encode_frame(self.feature_map, frame, where)

    def predict_file(self, path):
        """``(raw frame, domain ids, probabilities)`` for a CSV/Parquet file in the training data's raw layout."""
        from ..data import read_prediction_input

        frame, split = read_prediction_input(path, self.feature_map, scale=False)
        return frame, split.domain, self(*encode_split(split, self.feature_map))


def encode_frame(feature_map, frame, where="input"):
    """The encoding step in Python: ``(ids, dense, domain, split)`` for a frame in the raw layout."""
    from ..data.load import PREPARE

    if feature_map.prepare is not None:
        frame = PREPARE[feature_map.prepare](frame)
    with_label = feature_map.schema.label in frame.columns
    split = feature_map.transform(frame, where, with_label=with_label, scale=False)
    return (*encode_split(split, feature_map), split)


def encode_split(split, feature_map):
    """The graph's inputs from a split encoded with ``scale=False``."""
    fields = len(feature_map.schema.sparse)
    return split.sparse[:, :fields].to(torch.int64), split.dense, split.domain.to(torch.int64)


def load_serving(path, runners: int = 1) -> ServedModel:
    """Load a whole-model artifact written by :func:`export_serving`, ``.pt2`` or AOTInductor package.

    ``runners``: how many calls of an AOTInductor package may run at once (each runner holds its own
    activation buffers; further concurrent callers wait for one). A ``.pt2`` program has no such limit."""
    from torch._inductor.package import load_package

    from ..data import FeatureMap

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no serving artifact at {path}")
    if int(runners) < 1:
        raise ValueError(f"runners must be >= 1, got {runners}")
    if _is_aoti_package(path):
        compiled = load_package(str(path), "model", num_runners=int(runners))
        document = compiled.get_metadata().get(SERVING_METADATA)
        if document is None:
            raise ValueError(f"{path}: an AOTInductor package without a {SERVING_METADATA!r} entry: not written by "
                             "hamur-fast export (whole model)")
        loader = compiled.loader
        # The loader's own entry: AOTICompiledModel.__call__ re-parses the call spec (JSON) on every call.
        run, kind = (lambda ids, dense, domain: loader.boxed_run([ids, dense, domain])[0]), "aoti"
    else:
        extra = {SERVING_FILE: ""}
        module = load_exported(path, extra_files=extra)
        if not extra[SERVING_FILE]:
            raise ValueError(f"{path}: a .pt2 without {SERVING_FILE}: an embedded-input export ((e, domain) -> "
                             "probabilities; load it with load_exported), not a whole-model one")
        run, kind, document = module, "pt2", extra[SERVING_FILE]
    content = json.loads(document)
    return ServedModel(run, FeatureMap.from_dict(content["feature_map"]), kind, content.get("device", "cpu"))


def _is_aoti_package(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a serving artifact (not a zip file)") from None
