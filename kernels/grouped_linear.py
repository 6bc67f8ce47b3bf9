"""The grouped per-domain linear op as Triton kernels: ``out[b] = x[b] @ W[d_b] + bias[d_b]``.

The MoE grouped GEMM with hard routing by domain id (as vLLM's fused MoE runs experts on sorted rows):
the caller (hamur_fast.ops.grouped_linear.domain_segments) sorts the rows by domain on the device and
gives segment offsets; nothing here reads a value back to the host, and every grid depends only on
shapes, so a launch is CUDA-graph capturable.

- Forward: one program per (tile, column block). A tile is a block of up to BLOCK_M consecutive
  rows of one domain, so it meets one weight matrix and runs plain ``tl.dot`` over the input width.
  The number of tiles is at most ``cdiv(B, BLOCK_M) + D + 1`` (each group adds at most one partial
  tile), which fixes the grid from the shapes alone; programs past the real tiles return at once.
  The (tile -> domain, first row) map is computed by torch ops on the device (cumsum, searchsorted).
- Backward dX is the same kernel on ``W[d]^T`` (strides swapped, no bias).
- Backward dW / db: one program per (domain, input block, output block), summing ``x_r^T dy_r`` over
  that domain's rows only, so the work is O(B * in * out) whatever D is. A domain without rows gets
  exact zeros.
- Ids outside [0, D) (rejected by the checked op, but a kernel must stay memory-safe without the
  check) form one extra group whose rows get zeros and whose weights are never read.
- Row indices are int64; fp32 products use IEEE precision (TF32 would break the 1e-5 contract).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .domain_norm import block_size


@triton.jit
def _grouped_forward_kernel(
        x, order, offsets, tile_group, tile_first_row, weight, bias, out,
        num_domains, in_features, out_features,
        stride_xb, stride_xi, stride_wd, stride_wi, stride_wo, stride_bd,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[order[p]] = x[order[p]] @ W[g] (+ b[g]) for the BLOCK_M positions p of one tile of group g."""
    tile = tl.program_id(0)
    group = tl.load(tile_group + tile)
    if group > num_domains:  # a grid slot past the real tiles
        return
    first = tl.load(tile_first_row + tile)
    stop = tl.load(offsets + group + 1)
    pos = first + tl.arange(0, BLOCK_M)
    row_mask = pos < stop
    rows = tl.load(order + pos, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if group < num_domains:  # group == num_domains holds out-of-range ids: their rows get zeros
        w_base = weight + group.to(tl.int64) * stride_wd
        for k0 in range(0, in_features, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < in_features
            a = tl.load(x + rows[:, None] * stride_xb + ks[None, :] * stride_xi,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_base + ks[:, None] * stride_wi + cols[None, :] * stride_wo,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
        if HAS_BIAS:
            acc += tl.load(bias + group.to(tl.int64) * stride_bd + cols, mask=col_mask, other=0.0)[None, :]
    tl.store(out + rows[:, None] * out_features + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _grouped_weight_grad_kernel(
        x, grad, order, offsets, dweight, dbias, in_features, out_features,
        stride_xb, stride_xi, stride_gb, stride_go,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """dW[d] = sum over domain d's rows r of x[r]^T grad[r] (and db[d] = sum of grad[r]), one tile."""
    group = tl.program_id(0)
    ins = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    outs = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_mask, out_mask = ins < in_features, outs < out_features
    start = tl.load(offsets + group)
    stop = tl.load(offsets + group + 1)
    acc = tl.zeros([BLOCK_I, BLOCK_O], tl.float32)
    bias_acc = tl.zeros([BLOCK_O], tl.float32)
    for p0 in range(start, stop, BLOCK_R):
        pos = p0 + tl.arange(0, BLOCK_R)
        row_mask = pos < stop
        rows = tl.load(order + pos, mask=row_mask, other=0).to(tl.int64)
        x_t = tl.load(x + rows[None, :] * stride_xb + ins[:, None] * stride_xi,
                      mask=row_mask[None, :] & in_mask[:, None], other=0.0)
        g = tl.load(grad + rows[:, None] * stride_gb + outs[None, :] * stride_go,
                    mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x_t, g, input_precision="ieee")
        else:
            acc += tl.dot(x_t, g)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
    base = group.to(tl.int64) * in_features * out_features
    tl.store(dweight + base + ins[:, None] * out_features + outs[None, :], acc.to(dweight.dtype.element_ty),
             mask=in_mask[:, None] & out_mask[None, :])
    if HAS_BIAS:
        first_in_block = (tl.zeros([BLOCK_O], tl.int32) + tl.program_id(1)) == 0  # vector: the interpreter wants it
        tl.store(dbias + group.to(tl.int64) * out_features + outs, bias_acc.to(dbias.dtype.element_ty),
                 mask=out_mask & first_in_block)


# --------------------------------------------------------------------------------------------------
# Launchers. ``empty`` allocates every buffer a kernel fills; the tests pass a NaN-filling allocator
# to prove that everything handed back was written.
# --------------------------------------------------------------------------------------------------
def rows_per_tile(batch: int, num_domains: int) -> int:
    """16 rows (the least tl.dot takes) when domains are small on average, 64 otherwise."""
    return 16 if batch < 64 * num_domains else 64


def tile_map(offsets: torch.Tensor, batch: int, block_m: int):
    """(group, first sorted position) of every grid slot; slots past the real tiles get group D + 1.

    ``offsets`` (D + 2,) as from domain_segments; the slot count cdiv(B, block_m) + D + 1 depends on
    shapes only, so the grid is static.
    """
    num_groups = offsets.shape[0] - 1  # D domains + the out-of-range group
    tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    slots = torch.arange(triton.cdiv(batch, block_m) + num_groups, device=offsets.device)
    group = torch.searchsorted(tile_end, slots, right=True)
    known = group.clamp(max=num_groups - 1)
    first = offsets[known] + (slots - (tile_end - tiles)[known]) * block_m
    return group.to(torch.int32), first


def _launch_forward(x, order, offsets, weight_strides, num_domains, fan_in, fan_out, weight, bias, out):
    batch = x.shape[0]
    block_m = rows_per_tile(batch, num_domains)
    tile_group, first = tile_map(offsets, batch, block_m)
    block_n = block_size(fan_out, 64)
    grid = (tile_group.shape[0], triton.cdiv(fan_out, block_n))
    _grouped_forward_kernel[grid](
        x, order, offsets, tile_group, first, weight, bias if bias is not None else weight, out,
        num_domains, fan_in, fan_out, x.stride(0), x.stride(1), *weight_strides,
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_size(fan_in, 32))


def grouped_forward(x, order, offsets, weight, bias, empty=torch.empty):
    """x (B, in), weight (D, in, out) (any strides), bias (D, out) or None -> out (B, out), x's dtype."""
    num_domains, fan_in, fan_out = weight.shape
    out = empty((x.shape[0], fan_out), device=x.device, dtype=x.dtype)
    bias = bias.contiguous() if bias is not None else None
    _launch_forward(x, order, offsets, weight.stride(), num_domains, fan_in, fan_out, weight, bias, out)
    return out


def grouped_backward(grad, x, order, offsets, weight, with_bias: bool, empty=torch.empty):
    """(dx (B, in), dweight (D, in, out), dbias (D, out), or an empty (0,) tensor without bias)."""
    num_domains, fan_in, fan_out = weight.shape
    dx = empty(x.shape, device=x.device, dtype=x.dtype)
    stride_d, stride_i, stride_o = weight.stride()
    # dx[b] = grad[b] @ W[d]^T: the forward kernel on the transposed weight, no bias
    _launch_forward(grad, order, offsets, (stride_d, stride_o, stride_i), num_domains, fan_out, fan_in,
                    weight, None, dx)
    dweight = empty((num_domains, fan_in, fan_out), device=x.device, dtype=weight.dtype)
    dbias = empty((num_domains, fan_out) if with_bias else (0,), device=x.device, dtype=weight.dtype)
    block_i, block_o = block_size(fan_in, 64), block_size(fan_out, 64)
    grid = (num_domains, triton.cdiv(fan_in, block_i), triton.cdiv(fan_out, block_o))
    _grouped_weight_grad_kernel[grid](
        x, grad, order, offsets, dweight, dbias if with_bias else dweight, fan_in, fan_out,
        x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
        HAS_BIAS=with_bias, IEEE=x.dtype == torch.float32,
        BLOCK_I=block_i, BLOCK_O=block_o, BLOCK_R=32)
    return dx, dweight, dbias
