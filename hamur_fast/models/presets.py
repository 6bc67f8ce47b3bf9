"""The released HAMUR sizes (SPEC section 4), per backbone and dataset.

``dims`` are the hidden widths (per-domain towers for "mlp", the shared MLP for "dcn" and
"wide_deep"); ``adapter_after`` lists the 0-based layer indices after which an adapter cell goes.
"""
from __future__ import annotations

PRESETS = {
    "mlp": {
        "movielens": dict(dims=[256, 128], adapter_after=[1], hyper_dims=[64], rank=35),
        "aliccp": dict(dims=[1024, 512, 512, 256, 256, 64, 64], adapter_after=[5, 6], hyper_dims=[64], rank=65),
    },
    "dcn": {
        "movielens": dict(dims=[256, 128], adapter_after=[1], hyper_dims=[128], rank=30, cross_layers=2),
        "aliccp": dict(dims=[256, 128], adapter_after=[1], hyper_dims=[128], rank=30, cross_layers=7),
    },
    "wide_deep": {
        "movielens": dict(dims=[256, 128], adapter_after=[1], hyper_dims=[128], rank=45, dropout=0.2),
        "aliccp": dict(dims=[256, 128], adapter_after=[1], hyper_dims=[128], rank=45, dropout=0.2),
    },
}

# Shared defaults; a preset (or preset=None, which means "movielens") fills the rest.
DEFAULTS = dict(bottleneck=32, dropout=0.0, cross_layers=2, wide_dim=1, eps=1e-5)

SIZE_KEYS = {"dims", "adapter_after", "hyper_dims", "rank", "bottleneck", "dropout", "cross_layers",
             "wide_dim", "eps"}


def resolve_sizes(backbone: str, preset: str | None, overrides: dict) -> dict:
    if backbone not in PRESETS:
        raise ValueError(f"backbone must be one of {sorted(PRESETS)}, got {backbone!r}")
    name = preset or "movielens"
    if name not in PRESETS[backbone]:
        raise ValueError(f"preset must be one of {sorted(PRESETS[backbone])} or None, got {preset!r}")
    unknown = set(overrides) - SIZE_KEYS
    if unknown:
        raise ValueError(f"unknown size argument(s) {sorted(unknown)}; known: {sorted(SIZE_KEYS)}")
    sizes = {**DEFAULTS, **PRESETS[backbone][name], **overrides}
    sizes["dims"] = list(sizes["dims"])
    if "dims" in overrides and "adapter_after" not in overrides:
        sizes["adapter_after"] = [len(sizes["dims"]) - 1]  # a custom depth keeps one cell on the last layer
    sizes["adapter_after"] = sorted(set(sizes["adapter_after"]))
    bad = [i for i in sizes["adapter_after"] if not 0 <= i < len(sizes["dims"])]
    if bad:
        raise ValueError(f"adapter_after indices {bad} are outside the {len(sizes['dims'])} hidden layers")
    return sizes
