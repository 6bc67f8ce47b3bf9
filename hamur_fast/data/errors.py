"""The one error type for bad input data: every message names the file (and line) at fault."""


class DataError(ValueError):
    """Raised for data that cannot be used: missing column, malformed line, empty split, bad label or domain."""
