"""What the zoo's later models add beyond the contract of test_zoo.py: the Trainer's auxiliary-loss hook,
AdaSparse's sparsity regulariser, AdaptDHM's routing and centroids, per-domain isolation, and a
``hamur-fast compare`` run of the new models on synthetic data."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from torch import nn

import hamur_fast as hf
from hamur_fast.cli import main
from hamur_fast.models.base import MultiDomainModel
from hamur_fast.models.ppnet import GatedMLP
from hamur_fast.train import TrainConfig, Trainer
from planted_data import INPUT_DIM, NUM_DOMAINS, planted_data

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- the Trainer's hook
class Penalised(MultiDomainModel):
    """A logistic model that reports ``weight * ||W||^2`` as an auxiliary loss in training."""

    def __init__(self, input_dim: int, num_domains: int, weight: float):
        super().__init__(input_dim, num_domains)
        self.linear, self.weight = nn.Linear(input_dim, 1), weight
        self._penalty = None

    def compute_logits(self, e, domain):
        if self.training:
            self._penalty = self.weight * self.linear.weight.pow(2).sum()
        return self.linear(e).squeeze(1)

    def auxiliary_losses(self):
        return {"l2": self._penalty} if self.training and self.weight else {}


def _synthetic(rows=2_000, seed=5):
    return hf.data.load_dataset({"kind": "synthetic", "rows": rows, "seed": seed})


def _fit(core, data, tmp_path, epochs=2, **train):
    model = hf.features.CTRModel(data.feature_map, core, embed_dim=4)
    trainer = Trainer(model, TrainConfig(epochs=epochs, batch_size=256, progress=False, seed=1, **train),
                      data.feature_map, tmp_path)
    return trainer, trainer.fit(data)


def test_trainer_adds_auxiliary_losses_and_logs_each_per_epoch(tmp_path):
    data = _synthetic()
    width = hf.features.embedding_width(data.feature_map, 4)
    torch.manual_seed(0)
    plain, _ = _fit(Penalised(width, data.feature_map.num_domains, 0.0), data, None, lr=0.05)
    torch.manual_seed(0)
    penalised, history = _fit(Penalised(width, data.feature_map.num_domains, 1.0), data, tmp_path / "penalised",
                              lr=0.05)
    # The penalty was minimised with the click loss: the penalised weights are much smaller.
    norm = lambda trainer: trainer.model.core.linear.weight.norm().item()  # noqa: E731
    assert norm(penalised) < 0.5 * norm(plain)
    # Logged per epoch, as the mean over the epoch's rows, in history, metrics.json and metrics.csv.
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(row["train_l2"] > 0 for row in history) and history[1]["train_l2"] < history[0]["train_l2"]
    assert json.loads((tmp_path / "penalised" / "metrics.json").read_text())[1]["train_l2"] == history[1]["train_l2"]
    with open(tmp_path / "penalised" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["train_l2"]) == pytest.approx(history[0]["train_l2"])
    assert not any(key.startswith("train_l2") for key in plain.history[0])  # a model without any logs none


def test_a_captured_step_refuses_auxiliary_losses(tmp_path):
    data = _synthetic(rows=1_000)
    width = hf.features.embedding_width(data.feature_map, 4)
    with pytest.raises(ValueError, match="cuda_graph does not include the model's auxiliary losses"):
        _fit(Penalised(width, data.feature_map.num_domains, 1.0), data, tmp_path, epochs=1, cuda_graph=True)


# ---------------------------------------------------------------------------- AdaSparse's regulariser
def _adasparse(**kwargs):
    torch.manual_seed(0)
    return hf.models.build("adasparse", INPUT_DIM, NUM_DOMAINS, dims=[24, 11], domain_embed_dim=5, **kwargs)


def test_sparsity_penalty_pushes_toward_the_target_band():
    model = _adasparse(target_sparsity=0.5, sparsity_tolerance=0.1, sparsity_weight=0.2)
    dense = torch.full((4, 10), 1.5)  # nothing pruned: too dense, the penalty pushes the factors down
    assert model.sparsity_penalty(dense).item() == pytest.approx(0.2 * 1.5)
    sparse = dense.clone()
    sparse[:, :8] = 0  # 80% pruned: too sparse, pushed up (negative weight on the factors)
    assert model.sparsity_penalty(sparse).item() == pytest.approx(-0.2 * 0.3)
    inside = dense.clone()
    inside[:, :5] = 0  # 50%: inside the band, no penalty
    assert model.sparsity_penalty(inside).item() == 0.0


def test_adasparse_reports_its_regulariser_in_training_only():
    e, domain, _ = planted_data(64, seed=3)
    model = _adasparse().train()
    model(e, domain)
    losses = model.auxiliary_losses()
    assert list(losses) == ["sparsity"] and losses["sparsity"].requires_grad
    model.eval()
    model(e, domain)
    assert model.auxiliary_losses() == {}
    off = _adasparse(target_sparsity=None).train()
    off(e, domain)
    assert off.auxiliary_losses() == {}
    for bad, message in [(dict(target_sparsity=1.0), "target_sparsity must satisfy 0 <= target_sparsity < 1"),
                         (dict(sparsity_weight=-1.0), "sparsity_weight must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=message):
            _adasparse(**bad)


def _pruned_fraction(model, e, domain):
    with torch.no_grad():
        model.eval()
        pi = model.neuron_weights(model.pruners[0], e, model.domain_embedding(domain))
    return (pi == 0).float().mean().item()


def test_the_regulariser_reaches_the_target_sparsity():
    e, domain, label = planted_data(2048, seed=0)
    fractions = {}
    for target in (None, 0.5):
        model = _adasparse(target_sparsity=target, sparsity_tolerance=0.05)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        order = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(250):
            rows = torch.randint(0, e.shape[0], (64,), generator=order)
            loss = nn.functional.binary_cross_entropy_with_logits(model.logits(e[rows], domain[rows]), label[rows])
            (loss + sum(model.auxiliary_losses().values())).backward()
            optimizer.step()
            optimizer.zero_grad()
        fractions[target] = _pruned_fraction(model, e, domain)
    assert fractions[None] < 0.3  # left alone, few neurons are pruned
    assert 0.4 <= fractions[0.5] <= 0.6, fractions


# ---------------------------------------------------------------------------- AdaptDHM's routing
def _adaptdhm():
    torch.manual_seed(0)
    return hf.models.build("adaptdhm", INPUT_DIM, NUM_DOMAINS, num_clusters=3, dims=[24, 11], beta=0.5)


def test_adaptdhm_moves_centroids_toward_their_members_in_training_only():
    model = _adaptdhm().train()
    e, domain, _ = planted_data(256, seed=1)
    before = model.centroids.clone()
    x = model.directions(e)  # training mode: batch statistics, the same x as the forward's
    cluster = (x @ before.T).argmax(dim=1)
    model(e, domain)
    for c in range(3):
        members = x[cluster == c]
        if len(members):
            expected = nn.functional.normalize(0.5 * before[c] + 0.5 * members.mean(dim=0), dim=0)
            torch.testing.assert_close(model.centroids[c], expected)
        else:
            torch.testing.assert_close(model.centroids[c], before[c])
    torch.testing.assert_close(model.centroids.norm(dim=1), torch.ones(3))
    model.eval()
    frozen = model.centroids.clone()
    model(e, domain)
    assert torch.equal(model.centroids, frozen)


def test_adaptdhm_scores_each_row_with_its_own_cluster_only():
    model = _adaptdhm()
    e, domain, _ = planted_data(200, seed=2)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(e, domain)
        model.eval()
        cluster = model.route(e)
        assert len(cluster.unique()) > 1
        before = model(e, domain)
        model.layers[0].domain_weight[cluster[0]].mul_(3.0)  # change one cluster's first layer
        after = model(e, domain)
    changed = ~torch.isclose(before, after)
    assert torch.equal(changed, cluster == cluster[0])


# ---------------------------------------------------------------------------- per-domain parts
def test_sarnet_rows_ignore_other_domains_specific_parameters():
    torch.manual_seed(0)
    model = hf.models.build("sarnet", INPUT_DIM, NUM_DOMAINS, shared_experts=3, specific_experts=2, expert_dim=8)
    e, domain, _ = planted_data(120, seed=4)
    with torch.no_grad():
        model.train()
        model(e, domain)
        model.eval()
        before = model(e, domain)
        for parameter in (model.scenario_weight, model.specific_experts.weight, model.gates.weight,
                          model.scenario_logit_bias):
            parameter[1].add_(0.5)
        after = model(e, domain)
    assert torch.equal(before[domain != 1], after[domain != 1])
    assert not torch.isclose(before[domain == 1], after[domain == 1]).any()


def test_m3oe_runs_with_one_domain_and_its_fusion_weights_learn():
    torch.manual_seed(0)
    model = hf.models.build("m3oe", INPUT_DIM, 1, star_dims=[16, 12], expert_dims=[8], num_experts=2)
    e, _, _ = planted_data(16, seed=5)
    logits = model.logits(e, torch.zeros(16, dtype=torch.long))
    logits.sum().backward()
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    assert model.fusion_theta.grad[:2].abs().min() > 0  # alpha_domain and alpha_task
    assert model.fusion_theta.grad[2] == 0  # beta_domain: with one domain there are no others to balance


def test_ppnet_is_pepnets_gated_dnn_conditioned_on_the_domain():
    torch.manual_seed(0)
    ppnet = hf.models.build("ppnet", INPUT_DIM, NUM_DOMAINS, dims=[16, 8], domain_embed_dim=4).eval()
    pepnet = hf.models.build("pepnet", INPUT_DIM, NUM_DOMAINS, dims=[16, 8], domain_embed_dim=4)
    assert isinstance(ppnet.dnn, GatedMLP) and isinstance(pepnet.dnn, GatedMLP)
    e, _, _ = planted_data(8, seed=6)
    with torch.no_grad():
        scores = [ppnet(e, torch.full((8,), d)) for d in range(NUM_DOMAINS)]
    assert not torch.allclose(scores[0], scores[1]) and not torch.allclose(scores[1], scores[2])


# ---------------------------------------------------------------------------- compare on synthetic data
NEW_MODELS = ["sarnet:expert_dim=8:tower_dims=[16]", "adaptdhm:dims=[32,16]",
              "m3oe:star_dims=[32,16]:expert_dims=[16]", "ppnet:dims=[32,16]", "adasparse:dims=[32,16]"]


def test_compare_on_synthetic_data_learns_with_every_new_model(tmp_path):
    config = {"data": {"kind": "synthetic", "rows": 12_000, "seed": 2},
              "model": {"embed_dim": 8},
              "train": {"epochs": 2, "batch_size": 256, "lr": 0.003, "seed": 3},
              "compare": {"models": NEW_MODELS, "seeds": [1]}}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--quiet", "--output", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for label in NEW_MODELS:
        (run,) = result["runs"][label]
        assert run["auc"] > 0.6, f"{label}: test AUC {run['auc']:.3f}"
        assert result["summary"][label]["rows_per_s"][0] > 0
    (adasparse_run,) = (tmp_path / "cmp" / "runs").glob("adasparse*")
    history = json.loads((adasparse_run / "seed1" / "metrics.json").read_text())
    assert all("train_sparsity" in row for row in history)
    assert "train rows/s" in (tmp_path / "cmp" / "compare.md").read_text()
