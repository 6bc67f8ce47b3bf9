"""HAMUR's ablation switches: hyper="dynamic"|"static", norm="domain"|"layer"|"batch"|"none", adapter_after."""
from __future__ import annotations

import pytest
import torch

import hamur_fast as hf
from hamur_fast.ops import eager
from planted_data import INPUT_DIM, NUM_DOMAINS, planted_data, shared_linear_auc, train_and_auc

SMALL = dict(dims=[24, 11], rank=5, hyper_dims=[7], bottleneck=6, backend="torch")
WIDTH, RANK = 11, 5


def build(name="hamur_mlp", **switches):
    torch.manual_seed(0)
    return hf.models.build(name, INPUT_DIM, NUM_DOMAINS, **{**SMALL, **switches})


def cells(model):
    return [module for module in model.modules() if isinstance(module, hf.HyperAdapter)]


def test_static_has_one_matrix_per_domain_and_no_hyper_network():
    model = build(hyper="static")
    assert model.hyper is None
    assert not [n for n in dict(model.named_parameters()) if n.startswith("hyper.")]
    assert model.static_rep.shape == (NUM_DOMAINS, RANK, RANK)
    dynamic_params = sum(p.numel() for p in build().parameters())
    static_params = sum(p.numel() for p in model.parameters())
    hyper_params = sum(p.numel() for p in build().hyper.parameters())
    assert static_params == dynamic_params - hyper_params + NUM_DOMAINS * RANK * RANK
    e, domain, _ = planted_data(9, seed=3)
    rep = model.representation(e, domain)
    torch.testing.assert_close(rep, model.static_rep[domain])
    # The matrix depends on the domain only, not on the instance.
    torch.testing.assert_close(model.representation(torch.randn_like(e), domain), rep)


def test_dynamic_matrix_depends_on_the_instance():
    model = build().eval()
    e, domain, _ = planted_data(9, seed=3)
    assert not torch.allclose(model.representation(e, domain), model.representation(torch.randn_like(e), domain))


@pytest.mark.parametrize("norm, params, buffers", [
    ("domain", {"norm_weight": (NUM_DOMAINS, WIDTH), "norm_bias": (NUM_DOMAINS, WIDTH)},
     {"running_mean": (NUM_DOMAINS, WIDTH), "running_var": (NUM_DOMAINS, WIDTH)}),
    ("layer", {"norm_weight": (NUM_DOMAINS, WIDTH), "norm_bias": (NUM_DOMAINS, WIDTH)}, {}),
    ("batch", {"norm_weight": (NUM_DOMAINS, WIDTH), "norm_bias": (NUM_DOMAINS, WIDTH)},
     {"running_mean": (WIDTH,), "running_var": (WIDTH,)}),
    ("none", {}, {}),
])
def test_norm_switch_sets_the_cell_parameters(norm, params, buffers):
    (cell,) = cells(build(norm=norm))
    factors = {"down_left", "down_right", "down_bias", "up_left", "up_right", "up_bias"}
    assert {n: tuple(p.shape) for n, p in cell.named_parameters() if n not in factors} == params
    assert {n: tuple(b.shape) for n, b in cell.named_buffers()} == buffers


def test_default_cell_keeps_its_state_dict_keys():
    cell = hf.HyperAdapter(WIDTH, RANK, NUM_DOMAINS, bottleneck=6)
    assert list(cell.state_dict()) == ["down_left", "down_right", "up_left", "up_right", "down_bias", "up_bias",
                                       "norm_weight", "norm_bias", "running_mean", "running_var"]


def _cell_io(norm, training=True):
    torch.manual_seed(1)
    cell = hf.HyperAdapter(WIDTH, RANK, NUM_DOMAINS, bottleneck=6, norm=norm).train(training)
    x, rep = torch.randn(17, WIDTH), torch.rand(17, RANK, RANK)
    domain = torch.arange(17) % NUM_DOMAINS
    projection = [cell.down_left, cell.down_right, cell.down_bias, cell.up_left, cell.up_right, cell.up_bias]
    o = eager.adapter_projection(x, rep, domain, *projection, per_domain=cell.mode == "paper")
    return cell, x, rep, domain, o


def test_norm_none_adds_the_projection_unnormalised():
    cell, x, rep, domain, o = _cell_io("none")
    torch.testing.assert_close(cell(x, rep, domain), x + o)


def test_norm_layer_standardises_each_row_then_applies_the_domain_affine():
    cell, x, rep, domain, o = _cell_io("layer")
    with torch.no_grad():
        cell.norm_weight.uniform_(0.5, 2.0)
        cell.norm_bias.normal_()
    standard = (cell(x, rep, domain) - x - cell.norm_bias[domain]) / cell.norm_weight[domain]
    torch.testing.assert_close(standard.mean(dim=1), torch.zeros(17), atol=1e-5, rtol=0)
    torch.testing.assert_close(standard.var(dim=1, unbiased=False), torch.ones(17), atol=1e-3, rtol=0)


def test_norm_batch_uses_whole_batch_statistics_in_training_and_running_ones_in_eval():
    cell, x, rep, domain, o = _cell_io("batch")
    standard = (cell(x, rep, domain) - x - cell.norm_bias[domain]) / cell.norm_weight[domain]
    torch.testing.assert_close(standard.mean(dim=0), torch.zeros(WIDTH), atol=1e-5, rtol=0)
    torch.testing.assert_close(cell.running_mean, 0.1 * o.mean(dim=0).detach())
    cell.eval()
    together = cell(x, rep, domain)
    alone = torch.cat([cell(x[i:i + 1], rep[i:i + 1], domain[i:i + 1]) for i in range(17)])
    torch.testing.assert_close(alone, together)


@pytest.mark.parametrize("norm", ["layer", "batch", "none"])
def test_non_domain_norms_pass_gradients_to_every_factor_at_init(norm):
    cell, x, rep, domain, _ = _cell_io(norm)
    cell(x, rep, domain).pow(2).sum().backward()
    for name, param in cell.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_non_domain_norms_validate_their_inputs():
    cell, x, rep, domain, _ = _cell_io("layer")
    with pytest.raises(ValueError, match=r"rep must have shape \(17, 5, 5\)"):
        cell(x, rep[:, :4, :4], domain)
    with pytest.raises(ValueError, match=f"domain id {NUM_DOMAINS} is out of range"):
        cell(x, rep, torch.full((17,), NUM_DOMAINS))


def test_adapter_after_places_one_cell_per_listed_layer():
    model = build(adapter_after=[0, 1])
    assert [c.width for c in cells(model)] == [24, 11]
    with pytest.raises(ValueError, match=r"adapter_after indices \[2\]"):
        build(adapter_after=[2])


def test_switches_reach_every_backbone_and_released_mode():
    for name in ("hamur_dcn", "hamur_wide_deep"):
        model = build(name, hyper="static", norm="layer")
        assert model.hyper is None and all(c.norm == "layer" for c in cells(model))
    released = hf.models.HAMUR(INPUT_DIM, NUM_DOMAINS, "mlp", "released", hyper="static", norm="layer", **SMALL)
    (cell,) = cells(released)
    assert cell.norm_weight.shape == (WIDTH,)  # released cells share one affine map across domains
    e, domain, _ = planted_data(8, seed=2)
    assert torch.isfinite(released(e, domain)).all()


def test_switches_are_plain_keywords_for_configs():
    config = {"hyper": "static", "norm": "none", "adapter_after": [0], "dims": [24, 11], "rank": 5}
    model = hf.models.build("hamur_mlp", INPUT_DIM, NUM_DOMAINS, **config)
    assert model.sizes["hyper"] == "static" and model.sizes["norm"] == "none"
    assert [c.width for c in cells(model)] == [24] and cells(model)[0].norm_weight is None


def test_bad_switch_values_are_rejected():
    with pytest.raises(ValueError, match=r"hyper must be one of \('dynamic', 'static'\), got 'fixed'"):
        build(hyper="fixed")
    with pytest.raises(ValueError, match=r"norm must be one of \('domain', 'layer', 'batch', 'none'\), got 'group'"):
        build(norm="group")
    with pytest.raises(ValueError, match="configure the adapter cells, but this model has none"):
        build("mlp", hyper="static")


@pytest.mark.parametrize("hyper, norm", [("static", "domain"), ("dynamic", "layer"), ("dynamic", "batch"),
                                         ("dynamic", "none"), ("static", "none")])
def test_every_ablation_trains(hyper, norm):
    auc = train_and_auc(build(hyper=hyper, norm=norm))
    assert auc > 0.6, f"hyper={hyper}, norm={norm}: test AUC {auc:.3f}"
    assert auc > shared_linear_auc(), f"hyper={hyper}, norm={norm}: {auc:.3f} does not beat one shared linear model"
