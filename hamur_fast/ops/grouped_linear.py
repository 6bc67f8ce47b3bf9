"""The grouped per-domain linear op: ``out[b] = x[b] @ weight[d_b] + bias[d_b]``.

x (B, in), domain (B,) int, weight (D, in, out), bias (D, out) or None -> (B, out). This is a
mixture of experts with hard routing by domain id, and every per-domain product of the package
(tower layers, adapter factors, STAR's star-topology layers) is one call of it.

``backend=`` is a backend of :mod:`hamur_fast.ops.registry`, resolved like the cell's and the norm's ("auto" by
the same ranks); each :class:`~hamur_fast.ops.contract.Backend` supplies its form (``Backend.grouped_linear``):
- ``"reference"``: :func:`reference`, a loop over domains in float64; the oracle of the tests.
- ``"torch"``, ``"cpu"``, ``"cuda"``: :func:`torch_form`. On the CPU (eager) :func:`segments`, one GEMM per
  domain on its rows, reading the segment sizes back to the host (free there). Elsewhere, and whenever
  torch.compile traces, the sync-free :func:`sync_free`: rows sorted by domain on the device, segment offsets by
  ``searchsorted``, then ``torch._grouped_mm`` (FLOPs and memory ~ B, independent of D) where the installed
  torch supports that dtype on that device (CPU: float32/bfloat16/float16; CUDA sm_90+ and meta: bfloat16; odd
  widths zero-padded to its 16-byte rows), else :func:`stacked`: one GEMM against all D weights side by side
  and a gather (D times the FLOPs, a (B, D, out) intermediate; eager PyTorch has no other sync-free op whose
  cost is independent of D). A caller that sorted its batch by domain once for several layers (the paper-mode
  towers on the CPU) calls :func:`run_sorted` with the segment sizes: :func:`sorted_segments`, the segment loop
  without the per-layer gather and scatter.
- ``"triton"``: the Triton grouped GEMM of kernels/grouped_linear.py (sorted rows, device-side segment offsets,
  one program per (domain, row block) tile, static grid), behind the custom ops
  ``hamur_fast::triton_grouped_linear_forward`` / ``_backward`` (fake and autograd registered, with FLOP
  formulas, so torch.compile, export and ``FlopCounterMode`` see them). "auto" picks it on CUDA.
"""
from __future__ import annotations

import importlib
import itertools

import torch
import torch.nn.functional as F
import torch.utils.flop_counter
from torch.utils.flop_counter import register_flop_formula

from .. import _checks
from .all_domains_linear import PerDomainGemms
from .registry import check_backend_name, resolve


# --------------------------------------------------------------------------------------------------
# Sorting rows by domain on the device (shared by the torch forms and the Triton kernel)
# --------------------------------------------------------------------------------------------------
def domain_segments(domain: torch.Tensor, num_domains: int):
    """Row order grouped by domain and the segment offsets, with no host sync.

    Returns ``order`` (B,) int64 (stable: rows of a domain keep their order) and ``offsets`` (D + 2,)
    int64: the rows of domain d are ``order[offsets[d]:offsets[d + 1]]``, and ids outside [0, D) (which
    the public op rejects, but a kernel must survive) form one last group D, after every real domain.
    """
    in_range = (domain >= 0) & (domain < num_domains)
    key = torch.where(in_range, domain, num_domains)
    order = torch.argsort(key, stable=True)
    groups = torch.arange(num_domains + 2, device=domain.device, dtype=key.dtype)
    offsets = torch.searchsorted(key[order], groups)
    return order, offsets


def host_segments(domain: torch.Tensor, num_domains: int):
    """:func:`domain_segments` for the CPU eager forms: ``(order, sizes)`` with the sizes read on the host (D domains,
    then the out-of-range group), and ``order`` None where the rows are already in domain order (every id in range
    and non-decreasing: the paper towers sort their batch once), which needs no gather and no scatter."""
    order, offsets = domain_segments(domain, num_domains)
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    if not sizes[-1] and bool((domain[1:] >= domain[:-1]).all()):
        order = None
    return order, sizes


# --------------------------------------------------------------------------------------------------
# The forms: (x, domain, weight, bias) -> out, already validated, domain int64
# --------------------------------------------------------------------------------------------------
def reference(x, domain, weight, bias):
    """Domain by domain in float64 (rows of domain d times weight[d]), cast back to x's dtype."""
    out = x.new_zeros(x.shape[0], weight.shape[2], dtype=torch.float64)
    for d in range(weight.shape[0]):
        rows = domain == d
        part = x[rows].double() @ weight[d].double()
        if bias is not None:
            part = part + bias[d].double()
        out[rows] = part
    return out.to(x.dtype)


def segments(x, domain, weight, bias):
    """One GEMM per domain on its rows; reads the segment sizes on the host (the CPU path).

    Rows are gathered in domain order once and split (:func:`sorted_segments`), so the backward is O(B + D)
    work too (indexing ``x[rows]`` and ``weight[d]`` per domain would make autograd build a zero-filled
    full-size gradient per domain: O(D) times the work). The gather is an ``index_select``, whose backward is an
    ``index_add`` (``x[order]``'s is an accumulating ``index_put``, 4x slower on the CPU).
    """
    order, (*sizes, outside) = host_segments(domain, weight.shape[0])  # D domains, then the out-of-range group
    if order is None:
        return sorted_segments(x, sizes, weight, bias)
    rows = x.index_select(0, order)
    out_sorted = sorted_segments(rows[:rows.shape[0] - outside], sizes, weight, bias)
    if outside:  # ids outside [0, D): zeros (only reachable with the checks switched off)
        out_sorted = torch.cat([out_sorted, out_sorted.new_zeros(outside, weight.shape[2])])
    return torch.empty_like(out_sorted).index_copy(0, order, out_sorted)


def sorted_segments(x, sizes, weight, bias):
    """The op on rows already sorted by domain: ``sizes[d]`` rows of domain d, domain 0's first.

    One GEMM per segment on a view of x, written into its view of one output, each domain's bias added to its own
    rows in the GEMM (its gradient a column sum of the segment): no gather, no scatter, no per-row bias copy and
    no cat of the segments, forward or backward (:class:`~hamur_fast.ops.all_domains_linear.PerDomainGemms`).
    """
    if sum(sizes) != x.shape[0]:  # every row in exactly one segment, or rows of the output go unwritten
        raise ValueError(f"segment sizes {list(sizes)} sum to {sum(sizes)}, but x has {x.shape[0]} rows")
    ends = itertools.accumulate(sizes)
    segments = [(d, slice(end - size, end)) for d, (end, size) in enumerate(zip(ends, sizes)) if size]
    return PerDomainGemms.apply(x, weight, bias, segments)


def stacked(x, domain, weight, bias):
    """One GEMM against all D weights side by side, then each row keeps its own block."""
    num_domains, fan_in, fan_out = weight.shape
    every = x @ weight.permute(1, 0, 2).reshape(fan_in, num_domains * fan_out)
    every = every.view(x.shape[0], num_domains, fan_out)
    own = every.gather(1, domain.view(-1, 1, 1).expand(-1, 1, fan_out)).squeeze(1)
    return _add_bias(own, domain, bias)


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands here (its meta checks mirror the CUDA kernel)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    # The CPU kernel takes more dtypes than the CUDA one, whose checks the meta (tracing) form mirrors.
    cpu_eager = x.device.type == "cpu" and not torch.compiler.is_compiling()
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if cpu_eager else (torch.bfloat16,)
    if x.dtype not in dtypes or weight.dtype != x.dtype:
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (9, 0)


def _pad_last_dims(t: torch.Tensor, multiple: int, dims: int) -> torch.Tensor:
    """Zero-pad the last ``dims`` dimensions of ``t`` up to multiples of ``multiple``."""
    pad = []
    for size in reversed(t.shape[-dims:]):
        pad += [0, -size % multiple]
    return F.pad(t, pad) if any(pad) else t


def grouped_mm(x, domain, weight, bias):
    """``torch._grouped_mm`` on the rows sorted by domain (requires :func:`grouped_mm_supported`).

    Its operands' rows must start on 16-byte boundaries, so odd widths are zero-padded (a copy of x and of
    the weights: O(B + D) memory, never O(B x D)).
    """
    num_domains, _, fan_out = weight.shape
    align = 16 // x.element_size()
    order, offsets = domain_segments(domain, num_domains)
    ends = offsets[1:num_domains + 1].to(torch.int32)
    out_sorted = torch._grouped_mm(_pad_last_dims(x.index_select(0, order), align, 1), _pad_last_dims(weight, align, 2), offs=ends)
    out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted)[:, :fan_out]
    return _add_bias(out, domain, bias)


def sync_free(x, domain, weight, bias):
    """The sync-free eager form: grouped GEMM where torch has one for these operands, else stacked."""
    if grouped_mm_supported(x, weight):
        return grouped_mm(x, domain, weight, bias)
    return stacked(x, domain, weight, bias)


def torch_form(x, domain, weight, bias):
    """The eager backends' form: the segment loop on the CPU, where reading sizes back costs nothing (and which
    bench_domains measured faster there), the sync-free form elsewhere and whenever torch.compile traces."""
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return segments(x, domain, weight, bias)
    return sync_free(x, domain, weight, bias)


def _add_bias(out, domain, bias):
    return out if bias is None else out + bias.index_select(0, domain)  # backward: index_add, not index_put


# --------------------------------------------------------------------------------------------------
# The kernel path as custom ops: what torch.compile, export and FlopCounterMode see
# --------------------------------------------------------------------------------------------------
def _kernels():
    try:
        return importlib.import_module("hamur_fast.kernels.grouped_linear")
    except ImportError as err:
        raise RuntimeError(f"grouped_linear backend 'triton' needs triton: {err}") from err


def _check_rows(op: str, x, domain) -> None:
    """x (B, in) and domain (B,) int64 of a kernel op (the launcher checks the rest); the ids' values may be
    anything: the kernels give rows with an id outside [0, D) zeros and read no weight for them."""
    from ..kernels import arg_checks  # the argument checks need no triton

    arg_checks.Args(op, arg_checks.device_of(x, op)).tensor("x", x, "B in").ids("domain", domain)


@torch.library.custom_op("hamur_fast::triton_grouped_linear_forward", mutates_args=())
def grouped_linear_kernel(x: torch.Tensor, domain: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    _check_rows("triton_grouped_linear_forward", x, domain)
    order, offsets = domain_segments(domain, weight.shape[0])
    return _kernels().grouped_forward(x, order, offsets, weight, bias)


@grouped_linear_kernel.register_fake
def _(x, domain, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[2])


@torch.library.custom_op("hamur_fast::triton_grouped_linear_backward", mutates_args=())
def grouped_linear_kernel_backward(grad: torch.Tensor, x: torch.Tensor, domain: torch.Tensor,
                                   weight: torch.Tensor, with_bias: bool) -> list[torch.Tensor]:
    """[dx (B, in), dweight (D, in, out), dbias (D, out) (empty (0,) without bias)]."""
    _check_rows("triton_grouped_linear_backward", x, domain)
    order, offsets = domain_segments(domain, weight.shape[0])
    return list(_kernels().grouped_backward(grad, x, order, offsets, weight, with_bias))


@grouped_linear_kernel_backward.register_fake
def _(grad, x, domain, weight, with_bias):
    dbias = weight.new_empty(weight.shape[0], weight.shape[2]) if with_bias else weight.new_empty(0)
    return [torch.empty_like(x), weight.new_empty(weight.shape), dbias]


def _setup_context(ctx, inputs, output):
    x, domain, weight, bias = inputs
    ctx.save_for_backward(x, domain, weight)
    ctx.with_bias = bias is not None


def _backward(ctx, grad):
    x, domain, weight = ctx.saved_tensors
    dx, dweight, dbias = grouped_linear_kernel_backward(grad, x, domain, weight, ctx.with_bias)
    return dx, None, dweight, dbias if ctx.with_bias else None


grouped_linear_kernel.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.hamur_fast.triton_grouped_linear_forward)
def _forward_flops(x_shape, domain_shape, weight_shape, bias_shape, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * weight_shape[1] * weight_shape[2]  # each row against its own domain only


@register_flop_formula(torch.ops.hamur_fast.triton_grouped_linear_backward)
def _backward_flops(grad_shape, x_shape, domain_shape, weight_shape, with_bias, out_shape=None, **kwargs) -> int:
    return 4 * x_shape[0] * weight_shape[1] * weight_shape[2]  # dx and dweight


if hasattr(torch.ops.aten, "_grouped_mm") and \
        torch.ops.aten._grouped_mm.default not in torch.utils.flop_counter.flop_registry:
    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        """torch 2.13 counts none; the (rows, K) x (G, K, N) form used here costs 2 rows K N."""
        if len(a_shape) == 2 and len(b_shape) == 3:
            return 2 * a_shape[0] * a_shape[1] * b_shape[2]
        if len(a_shape) == 3 and len(b_shape) == 3:  # batched
            return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]  # (M, K) x (K, N) with offsets over K


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device``, or None (meta has no autocast at all)."""
    if device.type not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def grouped_linear(x: torch.Tensor, domain: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   *, backend: str = "auto") -> torch.Tensor:
    """``out[b] = x[b] @ weight[domain[b]] + bias[domain[b]]``: x (B, in), weight (D, in, out), bias (D, out).

    Validates every argument (ValueError naming it) before any compute; ``backend`` is "auto" or a registered
    backend (:func:`hamur_fast.ops.available_backends`). Under autocast the product runs in autocast's dtype, like
    ``nn.Linear``.
    """
    _checks.check_float("x", x, 2)
    batch = _checks.check_batch("x", x)
    _checks.check_float("weight", weight, 3)
    num_domains, fan_in, fan_out = weight.shape
    _checks.check_shape("weight", weight, (num_domains, x.shape[1], fan_out))
    if bias is not None:
        _checks.check_float("bias", bias)
        _checks.check_shape("bias", bias, (num_domains, fan_out))
    _checks.check_domain(domain, batch, num_domains)
    _checks.check_same_device(x=x, domain=domain, weight=weight, bias=bias)
    check_backend_name(backend)
    if autocast_dtype(x.device) is None and (x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype)):
        raise ValueError(f"x, weight and bias must share one dtype, got {x.dtype}, {weight.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}")
    return run(x, domain, weight, bias, backend)


def run(x, domain, weight, bias=None, backend: str = "auto") -> torch.Tensor:
    """:func:`grouped_linear` without the checks, for callers that validated their inputs already."""
    x, weight, bias = _autocast(x, weight, bias)
    return resolve(backend, x.device, x.dtype).grouped_linear(x, domain.long(), weight, bias)  # the kernels take int64


def run_sorted(x, sizes, weight, bias=None) -> torch.Tensor:
    """:func:`run` on rows already sorted by domain, ``sizes[d]`` rows of domain d (host ints: the CPU eager
    callers that sorted a batch once for several layers): :func:`sorted_segments` in autocast's dtype."""
    x, weight, bias = _autocast(x, weight, bias)
    return sorted_segments(x, sizes, weight, bias)


def _autocast(x, weight, bias):
    lowered = autocast_dtype(x.device)
    if lowered is None:
        return x, weight, bias
    return x.to(lowered), weight.to(lowered), None if bias is None else bias.to(lowered)
