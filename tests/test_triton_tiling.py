"""The Triton kernels' tiling over h (and their size limits) against the float64 reference.

The kernels walk h in tiles of at most kernels.adapter_cell.H_TILE columns (half that once k > 64), so a
width above the tile runs several tiles in every kernel: forward (projection, statistics, normalisation)
and backward (norm sums, the main kernel's do/dv and dx loops, the factor gradients). Under the
interpreter only small batches run in a few seconds, so the sizes here are mid-sized but force two or three
tiles and a 128-wide k block (k = 70); h = 1024 and k = 128 are checked by the sm_90 compile
(benchmarks/triton_sm90_sizes.py, tables in benchmarks/RESULTS.md).
"""
import os

import pytest
import torch

from helpers import cell_inputs, fp32_exact, rel_err, run_with_grads

cell = pytest.importorskip("hamur_fast.kernels.adapter_cell")

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + \
    (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="no CUDA device and TRITON_INTERPRET is not 1")

NAMES = ["x", "rep", "down_left", "down_right", "down_bias", "up_left", "up_right", "up_bias",
         "norm_weight", "norm_bias"]


def tiles(width, rank):
    meta = cell._tile_meta(width, rank, 7)
    return -(-width // meta["BLOCK_H"])


CASES = [  # (B, h, k, s, mode, training): k = 70 takes a 128-wide k block and 64-wide h tiles
    (20, 150, 70, 9, "paper", True),
    (23, 200, 21, 7, "paper", True), (23, 200, 21, 7, "paper", False), (23, 200, 21, 7, "released", True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, width, rank, bottleneck, mode, training", CASES)
def test_several_h_tiles_match_reference(batch, width, rank, bottleneck, mode, training, device):
    assert tiles(width, rank) >= 2
    inputs = fp32_exact(cell_inputs(batch, width, rank, bottleneck, 3, mode, seed=batch + width,
                                    edge_domains=False))
    upstream = torch.randn(batch, width, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
    ref_y, ref_leaves, ref_stats = run_with_grads("reference", torch.float64, "cpu", inputs, mode, upstream,
                                                  training)
    y, leaves, stats = run_with_grads("triton", torch.float32, device, inputs, mode, upstream, training)
    assert rel_err(y.cpu(), ref_y) <= 1e-5
    for name, fast, slow in zip(NAMES, leaves, ref_leaves):
        if slow.grad.abs().max() < 1e-12:  # up_bias under batch statistics: zero by construction
            assert fast.grad.abs().max() <= 1e-4, name
            continue
        assert rel_err(fast.grad.cpu(), slow.grad) <= 2e-5, name
    for fast, slow in zip(stats, ref_stats):
        if slow is not None:
            assert rel_err(fast.cpu(), slow) <= 1e-6


def test_sizes_beyond_the_limits_are_refused_by_name():
    for kwargs, name in ((dict(width=cell.MAX_WIDTH + 1, rank=5, bottleneck=7), "width"),
                         (dict(width=13, rank=cell.MAX_RANK + 1, bottleneck=7), "rank"),
                         (dict(width=13, rank=5, bottleneck=cell.MAX_BOTTLENECK + 1), "bottleneck")):
        with pytest.raises(ValueError, match=name):
            cell.check_sizes(**kwargs)
    cell.check_sizes(cell.MAX_WIDTH, cell.MAX_RANK, cell.MAX_BOTTLENECK)
