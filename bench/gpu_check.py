"""GPU check in one command: CUDA tests, kernel benchmark, training step and harvest ratio, in one JSON file.

The figures are taken at the shapes of a 7B pair, the harvest's on a 7B-shaped random pair.

    python bench/gpu_check.py                # on a CUDA machine: at most 4 minutes
    python bench/gpu_check.py --quick        # under 2 minutes
    python bench/gpu_check.py --dry-run      # every stage at toy size on CPU (what CI runs)
    make gpu-check                           # the first; make gpu-check ARGS=--quick

It installs nothing (a GPU machine may have no network): a stage whose package is missing is
skipped with one line. Every stage runs in its own process under a time budget, and the whole
under a cap (235 s; --quick 115 s): a stage that runs out of its budget is stopped, with the
figures it had printed kept ("stopped: budget"); one that cannot start in the time left is
"skipped: budget".

  imports     every module of the tca package; the device, torch, triton and CUDA versions
  fixture     a 7B-shaped pair from tca.toy.pairs (Qwen2.5-7B's shapes: d 3584, intermediate
              18944, 28/4 heads, vocab 152064, bf16, 4 shards; 2 layers), built in the background
              while the stages before the harvest run; --fixture DIR keeps it for the next run
  cuda_tests  pytest -m cuda on the test files that hold CUDA tests (Triton kernels against
              their PyTorch twins on the GPU)
  kernels     bench/kernels.py's training step, tca sparse against dense (and sparsify where it
              is installed), at d 3584, widths 8192 (and 32768), L0 1/10/100
  train       bench/train.py's step figure: tca's adapter step / the dense reference step, at the
              fixture's d and width 8192
  harvest     bench/harvest.py's figure on the fixture: harvest wall time / (the target forward
              plus both float32 MLPs back to back in memory, same tokens)

--dry-run runs the same stages on CPU at toy sizes (a 2-layer, d=64 bf16 sharded pair), the
kernel tests against their twins instead of -m cuda (Triton in its interpreter when
TRITON_INTERPRET=1 is set, else only the PyTorch twins run), and writes the same JSON. The exit
status is 1 when a stage failed (a module that does not import, a failing test, an error).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STAGES = ("imports", "fixture", "cuda_tests", "kernels", "train", "harvest")
FINISH_S = 3
"""Seconds of the cap kept for stopping what still runs and writing the JSON."""
MIN_START_S = 5
"""A stage is not started with less time than this (or its budget, if smaller) left."""


@dataclass(frozen=True)
class Mode:
    """Sizes and time budgets of one kind of run."""

    name: str
    cap_s: float
    budgets: dict[str, float]
    """Seconds per stage: the fixture builds beside the others, which run one after another."""
    kernel_shapes: tuple[tuple[int, int, int, int], ...]
    """bench/kernels.py shapes (d, features, l0, batch), the most telling first: the last ones
    are the ones a short budget drops."""
    kernel_reps: int
    step: tuple[int, int, int]
    """(d, features, batch) of the train stage's step."""
    step_l0s: tuple[int | None, ...]
    """L0 of the train step's adapter; None: freshly initialised, dense (as bench/train.py)."""
    step_reps: int
    harvest_tokens: int
    batch_tokens: int

    @property
    def dry_run(self) -> bool:
        """On CPU at toy sizes, whatever devices the machine has."""
        return self.name == "dry-run"


def _grid(widths: tuple[int, ...]) -> tuple[tuple[int, int, int, int], ...]:
    return tuple((3584, width, l0, 4096) for width in widths for l0 in (10, 100, 1))


FULL = Mode("full", cap_s=235,
            budgets={"imports": 30, "fixture": 230, "cuda_tests": 60, "kernels": 60, "train": 25, "harvest": 90},
            kernel_shapes=_grid((8192, 32768)), kernel_reps=3, step=(3584, 8192, 4096), step_l0s=(None, 10),
            step_reps=5, harvest_tokens=16384, batch_tokens=8192)
QUICK = Mode("quick", cap_s=115,
             budgets={"imports": 20, "fixture": 110, "cuda_tests": 30, "kernels": 20, "train": 10, "harvest": 50},
             kernel_shapes=_grid((8192,)), kernel_reps=2, step=(3584, 8192, 4096), step_l0s=(10,),
             step_reps=3, harvest_tokens=4096, batch_tokens=4096)
# CI's 2 cores may be shared: budgets far above the toy sizes' needs, so that only a hang stops a stage
DRY_RUN = Mode("dry-run", cap_s=600,
               budgets={"imports": 120, "fixture": 300, "cuda_tests": 180, "kernels": 90, "train": 90, "harvest": 180},
               kernel_shapes=((64, 256, 4, 128),), kernel_reps=1, step=(64, 256, 128), step_l0s=(None, 4),
               step_reps=2, harvest_tokens=1024, batch_tokens=512)
MODES = {m.name: m for m in (FULL, QUICK, DRY_RUN)}

DRY_RUN_TESTS = "matches_twin or batch_of_one"
"""The dry run's kernel tests (-k): each Triton kernel against its twin, and the whole adapter on
both paths against dense autograd, at the smallest sizes; seconds in the interpreter."""


def needs(stage: str, mode: Mode) -> tuple[str, ...]:
    """Packages a stage imports beyond tca's core dependencies (tca.kernels imports triton;
    transformers loads a model onto a GPU through accelerate's device map)."""
    if stage == "cuda_tests":
        return ("pytest", "triton")
    if stage in ("kernels", "train"):
        return ("triton",)
    if stage == "harvest" and not mode.dry_run:
        return ("accelerate",)
    return ()


def missing(packages: tuple[str, ...]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- the parent: starts each stage's process, enforces budgets, writes the JSON ------------------


@dataclass
class Running:
    """A stage's process; a timer kills its process group when its budget runs out."""

    name: str
    proc: subprocess.Popen
    started: float
    budget_s: float
    figures: Path
    log: Path
    timer: threading.Timer
    killed: threading.Event = field(default_factory=threading.Event)


def start(name: str, argv: list[str], budget_s: float, work: Path, env: dict | None = None) -> Running:
    figures, log = work / f"{name}.jsonl", work / f"{name}.log"
    figures.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv + ["--emit", str(figures)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    killed = threading.Event()

    def kill():
        killed.set()
        _kill(proc)

    timer = threading.Timer(budget_s, kill)
    timer.daemon = True
    timer.start()
    return Running(name, proc, time.perf_counter(), budget_s, figures, log, timer, killed)


def _kill(proc: subprocess.Popen) -> None:
    # the whole group: pytest and harvest writer threads aside, a stage may have children of its own
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)


def finish(run: Running) -> dict:
    """Wait for a stage (its timer bounds the wait) and make its record: its own wall and CPU
    seconds as it reported them (a stage that was stopped has only the parent's clock)."""
    code = run.proc.wait()
    run.timer.cancel()
    figures = read_figures(run.figures)
    timing = next((f.pop("_stage") for f in figures if "_stage" in f), None)
    errors = [f.pop("error") for f in figures if "error" in f]
    record = {"status": "ok", "seconds": round(time.perf_counter() - run.started, 1), "cpu_s": None,
              "budget_s": run.budget_s, "figures": [f for f in figures if f]}
    if timing is not None:  # it finished, whatever happened to the process after that
        record |= timing
        if errors:
            record |= {"status": "failed", "reason": errors[0]}
    elif run.killed.is_set():
        record |= {"status": "stopped", "reason": f"budget: stopped after its {run.budget_s:.0f} s"}
    else:
        record |= {"status": "failed", "reason": f"exited with status {code} before it finished"}
    if record["status"] != "ok":
        record["log_tail"] = run.log.read_text(errors="replace").splitlines()[-30:]
    return record


def read_figures(path: Path) -> list[dict]:
    """The JSON lines a stage wrote; a line cut off when the stage was killed is left out."""
    figures = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            figures.append(json.loads(line))
    return figures


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "seconds": 0.0, "figures": []}


class Check:
    def __init__(self, mode: Mode, out: Path, work: Path, fixture: Path, cap_s: float):
        self.mode, self.out, self.work, self.fixture = mode, out, work, fixture
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + cap_s
        self.report = {
            "check": "tca gpu-check", "mode": mode.name, "cap_s": cap_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": None,
            "device": None, "python": platform.python_version(), "torch": version_of("torch"),
            "triton": version_of("triton"), "cuda": None, "tca": version_of("tca"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "stages": {name: skipped("not reached") for name in STAGES},
        }
        self.running: list[Running] = []

    def child(self, stage: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--mode", self.mode.name,
                "--work", str(self.work), "--fixture", str(self.fixture)]

    def budget(self, stage: str) -> float:
        return min(self.mode.budgets[stage], self.deadline - FINISH_S - time.perf_counter())

    def launch(self, stage: str, env: dict | None = None) -> Running | None:
        """Start a stage, or record why it does not start."""
        absent = missing(needs(stage, self.mode))
        budget = self.budget(stage)
        if absent:
            self.record(stage, skipped(f"{', '.join(absent)} not installed"))
        elif budget < min(MIN_START_S, self.mode.budgets[stage]):
            self.record(stage, skipped(f"budget: {max(budget, 0):.0f} s left of the {self.report['cap_s']:.0f} s cap"))
        else:
            run = start(stage, self.child(stage) + ["--budget", f"{budget:.1f}"], budget, self.work, env)
            self.running.append(run)
            return run
        return None

    def record(self, stage: str, record: dict) -> None:
        self.report["stages"][stage] = record
        line = {"stage": stage, "status": record["status"], "seconds": record["seconds"]}
        if "reason" in record:
            line["reason"] = record["reason"]
        print(json.dumps(line), flush=True)
        self.write()

    def settle(self, run: Running) -> dict:
        record = finish(run)
        self.running.remove(run)
        self.record(run.name, record)
        return record

    def write(self) -> None:
        """The JSON after every stage: a run cut short still leaves what it measured."""
        from tca.outputs import atomic_file

        self.report["seconds"] = round(time.perf_counter() - self.t0, 1)
        with atomic_file(self.out) as tmp:
            tmp.write_text(json.dumps(self.report, indent=1) + "\n")

    def run(self) -> int:
        absent = missing(needs("harvest", self.mode))
        if absent:  # the fixture serves the harvest only
            self.record("fixture", skipped(f"the harvest needs {', '.join(absent)}, not installed"))
            fixture = None
        else:
            fixture = self.launch("fixture", self.fixture_env())
        imports = self.launch("imports")
        if imports is not None:
            record = self.settle(imports)
            env = next((f["env"] for f in record["figures"] if "env" in f), {})
            self.report |= {k: env[k] for k in ("device", "cuda", "torch", "triton") if k in env}
            # an imports stage that died before saying leaves the question to the stages
            if not self.mode.dry_run and env.get("cuda_available") is False:
                return self.refuse(fixture, "no CUDA device is available here; on CPU run it with --dry-run")
        for stage in ("cuda_tests", "kernels", "train"):
            run = self.launch(stage)
            if run is not None:
                self.settle(run)
        self.harvest(fixture)
        self.report["seconds"] = round(time.perf_counter() - self.t0, 1)
        self.write()
        failed = [name for name, r in self.report["stages"].items() if r["status"] == "failed"]
        print(json.dumps({"out": str(self.out), "seconds": self.report["seconds"], "failed": failed}), flush=True)
        return 1 if failed else 0

    def fixture_env(self) -> dict | None:
        """The fixture builds beside the GPU stages: unless told otherwise, it leaves two cores to
        the process timing the GPU, whose launches would otherwise wait for a core."""
        if "OMP_NUM_THREADS" in os.environ:
            return None
        return os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) - 2))}

    def harvest(self, fixture: Running | None) -> None:
        if fixture is None:
            reason = self.report["stages"]["fixture"]["reason"]
            self.record("harvest", skipped(f"no fixture ({reason})"))
            return
        waited = time.perf_counter()
        budget = self.budget("harvest")
        try:
            fixture.proc.wait(timeout=max(budget - MIN_START_S, 0))
        except subprocess.TimeoutExpired:
            self.record("harvest", skipped(f"budget: the fixture was still being built after {budget:.0f} s"))
            return
        if self.settle(fixture)["status"] != "ok":
            self.record("harvest", skipped("no fixture (its build failed or ran out of time)"))
            return
        run = self.launch("harvest")
        if run is not None:
            record = self.settle(run)
            record["waited_for_fixture_s"] = round(run.started - waited, 1)
            self.write()

    def refuse(self, fixture: Running | None, sentence: str) -> int:
        if fixture is not None:
            _kill(fixture.proc)
            fixture.proc.wait()
            self.running.remove(fixture)
        for stage, record in self.report["stages"].items():
            if stage == "fixture" or record.get("reason") == "not reached":
                self.report["stages"][stage] = skipped(sentence)
        self.write()
        print(f"gpu_check: {sentence}.", file=sys.stderr)
        return 1

    def stop_all(self) -> None:
        for run in list(self.running):
            _kill(run.proc)
            self.settle(run)


# ---- the stages, each run in its own process ------------------------------------------------------


@dataclass
class Context:
    mode: Mode
    work: Path
    fixture: Path
    budget_s: float
    started: float
    emit_to: Path

    @property
    def device(self):
        import torch

        return torch.device("cpu" if self.mode.dry_run else "cuda")

    def emit(self, **fields) -> None:
        """One figure: appended at once, so a stage stopped for its budget keeps what it measured."""
        with open(self.emit_to, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


@functools.cache
def bench_module(name: str):
    """bench/<name>.py, loaded by path: bench/ is no package, and a plain ``import kernels`` run
    from the repository root finds tca's own kernels/ folder instead."""
    spec = importlib.util.spec_from_file_location(f"tca_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while it executes
    spec.loader.exec_module(module)
    return module


def environment() -> dict:
    import torch

    import tca

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version_of("triton"),
            "cuda": torch.version.cuda, "cuda_available": cuda, "tca": tca.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def stage_imports(ctx: Context) -> None:
    """Import every module of the package, walking it as it imports; a failure is recorded, not raised."""
    import pkgutil

    import tca

    names, failed = [], {}

    def walk(path, prefix: str) -> None:
        for info in pkgutil.iter_modules(path, prefix):
            names.append(info.name)
            try:
                module = importlib.import_module(info.name)
            except Exception as exc:  # whatever a module raises is the finding
                failed[info.name] = f"{type(exc).__name__}: {exc}"
                continue
            if info.ispkg:
                walk(module.__path__, info.name + ".")

    walk(tca.__path__, "tca.")
    env = environment()
    if ctx.mode.dry_run:
        env["device"] = "cpu"  # where the dry run's stages run, whatever the machine has
    ctx.emit(env=env)
    ctx.emit(figure="imports", modules=len(names), imported=len(names) - len(failed), failed=failed)
    if failed:
        first = next(iter(failed.items()))
        raise StageFailed(f"{len(failed)} of {len(names)} modules did not import, e.g. {first[0]} ({first[1]})")


def fixture_shape(mode: Mode):
    """Qwen2.5-7B's shapes with 2 layers; the dry run's toy pair keeps its form (bf16, sharded)."""
    import dataclasses

    from tca.toy.pairs import QWEN2_7B, PairShape

    if mode.dry_run:
        return PairShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, dtype="bfloat16", shards=2)
    return dataclasses.replace(QWEN2_7B, layers=2)


def stage_fixture(ctx: Context) -> None:
    from tca.outputs import atomic_dir
    from tca.toy.pairs import build_random_pair
    from tca.toy.tiny import tiny_tokenizer

    shape = fixture_shape(ctx.mode)
    config = ctx.fixture / "target" / "config.json"
    if config.exists():
        found = json.loads(config.read_text())
        want = {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
                "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
                "num_key_value_heads": shape.kv_heads}
        wrong = {k: found.get(k) for k, v in want.items() if found.get(k) != v}
        if wrong:
            raise StageFailed(f"--fixture {ctx.fixture} holds a pair of another shape ({wrong}); "
                              "pass another folder or remove it")
        ctx.emit(figure="fixture", reused=True, path=str(ctx.fixture), shape=vars(shape))
        return
    if ctx.fixture.exists() and any(ctx.fixture.iterdir()):
        raise StageFailed(f"--fixture {ctx.fixture} holds files but no pair; pass an empty or new folder")
    t0 = time.perf_counter()
    with atomic_dir(ctx.fixture) as tmp:  # a build cut short is never taken for a pair next time
        build_random_pair(tmp, shape, tiny_tokenizer())
    size = sum(f.stat().st_size for f in ctx.fixture.rglob("*") if f.is_file())
    ctx.emit(figure="fixture", reused=False, path=str(ctx.fixture), shape=vars(shape),
             build_s=round(time.perf_counter() - t0, 1), GB=round(size / 1e9, 2))


class _Tally:
    """pytest plugin: outcomes and the ids of what failed."""

    def __init__(self):
        self.counts, self.failures = Counter(), []

    def pytest_collectreport(self, report):
        if report.failed:
            self.counts["errors"] += 1
            self.failures.append(report.nodeid)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.counts["failed" if report.when == "call" else "errors"] += 1
            self.failures.append(report.nodeid)
        elif report.skipped:
            self.counts["skipped"] += 1
        elif report.when == "call":
            self.counts["passed"] += 1


def stage_cuda_tests(ctx: Context) -> None:
    import pytest

    # the files that mark tests cuda; the dry run takes their CPU tests of the kernels instead
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    selection = ["-m", "not cuda and not slow", "-k", DRY_RUN_TESTS] if ctx.mode.dry_run else ["-m", "cuda"]
    tally = _Tally()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *selection, *files], plugins=[tally])
    ctx.emit(figure="pytest", files=files, selection=" ".join(selection), exit_code=int(code),
             **{k: tally.counts[k] for k in ("passed", "failed", "errors", "skipped")}, failures=tally.failures[:20])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        raise StageFailed(f"pytest {' '.join(selection)} selected no tests in {files}")
    if code != pytest.ExitCode.OK:
        raise StageFailed(f"pytest exited with {code.name}: {len(tally.failures)} failing, e.g. "
                          f"{tally.failures[:1] or ['(no test id)']}")


def stage_kernels(ctx: Context) -> None:
    import torch

    kb = bench_module("kernels")
    torch.manual_seed(0)
    last = 0.0
    for d, features, l0, batch in ctx.mode.kernel_shapes:
        shape = kb.Shape(d=d, features=features, l0=l0, batch=batch)
        if last > ctx.left():  # the next shape would likely not finish: say so rather than be cut off
            ctx.emit(figure="kernel_step", skipped="budget", **vars(shape))
            continue
        t0 = time.perf_counter()
        for row in kb.bench_shape(shape, ctx.device, ctx.mode.kernel_reps):
            ctx.emit(figure="kernel_step", **row)
        last = time.perf_counter() - t0


def stage_train(ctx: Context) -> None:
    d, features, batch = ctx.mode.step
    for l0 in ctx.mode.step_l0s:
        ctx.emit(figure="train_step", **bench_module("train").step_ratio(d, features, batch, ctx.mode.step_reps, l0,
                                                                         ctx.device))


def stage_harvest(ctx: Context) -> None:
    from tca.cache.harvest import HarvestConfig
    from tca.cache.plan import PlanConfig
    from tca.toy.tiny import tiny_conversations, write_jsonl

    tokens = ctx.mode.harvest_tokens
    # the toy traces run to about 45 tokens each
    data = write_jsonl(tiny_conversations(tokens // 30), ctx.work / "harvest-data.jsonl")
    out = ctx.work / "harvest-store"
    shutil.rmtree(out, ignore_errors=True)
    cfg = HarvestConfig(base=str(ctx.fixture / "base"), target=str(ctx.fixture / "target"), out=str(out),
                        plan=PlanConfig(data=str(data), max_tokens=tokens, seq_len=512),
                        batch_tokens=ctx.mode.batch_tokens, device=ctx.device.type)
    ctx.emit(figure="harvest_overhead", **bench_module("harvest").harvest_ratio(cfg, ctx.device))


class StageFailed(Exception):
    """A stage's finding that fails the check, in one sentence."""


STAGE_FUNCTIONS = {"imports": stage_imports, "fixture": stage_fixture, "cuda_tests": stage_cuda_tests,
                   "kernels": stage_kernels, "train": stage_train, "harvest": stage_harvest}


def run_stage(args) -> int:
    ctx = Context(MODES[args.mode], args.work, args.fixture, args.budget, time.perf_counter(), args.emit)
    try:
        STAGE_FUNCTIONS[args.stage](ctx)
    except StageFailed as exc:
        ctx.emit(error=str(exc))
        return 1
    except Exception as exc:  # any error fails this stage only: the check goes on to the next
        traceback.print_exc()
        ctx.emit(error=f"{type(exc).__name__}: {exc}")
        return 1
    finally:
        # CPU seconds beside wall seconds: on a loaded machine the wall clock says little
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
        ctx.emit(_stage={"seconds": round(time.perf_counter() - ctx.started, 1), "cpu_s": round(cpu, 1)})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Stages and budgets: see the top of bench/gpu_check.py.")
    p.add_argument("--quick", action="store_true", help="Fewer shapes and tokens: under 2 minutes.")
    p.add_argument("--dry-run", action="store_true", help="Every stage at toy size on CPU (CI).")
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="The JSON file to write.")
    p.add_argument("--cap", type=float, default=None,
                   help="Seconds for the whole check (default: 235; --quick 115; --dry-run 600).")
    p.add_argument("--work", type=Path, default=None,
                   help="Scratch folder (default: a temporary one, removed at the end).")
    p.add_argument("--fixture", type=Path, default=None,
                   help="Folder of the 7B-shaped pair: reused when it holds one, else built there and "
                        "kept (default: in the scratch folder; about 6 GB).")
    # one stage's process, started by the check itself
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=tuple(MODES), help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    p.add_argument("--emit", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return run_stage(args)
    if args.quick and args.dry_run:
        p.error("--quick and --dry-run exclude each other")
    mode = DRY_RUN if args.dry_run else QUICK if args.quick else FULL
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="tca-gpu-check-")) if own_work else args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fixture = (args.fixture or work / "fixture").resolve()
    check = Check(mode, args.out.resolve(), work, fixture, args.cap if args.cap is not None else mode.cap_s)
    try:
        return check.run()
    finally:
        check.stop_all()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    if "--stage" in sys.argv:
        # a stage's result is on disk: tearing down CUDA contexts and thread pools would only
        # spend its budget (or hang on them)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
