"""Imports point down the layers (docs/architecture.md): a package may import only the packages in
its row of ALLOWED. Function-level imports count too; bench/, profiles/, examples/ and tests/ sit
above everything and are not checked for layering, but nothing anywhere may import the folder `kernels/`
by its folder name: its import name is `refrag_kernels` (pyproject's package-dir), and `kernels` is
the PyPI package of Hugging Face's kernel hub."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages of this repository it may import (besides itself)
BASE = {"refrag_kernels"}
ALLOWED = {
    "refrag_kernels": set(),
    "refrag": set(),  # refrag/__init__.py
    "refrag.fileio": set(),
    "refrag.validate": set(),
    "refrag.data": BASE | {"refrag.fileio", "refrag.validate"},
    "refrag.retrieval": {"refrag.fileio", "refrag.validate", "refrag.data"},
    "refrag.model": BASE | {"refrag.validate"},
    "refrag.infer": BASE | {"refrag.data", "refrag.model", "refrag.retrieval", "refrag.fileio", "refrag.validate"},
    "refrag.train": BASE | {"refrag.data", "refrag.model", "refrag.retrieval", "refrag.infer", "refrag.fileio",
                            "refrag.validate"},
    "refrag.eval": BASE | {"refrag.data", "refrag.model", "refrag.retrieval", "refrag.infer", "refrag.train",
                           "refrag.fileio", "refrag.validate"},
    "refrag.serve": {"refrag.data", "refrag.model", "refrag.retrieval", "refrag.infer", "refrag.train", "refrag.eval",
                     "refrag.fileio", "refrag.validate", "refrag_kernels"},
    "refrag.demo": {"refrag.data", "refrag.model", "refrag.retrieval", "refrag.infer", "refrag.train", "refrag.eval",
                    "refrag.fileio", "refrag.validate", "refrag_kernels"},
}


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "kernels":  # the folder; its import name is refrag_kernels
        return "refrag_kernels"
    if len(parts) == 2 and parts[1] == "__init__":
        return "refrag"
    return f"refrag.{parts[1]}"


def _target(module: str):
    parts = module.split(".")
    if parts[0] in ("refrag_kernels", "kernels"):  # `kernels` is refused by test_no_import_by_folder_name
        return "refrag_kernels"
    if parts[0] == "refrag":
        return "refrag" if len(parts) == 1 else f"refrag.{parts[1]}"
    return None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "refrag":  # `from refrag import fileio` imports the subpackage
                for alias in node.names:
                    yield node.lineno, f"refrag.{alias.name}"
            else:
                yield node.lineno, node.module


def violations():
    found = []
    for top in ("kernels", "refrag"):
        for path in sorted((ROOT / top).rglob("*.py")):
            source = _package(path)
            allowed = ALLOWED.get(source)
            assert allowed is not None, f"{path}: package {source} has no row in ALLOWED"
            for line, module in _imports(path):
                target = _target(module)
                if target is not None and target != source and target not in allowed:
                    found.append(f"{path.relative_to(ROOT)}:{line} {source} imports {module}")
    return found


def test_imports_point_down_the_layers():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an upward import in a scratch tree is reported."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "refrag" / "data").mkdir(parents=True)
    (tmp_path / "kernels" / "x.py").write_text("def f():\n    from refrag.data import y\n")
    (tmp_path / "refrag" / "__init__.py").write_text("")
    (tmp_path / "refrag" / "data" / "y.py").write_text("import refrag_kernels\nfrom refrag.eval import answers\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = violations()
    assert any("refrag_kernels imports refrag.data" in v for v in found)
    assert any("refrag.data imports refrag.eval" in v for v in found)
    assert not any("imports refrag_kernels" in v for v in found)


def _python_files():
    for top in ("kernels", "refrag", "tests", "bench", "profiles", "examples"):
        yield from sorted((ROOT / top).rglob("*.py"))


def old_name_imports(files):
    return [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in files
            for line, module in _imports(path) if module == "kernels" or module.startswith("kernels.")]


def test_no_import_by_folder_name():
    """`import kernels` would load Hugging Face's `kernels` package wherever that is installed."""
    assert old_name_imports(_python_files()) == []


def test_the_old_name_check_sees_one(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("def f():\n    from kernels.ssd import ssd_scan\nimport refrag_kernels\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert old_name_imports([tmp_path / "tests" / "t.py"]) == ["tests/t.py:2 imports kernels.ssd"]
