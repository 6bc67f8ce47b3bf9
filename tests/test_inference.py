"""Predictor and eval-mode folding: equal to the unfolded model's eval output (fp32 rel err <= 1e-5)."""
import sys
import threading

import pytest
import torch
from torch import nn

import hamur_fast as hf
from hamur_fast.inference import Predictor, fold_for_inference, needs_whole_batch
from hamur_fast.inference.folding import FoldedHyperAdapter, NormFoldedAway
from hamur_fast.nn import DomainBatchNorm1d

from helpers import rel_err

INPUT_DIM, DOMAINS = 24, 3
BUCKETS = (1, 8, 64)  # small buckets keep the test fast; 70 rows exceed the biggest one
BATCHES = (1, 3, 8, 13, 70)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")


def settled(model: nn.Module, seed: int = 0) -> nn.Module:
    """A model whose normalisations are far from identity: random affine params, trained running stats."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_weight", "norms.0.weight", "norms.1.weight")) or ".1.weight" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(("norm_bias", "bias")):
                param.normal_(0.0, 0.2)
        model.train()
        for _ in range(3):
            e = torch.randn(96, model.input_dim) * 2 + 0.5
            model(e, torch.randint(0, model.num_domains, (96,)))
    return model.eval()


def inputs(batch, seed=1, input_dim=INPUT_DIM):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, input_dim, generator=g) * 2 + 0.5, torch.randint(0, DOMAINS, (batch,), generator=g)


def hamur(**kwargs):
    return settled(hf.models.HAMUR(INPUT_DIM, DOMAINS, dims=[32, 16], rank=5, hyper_dims=[12],
                                   bottleneck=6, wide_dim=3, **kwargs))


def assert_predicts_like_eval(model, predictor, batches=BATCHES):
    for batch in batches:
        e, domain = inputs(batch, seed=batch)
        with torch.no_grad():
            expected = model(e, domain)
        actual = predictor.predict(e, domain)
        assert actual.shape == (batch,)
        assert rel_err(actual, expected) <= 1e-5, (batch, rel_err(actual, expected))


@pytest.mark.parametrize("backbone", ["mlp", "dcn", "wide_deep"])
def test_predictor_equals_eval_model_paper_mode(backbone):
    model = hamur(backbone=backbone)
    assert_predicts_like_eval(model, Predictor(model, "cpu", batch_buckets=BUCKETS))


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_predictor_equals_eval_model_for_norm_ablations(norm):
    model = hamur(norm=norm)
    assert_predicts_like_eval(model, Predictor(model, "cpu", batch_buckets=BUCKETS), batches=(1, 13, 70))


def test_predictor_static_hyper_and_no_adapter_baseline():
    for model in (hamur(hyper="static"), hamur(use_adapter=False)):
        assert_predicts_like_eval(model, Predictor(model, "cpu", batch_buckets=BUCKETS), batches=(1, 70))


def test_released_mode_runs_the_exact_batch():
    model = hamur(mode="released")
    predictor = Predictor(model, "cpu", batch_buckets=BUCKETS)
    assert predictor.whole_batch and needs_whole_batch(model)
    assert not needs_whole_batch(hamur())
    assert needs_whole_batch(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)))
    # 70 rows: one piece (chunking at 64 would change the whole-batch statistics and the result).
    assert_predicts_like_eval(model, predictor, batches=(2, 13, 70))


@pytest.mark.parametrize("name", [n for n in hf.models.available() if not n.startswith(("hamur", "mlp", "dcn",
                                                                                        "wide_deep"))])
def test_predictor_handles_zoo_models(name):
    model = settled(hf.models.build(name, INPUT_DIM, DOMAINS))
    assert_predicts_like_eval(model, Predictor(model, "cpu", batch_buckets=BUCKETS), batches=(1, 70))


def test_folding_removes_every_normalisation_and_leaves_the_original_alone():
    model = hamur(backend="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_for_inference(model)
    kinds = {type(m) for m in folded.modules()}
    tower_norms = {type(norm) for norm in model.backbone.norms}
    assert not kinds & {nn.BatchNorm1d, hf.nn.RepeatedUpdateBatchNorm1d, DomainBatchNorm1d, hf.HyperAdapter,
                        *tower_norms}
    assert FoldedHyperAdapter in kinds
    assert not folded.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "folding changed the original model"
    assert NormFoldedAway not in tower_norms  # the original keeps its normalisations
    e, domain = inputs(33)
    with torch.no_grad():
        assert rel_err(folded(e, domain), model(e, domain)) <= 1e-5


def kernel_backends_on_cpu():
    return [name for name in hf.ops.registry.auto_backends("cpu")
            if hf.ops.registry.get_backend(name).capabilities.fused_cell]


@pytest.mark.parametrize("backend", kernel_backends_on_cpu())
def test_kernel_backend_cells_are_kept_and_predict_like_eval(backend):
    # A kernel applies the normalisation's affine in registers: folding keeps the fused cell.
    model = hamur(backend=backend)
    predictor = Predictor(model, "cpu", batch_buckets=BUCKETS)
    assert any(isinstance(m, hf.HyperAdapter) for m in predictor.model.modules())
    assert_predicts_like_eval(model, predictor, batches=(1, 13, 70))


def test_folding_is_exact_in_float64():
    model = hamur().double()
    e, domain = inputs(20)
    with torch.no_grad():
        assert rel_err(fold_for_inference(model)(e.double(), domain), model(e.double(), domain)) <= 1e-12


def test_folded_shared_mlp_has_no_batchnorm():
    folded = fold_for_inference(hamur(backbone="dcn"))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())


def test_predictor_rejects_bad_input():
    model = hamur()
    predictor = Predictor(model, "cpu", batch_buckets=BUCKETS)
    e, domain = inputs(4)
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(e[:, :-1], domain)
    with pytest.raises(ValueError, match="out of range"):
        predictor.predict(e, domain + DOMAINS)
    with pytest.raises(ValueError, match="empty batch"):
        predictor.predict(e[:0], domain[:0])
    with pytest.raises(ValueError, match="batch_buckets"):
        Predictor(model, "cpu", batch_buckets=(0, 8))
    with pytest.raises(ValueError, match="batch_buckets"):
        Predictor(model, "cpu", batch_buckets=())
    with pytest.raises(ValueError, match="takes a model"):
        Predictor(42, "cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Predictor("no/such/checkpoint.pt", "cpu")


def train_checkpoint(run_dir):
    """A small HAMUR-MLP trained one epoch on synthetic data; returns (checkpoint path, data)."""
    from hamur_fast.data import load_synthetic
    from hamur_fast.train import train_run

    data = load_synthetic(rows=600, seed=1)
    model = {"name": "hamur_mlp", "dims": [16, 8], "hyper_dims": [8], "rank": 4, "bottleneck": 4}
    train_run({"data": {"kind": "synthetic", "rows": 600, "seed": 1}, "model": model,
               "train": {"batch_size": 128, "epochs": 1, "progress": False, "seed": 3, "device": "cpu"}},
              data, run_dir=run_dir, progress=False)
    return run_dir / "checkpoint.pt", data


def test_predictor_serves_a_training_checkpoint(tmp_path):
    from hamur_fast.train import load_trained

    checkpoint, data = train_checkpoint(tmp_path)
    predictor = Predictor(checkpoint, "cpu", batch_buckets=BUCKETS)
    trained = load_trained(checkpoint, "cpu")[0].model.eval()
    rows = data.train  # 70 rows: more than the biggest bucket
    sparse, dense, domain = rows.sparse[:70], rows.dense[:70], rows.domain[:70].long()
    with torch.no_grad():
        expected = trained.core(trained.features(sparse, dense), domain)
        e = predictor.features(sparse, dense)
    assert rel_err(predictor.predict(e, domain), expected) <= 1e-5


def test_predictor_accepts_int32_ids_and_float64_inputs():
    model = hamur()
    predictor = Predictor(model, "cpu", batch_buckets=BUCKETS)
    e, domain = inputs(9)
    with torch.no_grad():
        expected = model(e, domain)
    assert rel_err(predictor(e.double(), domain.int()), expected) <= 1e-5


@CUDA
@pytest.mark.parametrize("mode", ["paper", "released"])
def test_cuda_graph_predictor_equals_eval_model(mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = hamur(mode=mode).cuda()
    predictor = Predictor(model, "cuda", batch_buckets=BUCKETS)
    assert bool(predictor.graphs) == (mode == "paper")
    for batch in BATCHES:
        e, domain = inputs(batch, seed=batch)
        with torch.no_grad():
            expected = model(e.cuda(), domain.cuda())
        # Inputs on the host, as a server receives them; twice, so stale padding rows are exercised.
        for _ in range(2):
            assert rel_err(predictor.predict(e, domain), expected) <= 1e-5


# --- Serving from many threads: the "ids already checked" flag belongs to one call, never to the process.

_paused_inside, _paused_release = threading.Event(), threading.Event()


class _PausingModel(hf.models.base.MultiDomainModel):
    """Holds the thread named 'paused-caller' inside its forward (where the ids count as checked)."""

    def __init__(self):
        super().__init__(4, 2)
        self.linear = nn.Linear(4, 1)

    def compute_logits(self, e, domain):
        if threading.current_thread().name == "paused-caller":
            _paused_inside.set()
            _paused_release.wait(30)
        return self.linear(e).squeeze(1) + domain


def test_a_call_inside_the_model_does_not_switch_the_id_check_off_for_another_thread():
    predictor = Predictor(_PausingModel(), "cpu", batch_buckets=BUCKETS)
    e = torch.randn(3, 4)
    paused = threading.Thread(target=predictor.predict, args=(e, torch.tensor([0, 1, 0])), name="paused-caller")
    paused.start()
    try:
        assert _paused_inside.wait(30)
        for bad in (-1, 2, 10**6):
            with pytest.raises(ValueError, match="domain id"):
                predictor.predict(e, torch.tensor([0, bad, 1]))
    finally:
        _paused_release.set()
        paused.join(30)


def test_eight_threads_on_one_predictor_with_valid_and_invalid_ids():
    model = hamur()
    predictor = Predictor(model, "cpu", batch_buckets=BUCKETS)
    batches = [inputs(batch, seed=batch) for batch in (1, 5, 13, 70)]
    with torch.no_grad():
        expected = [model(e, domain) for e, domain in batches]
    bad_ids = (-1, DOMAINS, 10**6)
    failures, start = [], threading.Barrier(8)

    def serve(worker):
        start.wait()
        for step in range(40):
            i = (worker + step) % len(batches)
            e, domain = batches[i]
            if (worker + step) % 2 == 0:
                bad = domain.clone()
                bad[step % len(bad)] = bad_ids[step % 3]
                try:
                    predictor.predict(e, bad)
                    failures.append(f"worker {worker}: id {bad_ids[step % 3]} was served")
                except ValueError:
                    pass
                except Exception as err:  # the id got past the check and failed somewhere inside
                    failures.append(f"worker {worker}: id {bad_ids[step % 3]} reached the model: {err!r}")
            elif rel_err(predictor.predict(e, domain), expected[i]) > 1e-5:
                failures.append(f"worker {worker}: wrong prediction for batch {i}")

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that calls interleave at every line
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures[:5]
