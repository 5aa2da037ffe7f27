"""Every GPU number in one prepared command, under a hard time budget.

    make gpu-check [OUT=DIR] [BUDGET=480] [DRY_RUN=1] [STEPS=ssd,doc_attention]
    python -m bench.gpu_check [--out DIR] [--budget-s 480] [--dry-run] [--wheels .wheels] [--steps ...]

Made for a lent GPU machine that cannot download and is held for minutes: one call gives back
everything. Steps, in this order, each a pytest process of its own (a CUDA fault in one cannot
take the others down) given a share of the time left (STEPS' weights; time a step leaves unused
goes to the next ones):

1. `pytest -m gpu tests/`: bf16, int64 offsets past 2^31, determinism, autotune configs on hardware;
2. the headline benchmarks, each an existing bench/ suite selected by its pytest ids (-k) and
   lengths (REFRAG_BENCH_LENGTHS): SSD and doc_attention forward+backward at 8K and 16K, fused
   linear cross-entropy forward+backward at 100% and 20% loss tokens, the train steps (hybrid, pure Mamba-2, pure attention,
   d16 hybrid) at 16K, time to first token with the document cache. Every baseline is measured in
   the same run (bench.common.run_case).

Within a step, cases that would start after its deadline are skipped (bench/conftest.py); a step
that overruns gets SIGINT, so pytest still writes what finished, then SIGKILL after GRACE_S. On
SIGTERM/SIGINT this script stops the running step the same way and still writes the report.
Triton's compile and autotune caches (TRITON_CACHE_AUTOTUNING=1) are shared by all steps, so a
kernel is compiled and tuned once; every benchmark case runs once before it is timed.

Wheels in --wheels (default .wheels/, `make wheels` where the registry is reachable) are
installed with `pip install --no-index --no-deps --target <tmp>` and put on the steps'
PYTHONPATH: nothing is downloaded and no system package is touched.

Output, at most 8 files in OUT (default bench/results/<device>/; dry run bench/results/dry-run/):
one pytest-benchmark JSON per suite, results.csv, report.md (device, versions, the goals of
bench.report.GOALS, steps, every case, failures) and plots.png.

--dry-run: the same steps and files on the CPU with tiny shapes under the Triton interpreter
(CUDA hidden): it proves the command works, not speed. `make test` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from bench import report, wheels

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 480.0
REPORT_RESERVE_S = 20.0  # kept back from the steps for the report and plots
CASE_RESERVE = 0.25  # no new case starts in the last quarter of a step's share
GRACE_S = 30.0  # SIGINT to SIGKILL
MIN_STEP_S = 5.0  # a step given less is skipped
FAILURE_LINES = 30  # per failure excerpt in report.md
DISTRIBUTIONS = ("torch", "triton", "fla-core", "liger-kernel", "mamba-ssm", "flash-attn", "einops",
                 "pytest-benchmark", "transformers")
BASELINE_MODULES = ("fla.ops.simple_gla", "liger_kernel.ops.fused_linear_cross_entropy",
                    "mamba_ssm.ops.triton.ssd_combined", "flash_attn", "torch.nn.attention.flex_attention")


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple  # pytest arguments after the common ones
    weight: float
    # REFRAG_BENCH_LENGTHS for length-swept suites (real runs; the dry run keeps smoke lengths). The
    # goals are read at 16K, so 16K runs first: a step cut short by the budget still has them.
    lengths: str = ""
    suite: bool = True  # a benchmark suite: writes <name>.json

    @property
    def json_name(self) -> str:
        return f"{self.name}.json"


STEPS = (
    Step("gpu_tests", ("-m", "gpu", "tests", "--continue-on-collection-errors"), 3.0, suite=False),
    Step("ssd", ("bench/test_bench_ssd.py", "-k", "fwd_bwd"), 2.0, "16384,8192"),
    Step("doc_attention", ("bench/test_bench_doc_attention.py", "-k", "fwd_bwd"), 2.0, "16384,8192"),
    Step("cross_entropy", ("bench/test_bench_cross_entropy.py", "-k", "fwd_bwd and not dens5"), 1.0),
    # transformers' Bamba on a packed 8K batch (its own length) runs with the train steps: one JSON
    Step("train_step", ("bench/test_bench_train_step.py", "bench/test_bench_hf_bamba.py"), 2.0, "16384"),
    Step("doc_cache", ("bench/test_bench_doc_cache.py",), 1.0),
)
OUTPUT_FILES = [s.json_name for s in STEPS if s.suite] + ["results.csv", "report.md", "plots.png"]
assert len(OUTPUT_FILES) <= 8, "the device machine gives back at most 8 files"


@dataclass
class StepResult:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    counts: Dict[str, int] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)
    log_tail: str = ""


class Stop(Exception):
    """SIGTERM or SIGINT reached this script: stop the running step, write what we have."""


def _stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def run_process(cmd: List[str], env: Dict[str, str], seconds: float, log_path: Path) -> str:
    """Run cmd (its own process group) with output to log_path; past `seconds`, SIGINT, then SIGKILL
    after GRACE_S. Returns 'ok', 'exit N' or 'timed out'."""
    with log_path.open("w") as log:
        # SIGINT back to its default in the child: a command started in the background (`cmd &` in a
        # script, CI runners) inherits SIGINT ignored, and then the step could only be SIGKILLed
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            rc = proc.wait(timeout=max(seconds, 0.1))
            return "ok" if rc == 0 else f"exit {rc}"
        except (subprocess.TimeoutExpired, Stop) as reason:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if isinstance(reason, Stop):
                raise
            return "timed out"


def junit_summary(path: Path) -> tuple[Dict[str, int], List[str]]:
    """Counts (passed, failed, errors, skipped) and failure excerpts from a pytest --junitxml file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if not path.is_file():
        return counts, failures
    try:
        tree = ET.parse(path)
    except ET.ParseError:
        return counts, ["junit XML unreadable (process killed while writing it)"]
    for case in tree.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            text = "\n".join((outcome.text or outcome.get("message", "")).strip().splitlines()[-FAILURE_LINES:])
            failures.append(f"{outcome.tag}: {name}\n{text}")
    return counts, failures


def probe(env: Dict[str, str]) -> Dict:
    """Device, versions and baseline importability as the steps will see them (a child process)."""
    code = f"""
import importlib, importlib.metadata as md, json, platform, sys, torch
from bench.common import device_name, git_commit
out = {{"device": device_name(), "cuda": torch.cuda.is_available(), "python": platform.python_version(),
       "commit": git_commit(),
       "cuda_version": torch.version.cuda, "versions": {{}}, "imports": {{}}}}
for dist in {DISTRIBUTIONS!r}:
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = None
for module in {BASELINE_MODULES!r}:
    try:
        importlib.import_module(module)
        out["imports"][module] = "ok"
    except Exception as error:
        out["imports"][module] = f"{{type(error).__name__}}: {{str(error)[:200]}}"
print("PROBE" + json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("PROBE")), None)
    if line is None:
        raise SystemExit(f"gpu_check: the environment probe failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return json.loads(line[len("PROBE"):])


def suite_json(path: Path, status: str) -> Dict:
    """A suite's pytest-benchmark JSON, or one with no cases (and why) when the step wrote none or
    was killed while writing it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        reason = "no case finished" if isinstance(error, OSError) else "its JSON was cut short"
        return {"machine_info": {}, "commit_info": {}, "benchmarks": [], "datetime": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "version": None, "refrag_note": f"{reason}: {status}"}


def child_env(dry_run: bool, site: Optional[Path]) -> Dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / ".pythonpath")] + ([str(site)] if site else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_CACHE_AUTOTUNING"] = "1"
    env.pop("REFRAG_BENCH_LENGTHS", None)
    for key in [k for k in env if k.startswith("PYTEST_XDIST_")]:  # started from an xdist worker (make test):
        del env[key]  # pytest-benchmark would take the step for a worker and disable timing
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", REFRAG_BENCH_SMOKE="1")
    else:
        env.pop("REFRAG_BENCH_SMOKE", None)
        env.pop("TRITON_INTERPRET", None)
    return env


def run_steps(env: Dict[str, str], out: Path, work: Path, deadline: float, dry_run: bool,
              chosen: Sequence[str]) -> List[StepResult]:
    """Run the chosen steps in STEPS order, each given its weight's share of the time left."""
    results = [StepResult(step.name) for step in STEPS]
    try:
        for i, (step, result) in enumerate(zip(STEPS, results)):
            if step.name not in chosen:
                result.status = "not chosen (--steps)"
                continue
            left = deadline - time.time()
            share = left * step.weight / sum(s.weight for s in STEPS[i:] if s.name in chosen)
            if share < MIN_STEP_S:
                result.status = "skipped: time budget spent"
                continue
            junit = work / f"{step.name}.xml"
            cmd = [sys.executable, "-m", "pytest", *step.args, "-q", "-rfE", "-p", "no:cacheprovider",
                   f"--junitxml={junit}"]
            step_env = dict(env, REFRAG_BENCH_DEADLINE=str(time.time() + share * (1 - CASE_RESERVE)))
            if step.suite:
                cmd += ["--benchmark-only", f"--benchmark-json={out / step.json_name}"]
                if step.lengths and not dry_run:
                    step_env["REFRAG_BENCH_LENGTHS"] = step.lengths
            print(f"[gpu-check] {step.name}: up to {share:.0f} s", flush=True)
            start = time.time()
            try:
                result.status = run_process(cmd, step_env, share, work / f"{step.name}.log")
            finally:
                result.seconds = time.time() - start
                result.counts, result.failures = junit_summary(junit)
                log = (work / f"{step.name}.log")
                if log.is_file():
                    tail = log.read_text(errors="replace").splitlines()
                    result.log_tail = "\n".join(tail[-FAILURE_LINES:])
            print(f"[gpu-check] {step.name}: {result.status} in {result.seconds:.0f} s, "
                  + ", ".join(f"{v} {k}" for k, v in result.counts.items() if v), flush=True)
    except Stop as reason:
        for result in results:
            if result.status == "not run":
                result.status = f"stopped: {reason}"
                break
        print(f"[gpu-check] stopped by {reason}: writing what finished", flush=True)
    return results


def fmt_versions(info: Dict) -> List[str]:
    versions = info["versions"]
    return [f"- device: **{info['device']}**; Python {info['python']}, torch {versions.get('torch')} "
            f"(CUDA {info['cuda_version']}), triton {versions.get('triton')}",
            "- packages: " + ", ".join(f"{d} {versions[d] or 'not installed'}" for d in DISTRIBUTIONS
                                      if d not in ("torch", "triton")),
            "- baseline imports: " + ", ".join(f"`{m}` {v}" for m, v in info["imports"].items())]


def write_report(out: Path, info: Dict, results: List[StepResult], meta: Dict) -> List[report.GoalResult]:
    """results.csv, report.md and plots.png from the suite JSONs in out; returns the goal results."""
    for step, result in zip(STEPS, results):  # each suite JSON also says what it ran on
        if step.suite:
            data = suite_json(out / step.json_name, result.status)
            data["refrag_environment"] = {**info, "wheels": meta["wheels"], "dry_run": meta["dry_run"]}
            (out / step.json_name).write_text(json.dumps(data, indent=2))
    rows = report.load_rows([out / s.json_name for s in STEPS if s.suite])
    report.write_csv(rows, out / "results.csv")
    goals = report.evaluate_goals(rows)
    title = f"make gpu-check: {info['device']}" + (" (DRY RUN)" if meta["dry_run"] else "")
    report.summary_plot(rows, goals, out / "plots.png", f"{title}, commit {meta['commit']}")
    lines = [f"# {title}", ""]
    if meta["dry_run"]:
        lines += ["**Dry run**: tiny shapes, Triton interpreter on the CPU. It checks the command; "
                  "its numbers mean nothing.", ""]
    lines += [f"- commit {meta['commit']}, {meta['time']}, budget {meta['budget_s']:.0f} s, "
              f"used {meta['used_s']:.0f} s", *fmt_versions(info), f"- wheels: {meta['wheels']}", ""]
    lines += ["## Goals (ratios measured in this run)", "", report.goals_table(goals), ""]
    lines += ["## Steps", "", "| step | status | seconds | passed | failed | errors | skipped |", "|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.counts
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {c.get('passed', 0)} | {c.get('failed', 0)} | "
                     f"{c.get('errors', 0)} | {c.get('skipped', 0)} |")
    lines += ["", "## Benchmarks", "", report.markdown_table(rows) if rows else "No case finished.", ""]
    errors = report.baseline_errors(rows)
    if errors:
        lines += ["## Baselines that failed", "", *[f"- {e}" for e in errors], ""]
    broken = [r for r in results if r.failures or r.status.startswith(("exit", "timed", "stopped"))]
    if broken:
        lines += ["## Failures", ""]
        for r in broken:
            lines += [f"### {r.name}: {r.status}", ""]
            for failure in r.failures:
                lines += ["```", failure, "```", ""]
            if not r.failures and r.log_tail:
                lines += ["Last lines of its output:", "", "```", r.log_tail, "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    return goals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>/, "
                                                 "dry run bench/results/dry-run/)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="hard time budget in seconds")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, Triton interpreter on the CPU")
    parser.add_argument("--wheels", type=Path, default=wheels.WHEEL_DIR, help="wheel folder to install from")
    parser.add_argument("--steps", default=",".join(s.name for s in STEPS),
                        help="comma-separated steps to run, e.g. ssd,doc_attention to redo two (default: all); "
                             "the others still get their (empty) files")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    chosen = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = sorted(set(chosen) - {s.name for s in STEPS})
    if unknown or not chosen:
        parser.error(f"--steps: unknown {', '.join(unknown) or 'empty list'}; "
                     f"choose from {', '.join(s.name for s in STEPS)}")
    start = time.time()
    deadline = start + args.budget_s - REPORT_RESERVE_S
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            work = Path(tmp)
            site, wheel_note = None, "none carried (baselines from fla / Liger run only if installed)"
            if wheels.wheel_files(args.wheels):
                site = work / "site"
                versions = wheels.install(site, args.wheels)
                size = sum(p.stat().st_size for p in wheels.wheel_files(args.wheels)) / 2**20
                wheel_note = (f"{len(versions)} from {args.wheels.name}/ ({size:.1f} MiB, pip --no-index into a "
                              "temporary folder): " + ", ".join(f"{n} {v}" for n, v in sorted(versions.items())))
            env = child_env(args.dry_run, site)
            info = probe(env)
            if not args.dry_run and not info["cuda"]:
                raise SystemExit("gpu_check: no CUDA device here; `make gpu-check DRY_RUN=1` runs the dry run on a CPU")
            out = args.out or (report.RESULTS / (report.DRY_RUN_DIR if args.dry_run else report.device_slug(info["device"])))
            out.mkdir(parents=True, exist_ok=True)
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
            print(f"[gpu-check] {info['device']}, budget {args.budget_s:.0f} s, output {out}", flush=True)
            results = run_steps(env, out, work, deadline, args.dry_run, chosen)
            meta = {"dry_run": args.dry_run, "commit": info["commit"], "budget_s": args.budget_s,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)), "wheels": wheel_note,
                    "used_s": time.time() - start}
            goals = write_report(out, info, results, meta)
    except Stop as reason:
        print(f"[gpu-check] stopped by {reason} before any step ran: nothing written", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(report.goals_table(goals))
    print("\n".join(f"{r.name}: {r.status} ({r.seconds:.0f} s) " + ", ".join(f"{v} {k}" for k, v in r.counts.items())
                    for r in results))
    print(f"[gpu-check] {len(OUTPUT_FILES)} files in {out}, {time.time() - start:.0f} s")
    failed = any(r.counts.get("failed") or r.counts.get("errors") for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
