"""The LLM-free census against a planted index: features whose firing rule is known by construction,
indexed through the real path, checked against the same figures recomputed in plain Python."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_PAIR

from tca import TcaError
from tca.cache.store import Store, StoreSpec
from tca.cli import main
from tca.query import census
from tca.query.census import CensusConfig, run_census
from tca.query.index import adapter_layers, index_adapters
from tca.query.sql import connect, run_sql
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, save_adapters

D, F, LAYER = 16, 8, 1
DIGITS = [str(i) for i in range(10)]

PLANTED = {
    0: "before_wait",   # the token just before "Wait"
    1: "digit",         # every digit, wherever it is
    2: "think_newline", # a line break inside <think> (line breaks occur in every region)
    3: "answer_newline",  # a line break in the answer
    4: "on_wait",       # "Wait" itself
    5: "rare",          # three tokens: too few to classify
    6: "dead",
    7: "equals",        # "=", which only ever occurs inside <think>
}
EXPECTED_KIND = {0: "hesitation", 1: "other", 2: "think", 3: "answer", 4: "hesitation", 5: None, 6: None, 7: "other"}


def planted_docs(n_docs: int = 40, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Documents as (piece, region) lists: a question with digits, a thinking span of sums with the
    odd "Wait, let me check", an answer; line breaks in all three regions."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        terms = [str(d) for d in rng.integers(0, 10, int(rng.integers(3, 6)))]
        doc = [(p, "prompt") for p in ["<|User|>", "What", " is", " the", " sum", " of", "\n"]]
        doc += [(p, "prompt") for t in terms for p in (t, "+")][:-1] + [("?", "prompt"), ("\n", "prompt")]
        doc += [("<think>", "think"), ("\n", "think")]
        total = 0
        for t in terms:
            total += int(t)
            doc += [(p, "think") for p in [t, "=", *str(total)]]
            if rng.random() < 0.4:  # mid-line, so no line break comes just before "Wait"
                doc += [(p, "think") for p in [".", "Wait", ",", " let", " me", " check"]]
            doc.append(("\n", "think"))
        doc += [("</think>", "answer"), ("\n", "answer"), ("\n", "answer")]
        doc += [(p, "answer") for p in str(total)] + [(".", "answer"), ("\n", "answer"), ("<eos>", "answer")]
        docs.append(doc)
    return docs


def firing(docs) -> list[list[set[int]]]:
    """Per document and position, the planted features on that token (the ground truth)."""
    rare_left = 3
    out = []
    for doc in docs:
        fired = []
        for pos, (piece, region) in enumerate(doc):
            on = set()
            if pos + 1 < len(doc) and doc[pos + 1][0] == "Wait":
                on.add(0)
            if piece in DIGITS:
                on.add(1)
            if piece == "\n" and region == "think":
                on.add(2)
            if piece == "\n" and region == "answer":
                on.add(3)
            if piece == "Wait":
                on.add(4)
            if piece == "?" and rare_left:
                on.add(5)
                rare_left -= 1
            if piece == "=":
                on.add(7)
            fired.append(on)
        out.append(fired)
    return out


def build_planted(root: Path, n_docs: int = 40, keep: float = 0.9, seed: int = 0) -> dict:
    """A store whose x carries the planted features in its first F dimensions, an identity-encoder
    adapter set, and the index ``tca index`` builds from them."""
    rng = np.random.default_rng(seed)
    docs = planted_docs(n_docs, seed)
    truth = firing(docs)
    rows, token = [], 0
    pieces, tokens = sorted({p for d in docs for p, _ in d}), []
    for d, doc in enumerate(docs):
        for pos, (piece, region) in enumerate(doc):
            tokens.append((token, d, pos, pieces.index(piece), piece, region))
            if rng.random() < keep:
                rows.append((token, truth[d][pos]))
            token += 1
    store = Store.create(str(root / "store"), StoreSpec(layers=[LAYER], d_model=D, dtype="bfloat16",
                                                        n_rows=len(rows), block_rows=64, chunk_rows=32))
    store.write_row_tokens(np.array([t for t, _ in rows], dtype=np.int64))
    x = torch.zeros(len(rows), D)
    for i, (_, on) in enumerate(rows):
        x[i, sorted(on)] = 1.0
    x[:, F:] = torch.randn(len(rows), D - F)  # the encoder ignores these dimensions
    for b in range(store.spec.n_blocks):
        lo, hi = store.block_range(b)
        store.write_block(b, {LAYER: {"x": x[lo:hi], "delta": torch.zeros(hi - lo, D)}})
    cols = list(zip(*tokens))
    store.write_table("tokens", pa.table({
        "token": pa.array(cols[0], pa.int64()), "doc": pa.array(cols[1], pa.int64()),
        "pos": pa.array(cols[2], pa.int32()), "token_id": pa.array(cols[3], pa.int32()),
        "piece": pa.array(cols[4]), "region": pa.array(cols[5]),
    }))
    store.write_table("docs", pa.table({"doc": pa.array(range(len(docs)), pa.int64()),
                                        "n_tokens": pa.array([len(d) for d in docs], pa.int64())}))
    cfg = AdapterConfig(d_model=D, n_features=F)
    ad = Adapter(cfg)
    with torch.no_grad():
        ad.W_enc.zero_()
        ad.W_enc[:F, :F] = torch.eye(F)
        ad.b_enc.fill_(-0.5)  # a planted 1 gives 0.5, anything else 0
        ad.W_dec.copy_(torch.randn(F, D))
    save_adapters(root / "planted", AdapterSet({LAYER: ad.eval()}, cfg))
    index = root / "planted.duckdb"
    index_adapters(store, adapter_layers(root / "planted"), index)
    return {"index": index, "docs": docs, "truth": truth, "tokens": tokens, "stored": {t for t, _ in rows}}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted(tmp_path_factory.mktemp("census"))


def expected_census(world: dict, words=("Wait",), min_active=10, min_hesitation=0.2, min_ratio=10.0) -> dict:
    """The census recomputed in plain Python from the planted documents, following the rule as
    docs/query.md states it."""
    docs, truth, stored = world["docs"], world["truth"], world["stored"]
    rows = []  # (piece, region, before_word, on_word, features) per stored token
    for token, d, pos, _, piece, region in world["tokens"]:
        if token in stored:
            nxt = docs[d][pos + 1][0] if pos + 1 < len(docs[d]) else None
            # pieces are compared with their spaces trimmed: " check" is the word check
            rows.append((piece, region, nxt is not None and nxt.strip() in words, piece.strip() in words,
                         truth[d][pos]))
    n_stored = len(rows)
    before_rate = sum(r[2] for r in rows) / n_stored
    by_piece: dict[str, dict[str, int]] = {}
    for piece, region, *_ in rows:
        c = by_piece.setdefault(piece, {"n": 0, "think": 0, "answer": 0})
        c["n"] += 1
        c[region] = c.get(region, 0) + 1
    out = {}
    for f in range(F):
        mine = [r for r in rows if f in r[4]]
        n = len(mine)
        if n == 0:
            out[f] = {"n_active": 0, "kind": None}
            continue

        def ratio(region: str, mine: list) -> float:
            inside = sum((r[1] == region) * (by_piece[r[0]]["n"] - by_piece[r[0]][region]) / by_piece[r[0]]["n"]
                         for r in mine)
            outside = sum((r[1] != region) * by_piece[r[0]][region] / by_piece[r[0]]["n"] for r in mine)
            return inside / (outside + 1)

        e = {
            "n_active": n,
            "think_share": sum(r[1] == "think" for r in mine) / n,
            "answer_share": sum(r[1] == "answer" for r in mine) / n,
            "prompt_share": sum(r[1] == "prompt" for r in mine) / n,
            "before_share": sum(r[2] for r in mine) / n,
            "word_share": sum(r[3] for r in mine) / n,
            "think_ratio": ratio("think", mine),
            "answer_ratio": ratio("answer", mine),
        }
        e["before_lift"] = e["before_share"] / before_rate if before_rate else None
        if n < min_active:
            kind = None
        elif e["before_share"] >= min_hesitation or e["word_share"] >= min_hesitation:
            kind = "hesitation"
        elif e["think_ratio"] >= min_ratio:
            kind = "think"
        elif e["answer_ratio"] >= min_ratio:
            kind = "answer"
        else:
            kind = "other"
        out[f] = e | {"kind": kind}
    return out


def test_planted_features_get_their_kind(planted):
    """A feature firing just before "Wait" is reasoning-related; one firing on digits is not."""
    con = connect(planted["index"])
    got = {r["feature"]: r for r in run_sql(con, "FROM census()").to_pylist()}
    con.close()
    assert {f: r["kind"] for f, r in got.items()} == EXPECTED_KIND
    assert got[0]["reasoning_related"] is True and got[1]["reasoning_related"] is False
    assert got[0]["before_share"] == 1.0 and got[1]["before_share"] == 0.0


def test_census_figures_match_python(planted):
    want = expected_census(planted)
    assert {f: w["kind"] for f, w in want.items()} == EXPECTED_KIND  # the rule as stated gives the planted kinds
    con = connect(planted["index"])
    got = {r["feature"]: r for r in run_sql(con, "FROM census()").to_pylist()}
    con.close()
    for f, w in want.items():
        assert got[f]["n_active"] == w["n_active"]
        for key, value in w.items():
            if key in ("n_active", "kind") or value is None:
                assert got[f][key] == value, (f, key)
            else:
                assert math.isclose(got[f][key], value, rel_tol=1e-9, abs_tol=1e-12), (f, key, got[f][key], value)


def test_thresholds_are_parameters(planted):
    """Each threshold moves the classification the way the rule says."""
    strict = expected_census(planted, min_active=10_000)
    con = connect(planted["index"])
    got = run_sql(con, "FROM census(min_active := 10000)").to_pylist()
    assert all(r["kind"] is None for r in got) and all(w["kind"] is None for w in strict.values())
    loose = run_sql(con, "FROM census(min_region_ratio := 0.0001, min_hesitation := 1.01)").to_pylist()
    want = expected_census(planted, min_hesitation=1.01, min_ratio=0.0001)
    assert {r["feature"]: r["kind"] for r in loose} == {f: w["kind"] for f, w in want.items()}
    # no share exceeds 1, so nothing is hesitation; "Wait" and "=" occur only inside <think>, so
    # their features have no same-token comparison outside it and stay other however low the bar
    assert {r["feature"]: r["kind"] for r in loose if r["kind"]} == {0: "think", 1: "think", 2: "think",
                                                                        3: "answer", 4: "other", 7: "other"}
    hmm = run_sql(con, "FROM census(words := ['check'])").to_pylist()
    con.close()
    want = expected_census(planted, words=("check",))
    assert {r["feature"]: r["kind"] for r in hmm} == {f: w["kind"] for f, w in want.items()}


def test_summary_counts_and_shares(planted):
    report = run_census(CensusConfig(index=planted["index"]))
    kinds = [k for k in EXPECTED_KIND.values() if k]
    assert report.total.n_classified == len(kinds) == 6
    assert report.total.kinds == {k: kinds.count(k) for k in census.KINDS}
    assert report.total.n_reasoning == 4 and report.total.reasoning_share == pytest.approx(4 / 6)
    lo, hi = report.total.ci95
    assert lo < 4 / 6 < hi
    assert report.layers[0].layer == LAYER and report.layers[0].n_reasoning == 4
    assert report.total.n_live == 7 and report.total.n_features == F
    assert "before_share >= min_hesitation" in report.rule


def test_cli_census_and_per_feature_file(planted, tmp_path):
    out = tmp_path / "census.json"
    result = CliRunner().invoke(main, ["census", str(planted["index"]), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total"]["n_reasoning"] == 4 and data["words"] == ["Wait"]
    rows = json.loads(out.read_text())
    assert {r["feature"]: r["kind"] for r in rows} == EXPECTED_KIND
    again = CliRunner().invoke(main, ["census", str(planted["index"]), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    text = CliRunner().invoke(main, ["census", str(planted["index"]), "--min-hesitation", "2"])
    assert text.exit_code == 2 and "--min-hesitation must be" in text.output
    table = CliRunner().invoke(main, ["census", str(planted["index"])])
    assert table.exit_code == 0 and "reasoning-related" in table.output


def test_an_index_built_before_the_census_gets_its_macros(planted, tmp_path):
    old = tmp_path / "old.duckdb"
    shutil.copyfile(planted["index"], old)
    con = duckdb.connect(str(old))
    con.execute("DROP MACRO TABLE census_summary")
    con.execute("DROP MACRO TABLE census")
    con.execute("DELETE FROM index_meta WHERE key = 'census_version'")
    con.close()
    report = run_census(CensusConfig(index=old))
    assert report.total.n_reasoning == 4
    ro = connect(old)
    assert census.installed_version(ro) == census.CENSUS_VERSION
    ro.close()


def test_bad_input(planted, tmp_path):
    with pytest.raises(TcaError, match="no word|no hesitation words"):
        run_census(CensusConfig(index=planted["index"], words=[" "]))
    with pytest.raises(TcaError, match=r"\.csv, \.json or \.parquet"):
        run_census(CensusConfig(index=planted["index"], out=tmp_path / "x.txt"))
    with pytest.raises(TcaError, match="no features on layer 3"):
        run_census(CensusConfig(index=planted["index"], layer=3))


@pytest.mark.slow
def test_demo_pair_census_runs_in_seconds(demo_run, tmp_path):
    """On an index of the shipped demo pair: the census takes seconds and finds the hesitation
    features the study works with (features that fire before "Wait")."""
    if not (DEMO_PAIR / "base").is_dir():
        pytest.skip("the demo pair is missing")
    index = tmp_path / "demo.duckdb"
    index_adapters(Store.open(str(demo_run.store)), adapter_layers(demo_run.adapters, "demo"), index)
    start = time.perf_counter()
    report = run_census(CensusConfig(index=index))
    assert time.perf_counter() - start < 10
    assert report.total.n_classified > 0 and report.total.kinds["hesitation"] > 0
    assert 0 < report.total.reasoning_share < 1
