"""refrag.demo helpers: the two runs differ only in retrieval, and the report plots are written."""
import pytest

from refrag.demo import (CONFIG_DIR, RUNS, demo_configs, plot_curves, read_metrics, smoothed, subprocess_env,
                         train_in_parallel)
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
             "generated_worlds": "0", "min_doc_tokens": "0", "multihop_copies": "0", **overrides}
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
    check_evaluate_suite(small_kb, configs)


def check_evaluate_suite(kb, configs):
    """Every run of a suite is evaluated on the same questions; the multi-hop loop reports hops and
    outcomes, and its summary pairs it with the single-shot run of the same model."""
    from refrag.data import load_queries
    from refrag.demo import evaluate_suite, multihop_summary
    from refrag.eval.evaluate import load_trained_model
    from refrag.retrieval import RetrievalManager

    source, kb_dir = kb
    trained = {run: load_trained_model(cfg.out_dir, "cpu") for run, cfg in configs.items()}
    records = [r for r in load_queries("test", source) if r["type"] in ("single_hop", "two_hop")][:3]
    runs = dict(evaluate_suite(trained, RetrievalManager("bm25", knowledge_base=kb_dir), records, 2, 2,
                               max_new_tokens=2))
    assert list(runs) == ["rag", "no_retrieval", "rag_2x_docs", "rag_multihop"]
    assert all(m["count"] == 3 for m in runs.values())
    assert 1 <= runs["rag_multihop"]["hops"] <= 3
    summary = multihop_summary(runs)
    assert summary["all"]["single_shot_f1"] == runs["rag"]["f1"] and summary["all"]["multihop_f1"] == runs["rag_multihop"]["f1"]
    assert sum(summary["outcomes"].values()) == pytest.approx(1.0)


def test_targets_are_checked_against_the_report():
    from refrag.demo import TARGETS, check_targets

    def metrics(f1, hallucination=0.05):
        return {"f1": f1, "hallucination": hallucination, "abstention_accuracy": 0.9,
                "by_type": {"single_hop": {"f1": f1}, "two_hop": {"f1": f1}}}

    report = {"metrics": {"rag": metrics(0.8), "rag_multihop": metrics(0.5, hallucination=0.2)},
              "heldout_metrics": {"rag": metrics(0.1)},
              "multihop": {"embedded": {"two_hop": {"f1_ratio": None}}},
              "f1_kept_at_2x_doc_tokens": {"embedded": 0.9}}
    targets = check_targets(report)
    assert set(targets) == set(TARGETS)
    assert targets["embedded two_hop f1, multi-hop loop"] == {"value": 0.5, "threshold": ">= 0.4", "met": True}
    assert targets["embedded hallucination, multi-hop loop"]["met"] is False
    assert targets["heldout single_hop f1"]["met"] is False and targets["embedded single_hop f1"]["met"] is True
    assert targets["embedded two_hop f1, loop / single-shot (same model)"]["met"] is None  # not measured


def check_eval_cli_on_any_kb(tmp_path, kb, run_dir):
    """`python -m refrag.eval answers` from another folder, pointed at a KB and its questions;
    questions of another KB are refused instead of silently scoring 0."""
    import json
    import subprocess
    import sys

    source, kb_dir = kb
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = subprocess_env()  # this checkout on PYTHONPATH, no interpreter: as the demo runs its steps

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


def test_multihop_traces_only_for_two_hop_questions_with_retrieval(small_kb, tmp_path):
    from refrag.data import load_queries
    from refrag.train.data import retrieval_manager, sft_conversations

    source, _ = small_kb
    configs = small_configs(tmp_path, small_kb, multihop_copies="2")
    plain = small_configs(tmp_path, small_kb)
    manager = retrieval_manager(configs["rag"])
    rag, base = (sft_conversations("train", configs[run], manager) for run in ("rag", "no_retrieval"))
    two_hop = [r for r in load_queries("train", source) if r["type"] == "two_hop"]
    assert two_hop
    traces = rag[len(sft_conversations("train", plain["rag"], manager)):]
    assert len(traces) == 2 * len(two_hop)
    for conv, rec in zip(traces, two_hop + two_hop):
        roles = [m["role"] for m in conv["messages"]]
        assert roles == ["system", "user", "retrieval", "assistant", "retrieval", "assistant"]
        assert conv["messages"][3]["query"] == rec["hops"][1]["query"]
        assert conv["messages"][-1]["content"] == rec["answer"]
        hop_docs = [[d["id"] for d in conv["messages"][i]["documents"]] for i in (2, 4)]
        assert rec["hops"][0]["doc_id"] in hop_docs[0] and rec["hops"][1]["doc_id"] in hop_docs[1]
    assert len(base) == len(sft_conversations("train", plain["no_retrieval"], manager))  # needs retrieval
    assert len(sft_conversations("val", configs["rag"], manager)) == len(sft_conversations("val", plain["rag"], manager))
