"""One registry for the whole model zoo: ``build(name, input_dim, num_domains, **kwargs)``."""
from __future__ import annotations

import functools
import inspect

from .adaptdhm import AdaptDHM
from .adasparse import AdaSparse
from .apg import APG
from .base import MultiDomainModel
from .epnet import EPNet
from .hamur import HAMUR
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
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    constructor = _MODELS[name]
    _check_kwargs(name, constructor, kwargs)
    return constructor(input_dim, num_domains, **kwargs)


def _check_kwargs(name: str, constructor, kwargs: dict) -> None:
    """Reject keywords the constructor would not accept (HAMUR validates its own size keywords)."""
    fixed_by_name = sorted(set(kwargs) & set(getattr(constructor, "keywords", {})))
    if fixed_by_name:
        raise ValueError(f"model {name!r} fixes {fixed_by_name} itself; pick another registry name instead")
    parameters = inspect.signature(constructor).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [p for p in parameters if p not in ("input_dim", "num_domains")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} takes no argument(s) {unknown}; accepted: {accepted}")
