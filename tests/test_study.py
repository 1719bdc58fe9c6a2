"""The hesitation study on the demo pair, its figures re-derived independently (slow)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DEMO_PAIR

from tca import TcaError
from tca.adapted.batches import token_batches
from tca.adapted.evaluate import mode
from tca.adapted.generation import count_rechecks, generate, questions_of, score
from tca.adapted.intervene import predicted_positions, token_probability
from tca.adapted.splice import FeatureEdit, edits, load_adapted, target_tokenizer
from tca.cache.store import Store
from tca.cli import main
from tca.query.study import split_documents

slow = pytest.mark.slow

VAL = DEMO_PAIR / "data" / "val.jsonl"
PROMPTS, NEW_TOKENS, CONTROLS = 40, 150, 5


@pytest.fixture(scope="module")
def study(demo_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    index = root / "demo.duckdb"
    ok = CliRunner().invoke(main, ["index", "--store", str(demo_run.store), "--adapters", f"demo={demo_run.adapters}",
                                   "--out", str(index)])
    assert ok.exit_code == 0, ok.output
    res = CliRunner().invoke(main, [
        "study", "hesitation", "--adapters", f"demo={demo_run.adapters}", "--base", str(DEMO_PAIR / "base"),
        "--target", str(DEMO_PAIR / "reasoning"), "--data", str(VAL), "--index", str(index), "--out", str(root / "out"),
        "--prompts", str(PROMPTS), "--max-new-tokens", str(NEW_TOKENS), "--max-features", "16",
        "--attribution-tokens", "6000", "--clamp-scales", "0.5,1", "--clamp-at", "onsets", "--support-features", "0",
        "--controls", str(CONTROLS), "--device", "cpu", "--json"])
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


@slow
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


def _within_tolerance(reference: float, edited: float) -> bool:
    """Accuracy within 5 points, in exact fractions (accuracies are ratios of counts)."""
    exact = lambda x: Fraction(x).limit_denominator(10_000)  # noqa: E731
    return exact(edited) >= exact(reference) - Fraction(5, 100)


def _records(docs: list[dict]) -> list[dict]:
    """The records of val.jsonl at the report's lines, read straight from the file."""
    lines = VAL.read_text().splitlines()
    return [json.loads(lines[d["line"] - 1]) for d in docs]


def _brute_interval(n: int, values) -> list[float]:
    """Quantiles over a loop of the documented bootstrap draws (2,000 resamples of ``n`` prompts,
    seed 0): ``values(indices)`` per resample; a resample where the statistic is undefined (a ratio
    over no hesitations) is left out, as documented."""
    idx = np.random.default_rng(0).integers(0, n, size=(2000, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        return list(np.nanquantile([values(i) for i in idx], [0.025, 0.975]))


def _brute_margin(rechecks, hybrid_rechecks, correct, hybrid_correct, target: float) -> float:
    """The documented margin, by a loop over the bootstrap draws: the slack of the added re-checks'
    lower bound above a quarter of the target's (as a share of the target's) and of the accuracy
    change's lower bound above -5 points; the smaller when both are met, else minus what is missing."""
    added = np.array(rechecks, float) - np.array(hybrid_rechecks, float)
    acc = np.array([np.nan if a is None or b is None else a - b for a, b in zip(correct, hybrid_correct, strict=True)])
    added_lo = _brute_interval(len(added), lambda i: added[i].mean())[0]
    acc_lo = _brute_interval(len(acc), lambda i: np.nanmean(acc[i]))[0]
    slack = [(added_lo - 0.25 * target) / target, acc_lo + 0.05]
    if min(slack) >= -1e-9:
        return max(0.0, min(slack))
    return sum(min(0.0, x) for x in slack)


@slow
def test_the_split_is_fixed_by_the_questions(study):
    """Selection and verdict prompts are disjoint halves of val.jsonl ordered by the SHA-256 of
    each question, each part in file order, recomputed here from the file."""
    report = study["report"]
    questions = [json.loads(line)["conversations"][0]["value"] for line in VAL.read_text().splitlines()]
    keys = [hashlib.sha256(q.encode()).hexdigest() for q in questions]
    lower = set(sorted(keys)[: len(keys) // 2])
    selection = [i + 1 for i, k in enumerate(keys) if k in lower]
    verdict = [i + 1 for i, k in enumerate(keys) if k not in lower]
    assert [d["line"] for d in report["verdict_docs"]] == verdict[:PROMPTS]
    assert [d["line"] for d in report["selection_docs"]] == selection[: len(report["selection_docs"])]
    assert len(report["selection_docs"]) >= PROMPTS
    assert {d["key"] for d in report["selection_docs"]}.isdisjoint(d["key"] for d in report["verdict_docs"])
    assert all(d["key"] == keys[d["line"] - 1] for d in report["selection_docs"] + report["verdict_docs"])


@slow
def test_trials_equal_generation_with_the_same_edits(study):
    report = study["report"]
    model = load_adapted(study["run"].adapters, str(DEMO_PAIR / "base"), str(DEMO_PAIR / "reasoning"), device="cpu",
                         keep_target=True)
    tok = target_tokenizer(str(DEMO_PAIR / "reasoning"))
    verdict = _records(report["verdict_docs"])
    selection = _records(report["selection_docs"])[:PROMPTS]

    def run(records, name, feature_edits, banned=None):
        with mode(model, name), edits(model, feature_edits):
            responses = generate(model, tok, questions_of(records), max_new_tokens=NEW_TOKENS, banned=banned)
        each = [score(tok, [r], [x]) for r, x in zip(records, responses, strict=True)]
        texts = [tok.decode(x.ids, skip_special_tokens=False) for x in responses]
        # re-checks written out: a line or sentence that opens with "Wait", then punctuation, a space, a letter
        rechecks = [0 if x.truncated else sum(
            1 for line in text.split("\n")
            for sentence in re.split(r"(?<=[.!?]) ", line)
            if re.match(r"\s*Wait[,.!?:…]* +[A-Za-z]", sentence)) for x, text in zip(responses, texts, strict=True)]
        return score(tok, records, responses), each, rechecks, texts

    mean = {(c["layer"], c["feature"]): c["mean"] for c in report["candidates"]}
    for name in ("target", "hybrid", "adapted"):
        figures, each, _, texts = run(verdict, name, [])
        assert report["baseline_examples"][name] == texts[:3]
        assert figures.__dict__ == report["baseline"][name]
        assert [f.hesitations for f in each] == report["per_prompt"][name]["hesitations"]
        assert [f.accuracy for f in each] == report["per_prompt"][name]["correct"]
    banned, _, _, _ = run(verdict, "target", [], banned=[tok.convert_tokens_to_ids("Wait")])
    assert banned.__dict__ == report["target_banned"] and banned.hesitations == 0
    # the search ran on the selection prompts, the verdict on the verdict prompts
    last = report["necessity"][-1]
    assert run(selection, "adapted", [FeatureEdit(l, [f]) for l, f in last["features"]])[0].__dict__ == last["figures"]
    # the clamp acts after the tokens at which the target predicts "Wait" in the selection traces
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "selection.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _records(report["selection_docs"])))
        sel_batches = token_batches(path, tok, seq_len=1024, max_tokens=6000, batch=8)
    with mode(model, "target"):
        masks = predicted_positions(model, sel_batches, [tok.convert_tokens_to_ids("Wait")])
    predicted = [t for b, m in zip(sel_batches, masks, strict=True) for t in b.input_ids[m].tolist()]
    # an onset holds at least 5% of those positions
    onsets = {t for t in set(predicted) if 100 * predicted.count(t) >= 5 * len(predicted)}
    assert onsets and report["clamp_tokens"] == sorted(onsets)
    onsets = frozenset(onsets)
    sweep = report["clamp_sweep"][0]
    clamps = [FeatureEdit(l, [f], 0.5 * mean[(l, f)], onsets) for l, f in sweep["features"]]
    assert run(selection, "hybrid", clamps)[0].__dict__ == sweep["figures"]
    clamped = report["sufficiency"][0]
    for trial, (_, _, rechecks, texts) in zip(report["clamp_sweep"], [run(selection, "hybrid", [FeatureEdit(
            l, [f], s * mean[(l, f)], onsets) for l, f in sweep["features"]]) for s in (0.5, 1.0)], strict=True):
        assert trial["rechecks"] == pytest.approx(np.mean(rechecks)) and trial["examples"] == texts[:3]
    target, _, rechecks, _ = run(selection, "target", [])
    assert target.__dict__ == report["selection_target"]["figures"]
    reference = np.mean(rechecks)
    assert report["selection_target"]["rechecks"] == pytest.approx(reference)
    hybrid, hybrid_each, hybrid_rechecks, _ = run(selection, "hybrid", [])
    assert hybrid.__dict__ == report["selection_hybrid"]["figures"]
    # each scale's margin above the rules on the selection prompts; the judged scale has the largest
    # (on a tie, the weaker clamp)
    margins = []
    for s in (0.5, 1.0):
        _, each, rechecks, _ = run(selection, "hybrid", [FeatureEdit(l, [f], s * mean[(l, f)], onsets)
                                                        for l, f in sweep["features"]])
        margins.append(_brute_margin(rechecks, hybrid_rechecks, [x.accuracy for x in each],
                                     [x.accuracy for x in hybrid_each], reference))
    assert [t["margin"] for t in report["clamp_sweep"]] == pytest.approx(margins)
    assert report["clamp_scale"] == (1.0 if margins[1] > margins[0] + 1e-12 else 0.5)
    assert report["support_search"] == [] and report["support_features"] == []
    clamps = [FeatureEdit(l, [f], report["clamp_scale"] * mean[(l, f)], onsets) for l, f in clamped["features"]]
    assert run(verdict, "hybrid", clamps)[0].__dict__ == clamped["figures"]
    if report["ablated"] is not None:
        ablations = [FeatureEdit(l, [f]) for l, f in report["ablated"]["features"]]
        assert run(verdict, "adapted", ablations)[0].__dict__ == report["ablated"]["figures"]
        control = report["controls"][0]
        ablations = [FeatureEdit(l, [f]) for l, f in control["features"]]
        assert run(verdict, "adapted", ablations)[0].__dict__ == control["trial"]["figures"]

    # p(words) per trace, summed, is token_probability over the verdict traces
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "verdict.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in verdict))
        batches = token_batches(path, tok, seq_len=1024, max_tokens=None, batch=8)
    word = [tok.convert_tokens_to_ids("Wait")]
    with mode(model, "target"):
        positions = predicted_positions(model, batches, word)
    for name in ("target", "hybrid", "adapted"):
        with mode(model, name):
            p = token_probability(model, batches, word, positions)
        assert report["baseline_p_words"][name] == pytest.approx(p, rel=1e-5)
        o = report["per_prompt"][name]
        assert sum(o["word_mass"]) / sum(o["word_positions"]) == pytest.approx(p, rel=1e-5)
        assert sum(o["word_positions"]) == sum(int(m.sum()) for m in positions)

    # the search: each trial ablates the kept set plus the next candidate, kept when accuracy holds
    reference = report["selection_adapted"]["figures"]
    kept: list[list[int]] = []
    current = reference["hesitations"]
    for trial, candidate in zip(report["necessity"], report["candidates"], strict=False):
        assert trial["features"] == kept + [[candidate["layer"], candidate["feature"]]]
        held = _within_tolerance(reference["accuracy"], trial["figures"]["accuracy"])
        assert trial["kept"] == (held and trial["figures"]["hesitations"] <= current)
        if trial["kept"]:
            kept, current = trial["features"], trial["figures"]["hesitations"]
    assert [[f["layer"], f["feature"]] for f in report["hesitation_features"]] == kept
    assert report["fraction_of_features"] == pytest.approx(len(kept) / report["total_features"])
    assert report["total_features"] == 4 * 128


@slow
def test_intervals_and_verdicts_recomputed_from_the_prompts(study):
    """Every interval and rule, recomputed by brute force from the per-prompt outcomes."""
    report = study["report"]
    per = {k: {f: np.array([np.nan if v is None else v for v in vals], dtype=float) for f, vals in o.items()
               if vals is not None} for k, o in report["per_prompt"].items()}
    n = len(report["verdict_docs"])
    z = 1.959963984540054
    for key, figures in report["conditions"].items():
        o = per[key]
        assert figures["hesitations"]["value"] == pytest.approx(o["hesitations"].mean())
        assert figures["hesitations"]["ci95"] == pytest.approx(_brute_interval(
            n, lambda i, o=o: o["hesitations"][i].mean()))
        assert figures["mean_length"]["value"] == pytest.approx(o["length"].mean())
        for name, x in (("accuracy", o["correct"][~np.isnan(o["correct"])]), ("hesitating", o["hesitating"])):
            p = x.mean()  # Wilson, written out
            centre, half = p + z * z / (2 * len(x)), z * np.sqrt(p * (1 - p) / len(x) + z * z / (4 * len(x) ** 2))
            assert figures[name]["value"] == pytest.approx(p)
            assert figures[name]["ci95"] == pytest.approx([max((centre - half) / (1 + z * z / len(x)), 0),
                                                           min((centre + half) / (1 + z * z / len(x)), 1)])
        if key != "target_banned":
            assert figures["p_words"]["ci95"] == pytest.approx(_brute_interval(
                n, lambda i, o=o: o["word_mass"][i].sum() / o["word_positions"][i].sum()))
    assert n == PROMPTS
    adapted, hybrid = per["adapted"], per["hybrid"]
    clamped = per["clamped"]
    for o in per.values():  # a re-check is a hesitation word; a cut response counts none
        assert np.all(o["rechecks"] <= o["hesitations"]) and np.all(o["rechecks"][o["truncated"] > 0] == 0)
    # every "Wait" the target writes opens a re-check ("Wait, let me check: …")
    assert np.array_equal(per["target"]["rechecks"], per["target"]["hesitations"])
    added = report["changes"]["clamped_hesitations"]
    finished = clamped["rechecks"] - hybrid["rechecks"]
    assert added["value"] == pytest.approx(finished.mean())
    assert added["ci95"] == pytest.approx(_brute_interval(n, lambda i: finished[i].mean()))
    t = report["thresholds"]
    assert t == {"cut": 0.8, "accuracy_tolerance": 0.05, "control_quantile": 0.95, "sufficient_fraction": 0.25,
                 "frequency_ratio": 1.5, "resamples": 2000}
    target = report["conditions"]["target"]["rechecks"]["value"]
    assert target == pytest.approx(per["target"]["rechecks"].mean())
    if report["ablated"] is None:
        assert not report["necessary"] and not report["sufficient"] and report["controls"] == []
        return
    both = ~np.isnan(clamped["correct"]) & ~np.isnan(hybrid["correct"])
    clamped_acc = report["changes"]["clamped_accuracy_delta"]
    assert clamped_acc["value"] == pytest.approx((clamped["correct"] - hybrid["correct"])[both].mean())
    assert clamped_acc["ci95"] == pytest.approx(_brute_interval(
        n, lambda i: np.nanmean(clamped["correct"][i] - hybrid["correct"][i])))
    control_added = [per[f"clamp control {i}"]["rechecks"].mean() - hybrid["rechecks"].mean()
                     for i in range(1, CONTROLS + 1)]
    assert [c["added"] for c in report["clamp_controls"]] == pytest.approx(control_added)
    assert report["control_spread"]["added"] == pytest.approx({"median": np.median(control_added),
                                                               "p95": np.quantile(control_added, 0.95)})
    rules = {"rechecks": added["ci95"][0] >= 0.25 * target, "accuracy": clamped_acc["ci95"][0] >= -0.05,
             "controls": added["ci95"][0] > np.quantile(control_added, 0.95)}
    assert report["sufficient_rules"] == rules and report["sufficient"] == all(rules.values())
    ablated = per["ablated"]
    cut = report["changes"]["cut"]
    assert cut["value"] == pytest.approx(1 - ablated["hesitations"].sum() / adapted["hesitations"].sum())
    assert cut["ci95"] == pytest.approx(_brute_interval(
        n, lambda i: 1 - ablated["hesitations"][i].sum() / adapted["hesitations"][i].sum()))
    both = ~np.isnan(ablated["correct"]) & ~np.isnan(adapted["correct"])
    acc = report["changes"]["accuracy_delta"]
    assert acc["value"] == pytest.approx((ablated["correct"] - adapted["correct"])[both].mean())
    assert acc["ci95"] == pytest.approx(_brute_interval(
        n, lambda i: np.nanmean(ablated["correct"][i] - adapted["correct"][i])))
    assert report["hesitation_cut"] == cut["value"] and report["accuracy_change"] == acc["value"]
    control_cuts = [1 - per[f"control {i}"]["hesitations"].sum() / adapted["hesitations"].sum()
                    for i in range(1, CONTROLS + 1)]
    assert [c["cut"] for c in report["controls"]] == pytest.approx(control_cuts)
    assert report["control_spread"]["cut"] == pytest.approx({"median": np.median(control_cuts),
                                                             "p95": np.quantile(control_cuts, 0.95)})
    rules = {"cut": cut["ci95"][0] >= 0.8, "accuracy": acc["ci95"][0] >= -0.05,
             "controls": cut["ci95"][0] > np.quantile(control_cuts, 0.95)}
    assert report["necessary_rules"] == rules and report["necessary"] == all(rules.values())


@slow
def test_controls_are_matched_in_frequency_and_never_candidates(study):
    report, index = study["report"], study["index"]
    with duckdb.connect(str(index), read_only=True) as con:
        freq = {(l, f): q for l, f, q in con.execute(
            "SELECT layer, feature, frequency FROM features WHERE adapter = 'demo'").fetchall()}
        ranked = con.execute("SELECT layer, feature FROM attributions WHERE adapter = 'demo' AND token = 'Wait' "
                             "AND score > 0").fetchall()
    passing = {(l, f) for l, f in ranked if _before_wait(study, l, f)[0] >= 0.05}
    assert report["n_passing"] == len(passing)
    chosen = [(f["layer"], f["feature"]) for f in report["hesitation_features"]]
    assert len(report["controls"]) == (CONTROLS if chosen else 0)
    for control in report["controls"]:
        drawn = [tuple(x) for x in control["features"]]
        assert len(set(drawn)) == len(chosen) and not set(drawn) & passing
        for (layer, f), (cl, cf), factor in zip(drawn, chosen, control["factor"], strict=True):
            assert layer == cl and freq[(layer, f)] > 0
            assert 1 / factor <= freq[(layer, f)] / freq[(cl, cf)] <= factor
            if factor > 1.5:  # widened (and recorded) only where nothing lay within the narrower range
                narrower = factor / 1.5
                assert not [x for x, q in freq.items() if x[0] == layer and q > 0 and x not in passing
                            and 1 / narrower <= q / freq[(cl, cf)] <= narrower]
    # without support features, the sufficiency controls replace the hesitation features, clamped alike
    assert len(report["clamp_controls"]) == (CONTROLS if chosen else 0)
    for control in report["clamp_controls"]:
        drawn = [tuple(x) for x in control["features"]]
        assert not set(drawn) & (passing | set(chosen)) and control["trial"]["features"] == control["features"]
        for (layer, f), (cl, cf), factor in zip(drawn, chosen, control["factor"], strict=True):
            assert layer == cl and 1 / factor <= freq[(layer, f)] / freq[(cl, cf)] <= factor


@slow
def test_report_files(study):
    out = study["out"]
    saved = json.loads((out / "study.json").read_text())
    assert saved["adapter"] == "demo"
    for key in ("selection_docs", "verdict_docs", "conditions", "changes", "controls", "necessary", "sufficient",
                "thresholds"):
        assert key in saved
    for figures in saved["conditions"].values():
        assert set(figures) == {"accuracy", "hesitations", "rechecks", "hesitating", "mean_length",
                                "truncated", "p_words"}
        assert all(set(e) == {"value", "ci95"} for e in figures.values())
    assert set(saved["changes"]) == {"cut", "accuracy_delta", "clamped_hesitations", "clamped_accuracy_delta"}
    md = (out / "study.md").read_text()
    assert "## Verdict" in md and "necessity.png" in md
    # the clamped condition's first response, as generated, is in the report to be read
    assert "### What the responses look like" in md
    assert saved["sufficiency"][0]["examples"][0].strip("\n").splitlines()[0] in md
    for png in ("necessity.png", "sufficiency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@slow
def test_clamp_where_the_features_fire_with_support_features_grown_on_the_selection_prompts(study, tmp_path):
    """``--clamp-at fires``: the clamped hybrid is the base MLPs plus, added by a plain forward
    hook, scale × each hesitation feature's own encoder activation × its decoder row, and ×1 for
    each support feature; the support search tries the features of largest |attribution| in order
    and keeps one exactly when the brute-force margin grows."""
    index = tmp_path / "copy.duckdb"
    shutil.copy(study["index"], index)
    prompts, pool = 12, 4
    res = CliRunner().invoke(main, [
        "study", "hesitation", "--adapters", f"demo={study['run'].adapters}", "--base", str(DEMO_PAIR / "base"),
        "--target", str(DEMO_PAIR / "reasoning"), "--data", str(VAL), "--index", str(index), "--out",
        str(tmp_path / "out"), "--prompts", str(prompts), "--max-new-tokens", str(NEW_TOKENS), "--max-features",
        str(pool), "--attribution-tokens", "3000", "--clamp-scales", "1,2", "--clamp-at", "fires",
        "--support-features", "2", "--controls", "2", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["clamp_at"] == "fires" and report["clamp_tokens"] is None
    assert "wherever its encoder fires" in (tmp_path / "out" / "study.md").read_text()
    model = load_adapted(study["run"].adapters, str(DEMO_PAIR / "base"), str(DEMO_PAIR / "reasoning"), device="cpu")
    tok = target_tokenizer(str(DEMO_PAIR / "reasoning"))
    chosen = [(f["layer"], f["feature"]) for f in report["hesitation_features"]]
    assert chosen, "the search found no hesitation feature to clamp"

    def clamped(records, scales: dict[tuple[int, int], float]):
        handles = []
        for (layer, feature), scale in scales.items():
            adapter = model.model.layers[layer].mlp.adapter

            def hook(module, args, out, adapter=adapter, feature=feature, scale=scale):
                acts = adapter.encode(args[0].to(adapter.W_enc.dtype))[..., feature]
                return out + (scale * acts[..., None] * adapter.W_dec[feature]).to(out.dtype)
            handles.append(model.model.layers[layer].mlp.register_forward_hook(hook))
        try:
            with mode(model, "hybrid"):
                responses = generate(model, tok, questions_of(records), max_new_tokens=NEW_TOKENS)
        finally:
            for h in handles:
                h.remove()
        texts = [tok.decode(r.ids, skip_special_tokens=False) for r in responses]
        rechecks = [0 if r.truncated else count_rechecks(t) for r, t in zip(responses, texts, strict=True)]
        return score(tok, records, responses), [score(tok, [x], [r]).accuracy for x, r in
                                                zip(records, responses, strict=True)], rechecks

    support = [tuple(x) for x in report["support_features"]]
    scales = {f: report["clamp_scale"] for f in chosen} | {f: 1.0 for f in support}
    assert clamped(_records(report["verdict_docs"]), scales)[0].__dict__ == report["sufficiency"][0]["figures"]

    selection = _records(report["selection_docs"])[:prompts]
    _, hybrid_correct, hybrid_rechecks = clamped(selection, {})
    target = report["selection_target"]["rechecks"]
    with duckdb.connect(str(index), read_only=True) as con:
        ranked = [tuple(r) for r in con.execute(
            "SELECT layer, feature FROM attributions WHERE adapter = 'demo' AND token = 'Wait' AND score <> 0 "
            "ORDER BY abs(score) DESC, layer, feature").fetchall()]
    pool_order = [f for f in ranked if f not in chosen][:pool]
    kept, current = [], report["clamp_sweep"][0]["margin"]  # the sweep's x1 trial
    assert report["support_search"], "no support candidate was tried"
    for trial, candidate in zip(report["support_search"], pool_order, strict=False):
        assert [tuple(x) for x in trial["features"]] == chosen + kept + [candidate]
        figures, correct, rechecks = clamped(selection, {f: 1.0 for f in chosen + kept + [candidate]})
        assert figures.__dict__ == trial["figures"]
        margin = _brute_margin(rechecks, hybrid_rechecks, correct, hybrid_correct, target)
        assert trial["margin"] == pytest.approx(margin)
        assert trial["kept"] == (margin > current + 1e-12)
        if trial["kept"]:
            kept, current = kept + [candidate], margin
    # the search goes on past the rules while the margin grows: it ends at the cap or the pool's end
    assert len(report["support_search"]) == pool or len(kept) == 2
    # the support set is judged only if some scale with it leaves more margin than any without it
    alone = max(t["margin"] for t in report["clamp_sweep"])
    with_support = max((t["margin"] for t in report["support_sweep"]), default=float("-inf"))
    assert support == (kept if kept and with_support > alone else [])
    judged = report["support_sweep"] if support else report["clamp_sweep"]
    assert report["clamp_scale"] == [1.0, 2.0][max(range(2), key=lambda i: (judged[i]["margin"], -i))]
    # the sufficiency controls replace the support features (or the hesitation features without them)
    for control in report["clamp_controls"]:
        drawn = [tuple(x) for x in control["features"]]
        tried = {tuple(t["features"][-1]) for t in report["support_search"]}
        assert len(drawn) == len(support or chosen) and not set(drawn) & (tried | set(chosen))


@slow
def test_study_refuses_an_adapter_name_the_index_lacks(study, tmp_path):
    index = tmp_path / "copy.duckdb"
    shutil.copy(study["index"], index)
    res = CliRunner().invoke(main, [
        "study", "hesitation", "--adapters", f"other={study['run'].adapters}", "--base", str(DEMO_PAIR / "base"),
        "--target", str(DEMO_PAIR / "reasoning"), "--data", str(VAL), "--index", str(index), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error:") and res.output.count("\n") == 1


# ---- the split, on hand-made files (fast) -------------------------------------------------------


def _conversation(question: str, answer: str = "1", **extra) -> dict:
    return {**extra, "conversations": [{"from": "user", "value": question},
                                       {"from": "assistant", "value": f"<think>\n</think>\n\n{answer}"}]}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_split_is_disjoint_halves_by_question_hash(tmp_path):
    records = [_conversation(f"What is {i}+{i}?", id=f"q{i}") for i in range(11)]
    records.insert(4, {"text": "a document without a question"})
    records.append(_conversation("What is 3+3?", answer="6", id="again"))  # the same question twice
    selection, verdict = split_documents(_write(tmp_path / "a.jsonl", records))
    key = {r["id"]: hashlib.sha256(r["conversations"][0]["value"].encode()).hexdigest()
           for r in records if "id" in r}
    sel_ids, ver_ids = [d.id for d, _ in selection], [d.id for d, _ in verdict]
    # disjoint, every conversation in one part, each part in file order, the text record in neither
    assert not set(sel_ids) & set(ver_ids) and sorted(sel_ids + ver_ids) == sorted(key)
    order = [r["id"] for r in records if "id" in r]
    assert sel_ids == [i for i in order if i in sel_ids] and ver_ids == [i for i in order if i in ver_ids]
    # halves by key, a repeated question on one side only
    assert max(key[i] for i in sel_ids) < min(key[i] for i in ver_ids)
    assert len(sel_ids) in (6, 7) and ("q3" in sel_ids) == ("again" in sel_ids)
    assert all(d.key == key[d.id] for d, _ in selection + verdict)
    assert [d.line for d, _ in selection + verdict if d.id == "q4"] == [6]  # 1-based line, after the text record
    # fixed by the data: shuffling the file moves no conversation to the other part
    shuffled = [records[i] for i in np.random.default_rng(0).permutation(len(records))]
    again = split_documents(_write(tmp_path / "b.jsonl", shuffled))
    assert sorted(d.id for d, _ in again[0]) == sorted(sel_ids)
    assert sorted(d.id for d, _ in again[1]) == sorted(ver_ids)


def test_split_with_a_verdict_file_refuses_shared_questions(tmp_path):
    data = _write(tmp_path / "data.jsonl", [_conversation(f"What is {i}+1?") for i in range(5)])
    judged = _write(tmp_path / "judge.jsonl", [_conversation(f"What is {i}+2?") for i in range(3)])
    selection, verdict = split_documents(data, judged)
    assert [d.line for d, _ in selection] == [1, 2, 3, 4, 5] and [d.line for d, _ in verdict] == [1, 2, 3]
    leaky = _write(tmp_path / "leaky.jsonl", [_conversation("What is 9+2?"), _conversation("What is 2+1?")])
    with pytest.raises(TcaError, match="1 question"):
        split_documents(data, leaky)
    with pytest.raises(TcaError, match="two different questions"):
        split_documents(_write(tmp_path / "one.jsonl", [_conversation("What is 1+1?")] * 3))
