"""YAML as configs are written: ``1e-3`` is a number.

YAML 1.1 (PyYAML's safe loader) reads a float only with a decimal point, so ``lr: 1e-3`` or
``--set train.lr=1e-3`` would arrive as the string "1e-3". This loader adds exponent-only numbers and is
otherwise ``yaml.safe_load``.
"""
from __future__ import annotations

import re

import yaml


class _ConfigLoader(yaml.SafeLoader):
    pass


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load(text: str):
    """``yaml.safe_load`` that also reads ``1e-3``, ``5E4`` and ``-2e+1`` as floats."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
