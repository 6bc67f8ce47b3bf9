"""Export a model's eval computation: ``torch.export`` (``.pt2``) and ONNX.

``export_model(model, example_e, example_domain, path, format="pt2" | "onnx")`` writes the folded
eval copy of ``model`` (see :mod:`hamur_fast.inference.folding`; the original is untouched) with a
dynamic batch dimension; ``export_checkpoint(checkpoint, path, format)`` does the same for the model
of a training checkpoint; ``load_exported(path)`` reads a ``.pt2`` back as a module
``(e, domain) -> probabilities``.

- ``pt2``: the graph keeps the model's backend: kernel-backend cells appear as our custom ops
  (``hamur_fast::...``), so loading needs ``import hamur_fast`` (``load_exported`` does it) and the
  same backend available where it is loaded.
- ``onnx``: ONNX cannot carry custom ops, so a model with a ``backend`` switch (every HAMUR model)
  is exported with ``backend="torch"`` (the same math in standard ops). Any other custom op left in
  the graph stops the export with a message naming it. Needs the ``onnx`` and ``onnxscript``
  packages (torch's dynamo-based ONNX exporter).

Loading is safe for files from elsewhere: ``torch.export.load`` falls back to unrestricted unpickling for
the sample inputs and unpickles some weights and objects outright, so a crafted ``.pt2`` could run code.
``load_exported`` reads the archive into memory once, admits only the members ``torch.export.save`` writes
for a plain program (JSON, raw tensor bytes, and a sample-inputs file that must load with
``weights_only=True``), each name once, refuses anything else with a ``ValueError``, and hands torch an
archive rebuilt from the checked members (the sample inputs saved anew), never the file's own bytes.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import json
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .. import _checks
from .folding import fold_for_inference, needs_whole_batch

FORMATS = ("pt2", "onnx")
# Members of a .pt2 archive (below its root folder) that hold no pickle, or one checked with weights_only.
_SAFE_MEMBERS = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                           r"|models/\w+\.json|extra/[\w.]+\.json|data/(weights|constants)/\w+_config\.json"
                           r"|data/weights/weight_\d+|data/constants/tensor_\d+|data/sample_inputs/\w+\.pt)")
# Namespaces of ops every runtime knows; anything else in a graph is a custom op.
_STANDARD_NAMESPACES = ("aten", "prims", "_assert", "higher_order")


def export_model(model: nn.Module, example_e: torch.Tensor, example_domain: torch.Tensor, path,
                 format: str = "pt2") -> Path:
    """Write the folded eval model to ``path`` in ``format``; returns the path written.

    ``example_e`` (B, input_dim) and ``example_domain`` (B,) fix dtypes and device; the batch size is
    exported as dynamic (use B >= 2 in the example: torch.export specialises a size-1 dimension).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    _check_example(model, example_e, example_domain)
    path = Path(path)
    if format == "onnx":
        _require_packages("onnx", "onnxscript")
        model = _with_standard_ops(model)
    program = export_program(model, example_e, example_domain)
    if format == "pt2":
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        _write_bytes(path, buffer.getvalue())
        return path
    custom = custom_ops(program)
    if custom:
        raise ValueError(f"ONNX export cannot carry the custom op(s) {custom}: ONNX runtimes do not know them; "
                         "export format='pt2' instead, or build the model from standard PyTorch ops")
    from ..train.files import atomic_path  # imported here: hamur_fast.train imports this package's users

    with atomic_path(path) as temporary:  # a failed or killed export leaves no half-written file
        torch.onnx.export(program, (example_e, example_domain), str(temporary), dynamo=True,
                          input_names=["e", "domain"], output_names=["probability"], verbose=False)
    return path


def export_checkpoint(checkpoint, path, format: str = "pt2", example_batch: int = 8) -> Path:
    """Export the model of a :mod:`hamur_fast.train` checkpoint (its best weights) to ``path``.

    The exported graph maps the instance embedding ``e`` (B, input_dim) and ``domain`` (B,) to
    probabilities, like :class:`Predictor`; the checkpoint's feature embedding is not part of it.
    Random example inputs of ``example_batch`` rows fix dtypes (the batch size stays dynamic).
    """
    # Imported here: the training stack (data readers, pandas) is needed only to read a checkpoint.
    from ..train import load_trained

    model = load_trained(checkpoint, "cpu")[0].model.core
    example_e = torch.randn(example_batch, model.input_dim)
    example_domain = torch.arange(example_batch) % model.num_domains
    return export_model(model, example_e, example_domain, path, format)


def export_program(model: nn.Module, example_e: torch.Tensor, example_domain: torch.Tensor):
    """``torch.export`` of the folded eval copy of ``model``, batch dimension dynamic."""
    folded = fold_for_inference(model, example_e.device)
    # Released DomainNorm divides by (B - 1): its graph is valid from B = 2 on, and says so.
    batch = torch.export.Dim("batch", min=2 if needs_whole_batch(folded) else 1)
    with torch.no_grad():
        return torch.export.export(folded, (example_e, example_domain),
                                   dynamic_shapes=({0: batch}, {0: batch}))


def load_exported(path, extra_files: dict | None = None) -> nn.Module:
    """Load a ``.pt2`` written by :func:`export_model`: a module ``(e, domain) -> probabilities``.

    Nothing in the file is unpickled beyond tensors: an archive with any other content is refused
    (``ValueError`` naming the member) before torch reads it, and torch reads an archive rebuilt from the
    checked members only (see :func:`_checked_archive`). ``extra_files`` (name -> "") is filled with the text of
    the archive's extra JSON files of those names (a whole-model export's feature map)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no exported model at {path}")
    checked = _checked_archive(path.read_bytes(), path)
    # Importing this module imported hamur_fast, which registered the custom ops the graph may call.
    try:
        program = torch.export.load(io.BytesIO(checked), extra_files=extra_files)
    except Exception as err:  # a damaged graph: torch raises many types
        raise ValueError(f"{path}: not a loadable torch.export program ({type(err).__name__}: "
                         f"{(str(err).splitlines() or [''])[0][:300]})") from None
    return program.module()


def _checked_archive(data: bytes, path: Path) -> bytes:
    """A new archive holding exactly the checked members of ``data``, or a ValueError naming what is refused.

    Load what was checked: every member name must be one ``torch.export.save`` writes for a program of tensors
    and JSON (and appear once: with two members of one name, a checker and a loader may each read another);
    the JSON configs must not ask for pickled objects; the sample inputs (which ``torch.export.load`` unpickles
    without restriction when a restricted load fails) must load with ``weights_only=True`` and are written
    anew from the tensors read. torch then loads the rebuilt archive, never the file's own bytes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        members = {name: archive.read(name) for name in names}  # also checks each header's name and CRC
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a .pt2 archive ({type(err).__name__}: {str(err)[:200]})") from None
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{path}: refused: the archive holds {duplicates[:4]} more than once")
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise ValueError(f"{path}: not a .pt2 archive written by torch.export.save (members outside one folder)")
    inner = {name.split("/", 1)[1]: name for name in names}
    unknown = sorted(name for name in inner if not _SAFE_MEMBERS.fullmatch(name))
    if unknown or not any(name.startswith("models/") for name in inner):
        raise ValueError(f"{path}: refused: the archive holds {unknown[:4] or 'no program'}, which loading would "
                         "unpickle or cannot check; export_model writes only programs of tensors and JSON")
    rebuilt = io.BytesIO()
    with zipfile.ZipFile(rebuilt, "w", zipfile.ZIP_STORED) as out:
        for name, full in inner.items():
            content = members[full]
            if name.endswith("_config.json"):
                _check_config(content, name, path)
            elif name.startswith("data/sample_inputs/"):
                content = _resaved_sample_inputs(content, name, path)
            out.writestr(full, content)
    return rebuilt.getvalue()


def _check_config(content: bytes, name: str, path: Path) -> None:
    try:
        config = json.loads(content).get("config", {})
        pickled = sorted(key for key, entry in config.items() if entry.get("use_pickle")
                         or not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")))
    except (ValueError, AttributeError, TypeError):
        raise ValueError(f"{path}: refused: {name} is not the JSON torch.export.save writes") from None
    if pickled:
        raise ValueError(f"{path}: refused: {name} stores {pickled[:4]} as pickled objects, which loading "
                         "would unpickle")


def _resaved_sample_inputs(content: bytes, name: str, path: Path) -> bytes:
    try:
        inputs = torch.load(io.BytesIO(content), weights_only=True)
    except Exception:
        raise ValueError(f"{path}: refused: its sample inputs ({name}) hold more than tensors, and "
                         "torch.export.load would unpickle them without restriction") from None
    resaved = io.BytesIO()
    torch.save(inputs, resaved)
    return resaved.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomically, its directory created if needed (a killed export leaves no half-written file)."""
    from ..train.files import atomic_path  # imported here: hamur_fast.train imports this package's users

    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def custom_ops(program) -> list[str]:
    """Names of the non-standard ops an exported program calls, e.g. ``['hamur_fast::adapter_fwd']``."""
    names = set()
    for node in program.graph_module.graph.nodes:
        namespace = getattr(node.target, "namespace", None)
        if node.op == "call_function" and namespace and namespace not in _STANDARD_NAMESPACES:
            names.add(str(node.target.name()) if hasattr(node.target, "name") else str(node.target))
    return sorted(names)


def _with_standard_ops(model: nn.Module) -> nn.Module:
    if not hasattr(model, "backend"):
        return model
    portable = copy.deepcopy(model)
    portable.backend = "torch"
    return portable


def _require_packages(*names: str) -> None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs the package(s) {missing} (pip install {' '.join(missing)}); "
                         "format='pt2' needs nothing extra")


def _check_example(model, example_e, example_domain) -> None:
    _checks.check_float("example_e", example_e, 2)
    batch = _checks.check_batch("example_e", example_e)
    if batch < 2:
        raise ValueError("example_e needs at least 2 rows: torch.export would specialise the batch size to 1")
    input_dim = getattr(model, "input_dim", None)
    if input_dim is not None and example_e.shape[1] != input_dim:
        raise ValueError(f"example_e must have shape (B, {input_dim}), got {tuple(example_e.shape)}")
    _checks.check_domain(example_domain, batch, getattr(model, "num_domains", None))
