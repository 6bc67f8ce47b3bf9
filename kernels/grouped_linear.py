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
- Backward dW / db (``domain_weight_grads``, also the adapter cell's factor gradients): the rows are cut
  into tiles of up to 256 rows of one domain; one program per (tile, input block, output block) sums
  ``x_r^T dy_r`` over its rows into a per-tile partial, and a second kernel sums each domain's
  (contiguous) range of partials in a fixed order. O(B * in * out) work and O((B / 256 + D) * in * out)
  scratch whatever D is, many programs even when D is small, deterministic (no atomics). A domain
  without rows gets exact zeros.
- Ids outside [0, D) (rejected by the checked op, but a kernel must stay memory-safe without the
  check) form one extra group whose rows get zeros and whose weights are never read.
- Row indices are int64; fp32 products use IEEE precision (TF32 would break the 1e-5 contract).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import arg_checks
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
def _weight_grad_partial_kernel(
        x, grad, order, offsets, tile_group, tile_first_row, partial, partial_bias,
        num_domains, in_features, out_features, stride_xb, stride_xi, stride_gb, stride_go,
        X_BY_ORDER: tl.constexpr, GRAD_BY_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        ROWS_PER_TILE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """partial[slot] = sum over this tile's rows r of x[r]^T grad[r] (and of grad[r]): one tile is up to
    ROWS_PER_TILE consecutive rows of one domain. x and grad rows are order[p] for sorted position p, or p
    itself when the caller stored them in sorted order already (the adapter cell's saved vectors)."""
    slot = tl.program_id(0)
    group = tl.load(tile_group + slot)
    if group >= num_domains:  # a grid slot past the real tiles, or the out-of-range ids: never summed
        return
    first = tl.load(tile_first_row + slot)
    stop = tl.minimum(first + ROWS_PER_TILE, tl.load(offsets + group + 1))
    ins = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    outs = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    in_mask, out_mask = ins < in_features, outs < out_features
    acc = tl.zeros([BLOCK_I, BLOCK_O], tl.float32)
    bias_acc = tl.zeros([BLOCK_O], tl.float32)
    for p0 in range(first, stop, BLOCK_R):
        pos = p0 + tl.arange(0, BLOCK_R)
        row_mask = pos < stop
        if X_BY_ORDER:
            x_rows = tl.load(order + pos, mask=row_mask, other=0).to(tl.int64)
        else:
            x_rows = pos.to(tl.int64)
        if GRAD_BY_ORDER:
            g_rows = tl.load(order + pos, mask=row_mask, other=0).to(tl.int64)
        else:
            g_rows = pos.to(tl.int64)
        x_t = tl.load(x + x_rows[None, :] * stride_xb + ins[:, None] * stride_xi,
                      mask=row_mask[None, :] & in_mask[:, None], other=0.0)
        g = tl.load(grad + g_rows[:, None] * stride_gb + outs[None, :] * stride_go,
                    mask=row_mask[:, None] & out_mask[None, :], other=0.0)
        if IEEE:  # fp32 involved (the adapter cell passes bf16 x with its fp32 saved vectors): all in fp32
            acc += tl.dot(x_t.to(tl.float32), g.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x_t, g)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(tl.float32), axis=0)
    base = slot.to(tl.int64) * in_features * out_features
    tl.store(partial + base + ins[:, None] * out_features + outs[None, :], acc,
             mask=in_mask[:, None] & out_mask[None, :])
    if HAS_BIAS:
        first_in_block = (tl.zeros([BLOCK_O], tl.int32) + tl.program_id(1)) == 0  # vector: the interpreter wants it
        tl.store(partial_bias + slot.to(tl.int64) * out_features + outs, bias_acc, mask=out_mask & first_in_block)


@triton.jit
def _sum_domain_tiles_kernel(partial, tile_end, out, tile_count, width, BLOCK: tl.constexpr):
    """out[d] = sum of partial[s] over domain d's tiles s (a contiguous range of slots): a fixed order,
    so the sums are deterministic (no atomics). A domain without rows gets zeros."""
    d = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    stop = tl.load(tile_end + d)
    start = stop - tl.load(tile_count + d)
    acc = tl.zeros([BLOCK], tl.float32)
    rows = partial + start.to(tl.int64) * width + cols
    for _ in range(start, stop):
        acc += tl.load(rows, mask=mask, other=0.0)
        rows += width
    tl.store(out + d.to(tl.int64) * width + cols, acc.to(out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers. ``empty`` allocates every buffer a kernel fills; the tests pass a NaN-filling allocator
# to prove that everything handed back was written.
# --------------------------------------------------------------------------------------------------
def rows_per_tile(batch: int, num_domains: int) -> int:
    """16 rows (the least tl.dot takes) when domains are small on average, 64 otherwise."""
    return 16 if batch < 64 * num_domains else 64


def tile_map(offsets: torch.Tensor, batch: int, block_m: int):
    """(group, first sorted position) of every grid slot, and per group its tile count and end slot.

    ``offsets`` (D + 2,) as from domain_segments. Slots past the real tiles get group D + 1; the slot
    count cdiv(B, block_m) + D + 1 depends on shapes only, so the grid is static.
    """
    num_groups = offsets.shape[0] - 1  # D domains + the out-of-range group
    tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    slots = torch.arange(triton.cdiv(batch, block_m) + num_groups, device=offsets.device)
    group = torch.searchsorted(tile_end, slots, right=True)
    known = group.clamp(max=num_groups - 1)
    first = offsets[known] + (slots - (tile_end - tiles)[known]) * block_m
    return group.to(torch.int32), first, tiles, tile_end


def _launch_forward(x, order, offsets, weight_strides, num_domains, fan_in, fan_out, weight, bias, out):
    batch = x.shape[0]
    block_m = rows_per_tile(batch, num_domains)
    tile_group, first, _, _ = tile_map(offsets, batch, block_m)
    block_n = block_size(fan_out, 64)
    grid = (tile_group.shape[0], triton.cdiv(fan_out, block_n))
    _grouped_forward_kernel[grid](
        x, order, offsets, tile_group, first, weight, bias if bias is not None else weight, out,
        num_domains, fan_in, fan_out, x.stride(0), x.stride(1), *weight_strides,
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_size(fan_in, 32),
        num_warps=8 if block_m == 64 else 4)  # 64 rows at 4 warps spilled (ptxas, sm_90a)


def _check(op, x, order, offsets, weight):
    """x (B, in), order (B,), offsets (D + 2,) int64 (as from domain_segments), weight (D, in, out)."""
    args = arg_checks.Args(op, arg_checks.device_of(x, op)).tensor("x", x, "B in")
    args.tensor("weight", weight, "D in out")
    args.sizes["D+2"] = args.sizes["D"] + 2
    return args.ids("order", order).ids("offsets", offsets, "D+2").positive("B", "in", "out", "D")


def grouped_forward(x, order, offsets, weight, bias, empty=torch.empty):
    """x (B, in), weight (D, in, out) (any strides), bias (D, out) or None -> out (B, out), x's dtype."""
    _check("triton_grouped_linear_forward", x, order, offsets, weight).optional("bias", bias, "D out")
    num_domains, fan_in, fan_out = weight.shape
    out = empty((x.shape[0], fan_out), device=x.device, dtype=x.dtype)
    bias = bias.contiguous() if bias is not None else None
    _launch_forward(x, order, offsets, weight.stride(), num_domains, fan_in, fan_out, weight, bias, out)
    return out


def grouped_backward(grad, x, order, offsets, weight, with_bias: bool, empty=torch.empty):
    """(dx (B, in), dweight (D, in, out), dbias (D, out), or an empty (0,) tensor without bias)."""
    _check("triton_grouped_linear_backward", x, order, offsets, weight).tensor("grad", grad, "B out")
    num_domains, fan_in, fan_out = weight.shape
    dx = empty(x.shape, device=x.device, dtype=x.dtype)
    stride_d, stride_i, stride_o = weight.stride()
    # dx[b] = grad[b] @ W[d]^T: the forward kernel on the transposed weight, no bias
    _launch_forward(grad, order, offsets, (stride_d, stride_o, stride_i), num_domains, fan_out, fan_in,
                    weight, None, dx)
    dweight, dbias = domain_weight_grads(x, grad, order, offsets, num_domains, with_bias, weight.dtype,
                                         x_by_order=True, grad_by_order=True, empty=empty)
    return dx, dweight, dbias if with_bias else empty((0,), device=x.device, dtype=weight.dtype)


# Rows per weight-gradient tile: enough work per program to amortise its (in, out) partial, few enough
# that a few large domains still spread over many programs.
WEIGHT_GRAD_ROWS = 256


def domain_weight_grads(x, grad, order, offsets, num_domains: int, with_bias: bool, dtype,
                        x_by_order: bool, grad_by_order: bool, empty=torch.empty):
    """Per domain d: ``sum over d's rows of x[r]^T grad[r]`` (D, in, out) and, with_bias, ``sum of grad[r]``
    (D, out), in ``dtype``.

    Rows of domain d are the sorted positions offsets[d]:offsets[d+1]; x / grad rows are ``order[p]`` or
    ``p`` (``x_by_order``, ``grad_by_order``). Split into tiles of WEIGHT_GRAD_ROWS rows of one domain, each
    tile's partial sum is summed per domain in slot order: O(B in out) work and O((B / 256 + D) in out)
    scratch memory, whatever D is, no atomics.
    """
    batch, fan_in = x.shape
    fan_out = grad.shape[1]
    tile_group, first, tile_count, tile_end = tile_map(offsets, batch, WEIGHT_GRAD_ROWS)
    slots = tile_group.shape[0]
    f32 = dict(device=x.device, dtype=torch.float32)
    partial = empty((slots, fan_in, fan_out), **f32)
    partial_bias = empty((slots, fan_out), **f32) if with_bias else partial
    block_i, block_o = block_size(fan_in, 64), block_size(fan_out, 64)
    _weight_grad_partial_kernel[(slots, triton.cdiv(fan_in, block_i), triton.cdiv(fan_out, block_o))](
        x, grad, order, offsets, tile_group, first, partial, partial_bias,
        num_domains, fan_in, fan_out, x.stride(0), x.stride(1), grad.stride(0), grad.stride(1),
        X_BY_ORDER=x_by_order, GRAD_BY_ORDER=grad_by_order, HAS_BIAS=with_bias,
        IEEE=x.dtype == torch.float32 or grad.dtype == torch.float32,
        ROWS_PER_TILE=WEIGHT_GRAD_ROWS, BLOCK_I=block_i, BLOCK_O=block_o, BLOCK_R=32)

    def per_domain(partials, width):
        out = empty((num_domains, width), device=x.device, dtype=dtype)
        block = block_size(width, 1024)
        _sum_domain_tiles_kernel[(num_domains, triton.cdiv(width, block))](
            partials, tile_end, out, tile_count, width, BLOCK=block)
        return out

    dweight = per_domain(partial, fan_in * fan_out).view(num_domains, fan_in, fan_out)
    dbias = per_domain(partial_bias, fan_out) if with_bias else None
    return dweight, dbias
