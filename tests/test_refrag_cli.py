"""End to end through the command lines: `python -m refrag.train refrag` and `python -m refrag.eval multihop`.

A tiny model trains a few steps on a slice of the embedded KB (hashing-encoder index, BM25
retrieval), then the multi-hop eval compares it with a single-shot SFT run whose prompt format
differs (documents first, shorter documents): the report must say which format each model ran
with, and it must be the one it was trained with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import refrag.train
from refrag.data import EMBEDDED_KB_DIR
from refrag.train.refrag import load_refrag_config
from test_demo import small_kb  # noqa: F401  (fixture)

CONFIGS = Path(refrag.train.__file__).parent / "configs"
TINY = ["--model.d_model", "64", "--model.n_head", "2", "--device", "cpu", "--seq_len", "384",
        "--tokenizer", str(EMBEDDED_KB_DIR / "tokenizer.json")]


def run_module(*args: str, timeout: int = 600) -> str:
    """Run `python -m ARGS` with the ops' PyTorch references (no Triton interpreter); returns stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"python -m {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("name", ["refrag_demo", "refrag_demo_gpu"])
def test_shipped_refrag_configs_load(name):
    cfg, rcfg = load_refrag_config(CONFIGS / f"{name}.json")
    assert rcfg.sft_steps > 0 and rcfg.rl_steps > 0 and cfg.question_first


@pytest.mark.slow
def test_train_refrag_then_eval_multihop_against_single_shot(tmp_path, small_kb):  # noqa: F811
    source, kb_dir = small_kb
    data = ["--kb_source", str(source), "--kb_dir", str(kb_dir), *TINY]
    run_module("refrag.train", "refrag", "--config", str(CONFIGS / "refrag_demo.json"), *data,
               "--out_dir", str(tmp_path / "refrag"), "--sft_steps", "2", "--rl_steps", "1",
               "--questions_per_step", "2", "--group_size", "2", "--max_new_tokens", "4", "--max_doc_tokens", "40")
    rl_log = [json.loads(line) for line in (tmp_path / "refrag" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_log] == [1] and 0.0 <= rl_log[0]["reward"] <= 1.0
    run_module("refrag.train", "sft", "--config", str(CONFIGS / "demo.json"), *data,
               "--out_dir", str(tmp_path / "sft"), "--max_steps", "2", "--val_rows", "1", "--question_first", "false",
               "--max_doc_tokens", "24", "--min_doc_tokens", "0", "--generated_worlds", "0", "--extra_questions", "0",
               "--counterfactual_copies", "0")
    report = tmp_path / "report.json"
    out = run_module("refrag.eval", "multihop", "--checkpoint", str(tmp_path / "refrag" / "rl" / "checkpoints"),
                     "--rag-checkpoint", str(tmp_path / "sft" / "checkpoints"), "--limit", "3",
                     "--max-new-tokens", "4", "--max-hops", "2", "--batch-size", "2", "--device", "cpu",
                     "--json", str(report))
    results = json.loads(report.read_text())
    assert set(results) == {"refrag", "single_shot"} and "hops" in out and "single_shot" in out
    multihop, single = results["refrag"], results["single_shot"]
    assert multihop["prompt"] == {"multihop": True, "question_first": True, "max_doc_tokens": 40}
    assert single["prompt"] == {"multihop": False, "question_first": False, "max_doc_tokens": 24}
    assert multihop["top_k"] == single["top_k"] == 2
    for result in (multihop, single):
        assert result["count"] == 3 and len(result["predictions"]) == 3
        assert 0.0 <= result["f1"] <= 1.0 and 0.0 <= result["hallucination"] <= 1.0
    assert 1.0 <= multihop["hops"] <= 2.0
    assert sum(multihop[s] for s in ("answered", "abstained", "max_hops", "truncated", "empty")) == pytest.approx(1.0)
    assert all(len(p["queries"]) >= 1 for p in multihop["predictions"])


def test_eval_multihop_reports_a_missing_checkpoint(tmp_path, capsys):
    from refrag.eval.multihop import main_multihop

    with pytest.raises(SystemExit) as exit_info:
        main_multihop(["--checkpoint", str(tmp_path / "nothing"), "--device", "cpu"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
