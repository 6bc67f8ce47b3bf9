"""The invalid-id promise for every model of the registry on every backend, with value checks off.

An id -1, D or 10**6 in one row: that row's output is NaN (or the call raises), and in eval every other row is
exactly as without the bad row; in training the bad row sends no gradient (the loss of the other rows has finite
gradients). In training, layers that normalise over the batch (BatchNorm) still see the row's activations: the
batch statistics are not "as without it" there (removing the row would need a host sync).
"""
import pytest
import torch

import hamur_fast as hf
from hamur_fast.models import registry

D, WIDTH, BATCH, BAD_ROW = 3, 12, 9, 4
HAMUR_FAMILY = {"hamur_mlp", "hamur_dcn", "hamur_wide_deep", "mlp", "dcn", "wide_deep"}
SMALL = {"dims": [8], "rank": 3, "hyper_dims": [6], "bottleneck": 4}


def cases():
    for name in registry.available():
        backends = [b for b in ("torch", "cpu", "triton") if b in hf.ops.available_backends("cpu")]
        for backend in (backends if name in HAMUR_FAMILY else [None]):
            yield pytest.param(name, backend, id=f"{name}-{backend or 'default'}")


@pytest.fixture
def checks_off():
    hf.set_value_checks(False)
    yield
    hf.set_value_checks(True)


def build(name, backend):
    torch.manual_seed(0)
    options = dict(SMALL, backend=backend) if name in HAMUR_FAMILY else {}
    if name in ("hamur_wide_deep", "wide_deep"):
        options["wide_dim"] = 2
    # float64 (where the backend computes in it): the bad row's absence changes the other rows' GEMM blocking,
    # so "as without it" is equality up to float64 rounding
    model = hf.models.build(name, WIDTH, D, **options)
    return model if backend == "triton" else model.double()


def batch(bad, dtype):
    g = torch.Generator().manual_seed(1)
    e, domain = torch.randn(BATCH, WIDTH, generator=g, dtype=dtype), torch.arange(BATCH) % D
    broken = domain.clone()
    broken[BAD_ROW] = bad
    return e, domain, broken


@pytest.mark.parametrize("name, backend", list(cases()))
def test_a_bad_id_is_confined_to_its_row(name, backend, checks_off):
    model = build(name, backend)
    keep = torch.arange(BATCH) != BAD_ROW
    for bad in (-1, D, 10**6):
        e, domain, broken = batch(bad, next(model.parameters()).dtype)
        model.eval()
        with torch.no_grad():
            try:
                out = model(e, broken)
            except (IndexError, RuntimeError, ValueError):
                out = None  # an error is the other allowed outcome
            if out is not None:
                assert torch.isnan(out[BAD_ROW]), (bad, out[BAD_ROW])
                expected = model(e[keep], domain[keep])
                tolerance = 1e-6 if e.dtype == torch.float32 else 1e-12
                assert torch.allclose(out[keep], expected, rtol=tolerance, atol=tolerance), bad
        model.train()
        try:
            logits = model.logits(e, broken)
        except (IndexError, RuntimeError, ValueError):
            continue
        assert torch.isnan(logits[BAD_ROW]), bad
        logits[keep].sum().backward()
        for pname, param in model.named_parameters():
            assert param.grad is None or torch.isfinite(param.grad).all(), (bad, pname)
        model.zero_grad()
