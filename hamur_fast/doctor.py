"""``hamur-fast doctor`` / ``python -m hamur_fast.doctor``: is this installation sound on this machine?

Prints versions, devices, which backends are built (and why not), and a self-check of every backend that
runs on the current device against the float64 reference (outputs and all gradients at small odd sizes,
both modes, training and eval; :mod:`hamur_fast.ops.selfcheck`) with a micro-timing of one adapter-cell
forward+backward. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from .ops import registry
from .ops.selfcheck import SIZES, self_check

CHECK_DTYPES = "float32,float64,bfloat16"


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "?")


def _devices() -> list[str]:
    lines = [f"cpu: {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {props.name}, sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2 ** 30:.0f} GiB")
    else:
        lines.append("cuda: not available")
    return lines


def report(device: torch.device, dtypes: tuple, timing_repeats: int = 5) -> tuple[str, bool]:
    """The doctor's text, and whether every check passed."""
    lines = [f"hamur_fast {__version__} | python {platform.python_version()} | torch {torch.__version__} "
             f"(CUDA {torch.version.cuda or 'none'}) | triton {_version('triton')} | numpy {_version('numpy')}",
             "", "devices:"] + [f"  {line}" for line in _devices()]
    lines += ["", "backends:"]
    for name in registry.available_backends():
        caps = registry.get_backend(name).capabilities
        limits = ", ".join(f"{what}<={most}" for what, most in (("h", caps.max_width), ("k", caps.max_rank),
                                                                 ("s", caps.max_bottleneck)) if most is not None)
        auto = ", ".join(f"{d} (rank {r})" for d, r in sorted(caps.auto_rank.items())) or "never"
        lines.append(f"  {name:<10} built; devices {sorted(caps.devices)}; sizes {limits or 'any'}; "
                     f"auto: {auto}")
    for name, reason in registry.unavailable_backends().items():
        lines.append(f"  {name:<10} NOT available: {reason}")

    sizes = ", ".join(f"{key}={value}" for key, value in SIZES.items())
    lines += ["", f"self-check on {device} against the float64 reference ({sizes}; paper train/eval, released; "
                  f"adapter cell and DomainNorm, outputs and all gradients):", "",
              "| backend | dtype | result | max rel. error | cell fwd+bwd (us) |", "|---|---|---|---|---|"]
    all_ok = True
    for name in registry.available_backends(device):
        backend = registry.get_backend(name)
        for dtype in dtypes:
            if dtype not in backend.capabilities.dtypes:
                continue
            result = self_check(backend, device, dtype, timing_repeats)
            all_ok &= result.ok
            verdict = "ok" if result.ok else f"FAILED: {result.error}"
            micros = f"{result.microseconds:.0f}" if result.microseconds is not None else "-"
            lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {verdict} | {result.max_error:.1e} | "
                         f"{micros} |")
    auto = registry.resolve("auto", device, torch.float32)
    lines += ["", f'backend="auto" on {device} for float32: {auto.name}',
              "", "all checks passed" if all_ok else "SOME CHECKS FAILED"]
    return "\n".join(lines), all_ok


def _float_dtypes(parser, text: str) -> tuple:
    """The --dtypes names as torch floating-point dtypes (a parser error for any other name)."""
    names = [name.strip() for name in text.split(",")]
    dtypes = tuple(getattr(torch, name, None) for name in names)
    if not names or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        parser.error(f"--dtypes takes floating-point dtype names such as float32,bfloat16, got {text[:80]!r}")
    return dtypes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hamur-fast doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="device to check (default: cuda when available, else cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per check (median)")
    parser.add_argument("--dtypes", default=CHECK_DTYPES, help=f"comma-separated (default {CHECK_DTYPES})")
    args = parser.parse_args(argv)
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0 (0: no timing), got {args.repeats}")
    from .train.trainer import resolve_device  # imported here: the training stack is needed for this one check

    try:
        device = resolve_device(args.device or "auto")
    except ValueError as err:
        parser.error(str(err))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    text, ok = report(device, _float_dtypes(parser, args.dtypes), timing_repeats=args.repeats)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
