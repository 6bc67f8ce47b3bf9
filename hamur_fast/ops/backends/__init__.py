"""Every implementation of the ops, one module each, all following :mod:`hamur_fast.ops.contract`; a kernel
backend is a table of passes that :mod:`hamur_fast.ops.compose` composes into the ops.

=========  ===========================  ====================================================================
backend    module                       what it is
=========  ===========================  ====================================================================
reference  backends/reference.py        SPEC literally (per-row weights, a loop over domains): the oracle
torch      backends/torch.py            the eager math of ops/eager.py; any device and dtype
triton     backends/triton.py           the passes of the Triton kernels of ``hamur_fast.kernels``
cpu, cuda  backends/compiled.py         the passes of the C++/CUDA extension ``hamur_fast._C`` (csrc/)
           backends/compiled_generated  level 2 of "cpu": I generated inside the C++ core
=========  ===========================  ====================================================================

The kernel backends are optional: a module whose requirement is missing (triton not installed, the
extension not built) raises ImportError, which is recorded as the reason that backend is unavailable.
"""
from __future__ import annotations

import importlib

from ..registry import record_unavailable

# module -> the backends it registers, and the imports whose absence just means "not offered here"
_MODULES = {
    "hamur_fast.ops.backends.reference": ((), ()),
    "hamur_fast.ops.backends.torch": ((), ()),
    "hamur_fast.ops.backends.triton": (("triton",), ("triton",)),
    "hamur_fast.ops.backends.compiled": (("cpu", "cuda"), ("hamur_fast._C",)),
    "hamur_fast.ops.backends.compiled_generated": ((), ("hamur_fast._C",)),  # level 2 of "cpu"
}


def _register_all() -> None:
    for module, (names, optional) in _MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError as err:
            if not any(err.name == o or (err.name or "").startswith(o + ".") for o in optional):
                raise  # a real bug inside a backend module must not be hidden
            for name in names:
                record_unavailable(name, f"{err.name} cannot be imported ({err})")


_register_all()
