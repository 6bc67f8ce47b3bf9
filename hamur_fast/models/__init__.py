"""Multi-domain CTR models on the embedded instance ``e``; ``build(name, ...)`` makes any of them."""
from .base import MultiDomainModel
from .hamur import HAMUR
from .mmoe import MMoE
from .ple import PLE
from .presets import PRESETS
from .registry import available, build
from .shared_bottom import SharedBottom

__all__ = ["HAMUR", "PRESETS", "MultiDomainModel", "SharedBottom", "MMoE", "PLE", "available", "build"]
