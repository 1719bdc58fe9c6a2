"""`tca demo --quick` end to end on the shipped pair: every stage runs and leaves its files (slow)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import DEMO_PAIR

from tca.cache.store import Store
from tca.cli import main
from tca.query.sql import query
from tca.train.checkpoint import load_adapters

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage(tmp_path):
    if not (DEMO_PAIR / "base").is_dir():
        pytest.skip(f"the demo pair is missing ({DEMO_PAIR})")
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["seconds"]) == ["harvest", "train", "refine", "index", "eval", "study"]
    assert Store.open(str(out / "store")).n_rows == 12_000
    refined = load_adapters(out / "adapters")
    assert refined.layers == [0, 1, 2, 3] and refined.config.n_features == 128
    assert query(out / "index.duckdb", "SELECT count(*) AS n FROM attributions")["n"][0].as_py() == 4 * 128
    assert json.loads((out / "eval.json").read_text()) == summary["eval"]
    assert (out / "study" / "study.md").exists()
    # the last screen names the figures and where they are
    for text in ("gap closed", "hesitation", str(out / "study" / "study.md")):
        assert text in res.stdout


def test_demo_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
