"""Every domain's linear layer on its own slice of a (D, B, in) batch: ``out[d] = x[d] @ weight[d] + bias[d]``;
and :class:`PerDomainGemms`, the CPU form it shares with the grouped op's sorted segments.

The released towers (and M3oE's and PLE's experts) run each domain's layer on the whole batch, so a layer is D
independent GEMMs. ``torch.baddbmm`` does them as one batched call, which on the CPU spreads the D products
over the threads (D = 3 products on 2 threads leave one thread idle a third of the time) and takes a product
with one output column (a tower's logit layer: (B, in) x (in, 1)) through a path several times slower than a
GEMM. On the CPU in eager mode :func:`all_domains_linear` runs :class:`PerDomainGemms` instead: one
``torch.mm``/``addmm`` per domain, each using every thread, written straight into its view of one output (no
stack), forward and backward (``benchmarks/bench_all_domains_linear.py`` measures the difference). Elsewhere
(CUDA, torch.compile and export, autocast) the ``baddbmm`` form runs.
"""
from __future__ import annotations

import torch


class PerDomainGemms(torch.autograd.Function):
    """``out[view] = x[view] @ weight[d] + bias[d]`` for each ``(d, view)`` of ``views``, where ``view`` indexes
    domain d's rows in x and in the output alike (an int: slice d of a (D, B, in) batch; a slice: a segment of rows
    sorted by domain). x (..., in), weight (D, in, out), bias (D, out) or None. The views cover every row of the
    output; a domain without rows is left out of them (its weight and bias gradients are zero).

    Each product is written in place into its view of one output, and the backward's likewise (grad x[view] =
    grad[view] weight[d]^T, grad weight[d] = x[view]^T grad[view], grad bias[d] = the column sums of grad[view]):
    no cat, stack or split of the pieces either way. A backward asked for its own graph
    (``create_graph``) runs the same products as differentiable ops, so second derivatives hold."""

    @staticmethod
    def forward(ctx, x, weight, bias, views):
        out = x.new_empty(*x.shape[:-1], weight.shape[-1])
        for d, view in views:
            if bias is None:
                torch.mm(x[view], weight[d], out=out[view])
            else:
                torch.addmm(bias[d], x[view], weight[d], out=out[view])
        ctx.views, ctx.with_bias = views, bias is not None
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        wants_x, wants_weight, wants_bias = ctx.needs_input_grad[:3]
        wants_bias = wants_bias and ctx.with_bias
        if torch.is_grad_enabled():
            return (*_differentiable_grads(grad, x, weight, ctx.views, wants_x, wants_weight, wants_bias), None)
        every_domain = len(ctx.views) == weight.shape[0]  # else the domains left out get zeros
        new = torch.empty_like if every_domain else torch.zeros_like  # in weight's layout (a transposed parameter)
        grad_x = torch.empty_like(x) if wants_x else None
        grad_weight = new(weight) if wants_weight else None
        grad_bias = (weight.new_empty if every_domain else weight.new_zeros)(weight.shape[0], weight.shape[2]) \
            if wants_bias else None
        for d, view in ctx.views:
            rows = grad[view]
            if wants_x:
                torch.mm(rows, weight[d].t(), out=grad_x[view])
            if wants_weight:
                torch.mm(x[view].t(), rows, out=grad_weight[d])
            if wants_bias:
                torch.sum(rows, 0, out=grad_bias[d])
        return grad_x, grad_weight, grad_bias, None


def _differentiable_grads(grad, x, weight, views, wants_x, wants_weight, wants_bias):
    """PerDomainGemms' gradients as differentiable ops (for create_graph)."""
    grad_x = x.new_zeros(x.shape) if wants_x else None
    grad_weight = weight.new_zeros(weight.shape) if wants_weight else None
    grad_bias = weight.new_zeros(weight.shape[0], weight.shape[2]) if wants_bias else None
    for d, view in views:  # in-place writes into zeros: differentiable (CopySlices)
        if wants_x:
            grad_x[view] = grad[view] @ weight[d].t()
        if wants_weight:
            grad_weight[d] = x[view].t() @ grad[view]
        if wants_bias:
            grad_bias[d] = grad[view].sum(0)
    return grad_x, grad_weight, grad_bias


def applies(x: torch.Tensor) -> bool:
    """Whether :func:`all_domains_linear` takes the per-domain GEMMs this call (else :func:`batched_form`)."""
    return (x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting())


def batched_form(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One ``baddbmm``: the form for CUDA and the compilers (and the benchmark's baseline)."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight)


def all_domains_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (D, B, in), weight (D, in, out), bias (D, out) -> (D, B, out): slice d through layer d."""
    if applies(x):
        return PerDomainGemms.apply(x, weight, bias, list(enumerate(range(x.shape[0]))))
    return batched_form(x, weight, bias)
