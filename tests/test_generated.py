"""Fusion level 2 (hamur_fast.ops.generated, kernels/adapter_generated.py): the cell on I generated from g.

The oracle itself (the float64 reference, which materialises z = g W^T + c and normalises it over the batch, against
nn modules and finite differences), the moment identity, the argument errors, the Triton kernels' allocations,
compile and export, and the models at level 2. Every backend against the oracle on odd sizes (output, the
gradients of x, g, W, c, the generator's BN weight and bias and every cell parameter, every running statistic),
on poisoned memory, with out-of-range ids, and opcheck of the registered ops: tests/test_backends.py.
"""
import os

import pytest
import torch

import hamur_fast as hf
from hamur_fast.ops import generated
from helpers import generated_inputs, rel_err

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def test_reference_equals_level1_reference_on_materialised_rep():
    """The oracle itself: the level-1 reference cell on I = ReLU(BN(g W^T + c)) built by nn modules."""
    x, g, domain, (w, c, nw, nb), (rm, rv), params, stats = generated_inputs(37, 13, 5, 7, 3, 9, "paper")
    layer = torch.nn.Sequential(torch.nn.Linear(9, 25), hf.nn.hyper_network.RepeatedUpdateBatchNorm1d(25, 3),
                                torch.nn.ReLU()).double()
    with torch.no_grad():
        for target, value in zip((layer[0].weight, layer[0].bias, layer[1].weight, layer[1].bias,
                                  layer[1].running_mean, layer[1].running_var), (w, c, nw, nb, rm, rv)):
            target.copy_(value)
    gen_stats = [rm.clone(), rv.clone()]
    cell_stats = [s.clone() for s in stats]
    y = hf.ops.hyper_adapter_generated(x, g, domain, w, c, nw, nb, *gen_stats, *params, *cell_stats,
                                       gen_updates=3, backend="reference")
    y1 = hf.ops.hyper_adapter(x, layer(g).view(37, 5, 5), domain, *params, *[s.clone() for s in stats],
                              backend="reference")
    assert torch.allclose(y, y1, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gen_stats[0], layer[1].running_mean, rtol=1e-12, atol=1e-14)
    assert torch.allclose(gen_stats[1], layer[1].running_var, rtol=1e-12, atol=1e-14)


def test_reference_gradcheck():
    x, g, domain, gen, gen_stats, params, stats = generated_inputs(6, 5, 3, 4, 3, 4, "paper")
    leaves = [t.clone().requires_grad_() for t in (x, g, *gen, *params)]

    def fn(*tensors):
        return hf.ops.hyper_adapter_generated(tensors[0], tensors[1], domain, *tensors[2:6], None, None,
                                              *tensors[6:], None, None, backend="reference")
    assert torch.autograd.gradcheck(fn, leaves)


def test_moment_identity_statistics_are_exact():
    """mean and var of z = g W^T + c from the mean and covariance of g equal the direct ones (float64)."""
    _, g, _, (w, c, _, _), _, _, _ = generated_inputs(257, 13, 6, 7, 3, 17, "paper")
    _, mean_z, var_z = generated.generator_batch_stats(g, w, c)
    z = g @ w.t() + c
    assert torch.allclose(mean_z, z.mean(0), rtol=1e-12, atol=1e-13)
    assert torch.allclose(var_z, z.var(0, unbiased=False), rtol=1e-11, atol=1e-13)


def test_errors_name_the_argument():
    x, g, domain, gen, gen_stats, params, stats = generated_inputs(8, 13, 5, 7, 3, 9, "paper")
    args = lambda **over: dict(dict(zip(["gen_weight", "gen_bias", "gen_norm_weight", "gen_norm_bias"], gen)),
                               gen_running_mean=gen_stats[0], gen_running_var=gen_stats[1], **over)
    call = lambda g_, **over: hf.ops.hyper_adapter_generated(x, g_, domain, **args(**over), down_left=params[0],
                                                             down_right=params[1], down_bias=params[2],
                                                             up_left=params[3], up_right=params[4],
                                                             up_bias=params[5], norm_weight=params[6],
                                                             norm_bias=params[7], backend="torch")
    with pytest.raises(ValueError, match="g must have the batch"):
        call(g[:5])
    with pytest.raises(ValueError, match="gen_weight must have shape"):
        call(g, gen_weight=gen[0][:, :4])
    with pytest.raises(ValueError, match="gen_updates"):
        hf.ops.hyper_adapter_generated(x, g, domain, *gen, *gen_stats, *params, gen_updates=0, backend="torch")
    with pytest.raises(ValueError, match="precision"):
        hf.ops.hyper_adapter_generated(x, g, domain, *gen, *gen_stats, *params, precision="fp8", backend="torch")
    with pytest.raises(ValueError, match="domain id 3"):
        bad = domain.clone()
        bad[0] = 3
        hf.ops.hyper_adapter_generated(x, g, bad, *gen, *gen_stats, *params, backend="torch")


triton_only = pytest.mark.skipif(not TRITON, reason="no CUDA device and TRITON_INTERPRET is not 1")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETER = not torch.cuda.is_available()
SLOW = os.environ.get("HAMUR_SLOW_TESTS") == "1"  # the interpreter's slow model-level Triton runs too
# The slow check (compile and export) in one mode under the interpreter, both on a GPU.
SLOW_CHECK_MODES = ["paper"] if INTERPRETER else ["paper", "released"]


class AllocationLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the storage size (in elements) of every tensor any op returns: views of a small storage (an
    expanded stand-in) count as small, every allocation as what it holds."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out


@triton_only
@pytest.mark.parametrize("backend, fused", [("triton", True), ("torch", False)])
def test_no_tensor_of_size_batch_times_k_squared(backend, fused):
    """Forward and backward of the Triton path create no (B, k*k) tensor (nor any within a factor 2 of it);
    the materialising torch path, logged the same way, does (so the log would see one)."""
    batch, rank = 64, 12  # B k^2 = 9216: over twice anything else the step needs (at most ~2.6k elements)
    x, g, domain, gen, gen_stats, params, stats = generated_inputs(batch, 13, rank, 7, 3, 11, "paper", seed=5)
    leaves = [t.float().to(TRITON_DEVICE).requires_grad_() for t in (x, g, *gen, *params)]
    running = [s.float().to(TRITON_DEVICE) for s in (*gen_stats, *stats)]
    with AllocationLog() as log:
        y = hf.ops.hyper_adapter_generated(leaves[0], leaves[1], domain.to(TRITON_DEVICE), *leaves[2:6],
                                           *running[:2], *leaves[6:], *running[2:], backend=backend)
        y.sum().backward()
    largest = max(log.sizes)
    assert (largest[0] * 2 <= batch * rank * rank) == fused, largest


@triton_only
@pytest.mark.parametrize("mode", SLOW_CHECK_MODES)
def test_torch_compile_and_export_see_the_ops(mode):
    """torch.compile (fullgraph) traces the fold, the fused cell's forward and backward and both running-stat
    updates; torch.export keeps the op in the graph."""
    x, g, domain, gen, gen_stats, params, stats = generated_inputs(19, 13, 6, 7, 3, 11, mode, seed=4)
    leaves = [t.float().detach().requires_grad_() for t in (x, g, *gen, *params)]

    def step(*tensors_and_stats):
        tensors, running = tensors_and_stats[:14], tensors_and_stats[14:]
        return hf.ops.hyper_adapter_generated(tensors[0], tensors[1], domain, *tensors[2:6], *running[:2],
                                              *tensors[6:], *running[2:], mode=mode, backend="triton",
                                              gen_updates=2).square().sum()

    runs = {}
    for name, fn in (("eager", step), ("compiled", torch.compile(step, backend="aot_eager", fullgraph=True))):
        running = [s.float().clone() for s in (*gen_stats, *stats) if s is not None]
        runs[name] = torch.autograd.grad(fn(*leaves, *running), leaves), running
    (eager_grads, eager_stats), (compiled_grads, compiled_stats) = runs["eager"], runs["compiled"]
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for before, a, b in zip([s for s in (*gen_stats, *stats) if s is not None], eager_stats, compiled_stats):
        assert not torch.equal(a, before.float())  # the training step did update them, compiled or not
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)

    f32 = [t.float() if t is not None else None for t in (*gen, *gen_stats, *params, *stats)]

    class Cell(torch.nn.Module):
        def forward(self, x, g, domain):
            return hf.ops.hyper_adapter_generated(x, g, domain, *f32, mode=mode, training=False, backend="triton")

    args = (x.float(), g.float(), domain)
    exported = torch.export.export(Cell(), args)
    assert any("generated_cell_forward" in str(node.target) for node in exported.graph.nodes)
    assert torch.allclose(exported.module()(*args), Cell()(*args), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- models (hf.nn integration)
from test_released_parity import GOLDEN_FILES, compare  # noqa: E402
from golden import BUFFER_WORDS, load, our_tensor, released_keys, released_model  # noqa: E402

MODEL_CASES = [("mlp", "paper", {}), ("mlp", "released", {}), ("dcn", "paper", {"cross_layers": 1}),
               ("wide_deep", "released", {"wide_dim": 3, "dropout": 0.0}),
               ("mlp", "paper", {"dims": [16, 12], "adapter_after": [0, 1]})]  # two cells share one g


def small_hamur(backbone, mode, extra, backend, fused, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    sizes = {**dict(dims=[16, 12], adapter_after=[1], hyper_dims=[9], rank=5, bottleneck=7), **extra}
    model = hf.models.HAMUR(23, 3, backbone, mode, backend=backend, fused_generation=fused, **sizes).to(dtype)
    with torch.no_grad():  # the generator BN away from its init, so that its parameters matter
        norm = model.hyper.net[-3]
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
        norm.running_mean.uniform_(-0.2, 0.2)
    return model


def train_step(model, e, domain, label):
    e = e.clone().requires_grad_()
    prob = model(e, domain)
    torch.nn.functional.binary_cross_entropy(prob, label).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return prob.detach(), e.grad, grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("backbone, mode, extra", MODEL_CASES, ids=lambda c: str(c))
def test_model_level2_equals_level1(backbone, mode, extra, one_thread):
    """The same model through fused generation (forced on the eager backend: the moment identity, the
    running-statistics updates, the gradient paths) and through level 1: equal in float64, training and
    eval, with the same state_dict keys."""
    gen = torch.Generator().manual_seed(1)
    e, domain = torch.randn(29, 23, generator=gen, dtype=torch.float64), torch.randint(0, 3, (29,), generator=gen)
    label = torch.randint(0, 2, (29,), generator=gen).double()
    models = [small_hamur(backbone, mode, extra, "torch", fused) for fused in (True, False)]
    assert models[0].uses_fused_generation(e.device) and not models[1].uses_fused_generation(e.device)
    assert models[0].state_dict().keys() == models[1].state_dict().keys()
    fused, plain = (train_step(m, e, domain, label) for m in models)
    assert rel_err(fused[0], plain[0]) < 1e-10 and rel_err(fused[1], plain[1]) < 1e-10
    for name, grad in plain[2].items():
        if grad is not None and grad.abs().max() > 1e-12:
            assert rel_err(fused[2][name], grad) < 1e-9, name
    for name, buffer in plain[3].items():
        assert rel_err(fused[3][name], buffer) < 1e-12, name
    for model in models:
        model.eval()
    with torch.no_grad():
        assert rel_err(models[0](e, domain), models[1](e, domain)) < 1e-12


def test_level2_stays_off_while_statistics_are_synchronised(monkeypatch):
    """Inside a data-parallel step that merges batch statistics over ranks, the model runs level 1: the
    generator BatchNorm's moments (SPEC section 6) are this process's only at level 2."""
    from hamur_fast.models import hamur

    model = small_hamur("mlp", "paper", {}, "torch", True)
    assert model.uses_fused_generation(torch.device("cpu"))
    monkeypatch.setattr(hamur, "active_group", lambda: object())  # what synchronised(group) makes it return
    assert not model.uses_fused_generation(torch.device("cpu"))


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_released_golden_parity_through_fused_path(name, shared_dir):
    """Both golden files, float64, through fusion level 2 (fold + eager cell): outputs, loss, every gradient
    and every running statistic (the generator's, advanced D times) to 1e-9."""
    golden = load(shared_dir / "golden" / name)
    model = released_model(golden)
    model.backend, model.fused_generation = "torch", True
    model.train()
    e = torch.from_numpy(golden["input_e"]).requires_grad_()
    domain = torch.from_numpy(golden["input_domain"])
    assert model.uses_fused_generation(e.device)
    prob = model(e, domain)
    loss = torch.nn.functional.binary_cross_entropy(prob, torch.from_numpy(golden["input_label"]))
    loss.backward()
    compare(prob.detach(), golden["output_prob"], "output_prob", 1e-9)
    compare(loss.detach(), golden["output_loss"], "output_loss", 1e-9)
    compare(e.grad, golden["grad_input_e"], "grad_input_e", 1e-9)
    for key in released_keys(golden):
        kind = "after" if key.endswith(BUFFER_WORDS) else "grad"
        compare(our_tensor(model, golden, key, kind), golden[f"{kind}/{key}"], f"{kind}/{key}", 1e-9)


@pytest.mark.skipif(INTERPRETER and not SLOW,
                    reason="GPU only (about 140 s per file under the Triton interpreter; HAMUR_SLOW_TESTS=1 runs it)")
@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_released_golden_parity_fp32_triton(name, shared_dir):
    """The released model in fp32 on backend="triton", level 2 by default there, reproduces the float64
    golden vectors as closely as the same model at level 1 on backend="torch" (both bounded by fp32)."""
    golden = load(shared_dir / "golden" / name)
    e = torch.from_numpy(golden["input_e"]).float()
    domain = torch.from_numpy(golden["input_domain"]).to(TRITON_DEVICE)
    label = torch.from_numpy(golden["input_label"]).float().to(TRITON_DEVICE)
    errors = {}
    for backend in ("torch", "triton"):
        model = released_model(golden).float().to(TRITON_DEVICE)
        model.backend = backend
        model.train()
        assert model.uses_fused_generation(e.device) == (backend == "triton")
        prob, grad_e, _, _ = train_step(model, e.to(TRITON_DEVICE), domain, label)
        err = {"output_prob": rel_err(prob.cpu(), torch.from_numpy(golden["output_prob"])),
               "grad_input_e": rel_err(grad_e.cpu(), torch.from_numpy(golden["grad_input_e"]))}
        for key in released_keys(golden):
            kind = "after" if key.endswith(BUFFER_WORDS) else "grad"
            expected = torch.from_numpy(golden[f"{kind}/{key}"]).double()
            ours = our_tensor(model, golden, key, kind).cpu()
            # Zero by construction (adapter up_bias, the generator's Linear bias): bounded in absolute terms.
            err[key] = ours.abs().max().item() if expected.abs().max() < 1e-12 else rel_err(ours, expected)
        errors[backend] = err
    for what, err in errors["triton"].items():
        assert err <= max(1e-4, 2 * errors["torch"][what]), (what, err, errors["torch"][what])
    assert errors["triton"]["output_prob"] <= 1e-5


@triton_only
def test_triton_model_uses_level2_by_default_and_folds(one_thread):
    """backend="triton": level 2 unless switched off; both levels agree; the Predictor's folded eval copy
    (the generator BN folded into its Linear) still runs level 2 and agrees."""
    gen = torch.Generator().manual_seed(2)
    e, domain = torch.randn(21, 23, generator=gen), torch.randint(0, 3, (21,), generator=gen)
    label = torch.randint(0, 2, (21,), generator=gen).float()
    models = [small_hamur("mlp", "paper", {}, "triton", fused, dtype=torch.float32) for fused in ("auto", False)]
    assert models[0].uses_fused_generation(e.device) and not models[1].uses_fused_generation(e.device)
    fused, plain = (train_step(m, e, domain, label) for m in models)
    assert rel_err(fused[0], plain[0].double()) < 1e-5
    for name, buffer in plain[3].items():
        assert torch.allclose(fused[3][name], buffer, rtol=1e-5, atol=1e-6), name
    model = models[0].eval()
    folded = hf.inference.fold_for_inference(model)
    assert isinstance(folded.hyper.net[-3], torch.nn.Identity) and folded.uses_fused_generation(e.device)
    with torch.no_grad():
        assert rel_err(folded(e, domain), model(e, domain).double()) < 1e-5


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if torch.cuda.is_available() or SLOW else []))
def test_torch_compile_traces_the_whole_model_at_level2(backend, one_thread):
    """A HAMUR training forward and backward at level 2 (two cells sharing one g) compiles without a graph
    break (fullgraph: no host sync, nothing untraceable) and matches eager."""
    gen = torch.Generator().manual_seed(3)
    e, domain = torch.randn(13, 23, generator=gen), torch.randint(0, 3, (13,), generator=gen)
    label = torch.randint(0, 2, (13,), generator=gen).float()
    models = [small_hamur("mlp", "paper", {"adapter_after": [0, 1]}, backend, True, dtype=torch.float32)
              for _ in range(2)]

    def loss_of(model):
        return torch.nn.functional.binary_cross_entropy_with_logits(model.logits(e, domain), label)

    expected = loss_of(models[0])
    compiled = torch.compile(loss_of, fullgraph=True, backend="aot_eager")(models[1])
    assert rel_err(compiled, expected.double()) <= 1e-5
    expected.backward()
    compiled.backward()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert (b.grad - a.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-7, name
    for (name, a), b in zip(models[0].named_buffers(), models[1].buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name
