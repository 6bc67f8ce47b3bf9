"""One registry for the whole model zoo: ``build(name, input_dim, num_domains, **kwargs)``."""
from __future__ import annotations

import functools
import inspect
import math

from .. import _checks
from .adaptdhm import AdaptDHM
from .adasparse import AdaSparse
from .apg import APG
from .base import MultiDomainModel
from .epnet import EPNet
from .hamur import HAMUR
from .presets import SIZE_KEYS
from .m2m import M2M
from .m3oe import M3oE
from .mlp_shared import MLPShared
from .mmoe import MMoE
from .pepnet import PEPNet
from .ple import PLE
from .ppnet import PPNet
from .sarnet import SARNet
from .shared_bottom import SharedBottom
from .star import STAR

# name -> constructor taking (input_dim, num_domains, **kwargs). HAMUR names differ in backbone and
# adapters only; "mlp", "dcn", "wide_deep" are those backbones without adapters (the paper's baselines).
_MODELS = {
    "hamur_mlp": functools.partial(HAMUR, backbone="mlp"),
    "hamur_dcn": functools.partial(HAMUR, backbone="dcn"),
    "hamur_wide_deep": functools.partial(HAMUR, backbone="wide_deep"),
    "mlp": functools.partial(HAMUR, backbone="mlp", use_adapter=False),
    "dcn": functools.partial(HAMUR, backbone="dcn", use_adapter=False),
    "wide_deep": functools.partial(HAMUR, backbone="wide_deep", use_adapter=False),
    "mlp_shared": MLPShared,
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "ple": PLE,
    "star": STAR,
    "apg": APG,
    "m2m": M2M,
    "pepnet": PEPNet,
    "epnet": EPNet,
    "adasparse": AdaSparse,
    "sarnet": SARNet,
    "adaptdhm": AdaptDHM,
    "m3oe": M3oE,
    "ppnet": PPNet,
}


def available() -> list[str]:
    """The registered model names, in registry order."""
    return list(_MODELS)


def build(name: str, input_dim: int, num_domains: int, **kwargs) -> MultiDomainModel:
    """Build model ``name`` for instance embeddings of width ``input_dim`` and ``num_domains`` domains.

    ``kwargs`` go to the model's constructor (sizes, ablation switches, ...); an unknown name or an
    argument the model does not take raises ``ValueError`` listing what is accepted.
    """
    check_arguments(name, kwargs)
    return _MODELS[name](input_dim, num_domains, **kwargs)


def check_arguments(name: str, kwargs: dict) -> None:
    """ValueError for an unknown model name, a keyword it does not take, or a numeric keyword out of range."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {_checks.shown(name)}; available: {', '.join(available())}")
    _check_kwargs(name, _MODELS[name], kwargs)
    for key, value in kwargs.items():
        check_range(f"model.{key}", key, value)


# The range of every numeric keyword of the zoo's constructors; sizes (``*_dims`` lists too) are whole numbers.
_AT_LEAST_ONE = {"rank", "bottleneck", "attention_dim", "domain_embed_dim", "expert_dim", "generator_hidden",
                 "knowledge_dim", "num_clusters", "num_experts", "overparam_dim", "task_embed_dim", "tower_layers"}
_AT_LEAST_ZERO = {"wide_dim", "cross_layers", "shared_experts", "specific_experts"}
_FRACTIONS = {"dropout": (0.0, 1.0, "0 <= {} < 1"), "target_sparsity": (0.0, 1.0, "0 <= {} < 1")}
_MAY_BE_NONE = {"target_sparsity"}  # None switches AdaSparse's regulariser off
_NON_NEGATIVE = {"alpha", "beta", "epsilon", "sparsity_tolerance", "sparsity_weight"}
_POSITIVE = {"eps"}


def check_range(label: str, key: str, value) -> None:
    """ValueError naming ``label`` when a numeric model keyword ``key`` is out of its range (others pass)."""
    def whole(v, least):
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if key.endswith("dims") and not (isinstance(value, (list, tuple)) and all(whole(v, 1) for v in value)):
        raise ValueError(f"{label} must be a list of layer widths >= 1, got {_checks.shown(value)}")
    if key in _AT_LEAST_ONE and not whole(value, 1):
        raise ValueError(f"{label} must be a whole number >= 1, got {_checks.shown(value)}")
    if key in _AT_LEAST_ZERO and not whole(value, 0):
        raise ValueError(f"{label} must be a whole number >= 0, got {_checks.shown(value)}")
    if key in _MAY_BE_NONE and value is None:
        return
    if key in _FRACTIONS:
        low, high, rule = _FRACTIONS[key]
        if not (number(value) and low <= value < high):
            raise ValueError(f"{label} must satisfy {rule.format(key)}, got {_checks.shown(value)}")
    if key in _NON_NEGATIVE and not (number(value) and value >= 0):
        raise ValueError(f"{label} must be a finite number >= 0, got {_checks.shown(value)}")
    if key in _POSITIVE and not (number(value) and value > 0):
        raise ValueError(f"{label} must be a finite number > 0, got {_checks.shown(value)}")


def _check_kwargs(name: str, constructor, kwargs: dict) -> None:
    """Reject keywords the constructor would not accept (HAMUR's **sizes take the keywords of models.presets)."""
    fixed_by_name = sorted(set(kwargs) & set(getattr(constructor, "keywords", {})))
    if fixed_by_name:
        raise ValueError(f"model {name!r} fixes {fixed_by_name} itself; pick another registry name instead")
    parameters = inspect.signature(constructor).parameters
    accepted = [p for p, kind in parameters.items()
                if p not in ("input_dim", "num_domains") and kind.kind is not inspect.Parameter.VAR_KEYWORD]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        accepted += sorted(SIZE_KEYS)  # HAMUR's size keywords (models.presets)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} takes no argument(s) {unknown}; accepted: {accepted}")
