"""bench/gpu_check.py: its CPU dry run (what CI runs in place of the GPU check) writes every stage's
figures or the reason it was skipped, imports every module of the package, and keeps to its budgets."""

from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import tca

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("tca_bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu-check.json"
    argv = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "work"), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_dry_run_runs_every_stage(tmp_path):
    proc, report = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report["mode"] == "dry-run" and report["device"] == "cpu"
    assert report["torch"] and report["python"] and "cuda" in report and "triton" in report
    stages = report["stages"]
    assert list(stages) == list(gpu_check.STAGES)
    for name, stage in stages.items():
        if stage["status"] == "skipped":  # only for a package this machine lacks, never for time
            assert "not installed" in stage["reason"], (name, stage)
        else:
            assert stage["status"] == "ok" and stage["figures"], (name, stage)
            assert stage["seconds"] >= 0 and stage["cpu_s"] >= 0

    expected = {m.name for m in pkgutil.walk_packages(tca.__path__, "tca.")}
    imports = next(f for f in stages["imports"]["figures"] if f.get("figure") == "imports")
    assert imports["failed"] == {} and imports["imported"] == imports["modules"] == len(expected)

    figures = {name: stage["figures"] for name, stage in stages.items() if stage["status"] == "ok"}
    if "cuda_tests" in figures:
        tests = figures["cuda_tests"][0]
        assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    if "kernels" in figures:
        assert {"dense", "tca-relu", "tca-topk"} <= {f["impl"] for f in figures["kernels"]}
        assert all(f["speedup"] > 0 for f in figures["kernels"])
    if "train" in figures:
        assert [f["l0_target"] for f in figures["train"]] == list(gpu_check.DRY_RUN.step_l0s)
        assert all(f["speedup"] > 0 for f in figures["train"])
    harvest = figures["harvest"][0]
    assert harvest["figure"] == "harvest_overhead" and harvest["ratio"] > 0 and harvest["rows"] > 0
    shape = figures["fixture"][0]["shape"]
    assert shape["dtype"] == "bfloat16" and shape["shards"] > 1 and shape["layers"] == 2


def test_a_cap_too_short_skips_every_stage_for_budget(tmp_path):
    proc, report = run_check(tmp_path, "--cap", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in report["stages"].values():
        assert stage["status"] == "skipped" and "budget" in stage["reason"]


def test_a_stage_over_its_budget_is_stopped_with_its_figures_kept(tmp_path):
    # writes a figure where the check tells it to (the argument after --emit), then hangs
    hang = "import sys, time; open(sys.argv[-1], 'a').write('{\"figure\": 1}\\n'); time.sleep(600)"
    run = gpu_check.start("hang", [sys.executable, "-c", hang], 600, tmp_path)
    for _ in range(600):  # until the figure is written, then run out its budget now rather than in 600 s
        if run.figures.exists() and run.figures.read_text().endswith("\n"):
            break
        time.sleep(0.1)
    run.timer.cancel()
    run.timer.function()
    record = gpu_check.finish(run)
    assert record["status"] == "stopped" and record["reason"].startswith("budget")
    assert record["figures"] == [{"figure": 1}]
