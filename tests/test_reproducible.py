"""Runs repeat: `tca demo --quick` twice at one thread gives byte-identical adapters, index rows
and study.json; at two threads, the same verdicts and the same features (slow).

Each run is its own process. The two one-thread runs go side by side (their timing and the
order of their background reads interleave differently); the two-thread run follows alone, since
two threads on cores that are already busy slow a run many times over.
"""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest
import torch
from conftest import DEMO_PAIR
from safetensors.torch import load_file

# three quick demos: about 3 minutes on 2 idle cores, far more on busy ones
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

RUNS = {"one": 1, "again": 1, "two": 2}
"""Run name -> torch CPU threads."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (DEMO_PAIR / "base").is_dir():
        pytest.skip(f"the demo pair is missing ({DEMO_PAIR})")
    root = tmp_path_factory.mktemp("runs")

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "tca.cli", "demo", "--quick", "--device", "cpu", "--threads", str(RUNS[name]),
             "--out", str(root / name)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    for batch in (["one", "again"], ["two"]):
        procs = {name: start(name) for name in batch}
        try:
            for name, proc in procs.items():
                output, _ = proc.communicate()
                assert proc.returncode == 0, f"{name}: {output[-3000:]}"
        finally:  # a failed or timed-out run takes its sibling down with it
            for proc in procs.values():
                proc.kill()
    for name, threads in RUNS.items():
        assert json.loads((root / name / "summary.json").read_text())["threads"] == threads
    return {name: root / name for name in RUNS}


def _index_rows(run) -> dict[str, list[str]]:
    """Every table's rows, sorted, with the run's folder written as RUN and the time of indexing dropped."""
    con = duckdb.connect(str(run / "index.duckdb"), read_only=True)
    tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
    rows = {}
    for table in tables:
        cursor = con.execute(f'SELECT * FROM "{table}"')
        names = [d[0] for d in cursor.description]
        rows[table] = sorted(
            repr([v for n, v in zip(names, row, strict=True) if n != "indexed_at"]).replace(str(run), "RUN")
            for row in cursor.fetchall())
    con.close()
    return rows


def test_same_seed_and_threads_give_identical_runs(runs):
    one, again = runs["one"], runs["again"]
    for adapters in ("adapters-offline", "adapters"):
        weights = [(run / adapters / "adapters.safetensors").read_bytes() for run in (one, again)]
        assert weights[0] == weights[1], adapters
    rows_one, rows_again = _index_rows(one), _index_rows(again)
    assert set(rows_one) >= {"activations", "features", "tokens", "docs", "attributions", "adapters"}
    assert rows_one == rows_again
    assert len(rows_one["activations"]) > 0 and len(rows_one["attributions"]) == 4 * 128
    assert (one / "study" / "study.json").read_bytes() == (again / "study" / "study.json").read_bytes()
    evaluation = [json.loads((run / "eval.json").read_text()) for run in (one, again)]
    for e, run in zip(evaluation, (one, again), strict=True):
        assert e.pop("adapters") == str(run / "adapters")
    assert evaluation[0] == evaluation[1]


def _decoders(run) -> dict[int, torch.Tensor]:
    tensors = load_file(str(run / "adapters" / "adapters.safetensors"))
    return {int(k.split(".")[1]): v.double() for k, v in tensors.items() if k.endswith(".W_dec")}


def test_thread_counts_agree_on_verdicts_and_features(runs):
    studies = {name: json.loads((runs[name] / "study" / "study.json").read_text()) for name in ("one", "two")}
    for key in ("necessary", "necessary_rules", "sufficient", "search_met_cut"):
        assert studies["one"][key] == studies["two"][key], key
    chosen = {name: [(f["layer"], f["feature"]) for f in s["hesitation_features"]] for name, s in studies.items()}
    assert chosen["one"], "the study chose no hesitation feature"
    dec = {name: _decoders(runs[name]) for name in ("one", "two")}

    def matched(a: str, b: str) -> bool:
        """Each of a's hesitation features has a hesitation feature of b in its layer with decoder cosine >= 0.9."""
        return all(
            any(lb == layer and torch.nn.functional.cosine_similarity(dec[a][layer][f], dec[b][lb][g], dim=0) >= 0.9
                for lb, g in chosen[b])
            for layer, f in chosen[a])

    assert matched("one", "two") and matched("two", "one"), chosen
