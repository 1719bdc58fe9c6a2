"""The index of the demo pair's harvest against brute-force numpy over the store and the exported adapters.

``tca index`` and ``tca export --format transcoder`` run through the CLI on the session's demo
run; every figure is recomputed from the store's ``x`` rows and the exported ``W_enc``/``b_enc``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file
from test_query import _check_examples

from tca.cache.store import Store
from tca.cli import main
from tca.query.sql import query

pytestmark = pytest.mark.slow

LAYER = 2
WORD = "Wait"


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def demo(demo_run, tmp_path_factory) -> dict:
    """The demo run's index, and every activation of LAYER recomputed from the exported weights."""
    root = tmp_path_factory.mktemp("query-demo")
    index, exported = root / "demo.duckdb", root / "transcoder"
    _cli("index", "--store", str(demo_run.store), "--adapters", str(demo_run.adapters), "--out", str(index),
         "--layers", str(LAYER))
    _cli("export", str(demo_run.adapters), "--format", "transcoder", "--out", str(exported))
    w = load_file(str(Path(exported) / f"layer_{LAYER}.safetensors"))
    store = Store.open(str(demo_run.store))
    x = store.read(LAYER, "x", 0, store.n_rows).float().numpy()
    acts = np.maximum(x @ w["W_enc"].T.astype(np.float32) + w["b_enc"].astype(np.float32), 0)
    return {"index": index, "acts": acts, "row_tokens": store.row_tokens(),
            "tokens": store.table("tokens").to_pydict(), "n_rows": store.n_rows}


def _pieces(demo) -> np.ndarray:
    """The trimmed piece of every stored row."""
    return np.char.strip(np.array(demo["tokens"]["piece"])[demo["row_tokens"]])


def _wait_feature(demo) -> int:
    """The feature active on the most stored 'Wait' rows (ties: the lower index)."""
    hits = demo["acts"][_pieces(demo) == WORD] > 0
    assert len(hits), f"the demo store has no {WORD!r} rows"
    return int(np.argmax(hits.sum(0)))


def test_features_match_numpy(demo):
    acts = demo["acts"]
    got = query(demo["index"], f"SELECT * FROM features WHERE layer = {LAYER} ORDER BY feature").to_pylist()
    assert [r["feature"] for r in got] == list(range(acts.shape[1]))
    for row, col in zip(got, acts.T):
        active = col[col > 0]
        assert row["n_active"] == len(active), row["feature"]
        assert row["frequency"] == pytest.approx(len(active) / demo["n_rows"])
        if len(active):
            assert row["max"] == pytest.approx(active.max(), rel=1e-4, abs=1e-5)
            assert row["mean"] == pytest.approx(active.mean(), rel=1e-4, abs=1e-5)
        else:
            assert row["max"] is None
    # the fixture exercises many live features (the log penalty, which does not pay for copies, leaves
    # about half of the 128 unused on this small pair)
    assert sum(r["n_active"] > 0 for r in got) > len(got) // 4


def test_top_examples_of_the_wait_feature(demo):
    feature = _wait_feature(demo)
    col = demo["acts"][:, feature]
    order = np.lexsort((demo["row_tokens"], -col))
    picks = [int(demo["row_tokens"][i]) for i in order if col[i] > 0][:20]
    got = query(demo["index"], f"FROM top_examples({LAYER}, {feature}, 20, 12)").to_pylist()
    assert [r["rank"] for r in got] == list(range(1, len(picks) + 1)) and len(picks) == 20
    _check_examples(got, demo, picks, col, 12)


def test_features_on_wait(demo):
    on = demo["acts"][_pieces(demo) == WORD] > 0
    want = {(LAYER, f, int(n)) for f, n in enumerate(on.sum(0)) if n}
    got = query(demo["index"], f"FROM features_on('{WORD}', layer := {LAYER})").to_pylist()
    assert {(r["layer"], r["feature"], r["n_hits"]) for r in got} == want
    assert all(r["n_tokens"] == len(on) for r in got)
    assert [r["n_hits"] for r in got] == sorted((r["n_hits"] for r in got), reverse=True)


def test_region_profile_of_the_wait_feature(demo):
    feature = _wait_feature(demo)
    col = demo["acts"][:, feature] > 0
    regions = np.array(demo["tokens"]["region"])[demo["row_tokens"]]
    got = {r["region"]: r for r in query(demo["index"], f"FROM region_profile({LAYER}, {feature})").to_pylist()}
    assert {"prompt", "think", "answer"} <= set(got)
    for region, r in got.items():
        inside = regions == region
        assert (r["n_rows"], r["n_active"]) == (inside.sum(), col[inside].sum()), region
        assert r["share"] == pytest.approx(col[inside].sum() / col.sum())
