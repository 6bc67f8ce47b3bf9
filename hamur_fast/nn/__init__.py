"""Drop-in PyTorch layers: the HAMUR adapter cell, DomainNorm, the hyper-network, per-domain towers."""
from .adapter import DomainNorm, HyperAdapter
from .domain_layers import DomainBatchNorm1d, DomainLinear
from .hyper_network import HyperNetwork, RepeatedUpdateBatchNorm1d

__all__ = ["HyperAdapter", "DomainNorm", "HyperNetwork", "RepeatedUpdateBatchNorm1d",
           "DomainLinear", "DomainBatchNorm1d"]
