"""DomainNorm as Triton kernels: grouped batch statistics without a host sync, forward and backward.

SPEC sections 2 and 3. Rows are normalised with the statistics of their *group*: the row's domain in
paper mode, the whole batch (one group) in released mode. Paper mode in eval uses the running
statistics instead of batch ones.

How the batch statistics are reduced (used here and by the fused adapter cell in adapter_cell.py):
1. every program reduces its block of rows to, per group, (count, mean, M2) with a two-pass
   centred sum in registers, and stores them in a partials buffer (blocks, G, h);
2. one merge kernel per (group, column tile) folds the partials together with Chan's parallel
   formula (in its shifted form, see merge_group_stats_kernel), never E[x^2] - E[x]^2, which loses
   accuracy when |mean| >> std;
3. a normalise kernel applies the affine map.
Nothing reads a value back to the host, so the sequence is CUDA-graph capturable.

Backward: dbias and dweight are plain per-group sums (partials + torch.sum); the input gradient is
    do = rstd * w * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n_var)
with n_var = n (paper, biased variance) or max(n - 1, 1) (released, unbiased variance); in eval
with running statistics it is rstd * w * dy. A group with one row has xhat = 0 and do = 0: no NaN.

Layout: ``reference`` math lives in hamur_fast.ops.backends.reference; here come the kernels, then the
launchers; the custom ops over them (backend="triton") are in hamur_fast/ops/backends/triton.py.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # tl.dot needs every block dimension >= 16 on the GPU


def on_first_tensors_device(launcher):
    """Run ``launcher`` with its first argument's device current. Triton launches on the current device and
    that device's current torch stream, so cuda:1 tensors given while cuda:0 is current would otherwise be
    read by a kernel on cuda:0."""
    @functools.wraps(launcher)
    def guarded(first, *args, **kwargs):
        guard = torch.cuda.device(first.device) if first.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            return launcher(first, *args, **kwargs)
    return guarded


def block_size(n: int, cap: int | None = None) -> int:
    """Power of two >= n (tl.arange needs powers of two) and >= 16, optionally capped."""
    size = max(MIN_DOT, triton.next_power_of_2(n))
    return min(size, cap) if cap else size


# --------------------------------------------------------------------------------------------------
# Kernels and the jit helpers the adapter cell shares
# --------------------------------------------------------------------------------------------------
@triton.jit
def store_group_partial_stats(o, group, row_mask, cols, col_mask, block, num_groups, width,
                              part_count, part_mean, part_m2, write_count):
    """Reduce a (rows, cols) tile to per-group (count, mean, M2) and store them at slot ``block``.

    Two passes over the registers (mean first, then centred squares), so M2 is accurate.
    """
    for g in range(num_groups):
        in_group = row_mask & (group == g)
        count = tl.sum(in_group.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(in_group[:, None], o, 0.0), axis=0) / tl.maximum(count, 1.0)
        centred = tl.where(in_group[:, None], o - mean[None, :], 0.0)
        m2 = tl.sum(centred * centred, axis=0)
        slot = block.to(tl.int64) * num_groups + g
        tl.store(part_mean + slot * width + cols, mean, mask=col_mask)
        tl.store(part_m2 + slot * width + cols, m2, mask=col_mask)
        tl.store(part_count + slot, count, mask=write_count)


@triton.jit
def store_group_partial_sums(dy, dy_xhat, group, row_mask, cols, col_mask, block, num_groups, width,
                             part_dy, part_dy_xhat):
    """Per-group column sums of dy and dy * xhat for this tile (the norm bias and weight gradients)."""
    for g in range(num_groups):
        in_group = (row_mask & (group == g))[:, None]
        slot = block.to(tl.int64) * num_groups + g
        tl.store(part_dy + slot * width + cols, tl.sum(tl.where(in_group, dy, 0.0), axis=0), mask=col_mask)
        tl.store(part_dy_xhat + slot * width + cols, tl.sum(tl.where(in_group, dy_xhat, 0.0), axis=0),
                 mask=col_mask)


@triton.jit
def load_group_rows(table, group, cols, row_mask, col_mask, width, PER_DOMAIN: tl.constexpr):
    """Row b gets ``table[group[b], cols]`` (a (G, width) table), as fp32.

    With one group (released mode) the row of the table is loaded once and broadcast: a (rows, cols)
    load whose rows all point at the same addresses compiled, for sm_90a, to a kernel of 32 registers
    and kilobytes of spills.
    """
    if PER_DOMAIN:
        offsets = group.to(tl.int64)[:, None] * width + cols[None, :]
        values = tl.load(table + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        values = tl.load(table + cols, mask=col_mask, other=0.0)[None, :]
    return values.to(tl.float32)


@triton.jit
def merge_group_stats_kernel(part_count, part_mean, part_m2, num_parts, parts_per_program, num_groups, width, eps,
                             count_out, mean_out, m2_out, rstd_out,
                             UNBIASED: tl.constexpr, FINAL: tl.constexpr, BLOCK_P: tl.constexpr,
                             BLOCK_H: tl.constexpr):
    """Fold a range of per-block partials of one group and one column tile into count, mean and M2
    (stored at slot program_id(2)), and, in the FINAL pass (one range), rstd.

    Chan's parallel formula, written around a shift c (the first non-empty chunk's mean):
        mean = c + S1 / n,  M2 = sum M2_i + S2 - S1^2 / n,  S1 = sum n_i (mean_i - c), S2 = sum n_i (mean_i - c)^2.
    Because c lies within a few block standard errors of the mean, every mean_i - c is computed exactly
    and S2 - S1^2 / n only cancels the small between-block part, so M2 keeps fp32 accuracy even when
    |mean| >> std (where fp32 E[x^2] - E[x]^2 returns noise).
    """
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < width
    first = tl.program_id(2) * parts_per_program
    last = tl.minimum(first + parts_per_program, num_parts)
    count = tl.sum(tl.zeros([BLOCK_P], tl.float32), axis=0)
    shift = tl.zeros([BLOCK_H], tl.float32)
    sum_dev = tl.zeros([BLOCK_H], tl.float32)
    sum_dev_sq = tl.zeros([BLOCK_H], tl.float32)
    sum_m2 = tl.zeros([BLOCK_H], tl.float32)
    for p0 in range(first, last, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        slot = parts.to(tl.int64) * num_groups + g
        part_mask = parts < last
        n_i = tl.load(part_count + slot, mask=part_mask, other=0.0)
        tile_mask = part_mask[:, None] & col_mask[None, :]
        tile = slot[:, None] * width + cols[None, :]
        mean_i = tl.load(part_mean + tile, mask=tile_mask, other=0.0)
        n_chunk = tl.sum(n_i, axis=0)
        chunk_mean = tl.sum(n_i[:, None] * mean_i, axis=0) / tl.maximum(n_chunk, 1.0)
        shift = tl.where(count > 0.0, shift, chunk_mean)  # fixed by the first chunk that has rows
        dev = tl.where(n_i[:, None] > 0.0, mean_i - shift[None, :], 0.0)
        sum_dev += tl.sum(n_i[:, None] * dev, axis=0)
        sum_dev_sq += tl.sum(n_i[:, None] * dev * dev, axis=0)
        sum_m2 += tl.sum(tl.load(part_m2 + tile, mask=tile_mask, other=0.0), axis=0)
        count += n_chunk
    mean_dev = sum_dev / tl.maximum(count, 1.0)
    mean = shift + mean_dev
    m2 = sum_m2 + tl.maximum(sum_dev_sq - sum_dev * mean_dev, 0.0)
    out_slot = tl.program_id(2).to(tl.int64) * num_groups + g
    out = out_slot * width + cols
    tl.store(mean_out + out, mean, mask=col_mask)
    tl.store(m2_out + out, m2, mask=col_mask)
    tl.store(count_out + out_slot, count, mask=tl.program_id(1) == 0)
    if FINAL:
        divisor = tl.maximum(count - 1.0, 1.0) if UNBIASED else tl.maximum(count, 1.0)
        tl.store(rstd_out + out, 1.0 / tl.sqrt(m2 / divisor + eps), mask=col_mask)


@triton.jit
def _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr):
    """Each row's statistics group, and which rows have one: an id outside [0, G) (value checks off,
    torch.compile) becomes -1, indexes no table, joins no statistic, and its output row is NaN."""
    if PER_DOMAIN:
        group = tl.load(group_ids + rows, mask=row_mask, other=0)
        valid = row_mask & (group >= 0) & (group < num_groups)
        group = tl.where(valid, group, -1).to(tl.int32)
    else:
        group = tl.zeros([BLOCK_B], tl.int32)
        valid = row_mask
    return group, valid


@triton.jit
def _partial_stats_kernel(o, group_ids, part_count, part_mean, part_m2, batch, width, num_groups,
                          PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < batch, cols < width
    group, valid = _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN, BLOCK_B)
    tile = rows.to(tl.int64)[:, None] * width + cols[None, :]
    values = tl.load(o + tile, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    store_group_partial_stats(values, group, valid, cols, col_mask, tl.program_id(0), num_groups, width,
                              part_count, part_mean, part_m2, tl.program_id(1) == 0)


@triton.jit
def _normalize_kernel(o, group_ids, mean, rstd, weight, bias, y, batch, width, num_groups,
                      PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < batch, cols < width
    group, valid = _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN, BLOCK_B)
    tile = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    values = tl.load(o + tile, mask=mask, other=0.0).to(tl.float32)
    xhat = (values - load_group_rows(mean, group, cols, valid, col_mask, width, PER_DOMAIN)) * \
        load_group_rows(rstd, group, cols, valid, col_mask, width, PER_DOMAIN)
    out = load_group_rows(weight, group, cols, valid, col_mask, width, PER_DOMAIN) * xhat + \
        load_group_rows(bias, group, cols, valid, col_mask, width, PER_DOMAIN)
    tl.store(y + tile, tl.where(valid[:, None], out, float("nan")).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _partial_grad_sums_kernel(dy, o, group_ids, mean, rstd, part_dy, part_dy_xhat, batch, width, num_groups,
                              PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < batch, cols < width
    group, valid = _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN, BLOCK_B)
    tile = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    grad = tl.load(dy + tile, mask=mask, other=0.0).to(tl.float32)
    xhat = (tl.load(o + tile, mask=mask, other=0.0).to(tl.float32)
            - load_group_rows(mean, group, cols, valid, col_mask, width, PER_DOMAIN)) * \
        load_group_rows(rstd, group, cols, valid, col_mask, width, PER_DOMAIN)
    store_group_partial_sums(grad, grad * xhat, group, valid, cols, col_mask, tl.program_id(0), num_groups,
                             width, part_dy, part_dy_xhat)


@triton.jit
def norm_input_grad(grad, xhat, group, row_mask, cols, col_mask, width, weight, rstd, count, sum_dy, sum_dy_xhat,
                    BATCH_STATS: tl.constexpr, PER_DOMAIN: tl.constexpr):
    """d(normalised output)/d(input) applied to ``grad`` (see the module docstring). Paper mode (PER_DOMAIN)
    normalises with the biased per-domain variance, released mode with the unbiased whole-batch one."""
    scale = load_group_rows(weight, group, cols, row_mask, col_mask, width, PER_DOMAIN) * \
        load_group_rows(rstd, group, cols, row_mask, col_mask, width, PER_DOMAIN)
    if BATCH_STATS:
        if PER_DOMAIN:
            n = tl.load(count + group, mask=row_mask, other=1.0)[:, None]
            n_var = n
        else:
            n = tl.load(count)
            n_var = tl.maximum(n - 1.0, 1.0)
        grad = grad - load_group_rows(sum_dy, group, cols, row_mask, col_mask, width, PER_DOMAIN) / n \
            - xhat * load_group_rows(sum_dy_xhat, group, cols, row_mask, col_mask, width, PER_DOMAIN) / n_var
    return scale * grad


@triton.jit
def _input_grad_kernel(dy, o, group_ids, mean, rstd, weight, count, sum_dy, sum_dy_xhat, do, batch, width, num_groups,
                       PER_DOMAIN: tl.constexpr, BATCH_STATS: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < batch, cols < width
    group, valid = _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN, BLOCK_B)
    tile = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    grad = tl.load(dy + tile, mask=mask, other=0.0).to(tl.float32)
    xhat = (tl.load(o + tile, mask=mask, other=0.0).to(tl.float32)
            - load_group_rows(mean, group, cols, valid, col_mask, width, PER_DOMAIN)) * \
        load_group_rows(rstd, group, cols, valid, col_mask, width, PER_DOMAIN)
    out = norm_input_grad(grad, xhat, group, valid, cols, col_mask, width, weight, rstd, count, sum_dy,
                          sum_dy_xhat, BATCH_STATS, PER_DOMAIN)
    tl.store(do + tile, tl.where(valid[:, None], out, float("nan")).to(do.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers. ``empty`` allocates every output and scratch buffer; tests pass a NaN-filling allocator
# to prove that the kernels write every element they hand back.
# --------------------------------------------------------------------------------------------------
ROWS_PER_BLOCK = 32
MERGE_PARTS_PER_STEP = 64
MERGE_PARTS_PER_PROGRAM = 4 * MERGE_PARTS_PER_STEP
# Warps and tile caps chosen from the register reports of ptxas for sm_90a (compiled here, no GPU run):
# at 4 warps the (32, 128) row tiles with their gathered per-group tables spilled; so did a (64, 128)
# tile of partials in the merge.
TILE_WARPS = 8
MERGE_COLS = 32


def _merge_pass(part_count, part_mean, part_m2, ranges, eps, unbiased, empty):
    """One launch: ``ranges`` programs per (group, column tile), each folding a contiguous range of partials."""
    num_parts, num_groups, width = part_mean.shape
    f32 = dict(device=part_mean.device, dtype=torch.float32)
    count = empty((ranges, num_groups), **f32)
    mean, m2 = empty((ranges, num_groups, width), **f32), empty((ranges, num_groups, width), **f32)
    final = ranges == 1
    rstd = empty((num_groups, width), **f32) if final else mean
    block_h = block_size(width, MERGE_COLS)
    merge_group_stats_kernel[(num_groups, triton.cdiv(width, block_h), ranges)](
        part_count, part_mean, part_m2, num_parts, triton.cdiv(num_parts, ranges), num_groups, width, eps,
        count, mean, m2, rstd, UNBIASED=unbiased, FINAL=final, BLOCK_P=MERGE_PARTS_PER_STEP, BLOCK_H=block_h)
    return count, mean, m2, rstd


@on_first_tensors_device
def merge_group_stats(part_count, part_mean, part_m2, eps: float, unbiased: bool, empty=torch.empty):
    """Fold (blocks, G[, h]) partials into per-group count (G,), mean, M2 and rstd (G, h), all fp32.

    Many partials (B = 65536 gives 4096 blocks) are first folded by many programs in parallel, range by
    range, then once more: a single pass would leave a handful of programs looping over all of them.
    """
    if part_mean.shape[0] > MERGE_PARTS_PER_PROGRAM:
        ranges = triton.cdiv(part_mean.shape[0], MERGE_PARTS_PER_PROGRAM)
        part_count, part_mean, part_m2, _ = _merge_pass(part_count, part_mean, part_m2, ranges, eps, unbiased,
                                                        empty)
    count, mean, m2, rstd = _merge_pass(part_count, part_mean, part_m2, 1, eps, unbiased, empty)
    return count[0], mean[0], m2[0], rstd


def _tiles(o, per_domain):
    """Grid (row blocks, column tiles) and meta-parameters of the row-tile kernels on o (B, h)."""
    batch, width = o.shape
    block_h = block_size(width, 128)
    grid = (triton.cdiv(batch, ROWS_PER_BLOCK), triton.cdiv(width, block_h))
    return grid, dict(PER_DOMAIN=per_domain, BLOCK_B=ROWS_PER_BLOCK, BLOCK_H=block_h, num_warps=TILE_WARPS)


def _group_ids(o, groups):
    """(the ids the kernels read, per_domain): groups None is one group of all rows, whose ids no kernel reads."""
    if groups is None:
        return torch.zeros(1, device=o.device, dtype=torch.int64), False
    return groups.contiguous(), True


def _partial_stats(o, group_ids, num_groups, per_domain, empty):
    grid, meta = _tiles(o, per_domain)
    part_count = empty((grid[0], num_groups), device=o.device, dtype=torch.float32)
    part_mean, part_m2 = (empty((grid[0], num_groups, o.shape[1]), device=o.device, dtype=torch.float32)
                          for _ in range(2))
    _partial_stats_kernel[grid](o, group_ids, part_count, part_mean, part_m2, *o.shape, num_groups, **meta)
    return part_count, part_mean, part_m2


# The split passes (hamur_fast.ops.contract.NormPasses): a data-parallel step runs a collective between them.
# Statistics, sums and the tables handed in are float32; y and do come in o's dtype.
@on_first_tensors_device
def group_statistics(o, groups, num_groups: int, empty=torch.empty):
    """This process's per-group (count (G,), mean (G, h), M2 (G, h)) of o's rows."""
    o = o.contiguous()
    group_ids, per_domain = _group_ids(o, groups)
    parts = _partial_stats(o, group_ids, num_groups if per_domain else 1, per_domain, empty)
    count, mean, m2, _rstd = merge_group_stats(*parts, 0.0, False, empty)
    return count, mean, m2


@on_first_tensors_device
def normalise(o, groups, weight, bias, mean, rstd, empty=torch.empty):
    """y = weight[g] (o - mean[g]) rstd[g] + bias[g] with the given per-group tables (G, h)."""
    o, weight, bias = o.contiguous(), weight.contiguous(), bias.contiguous()
    group_ids, per_domain = _group_ids(o, groups)
    grid, meta = _tiles(o, per_domain)
    y = empty(o.shape, device=o.device, dtype=o.dtype)
    _normalize_kernel[grid](o, group_ids, mean.float().contiguous(), rstd.float().contiguous(), weight, bias, y,
                            *o.shape, mean.shape[0], **meta)
    return y


@on_first_tensors_device
def grad_sums(dy, o, groups, mean, rstd, num_groups: int, empty=torch.empty):
    """Per-group column sums (sum_dy, sum_dy_xhat), each (G, h) float32, of this process's rows."""
    dy, o = dy.contiguous(), o.contiguous()
    group_ids, per_domain = _group_ids(o, groups)
    grid, meta = _tiles(o, per_domain)
    part_dy, part_dy_xhat = (empty((grid[0], num_groups, o.shape[1]), device=o.device, dtype=torch.float32)
                             for _ in range(2))
    _partial_grad_sums_kernel[grid](dy, o, group_ids, mean.float().contiguous(), rstd.float().contiguous(), part_dy,
                                    part_dy_xhat, *o.shape, num_groups, **meta)
    return part_dy.sum(0), part_dy_xhat.sum(0)


@on_first_tensors_device
def input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, unbiased: bool, empty=torch.empty):
    """do = rstd w (dy - sum_dy / n - xhat sum_dy_xhat / n_var) from the given count and sums.

    The kernel divides by the variance's own denominator (n per domain, max(n - 1, 1) for one group); another one
    (a biased one-group BatchNorm) is reached by rescaling sum_dy_xhat here."""
    dy, o, weight = dy.contiguous(), o.contiguous(), weight.contiguous()
    group_ids, per_domain = _group_ids(o, groups)
    count = count.float().contiguous()
    sum_dy_xhat = sum_dy_xhat.float()
    if unbiased == per_domain:
        biased, unbiased_n = count.clamp(min=1), (count - 1).clamp(min=1)
        ratio = biased / unbiased_n if per_domain else unbiased_n / biased  # kernel's n_var / wanted n_var
        sum_dy_xhat = sum_dy_xhat * ratio.unsqueeze(1)
    grid, meta = _tiles(o, per_domain)
    do = empty(o.shape, device=o.device, dtype=o.dtype)
    _input_grad_kernel[grid](dy, o, group_ids, mean.float().contiguous(), rstd.float().contiguous(), weight, count,
                             sum_dy.float().contiguous(), sum_dy_xhat.contiguous(), do, *o.shape, mean.shape[0],
                             BATCH_STATS=True, **meta)
    return do


# The op in one piece: the same passes with this process's statistics, as backend="triton" runs it.
@on_first_tensors_device
def domain_norm_forward(o, domain, weight, bias, running_mean, running_var, use_batch_stats: bool, eps: float,
                        empty=torch.empty):
    """Returns y and, for backward and the running-stat update, count (G,), mean, m2, rstd (G, h)."""
    o, domain = o.contiguous(), domain.contiguous()
    per_domain = weight.dim() == 2
    groups = domain if per_domain else None
    num_groups = weight.shape[0] if per_domain else 1
    if use_batch_stats:
        parts = _partial_stats(o, _group_ids(o, groups)[0], num_groups, per_domain, empty)
        count, mean, m2, rstd = merge_group_stats(*parts, eps, not per_domain, empty)
    else:  # paper mode in eval: the running statistics, no dependence on the rest of the batch
        mean = running_mean.float().clone()
        rstd = torch.rsqrt(running_var.float() + eps)
        count = torch.zeros(num_groups, device=o.device, dtype=torch.float32)
        m2 = torch.zeros_like(mean)
    return normalise(o, groups, weight, bias, mean, rstd, empty), count, mean, m2, rstd


@on_first_tensors_device
def domain_norm_backward(dy, o, domain, weight, count, mean, rstd, use_batch_stats: bool, empty=torch.empty):
    """Returns (do, dweight, dbias) for y = weight[g] * (o - mean[g]) * rstd[g] + bias[g]."""
    dy, o, domain, weight = (t.contiguous() for t in (dy, o, domain, weight))
    per_domain = weight.dim() == 2
    groups = domain if per_domain else None
    sum_dy, sum_dy_xhat = grad_sums(dy, o, groups, mean, rstd, mean.shape[0], empty)
    if use_batch_stats:
        do = input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, not per_domain, empty)
    else:  # running statistics: do = rstd w dy
        grid, meta = _tiles(o, per_domain)
        do = empty(o.shape, device=o.device, dtype=o.dtype)
        _input_grad_kernel[grid](dy, o, _group_ids(o, groups)[0], mean, rstd, weight, count, sum_dy, sum_dy_xhat,
                                 do, *o.shape, mean.shape[0], BATCH_STATS=False, **meta)
    shape = weight.shape
    return do, sum_dy_xhat.reshape(shape).to(weight.dtype), sum_dy.reshape(shape).to(weight.dtype)
