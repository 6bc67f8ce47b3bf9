"""benchmarks/compare_revisions.py on a two-commit toy repository whose hamur_fast has a C extension.

The toy's domain_norm sleeps 0.2 s in the working tree and not in the commit, so the table must show the working
tree slower; each child must import the toy's own package, kernels and extension, not the installed hamur_fast.
"""
import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import compare_revisions  # noqa: E402

SETUP = """from setuptools import Extension, setup
setup(name="hamur_fast", packages=["hamur_fast"], ext_modules=[Extension("hamur_fast._C", ["csrc/c.c"])])
"""
EXTENSION = """#include <Python.h>
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
"""
OPS = """import time
def domain_norm(o, domain, weight, bias, **kwargs):
    time.sleep({pause})
    return o * weight[domain] + bias[domain]
"""


def write(root, path, text):
    os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
    with open(os.path.join(root, path), "w") as f:
        f.write(text)


@pytest.fixture
def toy_repo(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    repo = tmp_path / "toy"
    files = {"setup.py": SETUP, "csrc/c.c": EXTENSION, "kernels/__init__.py": "",
             "hamur_fast/__init__.py": "from . import ops\n", "hamur_fast/ops.py": OPS.format(pause=0.0)}
    for path, text in files.items():
        write(repo, path, text)
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True)
    write(repo, "hamur_fast/ops.py", OPS.format(pause=0.2))  # the uncommitted change under test
    monkeypatch.chdir(repo)
    monkeypatch.delenv("CCACHE_BASEDIR", raising=False)
    return repo


def test_compares_commit_with_working_tree(toy_repo, tmp_path, capsys):
    compare_revisions.main(["HEAD", "--cases", "norm", "--threads", "1", "--repeats", "2", "--calls", "2",
                            "--warmup", "0", "--batch", "8", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    header = [line for line in out.splitlines() if line.startswith("# old:") or line.startswith("# new:")]
    assert len(header) == 2 and "working tree" in header[1]
    trees = [line.rsplit(", ", 1)[1] for line in header]
    assert trees[0] != trees[1] and all(t.startswith(str(tmp_path)) for t in trees), trees
    row = next(line for line in out.splitlines() if line.startswith("norm"))
    assert float(row.split()[-1]) > 2, row  # 200 ms of sleep against milliseconds
    assert not [p for p in os.listdir(tmp_path) if p.startswith("compare-revisions-")]  # worktrees removed


def test_child_refuses_a_package_from_elsewhere(tmp_path):
    """A tree without hamur_fast: the import falls through to the installed package, which must be refused."""
    (tmp_path / "kernels").mkdir()
    done = subprocess.run([sys.executable, compare_revisions.__file__, "--child", str(tmp_path), "--cases", "norm"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "imported from outside" in done.stderr, done.stderr[-2000:]
