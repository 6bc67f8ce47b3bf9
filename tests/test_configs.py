"""Every config in configs/ works from a public clone: it reads nothing outside the checkout, names only files
that exist, and its data section, train section, model and every compared or swept model build (on small
generated data in the layout the config expects)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from hamur_fast.data import load_dataset
from hamur_fast.features import build_ctr_model
from hamur_fast.train import TrainConfig
from hamur_fast.train import experiment as ex

from data_files import write_aliccp, write_ml1m

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REPOSITORY_FILE = re.compile(r"\b((?:benchmarks|scripts|configs|docs|tests)/[\w./-]+\.(?:py|sh|yaml|md))")


def scratch_data(root: Path) -> None:
    """data/ml-1m and data/ali-ccp as the configs name them, small."""
    write_ml1m(root / "data" / "ml-1m")
    for path in write_aliccp(root / "data" / "ali-ccp"):
        path.rename(path.with_name(f"ali_ccp_{path.name}"))


def model_sections(config: dict) -> list:
    base = config.get("model", ex.DEFAULT_MODEL)
    sections = [base] if "name" in base else []
    sections += [ex.model_section(entry, base)[1] for entry in config.get("compare", {}).get("models", [])]
    sweep = config.get("sweep")
    if sweep:
        path, convert = ex.SWEEP_ALIASES.get(sweep["param"], (f"model.{sweep['param']}", lambda v: v))
        sections += [ex.set_path(config, path, convert(value))["model"] for value in sweep["values"]]
    return sections


def test_every_config_is_here():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_from_a_public_clone(path, tmp_path, monkeypatch):
    text = path.read_text()
    assert not re.search(r"(?<!\.)\.\./", text), "reads outside the checkout"  # (".../x": a placeholder)
    missing = [named for named in REPOSITORY_FILE.findall(text) if not (ROOT / named).is_file()]
    assert not missing, f"names files that do not exist: {missing}"
    config = ex.load_config(path)
    TrainConfig.from_dict(config.get("train", {}))
    monkeypatch.chdir(tmp_path)
    scratch_data(tmp_path)
    data_section = dict(config.get("data", ex.DEFAULT_DATA))
    if data_section.get("kind") == "synthetic":
        data_section["rows"] = 2000  # the layout, not the size, is under test
    data = load_dataset(ex.absolute_paths(data_section))
    sections = model_sections(config)
    assert sections, "no model to build"
    for section in sections:
        build_ctr_model(data.feature_map, section)
