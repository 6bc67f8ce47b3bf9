"""Which files ``hamur_fast.kernels`` and ``hamur_fast._C`` are: always this checkout's.

In the source tree ``kernels/`` stands beside this package, and setup.py's ``package_dir`` installs it as
``hamur_fast.kernels``; the compiled core is built in place as ``hamur_fast/_C*.so``. An editable install,
though, maps both names to the one checkout it was made from (its finder sits at the end of ``sys.meta_path``),
so a second clone sharing the environment would silently run the first one's kernels. Hence:

- kernels: where this package sits in a checkout (``../kernels/__init__.py`` and ``../setup.py`` beside it), that
  folder is bound to ``hamur_fast.kernels`` (a spec from its file, its submodules searched there) before anything
  imports it; an installed wheel has ``hamur_fast/kernels/`` inside the package and nothing changes.
- _C: found by the ordinary search of this package's folder first; :func:`import_compiled_core` refuses (as
  ImportError, so the "cpu" and "cuda" backends are reported missing with the reason) a ``_C`` that an editable
  finder would fetch from another checkout, before it is loaded.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def bind_checkout_kernels() -> None:
    kernels = PACKAGE.parent / "kernels"
    if "hamur_fast.kernels" in sys.modules or not (kernels / "__init__.py").is_file() \
            or not (PACKAGE.parent / "setup.py").is_file():
        return
    spec = importlib.util.spec_from_file_location("hamur_fast.kernels", kernels / "__init__.py",
                                                  submodule_search_locations=[str(kernels)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hamur_fast.kernels"] = module
    spec.loader.exec_module(module)
    sys.modules["hamur_fast"].kernels = module  # what the import system sets when it loads a submodule itself


def import_compiled_core():
    """Import this checkout's ``hamur_fast._C`` (registering its operators); ImportError when it is not built here."""
    spec = importlib.util.find_spec("hamur_fast._C")
    where = spec and spec.origin and Path(spec.origin).resolve().parent
    if where is None:
        raise ImportError("hamur_fast._C is not built: build it with pip install --no-build-isolation -e .",
                          name="hamur_fast._C")
    if where != PACKAGE:  # checked before loading, so another checkout's operators are never registered
        raise ImportError(f"hamur_fast._C was found in {where}, another checkout's build, not in {PACKAGE}: build "
                          "this one's with pip install --no-build-isolation -e .", name="hamur_fast._C")
    return importlib.import_module("hamur_fast._C")
