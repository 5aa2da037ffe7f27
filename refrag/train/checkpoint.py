"""Atomic, verified training checkpoints.

A checkpoint is a directory ``<root>/step_000123/`` holding

- ``model.pt``      model state dict
- ``optimizer.pt``  optimizer state dict
- ``trainer.pt``    scheduler state, step counters, per-rank data-loader positions and RNG
                    states (python, numpy, torch, cuda) as tensors and plain types
- ``config.json``   the training config and the model config
- any further files the caller passes (`save_checkpoint(files=...)`): SFT runs store
  ``tokenizer.json`` and ``prompt_format.json`` so a checkpoint is self-contained
- ``manifest.json`` sha256 and size of every file above, written LAST

Saving writes every file into a temp directory and swaps it into place with
`refrag.fileio.atomic_directory` (fsync of every file and directory, one lock per checkpoint
directory, a swap interrupted between its renames finished on the next open, stale temp
directories of killed saves deleted), so a crash at any point leaves either no new checkpoint
or a complete one. Loading reads with ``torch.load(weights_only=True)``, refuses a directory
without manifest (partial), with a manifest that does not list exactly the four files, or
with a file whose hash or size differs (corrupt), and refuses a checkpoint whose model config
differs from the running one, naming the differing keys, or one holding NaN/inf weights.
`latest_valid_checkpoint` skips
(and reports) corrupt newer checkpoints so training falls back to the intact older one.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from refrag.data.prompt import FILE_NAME as PROMPT_FORMAT_FILE
from refrag.model import ModelConfig
from refrag.fileio import atomic_directory, fsync_path, lock_path, recover_directory, sha256_file

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer, stored inside SFT checkpoints
PAYLOADS = ("model.pt", "optimizer.pt", "trainer.pt", "config.json")
# Files a checkpoint may also hold (save_checkpoint(files=...)): they make it self-contained.
OPTIONAL_PAYLOADS = (TOKENIZER_FILE, PROMPT_FORMAT_FILE)
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, corrupt, or from a different model config."""


class SimulatedCrash(RuntimeError):
    """Raised by `save_checkpoint(crash_after_files=n)` to test crash safety."""


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:06d}"


def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    version, mt_state, gauss = random.getstate()
    return {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_payloads(tmp: Path, payloads: dict, crash_after_files: int | None) -> None:
    for written, (name, payload) in enumerate(payloads.items()):
        if crash_after_files is not None and written == crash_after_files:
            raise SimulatedCrash(f"simulated crash after {written} checkpoint files in {tmp}")
        path = tmp / name
        if isinstance(payload, str):
            path.write_text(payload)
        elif name.endswith(".json"):
            path.write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False))
        else:
            torch.save(payload, path)


def _write_manifest(tmp: Path, names) -> None:
    files = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names}
    path = tmp / MANIFEST
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=2, sort_keys=True))


def save_checkpoint(root: str | Path, step: int, *, model_state: dict, optimizer_state: dict,
                    trainer_state: dict, config: dict, files: dict | None = None,
                    crash_after_files: int | None = None) -> Path:
    """Atomically write the checkpoint of `step` under `root`; returns its directory.

    config: {"train": ..., "model": ...} plain JSON. files: further {name: text or JSON-able dict}
    written beside them (and covered by the manifest). crash_after_files: test hook, raise
    SimulatedCrash after writing that many files (nothing is swapped into place then).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    payloads = {"model.pt": model_state, "optimizer.pt": optimizer_state,
                "trainer.pt": trainer_state, "config.json": config}
    unknown = sorted(set(files or {}) - set(OPTIONAL_PAYLOADS))
    if unknown:
        raise ValueError(f"checkpoint file name(s) {unknown} are not among {OPTIONAL_PAYLOADS}")
    payloads.update(files or {})
    with atomic_directory(final) as tmp:
        _write_payloads(tmp, payloads, crash_after_files)
        _write_manifest(tmp, payloads)
    fsync_path(root)
    return final


def verify_checkpoint(path: str | Path) -> dict:
    """The manifest of a complete, uncorrupted checkpoint; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is partial (a save was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"checkpoint {path}: format version {version!r}, expected {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(PAYLOADS) <= set(files) <= set(PAYLOADS + OPTIONAL_PAYLOADS):
        listed = sorted(files) if isinstance(files, dict) else files
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} must list exactly {', '.join(PAYLOADS)} "
                              f"(and optionally {', '.join(OPTIONAL_PAYLOADS)}), it lists {listed!r} "
                              f"(corrupt or edited manifest)")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} entry of {name} is malformed")
        if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (sha256 differs from the manifest)")
    return manifest


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two (nested) config dicts, one line per key."""
    saved, current = _flatten(saved), _flatten(current)

    def show(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "<absent>"

    return [f"{key}: checkpoint {show(saved, key)} vs current {show(current, key)}"
            for key in sorted(set(saved) | set(current))
            if key not in saved or key not in current or saved[key] != current[key]]


def _with_defaults(saved: dict) -> dict:
    """A saved model config with the keys added to ModelConfig since it was written set to their
    defaults (which keep the old behaviour), so a run resumes across such an addition; a dict
    that is no ModelConfig stays as it is."""
    try:
        return ModelConfig.from_dict(saved).to_dict()
    except (ValueError, TypeError):
        return saved


def load_checkpoint(path: str | Path, model_config: dict | None = None, map_location="cpu") -> dict:
    """Verified checkpoint contents: {"model", "optimizer", "trainer", "config", "path"}.

    model_config: the running model's config; a checkpoint saved with a different one is
    refused with a CheckpointError listing the differing keys.
    """
    path = Path(path)
    recover_directory(path)
    verify_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: config.json has no model config (key 'model')")
    if model_config is not None:
        diffs = config_differences(_with_defaults(config["model"]), model_config)
        if diffs:
            raise CheckpointError(f"checkpoint {path} was saved with a different model config: "
                                  + "; ".join(diffs))
    state = {name: torch.load(path / f"{name}.pt", map_location=map_location, weights_only=True)
             for name in ("model", "optimizer", "trainer")}
    bad = [name for name, t in state["model"].items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:5])}): "
                              "it was saved by a run that diverged")
    return {**state, "config": config, "path": path}


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories under `root` (with a manifest), oldest first.
    Interrupted swaps are finished and stale temp directories deleted first."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = {m.group(1) for p in root.iterdir() if (m := re.match(r"^\.(step_\d+)\.(?:tmp|old)-", p.name))}
    for name in sorted(names):
        recover_directory(root / name)
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint directory under `root` (partial saves never count), or None."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def latest_valid_checkpoint(root: str | Path, warn=print) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`, or None; each newer
    corrupt one is skipped with a `warn` line naming it and the problem."""
    for path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            warn(f"skipping corrupt checkpoint {path}: {err}; falling back to an older one")
    return None


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (list_checkpoints also clears leftovers)."""
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path)
        lock_path(path).unlink(missing_ok=True)
