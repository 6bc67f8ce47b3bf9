"""Every domain's linear layer on its own slice of a (D, B, in) batch: ``out[d] = x[d] @ weight[d]^T + bias[d]``.

The released towers (and M3oE's and PLE's experts) run each domain's layer on the whole batch, so a layer is D
independent GEMMs. ``torch.baddbmm`` does them as one batched call, which on the CPU spreads the D products
over the threads (D = 3 products on 2 threads leave one thread idle a third of the time) and takes a product
with one output column (a tower's logit layer: (B, in) x (in, 1)) through a path several times slower than a
GEMM. :func:`all_domains_linear` on the CPU in eager mode runs one ``torch.mm``/``torch.addmm`` per domain
instead, each using every thread, written straight into slices of one output (no stack), forward and backward;
the results are the same products (``benchmarks/bench_all_domains_linear.py`` measures the difference).
Elsewhere (CUDA, torch.compile and export, autocast) the ``baddbmm`` form runs.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

_DTYPES = (torch.float32, torch.float64)


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the per-domain GEMM loop runs this call (else :func:`batched_form`)."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and weight.dtype == x.dtype and bias.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def batched_form(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One ``baddbmm``: the form for CUDA and the compilers (and the tests' reference)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class _PerDomainLinear(torch.autograd.Function):
    """One GEMM per domain into slices of one output; backward likewise (grad_x[d] = g[d] W[d],
    grad_W[d] = g[d]^T x[d], grad_b[d] = column sums of g[d])."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = x.new_empty(x.shape[0], x.shape[1], weight.shape[1])
        for d in range(x.shape[0]):
            torch.addmm(bias[d], x[d], weight[d].t(), out=out[d])
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for d in range(x.shape[0]):
            if grad_x is not None:
                torch.mm(grad[d], weight[d], out=grad_x[d])
            if grad_weight is not None:
                torch.mm(grad[d].t(), x[d], out=grad_weight[d])
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def all_domains_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (D, B, in), weight (D, out, in), bias (D, out) -> (D, B, out): slice d through layer d."""
    if applies(x, weight, bias):
        return _PerDomainLinear.apply(x, weight, bias)
    return batched_form(x, weight, bias)
