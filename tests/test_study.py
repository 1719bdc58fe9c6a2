"""The hesitation study on the demo pair, its figures re-derived independently (slow)."""

from __future__ import annotations

import json
import shutil

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO_PAIR

from tca.adapted.evaluate import mode, prompt_records
from tca.adapted.generation import generate, questions_of, score
from tca.adapted.splice import FeatureEdit, edits, load_adapted
from tca.cache.store import Store
from tca.cli import main

pytestmark = pytest.mark.slow

VAL = DEMO_PAIR / "data" / "val.jsonl"
PROMPTS, NEW_TOKENS = 40, 150


@pytest.fixture(scope="module")
def study(demo_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    index = root / "demo.duckdb"
    ok = CliRunner().invoke(main, ["index", "--cache", str(demo_run.store), "--adapters", f"demo={demo_run.adapters}",
                                   "--out", str(index)])
    assert ok.exit_code == 0, ok.output
    res = CliRunner().invoke(main, [
        "study", "hesitation", "--adapters", f"demo={demo_run.adapters}", "--base", str(DEMO_PAIR / "base"),
        "--target", str(DEMO_PAIR / "reasoning"), "--data", str(VAL), "--index", str(index), "--out", str(root / "out"),
        "--prompts", str(PROMPTS), "--max-new-tokens", str(NEW_TOKENS), "--max-features", "16",
        "--attribution-tokens", "6000", "--clamp-scales", "0.5,1", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    return {"report": json.loads(res.stdout), "index": index, "out": root / "out", "run": demo_run}


def _before_wait(study, layer: int, feature: int) -> tuple[float, int]:
    """Share of a feature's indexed activations that sit just before a 'Wait' token, by numpy
    over the store's token table, and how many activations it has."""
    with duckdb.connect(str(study["index"]), read_only=True) as con:
        tokens = con.execute("SELECT token FROM activations WHERE adapter = 'demo' AND layer = ? AND feature = ?",
                             [layer, feature]).fetchnumpy()["token"]
    pieces = np.array(Store.open(str(study["run"].store)).table("tokens").column("piece").to_pylist(), dtype=object)
    following = pieces[np.minimum(tokens + 1, len(pieces) - 1)]
    return (float(np.mean([p.strip() == "Wait" for p in following])) if len(tokens) else 0.0), len(tokens)


def test_candidates_are_the_attribution_ranking_filtered_by_the_index(study):
    """Positive attribution, best first, keeping features that fire before 'Wait' at least 5% of the time."""
    report, index = study["report"], study["index"]
    with duckdb.connect(str(index), read_only=True) as con:
        ranked = con.execute("SELECT layer, feature FROM attributions WHERE adapter = 'demo' AND token = 'Wait' "
                             "AND score > 0 ORDER BY score DESC, layer, feature").fetchall()
        means = dict(((l, f), m) for l, f, m in con.execute("SELECT layer, feature, mean FROM features WHERE adapter = 'demo'").fetchall())
    expected = [(l, f) for l, f in ranked if _before_wait(study, l, f)[0] >= 0.05][:16]
    got = [(c["layer"], c["feature"]) for c in report["candidates"]]
    assert got == expected and len(got) > 0
    assert all(c["mean"] == pytest.approx(means[(c["layer"], c["feature"])]) for c in report["candidates"])
    for c in report["candidates"][:3]:
        share, n = _before_wait(study, c["layer"], c["feature"])
        assert c["before_word"] == pytest.approx(share) and c["n_active"] == n


def test_trials_equal_generation_with_the_same_edits(study):
    report = study["report"]
    model = load_adapted(study["run"].adapters, str(DEMO_PAIR / "base"), str(DEMO_PAIR / "reasoning"), device="cpu",
                         keep_target=True)
    from tca.adapted.splice import target_tokenizer

    tok = target_tokenizer(str(DEMO_PAIR / "reasoning"))
    records = prompt_records(VAL, PROMPTS)
    questions = questions_of(records)

    def figures(name, feature_edits, banned=None):
        with mode(model, name), edits(model, feature_edits):
            return score(tok, records, generate(model, tok, questions, max_new_tokens=NEW_TOKENS, banned=banned))

    for name in ("target", "hybrid", "adapted"):
        assert figures(name, []).__dict__ == report["baseline"][name]
    banned = figures("target", [], banned=[tok.convert_tokens_to_ids("Wait")])
    assert banned.__dict__ == report["target_banned"] and banned.hesitations == 0
    last = report["necessity"][-1]
    assert figures("adapted", [FeatureEdit(l, [f]) for l, f in last["features"]]).__dict__ == last["figures"]
    clamp = report["sufficiency"][0]
    mean = {(c["layer"], c["feature"]): c["mean"] for c in report["candidates"]}
    clamps = [FeatureEdit(l, [f], 0.5 * mean[(l, f)]) for l, f in clamp["features"]]
    assert figures("hybrid", clamps).__dict__ == clamp["figures"]
    # the verdict's arithmetic
    # the search: each trial ablates the kept set plus the next candidate, kept when accuracy holds
    adapted = report["baseline"]["adapted"]
    kept: list[list[int]] = []
    current = adapted["hesitations"]
    for trial, candidate in zip(report["necessity"], report["candidates"], strict=False):
        assert trial["features"] == kept + [[candidate["layer"], candidate["feature"]]]
        held = trial["figures"]["accuracy"] >= adapted["accuracy"] - 0.05
        assert trial["kept"] == (held and trial["figures"]["hesitations"] <= current)
        if trial["kept"]:
            kept, current = trial["features"], trial["figures"]["hesitations"]
    assert [[f["layer"], f["feature"]] for f in report["hesitation_features"]] == kept
    best = [t for t in report["necessity"] if t["kept"]]
    if best:
        cut = 1 - best[-1]["figures"]["hesitations"] / adapted["hesitations"]
        assert report["hesitation_cut"] == pytest.approx(cut)
        assert report["necessary"] == (cut >= 0.8)
        assert report["fraction_of_features"] == pytest.approx(len(kept) / report["total_features"])
        control = report["control"]
        assert control["n_features"] == len(kept)
        assert not {tuple(x) for x in control["features"]} & {tuple(x) for x in kept}
        hybrid, target = report["baseline"]["hybrid"], report["baseline"]["target"]
        added = max(t["figures"]["hesitations"] for t in report["sufficiency"]) - hybrid["hesitations"]
        assert report["sufficient"] == (added >= 0.25 * target["hesitations"])
    else:
        assert not report["necessary"] and not report["sufficient"] and report["control"] is None
    assert report["total_features"] == 4 * 128


def test_report_files(study):
    out = study["out"]
    assert json.loads((out / "study.json").read_text())["adapter"] == "demo"
    md = (out / "study.md").read_text()
    assert "## Verdict" in md and "necessity.png" in md
    for png in ("necessity.png", "sufficiency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_study_refuses_an_adapter_name_the_index_lacks(study, tmp_path):
    index = tmp_path / "copy.duckdb"
    shutil.copy(study["index"], index)
    res = CliRunner().invoke(main, [
        "study", "hesitation", "--adapters", f"other={study['run'].adapters}", "--base", str(DEMO_PAIR / "base"),
        "--target", str(DEMO_PAIR / "reasoning"), "--data", str(VAL), "--index", str(index), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error:") and res.output.count("\n") == 1
