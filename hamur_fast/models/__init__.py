"""Multi-domain CTR models on the embedded instance ``e``."""
from .hamur import HAMUR
from .presets import PRESETS

__all__ = ["HAMUR", "PRESETS"]
