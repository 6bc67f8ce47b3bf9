"""Fusion level 2 as Triton kernels: the adapter cell on I_b generated in registers, forward and backward.

The op (hamur_fast.ops.generated) folds the hyper-network's last BatchNorm into an affine map, so the
kernels see ``I_b = ReLU((g_b - m) W'^T + c')`` (g (B, p), m (p,), W' (k*k, p), c' (k*k,)) and the cell of
kernels/adapter_cell.py (same notation, SPEC sections 2, 3 and 6):
    p = x DL[d]    q = p I_b    a = sigmoid(q DR[d] + db[d])    u = a UL[d]    v = u I_b    o = v UR[d] + ub[d]

Design
- Row i of every I_b in a block of rows is ``ReLU(gc W'_i^T + c'_i)``: one ``tl.dot`` of the block's centred
  g (rows, p) with the (p, k) slice W'_i, formed where it is used and never stored. ``q`` and ``v`` are
  sums over i of column i of ``p`` (or ``u``) times that row; the backward forms ``du``, ``dp`` and
  ``dI_i = p_i dq + u_i dv`` the same way, row i at a time, so the largest live tile is (rows, k), not the
  (rows, 16, k) chunk of level 1. I is formed twice in the forward (down and up sweeps) and three times
  in the backward (two sweeps of the main kernel, once in the weight-gradient kernel).
- Generator products: ``tl.dot`` in IEEE fp32 by default; "tf32" and "bf16" (inputs rounded to bf16, fp32
  accumulation) are opt-in. The cell's own products are those of level 1 (IEEE fp32).
- Backward of the generator: with ``dz = dI * [I > 0]``, the kernels produce ``dg = dz W'`` per row (summed
  over i in registers), and ``dW'^T = sum_b (g_b - m)^T dz_b``, ``dc' = sum_b dz_b`` in a second kernel
  whose programs own (a range of rows, one row i of I): each accumulates a (p, k) tile over its rows in
  registers and stores it once; torch sums the few partials. ``dI`` is rebuilt there from four saved
  (B, k) vectors (p, u, dq, dv): it is rank 2 per row. Nothing of size (B, k*k) exists, forward or backward.
- DomainNorm statistics, the normalise pass, the norm-gradient sums and the factor gradients are level 1's
  kernels (kernels/adapter_cell.py, kernels/domain_norm.py), which never touch I.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import adapter_cell as cell
from . import arg_checks
from . import domain_norm as dn
from .adapter_cell import (_activation, _down_left_chunk, _grad_through_norm, _load_rows, _project, _row_block,
                           _store_output_partial_stats, _store_rows)
from .domain_norm import block_size

# Rows per program: the M of every tl.dot (each W'_i slice serves them all). 16 rows and 8 warps: with 32 rows
# and 4 warps the (rows, k) tiles and the (p, k) slice of W' made ptxas spill up to 105 KB per thread at
# k = 65 (sm_90a compile tables: benchmarks/RESULTS.md).
ROWS_PER_BLOCK = 16
NUM_WARPS = 8
PRECISIONS = {"ieee": 0, "tf32": 1, "bf16": 2}


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------
@triton.jit
def _centred_g(g, centre, rows, row_mask, p_idx, gen_width):
    """The block's rows of g - m, (rows, BLOCK_P), zero in padding rows and columns."""
    p_mask = p_idx < gen_width
    g_tile = _load_rows(g, rows, p_idx, gen_width, row_mask)
    m = tl.load(centre + p_idx, mask=p_mask, other=0.0).to(tl.float32)
    return tl.where(row_mask[:, None] & p_mask[None, :], g_tile - m[None, :], 0.0)


@triton.jit
def _generated_rep_row(g_tile, gen_weight, gen_bias, i, k_idx, p_idx, rank, gen_width,
                       GEN_PRECISION: tl.constexpr):
    """Row i of every I_b of the block, (rows, BLOCK_K), and the (BLOCK_P, BLOCK_K) slice W'_i^T it used.
    Padding columns (j >= k) are exact zeros (W' and c' load as 0 there)."""
    n = i * rank + k_idx
    k_mask = k_idx < rank
    w_t = tl.load(gen_weight + n[None, :].to(tl.int64) * gen_width + p_idx[:, None],
                  mask=k_mask[None, :] & (p_idx < gen_width)[:, None], other=0.0).to(tl.float32)
    c = tl.load(gen_bias + n, mask=k_mask, other=0.0).to(tl.float32)
    # The dot is written out here, not in a helper: the interpreter pays ~1 ms per nested jit call.
    if GEN_PRECISION == 2:
        z = tl.dot(g_tile.to(tl.bfloat16), w_t.to(tl.bfloat16), out_dtype=tl.float32)
    elif GEN_PRECISION == 1:
        z = tl.dot(g_tile, w_t, input_precision="tf32")
    else:
        z = tl.dot(g_tile, w_t, input_precision="ieee")
    return tl.maximum(z + c[None, :], 0.0), w_t


@triton.jit
def _times_generated_rep(vec, g_tile, gen_weight, gen_bias, k_idx, p_idx, rank, gen_width, TRANSPOSED: tl.constexpr,
                         GEN_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row b of the result is ``vec[b] @ I_b`` (vec (rows, BLOCK_K)), or ``vec[b] @ I_b^T`` when TRANSPOSED
    (column i is row i of I_b dotted with vec[b]); I_b generated row by row."""
    out = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for i in range(0, rank):
        rep_row, _ = _generated_rep_row(g_tile, gen_weight, gen_bias, i, k_idx, p_idx, rank, gen_width,
                                        GEN_PRECISION)
        if TRANSPOSED:
            out += tl.where(k_idx[None, :] == i, tl.sum(rep_row * vec, axis=1)[:, None], 0.0)
        else:
            out += tl.sum(tl.where(k_idx[None, :] == i, vec, 0.0), axis=1)[:, None] * rep_row  # column i of vec
    return out


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _gen_fwd_project_kernel(
        x, g, centre, gen_weight, gen_bias, order, domain_sorted, down_left, down_right, down_bias, up_left,
        up_right, up_bias, q_out, v_out, part_mean, part_m2,
        batch, width, rank, bottleneck, gen_width, num_domains, slots_per_part,
        PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, GEN_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_P: tl.constexpr):
    pos, pos_mask, rows, domain, d_lo, d_hi, valid = _row_block(order, domain_sorted, batch, num_domains,
                                                                PER_DOMAIN, BLOCK_B)
    k_idx, s_idx, p_idx = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_P)
    ks = rank * bottleneck if PER_DOMAIN else 0
    g_tile = _centred_g(g, centre, rows, pos_mask, p_idx, gen_width)

    # q = (x DL) I: x DL summed over h tiles (level 1's helper, all k columns at once), then I row by row.
    p = _down_left_chunk(x, rows, pos_mask, down_left, domain, d_lo, d_hi, k_idx, width, rank, PER_DOMAIN,
                         BLOCK_B, BLOCK_H, BLOCK_K)
    q = _times_generated_rep(p, g_tile, gen_weight, gen_bias, k_idx, p_idx, rank, gen_width, False, GEN_PRECISION,
                             BLOCK_B, BLOCK_K)
    _store_rows(q_out, pos, k_idx, rank, q, pos_mask)
    a = _activation(q, down_right, down_bias, domain, d_lo, d_hi, valid, k_idx, s_idx, rank, bottleneck, PER_DOMAIN,
                    BLOCK_B, BLOCK_S)
    u = _project(a, up_left, domain, d_lo, d_hi, ks, s_idx, rank, bottleneck, k_idx, 1, rank, BLOCK_B, BLOCK_K)
    v = _times_generated_rep(u, g_tile, gen_weight, gen_bias, k_idx, p_idx, rank, gen_width, False, GEN_PRECISION,
                             BLOCK_B, BLOCK_K)
    _store_rows(v_out, pos, k_idx, rank, v, pos_mask)

    if BATCH_STATISTICS:
        _store_output_partial_stats(v, up_right, up_bias, domain, d_lo, d_hi, valid, k_idx, rank, width,
                                    slots_per_part, part_mean, part_m2, PER_DOMAIN, BLOCK_B, BLOCK_H)


@triton.jit
def _gen_bwd_main_kernel(
        dy, x, g, centre, gen_weight, gen_bias, order, domain_sorted, q_in, v_in,
        down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight,
        mean, rstd, count, sum_dy, sum_dy_xhat,
        dx, dg, do_out, a_out, du_out, dz_out, dp_out, p_out, u_out, dq_out, dv_out,
        batch, width, rank, bottleneck, gen_width, num_domains,
        PER_DOMAIN: tl.constexpr, BATCH_STATISTICS: tl.constexpr, UNBIASED: tl.constexpr, GEN_PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_P: tl.constexpr):
    pos, pos_mask, rows, domain, d_lo, d_hi, valid = _row_block(order, domain_sorted, batch, num_domains,
                                                                PER_DOMAIN, BLOCK_B)
    k_idx, s_idx, p_idx = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_P)
    hk, ks = (width * rank, rank * bottleneck) if PER_DOMAIN else (0, 0)

    # Through the normalisation (as level 1): do stored, dv = do UR^T.
    grad_v = _grad_through_norm(dy, _load_rows(v_in, pos, k_idx, rank, pos_mask), up_right, up_bias, norm_weight, mean,
                                rstd, count, sum_dy, sum_dy_xhat, do_out, pos, rows, pos_mask, domain, d_lo, d_hi,
                                valid, k_idx, rank, width, PER_DOMAIN, BATCH_STATISTICS, UNBIASED, BLOCK_B, BLOCK_H,
                                BLOCK_K)
    # a recomputed from the saved q.
    a = _activation(_load_rows(q_in, pos, k_idx, rank, pos_mask), down_right, down_bias, domain, d_lo, d_hi, valid,
                    k_idx, s_idx, rank, bottleneck, PER_DOMAIN, BLOCK_B, BLOCK_S)
    _store_rows(a_out, pos, s_idx, bottleneck, a, pos_mask)

    # du = dv I^T (first sweep over the generated I), da = du UL^T, dq = dz DR^T.
    g_tile = _centred_g(g, centre, rows, pos_mask, p_idx, gen_width)
    grad_u = _times_generated_rep(grad_v, g_tile, gen_weight, gen_bias, k_idx, p_idx, rank, gen_width, True,
                                  GEN_PRECISION, BLOCK_B, BLOCK_K)
    _store_rows(du_out, pos, k_idx, rank, grad_u, pos_mask)
    grad_a = _project(grad_u, up_left, domain, d_lo, d_hi, ks, k_idx, 1, rank, s_idx, rank, bottleneck,
                      BLOCK_B, BLOCK_S)
    grad_z = grad_a * a * (1.0 - a)
    _store_rows(dz_out, pos, s_idx, bottleneck, grad_z, pos_mask)
    grad_q = _project(grad_z, down_right, domain, d_lo, d_hi, ks, s_idx, 1, bottleneck, k_idx, bottleneck, rank,
                      BLOCK_B, BLOCK_K)

    # Second sweep: dp = dq I^T, and row i of dI = p_i dq + u_i dv through the ReLU into dg = dz W'.
    p = _down_left_chunk(x, rows, pos_mask, down_left, domain, d_lo, d_hi, k_idx, width, rank, PER_DOMAIN,
                         BLOCK_B, BLOCK_H, BLOCK_K)
    u = _project(a, up_left, domain, d_lo, d_hi, ks, s_idx, rank, bottleneck, k_idx, 1, rank, BLOCK_B, BLOCK_K)
    # What the weight-gradient kernel needs to rebuild dI (rank 2 per row), stored while live.
    _store_rows(p_out, pos, k_idx, rank, p, pos_mask)
    _store_rows(u_out, pos, k_idx, rank, u, pos_mask)
    _store_rows(dq_out, pos, k_idx, rank, grad_q, pos_mask)
    _store_rows(dv_out, pos, k_idx, rank, grad_v, pos_mask)
    grad_p = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    grad_g = tl.zeros([BLOCK_B, BLOCK_P], tl.float32)
    for i in range(0, rank):
        rep_row, w_t = _generated_rep_row(g_tile, gen_weight, gen_bias, i, k_idx, p_idx, rank, gen_width,
                                          GEN_PRECISION)
        column = k_idx[None, :] == i
        grad_p += tl.where(column, tl.sum(rep_row * grad_q, axis=1)[:, None], 0.0)
        grad_rep = tl.sum(tl.where(column, p, 0.0), axis=1)[:, None] * grad_q + \
            tl.sum(tl.where(column, u, 0.0), axis=1)[:, None] * grad_v
        grad_gen = tl.where(rep_row > 0.0, grad_rep, 0.0)
        if GEN_PRECISION == 2:
            grad_g += tl.dot(grad_gen.to(tl.bfloat16), tl.trans(w_t).to(tl.bfloat16), out_dtype=tl.float32)
        elif GEN_PRECISION == 1:
            grad_g += tl.dot(grad_gen, tl.trans(w_t), input_precision="tf32")
        else:
            grad_g += tl.dot(grad_gen, tl.trans(w_t), input_precision="ieee")
    _store_rows(dp_out, pos, k_idx, rank, grad_p, pos_mask)
    # A row whose domain id is out of range (value checks off) gets NaN gradients, as at level 1.
    _store_rows(dg, rows, p_idx, gen_width, tl.where(valid[:, None], grad_g, float("nan")), pos_mask)

    # dx = dy + dp DL^T, tile by tile over h.
    for h0 in range(0, width, BLOCK_H):
        h_idx = h0 + tl.arange(0, BLOCK_H)
        grad_x = _load_rows(dy, rows, h_idx, width, pos_mask) + \
            _project(grad_p, down_left, domain, d_lo, d_hi, hk, k_idx, 1, rank, h_idx, rank, width, BLOCK_B, BLOCK_H)
        _store_rows(dx, rows, h_idx, width, tl.where(valid[:, None], grad_x, float("nan")), pos_mask)


@triton.jit
def _gen_weight_grad_kernel(
        g, centre, gen_weight, gen_bias, order, p_in, u_in, dq_in, dv_in, part_dw, part_dc,
        batch, rank, gen_width, rows_per_program,
        PER_DOMAIN: tl.constexpr, GEN_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_P: tl.constexpr):
    """Program (r, i): over its range of rows, sum (g_b - m)^T dz_b[i, :] (a (p, k) tile) and dz_b[i, :]."""
    program, i = tl.program_id(0), tl.program_id(1)
    k_idx, p_idx = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_P)
    start = program * rows_per_program
    stop = tl.minimum(start + rows_per_program, batch)
    acc = tl.zeros([BLOCK_P, BLOCK_K], tl.float32)
    acc_c = tl.zeros([BLOCK_K], tl.float32)
    for p0 in range(start, stop, BLOCK_B):
        pos = p0 + tl.arange(0, BLOCK_B)
        take = pos < stop
        if PER_DOMAIN:
            rows = tl.load(order + pos, mask=take, other=0).to(tl.int64)
        else:
            rows = pos.to(tl.int64)
        pos = pos.to(tl.int64)
        g_tile = _centred_g(g, centre, rows, take, p_idx, gen_width)
        rep_row, _ = _generated_rep_row(g_tile, gen_weight, gen_bias, i, k_idx, p_idx, rank, gen_width,
                                        GEN_PRECISION)
        p_i = tl.load(p_in + pos * rank + i, mask=take, other=0.0)
        u_i = tl.load(u_in + pos * rank + i, mask=take, other=0.0)
        grad_rep = p_i[:, None] * _load_rows(dq_in, pos, k_idx, rank, take) + \
            u_i[:, None] * _load_rows(dv_in, pos, k_idx, rank, take)
        grad_gen = tl.where(rep_row > 0.0, grad_rep, 0.0)  # zero in padding rows: p_i, u_i load as 0
        if GEN_PRECISION == 2:
            acc += tl.dot(tl.trans(g_tile).to(tl.bfloat16), grad_gen.to(tl.bfloat16), out_dtype=tl.float32)
        elif GEN_PRECISION == 1:
            acc += tl.dot(tl.trans(g_tile), grad_gen, input_precision="tf32")
        else:
            acc += tl.dot(tl.trans(g_tile), grad_gen, input_precision="ieee")
        acc_c += tl.sum(grad_gen, axis=0)
    n = i * rank + k_idx
    k_mask = k_idx < rank
    base = program.to(tl.int64) * gen_width * rank * rank
    tl.store(part_dw + base + n[None, :] * gen_width + p_idx[:, None], acc,
             mask=(p_idx < gen_width)[:, None] & k_mask[None, :])
    tl.store(part_dc + program.to(tl.int64) * rank * rank + n, acc_c, mask=k_mask)


# --------------------------------------------------------------------------------------------------
# Launchers. ``empty`` allocates every buffer a kernel fills (the tests pass a NaN-filling one).
# --------------------------------------------------------------------------------------------------
def _sizes(x, g, params, plan):
    batch, width = x.shape
    rank, bottleneck, gen_width = params[0].shape[-1], params[1].shape[-1], g.shape[1]
    return batch, width, rank, bottleneck, gen_width, cell.num_groups(params, plan)


def _tile_meta(width, rank, bottleneck, gen_width):
    """Level 1's tiles of h, k and s (BLOCK_H a tile of h, not its whole width), plus the rows per program and
    BLOCK_P for g."""
    level1_meta = cell._tile_meta(width, rank, bottleneck)
    meta = {key: level1_meta[key] for key in ("BLOCK_H", "BLOCK_K", "BLOCK_S")}
    return dict(meta, BLOCK_B=ROWS_PER_BLOCK, BLOCK_P=block_size(gen_width), num_warps=NUM_WARPS)


def _check_precision(args, precision):
    if precision not in PRECISIONS:
        args.fail(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")


@dn.on_first_tensors_device
def generated_cell_forward(x, generator, domain, params, running_mean, running_var, plan, precision: str,
                           empty=torch.empty):
    """The contract's generated_forward (hamur_fast/ops/contract.py): (y, count, mean, m2, rstd, *saved) with
    generator = (g, centre, W', c') and saved = (q, v, order), q and v (B, k) fp32 in sorted order."""
    g, centre, gen_weight, gen_bias = generator
    args = arg_checks.cell("triton_generated_cell_forward", x, None, domain, params, plan)
    arg_checks.cell_extras(args, plan, g=g, centre=centre, gen_weight=gen_weight, gen_bias=gen_bias)
    _check_precision(args, precision)
    x, g, centre, gen_weight, gen_bias, domain = (t.contiguous() for t in (x, g, centre, gen_weight, gen_bias,
                                                                            domain))
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, _ = \
        (t.contiguous() for t in params)
    batch, width, rank, bottleneck, gen_width, num_domains = _sizes(x, g, params, plan)
    segments = dn.sort_groups(domain, num_domains, plan.per_domain)
    sorted_args = segments.sorted_args(domain)
    meta = _tile_meta(width, rank, bottleneck, gen_width)
    rows_per_part = meta["BLOCK_B"]
    f32 = dict(device=x.device, dtype=torch.float32)
    q, v = empty((batch, rank), **f32), empty((batch, rank), **f32)
    # Scratch for the statistics only when they are computed (a kernel that skips them never reads these).
    part_mean, part_m2 = dn.empty_partials(segments, rows_per_part, width if plan.batch_statistics else 0, x.device,
                                           empty)
    _gen_fwd_project_kernel[(triton.cdiv(batch, rows_per_part),)](
        x, g, centre, gen_weight, gen_bias, *sorted_args, down_left, down_right, down_bias, up_left, up_right,
        up_bias, q, v, part_mean, part_m2, batch, width, rank, bottleneck, gen_width, num_domains,
        segments.slots_per_part(rows_per_part),
        PER_DOMAIN=plan.per_domain, BATCH_STATISTICS=plan.batch_statistics, GEN_PRECISION=PRECISIONS[precision],
        **meta)
    if plan.batch_statistics:
        count, mean, m2, rstd = dn.merge_group_stats(part_mean, part_m2, segments, rows_per_part, plan.eps,
                                                     plan.unbiased, empty)
    else:  # paper mode in eval (running statistics, checked by the normalise pass as its mean and rstd)
        count, mean, m2, rstd = dn.running_statistics(args.op, running_mean, running_var, plan.eps)
    saved = (q, v, cell._order_out(segments, x.device))
    # The normalise pass never touches I: level 1's.
    return (cell.cell_normalise(x, domain, params, saved, mean, rstd, plan, empty), count, mean, m2, rstd, *saved)


def _generator_weight_grads(g, centre, gen_weight, gen_bias, order, p, u, grad_q, grad_v, plan, precision, meta,
                            empty):
    """(dW' (k*k, p), dc' (k*k,)) from partials over ranges of rows, in fp32."""
    batch, gen_width = g.shape
    rank, rows_per_block = p.shape[1], meta["BLOCK_B"]
    # Programs = row ranges x k rows of I: about two per SM on a GPU, two ranges under the interpreter.
    target = 2 * torch.cuda.get_device_properties(g.device).multi_processor_count if g.device.type == "cuda" else 2
    ranges = max(1, min(triton.cdiv(target, rank), triton.cdiv(batch, rows_per_block)))
    rows_per_program = rows_per_block * triton.cdiv(triton.cdiv(batch, ranges), rows_per_block)
    ranges = triton.cdiv(batch, rows_per_program)
    part_dw = empty((ranges, rank * rank, gen_width), device=g.device, dtype=torch.float32)
    part_dc = empty((ranges, rank * rank), device=g.device, dtype=torch.float32)
    _gen_weight_grad_kernel[(ranges, rank)](
        g, centre, gen_weight, gen_bias, order if plan.per_domain else p, p, u, grad_q, grad_v, part_dw, part_dc,
        batch, rank, gen_width, rows_per_program, PER_DOMAIN=plan.per_domain,
        GEN_PRECISION=PRECISIONS[precision], BLOCK_B=rows_per_block, BLOCK_K=meta["BLOCK_K"],
        BLOCK_P=meta["BLOCK_P"], num_warps=meta["num_warps"])
    return part_dw.sum(0), part_dc.sum(0)


@dn.on_first_tensors_device
def generated_cell_backward(dy, x, generator, domain, params, saved, count, mean, rstd, plan, precision: str,
                            empty=torch.empty):
    """The contract's generated_backward: the gradients (dx, dg, d centre, d gen_weight, d gen_bias, then the cell's
    eight parameters)."""
    (g, centre, gen_weight, gen_bias), (q, v, order) = generator, saved
    args = arg_checks.cell("triton_generated_cell_backward", x, None, domain, params, plan)
    arg_checks.cell_extras(args, plan, dy=dy, g=g, centre=centre, gen_weight=gen_weight, gen_bias=gen_bias, q=q,
                           v=v, order=order, count=count, mean=mean, rstd=rstd)
    _check_precision(args, precision)
    dy, x, g, centre, gen_weight, gen_bias = (t.contiguous() for t in (dy, x, g, centre, gen_weight, gen_bias))
    contiguous = [t.contiguous() for t in params]
    down_left, down_right, down_bias, up_left, up_right, up_bias, norm_weight, _ = contiguous
    batch, width, rank, bottleneck, gen_width, num_domains = _sizes(x, g, params, plan)
    segments = dn.sort_groups(domain, num_domains, plan.per_domain, order)
    sorted_args = segments.sorted_args(domain)
    meta = _tile_meta(width, rank, bottleneck, gen_width)
    f32 = dict(device=x.device, dtype=torch.float32)

    # The norm-gradient sums never touch I: level 1's.
    sum_dy, sum_dy_xhat = cell.cell_grad_sums(dy, domain, contiguous, saved, mean, rstd, plan, empty)

    dx, dg = empty(x.shape, device=x.device, dtype=x.dtype), empty(g.shape, **f32)
    grad_o = empty((batch, width), **f32)
    a, grad_z = empty((batch, bottleneck), **f32), empty((batch, bottleneck), **f32)
    grad_u, grad_p, p, u, grad_q, grad_v = (empty((batch, rank), **f32) for _ in range(6))
    _gen_bwd_main_kernel[(triton.cdiv(batch, meta["BLOCK_B"]),)](
        dy, x, g, centre, gen_weight, gen_bias, *sorted_args, q, v, down_left, down_right, down_bias, up_left,
        up_right, up_bias, norm_weight, mean, rstd, count, sum_dy, sum_dy_xhat,
        dx, dg, grad_o, a, grad_u, grad_z, grad_p, p, u, grad_q, grad_v,
        batch, width, rank, bottleneck, gen_width, num_domains,
        PER_DOMAIN=plan.per_domain, BATCH_STATISTICS=plan.batch_statistics, UNBIASED=plan.unbiased,
        GEN_PRECISION=PRECISIONS[precision], **meta)
    d_gen_weight, d_gen_bias = _generator_weight_grads(g, centre, gen_weight, gen_bias, order, p, u, grad_q,
                                                       grad_v, plan, precision, meta, empty)
    grads = cell.factor_grads(x, q, a, v, grad_p, grad_z, grad_u, grad_o, segments, plan, empty) + \
        (sum_dy_xhat, sum_dy)
    param_grads = tuple(t.reshape(param.shape).to(param.dtype) for t, param in zip(grads, params))
    generator_grads = (dg.to(g.dtype), -dg.sum(0).to(centre.dtype), d_gen_weight.to(gen_weight.dtype),
                       d_gen_bias.to(gen_bias.dtype))
    return (dx,) + generator_grads + param_grads
