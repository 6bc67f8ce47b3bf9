"""backend="torch": the eager math of :mod:`hamur_fast.ops.eager`, on any device and dtype; gradients by autograd."""
from __future__ import annotations

from .. import eager
from ..contract import FLOAT_DTYPES, Backend, Capabilities
from ..registry import register_backend

register_backend(Backend(
    "torch", eager.hyper_adapter, eager.domain_norm,
    # meta: a model built there runs shape-only (FLOP and memory counts of the GPU path without a GPU)
    Capabilities(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=FLOAT_DTYPES,
                 auto_rank={"cpu": 100, "cuda": 100, "meta": 100}),
    norm_passes=eager.NORM_PASSES, hyper_adapter_all_towers=eager.released_cell_all_towers))
