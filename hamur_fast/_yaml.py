"""YAML as configs are written: ``1e-3`` is a number.

YAML 1.1 (PyYAML's safe loader) reads a float only with a decimal point, so ``lr: 1e-3`` or
``--set train.lr=1e-3`` would arrive as the string "1e-3". This loader adds exponent-only numbers and is
otherwise ``yaml.safe_load``, with one limit: anchors and aliases may not expand a document beyond
``MAX_NODES`` nodes (a few hundred bytes of nested aliases, a "billion laughs", would otherwise expand to
billions of elements in anything that walks the value: an error message, a copy, a JSON file).
"""
from __future__ import annotations

import re

import yaml


MAX_NODES = 100_000  # a config has a few hundred


class _ConfigLoader(yaml.SafeLoader):
    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root) -> None:
    """Count the nodes ``root`` expands to, each shared (aliased) node as often as it is referenced, in time linear
    in the composed (unexpanded) document; refuse more than MAX_NODES, and aliases that contain themselves."""
    expanded, open_nodes = {}, set()

    def size(node) -> int:
        if id(node) in expanded:
            return expanded[id(node)]
        if id(node) in open_nodes:
            raise yaml.constructor.ConstructorError(None, None, "a recursive alias (a value that contains itself)",
                                                    node.start_mark)
        open_nodes.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1 + sum(size(child) for child in children)
        open_nodes.discard(id(node))
        expanded[id(node)] = total
        if total > MAX_NODES:
            raise yaml.constructor.ConstructorError(None, None, f"anchors and aliases expand this document beyond "
                                                    f"{MAX_NODES:,} values (refused)", node.start_mark)
        return total

    size(root)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load(text: str):
    """``yaml.safe_load`` that also reads ``1e-3``, ``5E4`` and ``-2e+1`` as floats, and refuses (a
    ``yaml.YAMLError``) documents that aliases expand beyond ``MAX_NODES`` or that nest too deeply to read."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError("the document nests too deeply to read") from None
