"""A checkout runs its own kernels/ and its own build of hamur_fast._C, also where an editable install of another
checkout shares the environment (hamur_fast/_layout.py)."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_checkout_imports_its_own_kernels_and_refuses_a_foreign_build(tmp_path):
    for part in ("hamur_fast", "kernels"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    probe = ("import hamur_fast, hamur_fast.kernels.domain_norm as dn\n"
             "from hamur_fast.ops import registry\n"
             "print(hamur_fast.kernels.__file__); print(dn.__file__)\n"
             "print('cpu' in registry.available_backends()); print(registry.unavailable_backends().get('cpu', ''))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kernels_init, norm_module, has_cpu, why = out.stdout.strip().splitlines()[-4:]
    assert Path(kernels_init) == tmp_path / "kernels" / "__init__.py"
    assert Path(norm_module) == tmp_path / "kernels" / "domain_norm.py"
    assert has_cpu == "False"  # this copy has no build of its own: another checkout's is never loaded
    assert "hamur_fast._C" in why
