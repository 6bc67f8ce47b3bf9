"""Many domains: the cost of a training step does not grow with D, and the data side handles D = 50+.

Models on the ``meta`` device run the GPU code path shape-only ("auto" picks the grouped kernel there),
so FlopCounterMode and MemTracker measure that path without a GPU. Meta tensors hold no values, so a
step that completes there also never read a device value back to the host.
"""
import math

import numpy as np
import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.flop_counter import FlopCounterMode

import hamur_fast as hf
from hamur_fast.data import DataError
from hamur_fast.data.synthetic import generate, load_synthetic, zipf_shares
from hamur_fast.models import build
from hamur_fast.ops.contract import make_plan
from hamur_fast.train import experiment as ex
from hamur_fast.train import report

BATCH, INPUT_DIM = 4096, 96


def meta_training_step(name: str, num_domains: int):
    """(FLOPs, peak bytes, parameter bytes) of forward + backward of one batch of model ``name`` on meta."""
    with torch.device("meta"):
        model = build(name, INPUT_DIM, num_domains)
        e = torch.randn(BATCH, INPUT_DIM)
        domain = torch.randint(0, num_domains, (BATCH,))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker, FlopCounterMode(display=False) as flops:
        model(e, domain).sum().backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]["Total"]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return flops.get_total_flops(), peak, params


# Parameter-sized tensors beyond the parameters: their gradients, and for STAR the star product
# W_d * W (D, in, out) with its gradient. All independent of the batch.
PARAMETER_COPIES = {"hamur_mlp": 2, "mlp": 2, "star": 3}


@pytest.mark.parametrize("name", ["hamur_mlp", "mlp", "star"])
def test_training_step_cost_does_not_grow_with_domains(name):
    flops_3, peak_3, params_3 = meta_training_step(name, 3)
    flops_100, peak_100, params_100 = meta_training_step(name, 100)
    assert flops_100 <= 1.2 * flops_3, (flops_3, flops_100)
    assert peak_100 <= 1.2 * peak_3 + PARAMETER_COPIES[name] * params_100, (peak_3, peak_100, params_100)


def test_the_cost_check_can_fail():
    """The stacked form (every row against all D weights) is what the check above must catch."""
    def stacked_flops(num_domains):
        with torch.device("meta"):
            layer = hf.nn.DomainLinear(256, 128, num_domains)
            x, domain = torch.randn(BATCH, 256), torch.randint(0, num_domains, (BATCH,))
        with FlopCounterMode(display=False) as flops:
            hf.ops.grouped_linear.stacked(x, domain, layer.weight.transpose(1, 2), layer.bias)
        return flops.get_total_flops()

    assert stacked_flops(100) > 30 * stacked_flops(3)


@pytest.mark.parametrize("name", ["shared_bottom", "mmoe", "m2m"])
def test_other_zoo_models_with_per_domain_parts_run_on_meta_at_constant_cost(name):
    assert meta_training_step(name, 100)[0] <= 1.2 * meta_training_step(name, 3)[0]


def test_hamur_in_both_modes_runs_on_meta():
    for mode in ("paper", "released"):
        with torch.device("meta"):
            model = build("hamur_mlp", INPUT_DIM, 5, mode=mode)
            out = model(torch.randn(64, INPUT_DIM), torch.randint(0, 5, (64,)))
        out.sum().backward()
        assert out.shape == (64,) and out.device.type == "meta"


# --------------------------------------------------------------------------------------------------
# Data with many domains
# --------------------------------------------------------------------------------------------------
def test_zipf_shares_are_skewed_and_every_domain_appears():
    shares = np.array(zipf_shares(50))
    assert math.isclose(shares.sum(), 1.0) and (np.diff(shares) < 0).all()
    assert math.isclose(shares[0] / shares[9], 10.0)
    frame = generate(20_000, seed=3, domains=50)
    counts = np.bincount(frame["domain"], minlength=50)
    assert (counts > 0).all() and counts[0] > 20 * counts[-1] > 0
    assert generate(500, seed=1, domains=50).equals(generate(500, seed=1, domains=50))
    with pytest.raises(DataError, match="either"):
        generate(100, shares=(0.5, 0.5), domains=3)
    with pytest.raises(DataError, match="integer"):
        generate(100, domains="many")
    with pytest.raises(DataError, match="one user per domain"):
        generate(100, domains=700)


def test_many_domain_summary_table_and_full_table():
    data = load_synthetic(rows=6000, domains=30)
    counts = data.train.domain_counts(30)
    stats = {"auc": (0.7, 0.0), "logloss": (0.5, 0.0), "runs": (1.0, 0.0), "best_epoch": (2.0, 0.0),
             "seconds": (1.0, 0.0), **{f"auc_d{d}": (0.5 + d / 100, 0.0) for d in range(30)}}
    stats["auc_d29"] = (math.nan, 0.0)  # a domain whose test rows hold one class only
    table = ex.format_domain_summary({"hamur_mlp": stats}, counts)
    assert "| hamur_mlp | 0.7000 | 0.5000 (d0) | 0.6400 (d14) | 0.7800 (d28) |" in table
    rare = report.rare_domains(counts)
    assert len(rare) == 3 and max(counts[d] for d in rare) <= sorted(counts)[2]
    full = ex.format_domain_table({"hamur_mlp": stats}, ex.domain_labels(data.feature_map), counts)
    assert len(full.splitlines()) == 2 + 30 and "n/a" in full.splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# The level-1 Triton kernels (adapter cell, DomainNorm) with many domains, small sizes under the interpreter
# --------------------------------------------------------------------------------------------------
LEVEL1 = pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                            reason="no CUDA device and TRITON_INTERPRET is not 1")
SPARSE_DOMAINS = [0, 999, 500, 3, 3, 998, 17, 640, 641, 2] * 3 + [7, 999, 0, 123, 124, 125, 999]  # B = 37


class RecordingEmpty:
    """The launchers' ``empty``: allocates (NaN-filled, so unwritten outputs show) and records each shape."""

    def __init__(self):
        self.shapes = []

    def __call__(self, shape, **kw):
        self.shapes.append(tuple(shape))
        tensor = torch.empty(shape, **kw)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else 2 ** 40)

    def not_per_domain(self, num_domains):
        """Allocations that do not scale with D by their nature (the per-domain statistics, the factor gradients
        (D, in, out) and their per-tile partials have a leading axis of at least D, far above this B)."""
        return [shape for shape in self.shapes if not shape or shape[0] < num_domains]


def level1_launches(num_domains, device, domain, check_against_reference):
    """Adapter cell and DomainNorm, forward and backward (paper mode, batch statistics), through the launchers
    with a RecordingEmpty; optionally checked against the float64 reference. Returns the recorder."""
    from helpers import NAMES, cell_inputs, rel_err, run_with_grads
    from hamur_fast.ops.backends import triton  # its fused forms: the launchers in a row

    batch, width = len(domain), 13
    x, rep, _, params, stats = cell_inputs(batch, width, 5, 7, num_domains, "paper", seed=5, edge_domains=False)
    upstream = torch.randn(batch, width, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    record = RecordingEmpty()
    f32 = [t.float().to(device) for t in (x, rep, *params, *stats, upstream)]
    x32, rep32, params32, stats32, dy = f32[0], f32[1], f32[2:10], f32[10:12], f32[12]
    domain = domain.to(device)
    plan = make_plan("paper", True, True, 0.1, 1e-5)
    y, count, mean, m2, rstd, *saved = triton.cell_forward(x32, rep32, domain, params32, *stats32, plan, empty=record)
    grads = triton.cell_backward(dy, x32, rep32, domain, params32, saved, count, mean, rstd, plan, empty=record)
    norm_y, norm_count, norm_mean, _, norm_rstd = triton.norm_forward(x32, domain, params32[6], params32[7], *stats32,
                                                                      plan, empty=record)
    norm_grads = triton.norm_backward(dy, x32, domain, params32[6], norm_count, norm_mean, norm_rstd, plan,
                                      empty=record)
    if check_against_reference:
        inputs = (x, rep, domain.cpu(), params, stats)
        ref_y, ref_leaves, _ = run_with_grads("reference", torch.float64, "cpu", inputs, "paper", upstream)
        assert rel_err(y.cpu(), ref_y) < 1e-5
        for name, fast, slow in zip(NAMES, grads, ref_leaves):
            if slow.grad.abs().max() < 1e-12:  # zero by construction (up_bias feeds the normalisation)
                assert fast.abs().max() < 1e-4, name
            else:
                assert rel_err(fast.cpu(), slow.grad) < 1e-4, name
        leaves = [t.detach().requires_grad_() for t in (x, params[6], params[7])]
        ref_norm = hf.ops.domain_norm(*leaves[:1], domain.cpu(), *leaves[1:], *[s.clone() for s in stats],
                                      backend="reference")
        ref_norm.backward(upstream)
        assert rel_err(norm_y.cpu(), ref_norm.detach()) < 1e-5
        assert torch.equal(norm_count.cpu(), torch.bincount(domain.cpu(), minlength=num_domains).float())
        for fast, slow in zip(norm_grads, leaves):
            assert rel_err(fast.cpu(), slow.grad) < 1e-5
    return record


@LEVEL1
def test_level1_kernels_with_1000_domains_and_scratch_that_does_not_grow_with_d():
    """D = 1000, B = 37 (odd), rows unsorted, most domains empty, some with one row, a block of sorted rows
    spanning domains far apart: output, every gradient and the statistics of the adapter cell and of DomainNorm
    against the float64 reference. And every buffer the launchers allocate that is not per-domain by nature
    (outputs, saved vectors, statistics partials, merge scratch) is the same at D = 100 as at D = 1000: the
    partials hold min(rows per block, D) slots per block, never a slot per (block, domain)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    domain = torch.tensor(SPARSE_DOMAINS)
    many = level1_launches(1000, device, domain, check_against_reference=True)
    fewer = level1_launches(100, device, domain % 100, check_against_reference=False)
    assert many.not_per_domain(1000) == fewer.not_per_domain(100)
    assert max(shape[0] for shape in many.not_per_domain(1000)) < 100  # nothing per-domain slipped through
    assert [shape for shape in many.shapes if shape and shape[0] == 1000] and len(many.shapes) == len(fewer.shapes)
