"""`refrag_kernels` from a source tree that is not installed (the device machine's `make gpu-check`,
git worktrees, subprocesses started with PYTHONPATH=<checkout>).

The kernels live in the repository's `kernels/` folder, but their import name is `refrag_kernels`
(pyproject's package-dir), because the PyPI package `kernels` (Hugging Face's kernel hub client)
owns the name `kernels`. An installed checkout finds `refrag_kernels` through the install; with this
folder on PYTHONPATH instead, importing this stand-in loads `<checkout>/kernels` as the package
`refrag_kernels` and puts it in its own place in sys.modules, so every later import gets the package.
"""
import importlib.util
import sys
from pathlib import Path

_init = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
_spec = importlib.util.spec_from_file_location(__name__, _init, submodule_search_locations=[str(_init.parent)])
_package = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _package
_spec.loader.exec_module(_package)
