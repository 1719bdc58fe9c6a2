"""`tca demo --quick --seeds 2` end to end on the shipped pair: one harvest, every stage per seed,
each seed's files in its folder, and the stability table read back against the files; a seed
run alone with --first-seed repeats it (slow).
The single-seed layout is what tests/test_reproducible.py runs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_PAIR
from safetensors.torch import load_file

from tca.cache.store import Store
from tca.cli import main
from tca.query.sql import query
from tca.train.checkpoint import load_adapters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    if not (DEMO_PAIR / "base").is_dir():
        pytest.skip(f"the demo pair is missing ({DEMO_PAIR})")
    out = tmp_path_factory.mktemp("demo") / "demo"
    res = CliRunner().invoke(main, ["demo", "--quick", "--seeds", "2", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return out, res


def test_quick_demo_runs_every_stage_for_each_seed(two_seeds):
    out, res = two_seeds
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["seconds"]) == ["harvest", "train", "refine", "index", "eval", "study"]
    # harvested once, into the shared store; nothing of a single run's layout at the top
    assert Store.open(str(out / "store")).n_rows == 12_000
    assert sorted(p.name for p in out.iterdir()) == ["seed-0", "seed-1", "stability.md", "store", "summary.json"]
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]
    for record in summary["seeds"]:
        seed, folder = record["seed"], out / f"seed-{record['seed']}"
        refined = load_adapters(folder / "adapters")
        assert refined.layers == [0, 1, 2, 3] and refined.config.n_features == 128
        # the seed reached training and refinement
        assert refined.extra["train"]["seed"] == seed and refined.extra["refine"]["seed"] == seed
        assert query(folder / "index.duckdb", "SELECT count(*) AS n FROM attributions")["n"][0].as_py() == 4 * 128
        study = json.loads((folder / "study" / "study.json").read_text())
        assert record["features"] == [[f["layer"], f["feature"]] for f in study["hesitation_features"]]
        assert (record["necessary"], record["sufficient"]) == (study["necessary"], study["sufficient"])
        assert record["cut"] == study["changes"]["cut"]
        evaluation = json.loads((folder / "eval.json").read_text())
        assert record["kl_closed"] == evaluation["faithfulness"]["fraction_closed"]
    assert json.loads((out / "seed-0" / "eval.json").read_text()) == summary["eval"]
    offline = [(out / f"seed-{s}" / "adapters-offline" / "adapters.safetensors").read_bytes() for s in (0, 1)]
    assert offline[0] != offline[1]

    # a direction recurs exactly when the two seeds chose features whose decoder rows have cosine >= 0.9
    dec = {s: load_file(str(out / f"seed-{s}" / "adapters" / "adapters.safetensors")) for s in (0, 1)}
    chosen = {r["seed"]: r["features"] for r in summary["seeds"]}
    pairs = {((0, layer, f), (1, m, g)) for layer, f in chosen[0] for m, g in chosen[1] if m == layer and
             torch.nn.functional.cosine_similarity(dec[0][f"layers.{layer}.W_dec"][f].double(),
                                                   dec[1][f"layers.{m}.W_dec"][g].double(), dim=0) >= 0.9}
    for d in summary["stability"]:
        members = {(s, d["layer"], f) for s, f in d["members"]}
        assert (d["chosen_in"] == 2) == any(a in members and b in members for a, b in pairs)
    assert sorted((s, layer, f) for d in summary["stability"] for s, f in d["members"] for layer in [d["layer"]]) == \
        sorted((s, layer, f) for s in (0, 1) for layer, f in chosen[s])
    support = {r["seed"]: r["support"] for r in summary["seeds"]}
    assert all(record["support"] == study["support_features"] for record, study in zip(
        summary["seeds"], [json.loads((out / f"seed-{s}" / "study" / "study.json").read_text()) for s in (0, 1)],
        strict=True))
    assert sorted((s, d["layer"], f) for d in summary["support_stability"] for s, f in d["members"]) == \
        sorted((s, layer, f) for s in (0, 1) for layer, f in support[s])

    # the last screen is the stability table, with the seeds' rows and where everything is
    table = (out / "stability.md").read_text()
    assert table in res.stdout
    rows = [line for line in table.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and "tca demo --quick --seeds 2 --device cpu" in table
    assert str(out / "seed-1") in res.stdout


def test_a_seed_run_alone_from_first_seed_repeats_it_byte_for_byte(two_seeds, tmp_path):
    """``--first-seed 1`` alone gives what seed 1 gave beside seed 0: a seed's run does not depend on
    the seeds run with it, so fresh seeds can be run without repeating the ones before them."""
    out, _ = two_seeds
    alone = tmp_path / "alone"
    res = CliRunner().invoke(main, ["demo", "--quick", "--first-seed", "1", "--out", str(alone), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((alone / "summary.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [1]
    for adapters in ("adapters-offline", "adapters"):
        assert (alone / adapters / "adapters.safetensors").read_bytes() == \
            (out / "seed-1" / adapters / "adapters.safetensors").read_bytes(), adapters
    assert (alone / "study" / "study.json").read_bytes() == (out / "seed-1" / "study" / "study.json").read_bytes()
    assert "tca demo --quick --first-seed 1 --device cpu" in (alone / "stability.md").read_text()


def test_demo_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (tmp_path / "keep.txt").read_text() == "mine"
