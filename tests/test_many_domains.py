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
from hamur_fast.train import experiment as ex

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
            hf.ops.grouped_linear.run(x, domain, layer.weight.transpose(1, 2), layer.bias, backend="stacked")
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
    rare = ex.rare_domains(counts)
    assert len(rare) == 3 and max(counts[d] for d in rare) <= sorted(counts)[2]
    full = ex.format_domain_table({"hamur_mlp": stats}, ex.domain_labels(data.feature_map), counts)
    assert len(full.splitlines()) == 2 + 30 and "n/a" in full.splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# The level-1 Triton kernels (adapter cell, DomainNorm) with many domains, small sizes under the interpreter
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
                    reason="no CUDA device and TRITON_INTERPRET is not 1")
def test_level1_kernels_with_many_domains():
    """Every per-domain statistic, factor selection and factor gradient at D = 120 (most domains empty, a
    block of 16 sorted rows spanning domains far apart) against the float64 reference. D = 1000 runs the
    same code (the static grids are checked up to D = 1000 in test_grouped_linear.py), but under the
    interpreter each of its D-long loops costs seconds."""
    pytest.importorskip("hamur_fast.kernels.adapter_cell")
    from helpers import cell_inputs, rel_err, run_with_grads

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, rep, _, params, stats = cell_inputs(20, 13, 5, 7, 120, "paper", seed=5, edge_domains=False)
    domain = torch.tensor([0, 119, 60, 3, 3, 118] * 3 + [7, 119])  # unsorted, gaps, 1-row domains
    inputs = (x, rep, domain, params, stats)
    upstream = torch.randn(20, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref_y, ref_leaves, ref_stats = run_with_grads("reference", torch.float64, "cpu", inputs, "paper", upstream)
    y, leaves, new_stats = run_with_grads("triton", torch.float32, device, inputs, "paper", upstream)
    assert rel_err(y.cpu(), ref_y) < 1e-5
    for fast, slow in zip(leaves, ref_leaves):
        if slow.grad.abs().max() < 1e-12:  # zero by construction (up_bias feeds the normalisation): fp32 residue
            assert fast.grad.abs().max() < 1e-4
        else:
            assert rel_err(fast.grad.cpu(), slow.grad) < 1e-4
    for fast, slow in zip(new_stats, ref_stats):
        assert rel_err(fast.cpu(), slow) < 1e-5
