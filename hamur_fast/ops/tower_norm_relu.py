"""The released towers' BatchNorm1d + ReLU on z (D, B, C) as one C++ CPU op (csrc/cpu/tower_norm_relu_cpu.cpp).

``relu(BatchNorm1d_d(z[d]))`` for every tower d at once, statistics per (d, column) over the B rows, exactly
nn.BatchNorm1d's (biased variance to normalise; running statistics updated in place with the unbiased variance and
``momentum``; eval with running statistics); the ATen form permutes z to (B, D*C), normalises and applies the ReLU
as separate passes. ``torch.ops.hamur_fast.compiled_tower_norm_relu_forward`` gets its fake and its autograd
kernel here (an autograd.Function over the op, registered as its Autograd kernel as :mod:`hamur_fast.ops.compose`
does, without custom_op's per-call wrapping); its backward is ``compiled_tower_norm_relu_backward``.

:func:`applies` says where :mod:`hamur_fast.nn.domain_layers` runs it: CPU float32/float64 in eager mode, with no
data-parallel statistics merge in training; elsewhere (CUDA, synchronised BatchNorm, torch.compile and export,
where the compiler fuses the ATen form itself) the ATen form runs.
"""
from __future__ import annotations

import torch

from .._layout import import_compiled_core
from .collectives import active_group
from .compose import _below_autograd, _first_order

_NAME = "hamur_fast::compiled_tower_norm_relu_forward"
_DTYPES = (torch.float32, torch.float64)


def _has_cpu_kernel() -> bool:
    try:
        import_compiled_core()
    except ImportError:  # no extension in this checkout: the ATen form runs
        return False
    if not hasattr(torch.ops.hamur_fast, "compiled_tower_norm_relu_forward"):  # built from older sources
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(_NAME, "CPU")


AVAILABLE = _has_cpu_kernel()


def applies(z: torch.Tensor, tables, training: bool, momentum) -> bool:
    """Whether the fused op runs this call (else the caller's ATen form does); ``tables``: weight, bias and the
    running statistics, which the op takes in z's dtype."""
    return (AVAILABLE and z.device.type == "cpu" and z.dtype in _DTYPES and all(t.dtype == z.dtype for t in tables)
            and z.stride(2) == 1 and isinstance(momentum, float)
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and (not training or (z.shape[1] > 1 and active_group() is None)))


def tower_norm_relu(z, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float):
    """relu(BatchNorm1d per tower) of z (D, B, C); weight, bias, running statistics (D, C). Returns y (D, B, C)."""
    return forward(z, weight, bias, running_mean, running_var, training, momentum, eps)[0]


if AVAILABLE:
    forward = torch.ops.hamur_fast.compiled_tower_norm_relu_forward.default
    backward = torch.ops.hamur_fast.compiled_tower_norm_relu_backward.default
    _LIB = torch.library.Library("hamur_fast", "IMPL")

    @torch.library.register_fake(_NAME, lib=_LIB)
    def _forward_fake(z, weight, bias, running_mean, running_var, training, momentum, eps):
        towers, batch, width = z.shape
        return (z.new_empty((batch, towers, width)).permute(1, 0, 2), torch.empty_like(weight),
                torch.empty_like(weight))

    @torch.library.register_fake("hamur_fast::compiled_tower_norm_relu_backward", lib=_LIB)
    def _backward_fake(grad_y, z, weight, bias, mean, rstd, training):
        grad_z = torch.empty_like(z)
        if grad_z.stride(2) != 1:  # the kernel's rule: C contiguous, else a contiguous grad_z
            grad_z = z.new_empty(z.shape)
        return grad_z, torch.empty_like(weight), torch.empty_like(weight)

    class _TowerNormRelu(torch.autograd.Function):
        """y differentiable in z, weight and bias; the running statistics ride along outside autograd."""

        @staticmethod
        def forward(ctx, running, training, momentum, eps, z, weight, bias):
            with _below_autograd():
                y, mean, rstd = forward(z, weight, bias, *running, training, momentum, eps)
            ctx.mark_non_differentiable(mean, rstd)
            ctx.save_for_backward(z, weight, bias, mean, rstd)
            ctx.training = training
            return y, mean, rstd

        @staticmethod
        def backward(ctx, grad_y, *_unused_grads):
            grads = _first_order(backward, grad_y, *ctx.saved_tensors, ctx.training)
            return None, None, None, None, *grads

    def _autograd_kernel(z, weight, bias, running_mean, running_var, training, momentum, eps):
        if torch.is_grad_enabled() and (z.requires_grad or weight.requires_grad or bias.requires_grad):
            return _TowerNormRelu.apply((running_mean, running_var), training, momentum, eps, z, weight, bias)
        with _below_autograd():
            return forward(z, weight, bias, running_mean, running_var, training, momentum, eps)

    _LIB.impl("compiled_tower_norm_relu_forward", _autograd_kernel, "Autograd")
