"""Argument checks of the Triton launchers, the Python twin of csrc/checks.h.

A kernel indexes its tables with sizes read from other arguments (the rank from rep, the number of domains
from norm_weight...), so one mis-shaped argument makes it read or write past a buffer. Every launcher a
``torch.ops.hamur_fast.triton_*`` op calls therefore checks each tensor's layout, device, dtype and exact shape
first: O(1) per argument, a ValueError naming the op and the argument. Shapes are written with named sizes
("B h", "D k s") bound by the first tensor that has them. Domain-id *values* are the kernels' business (a
row with a bad id gets NaN and joins no statistic).
"""
from __future__ import annotations

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Args:
    """The checked arguments of one call of ``op``, all on ``device``; ``sizes`` holds the named sizes seen."""

    def __init__(self, op: str, device: torch.device, **sizes: int):
        self.op, self.device, self.sizes = op, device, dict(sizes)

    def tensor(self, name: str, t, shape: str, dtypes=FLOATS, contiguous: bool = False) -> "Args":
        """Check ``t`` against ``shape`` (named sizes, or "" for a scalar), binding the sizes not yet seen."""
        if not isinstance(t, torch.Tensor):
            self.fail(f"{name} must be a tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            self.fail(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.device != self.device:
            self.fail(f"{name} must be on {self.device} like the op's first input, got {t.device}")
        if t.dtype not in dtypes:
            self.fail(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
        names = shape.split()
        if t.dim() != len(names):
            self.fail(f"{name} must be {len(names)}-D ({', '.join(names)}), got shape {tuple(t.shape)}")
        for axis, (size_name, size) in enumerate(zip(names, t.shape)):
            expected = self.sizes.setdefault(size_name, size)
            if size != expected:
                self.fail(f"{name} must have shape ({', '.join(names)}) with {size_name}={expected}, got "
                          f"{tuple(t.shape)} (axis {axis})")
        if contiguous and not t.is_contiguous():
            self.fail(f"{name} must be contiguous")
        return self

    def ids(self, name: str, t, shape: str = "B", contiguous: bool = False) -> "Args":
        return self.tensor(name, t, shape, (torch.int64,), contiguous)

    def optional(self, name: str, t, shape: str) -> "Args":
        return self if t is None else self.tensor(name, t, shape)

    def positive(self, *names: str) -> "Args":
        for size_name in names:
            if self.sizes.get(size_name, 1) < 1:
                self.fail(f"size {size_name} must be >= 1, got {self.sizes[size_name]}")
        return self

    def fail(self, message: str):
        raise ValueError(f"{self.op}: {message}")


def device_of(x, op: str) -> torch.device:
    """The device of the op's first input, which every other tensor must share."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{op}: the first input must be a tensor, got {type(x).__name__}")
    return x.device


def cell(op: str, x, rep, domain, params, plan, rep_shape: str = "B k k") -> Args:
    """x (B, h), rep (B, k, k), domain (B,) and the eight cell parameters (a leading D when ``plan.per_domain``)."""
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = params
    d = "D " if plan.per_domain else ""
    args = Args(op, device_of(x, op)).tensor("x", x, "B h")
    if rep is not None:
        args.tensor("rep", rep, rep_shape)
    args.ids("domain", domain)
    for name, t, shape in (("down_left", down_left, "h k"), ("down_right", down_right, "k s"),
                           ("down_bias", down_bias, "s"), ("up_left", up_left, "s k"), ("up_right", up_right, "k h"),
                           ("up_bias", up_bias, "h"), ("norm_weight", norm_weight, "h"), ("norm_bias", norm_bias, "h")):
        args.tensor(name, t, d + shape)
    return args.positive("B", "h", "k", "s", "D")


# The shapes of everything else a cell or norm launcher may take (G = D in paper mode, 1 in released mode; the
# saved order is (B,) in paper mode, (0,) in released mode, where rows keep their order).
SHAPES = {"dy": "B h", "q": "B k", "v": "B k", "order": "O", "count": "G", "mean": "G h", "rstd": "G h",
          "sum_dy": "G h", "sum_dy_xhat": "G h", "g": "B p", "centre": "p", "gen_weight": "kk p", "gen_bias": "kk"}
CONTIGUOUS = ("q", "v", "order")  # read by the kernels as they come


def cell_extras(args: Args, plan, **tensors) -> Args:
    """Check the named tensors of a cell launcher against SHAPES (None: not given)."""
    per_domain = plan.per_domain
    args.sizes.update(G=args.sizes["D"] if per_domain else 1, O=args.sizes["B"] if per_domain else 0)
    if "k" in args.sizes:
        args.sizes["kk"] = args.sizes["k"] ** 2
    for name, t in tensors.items():
        if t is None:
            continue
        if name == "order":
            args.ids(name, t, SHAPES[name], contiguous=True)
        else:
            args.tensor(name, t, SHAPES[name], contiguous=name in CONTIGUOUS)
    return args


def norm(op: str, o, groups, num_groups: int | None = None, **tables) -> Args:
    """o (B, h), groups (B,) int64 or None (one group of all rows), and (G, h) tables (weight and bias also (h,)
    for one group), count (G,); G = num_groups when given, else the tables' leading size."""
    args = Args(op, device_of(o, op)).tensor("o", o, "B h")
    if groups is not None:
        args.ids("domain", groups)
        if num_groups is not None:
            args.sizes["G"] = int(num_groups)
    else:
        args.sizes["G"] = 1
    for name, t in tables.items():
        if t is None:
            continue
        one_group_vector = name in ("weight", "bias") and isinstance(t, torch.Tensor) and t.dim() == 1
        args.tensor(name, t, "h" if one_group_vector and groups is None else SHAPES.get(name, "G h"))
    return args.positive("B", "h", "G")
