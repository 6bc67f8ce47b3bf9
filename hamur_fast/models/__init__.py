"""Multi-domain CTR models on the embedded instance ``e``; ``build(name, ...)`` makes any of them."""
from .adasparse import AdaSparse
from .apg import APG
from .base import MultiDomainModel
from .epnet import EPNet
from .hamur import HAMUR
from .m2m import M2M
from .mlp_shared import MLPShared
from .mmoe import MMoE
from .pepnet import PEPNet
from .ple import PLE
from .presets import PRESETS
from .registry import available, build
from .shared_bottom import SharedBottom
from .star import STAR

__all__ = ["HAMUR", "PRESETS", "MultiDomainModel", "MLPShared", "SharedBottom", "MMoE", "PLE", "STAR", "APG", "M2M",
           "PEPNet", "EPNet", "AdaSparse", "available", "build"]
