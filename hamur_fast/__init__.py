"""hamur_fast: fast, trustworthy HAMUR (Hyper Adapter for Multi-Domain Recommendation, CIKM 2023)."""
from . import _layout

_layout.bind_checkout_kernels()  # before anything imports hamur_fast.kernels (see _layout)

from . import compat, inference, models, ops
from . import data, features, train  # after models: features builds on the zoo
from ._checks import set_value_checks
from .nn import DomainNorm, HyperAdapter, HyperNetwork
from .ops.registry import available_backends

__version__ = "0.1.0"

__all__ = ["HyperNetwork", "HyperAdapter", "DomainNorm", "ops", "models", "compat", "inference", "data", "features", "train",
           "available_backends", "set_value_checks", "__version__"]
