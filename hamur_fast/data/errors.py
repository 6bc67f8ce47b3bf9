"""The one error type for bad input data: every message names the file (and line) at fault."""


class DataError(ValueError):
    """Raised for data that cannot be used: missing column, malformed line, empty split, bad label or domain."""


def shown(value) -> str:
    """A cell value as a message shows it: ``2`` or ``'x'``, not ``np.int64(2)``."""
    return repr(value.item() if hasattr(value, "item") else value)
