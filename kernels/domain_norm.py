"""DomainNorm as Triton kernels: grouped batch statistics without a host sync, forward and backward.

SPEC sections 2 and 3. Rows are normalised with the statistics of their *group*: the row's domain in
paper mode, the whole batch (one group) in released mode. Paper mode in eval uses the running
statistics instead of batch ones.

How the batch statistics are reduced (used here and by the fused adapter cell in adapter_cell.py):
1. the rows are sorted by group on the device (paper mode; ``sort_groups``: argsort, then each group's
   sorted positions by searchsorted), so a group's rows are contiguous;
2. every program reduces its block of sorted rows to (mean, M2) per group present, with a two-pass
   centred sum in registers, visiting only the groups present (a data-dependent loop), and stores
   them compactly: the j-th group of the block in slot j of the block's min(rows, G) slots. Memory is
   O(B x h) whatever G is (GroupSegments says how a group's slot is found again);
3. one merge kernel per (group, column tile) folds the partials of that group's own blocks (its sorted
   positions say which) with Chan's parallel formula (in its shifted form, see
   merge_group_stats_kernel), never E[x^2] - E[x]^2, which loses accuracy when |mean| >> std; counts
   come from the positions, not from the partials;
4. a normalise kernel applies the affine map.
Nothing reads a value back to the host, so the sequence is CUDA-graph capturable.

Backward: dbias and dweight are plain per-group sums (partials in the same layout, merge_group_sums); the
input gradient is
    do = rstd * w * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n_var)
with n_var = n (paper, biased variance) or max(n - 1, 1) (released, unbiased variance); in eval
with running statistics it is rstd * w * dy. A group with one row has xhat = 0 and do = 0: no NaN.

Layout: ``reference`` math lives in hamur_fast.ops.backends.reference; here come the kernels, then the
launchers (the split passes); backend="triton" composes them into its fused forms in
hamur_fast/ops/backends/triton.py.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import arg_checks

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
# Rows sorted by statistics group, and the compact partials layout
# --------------------------------------------------------------------------------------------------
class GroupSegments(NamedTuple):
    """The rows sorted by statistics group on the device (argsort, searchsorted, cumsum: no host sync).

    Per-group partials are kept compact: a part (a block of ``rows`` consecutive sorted positions) holds
    at most min(rows, G) groups, so it gets that many slots, and the j-th group present in it (by id)
    takes slot j. Memory is then O(B x h) whatever G is (B rounded up to a block: one partial per row
    at most), never more than the (blocks, G, h) of one slot per group. A group g's slot in part p is
    ``p * slots + rank[g] - rank[first group of p]``, rank = the number of non-empty groups before g.
    One group (released mode) needs no sort: identity order, one slot per part.
    """
    order: torch.Tensor | None          # (B,) the row at each sorted position; None: identity
    domain_sorted: torch.Tensor | None  # (B,) the ids in sorted order (ids out of [0, G) sort to both ends)
    offsets: torch.Tensor               # (G + 2,) int64: group g's rows sit at positions [offsets[g], offsets[g + 1])
    rank: torch.Tensor | None           # (G,) int64, the number of non-empty groups before g
    num_groups: int
    batch: int

    def slots_per_part(self, rows: int) -> int:
        return min(rows, self.num_groups) if self.order is not None else 1

    def sorted_args(self, dummy):
        """(order, domain_sorted) kernel arguments; ``dummy`` (any tensor) where one group reads neither."""
        return (dummy, dummy) if self.order is None else (self.order, self.domain_sorted)


def sort_groups(domain, num_groups: int, per_domain: bool, order=None) -> GroupSegments:
    """``domain``'s rows sorted by group (stable; or in a given ``order``, that sort saved by a forward), with
    each group's sorted positions; see GroupSegments."""
    batch, device = domain.shape[0], domain.device
    if not per_domain:
        whole_batch = torch.arange(3, device=device).clamp(max=1) * batch  # [0, B, B], built on the device
        return GroupSegments(None, None, whole_batch, None, 1, batch)
    order = torch.argsort(domain, stable=True) if order is None else order
    domain_sorted = domain[order]
    offsets = torch.searchsorted(domain_sorted, torch.arange(num_groups + 2, device=device, dtype=domain.dtype))
    non_empty = (offsets[1:num_groups + 1] > offsets[:num_groups]).long()
    return GroupSegments(order, domain_sorted, offsets, torch.cumsum(non_empty, 0) - non_empty, num_groups, batch)


NO_GROUP: tl.constexpr = tl.constexpr(2 ** 31 - 1)  # above every id: "no group left" in the loops below


# --------------------------------------------------------------------------------------------------
# Kernels and the jit helpers the adapter cell shares
# --------------------------------------------------------------------------------------------------
@triton.jit
def store_group_partial_stats(o, group, row_mask, cols, col_mask, block, slots_per_part, width, part_mean, part_m2):
    """Reduce a (rows, cols) tile of group-sorted rows to (mean, M2) per group present and store the j-th
    group's at slot ``block * slots_per_part + j`` (see GroupSegments; the counts follow from the offsets).

    The loop visits only the groups present (next = the smallest id above the current one), so its cost
    follows the rows, not G. Two passes over the registers (mean first, then centred squares): M2 is accurate.
    """
    slot = block.to(tl.int64) * slots_per_part
    g = tl.min(tl.where(row_mask, group, NO_GROUP), axis=0)
    while g < NO_GROUP:
        in_group = row_mask & (group == g)
        count = tl.sum(in_group.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(in_group[:, None], o, 0.0), axis=0) / count
        centred = tl.where(in_group[:, None], o - mean[None, :], 0.0)
        tl.store(part_mean + slot * width + cols, mean, mask=col_mask)
        tl.store(part_m2 + slot * width + cols, tl.sum(centred * centred, axis=0), mask=col_mask)
        slot += 1
        g = tl.min(tl.where(row_mask & (group > g), group, NO_GROUP), axis=0)


@triton.jit
def store_group_partial_sums(dy, dy_xhat, group, row_mask, cols, col_mask, block, slots_per_part, width,
                             part_dy, part_dy_xhat):
    """Per-group column sums of dy and dy * xhat of a tile of group-sorted rows (the norm bias and weight
    gradients), in the slots of store_group_partial_stats."""
    slot = block.to(tl.int64) * slots_per_part
    g = tl.min(tl.where(row_mask, group, NO_GROUP), axis=0)
    while g < NO_GROUP:
        in_group = (row_mask & (group == g))[:, None]
        tl.store(part_dy + slot * width + cols, tl.sum(tl.where(in_group, dy, 0.0), axis=0), mask=col_mask)
        tl.store(part_dy_xhat + slot * width + cols, tl.sum(tl.where(in_group, dy_xhat, 0.0), axis=0),
                 mask=col_mask)
        slot += 1
        g = tl.min(tl.where(row_mask & (group > g), group, NO_GROUP), axis=0)


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
def normalized_tile(o, mean, rstd, group, cols, row_mask, width, PER_DOMAIN: tl.constexpr):
    """xhat = (o - mean[g]) * rstd[g] on a (rows, cols) tile of o."""
    col_mask = cols < width
    return (o - load_group_rows(mean, group, cols, row_mask, col_mask, width, PER_DOMAIN)) * \
        load_group_rows(rstd, group, cols, row_mask, col_mask, width, PER_DOMAIN)


@triton.jit
def _group_slot(parts, rows_per_part, slots_per_part, group_rank, domain_sorted, rank, first_valid, mask,
                PER_DOMAIN: tl.constexpr):
    """Slot of the group of rank ``group_rank`` in ``parts`` (which hold some of its rows): the part's first
    slot plus the number of non-empty groups between the part's first group and this one."""
    if PER_DOMAIN:
        lead = tl.load(domain_sorted + tl.maximum(parts * rows_per_part, first_valid), mask=mask, other=0)
        slot = parts * slots_per_part + group_rank - tl.load(rank + lead, mask=mask, other=0)
    else:
        slot = parts
    return slot


@triton.jit
def _group_parts(offsets, rank, rows_per_part, parts_per_program, PER_DOMAIN: tl.constexpr):
    """This program's group g (program_id(0)): its sorted positions [start, end), its rank, and the parts
    [first, last] of range program_id(2) that hold some of its rows (first > last when none)."""
    g = tl.program_id(0)
    start, end = tl.load(offsets + g), tl.load(offsets + g + 1)
    range_first = tl.program_id(2).to(tl.int64) * parts_per_program
    first = tl.maximum(start // rows_per_part, range_first)
    last = tl.minimum(tl.where(end > start, (end - 1) // rows_per_part, -1), range_first + parts_per_program - 1)
    group_rank = tl.load(rank + g) if PER_DOMAIN else 0
    return g, start, end, first, last, group_rank


@triton.jit
def _part_rows(parts, last, start, end, rows_per_part):
    """How many of the group's rows each part holds (0 past ``last``), and which parts hold any."""
    n_rows = tl.minimum(end, (parts + 1) * rows_per_part) - tl.maximum(start, parts * rows_per_part)
    mask = (parts <= last) & (n_rows > 0)
    return tl.where(mask, n_rows, 0).to(tl.float32), mask


@triton.jit
def merge_group_stats_kernel(part_mean, part_m2, offsets, domain_sorted, rank, rows_per_part, slots_per_part,
                             parts_per_program, out_slots_per_part, width, mean_out, m2_out, count_out, rstd_out,
                             eps, PER_DOMAIN: tl.constexpr, UNBIASED: tl.constexpr, FINAL: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Fold the partials of one group and one column tile held by a range of parts into count, mean and M2,
    stored at the group's slot of the range (a part of the next pass), or, in the FINAL pass (one range),
    at the group's row, with rstd. A group's rows are contiguous in sorted order, so its partials lie in
    the parts from offsets[g] // rows_per_part to (offsets[g + 1] - 1) // rows_per_part: the work and the
    reads follow the rows, not G.

    Chan's parallel formula, written around a shift c (the first non-empty chunk's mean):
        mean = c + S1 / n,  M2 = sum M2_i + S2 - S1^2 / n,  S1 = sum n_i (mean_i - c), S2 = sum n_i (mean_i - c)^2.
    Because c lies within a few block standard errors of the mean, every mean_i - c is computed exactly
    and S2 - S1^2 / n only cancels the small between-block part, so M2 keeps fp32 accuracy even when
    |mean| >> std (where fp32 E[x^2] - E[x]^2 returns noise).
    """
    g, start, end, first, last, group_rank = _group_parts(offsets, rank, rows_per_part, parts_per_program,
                                                          PER_DOMAIN)
    first_valid = tl.load(offsets)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < width
    count = tl.full([], 0.0, tl.float32)
    shift = tl.full([BLOCK_H], 0.0, tl.float32)
    sum_dev = tl.full([BLOCK_H], 0.0, tl.float32)
    sum_dev_sq = tl.full([BLOCK_H], 0.0, tl.float32)
    sum_m2 = tl.full([BLOCK_H], 0.0, tl.float32)
    for p0 in range(first, last + 1, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        n_i, part_mask = _part_rows(parts, last, start, end, rows_per_part)
        slot = _group_slot(parts, rows_per_part, slots_per_part, group_rank, domain_sorted, rank, first_valid,
                           part_mask, PER_DOMAIN)
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
    if FINAL:
        out = g.to(tl.int64) * width + cols
        tl.store(mean_out + out, mean, mask=col_mask)
        tl.store(m2_out + out, m2, mask=col_mask)
        tl.store(count_out + g, count, mask=tl.program_id(1) == 0)
        divisor = tl.maximum(count - 1.0, 1.0) if UNBIASED else tl.maximum(count, 1.0)
        tl.store(rstd_out + out, 1.0 / tl.sqrt(m2 / divisor + eps), mask=col_mask)
    else:
        out_slot = _group_slot(tl.program_id(2).to(tl.int64), rows_per_part * parts_per_program,
                               out_slots_per_part, group_rank, domain_sorted, rank, first_valid, count > 0.0,
                               PER_DOMAIN)
        out = out_slot * width + cols
        written = col_mask & (count + tl.full([BLOCK_H], 0.0, tl.float32) > 0.0)  # broadcast: scalar & vector masks
        tl.store(mean_out + out, mean, mask=written)
        tl.store(m2_out + out, m2, mask=written)


@triton.jit
def merge_group_sums_kernel(part_a, part_b, offsets, domain_sorted, rank, rows_per_part, slots_per_part,
                            parts_per_program, out_slots_per_part, width, a_out, b_out,
                            PER_DOMAIN: tl.constexpr, FINAL: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_H: tl.constexpr):
    """The plain per-group sums of two partials (dy and dy * xhat), over the parts of merge_group_stats_kernel."""
    g, start, end, first, last, group_rank = _group_parts(offsets, rank, rows_per_part, parts_per_program,
                                                          PER_DOMAIN)
    first_valid = tl.load(offsets)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < width
    count = tl.full([], 0.0, tl.float32)
    sum_a = tl.full([BLOCK_H], 0.0, tl.float32)
    sum_b = tl.full([BLOCK_H], 0.0, tl.float32)
    for p0 in range(first, last + 1, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        n_i, part_mask = _part_rows(parts, last, start, end, rows_per_part)
        slot = _group_slot(parts, rows_per_part, slots_per_part, group_rank, domain_sorted, rank, first_valid,
                           part_mask, PER_DOMAIN)
        tile_mask = part_mask[:, None] & col_mask[None, :]
        tile = slot[:, None] * width + cols[None, :]
        sum_a += tl.sum(tl.load(part_a + tile, mask=tile_mask, other=0.0), axis=0)
        sum_b += tl.sum(tl.load(part_b + tile, mask=tile_mask, other=0.0), axis=0)
        count += tl.sum(n_i, axis=0)
    if FINAL:
        out = g.to(tl.int64) * width + cols
        written = col_mask
    else:
        out = _group_slot(tl.program_id(2).to(tl.int64), rows_per_part * parts_per_program, out_slots_per_part,
                          group_rank, domain_sorted, rank, first_valid, count > 0.0, PER_DOMAIN) * width + cols
        written = col_mask & (count + tl.full([BLOCK_H], 0.0, tl.float32) > 0.0)
    tl.store(a_out + out, sum_a, mask=written)
    tl.store(b_out + out, sum_b, mask=written)


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
def _sorted_rows(order, domain_sorted, batch, num_groups, PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's rows in group-sorted order (identity with one group), their groups and validity."""
    pos = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pos_mask = pos < batch
    group, valid = _row_groups(domain_sorted, pos, pos_mask, num_groups, PER_DOMAIN, BLOCK_B)
    if PER_DOMAIN:
        rows = tl.load(order + pos, mask=pos_mask, other=0)
    else:
        rows = pos
    return rows.to(tl.int64), pos_mask, group, valid


@triton.jit
def _partial_stats_kernel(o, order, domain_sorted, part_mean, part_m2, batch, width, num_groups, slots_per_part,
                          PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, row_mask, group, valid = _sorted_rows(order, domain_sorted, batch, num_groups, PER_DOMAIN, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < width
    tile = rows[:, None] * width + cols[None, :]
    values = tl.load(o + tile, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    store_group_partial_stats(values, group, valid, cols, col_mask, tl.program_id(0), slots_per_part, width,
                              part_mean, part_m2)


@triton.jit
def _normalize_kernel(o, group_ids, mean, rstd, weight, bias, y, batch, width, num_groups,
                      PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < batch, cols < width
    group, valid = _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN, BLOCK_B)
    tile = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    xhat = normalized_tile(tl.load(o + tile, mask=mask, other=0.0).to(tl.float32), mean, rstd, group, cols, valid,
                           width, PER_DOMAIN)
    out = load_group_rows(weight, group, cols, valid, col_mask, width, PER_DOMAIN) * xhat + \
        load_group_rows(bias, group, cols, valid, col_mask, width, PER_DOMAIN)
    tl.store(y + tile, tl.where(valid[:, None], out, float("nan")).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _partial_grad_sums_kernel(dy, o, order, domain_sorted, mean, rstd, part_dy, part_dy_xhat, batch, width,
                              num_groups, slots_per_part,
                              PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, row_mask, group, valid = _sorted_rows(order, domain_sorted, batch, num_groups, PER_DOMAIN, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < width
    tile = rows[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    grad = tl.load(dy + tile, mask=mask, other=0.0).to(tl.float32)
    xhat = normalized_tile(tl.load(o + tile, mask=mask, other=0.0).to(tl.float32), mean, rstd, group, cols, valid,
                           width, PER_DOMAIN)
    store_group_partial_sums(grad, grad * xhat, group, valid, cols, col_mask, tl.program_id(0), slots_per_part,
                             width, part_dy, part_dy_xhat)


@triton.jit
def norm_input_grad(grad, xhat, group, row_mask, cols, col_mask, width, weight, rstd, count, sum_dy, sum_dy_xhat,
                    PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, UNBIASED: tl.constexpr):
    """d(normalised output)/d(input) applied to ``grad`` (see the module docstring), under the plan's constexprs."""
    scale = load_group_rows(weight, group, cols, row_mask, col_mask, width, PER_DOMAIN) * \
        load_group_rows(rstd, group, cols, row_mask, col_mask, width, PER_DOMAIN)
    if BATCH_STATISTICS:
        if PER_DOMAIN:
            n = tl.load(count + group, mask=row_mask, other=1.0)[:, None]
        else:
            n = tl.load(count)
        n_var = tl.maximum(n - 1.0, 1.0) if UNBIASED else n
        grad = grad - load_group_rows(sum_dy, group, cols, row_mask, col_mask, width, PER_DOMAIN) / n \
            - xhat * load_group_rows(sum_dy_xhat, group, cols, row_mask, col_mask, width, PER_DOMAIN) / n_var
    return scale * grad


@triton.jit
def _input_grad_kernel(dy, o, group_ids, mean, rstd, weight, count, sum_dy, sum_dy_xhat, do, batch, width, num_groups,
                       PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, UNBIASED: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask, col_mask = rows < batch, cols < width
    group, valid = _row_groups(group_ids, rows, row_mask, num_groups, PER_DOMAIN, BLOCK_B)
    tile = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    grad = tl.load(dy + tile, mask=mask, other=0.0).to(tl.float32)
    xhat = normalized_tile(tl.load(o + tile, mask=mask, other=0.0).to(tl.float32), mean, rstd, group, cols, valid,
                           width, PER_DOMAIN)
    out = norm_input_grad(grad, xhat, group, valid, cols, col_mask, width, weight, rstd, count, sum_dy,
                          sum_dy_xhat, PER_DOMAIN, BATCH_STATISTICS, UNBIASED)
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


def empty_partials(segments: GroupSegments, rows_per_part: int, width: int, device, empty=torch.empty):
    """Two (parts x slots, width) fp32 partials buffers for blocks of ``rows_per_part`` sorted rows."""
    slots = triton.cdiv(segments.batch, rows_per_part) * segments.slots_per_part(rows_per_part)
    return tuple(empty((slots, width), device=device, dtype=torch.float32) for _ in range(2))


def _merge(kernel, part_a, part_b, segments, rows_per_part, outputs, empty, **constants):
    """Run ``kernel`` over the partials: one program per (group, column tile) in the final pass. Many parts
    (B = 65536 gives 4096 blocks) are first folded by many programs in parallel, range by range, into the
    slots of ranges of MERGE_PARTS_PER_PROGRAM parts: a single pass would leave the programs of a large
    group looping over all of its parts."""
    width = part_a.shape[1]
    dummy = segments.offsets  # pointer for arguments a constexpr branch never reads
    sorted_args = (segments.offsets, dummy if segments.order is None else segments.domain_sorted,
                   dummy if segments.rank is None else segments.rank)
    block_h = block_size(width, MERGE_COLS)
    meta = dict(PER_DOMAIN=segments.order is not None, BLOCK_P=MERGE_PARTS_PER_STEP, BLOCK_H=block_h, **constants)

    def launch(a, b, rows, parts_per_program, outs, final):
        ranges = triton.cdiv(triton.cdiv(segments.batch, rows), parts_per_program)
        kernel[(segments.num_groups, triton.cdiv(width, block_h), ranges)](
            a, b, *sorted_args, rows, segments.slots_per_part(rows), parts_per_program,
            segments.slots_per_part(rows * parts_per_program), width, *outs, FINAL=final, **meta)

    if triton.cdiv(segments.batch, rows_per_part) > MERGE_PARTS_PER_PROGRAM:
        folded = empty_partials(segments, rows_per_part * MERGE_PARTS_PER_PROGRAM, width, part_a.device, empty)
        launch(part_a, part_b, rows_per_part, MERGE_PARTS_PER_PROGRAM, folded + outputs[2:], final=False)
        part_a, part_b = folded
        rows_per_part *= MERGE_PARTS_PER_PROGRAM
    launch(part_a, part_b, rows_per_part, triton.cdiv(segments.batch, rows_per_part), outputs, final=True)


@on_first_tensors_device
def merge_group_stats(part_mean, part_m2, segments: GroupSegments, rows_per_part: int, eps: float, unbiased: bool,
                      empty=torch.empty):
    """Fold the partial (mean, M2) of blocks of ``rows_per_part`` sorted rows (store_group_partial_stats)
    into per-group count (G,), mean, M2 and rstd (G, h), all fp32."""
    f32 = dict(device=part_mean.device, dtype=torch.float32)
    width = part_mean.shape[1]
    outputs = (empty((segments.num_groups, width), **f32), empty((segments.num_groups, width), **f32),
               empty((segments.num_groups,), **f32), empty((segments.num_groups, width), **f32), eps)
    _merge(merge_group_stats_kernel, part_mean, part_m2, segments, rows_per_part, outputs, empty, UNBIASED=unbiased)
    mean, m2, count, rstd, _ = outputs
    return count, mean, m2, rstd


@on_first_tensors_device
def merge_group_sums(part_dy, part_dy_xhat, segments: GroupSegments, rows_per_part: int, empty=torch.empty):
    """Per-group sums (G, h) of the partial sums of store_group_partial_sums."""
    f32 = dict(device=part_dy.device, dtype=torch.float32)
    outputs = tuple(empty((segments.num_groups, part_dy.shape[1]), **f32) for _ in range(2))
    _merge(merge_group_sums_kernel, part_dy, part_dy_xhat, segments, rows_per_part, outputs, empty)
    return outputs


def _tiles(o, per_domain):
    """Grid (row blocks, column tiles) and meta-parameters of the row-tile kernels on o (B, h)."""
    batch, width = o.shape
    block_h = block_size(width, 128)
    grid = (triton.cdiv(batch, ROWS_PER_BLOCK), triton.cdiv(width, block_h))
    return grid, dict(PER_DOMAIN=per_domain, BLOCK_B=ROWS_PER_BLOCK, BLOCK_H=block_h, num_warps=TILE_WARPS)


def _group_ids(o, groups):
    """(the ids the row-order kernels read, per_domain): groups None is one group of all rows, whose ids no
    kernel reads."""
    if groups is None:
        return torch.zeros(1, device=o.device, dtype=torch.int64), False
    return groups.contiguous(), True


def _segments(o, groups, num_groups: int) -> GroupSegments:
    """The rows sorted by group; one group (groups None) needs no sort and sort_groups reads only the row count."""
    return sort_groups(o[:, 0] if groups is None else groups, num_groups, groups is not None)


def _partial_stats(o, segments: GroupSegments, empty):
    grid, meta = _tiles(o, segments.order is not None)
    part_mean, part_m2 = empty_partials(segments, ROWS_PER_BLOCK, o.shape[1], o.device, empty)
    _partial_stats_kernel[grid](o, *segments.sorted_args(segments.offsets), part_mean, part_m2, *o.shape,
                                segments.num_groups, segments.slots_per_part(ROWS_PER_BLOCK), **meta)
    return part_mean, part_m2


# The split passes (hamur_fast.ops.contract.Passes): a data-parallel step runs a collective between them.
# Statistics, sums and the tables handed in are float32; y and do come in o's dtype.
@on_first_tensors_device
def group_statistics(o, groups, num_groups: int, eps: float = 0.0, unbiased: bool = False, empty=torch.empty):
    """This process's per-group (count (G,), mean (G, h), M2 (G, h)) of o's rows, and the rstd (G, h) they give
    with ``eps`` and ``unbiased``."""
    arg_checks.norm("triton norm statistics", o, groups, num_groups)
    o = o.contiguous()
    segments = _segments(o, groups, num_groups if groups is not None else 1)
    return merge_group_stats(*_partial_stats(o, segments, empty), segments, ROWS_PER_BLOCK, eps, unbiased, empty)


def running_statistics(op: str, running_mean, running_var, eps: float):
    """(count, mean, m2, rstd) for paper mode in eval: the running statistics, no dependence on the batch (count
    and m2 are zeros: there is nothing to merge or update). Their device and sizes against the rows are checked
    where they are read, as the normalise pass's mean and rstd."""
    if running_mean is None or running_var is None:
        raise ValueError(f"{op}: running_mean and running_var are needed without batch statistics")
    arg_checks.Args(op, arg_checks.device_of(running_mean, op)).tensor("running_mean", running_mean, "G h") \
        .tensor("running_var", running_var, "G h")
    mean = running_mean.float().clone()
    count = torch.zeros(mean.shape[0], device=mean.device, dtype=torch.float32)
    return count, mean, torch.zeros_like(mean), torch.rsqrt(running_var.float() + eps)


@on_first_tensors_device
def normalise(o, groups, weight, bias, mean, rstd, empty=torch.empty):
    """y = weight[g] (o - mean[g]) rstd[g] + bias[g] with the given per-group tables (G, h)."""
    arg_checks.norm("triton norm normalise", o, groups, weight=weight, bias=bias, mean=mean, rstd=rstd)
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
    arg_checks.norm("triton norm grad sums", o, groups, num_groups, dy=dy, mean=mean, rstd=rstd)
    dy, o = dy.contiguous(), o.contiguous()
    segments = _segments(o, groups, num_groups)
    grid, meta = _tiles(o, groups is not None)
    part_dy, part_dy_xhat = empty_partials(segments, ROWS_PER_BLOCK, o.shape[1], o.device, empty)
    _partial_grad_sums_kernel[grid](dy, o, *segments.sorted_args(segments.offsets), mean.float().contiguous(),
                                    rstd.float().contiguous(), part_dy, part_dy_xhat, *o.shape, num_groups,
                                    segments.slots_per_part(ROWS_PER_BLOCK), **meta)
    return merge_group_sums(part_dy, part_dy_xhat, segments, ROWS_PER_BLOCK, empty)


@on_first_tensors_device
def input_grad(dy, o, groups, weight, mean, rstd, count, sum_dy, sum_dy_xhat, unbiased: bool,
               batch_statistics: bool = True, empty=torch.empty):
    """do = rstd w (dy - sum_dy / n - xhat sum_dy_xhat / n_var) from the given count and sums; n_var = n, or
    max(n - 1, 1) when ``unbiased``. Without ``batch_statistics`` (running statistics) do = rstd w dy."""
    arg_checks.norm("triton norm input grad", o, groups, dy=dy, weight=weight, mean=mean, rstd=rstd, count=count,
                    sum_dy=sum_dy, sum_dy_xhat=sum_dy_xhat)
    dy, o, weight = dy.contiguous(), o.contiguous(), weight.contiguous()
    group_ids, per_domain = _group_ids(o, groups)
    grid, meta = _tiles(o, per_domain)
    do = empty(o.shape, device=o.device, dtype=o.dtype)
    _input_grad_kernel[grid](dy, o, group_ids, mean.float().contiguous(), rstd.float().contiguous(), weight,
                             count.float().contiguous(), sum_dy.float().contiguous(), sum_dy_xhat.float().contiguous(),
                             do, *o.shape, mean.shape[0], BATCH_STATISTICS=batch_statistics, UNBIASED=unbiased,
                             **meta)
    return do
