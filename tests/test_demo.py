"""refrag.demo helpers: the two runs differ only in retrieval, and the report plots are written."""
import pytest

from refrag.demo import RUNS, demo_configs, plot_curves, smoothed


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
