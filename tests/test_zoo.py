"""The model registry and every model in it: contract, gradients, validation, learning."""
from __future__ import annotations

import pytest
import torch

import hamur_fast as hf
from planted_data import INPUT_DIM, NUM_DOMAINS, planted_data, shared_linear_auc, train_and_auc

NAMES = ["hamur_mlp", "hamur_dcn", "hamur_wide_deep", "mlp", "dcn", "wide_deep", "mlp_shared", "shared_bottom",
         "mmoe", "ple", "star", "apg", "m2m", "pepnet", "epnet", "adasparse", "sarnet", "adaptdhm", "m3oe", "ppnet"]

# Small odd sizes keep the whole zoo fast; test_defaults_build_and_run covers the default sizes (and
# the "auto" backend). The adapter kernels have their own parity tests: here the cells run on "torch".
_HAMUR_SMALL = dict(dims=[24, 11], rank=5, hyper_dims=[7], bottleneck=6, backend="torch")
SMALL = {
    "hamur_mlp": _HAMUR_SMALL, "mlp": _HAMUR_SMALL,
    "hamur_dcn": _HAMUR_SMALL, "dcn": _HAMUR_SMALL,
    "hamur_wide_deep": {**_HAMUR_SMALL, "wide_dim": 2}, "wide_deep": {**_HAMUR_SMALL, "wide_dim": 2},
    "mlp_shared": dict(dims=[24, 11]),
    "shared_bottom": dict(bottom_dims=[24, 11], tower_dims=[7]),
    "mmoe": dict(num_experts=3, expert_dims=[24, 11], tower_dims=[7]),
    "ple": dict(level_dims=[24, 11], tower_dims=[7]),
    "star": dict(dims=[24, 11], aux_dims=[7], domain_embed_dim=5),
    "apg": dict(dims=[24, 11], rank=5, overparam_dim=9, generator_hidden=7, domain_embed_dim=5),
    "m2m": dict(num_experts=3, expert_dims=[24, 11], domain_embed_dim=5, knowledge_dim=5, task_embed_dim=5,
                attention_dim=7),
    "pepnet": dict(dims=[24, 11], domain_embed_dim=5),
    "epnet": dict(dims=[24, 11], domain_embed_dim=5),
    "adasparse": dict(dims=[24, 11], domain_embed_dim=5),
    "sarnet": dict(shared_experts=3, specific_experts=2, expert_dim=16, tower_dims=[9]),
    "adaptdhm": dict(num_clusters=3, dims=[24, 11]),
    "m3oe": dict(star_dims=[24, 11], expert_dims=[9], num_experts=3),
    "ppnet": dict(dims=[24, 11], domain_embed_dim=5),
}


def small(name: str):
    torch.manual_seed(0)
    return hf.models.build(name, INPUT_DIM, NUM_DOMAINS, **SMALL[name])


def batch_with_every_domain(rows: int):
    """A planted-data batch whose first rows cover every domain (as many as ``rows`` allows)."""
    e, domain, _ = planted_data(rows, seed=7)
    covered = min(rows, NUM_DOMAINS)
    domain[:covered] = torch.arange(covered)
    e[:, :NUM_DOMAINS] = torch.nn.functional.one_hot(domain, NUM_DOMAINS).float()
    return e, domain


def test_available_lists_exactly_the_zoo():
    assert hf.models.available() == NAMES
    assert set(SMALL) == set(NAMES)


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown model 'hamur'.*available: hamur_mlp, .*adasparse, .*ppnet"):
        hf.models.build("hamur", INPUT_DIM, NUM_DOMAINS)


def test_unknown_or_contradicting_keywords_are_rejected():
    with pytest.raises(ValueError, match=r"'mmoe' takes no argument\(s\) \['depth'\]; accepted: \['num_experts'"):
        hf.models.build("mmoe", INPUT_DIM, NUM_DOMAINS, depth=3)
    with pytest.raises(ValueError, match=r"'hamur_mlp' takes no argument\(s\) \['depth'\]; accepted: \['backbone'"):
        hf.models.build("hamur_mlp", INPUT_DIM, NUM_DOMAINS, depth=3)
    with pytest.raises(ValueError, match=r"'mlp' fixes \['use_adapter'\]"):
        hf.models.build("mlp", INPUT_DIM, NUM_DOMAINS, use_adapter=True)


def test_hamur_names_differ_in_backbone_and_adapters_only():
    for name, backbone, adapted in [("hamur_dcn", "dcn", True), ("wide_deep", "wide_deep", False)]:
        model = hf.models.build(name, INPUT_DIM, NUM_DOMAINS)
        assert isinstance(model, hf.models.HAMUR) and model.backbone_name == backbone
        assert (model.hyper is not None) == adapted


@pytest.mark.parametrize("name", NAMES)
def test_defaults_build_and_run(name):
    model = hf.models.build(name, INPUT_DIM, NUM_DOMAINS)
    e, domain = batch_with_every_domain(5)
    prob = model(e, domain)
    assert prob.shape == (5,) and torch.isfinite(prob).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rows", [2, 37])
def test_forward_backward_in_training(name, rows):
    model = small(name).train()
    e, domain = batch_with_every_domain(rows)
    prob = model(e, domain)
    assert prob.shape == (rows,) and prob.dtype == torch.float32
    assert ((prob > 0) & (prob < 1)).all()
    prob.log().sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        if rows >= 37 and param_name not in cancelled_by_batch_norm(model):  # every domain present:
            assert param.grad.abs().sum() > 0, f"{name}: no gradient reaches {param_name}"  # all get a signal


def cancelled_by_batch_norm(model) -> set:
    """Parameters whose gradient is exactly zero by design: with tower_norm="whole" the first tower
    layer's statistics are exact functions of its bias too, so the normalisation cancels that bias."""
    return {"backbone.linears.0.bias"} if getattr(getattr(model, "backbone", None), "tower_norm", "") == "whole" else set()


@pytest.mark.parametrize("name", NAMES)
def test_eval_rows_are_independent_and_a_batch_of_one_works(name):
    model = small(name)
    e, domain = batch_with_every_domain(37)
    with torch.no_grad():
        for _ in range(3):  # move the running statistics off their initial values
            model(e, domain)
        model.eval()
        together = model(e, domain)
        alone = torch.cat([model(e[i:i + 1], domain[i:i + 1]) for i in range(e.shape[0])])
    assert ((together > 0) & (together < 1)).all()
    torch.testing.assert_close(together, torch.sigmoid(model.logits(e, domain)))
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_value_errors_naming_the_argument(name):
    model = small(name)
    e, domain = batch_with_every_domain(6)
    bad = [
        ((e, torch.full((6,), NUM_DOMAINS)), f"domain id {NUM_DOMAINS} is out of range"),
        ((e, torch.full((6,), -1)), "domain ids must be >= 0, got -1"),
        ((e, domain[:5]), r"domain must have shape \(6,\)"),
        ((e, domain.float()), "domain must be an int64"),
        ((e[:, :-1], domain), rf"e must have shape \(B, {INPUT_DIM}\), got \(6, {INPUT_DIM - 1}\)"),
        ((e[0], domain), "e must be 2-D"),
        ((e.long(), domain), "e must be a floating-point tensor"),
        ((e[:0], domain[:0]), "e has an empty batch"),
    ]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            model(*args)


@pytest.mark.parametrize("name", NAMES)
def test_learns_the_planted_per_domain_signal(name):
    auc = train_and_auc(small(name))
    assert auc > 0.6, f"{name}: test AUC {auc:.3f}"
    # ~0.86 against ~0.93 for the planted per-domain logistic model: the models must use the domain.
    assert auc > shared_linear_auc(), f"{name}: {auc:.3f} does not beat one shared linear model"
