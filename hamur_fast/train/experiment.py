"""Runs described by a config (YAML sections ``data``, ``model``, ``train``, ``output``, optional
``compare`` and ``sweep``): one training run, several models x seeds, one parameter swept over values."""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import _checks, _yaml
from . import report
from ..data import FeatureMap, MultiDomainData, check_data_section, load_dataset
from ..features import build_ctr_model, check_model_section
from .checkpoint import CheckpointError, check_weights, load_checkpoint
from .files import locked_directory, write_json, write_text
from .trainer import CHECKPOINT_NAME, MAX_SEED, TrainConfig, Trainer, require_both_classes, resolve_device

DEFAULT_DATA = {"kind": "synthetic"}
DEFAULT_MODEL = {"name": "hamur_mlp"}
# The HAMUR family shares the constructor arguments a base model section may set for all of them.
HAMUR_FAMILY = {"hamur_mlp", "hamur_dcn", "hamur_wide_deep", "mlp", "dcn", "wide_deep"}
FAMILY_KEYS = ("preset", "backend")
# Short names for swept parameters: name -> (config path, how a value is written there).
SWEEP_ALIASES = {"k": ("model.rank", int), "rank": ("model.rank", int),
                 "hyper_width": ("model.hyper_dims", lambda v: [int(v)]),
                 "hyper": ("model.hyper", str), "norm": ("model.norm", str)}
SECTIONS = ("data", "model", "train", "output", "compare", "sweep")
# Data-section entries that name files: recorded as absolute paths, so a checkpoint resumes from anywhere.
DATA_PATH_KEYS = ("path", "train", "val", "test", "schema")
# What --resume may change: how long and where the run goes on, and where its data now lie (checked against
# the data fingerprint). Everything else would make it a different run.
RESUME_OVERRIDES = ("train.epochs", "train.patience", "train.device", "train.threads", "train.progress",
                    "train.eval_batch_size", "train.pin_memory", *(f"data.{key}" for key in DATA_PATH_KEYS))


# ---------------------------------------------------------------------------- configs
def load_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        config = _yaml.load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid YAML file: {_first_line(err)}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config is a YAML mapping with data/model/train sections")
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}")
    for section in ("data", "model", "train", "compare", "sweep"):
        if not isinstance(config.get(section, {}), dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping of key: value")
    return config


def set_path(config: dict, dotted: str, value) -> dict:
    """A copy of ``config`` with ``value`` at ``a.b.c`` (sections created as needed)."""
    config = copy.deepcopy(config)
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {key} is not a section")
    node[leaf] = value
    return config


def parse_override(assignment: str) -> tuple:
    """``"train.lr=1e-3"`` -> ("train.lr", 0.001): the value is read as YAML (numbers, lists, true/false)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {assignment!r} must look like section.key=value")
    parts = key.split(".")
    if parts[0] not in SECTIONS or any(not part for part in parts) or (len(parts) < 2) != (parts[0] == "output"):
        raise ValueError(f"override {assignment!r}: the key must be section.key with a section among "
                         f"{list(SECTIONS)} (or just output=DIR)")
    try:
        return key, _yaml.load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"override {_checks.shown(assignment)}: the value is not valid YAML "
                         f"({_first_line(err)[:200]})") from None


def apply_overrides(config: dict, assignments: list) -> dict:
    """``["train.epochs=3", "model.rank=16"]``: each value is read as YAML (numbers, lists, true/false)."""
    for assignment in assignments:
        config = set_path(config, *parse_override(assignment))
    return config


def split_values(text: str) -> list:
    """``"8,16,35"`` -> [8, 16, 35]; commas inside brackets stay (``"[32],[64,32]"`` -> [[32], [64, 32]])."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [_yaml.load(v.strip()) for v in values if v.strip()]


def parse_seeds(text: str) -> list:
    """``"1,2,3"`` -> [1, 2, 3]; anything but whole numbers in [0, 2**63) is a ValueError."""
    seeds = split_values(str(text))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds are whole numbers >= 0 separated by commas, e.g. 1,2,3; got {_checks.shown(text)}")
    return seeds


# ---------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    label: str
    seed: int
    test: dict
    history: list
    best_epoch: int
    seconds: float
    run_dir: Path | None


def train_run(config: dict, data: MultiDomainData | None = None, run_dir=None, label: str = "",
              progress: bool = True, warn_replace: bool = True, trainer_class=Trainer,
              standalone: bool = True) -> RunResult:
    """Train one model as configured and evaluate it on the test split (best weights by val AUC).

    ``run_dir`` is locked for the run and checked for writing before the data are read; an earlier run's files
    there are replaced (with a warning, unless ``warn_replace`` is off). The run reports itself
    (:mod:`hamur_fast.train.report`); ``standalone`` off (one run of a compare or sweep, which describe the
    data once and print one table) leaves out its data summary and test table."""
    train_config = replace(TrainConfig.from_dict(config.get("train", {})), progress=progress)
    model_config = model_section_of(config)
    check_model_section(model_config)  # a bad model option fails before the data are read
    # Data handed over without a data section is recorded as unknown (None), never as the default.
    data_config = absolute_paths(config.get("data", None if data is not None else DEFAULT_DATA))
    with _run_directory(run_dir):
        if warn_replace and run_dir is not None and (Path(run_dir) / CHECKPOINT_NAME).exists():
            warnings.warn(f"{run_dir} holds an earlier run: its checkpoint and metrics are replaced by this one's",
                          stacklevel=2)
        data = data or load_dataset(data_config)
        require_both_classes(data.test, "test")
        torch.manual_seed(train_config.seed)  # model initialisation
        model = build_ctr_model(data.feature_map, model_config)
        trainer = trainer_class(model, train_config, data.feature_map, run_dir,
                                {"data": data_config, "model": model_config})
        return _fit_and_test(trainer, data, label or model_config["name"], trainer.run_dir, standalone)


def model_section_of(config: dict) -> dict:
    """The config's model section, the default model's name filled in when it names none (a section holding
    only ``embed_dim``, say, still trains the default model)."""
    return {**DEFAULT_MODEL, **(config.get("model") or {})}


def absolute_paths(data_config: dict | None) -> dict | None:
    """The data section with its file entries made absolute (relative to the current directory)."""
    if not data_config:
        return data_config
    resolved = dict(data_config)
    for key in DATA_PATH_KEYS:
        if isinstance(resolved.get(key), (str, Path)):
            resolved[key] = str(Path(resolved[key]).expanduser().resolve())
    return resolved


def _run_directory(run_dir):
    return locked_directory(run_dir) if run_dir is not None else contextlib.nullcontext()


def recorded_data(payload: dict, checkpoint_path) -> dict:
    """The data section a checkpoint's run was trained on."""
    data_config = payload["config"].get("data")
    if not data_config:
        raise ValueError(f"{checkpoint_path} does not record its data (the run was given data without a data "
                         "section); pass the data section explicitly")
    return data_config


def load_trained(checkpoint_path, device: str | None = None, threads: int | None = None):
    """``(trainer, payload)`` with the checkpoint's best weights, its feature map and its config."""
    payload = load_checkpoint(checkpoint_path)
    if device is not None:
        resolve_device(device)  # a device that is not there is the caller's error, not the checkpoint's
    options = {"progress": False, **({"device": device} if device else {}), **({"threads": threads} if threads else {})}
    trainer = _trainer_from(payload, checkpoint_path, options)
    check_weights(payload["best_model"], trainer.model, f"{checkpoint_path}: its weights")
    try:
        trainer.model.load_state_dict(payload["best_model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint_path}: its weights do not fit the model its config describes "
                              f"({_first_line(err)})") from None
    return trainer, payload


def _trainer_from(payload: dict, checkpoint_path, options: dict, run_dir=None, trainer_class=Trainer) -> Trainer:
    """A Trainer for the checkpoint's model, feature map and train settings (``options`` override them)."""
    config = payload["config"]
    try:
        feature_map = FeatureMap.from_dict(payload["feature_map"])
        train_config = TrainConfig.from_dict({**config["train"], **options})
        model = build_ctr_model(feature_map, checkpoint_model_section(payload))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{checkpoint_path}: its config does not describe a model this hamur_fast can "
                              f"build ({_first_line(err)})") from None
    return trainer_class(model, train_config, feature_map, run_dir,
                         {"data": config.get("data"), "model": config["model"]})


def checkpoint_model_section(payload: dict) -> dict:
    """The model section that rebuilds a checkpoint's model. Paper-mode MLP towers had per-domain
    statistics before ``tower_norm`` existed: a checkpoint that records no tower_norm but holds their
    buffers (``DomainBatchNorm1d.num_batches_tracked`` in the first tower layer) gets ``tower_norm="domain"``."""
    section = dict(payload["config"]["model"])
    per_domain_towers = any(key.endswith("backbone.norms.0.num_batches_tracked") for key in payload["best_model"])
    if per_domain_towers and "tower_norm" not in section and section.get("mode", "paper") == "paper":
        section["tower_norm"] = "domain"
    return section


def resume_changes(overrides: list, epochs: int | None = None) -> dict:
    """The ``--set`` changes of a resume (and ``--epochs``), ``{"section.key": value}``; a ValueError for a key
    outside :data:`RESUME_OVERRIDES`."""
    changes = dict(parse_override(assignment) for assignment in overrides)
    if epochs:
        changes["train.epochs"] = epochs
    refused = sorted(key for key in changes if key not in RESUME_OVERRIDES)
    if refused:
        raise ValueError(f"--resume continues a run with its recorded settings, so {refused} cannot change "
                         f"(allowed: {', '.join(RESUME_OVERRIDES)}); start a new run to change them")
    return changes


def with_data_changes(data_config: dict | None, changes: dict) -> dict | None:
    """A recorded data section with a resume's ``data.*`` changes (moved files) applied, paths absolute."""
    return absolute_paths({**(data_config or {}),
                           **{key.split(".", 1)[1]: v for key, v in changes.items() if key.startswith("data.")}})


def check_resume(checkpoint_path, overrides: list, epochs: int | None = None) -> None:
    """What a resume refuses before anything starts (before the workers of a data-parallel run): its changes,
    the checkpoint, its train settings with the changes, its model section and its data section."""
    changes = resume_changes(overrides, epochs)
    payload = load_checkpoint(checkpoint_path)
    train_changes = {key.split(".", 1)[1]: value for key, value in changes.items() if key.startswith("train.")}
    TrainConfig.from_dict({**payload["config"]["train"], **train_changes})
    check_model_section(checkpoint_model_section(payload))
    check_data_section(with_data_changes(recorded_data(payload, checkpoint_path), changes))


def check_run(config: dict) -> None:
    """What a new run refuses before anything starts: its train settings, model section and data section."""
    TrainConfig.from_dict(config.get("train", {}))
    check_model_section(model_section_of(config))
    check_data_section(absolute_paths(config.get("data", DEFAULT_DATA)))


def resume_run(checkpoint_path, data: MultiDomainData | None = None, epochs: int | None = None,
               progress: bool = True, overrides: list = (), run_dir=None, trainer_class=Trainer) -> RunResult:
    """Continue the run that wrote ``checkpoint_path`` from its last epoch, to its configured end (or
    ``epochs``). ``overrides`` (``section.key=value``) may change only :data:`RESUME_OVERRIDES`: anything else
    raises ``ValueError`` (a new run is the way to change it). ``run_dir``: continue into another directory,
    leaving the checkpoint's own untouched (by default the run goes on where it was)."""
    changes = resume_changes(overrides, epochs)
    payload = load_checkpoint(checkpoint_path)
    config = payload["config"]
    train_changes = {key.split(".", 1)[1]: value for key, value in changes.items() if key.startswith("train.")}
    data_config = with_data_changes(recorded_data(payload, checkpoint_path) if data is None else config.get("data"),
                                    changes)
    if "train.device" in changes:
        resolve_device(str(changes["train.device"]))
    run_dir = Path(run_dir) if run_dir is not None else Path(checkpoint_path).parent
    trainer = _trainer_from(payload, checkpoint_path, {**train_changes, "progress": progress}, run_dir,
                            trainer_class)
    with _run_directory(trainer.run_dir):  # None on the ranks of a data-parallel run that write nothing
        trainer.run_config["data"] = data_config or None
        trainer.restore(payload)
        data = data or load_dataset(data_config, feature_map=trainer.feature_map)
        return _fit_and_test(trainer, data, config["model"]["name"], trainer.run_dir)


def _fit_and_test(trainer: Trainer, data: MultiDomainData, label: str, run_dir, standalone: bool = True) -> RunResult:
    started = time.perf_counter()
    with report.run_log(run_dir):
        if standalone:
            report.log.info(report.data_summary(data, trainer.config.min_domain_rows))
        history = trainer.fit(data)
        test = trainer.evaluate(data.test)
        if run_dir is not None:
            write_json(Path(run_dir) / "test_metrics.json", test)
        if standalone:
            title = f"test metrics ({label}, best epoch {trainer.best_epoch})"
            report.log.log(report.RESULT, "\n" + report.metrics_table(test, title, trainer.config.min_domain_rows))
    return RunResult(label, trainer.config.seed, test, history, trainer.best_epoch, time.perf_counter() - started,
                     None if run_dir is None else Path(run_dir))


# ---------------------------------------------------------------------------- several runs
def model_section(entry, base: dict) -> tuple:
    """``(label, model section)`` from a compare entry: ``"name"``, ``"name:key=value:..."`` or a dict
    ``{label, name, ...}``. Entries inherit ``embed_dim`` from the base model section, and HAMUR-family
    entries its ``preset`` and ``backend`` too."""
    if isinstance(entry, dict):
        section = dict(entry)
        label = section.pop("label", section.get("name"))
        # A label names the run's folder: text, and not "." or ".." (which would point outside it).
        if not isinstance(label, str) or not label.strip() or set(label) <= {"."}:
            raise ValueError(f"a compare label is a name such as 'released_k16', got {_checks.shown(label)}")
    else:
        name, *assignments = str(entry).split(":")
        section = {"name": name}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ValueError(f"model entry {entry!r}: expected name:key=value")
            section[key] = _yaml.load(raw)
        label = str(entry)
    inherited = ["embed_dim", *(FAMILY_KEYS if section.get("name") in HAMUR_FAMILY else ())]
    for key in inherited:
        if key in base and key not in section:
            section[key] = base[key]
    return label, section


def summarize(results: list) -> dict:
    """metric -> (mean, sample std) over runs; std is 0 for a single run."""
    keys = [k for k in results[0].test if k.startswith(("auc", "logloss"))]
    summary = {}
    for key in keys:
        values = np.array([r.test[key] for r in results], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if len(finite) else math.nan
        std = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
        summary[key] = (mean, std)
    summary["runs"] = (float(len(results)), 0.0)
    summary["best_epoch"] = (float(np.mean([r.best_epoch for r in results])), 0.0)
    summary["seconds"] = (float(np.mean([r.seconds for r in results])), 0.0)
    # Training throughput: each run's mean over its epochs, then the mean over runs.
    summary["rows_per_s"] = (float(np.mean([np.mean([row["rows_per_s"] for row in r.history]) for r in results])), 0.0)
    return summary


def domain_labels(feature_map: FeatureMap) -> list:
    return [f"d{d} ({name})" for d, name in enumerate(feature_map.domain_names())]


def format_table(summary_by_row: dict, labels: list, first_column: str = "model") -> str:
    """Markdown table: one row per model (or value), test AUC overall and per domain as mean ± std
    (the mean alone when there was one run)."""
    header = [first_column, "overall AUC", *[f"AUC {label}" for label in labels], "overall logloss",
              "best epoch", "s/run", "train rows/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, stats in summary_by_row.items():
        spread = stats["runs"][0] > 1
        cells = [str(row), *[_cell(stats[key], spread) for key in ["auc", *[f"auc_d{d}" for d in range(len(labels))],
                                                                     "logloss"]],
                 f"{stats['best_epoch'][0]:.1f}", f"{stats['seconds'][0]:.0f}", f"{stats['rows_per_s'][0]:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Above report.MANY_DOMAINS a table summarises them (worst, median, best, rare) and the full per-domain table
# goes to a file of its own: 50 AUC columns help nobody.
def format_domain_summary(summary_by_row: dict, train_counts: list, first_column: str = "model") -> str:
    """Markdown table for many domains: per row, test AUC overall, of its worst, median and best domain
    (domain named), and the mean over the rare domains; domains without an AUC (too few test rows or one
    class) are left out, and the last column counts them."""
    rare = report.rare_domains(train_counts)
    header = [first_column, "overall AUC", "worst domain", "median domain", "best domain",
              f"rare domains ({len(rare)}, <= {max(train_counts[d] for d in rare):,} train rows)",
              "overall logloss", "best epoch", "s/run", "domains n/a"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, stats in summary_by_row.items():
        per_domain = {d: stats[f"auc_d{d}"][0] for d in range(len(train_counts))}
        ranked = sorted((auc, d) for d, auc in per_domain.items() if math.isfinite(auc))
        rare_aucs = [per_domain[d] for d in rare if math.isfinite(per_domain[d])]
        picks = [ranked[0], ranked[len(ranked) // 2], ranked[-1]] if ranked else []
        cells = [str(row), _cell(stats["auc"], stats["runs"][0] > 1),
                 *([f"{auc:.4f} (d{d})" for auc, d in picks] or ["n/a"] * 3),
                 f"{np.mean(rare_aucs):.4f}" if rare_aucs else "n/a",
                 _cell(stats["logloss"], stats["runs"][0] > 1),
                 f"{stats['best_epoch'][0]:.1f}", f"{stats['seconds'][0]:.0f}", str(len(per_domain) - len(ranked))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_domain_table(summary_by_row: dict, labels: list, train_counts: list) -> str:
    """The full per-domain table the other way round: one line per domain, one AUC column per model."""
    header = ["domain", "train rows", *[f"AUC {row}" for row in summary_by_row]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d, label in enumerate(labels):
        cells = [label, f"{train_counts[d]:,}",
                 *[_cell(stats[f"auc_d{d}"], stats["runs"][0] > 1) for stats in summary_by_row.values()]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(stat: tuple, spread: bool) -> str:
    mean, std = stat
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if spread else f"{mean:.4f}"


def compare(config: dict, models: list, seeds: list, output, progress: bool = True, log=print) -> dict:
    """Train every model with every seed on one data load; writes ``compare.md``, ``compare.json`` and
    ``compare_domain_auc.png`` under ``output`` and returns label -> summary."""
    output = Path(output)
    with locked_directory(output):
        return _compare(config, models, seeds, output, progress, log)


def _compare(config: dict, models: list, seeds: list, output: Path, progress: bool, log) -> dict:
    data = load_dataset(absolute_paths(config.get("data", DEFAULT_DATA)))
    log(report.data_summary(data, _min_domain_rows(config)))
    labels = domain_labels(data.feature_map)
    summaries, raw = {}, {}
    for entry in models:
        label, section = model_section(entry, config.get("model", {}))
        results = _seed_runs({**config, "model": section}, seeds, data, output / "runs" / _slug(label), label,
                             progress, log)
        summaries[label] = summarize(results)
        raw[label] = [{"seed": r.seed, "best_epoch": r.best_epoch, **r.test} for r in results]
    train_counts = data.train.domain_counts(len(labels))
    from .plots import plot_domain_auc, plot_domain_auc_by_size
    title = f"test AUC per domain, mean ± std over {len(seeds)} seed(s)"
    if len(labels) > report.MANY_DOMAINS:
        table = format_domain_summary(summaries, train_counts)
        write_text(output / "compare_domains.md", format_domain_table(summaries, labels, train_counts) + "\n")
        plot_domain_auc_by_size(summaries, train_counts, output / "compare_domain_auc.png",
                                f"test AUC per domain, mean over {len(seeds)} seed(s)")
    else:
        table = format_table(summaries, labels)
        plot_domain_auc(summaries, labels, output / "compare_domain_auc.png", title)
    write_text(output / "compare.md", table + "\n")
    write_json(output / "compare.json", {"domains": labels, "train_rows": train_counts, "seeds": list(seeds),
                                         "runs": raw, "summary": _json_summaries(summaries)})
    return {"table": table, "summary": summaries, "domains": labels}


def _seed_runs(config: dict, seeds: list, data, runs_dir: Path, label: str, progress: bool, log) -> list:
    """One run of ``config`` per seed, each in ``runs_dir / seed<seed>``, logged as it ends."""
    results = []
    for seed in seeds:
        result = train_run(set_path(config, "train.seed", int(seed)), data, runs_dir / f"seed{seed}", label,
                           progress, warn_replace=False, standalone=False)
        log(f"{label} seed {seed}: test AUC {result.test['auc']:.4f} "
            f"(best epoch {result.best_epoch}, {result.seconds:.0f} s)")
        results.append(result)
    return results


def sweep(config: dict, param: str, values: list, seeds: list, output, progress: bool = True, log=print) -> dict:
    """One run per value of ``param`` (and per seed); writes ``sweep_<param>.md/.json/.png`` under ``output``."""
    output = Path(output)
    with locked_directory(output):
        return _sweep(config, param, values, seeds, output, progress, log)


def _sweep(config: dict, param: str, values: list, seeds: list, output: Path, progress: bool, log) -> dict:
    path, convert = SWEEP_ALIASES.get(param, (param if "." in param else f"model.{param}", lambda v: v))
    run_configs = _sweep_configs(config, param, path, convert, values)
    data = load_dataset(absolute_paths(config.get("data", DEFAULT_DATA)))
    for run_config in run_configs:  # every value builds, before the first run trains
        TrainConfig.from_dict(run_config.get("train", {}))
        build_ctr_model(data.feature_map, model_section_of(run_config))
    log(report.data_summary(data, _min_domain_rows(config)))
    labels = domain_labels(data.feature_map)
    summaries = {}
    for value, run_config in zip(values, run_configs):
        results = _seed_runs(run_config, seeds, data, output / "runs" / f"{_slug(param)}={_slug(str(value))}",
                             f"{param}={value}", progress, log)
        summaries[str(value)] = summarize(results)
    table = format_table(summaries, labels, first_column=param)
    name = f"sweep_{_slug(param)}"
    write_text(output / f"{name}.md", table + "\n")
    write_json(output / f"{name}.json", {"param": param, "config_path": path, "values": [str(v) for v in values],
                                         "seeds": list(seeds), "domains": labels,
                                         "summary": _json_summaries(summaries)})
    from .plots import plot_sweep
    plot_sweep(values, list(summaries.values()), labels, param, output / f"{name}.png",
               data.train.domain_counts(len(labels)))
    return {"table": table, "summary": summaries, "domains": labels}


def _min_domain_rows(config: dict) -> int:
    return TrainConfig.from_dict(config.get("train", {})).min_domain_rows
def _sweep_configs(config: dict, param: str, path: str, convert, values: list) -> list:
    """One config per swept value; a ValueError for a parameter a sweep cannot vary or a value given twice."""
    section, _, key = path.partition(".")
    if section not in ("model", "train") or not key or "." in key:
        raise ValueError(f"--param {param}: a sweep varies one model.<key> or train.<key> setting (its runs share "
                         f"one data load), or a short name ({', '.join(SWEEP_ALIASES)}); got {path!r}")
    shown = [str(value) for value in values]
    repeated = sorted({value for value in shown if shown.count(value) > 1})
    if repeated:
        raise ValueError(f"--param {param}: each value once, got {repeated[:4]} more than once")
    try:
        return [set_path(config, path, convert(value)) for value in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"--param {param}: a value does not fit it ({_first_line(err)})") from None


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says that an allocation failed: torch's CUDA OutOfMemoryError, a CPU allocator error,
    Python's MemoryError."""
    text = str(err)
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _json_summaries(summaries: dict) -> dict:
    return {row: {metric: list(stat) for metric, stat in stats.items()} for row, stats in summaries.items()}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)
