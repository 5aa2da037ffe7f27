"""Issue 23: nothing lost, nothing silent in training configs, the loop and checkpoints.

NaN/inf in config numbers and diverged runs (item 4), resume with a changed schedule (item 5),
checkpoint manifests, fallback to an intact older checkpoint, torn metrics and two runs in one
out_dir (item 9), accepted bad config values (item 10) and REFRAG arguments checked before the
SFT phase (item 11). The tiny HybridLM runs on the PyTorch reference ops: the loop is under test.
"""
import fcntl
import json
import math
import threading
import time

import pytest
import torch

from refrag.model import preset
from refrag.train import checkpoint as ckpt
from refrag.train.config import TrainConfig, load_config
from refrag.train.optim import lr_multiplier
from refrag.train.sft import train_sft
from refrag.train.shims import init_distributed
from test_training_faults import VOCAB, Rows, tiny_model


@pytest.fixture(autouse=True)
def loop_under_test(reference_ops):
    """The loop is under test, not the kernels: reference ops, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(out_dir, model=None, loader=None, **overrides) -> list[dict]:
    values = dict(max_steps=4, lr=3e-3, warmup_steps=1, out_dir=str(out_dir), deterministic=True, seed=0,
                  val_rows=0)
    cfg = TrainConfig(**{**values, **overrides})
    model = model or tiny_model()
    config = getattr(model, "inner", model).config.to_dict()
    return train_sft(cfg, model, loader or Rows(), env=init_distributed("cpu"), model_config=config)


def metric_steps(out_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().split("\n") if line]


# ---------------------------------------------------------------------------------- item 4


@pytest.mark.parametrize("key, raw", [("lr", "Infinity"), ("grad_clip", "NaN"), ("weight_decay", "Infinity"),
                                      ("min_lr_ratio", "NaN"), ("beta1", "NaN"), ("model.rope_theta", "NaN"),
                                      ("model.norm_eps", "-1"), ("model.rope_theta", "Infinity")])
def test_nan_and_infinite_config_numbers_are_refused(key, raw):
    """Command-line overrides: refused when the config is built, naming the key (never trained on)."""
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        cfg = load_config(None, {key: raw})
        preset(cfg.preset, vocab_size=VOCAB, **cfg.model)


def test_nan_in_a_config_file_and_the_python_api_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"lr": NaN}')
    with pytest.raises(ValueError, match="config.json"):
        load_config(path)
    for key in ("lr", "grad_clip", "weight_decay", "min_lr_ratio"):
        with pytest.raises(ValueError, match=key):
            TrainConfig(**{key: float("nan")})
        with pytest.raises(ValueError, match=key):
            TrainConfig(**{key: float("inf")})


class AlwaysNaN(torch.nn.Module):
    """A model whose loss is NaN at every step (what NaN rope_theta or norm_eps -1 produced)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, input_ids, layout=None, targets=None, **kwargs):
        return self.inner(input_ids, layout=layout, targets=targets, **kwargs) * float("nan")


def test_a_run_that_skips_every_step_fails_instead_of_exiting_cleanly(tmp_path):
    with pytest.raises(ValueError, match="diverged"):
        run(tmp_path / "nan", model=AlwaysNaN(), max_steps=25, ckpt_every=0)


def test_checkpoint_with_nan_weights_is_refused_on_load(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "ck", 1, model_state={"w": torch.tensor([1.0, math.nan])},
                                optimizer_state={}, trainer_state={}, config={"train": {}, "model": {}})
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights"):
        ckpt.load_checkpoint(path)


# ---------------------------------------------------------------------------------- item 5


def test_resume_with_a_changed_schedule_applies_the_new_schedule(tmp_path):
    """A 3-step run resumed with new lr / warmup / max_steps / min_lr_ratio follows the new cosine."""
    run(tmp_path / "run", max_steps=3, lr=3e-3, warmup_steps=2)
    resumed = run(tmp_path / "run", max_steps=6, lr=1e-3, warmup_steps=1, min_lr_ratio=0.5)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for record in resumed:
        expected = 1e-3 * lr_multiplier(record["step"] - 1, warmup_steps=1, max_steps=6, min_lr_ratio=0.5)
        assert record["lr"] == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / "run/checkpoints/step_000006/config.json").read_text())["train"]["lr"] == 1e-3


def test_resume_past_max_steps_is_refused(tmp_path):
    run(tmp_path / "run", max_steps=4)
    with pytest.raises(ckpt.CheckpointError, match="past max_steps 2"):
        run(tmp_path / "run", max_steps=2)


# ---------------------------------------------------------------------------------- item 9


def save(root, step=1, config=None, **kwargs):
    return ckpt.save_checkpoint(root, step, model_state={"w": torch.zeros(4)}, optimizer_state={}, trainer_state={},
                                config=config or {"train": {}, "model": {"d_model": 8}}, **kwargs)


def edit_manifest(path, change):
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    change(manifest)
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(files={}), "must list exactly"),
    (lambda m: m.pop("files"), "must list exactly"),
    (lambda m: m["files"].pop("model.pt"), "must list exactly"),
    (lambda m: m["files"]["model.pt"].pop("sha256"), "malformed"),
], ids=["empty-files", "no-files", "file-missing-from-manifest", "entry-without-hash"])
def test_a_manifest_that_does_not_cover_every_file_is_refused(tmp_path, change, match):
    path = save(tmp_path / "ck")
    (path / "model.pt").write_bytes(b"tampered")
    edit_manifest(path, change)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.load_checkpoint(path)


def test_config_without_model_is_a_checkpoint_error(tmp_path):
    path = save(tmp_path / "ck", config={"train": {}})
    with pytest.raises(ckpt.CheckpointError, match="no model config"):
        ckpt.load_checkpoint(path, model_config={"d_model": 8})


def test_training_falls_back_to_the_intact_older_checkpoint(tmp_path, capsys):
    full = run(tmp_path / "full", max_steps=6)
    run(tmp_path / "run", max_steps=4, ckpt_every=2)
    newest = tmp_path / "run/checkpoints/step_000004"
    blob = bytearray((newest / "model.pt").read_bytes())
    blob[-20] ^= 0xFF
    (newest / "model.pt").write_bytes(bytes(blob))
    resumed = run(tmp_path / "run", max_steps=6, ckpt_every=2)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert "skipping corrupt checkpoint" in capsys.readouterr().err
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[2:]]  # resumed exactly from step 2
    assert ckpt.latest_valid_checkpoint(tmp_path / "run/checkpoints").name == "step_000006"


def test_torn_last_metrics_line_does_not_block_resume(tmp_path):
    run(tmp_path / "run", max_steps=2)
    with open(tmp_path / "run/metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed while appending step 3
    run(tmp_path / "run", max_steps=3)
    assert metric_steps(tmp_path / "run") == [1, 2, 3]


def test_malformed_metrics_line_is_an_error_naming_the_file(tmp_path):
    run(tmp_path / "run", max_steps=2)
    lines = (tmp_path / "run/metrics.jsonl").read_text().split("\n")
    (tmp_path / "run/metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        run(tmp_path / "run", max_steps=3)


class SlowRows(Rows):
    """Rows that signal the first batch and then take 0.2 s per batch (a run in progress)."""

    def __init__(self, started: threading.Event):
        super().__init__()
        self.started = started

    def __iter__(self):
        for row in super().__iter__():
            self.started.set()
            time.sleep(0.2)
            yield row


def test_two_runs_with_one_out_dir_get_a_clear_error(tmp_path):
    started, outcome = threading.Event(), {}

    def first():
        try:
            outcome["first"] = run(tmp_path / "shared", loader=SlowRows(started), max_steps=8)
        except Exception as err:  # noqa: BLE001 - checked below
            outcome["first"] = err

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    try:
        with pytest.raises(ValueError, match="in use by another process"):
            run(tmp_path / "shared", max_steps=8)
    finally:
        thread.join(120)
    assert isinstance(outcome["first"], list) and len(outcome["first"]) == 8, outcome["first"]
    assert metric_steps(tmp_path / "shared") == list(range(1, 9))


def test_two_refrag_runs_with_one_out_dir_get_a_clear_error(tmp_path):
    from refrag.train.refrag import RefragConfig, run_refrag

    held, release = threading.Event(), threading.Event()

    def other_run():  # another run holding the out_dir's lock (flock on its own descriptor, like a process)
        (tmp_path / "run").mkdir()
        with open(tmp_path / "run" / ".run.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(30)
        cfg = TrainConfig(out_dir=str(tmp_path / "run"), tokenizer=str(tmp_path / "tok.json"),
                          kb_dir=str(tmp_path / "no-kb"))
        with pytest.raises(ValueError, match="in use by another process"):
            run_refrag(cfg, RefragConfig())
    finally:
        release.set()
        thread.join(60)


# ------------------------------------------------------------------------------- items 10, 11


@pytest.mark.parametrize("key, raw", [("min_lr_ratio", "50"), ("group_size", "1"), ("rl_lr", "Infinity"),
                                      ("temperature", "NaN"), ("kl_beta", "Infinity")])
def test_refrag_arguments_are_checked_before_any_training(key, raw):
    from refrag.train.refrag import load_refrag_config

    with pytest.raises(ValueError, match=key):
        load_refrag_config(None, {key: raw})


def test_block_pattern_too_long_is_refused_before_building_a_model():
    with pytest.raises(ValueError, match="block_pattern"):
        preset("tiny", vocab_size=VOCAB, block_pattern="M*100000")
