"""The MLP backbone's tower_norm switch: every variant builds, trains, is batch-independent in eval,
folds exactly; the whole-batch statistics derived from the input moments equal the direct computation."""
import copy

import pytest
import torch

import hamur_fast as hf
from hamur_fast.inference import fold_for_inference
from hamur_fast.models.backbones import DEFAULT_TOWER_NORM, TOWER_NORMS
from hamur_fast.nn.domain_layers import DomainBatchNorm1d, DomainLinear, WholeBatchFirstLayerNorm, affine_batch_moments
from helpers import rel_err

SMALL = dict(dims=[24, 11], rank=5, hyper_dims=[7], bottleneck=6, backend="torch")
WIDTH = 20


def batch(rows=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, WIDTH, generator=g) * 2 + 1, torch.randint(0, 3, (rows,), generator=g)


@pytest.mark.parametrize("name", ["mlp", "hamur_mlp"])
@pytest.mark.parametrize("tower_norm", TOWER_NORMS)
def test_each_tower_norm_trains_and_is_batch_independent_in_eval(name, tower_norm):
    torch.manual_seed(0)
    model = hf.models.build(name, WIDTH, 3, tower_norm=tower_norm, **SMALL)
    assert model.backbone.tower_norm == tower_norm
    e, domain = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(model(e, domain), (e[:, 0] > 1).float())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("linears.0.weight" in k for k in moved)
    if tower_norm not in ("layer", "none"):  # running statistics advanced in training
        assert any("norms.0.running_mean" in k for k in moved)
    model.eval()
    with torch.no_grad():
        full = model(e, domain)
        other, other_domain = batch(40, seed=1)
        mixed = model(torch.cat([e[:7], other]), torch.cat([domain[:7], other_domain]))
        single = model(e[3:4], domain[3:4])
        folded = fold_for_inference(model)(e, domain)
    torch.testing.assert_close(mixed[:7], full[:7], rtol=0, atol=1e-6)
    torch.testing.assert_close(single, full[3:4], rtol=0, atol=1e-6)
    torch.testing.assert_close(folded, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tower_norm", [t for t in TOWER_NORMS if t != "released"] + ["released-eval"])
@pytest.mark.parametrize("hyper", ["dynamic", "static"])
def test_towers_on_rows_sorted_once_equal_the_per_layer_routing(tower_norm, hyper):
    """On the CPU the paper towers sort the rows by domain once and run every layer on the segments
    (DomainTowers._routed_sorted): the same function, gradients and running statistics as routing every layer
    on its own (the grouped op's per-layer gather and scatter), in float64, in training and in eval, with a
    domain that has no rows."""
    torch.manual_seed(0)
    training = tower_norm != "released-eval"
    sizes = dict(SMALL, backend="auto", dims=[24, 11, 9], adapter_after=[0, 2])
    sorted_once = hf.models.build("hamur_mlp", WIDTH, 4, tower_norm=tower_norm.split("-")[0], hyper=hyper, **sizes)
    sorted_once = sorted_once.double().train(training)
    per_layer = copy.deepcopy(sorted_once)
    towers = per_layer.backbone
    towers.forward = towers._routed  # rows in their input order, every layer routing them itself
    e, domain = batch(67)
    e = e.double().requires_grad_()
    domain = domain + (domain >= 2)  # ids 0, 1, 3: domain 2 empty
    outputs = []
    for model in (sorted_once, per_layer):
        logits = model.logits(e, domain)
        upstream = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64)
        wanted = [e, *(p for p in model.parameters() if p.requires_grad)]
        grads = torch.autograd.grad((upstream * logits).sum(), wanted, allow_unused=True)
        outputs.append([logits, *(g for g in grads if g is not None), *model.buffers()])
    assert len(outputs[0]) == len(outputs[1])
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_first_layer_moments_match_the_direct_computation():
    """mean_d = W_d mu + b_d and var_d = diag(W_d S W_d^T) equal tower d's batch moments over every row."""
    torch.manual_seed(0)
    linear = DomainLinear(13, 9, 3).double()
    x = (torch.randn(57, 13, dtype=torch.float64) * 3 + 5).requires_grad_()
    _, mean, var = affine_batch_moments(x, linear.weight, linear.bias)
    direct = linear.every_domain(x)  # (D, B, C): every tower on every row
    assert rel_err(mean, direct.mean(dim=1)) < 1e-12
    assert rel_err(var, direct.var(dim=1, unbiased=False)) < 1e-12
    # gradients too: autograd through the moments is the gradient of the direct statistics
    upstream = torch.randn(2, 3, 9, dtype=torch.float64)
    ours = torch.autograd.grad((upstream[0] * mean + upstream[1] * var).sum(), (x, linear.weight))
    theirs = torch.autograd.grad((upstream[0] * direct.mean(1) + upstream[1] * direct.var(1, unbiased=False)).sum(),
                                 (x, linear.weight))
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-10


def test_whole_first_layer_equals_released_towers_first_layer_in_training():
    """Routed rows normalised with derived statistics == every tower on the whole batch, then each row's own."""
    torch.manual_seed(0)
    linear, released = DomainLinear(13, 9, 3).double(), DomainBatchNorm1d(9, 3).double()
    whole = WholeBatchFirstLayerNorm(9, 3).double()
    with torch.no_grad():
        for norm in (released, whole):
            norm.weight.copy_(torch.linspace(0.5, 2, 27).view(3, 9))
            norm.bias.copy_(torch.linspace(-1, 1, 27).view(3, 9))
    x = torch.randn(50, 13, dtype=torch.float64, requires_grad=True)
    domain = torch.arange(50) % 3
    ours = whole.routed_from_input(linear.routed(x, domain), domain, x, linear)
    direct = released.all_domains(linear.every_domain(x)).gather(0, domain.view(1, -1, 1).expand(1, -1, 9))[0]
    assert rel_err(ours, direct) < 1e-12
    upstream = torch.randn_like(ours)
    params = (x, linear.weight, linear.bias, whole.weight)
    ours_grad = torch.autograd.grad((upstream * ours).sum(), params)
    direct_grad = torch.autograd.grad((upstream * direct).sum(), (x, linear.weight, linear.bias, released.weight))
    for a, b in zip(ours_grad, direct_grad):  # (the bias gradient is 0: BatchNorm cancels the bias)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # both update their running statistics with the same (unbiased) whole-batch values
    assert rel_err(whole.running_mean, released.running_mean) < 1e-12
    assert rel_err(whole.running_var, released.running_var) < 1e-12


def test_released_towers_in_paper_mode_equal_routed_eval():
    """tower_norm="released" trains every tower on the whole batch; eval is routed and equals gathering
    every tower's output on the whole batch."""
    torch.manual_seed(0)
    model = hf.models.build("hamur_mlp", WIDTH, 3, tower_norm="released", **SMALL).double()
    e, domain = batch()
    e = e.double()
    model.train()
    model(e, domain)
    model.eval()
    with torch.no_grad():
        routed = model.logits(e, domain)
        all_towers = model.backbone._all_towers(e, domain, model.representation(e, domain))
    assert rel_err(routed, all_towers) < 1e-12


def test_tower_norm_errors_and_defaults():
    assert hf.models.build("mlp", WIDTH, 3, **SMALL).backbone.tower_norm == DEFAULT_TOWER_NORM
    assert hf.models.build("mlp", WIDTH, 3, mode="released", **SMALL).backbone.tower_norm == "released"
    with pytest.raises(ValueError, match="tower_norm must be one of"):
        hf.models.build("mlp", WIDTH, 3, tower_norm="group", **SMALL)
    with pytest.raises(ValueError, match="needs mode='paper'"):
        hf.models.build("mlp", WIDTH, 3, mode="released", tower_norm="shared", **SMALL)
    with pytest.raises(ValueError, match="has none"):
        hf.models.build("dcn", WIDTH, 3, tower_norm="shared", dims=[8])


def test_checkpoints_from_before_tower_norm_load_with_per_domain_statistics(tmp_path, one_thread):
    """Paper-mode MLP towers had per-domain statistics before the switch existed; such a checkpoint
    records no tower_norm and must not be rebuilt with today's default."""
    from hamur_fast.data import load_synthetic
    from hamur_fast.train import load_checkpoint, load_trained, save_checkpoint, train_run

    data = load_synthetic(rows=1_500, seed=1)
    section = {"name": "mlp", "dims": [16, 8], "tower_norm": "domain"}
    train_run({"model": section, "train": {"epochs": 1, "batch_size": 256}}, data, tmp_path, progress=False)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    del payload["config"]["model"]["tower_norm"]  # as written before the switch
    save_checkpoint(tmp_path / "old.pt", payload)
    trainer, _ = load_trained(tmp_path / "old.pt")
    assert trainer.model.core.backbone.tower_norm == "domain"
    reference, _ = load_trained(tmp_path / "checkpoint.pt")
    torch.testing.assert_close(trainer.predict(data.test), reference.predict(data.test), rtol=0, atol=0)
