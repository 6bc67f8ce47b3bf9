"""HAMUR on the MLP, DCN and Wide & Deep backbones, both modes, with and without adapters."""
import pytest
import torch

import hamur_fast as hf
from helpers import rel_err

BACKBONES = ["mlp", "dcn", "wide_deep"]
SMALL = dict(dims=[24, 16], hyper_dims=[8], rank=5, bottleneck=6, dropout=0.0)  # no dropout: runs comparable


def batch(size=37, width=20, domains=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, width, generator=g), torch.randint(0, domains, (size,), generator=g)


@pytest.mark.parametrize("use_adapter", [True, False])
@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_backward_and_backends_agree(backbone, mode, use_adapter):
    torch.manual_seed(0)
    model = hf.models.HAMUR(20, 3, backbone, mode, use_adapter=use_adapter, backend="reference", **SMALL).double()
    e, domain = batch()
    e = e.double()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    slow = model(e, domain)
    model.load_state_dict(snapshot)
    model.backend = "torch"
    fast = model(e, domain)
    assert fast.shape == (37,) and ((fast > 0) & (fast < 1)).all()
    assert rel_err(fast, slow) < 1e-12
    fast.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (model.hyper is not None) == use_adapter


@pytest.mark.parametrize("backbone", BACKBONES)
def test_paper_eval_rows_are_independent(backbone):
    torch.manual_seed(0)
    model = hf.models.HAMUR(20, 3, backbone, **SMALL)
    e, domain = batch(64)
    model.train()
    for _ in range(3):
        model(e, domain)  # move every running statistic off its init
    model.eval()
    with torch.no_grad():
        full = model(e, domain)
        other = batch(64, seed=1)
        mixed = model(torch.cat([e[:5], other[0]]), torch.cat([domain[:5], other[1]]))
        single = model(e[3:4], domain[3:4])
    assert torch.allclose(mixed[:5], full[:5], atol=1e-6)
    assert torch.allclose(single, full[3:4], atol=1e-6)


def test_per_domain_towers_see_only_their_domain():
    """tower_norm="domain": a row's output does not depend on rows of other domains in the training batch
    either (the other tower norms share statistics across domains: tests/test_tower_norm.py)."""
    torch.manual_seed(0)
    model = hf.models.HAMUR(20, 3, "mlp", use_adapter=False, tower_norm="domain", **SMALL)
    e, domain = batch(60)
    domain = torch.arange(60) % 3
    base = model(e, domain)
    e2 = e.clone()
    e2[domain != 0] = torch.randn_like(e2[domain != 0])
    assert torch.allclose(model(e2, domain)[domain == 0], base[domain == 0], atol=1e-6)


def test_training_batch_with_a_missing_and_a_single_row_domain():
    torch.manual_seed(0)
    model = hf.models.HAMUR(20, 3, "mlp", **SMALL)
    e, _ = batch(10)
    domain = torch.tensor([2, 2, 2, 2, 2, 1, 2, 2, 2, 2])
    out = model(e, domain)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_presets_fill_released_sizes_and_sizes_override():
    ml = hf.models.HAMUR(113, 3, "mlp", preset="movielens")
    assert ml.sizes["dims"] == [256, 128] and ml.sizes["rank"] == 35 and ml.sizes["hyper_dims"] == [64]
    assert ml.hyper.rank == 35 and len(ml.backbone.adapters) == 1
    ali = hf.models.HAMUR(50, 3, "mlp", preset="aliccp", rank=12)
    assert ali.sizes["dims"] == [1024, 512, 512, 256, 256, 64, 64] and ali.sizes["adapter_after"] == [5, 6]
    assert ali.hyper.rank == 12 and len(ali.backbone.adapters) == 2
    dcn = hf.models.HAMUR(113, 3, "dcn", preset="movielens")
    assert dcn.sizes["rank"] == 30 and len(dcn.backbone.cross.weights) == 2
    wd = hf.models.HAMUR(113, 3, "wide_deep", preset="movielens")
    assert wd.sizes["rank"] == 45 and wd.sizes["dropout"] == 0.2


def test_model_backend_propagates_to_every_layer():
    model = hf.models.HAMUR(20, 3, "mlp", preset="aliccp", dims=[16, 16, 8], adapter_after=[0, 2])
    model.backend = "reference"
    assert all(a.backend == "reference" for a in model.backbone.adapters)


def test_model_rejects_bad_input():
    model = hf.models.HAMUR(20, 3, "mlp", **SMALL)
    e, domain = batch(5)
    with pytest.raises(ValueError, match="domain id 4 is out of range for num_domains=3"):
        model(e, torch.tensor([0, 1, 2, 4, 0]))
    with pytest.raises(ValueError, match=r"e must have shape \(B, 20\), got \(5, 21\)"):
        model(torch.randn(5, 21), domain)
    with pytest.raises(ValueError, match="e must be a floating-point tensor"):
        model(e.long(), domain)
    with pytest.raises(ValueError, match="backbone must be one of"):
        hf.models.HAMUR(20, 3, "transformer")
    with pytest.raises(ValueError, match="preset must be one of"):
        hf.models.HAMUR(20, 3, "mlp", preset="criteo")
    with pytest.raises(ValueError, match="unknown size argument"):
        hf.models.HAMUR(20, 3, "mlp", depth=3)
    with pytest.raises(ValueError, match=r"adapter_after indices \[4\] are outside"):
        hf.models.HAMUR(20, 3, "mlp", dims=[8, 8], adapter_after=[4])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bf16_autocast_trains(backbone):
    """Under autocast the cell gets bf16 activations and fp32 parameters; it runs in fp32."""
    torch.manual_seed(0)
    model = hf.models.HAMUR(20, 3, backbone, **SMALL)
    e, domain = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prob = model(e, domain)
    assert torch.isfinite(prob).all()
    prob.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        assert (prob.float() - model(e, domain)).abs().max() < 0.05  # close to the fp32 run
