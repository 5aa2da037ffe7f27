"""The kernels' import name `refrag_kernels` coexists with Hugging Face's PyPI package `kernels`.

A stand-in `kernels` distribution (a wheel with the hub client's top-level name and a version in its
range for transformers) is installed with pip into a scratch folder; a fresh interpreter started
outside the checkout, with that folder first on its path, imports both packages and transformers,
and runs one of our ops. Run by hand with the real wheel (`pip download kernels`) the same way.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import importlib.metadata, json, sys
import kernels                                 # Hugging Face's hub client (here: the stand-in)
import refrag_kernels, torch                   # ours
import refrag.model                            # the stack on top of ours imports too
import transformers
from refrag_kernels.compat import enable_for_transformers, disable_for_transformers
with refrag_kernels.use_backend("reference"):
    y = refrag_kernels.gated_rms_norm(torch.ones(2, 8), torch.zeros(2, 8), torch.ones(8), 1e-6, 8)
enable_for_transformers(); disable_for_transformers()
print(json.dumps({"kernels": kernels.__file__, "kernels_version": importlib.metadata.version("kernels"),
                  "marker": getattr(kernels, "STAND_IN", None), "ours": refrag_kernels.__file__,
                  "ours_name": refrag_kernels.__name__, "finite": bool(torch.isfinite(y).all())}))
"""


def _stand_in_wheel(folder: Path) -> Path:
    version = "0.10.0"
    dist = f"kernels-{version}.dist-info"
    path = folder / f"kernels-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("kernels/__init__.py", f"STAND_IN = True\n__version__ = {version!r}\n"
                                                "def get_kernel(repo_id, revision=None):\n    raise NotImplementedError\n")
        archive.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
        archive.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    wheel = _stand_in_wheel(base)
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True, timeout=120)
    return target


def _run(cwd: Path, pythonpath) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("source_tree", [False, True], ids=["installed", "pythonpath"])
def test_both_kernels_packages_import_side_by_side(site, tmp_path, source_tree):
    """installed: `refrag_kernels` from this environment's (editable) install, through setup.py's
    mapping; pythonpath: from this checkout through .pythonpath/, as on a GPU machine without an
    install. Either way `kernels` is the hub's."""
    paths = [site] + ([ROOT / ".pythonpath"] if source_tree else [])
    seen = _run(tmp_path, paths)
    assert Path(seen["kernels"]).is_relative_to(site) and seen["marker"] is True
    assert seen["kernels_version"] == "0.10.0"
    assert seen["ours_name"] == "refrag_kernels" and Path(seen["ours"]).parent.name == "kernels"
    assert not Path(seen["ours"]).is_relative_to(site) and seen["finite"]
    if source_tree:
        assert Path(seen["ours"]) == ROOT / "kernels" / "__init__.py"



def test_our_wheel_and_the_hub_package_in_one_folder(tmp_path):
    """Our built wheel and the stand-in, pip-installed into the same folder: neither overwrites the
    other (the old import name `kernels` made the second install replace the first)."""
    pytest.importorskip("setuptools")  # --no-build-isolation builds with this environment's setuptools
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(wheels), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    ours = next(wheels.glob("refrag-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", str(target), str(ours), str(_stand_in_wheel(wheels))],
                   check=True, timeout=300)
    seen = _run(tmp_path, [target])
    assert Path(seen["kernels"]).is_relative_to(target) and seen["marker"] is True
    assert Path(seen["ours"]) == target / "refrag_kernels" / "__init__.py" and seen["finite"]
    assert (target / "refrag" / "train" / "configs" / "demo.json").is_file()  # package data comes along
