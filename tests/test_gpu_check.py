"""`make gpu-check` cannot rot between lent GPUs: its dry run (tiny shapes, Triton interpreter,
the same steps and files), its time budget, the offline wheel install, the goals it reports
against and the README section regenerated from committed results."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check, report, wheels

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG"


def gpu_check_run(out: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """The dry run, with a budget no loaded CI machine reaches (the default 8 minutes is for a GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REFRAG_BENCH_SMOKE", "REFRAG_BENCH_LENGTHS")}
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out),
                           "--wheels", str(out.parent / "no-wheels"), "--budget-s", "1100", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    result = gpu_check_run(out)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return out, result.stdout


@pytest.mark.slow
def test_dry_run_writes_every_file_of_a_real_run(dry_run):
    out, stdout = dry_run
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    assert len(gpu_check.OUTPUT_FILES) <= 8
    total = 0
    for step in gpu_check.STEPS:
        if not step.suite:
            continue
        data = json.loads((out / step.json_name).read_text())
        assert {"machine_info", "commit_info", "benchmarks"} <= set(data), step.name  # pytest-benchmark format
        assert data["benchmarks"], f"{step.name}: its selection ran no case"
        for case in data["benchmarks"]:
            assert case["extra_info"]["smoke"] is True and case["extra_info"]["median_ms"] > 0
        total += len(data["benchmarks"])
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == total
    assert (out / "plots.png").read_bytes()[:4] == PNG_MAGIC
    text = (out / "report.md").read_text()
    assert "DRY RUN" in text and "cpu-smoke" in text
    for step in gpu_check.STEPS:
        assert f"| {step.name} | ok |" in text, f"{step.name} did not end ok:\n{text}"
    for goal in ("SSD fwd+bwd vs max(fla, mamba-ssm)", "doc_attention fwd+bwd vs FlexAttention",
                 "TTFT with the document cache vs full prefill", "hybrid d16 train step peak memory",
                 "HF Bamba packed fwd+bwd vs mamba-ssm kernels"):
        assert goal in text
    assert "| gpu_tests | ok |" in text and "[gpu-check] 8 files" in stdout


@pytest.mark.slow
def test_readme_section_from_committed_results(dry_run, tmp_path):
    """A committed GPU folder shows up in the README with its device, goals and cases; dry runs do not."""
    out, _ = dry_run
    root = tmp_path / "results"
    shutil.copytree(out, root / report.DRY_RUN_DIR)
    gpu = root / "test-gpu"
    gpu.mkdir()
    for path in out.glob("*.json"):
        data = json.loads(path.read_text())
        for case in data["benchmarks"]:
            case["extra_info"].update(smoke=False, device="Test GPU")
        (gpu / path.name).write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nafter\n")
    subprocess.run([sys.executable, "-m", "bench.report", "--out", str(root), "--readme", str(readme)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    text = readme.read_text()
    assert "#### Test GPU" in text and "| TTFT with the document cache vs full prefill |" in text
    assert "old" not in text and text.endswith("\nafter\n") and "cpu-smoke" not in text
    cases = sum(len(json.loads(p.read_text())["benchmarks"]) for p in gpu.glob("*.json"))
    table = text.split("| op | mode |", 1)[1].split(report.README_END)[0]
    assert len([ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln]) == cases


def test_readme_without_results_says_so(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n")
    report.update_readme(readme, tmp_path / "none")
    assert "No GPU result is committed yet" in readme.read_text()
    plain = tmp_path / "plain.md"
    plain.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="markers"):
        report.update_readme(plain, tmp_path)


def test_report_on_a_missing_file_is_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "latest.json")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_spent_budget_still_writes_every_file(tmp_path):
    """With no time left for any step, the report still comes back, saying why each step did not run."""
    out = tmp_path / "out"
    result = gpu_check_run(out, "--budget-s", str(gpu_check.REPORT_RESERVE_S + 1), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    text = (out / "report.md").read_text()
    assert text.count("skipped: time budget spent") == len(gpu_check.STEPS)
    data = json.loads((out / "ssd.json").read_text())
    assert data["benchmarks"] == [] and "skipped" in data["refrag_note"]


def test_chosen_steps_run_and_the_others_still_get_their_files(tmp_path):
    out = tmp_path / "out"
    result = gpu_check_run(out, "--steps", "cross_entropy", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gpu_check.OUTPUT_FILES)
    text = (out / "report.md").read_text()
    assert "| cross_entropy | ok |" in text and text.count("not chosen (--steps)") == len(gpu_check.STEPS) - 1
    assert json.loads((out / "cross_entropy.json").read_text())["benchmarks"]
    assert json.loads((out / "ssd.json").read_text())["benchmarks"] == []
    bad = gpu_check_run(out, "--steps", "ssd,nope", timeout=120)
    assert bad.returncode != 0 and "unknown nope" in bad.stderr


def test_a_cut_short_suite_json_becomes_an_empty_one(tmp_path):
    path = tmp_path / "ssd.json"
    path.write_text('{"benchmarks": [{"name": "t')
    data = gpu_check.suite_json(path, "timed out")
    assert data["benchmarks"] == [] and data["refrag_note"] == "its JSON was cut short: timed out"
    assert gpu_check.suite_json(tmp_path / "none.json", "exit 1")["refrag_note"] == "no case finished: exit 1"


def test_an_overrunning_step_is_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 10.0)
    code = "import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n"
    start = time.time()
    # 5 s budget: the child must be inside its try (past interpreter start-up, which took over 1 s once
    # on the CI machine) when SIGINT comes; interrupted long before the 60 s sleep ends
    status = gpu_check.run_process([sys.executable, "-c", code], dict(os.environ), 5.0, tmp_path / "log")
    assert status == "timed out" and time.time() - start < 40
    assert "interrupted" in (tmp_path / "log").read_text()  # SIGINT first, so pytest can still write its files


def test_junit_summary_counts_and_quotes_failures(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite><testcase classname="t" name="ok"/>'
                    '<testcase classname="t" name="bad"><failure message="m">assert 1 == 2</failure></testcase>'
                    '<testcase classname="t" name="skip"><skipped message="no gpu"/></testcase>'
                    '<testcase classname="t" name="err"><error message="boom"/></testcase></testsuite></testsuites>')
    counts, failures = gpu_check.junit_summary(path)
    assert counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert failures == ["failure: t::bad\nassert 1 == 2", "error: t::err\nboom"]
    assert gpu_check.junit_summary(tmp_path / "missing.xml") == ({"passed": 0, "failed": 0, "errors": 0,
                                                                  "skipped": 0}, [])


# ---- goals: arithmetic on rows shaped like run_case's extra_info ----

def test_goals_read_ratios_off_the_longest_length():
    rows = [
        {"op": "ssd_scan", "mode": "fwd_bwd", "L": 8192, "num_seqs": 1, "speedup_vs_fla_chunk_simple_gla": 9.0},
        {"op": "ssd_scan", "mode": "fwd_bwd", "L": 16384, "num_seqs": 1, "speedup_vs_fla_chunk_simple_gla": 1.5,
         "speedup_vs_mamba_ssm": 1.1},
        {"op": "doc_attention", "mode": "fwd_bwd", "L": 16384, "speedup_vs_flex_attention": 1.4,
         "sdpa_dense_median_ms": "OOM"},
        {"op": "fused_linear_cross_entropy", "mode": "fwd_bwd", "V": 32768, "density": 0.2,
         "speedup_vs_torch": 2.5, "speedup_vs_reference": 9.0, "peak_mem_bytes": 100, "torch_peak_mem_bytes": 2000},
        {"op": "train_step", "L": 16384, "pattern": "pure-M", "tokens_per_s": 3000.0, "peak_mem_total_bytes": 5e9},
        {"op": "train_step", "L": 16384, "pattern": "pure-T", "tokens_per_s": 2000.0, "peak_mem_total_bytes": 1e10},
        {"op": "train_step", "L": 16384, "pattern": "hybrid-d16", "peak_mem_total_bytes": 13e9},
        {"op": "doc_cache_ttft", "model": "hybrid", "docs": 10, "doc_len": 512, "speedup_vs_full_prefill": 12.0},
    ]
    goals = {(g.goal, g.case): g for g in report.evaluate_goals(rows)}
    ssd = goals[("SSD fwd+bwd vs max(fla, mamba-ssm)", "fwd_bwd L16384")]
    assert (ssd.value, ssd.met) == (1.1, False)  # the faster baseline decides
    assert goals[("doc_attention fwd+bwd vs FlexAttention", "fwd_bwd L16384")].met is True
    dense = goals[("doc_attention fwd+bwd vs SDPA dense mask", "fwd_bwd L16384")]
    assert dense.value is None and dense.met is None  # OOM is not a ratio
    case = "fwd_bwd V32768 20% loss"
    assert goals[("FLCE speed vs torch, 20% loss tokens", case)].value == 2.5  # torch preferred over reference
    memory = goals[("FLCE peak memory vs torch, 20% loss tokens", case)]
    assert memory.value == pytest.approx(0.05) and memory.met is True
    mamba = {g.goal: g for g in goals.values() if g.case == "pure-M vs pure-T L16384"}
    assert mamba["Mamba train step tokens/s vs transformer"].value == pytest.approx(1.5)
    assert mamba["Mamba train step peak memory vs transformer"].value == pytest.approx(0.5)
    d16 = next(g for g in goals.values() if g.goal == "hybrid d16 train step peak memory")
    assert (d16.value, d16.met) == (13.0, False)
    assert goals[("TTFT with the document cache vs full prefill", "hybrid 10x512")].met is True
    table = report.goals_table(list(goals.values()))
    assert "| 1.10x | ≥ 1.2x | **no** |" in table and "| not measured | ≥ 5x | – |" in table


# ---- wheels: offline install into a folder of its own ----

def make_wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal pure-Python wheel holding package `name` with __version__."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", f"__version__ = {version!r}\n")
        archive.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
        archive.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}/RECORD", "")
    return path


def test_wheels_install_offline_into_a_target(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "gcprobe_a", "1.2.0", requires=["torch>=2.0", "gcprobe_b", 'pytest; extra == "dev"'])
    make_wheel(folder, "gcprobe_b", "0.3")
    target = tmp_path / "site"
    assert wheels.install(target, folder) == {"gcprobe-a": "1.2.0", "gcprobe-b": "0.3"}
    result = subprocess.run([sys.executable, "-c", "import gcprobe_a, gcprobe_b; print(gcprobe_a.__file__)"],
                            env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith(str(target))


def test_wheels_check_refuses_what_would_break_the_install(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no wheels"):
        wheels.check(tmp_path)
    make_wheel(tmp_path, "gcprobe_a", "1.0", requires=["gcprobe-missing"])
    with pytest.raises(SystemExit, match="needs gcprobe-missing"):
        wheels.check(tmp_path)
    make_wheel(tmp_path, "gcprobe_missing", "1.0")
    assert wheels.check(tmp_path) == {"gcprobe-a": "1.0", "gcprobe-missing": "1.0"}
    make_wheel(tmp_path, "gcprobe_a", "2.0")
    with pytest.raises(SystemExit, match="two versions of gcprobe-a"):
        wheels.check(tmp_path)
    (tmp_path / "gcprobe_a-2.0-py3-none-any.whl").unlink()
    monkeypatch.setattr(wheels, "MAX_BYTES", 10)
    with pytest.raises(SystemExit, match="over the"):
        wheels.check(tmp_path)
