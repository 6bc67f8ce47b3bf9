"""Multi-domain CTR models on the embedded instance ``e``; ``build(name, ...)`` makes any of them."""
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
from .presets import PRESETS
from .registry import available, build
from .sarnet import SARNet
from .shared_bottom import SharedBottom
from .star import STAR

__all__ = ["HAMUR", "PRESETS", "MultiDomainModel", "MLPShared", "SharedBottom", "MMoE", "PLE", "STAR", "APG", "M2M",
           "PEPNet", "EPNet", "AdaSparse", "SARNet", "AdaptDHM", "M3oE", "PPNet", "available", "build"]
