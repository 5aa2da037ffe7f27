"""refrag.demo helpers: the two runs differ only in retrieval, and the report plots are written."""
import pytest

from refrag.demo import CONFIG_DIR, RUNS, demo_configs, plot_curves, read_metrics, smoothed, train_in_parallel
from refrag.train.config import load_config


def test_runs_differ_only_in_retrieval_and_out_dir(tmp_path):
    configs = demo_configs(tmp_path, max_steps=7)
    rag, base = (configs[run].to_dict() for run in RUNS)
    differing = {key for key in rag if rag[key] != base[key]}
    assert differing == {"retrieval", "out_dir"}
    assert rag["retrieval"] and not base["retrieval"] and rag["max_steps"] == 7
    assert rag["kb_dir"] == str(tmp_path / "kb") and rag["tokenizer"] == str(tmp_path / "tokenizer.json")


def test_plots_written(tmp_path):
    curves = {run: [{"step": s, "loss": 3.0 / s, **({"val_loss": 2.0} if s == 2 else {})} for s in (1, 2)]
              for run in RUNS}
    metrics = {"em": 0.5, "f1": 0.6, "abstention_accuracy": None, "hallucination": 0.1,
               "by_type": {"single_hop": {"f1": 0.7}}}
    plot_curves(curves, {run: metrics for run in RUNS}, tmp_path)
    for name in ("loss_curves.png", "metrics.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoothed_is_bias_corrected_ema():
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([0.0, 1.0], decay=0.5) == pytest.approx([0.0, 0.5 / 0.75])


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory):
    """(KB source, prepared KB): the embedded documents with the first 60 train and 8 val/test
    questions, indexed with the hashing encoder (no model download, about a second)."""
    import shutil

    from refrag.data import EMBEDDED_KB_DIR
    from refrag.retrieval import prepare_kb

    root = tmp_path_factory.mktemp("kb")
    source = root / "source"
    (source / "queries").mkdir(parents=True)
    shutil.copy(EMBEDDED_KB_DIR / "documents.jsonl", source / "documents.jsonl")
    for split, n in (("train", 60), ("val", 8), ("test", 8)):
        lines = (EMBEDDED_KB_DIR / "queries" / f"{split}.jsonl").read_text().splitlines()[:n]
        (source / "queries" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    prepare_kb(source / "documents.jsonl", root / "kb", "hashing:64", show_progress=False)
    return source, root / "kb"


def small_configs(tmp_path, kb, **overrides):
    from refrag.data import EMBEDDED_KB_DIR

    source, kb_dir = kb
    extra = {"kb_source": str(source), "kb_dir": str(kb_dir), "tokenizer": str(EMBEDDED_KB_DIR / "tokenizer.json"),
             "val_rows": "1", "model.d_model": "64", "model.n_head": "2", "seq_len": "384",
             "generated_worlds": "0", "min_doc_tokens": "0", **overrides}
    return {run: load_config(CONFIG_DIR / "demo.json", {**extra, "out_dir": str(tmp_path / run),
                                                        "retrieval": "true" if run == "rag" else "false"})
            for run in RUNS}


def test_train_in_parallel_runs_both_and_logs_every_step(tmp_path, small_kb):
    configs = small_configs(tmp_path, small_kb, max_steps="3")
    train_in_parallel(configs, poll_s=0.2)
    for run, cfg in configs.items():
        records = read_metrics(cfg.out_dir)
        assert [r["step"] for r in records] == [1, 2, 3]
        assert (tmp_path / run / "checkpoints").is_dir() and (tmp_path / run / "train.log").is_file()
    check_eval_cli_on_any_kb(tmp_path, small_kb, configs["rag"].out_dir)


def check_eval_cli_on_any_kb(tmp_path, kb, run_dir):
    """`python -m refrag.eval answers` from another folder, pointed at a KB and its questions;
    questions of another KB are refused instead of silently scoring 0."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    source, kb_dir = kb
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]),
                                                     str(Path(__file__).parents[1] / ".pythonpath")])}
    env.pop("TRITON_INTERPRET", None)

    def answers(*args):
        return subprocess.run([sys.executable, "-m", "refrag.eval", "answers", "--checkpoint", str(run_dir),
                               "--limit", "2", "--max-new-tokens", "2", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=300)

    done = answers("--kb", str(kb_dir), "--queries", str(source / "queries" / "test.jsonl"), "--json", "m.json")
    assert done.returncode == 0, done.stderr
    assert json.loads((elsewhere / "m.json").read_text())["count"] == 2
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"id": "q1", "question": "Who?", "answer": "x", "type": "single_hop",
                                   "gold_doc_ids": ["not-in-this-kb"]}) + "\n")
    done = answers("--kb", str(kb_dir), "--queries", str(foreign))
    assert done.returncode == 2 and "belong to another KB" in done.stderr
    done = answers("--kb", str(kb_dir))
    assert done.returncode == 2 and "--kb needs --queries" in done.stderr


def test_train_in_parallel_reports_a_failed_run(tmp_path, small_kb):
    configs = small_configs(tmp_path, small_kb, max_steps="2", seq_len="8")  # no example fits in 8 tokens
    with pytest.raises(SystemExit, match="training rag failed"):
        train_in_parallel(configs, poll_s=0.2)


def test_augmented_training_data_only_with_retrieval_and_only_for_train(small_kb, tmp_path):
    from refrag.train.data import retrieval_manager, sft_conversations

    configs = small_configs(tmp_path, small_kb, extra_questions="2", counterfactual_copies="2")
    manager = retrieval_manager(configs["rag"])
    rag = sft_conversations("train", configs["rag"], manager)
    base = sft_conversations("train", configs["no_retrieval"], manager)
    unaugmented = dict(extra_questions="0", counterfactual_copies="0")
    plain = sft_conversations("train", small_configs(tmp_path, small_kb, **unaugmented)["rag"], manager)
    assert len(rag) == 3 * len(plain) and len(base) == len(plain)
    assert any(len(c["messages"]) > 4 for c in base)  # the baseline gets the extra questions too
    assert all(m["role"] != "retrieval" for c in base for m in c["messages"])
    assert rag[:len(plain)] != rag[len(plain):2 * len(plain)]  # the copies are rewritten
    assert len(sft_conversations("val", configs["rag"], manager)) == len(sft_conversations("val", small_configs(
        tmp_path, small_kb, **unaugmented)["rag"], manager))
