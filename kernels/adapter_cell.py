"""The HAMUR adapter cell as fused Triton kernels and their launchers, forward and backward.

Math (SPEC sections 2 and 3; reference: hamur_fast.ops.backends.reference.hyper_adapter). For row b with
domain d (paper mode; released mode shares one set of factors), I_b the (k, k) representation:
    p = x DL[d]        q = p I_b        a = sigmoid(q DR[d] + db[d])
    u = a UL[d]        v = u I_b        o = v UR[d] + ub[d]
    y = x + nw[g] * (o - mean[g]) * rstd[g] + nb[g]
where g, the statistics group, is the domain (paper) or the whole batch (released).

Design
- Rows are processed in blocks of 16. Paper mode first sorts the rows by domain on the device
  (``argsort``, no host sync), so a block nearly always holds one domain; each block loops over the
  domains it holds, loads those factors and multiplies with ``tl.dot`` (fp32, IEEE precision: TF32
  would break the 1e-5 contract). Rows need not arrive sorted.
- The per-row products with I_b never form a (B, h, s) or (B, h, k) weight: I_b is streamed in
  chunks of 16 of its rows (k padded to a multiple of 16 on that axis), and each chunk meets the
  matching 16 columns of p (or u), computed by ``tl.dot`` right there. The up projection needs the
  sigmoid of the whole down projection first, so a program sweeps its rows' I_b twice; the second
  sweep re-reads the few KB the first just brought in, meant to be served by L1/L2 so that DRAM sees
  each I_b about once per pass (a design intent: not yet measured on a GPU).
- DomainNorm needs whole-batch (per-domain) statistics, so the forward has three launches:
  project (writes the (B, k) vectors q and v, and per-block partial statistics of o in the compact
  per-domain layout of kernels/domain_norm.py: O(B x h) whatever D is), merge the partials with Chan's
  formula, normalise (recomputes o = v UR + ub from
  v instead of storing the (B, h) o). Backward: norm sums (dnb, dnw), then one main kernel (dx and
  dI_b; two sweeps over the rows' I_b, du in the first, dp and both dI terms in the second), then the factor
  gradients as per-domain sums of outer products over the rows (the grouped linear op's weight-gradient
  kernels, kernels/grouped_linear.py: tiles of one domain's rows, partials summed per domain), fed by
  (B, <=h)-sized per-row vectors the main kernel writes.
- All offsets that scale with B are int64. Every buffer handed back is fully written (the tests
  allocate through a NaN-filling ``empty``).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import arg_checks
from . import domain_norm as dn
from .domain_norm import block_size, load_group_rows, merge_group_stats, norm_input_grad, normalized_tile
from .grouped_linear import domain_weight_grads

ROWS_PER_BLOCK = 16  # the M of every tl.dot; also bounds the (rows, 16, k) I_b chunk in registers
REP_CHUNK = 16  # rows of I_b per step (tl.dot needs >= 16 columns of p)
# The h axis is walked in tiles of at most H_TILE columns (64 once k > 64), so that no tl.dot operand or
# register tile grows with h: every kernel fits an sm_90 block's 232,448 bytes of shared memory for any
# width up to MAX_WIDTH (benchmarks/triton_sm90_sizes.py, compiled for sm_90a: benchmarks/RESULTS.md).
H_TILE = 128
# The sizes these kernels take (the triton backend declares them as its capabilities). k and s are held
# whole per row block (a (rows, 16, k) tile of I_b, a (k, s) factor): their limits are what compiled within
# the shared-memory limit; h is tiled, and its limit is what was compiled and tested.
MAX_WIDTH = 1024
MAX_RANK = 128
MAX_BOTTLENECK = 128


# --------------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _row_block(order, domain_sorted, batch, num_domains, PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's positions in the (domain-sorted) row order, their rows, domains and domain range, and
    which positions hold a row with a valid domain id (-1 stands for an invalid one)."""
    pos = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pos_mask = pos < batch
    if PER_DOMAIN:
        rows = tl.load(order + pos, mask=pos_mask, other=0)
        domain = tl.load(domain_sorted + pos, mask=pos_mask, other=0)
        # An id outside [0, D) (value checks off, torch.compile) indexes nothing: its row is left out of
        # every factor product and statistic, and its outputs are NaN.
        valid = pos_mask & (domain >= 0) & (domain < num_domains)
        domain = tl.where(valid, domain, -1).to(tl.int32)
        d_lo = tl.min(tl.where(valid, domain, num_domains), axis=0)
        d_hi = tl.max(domain, axis=0)
    else:
        rows = pos
        # One shared factor set: the same one-trip loop over "domain 0" as paper mode. With constant
        # bounds (or a bare tl.dot) ptxas spilled the backward kernel badly (compiled for sm_90a).
        domain = tl.zeros([BLOCK_B], tl.int32)
        d_lo = tl.min(domain, axis=0)
        d_hi = tl.max(domain, axis=0)
        valid = pos_mask
    return pos.to(tl.int64), pos_mask, rows.to(tl.int64), domain, d_lo, d_hi, valid


@triton.jit
def _project(lhs, factor, domain, d_lo, d_hi, domain_stride, r_idx, r_stride, r_size, c_idx, c_stride, c_size,
             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row b of the result is ``lhs[b] @ W[domain[b]]``, W[d][r, c] at factor + d*domain_stride + r*r_stride
    + c*c_stride (swap the strides for a transposed factor). One tl.dot per domain present in the block;
    released mode passes domain_stride 0 and all rows in domain 0."""
    offsets = r_idx[:, None] * r_stride + c_idx[None, :] * c_stride
    mask = (r_idx[:, None] < r_size) & (c_idx[None, :] < c_size)
    out = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for d in range(d_lo, d_hi + 1):
        weight = tl.load(factor + d * domain_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        out = tl.where((domain == d)[:, None], tl.dot(lhs, weight, input_precision="ieee"), out)
    return out


@triton.jit
def _rep_chunk(rep, rows, pos_mask, i_idx, j_idx, rank):
    """Rows i_idx of every I_b in the block: a (rows, chunk, k) tile; each row of it is contiguous."""
    offsets = rows[:, None, None] * (rank * rank) + i_idx[None, :, None] * rank + j_idx[None, None, :]
    mask = pos_mask[:, None, None] & (i_idx < rank)[None, :, None] & (j_idx < rank)[None, None, :]
    return tl.load(rep + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(base, pos_or_rows, cols, width, value, pos_mask):
    tl.store(base + pos_or_rows[:, None] * width + cols[None, :], value.to(base.dtype.element_ty),
             mask=pos_mask[:, None] & (cols < width)[None, :])


@triton.jit
def _load_rows(base, pos_or_rows, cols, width, pos_mask):
    return tl.load(base + pos_or_rows[:, None] * width + cols[None, :],
                   mask=pos_mask[:, None] & (cols < width)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _cell_output(v, up_right, up_bias, domain, d_lo, d_hi, valid, k_idx, h_idx, rank, width,
                 PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Columns h_idx of o = v UR[d] + ub[d], recomputed from the saved (B, k) v wherever o is needed."""
    o = _project(v, up_right, domain, d_lo, d_hi, rank * width if PER_DOMAIN else 0, k_idx, width, rank,
                 h_idx, 1, width, BLOCK_B, BLOCK_H)
    return o + load_group_rows(up_bias, domain, h_idx, valid, h_idx < width, width, PER_DOMAIN)


@triton.jit
def _down_left_chunk(x, rows, pos_mask, down_left, domain, d_lo, d_hi, i_idx, width, rank,
                     PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                     CHUNK: tl.constexpr):
    """Columns i_idx of p = x DL[d], summed over h in tiles of BLOCK_H (x is re-read from cache per chunk:
    a whole (rows, h) x tile would not fit the registers, nor its operand the shared memory, at h = 1024)."""
    p = tl.zeros([BLOCK_B, CHUNK], tl.float32)
    for h0 in range(0, width, BLOCK_H):
        h_idx = h0 + tl.arange(0, BLOCK_H)
        p += _project(_load_rows(x, rows, h_idx, width, pos_mask), down_left, domain, d_lo, d_hi,
                      width * rank if PER_DOMAIN else 0, h_idx, rank, width, i_idx, 1, rank, BLOCK_B, CHUNK)
    return p


@triton.jit
def _activation(q, down_right, down_bias, domain, d_lo, d_hi, valid, k_idx, s_idx, rank, bottleneck,
                PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr):
    """a = sigmoid(q DR[d] + db[d]), (rows, BLOCK_S)."""
    z = _project(q, down_right, domain, d_lo, d_hi, rank * bottleneck if PER_DOMAIN else 0, k_idx, bottleneck, rank,
                 s_idx, 1, bottleneck, BLOCK_B, BLOCK_S)
    return tl.sigmoid(z + load_group_rows(down_bias, domain, s_idx, valid, s_idx < bottleneck, bottleneck, PER_DOMAIN))


@triton.jit
def _store_output_partial_stats(v, up_right, up_bias, domain, d_lo, d_hi, valid, k_idx, rank, width, slots_per_part,
                                part_mean, part_m2, PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr,
                                BLOCK_H: tl.constexpr):
    """This block's partial (mean, M2) of o = v UR + ub per domain present (the compact slots of
    kernels/domain_norm.py), tile by tile over h."""
    for h0 in range(0, width, BLOCK_H):
        h_idx = h0 + tl.arange(0, BLOCK_H)
        o = _cell_output(v, up_right, up_bias, domain, d_lo, d_hi, valid, k_idx, h_idx, rank, width, PER_DOMAIN,
                         BLOCK_B, BLOCK_H)
        dn.store_group_partial_stats(o, domain, valid, h_idx, h_idx < width, tl.program_id(0), slots_per_part,
                                     width, part_mean, part_m2)


@triton.jit
def _grad_through_norm(dy, v, up_right, up_bias, norm_weight, mean, rstd, count, sum_dy, sum_dy_xhat, do_out, pos,
                       rows, pos_mask, domain, d_lo, d_hi, valid, k_idx, rank, width,
                       PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, UNBIASED: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Through the normalisation, tile by tile over h: stores do = d y / d o (batch or running statistics) and
    returns dv = do UR^T summed over the tiles."""
    hk = width * rank if PER_DOMAIN else 0
    grad_v = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for h0 in range(0, width, BLOCK_H):
        h_idx = h0 + tl.arange(0, BLOCK_H)
        o = _cell_output(v, up_right, up_bias, domain, d_lo, d_hi, valid, k_idx, h_idx, rank, width, PER_DOMAIN,
                         BLOCK_B, BLOCK_H)
        xhat = normalized_tile(o, mean, rstd, domain, h_idx, valid, width, PER_DOMAIN)
        grad_o = norm_input_grad(_load_rows(dy, rows, h_idx, width, pos_mask), xhat, domain, valid, h_idx,
                                 h_idx < width, width, norm_weight, rstd, count, sum_dy, sum_dy_xhat, PER_DOMAIN,
                                 BATCH_STATISTICS, UNBIASED)
        _store_rows(do_out, pos, h_idx, width, grad_o, pos_mask)
        grad_v += _project(grad_o, up_right, domain, d_lo, d_hi, hk, h_idx, 1, width, k_idx, width, rank,
                           BLOCK_B, BLOCK_K)
    return grad_v


# --------------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cell_fwd_project_kernel(
        x, rep, order, domain_sorted, down_left, down_right, down_bias, up_left, up_right, up_bias,
        q_out, v_out, part_mean, part_m2, batch, width, rank, bottleneck, num_domains, slots_per_part,
        PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    pos, pos_mask, rows, domain, d_lo, d_hi, valid = _row_block(order, domain_sorted, batch, num_domains,
                                                                PER_DOMAIN, BLOCK_B)
    k_idx, s_idx, c_idx = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_S), tl.arange(0, CHUNK)
    ks = rank * bottleneck if PER_DOMAIN else 0

    # Down projection: q = (x DL) I, 16 rows of I_b at a time against the matching 16 columns of x DL.
    q = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for i0 in range(0, rank, CHUNK):
        i_idx = i0 + c_idx
        p_chunk = _down_left_chunk(x, rows, pos_mask, down_left, domain, d_lo, d_hi, i_idx, width, rank,
                                   PER_DOMAIN, BLOCK_B, BLOCK_H, CHUNK)
        q += tl.sum(p_chunk[:, :, None] * _rep_chunk(rep, rows, pos_mask, i_idx, k_idx, rank), axis=1)
    _store_rows(q_out, pos, k_idx, rank, q, pos_mask)

    a = _activation(q, down_right, down_bias, domain, d_lo, d_hi, valid, k_idx, s_idx, rank, bottleneck, PER_DOMAIN,
                    BLOCK_B, BLOCK_S)

    # Up projection through the same I_b (these chunks were just read: cache hits).
    v = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for i0 in range(0, rank, CHUNK):
        i_idx = i0 + c_idx
        u_chunk = _project(a, up_left, domain, d_lo, d_hi, ks, s_idx, rank, bottleneck, i_idx, 1, rank,
                           BLOCK_B, CHUNK)
        v += tl.sum(u_chunk[:, :, None] * _rep_chunk(rep, rows, pos_mask, i_idx, k_idx, rank), axis=1)
    _store_rows(v_out, pos, k_idx, rank, v, pos_mask)

    if BATCH_STATISTICS:
        _store_output_partial_stats(v, up_right, up_bias, domain, d_lo, d_hi, valid, k_idx, rank, width,
                                    slots_per_part, part_mean, part_m2, PER_DOMAIN, BLOCK_B, BLOCK_H)


@triton.jit
def _cell_fwd_normalize_kernel(
        x, order, domain_sorted, v_in, up_right, up_bias, norm_weight, norm_bias, mean, rstd, y,
        batch, width, rank, num_domains,
        PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column tile): y = x + nw * (o - mean) * rstd + nb on its tile."""
    pos, pos_mask, rows, domain, d_lo, d_hi, valid = _row_block(order, domain_sorted, batch, num_domains,
                                                                PER_DOMAIN, BLOCK_B)
    h_idx, k_idx = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_K)
    h_mask = h_idx < width
    o = _cell_output(_load_rows(v_in, pos, k_idx, rank, pos_mask), up_right, up_bias, domain, d_lo, d_hi,
                     valid, k_idx, h_idx, rank, width, PER_DOMAIN, BLOCK_B, BLOCK_H)
    xhat = normalized_tile(o, mean, rstd, domain, h_idx, valid, width, PER_DOMAIN)
    out = _load_rows(x, rows, h_idx, width, pos_mask) + \
        load_group_rows(norm_weight, domain, h_idx, valid, h_mask, width, PER_DOMAIN) * xhat + \
        load_group_rows(norm_bias, domain, h_idx, valid, h_mask, width, PER_DOMAIN)
    _store_rows(y, rows, h_idx, width, tl.where(valid[:, None], out, float("nan")), pos_mask)


# --------------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _cell_bwd_norm_sums_kernel(
        dy, order, domain_sorted, v_in, up_right, up_bias, mean, rstd, part_dy, part_dy_xhat,
        batch, width, rank, num_domains, slots_per_part,
        PER_DOMAIN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row block, column tile): per-domain partial sums of dy and dy * xhat on its tile."""
    pos, pos_mask, rows, domain, d_lo, d_hi, valid = _row_block(order, domain_sorted, batch, num_domains,
                                                                PER_DOMAIN, BLOCK_B)
    h_idx, k_idx = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H), tl.arange(0, BLOCK_K)
    o = _cell_output(_load_rows(v_in, pos, k_idx, rank, pos_mask), up_right, up_bias, domain, d_lo, d_hi,
                     valid, k_idx, h_idx, rank, width, PER_DOMAIN, BLOCK_B, BLOCK_H)
    xhat = normalized_tile(o, mean, rstd, domain, h_idx, valid, width, PER_DOMAIN)
    grad = _load_rows(dy, rows, h_idx, width, pos_mask)
    dn.store_group_partial_sums(grad, grad * xhat, domain, valid, h_idx, h_idx < width, tl.program_id(0),
                                slots_per_part, width, part_dy, part_dy_xhat)


@triton.jit
def _cell_bwd_main_kernel(
        dy, x, rep, order, domain_sorted, q_in, v_in,
        down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight,
        mean, rstd, count, sum_dy, sum_dy_xhat,
        dx, drep, do_out, a_out, du_out, dz_out, dp_out,
        batch, width, rank, bottleneck, num_domains,
        PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    pos, pos_mask, rows, domain, d_lo, d_hi, valid = _row_block(order, domain_sorted, batch, num_domains,
                                                                PER_DOMAIN, BLOCK_B)
    k_idx, s_idx, c_idx = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_S), tl.arange(0, CHUNK)
    hk, ks = (width * rank, rank * bottleneck) if PER_DOMAIN else (0, 0)

    grad_v = _grad_through_norm(dy, _load_rows(v_in, pos, k_idx, rank, pos_mask), up_right, up_bias, norm_weight, mean,
                                rstd, count, sum_dy, sum_dy_xhat, do_out, pos, rows, pos_mask, domain, d_lo, d_hi,
                                valid, k_idx, rank, width, PER_DOMAIN, BATCH_STATISTICS, UNBIASED, BLOCK_B, BLOCK_H,
                                BLOCK_K)
    # a recomputed from the saved q.
    a = _activation(_load_rows(q_in, pos, k_idx, rank, pos_mask), down_right, down_bias, domain, d_lo, d_hi, valid,
                    k_idx, s_idx, rank, bottleneck, PER_DOMAIN, BLOCK_B, BLOCK_S)
    _store_rows(a_out, pos, s_idx, bottleneck, a, pos_mask)

    # du = dv I^T chunk by chunk, and da = du UL^T.
    grad_a = tl.zeros([BLOCK_B, BLOCK_S], tl.float32)
    for i0 in range(0, rank, CHUNK):
        i_idx = i0 + c_idx
        grad_u = tl.sum(_rep_chunk(rep, rows, pos_mask, i_idx, k_idx, rank) * grad_v[:, None, :], axis=2)
        _store_rows(du_out, pos, i_idx, rank, grad_u, pos_mask)
        grad_a += _project(grad_u, up_left, domain, d_lo, d_hi, ks, i_idx, 1, rank, s_idx, rank, bottleneck,
                           BLOCK_B, BLOCK_S)
    grad_z = grad_a * a * (1.0 - a)
    _store_rows(dz_out, pos, s_idx, bottleneck, grad_z, pos_mask)
    grad_q = _project(grad_z, down_right, domain, d_lo, d_hi, ks, s_idx, 1, bottleneck, k_idx, bottleneck, rank,
                      BLOCK_B, BLOCK_K)

    # One more sweep over I_b (cache hits): dp = dq I^T (stored) and dI = p^T dq + u^T dv, written once.
    for i0 in range(0, rank, CHUNK):
        i_idx = i0 + c_idx
        # dp first, so that the I_b chunk is dead before the dI chunk is formed (fewer live 3-D tiles).
        grad_p = tl.sum(_rep_chunk(rep, rows, pos_mask, i_idx, k_idx, rank) * grad_q[:, None, :], axis=2)
        _store_rows(dp_out, pos, i_idx, rank, grad_p, pos_mask)
        p_chunk = _down_left_chunk(x, rows, pos_mask, down_left, domain, d_lo, d_hi, i_idx, width, rank,
                                   PER_DOMAIN, BLOCK_B, BLOCK_H, CHUNK)
        u_chunk = _project(a, up_left, domain, d_lo, d_hi, ks, s_idx, rank, bottleneck, i_idx, 1, rank,
                           BLOCK_B, CHUNK)
        grad_rep = p_chunk[:, :, None] * grad_q[:, None, :] + u_chunk[:, :, None] * grad_v[:, None, :]
        grad_rep = tl.where(valid[:, None, None], grad_rep, float("nan"))
        rep_offsets = rows[:, None, None] * (rank * rank) + i_idx[None, :, None] * rank + k_idx[None, None, :]
        rep_mask = pos_mask[:, None, None] & (i_idx < rank)[None, :, None] & (k_idx < rank)[None, None, :]
        tl.store(drep + rep_offsets, grad_rep.to(drep.dtype.element_ty), mask=rep_mask)

    # dx = dy + dp DL^T, tile by tile over h, from the dp this program just stored (the barrier makes every
    # thread's stores visible to the whole program).
    tl.debug_barrier()
    grad_p = _load_rows(dp_out, pos, k_idx, rank, pos_mask)
    for h0 in range(0, width, BLOCK_H):
        h_idx = h0 + tl.arange(0, BLOCK_H)
        grad_x = _load_rows(dy, rows, h_idx, width, pos_mask) + \
            _project(grad_p, down_left, domain, d_lo, d_hi, hk, k_idx, 1, rank, h_idx, rank, width, BLOCK_B, BLOCK_H)
        _store_rows(dx, rows, h_idx, width, tl.where(valid[:, None], grad_x, float("nan")), pos_mask)


# --------------------------------------------------------------------------------------------------
# Launchers. ``empty`` allocates every buffer that a kernel fills (outputs, saved vectors, partials);
# the tests pass a NaN-filling allocator to prove that everything handed back was written.
# --------------------------------------------------------------------------------------------------
def _sizes(x, rep, params, plan):
    batch, width = x.shape
    return batch, width, rep.shape[1], params[1].shape[-1], num_groups(params, plan)


def num_groups(params, plan) -> int:
    """G: the domains in paper mode (the norm weight's leading size), 1 in released mode."""
    return params[6].shape[0] if plan.per_domain else 1


def check_sizes(width, rank, bottleneck):
    """ValueError naming the size when a cell is beyond what the kernels take."""
    for name, size, limit in (("width h", width, MAX_WIDTH), ("rank k", rank, MAX_RANK),
                              ("bottleneck s", bottleneck, MAX_BOTTLENECK)):
        if size > limit:
            raise ValueError(f"the triton kernels take {name} up to {limit}, got {size}")


def _tile_meta(width, rank, bottleneck):
    check_sizes(width, rank, bottleneck)
    block_k = block_size(rank)
    meta = dict(BLOCK_B=ROWS_PER_BLOCK, BLOCK_H=block_size(width, H_TILE if block_k <= 64 else H_TILE // 2),
                BLOCK_K=block_k, BLOCK_S=block_size(bottleneck), CHUNK=REP_CHUNK)
    # The (rows, chunk, k) I_b tile dominates the registers: give it more warps when it is large.
    meta["num_warps"] = 8 if ROWS_PER_BLOCK * REP_CHUNK * meta["BLOCK_K"] >= 16384 else 4
    return meta


def _without_rep_tiles(meta):
    """Meta-parameters of the kernels that only recompute o = v UR + ub (no I_b, no bottleneck)."""
    return {key: meta[key] for key in ("BLOCK_B", "BLOCK_H", "BLOCK_K", "num_warps")}


def _segments(domain, params, plan, order=None):
    """The rows sorted by domain (paper mode; by the forward's saved ``order`` when given), dn.GroupSegments."""
    return dn.sort_groups(domain, num_groups(params, plan), plan.per_domain, order if plan.per_domain else None)


def _order_out(segments, device):
    """The order saved for backward: empty in released mode (identity)."""
    return torch.zeros(0, device=device, dtype=torch.int64) if segments.order is None else segments.order


# The forward and backward at their seams, where a data-parallel step puts its collectives: the projection with
# this process's per-block partial statistics | merge | normalise, and norm sums | (all_reduce) | main kernel.
# Signatures: the contract's split passes (hamur_fast/ops/contract.py), saved = (q, v, order).
@dn.on_first_tensors_device
def cell_statistics(x, rep, domain, params, plan, empty=torch.empty):
    """The cell up to its normalisation: this process's (count, mean, M2, rstd) of o per group (rstd by the plan's
    eps and variance; None without batch statistics), and saved = (q, v, order): q, v (B, k) fp32 in sorted order,
    the order (empty in released mode). ``plan``: the contract's Plan (per_domain, batch_statistics, unbiased,
    eps), as every launcher here takes it."""
    arg_checks.cell("triton cell projection", x, rep, domain, params, plan)
    x, rep, domain = x.contiguous(), rep.contiguous(), domain.contiguous()
    params = tuple(t.contiguous() for t in params)
    batch, width, rank, bottleneck, num_domains = _sizes(x, rep, params, plan)
    segments = _segments(domain, params, plan)
    meta = _tile_meta(width, rank, bottleneck)
    f32 = dict(device=x.device, dtype=torch.float32)
    q, v = empty((batch, rank), **f32), empty((batch, rank), **f32)
    # Scratch for the statistics only when they are computed (a kernel that skips them never reads these).
    part_mean, part_m2 = dn.empty_partials(segments, ROWS_PER_BLOCK, width if plan.batch_statistics else 0, x.device,
                                           empty)
    _cell_fwd_project_kernel[(triton.cdiv(batch, ROWS_PER_BLOCK),)](
        x, rep, *segments.sorted_args(domain), *params[:6], q, v, part_mean, part_m2,
        batch, width, rank, bottleneck, num_domains, segments.slots_per_part(ROWS_PER_BLOCK),
        PER_DOMAIN=plan.per_domain, BATCH_STATISTICS=plan.batch_statistics, **meta)
    saved = (q, v, _order_out(segments, x.device))
    if not plan.batch_statistics:
        return None, saved
    return merge_group_stats(part_mean, part_m2, segments, ROWS_PER_BLOCK, plan.eps, plan.unbiased, empty), saved


@dn.on_first_tensors_device
def cell_normalise(x, domain, params, saved, mean, rstd, plan, empty=torch.empty):
    """y = x + nw (o - mean) rstd + nb, o recomputed from saved v, with the given per-group mean and rstd (fp32)."""
    _q, v, order = saved
    arg_checks.cell_extras(arg_checks.cell("triton cell normalise", x, None, domain, params, plan), plan, v=v,
                           order=order, mean=mean, rstd=rstd)
    x, domain = x.contiguous(), domain.contiguous()
    up_right, up_bias, norm_weight, norm_bias = (params[i].contiguous() for i in (4, 5, 6, 7))
    batch, width, rank = x.shape[0], x.shape[1], v.shape[1]
    num_domains = num_groups(params, plan)
    meta = _without_rep_tiles(_tile_meta(width, rank, params[1].shape[-1]))
    sorted_args = (order, domain[order]) if plan.per_domain else (domain, domain)  # (no segments needed here)
    y = empty(x.shape, device=x.device, dtype=x.dtype)
    _cell_fwd_normalize_kernel[(triton.cdiv(batch, ROWS_PER_BLOCK), triton.cdiv(width, meta["BLOCK_H"]))](
        x, *sorted_args, v, up_right, up_bias, norm_weight, norm_bias,
        mean.float().contiguous(), rstd.float().contiguous(), y, batch, width, rank, num_domains,
        PER_DOMAIN=plan.per_domain, **meta)
    return y


@dn.on_first_tensors_device
def cell_grad_sums(dy, domain, params, saved, mean, rstd, plan, empty=torch.empty):
    """Per-group (sum dy, sum dy * xhat), each (G, h) fp32: the norm bias and weight gradients of these rows."""
    _q, v, order = saved
    arg_checks.cell_extras(arg_checks.cell("triton cell grad sums", dy, None, domain, params, plan), plan, v=v,
                           order=order, mean=mean, rstd=rstd)
    dy, domain = dy.contiguous(), domain.contiguous()
    up_right, up_bias = (params[i].contiguous() for i in (4, 5))
    batch, width, rank = dy.shape[0], dy.shape[1], v.shape[1]
    num_domains = num_groups(params, plan)
    meta = _without_rep_tiles(_tile_meta(width, rank, params[1].shape[-1]))
    segments = _segments(domain, params, plan, order)
    part_dy, part_dy_xhat = dn.empty_partials(segments, ROWS_PER_BLOCK, width, dy.device, empty)
    _cell_bwd_norm_sums_kernel[(triton.cdiv(batch, ROWS_PER_BLOCK), triton.cdiv(width, meta["BLOCK_H"]))](
        dy, *segments.sorted_args(domain), v, up_right, up_bias, mean.float().contiguous(),
        rstd.float().contiguous(), part_dy, part_dy_xhat,
        batch, width, rank, num_domains, segments.slots_per_part(ROWS_PER_BLOCK), PER_DOMAIN=plan.per_domain,
        **meta)
    return dn.merge_group_sums(part_dy, part_dy_xhat, segments, ROWS_PER_BLOCK, empty)


def factor_grads(x, q, a, v, grad_p, grad_z, grad_u, grad_o, segments, plan, empty=torch.empty):
    """The six projection factors' gradients (fp32, a leading group axis), shared by level 1 and level 2: per
    domain, sums over its rows of lhs[b]^T rhs[b] (and of rhs[b]) by the grouped linear op's weight-gradient
    kernels, O(B) work and O(B / 256 + D) partials whatever D is. x is in row order, every other vector in
    domain-sorted order."""
    per_domain = plan.per_domain
    rows = segments.order if per_domain else segments.offsets  # unread when shared (any int64 tensor)

    def outer(lhs, rhs, lhs_in_order=False, with_rhs_sum=False):
        return domain_weight_grads(lhs, rhs, rows, segments.offsets, segments.num_groups, with_rhs_sum,
                                   torch.float32, x_by_order=lhs_in_order and per_domain, grad_by_order=False,
                                   empty=empty)

    d_down_left, _ = outer(x, grad_p, lhs_in_order=True)
    d_down_right, d_down_bias = outer(q, grad_z, with_rhs_sum=True)
    d_up_left, _ = outer(a, grad_u)
    # With batch statistics, up_bias shifts every row of its statistics group alike (the group is its domain
    # in paper mode, the whole batch in released mode) and the normalisation subtracts the group's mean: y does
    # not depend on it, its gradient is exactly zero. Summing do over the group instead would leave an fp32
    # residue of 1e-4 of the terms' size on two-row groups (sum(xhat) = 0 only up to ulp(o) * rstd).
    d_up_right, d_up_bias = outer(v, grad_o, with_rhs_sum=not plan.batch_statistics)
    if plan.batch_statistics:
        d_up_bias = torch.zeros(d_up_right.shape[0], d_up_right.shape[-1], device=x.device, dtype=torch.float32)
    return d_down_left, d_down_right, d_down_bias, d_up_left, d_up_right, d_up_bias


@dn.on_first_tensors_device
def cell_input_grads(dy, x, rep, domain, params, saved, count, mean, rstd, sum_dy, sum_dy_xhat, plan,
                     empty=torch.empty):
    """(dx, drep, and the six projection factors' gradients) from the given count and group sums (this
    process's, or every process's in a data-parallel step), each in its input's dtype and shape."""
    q, v, order = saved
    arg_checks.cell_extras(arg_checks.cell("triton_cell_backward", x, rep, domain, params, plan), plan, dy=dy, q=q,
                           v=v, order=order, count=count, mean=mean, rstd=rstd, sum_dy=sum_dy,
                           sum_dy_xhat=sum_dy_xhat)
    dy, x, rep, domain = dy.contiguous(), x.contiguous(), rep.contiguous(), domain.contiguous()
    contiguous = [t.contiguous() for t in params]
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, norm_bias = contiguous
    batch, width, rank, bottleneck, num_domains = _sizes(x, rep, params, plan)
    segments = _segments(domain, params, plan, order)
    sorted_args = segments.sorted_args(domain)
    meta = _tile_meta(width, rank, bottleneck)
    grid = (triton.cdiv(batch, ROWS_PER_BLOCK),)
    device = x.device
    f32 = dict(device=device, dtype=torch.float32)

    dx = empty(x.shape, device=device, dtype=x.dtype)
    drep = empty(rep.shape, device=device, dtype=rep.dtype)
    grad_o = empty((batch, width), **f32)
    a, grad_z = empty((batch, bottleneck), **f32), empty((batch, bottleneck), **f32)
    grad_u, grad_p = empty((batch, rank), **f32), empty((batch, rank), **f32)
    _cell_bwd_main_kernel[grid](
        dy, x, rep, *sorted_args, q, v, down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight,
        mean.float().contiguous(), rstd.float().contiguous(), count.float().contiguous(),
        sum_dy.float().contiguous(), sum_dy_xhat.float().contiguous(), dx, drep, grad_o, a, grad_u, grad_z, grad_p,
        batch, width, rank, bottleneck, num_domains,
        PER_DOMAIN=plan.per_domain, BATCH_STATISTICS=plan.batch_statistics, UNBIASED=plan.unbiased, **meta)

    grads = factor_grads(x, q, a, v, grad_p, grad_z, grad_u, grad_o, segments, plan, empty)
    param_grads = tuple(g.reshape(p.shape).to(p.dtype) for g, p in zip(grads, params))
    return (dx, drep) + param_grads
