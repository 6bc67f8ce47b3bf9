"""backend="torch": the eager math of :mod:`hamur_fast.ops.eager`, on any device and dtype; gradients by autograd."""
from __future__ import annotations

from .. import eager, grouped_linear
from ..contract import FLOAT_DTYPES, Backend, Capabilities
from ..registry import register_backend

register_backend(Backend(
    "torch", eager.hyper_adapter, eager.domain_norm,
    # meta: a model built there runs shape-only; this is its path where the triton backend is absent or too small
    Capabilities(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=FLOAT_DTYPES,
                 auto_rank={"cpu": 100, "cuda": 100, "meta": 100}),
    passes=eager.PASSES, grouped_linear=grouped_linear.torch_form,
    hyper_adapter_all_towers=eager.released_cell_all_towers))
