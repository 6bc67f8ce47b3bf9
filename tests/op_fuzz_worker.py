"""Worker of tests/test_op_checks.py: calls every torch.ops.hamur_fast op with valid arguments and then with one
argument broken at a time (a size, the dtype, the layout, the device), one JSON line per call: the C++ ops one by
one ("compiled"), the composed ops on the Triton backend's table and the Triton grouped linear op ("triton").

Run in a subprocess (``python tests/op_fuzz_worker.py compiled|triton``), so that an op that crashes the
process is caught and named (the last line it printed) instead of taking pytest down.
"""
import json
import os
import random
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hamur_fast  # noqa: E402,F401  (registers every op)
from hamur_fast.ops.contract import make_plan  # noqa: E402

ops = torch.ops.hamur_fast
# Every size distinct, so that an axis of a given size is the same named size in every argument.
B, H, K, S, D, P = 11, 5, 3, 4, 2, 7
IN, OUT, GL_DOMAINS = 5, 6, 3
EPS = 1e-5


def cell_params(per_domain):
    lead = (D,) if per_domain else ()
    shapes = [(H, K), (K, S), (S,), (S, K), (K, H), (H,), (H,), (H,)]
    return [torch.randn(*lead, *shape) * 0.3 for shape in shapes]


def training_flags(mode):
    """A training call's plan, (per_domain, batch_statistics, unbiased, eps), as the ops take it."""
    return make_plan(mode, training=True, has_running=False, momentum=0.1, eps=EPS).flags()


def running():
    return torch.randn(D, H) * 0.1, torch.rand(D, H) + 0.5


def base(per_domain):
    x, rep = torch.randn(B, H), torch.rand(B, K, K)
    domain = torch.arange(B) % D
    return x, rep, domain, cell_params(per_domain)


def compiled_cases():
    cases = []
    for per_domain in (True, False):
        mode = "paper" if per_domain else "released"
        x, rep, domain, params = base(per_domain)
        flags = training_flags(mode)
        fwd = (x, rep, domain, *params, None, None, *flags)
        cases.append((f"compiled_cell_forward[{mode}]", ops.compiled_cell_forward, fwd))
        _y, o, hidden, order, count, mean, _m2, rstd = ops.compiled_cell_forward(*fwd)
        dl, dr, _db, ul, ur, _ub, nw, _nb = params
        cases.append((f"compiled_cell_backward[{mode}]", ops.compiled_cell_backward,
                      (torch.randn(B, H), x, rep, domain, dl, dr, ul, ur, nw, o, hidden, order, count, mean, rstd,
                       *flags)))
        weight = torch.rand(D, H) + 0.5 if per_domain else torch.rand(H) + 0.5
        bias = torch.randn(*weight.shape)
        norm_fwd = (o, domain, weight, bias, None, None, *flags)
        cases.append((f"compiled_norm_forward[{mode}]", ops.compiled_norm_forward, norm_fwd))
        _y, count, mean, _m2, rstd = ops.compiled_norm_forward(*norm_fwd)
        cases.append((f"compiled_norm_backward[{mode}]", ops.compiled_norm_backward,
                      (torch.randn(B, H), o, domain, weight, count, mean, rstd, *flags)))
        cases.append((f"compiled_norm_statistics[{mode}]", ops.compiled_norm_statistics, (o, domain, D, per_domain)))
        table = weight if per_domain else weight.unsqueeze(0)  # the split passes take (G, h) tables
        cases.append((f"compiled_norm_normalise[{mode}]", ops.compiled_norm_normalise,
                      (o, domain, table, bias.reshape(table.shape), mean, rstd, per_domain)))
        cases.append((f"compiled_norm_input_grad[{mode}]", ops.compiled_norm_input_grad,
                      (torch.randn(B, H), o, domain, table, count, mean, rstd, torch.randn(*mean.shape),
                       torch.randn(*mean.shape), per_domain, not per_domain)))
    x, rep, domain, params = base(True)
    cases.append(("compiled_cell_infer", ops.compiled_cell_infer, (x, rep, domain, *params, *running(), EPS)))
    return cases + generated_core_cases() + tower_norm_relu_cases()


def generated_core_cases():
    """Fusion level 2's rank-k core (csrc/cpu/generated_cpu.cpp): p (B, k), the generator's g (B, P), centre,
    W' (k*k, P) and c' (k*k,), and the per-domain (paper) or shared (released) factors DR, db, UL."""
    cases = []
    for per_domain in (True, False):
        mode = "paper" if per_domain else "released"
        lead = (D,) if per_domain else ()
        p, g, domain = torch.randn(B, K), torch.randn(B, P), torch.arange(B) % D
        generator = (g, torch.randn(P), torch.randn(K * K, P) * 0.3, torch.randn(K * K) * 0.3)
        down_right, down_bias, up_left = torch.randn(*lead, K, S), torch.randn(*lead, S), torch.randn(*lead, S, K)
        fwd = (p, *generator, domain, down_right, down_bias, up_left, per_domain)
        cases.append((f"compiled_generated_core_forward[{mode}]", ops.compiled_generated_core_forward, fwd))
        _v, saved = ops.compiled_generated_core_forward(*fwd)
        cases.append((f"compiled_generated_core_backward[{mode}]", ops.compiled_generated_core_backward,
                      (torch.randn(B, K), p, saved, *generator, domain, down_right, up_left, per_domain)))
    return cases


def tower_norm_relu_cases():
    """The released towers' BatchNorm1d + ReLU (csrc/cpu/tower_norm_relu_cpu.cpp): z (D, B, h), weight, bias and the
    running statistics (D, h), training (batch statistics; the running ones updated in place) and eval."""
    cases = []
    for training in (True, False):
        phase = "train" if training else "eval"
        z, weight, bias = torch.randn(D, B, H), torch.rand(D, H) + 0.5, torch.randn(D, H)
        fwd = (z, weight, bias, *running(), training, 0.1, EPS)
        cases.append((f"compiled_tower_norm_relu_forward[{phase}]", ops.compiled_tower_norm_relu_forward, fwd))
        _y, mean, rstd = ops.compiled_tower_norm_relu_forward(*fwd)
        cases.append((f"compiled_tower_norm_relu_backward[{phase}]", ops.compiled_tower_norm_relu_backward,
                      (torch.randn(D, B, H), z, weight, bias, mean, rstd, training)))
    return cases


def spread(name, backend, *lists):
    """torch.ops.hamur_fast.<name> (a composed op) for ``backend``, called with its tensor-list arguments spread out
    (``lists``: (position, length) of each in the flat arguments), so that each tensor is broken on its own."""
    op = getattr(ops, name)

    def call(*flat):
        args, at = [backend], 0
        for position, length in lists:
            args += [*flat[at:position], list(flat[position:position + length])]
            at = position + length
        return op(*args, *flat[at:])
    return call


def triton_cases():
    """The composed ops with backend "triton" (they run the Triton launchers) and the grouped linear op."""
    cases = []
    for per_domain in (True, False):
        mode = "paper" if per_domain else "released"
        x, rep, domain, params = base(per_domain)
        flags = training_flags(mode)
        fwd = (x, rep, domain, *params, None, None, *flags)
        cases.append((f"cell_forward[{mode}]", spread("cell_forward", "triton", (3, 8)), fwd))
        _y, count, mean, _m2, rstd, q, v, order = spread("cell_forward", "triton", (3, 8))(*fwd)
        cases.append((f"cell_backward[{mode}]", spread("cell_backward", "triton", (4, 8), (12, 3)),
                      (torch.randn(B, H), x, rep, domain, *params, q, v, order, count, mean, rstd, *flags)))
        g = torch.randn(B, P)
        generator = (g, torch.randn(P), torch.randn(K * K, P) * 0.3, torch.randn(K * K) * 0.3)
        gen_fwd = (x, *generator, domain, *params, None, None, *flags, "ieee")
        generated = spread("generated_cell_forward", "triton", (1, 4), (6, 8))
        cases.append((f"generated_cell_forward[{mode}]", generated, gen_fwd))
        _y, count, mean, _m2, rstd, q, v, order = generated(*gen_fwd)
        cases.append((f"generated_cell_backward[{mode}]",
                      spread("generated_cell_backward", "triton", (2, 4), (7, 8), (15, 3)),
                      (torch.randn(B, H), x, *generator, domain, *params, q, v, order, count, mean, rstd, *flags,
                       "ieee")))
        weight = torch.rand(D, H) + 0.5 if per_domain else torch.rand(H) + 0.5
        norm_fwd = (x, domain, weight, torch.randn(*weight.shape), None, None, *flags)
        cases.append((f"norm_forward[{mode}]", spread("norm_forward", "triton"), norm_fwd))
        _y, count, mean, _m2, rstd = ops.norm_forward("triton", *norm_fwd)
        cases.append((f"norm_backward[{mode}]", spread("norm_backward", "triton"),
                      (torch.randn(B, H), x, domain, weight, count, mean, rstd, *flags)))
    x, rep, domain, params = base(True)
    cases.append(("cell_forward[paper eval]", spread("cell_forward", "triton", (3, 8)),
                  (x, rep, domain, *params, *running(), True, False, False, EPS)))
    gl_x, gl_domain = torch.randn(B, IN), torch.arange(B) % GL_DOMAINS
    gl_weight, gl_bias = torch.randn(GL_DOMAINS, IN, OUT), torch.randn(GL_DOMAINS, OUT)
    cases.append(("triton_grouped_linear_forward", ops.triton_grouped_linear_forward,
                  (gl_x, gl_domain, gl_weight, gl_bias)))
    cases.append(("triton_grouped_linear_backward", ops.triton_grouped_linear_backward,
                  (torch.randn(B, OUT), gl_x, gl_domain, gl_weight, True)))
    return cases


def mutations(arg: torch.Tensor, rng: random.Random):
    """(what, broken copy) pairs: one size changed, one axis added, another dtype, a sparse layout, another
    device; which axis and which dtype are drawn at random."""
    out = []
    if arg.dim():
        axis = rng.randrange(arg.dim())
        shape = list(arg.shape)
        shape[axis] += rng.choice((1, 2)) if shape[axis] <= 1 else rng.choice((-1, 1, 2))
        out.append((f"size axis {axis} {tuple(arg.shape)} -> {tuple(shape)}", like(arg, shape)))
    out.append((f"extra axis {tuple(arg.shape)} -> {(1, *arg.shape)}", arg.unsqueeze(0)))
    wrong = rng.choice((torch.int32, torch.float32)) if arg.dtype == torch.int64 else rng.choice(
        (torch.int32, torch.int64, torch.bool))
    out.append((f"dtype {arg.dtype} -> {wrong}", arg.to(wrong)))
    if arg.dtype == torch.float32:
        out.append(("dtype float32 -> float64", arg.double()))
    if arg.dim() and arg.numel():
        out.append(("layout strided -> sparse_coo", arg.to_sparse()))
    if torch.cuda.is_available():
        other = "cpu" if arg.is_cuda else "cuda"
        out.append((f"device {arg.device.type} -> {other}", arg.to(other)))
    return out


def like(arg, shape):
    if arg.dtype == torch.int64:
        return torch.randint(0, 2, shape)
    return torch.rand(shape) + 0.5


def report(**fields):
    print(json.dumps(fields), flush=True)


def run(cases, seed=0):
    rng = random.Random(seed)
    for name, op, args in cases:
        report(case=name, change=None, arg=None, started=True)
        try:
            op(*args)
            report(case=name, change=None, arg=None, raised=None)
        except Exception as err:  # a valid call must run
            report(case=name, change=None, arg=None, raised=f"{type(err).__name__}: {err}")
            continue
        for i, arg in enumerate(args):
            if not isinstance(arg, torch.Tensor):
                continue
            others = [a for j, a in enumerate(args) if j != i and isinstance(a, torch.Tensor)]
            other_sizes = {size for a in others for size in a.shape}
            other_floats = any(a.is_floating_point() for a in others)
            for change, broken in mutations(arg, rng):
                # Must be refused: a size another argument has too; a float dtype other than the other tables'.
                if change.startswith("size"):
                    shared = arg.shape[int(change.split()[2])] in other_sizes
                else:
                    shared = change.startswith("dtype") and other_floats
                report(case=name, arg=i, change=change, started=True)
                try:
                    op(*args[:i], broken, *args[i + 1:])
                    raised = None
                except Exception as err:
                    raised = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                report(case=name, arg=i, change=change, raised=raised, shared=shared)


if __name__ == "__main__":
    torch.manual_seed(0)
    if sys.argv[1] == "triton" and torch.cuda.is_available():
        torch.set_default_device("cuda")  # Triton kernels run on CPU tensors only under the interpreter
    run(compiled_cases() if sys.argv[1] == "compiled" else triton_cases())
    report(done=True)
