"""Benchmark baselines that travel with the repository to a GPU machine that cannot download.

    python -m bench.wheels download [--dir .wheels]            # where the package registry is reachable (make wheels)
    python -m bench.wheels install --target DIR [--dir .wheels]  # on the GPU machine (bench.gpu_check does it)

`download` fetches the pinned pure-Python wheels below (fla's ops for `chunk_simple_gla`, Liger's
fused linear cross-entropy, and einops, which fla needs) into an ignored folder, keeps exactly one
file per pin, checks that every wheel needs nothing beyond the others and the GPU image's torch and
triton, and that together they stay under MAX_BYTES. `install` runs
`pip install --no-index --no-deps --target DIR` on those files: nothing is fetched and the system
packages are never touched; put DIR on PYTHONPATH to use them. mamba-ssm and flash-attn ship CUDA
extensions, not pure-Python wheels, and are not carried: their baselines run when the machine has them.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".wheels"
# Pinned for torch >= 2.7 and triton >= 3.3 (the GPU image: torch 2.11, triton 3.6).
WHEELS = ("fla-core==0.6.0", "liger-kernel==0.8.5", "einops==0.8.2")
PROVIDED_BY_IMAGE = {"torch", "triton"}
MAX_BYTES = 8 << 20
# The GPU machine runs CPython 3.12 on x86-64; these wheels are py3-none-any, the tags only make
# pip pick what that machine would.
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64"]


def normalize(name: str) -> str:
    """PEP 503 project name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_project(path: Path) -> tuple[str, str]:
    """(normalized project name, version) from a wheel's file name."""
    parts = path.name.split("-")
    if not path.name.endswith(".whl") or len(parts) < 5:
        raise ValueError(f"{path.name} is not a wheel file name (name-version-python-abi-platform.whl)")
    return normalize(parts[0]), parts[1]


def requirements(path: Path) -> List[str]:
    """Project names a wheel requires unconditionally (Requires-Dist lines without an extra)."""
    with zipfile.ZipFile(path) as archive:
        metadata = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if metadata is None:
            raise ValueError(f"{path.name} holds no .dist-info/METADATA")
        text = archive.read(metadata).decode()
    needs = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            needs.append(normalize(re.match(r"[A-Za-z0-9._-]+", line.split(":", 1)[1].strip()).group(0)))
    return needs


def wheel_files(folder: Path) -> List[Path]:
    return sorted(folder.glob("*.whl")) if folder.is_dir() else []


def check(folder: Path) -> Dict[str, str]:
    """Verify the folder holds one wheel per project, self-sufficient with the GPU image, under
    MAX_BYTES; return {project: version}."""
    files = wheel_files(folder)
    if not files:
        raise SystemExit(f"no wheels in {folder}: run `make wheels` where the package registry is reachable")
    versions: Dict[str, str] = {}
    for path in files:
        name, version = wheel_project(path)
        if name in versions:
            raise SystemExit(f"{folder} holds two versions of {name} ({versions[name]}, {version}): keep one")
        versions[name] = version
    for path in files:
        missing = [n for n in requirements(path) if n not in versions and n not in PROVIDED_BY_IMAGE]
        if missing:
            raise SystemExit(f"{path.name} needs {', '.join(missing)}, which is neither carried nor in the GPU image")
    total = sum(p.stat().st_size for p in files)
    if total > MAX_BYTES:
        raise SystemExit(f"wheels in {folder} take {total / 2**20:.1f} MiB, over the {MAX_BYTES >> 20} MiB allowed")
    return versions


def download(folder: Path = WHEEL_DIR) -> Dict[str, str]:
    """pip download the pinned wheels into `folder`, drop any other wheel there, check the set."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *PLATFORM_ARGS, "-d", str(folder),
                    *WHEELS], check=True)
    pinned = {normalize(spec.split("==")[0]): spec.split("==")[1] for spec in WHEELS}
    for path in wheel_files(folder):
        name, version = wheel_project(path)
        if pinned.get(name) != version:
            path.unlink()
    versions = check(folder)
    total = sum(p.stat().st_size for p in wheel_files(folder))
    print(f"{len(versions)} wheels, {total / 2**20:.1f} MiB in {folder}: "
          + ", ".join(f"{n} {v}" for n, v in sorted(versions.items())))
    return versions


def install(target: Path, folder: Path = WHEEL_DIR) -> Dict[str, str]:
    """pip install the folder's wheels into `target` without an index or dependencies; {project: version}."""
    versions = check(folder)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--disable-pip-version-check", "--target", str(target),
                             *map(str, wheel_files(folder))], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"pip install --no-index from {folder} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return versions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["download", "install", "check"])
    parser.add_argument("--dir", type=Path, default=WHEEL_DIR, help="wheel folder (default .wheels, ignored by git)")
    parser.add_argument("--target", type=Path, help="install: folder to install into (then put it on PYTHONPATH)")
    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.dir)
    elif args.command == "check":
        versions = check(args.dir)
        print(", ".join(f"{n} {v}" for n, v in sorted(versions.items())))
    else:
        if args.target is None:
            parser.error("install needs --target DIR")
        versions = install(args.target, args.dir)
        print(f"installed into {args.target}: " + ", ".join(f"{n} {v}" for n, v in sorted(versions.items())))


if __name__ == "__main__":
    main()
