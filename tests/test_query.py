"""The query layer against brute-force numpy over the store and the adapters' weights."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from tca import TcaError
from tca.cache.store import Store, StoreSpec
from tca.cli import main
from tca.query import index as index_mod
from tca.query.index import IndexAdapter, adapter_layers, index_adapters
from tca.query.lens import LogitLens
from tca.query.sql import connect, query, run_sql
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, save_adapters

D, F, LAYERS = 64, 24, (1, 2)
WORDS = [" Wait", ",", " let", " me", " check", " so", " the", " answer", " is", " 7", ".", " Hmm", "\n"]


# ---- a small store, two adapter sets, one index ------------------------------------------------


def _make_store(path: Path) -> Store:
    """Six documents of prompt/think/answer tokens; ~80% of tokens stored as rows, in bf16."""
    rng = np.random.default_rng(0)
    tokens, docs, token = [], [], 0
    for doc in range(6):
        n = int(rng.integers(25, 45))
        for pos in range(n):
            region = "prompt" if pos < 6 else ("answer" if pos >= n - 5 else "think")
            tid = int(rng.integers(len(WORDS)))
            tokens.append((token, doc, pos, tid, WORDS[tid], region))
            token += 1
        docs.append((doc, f"doc-{doc}", "math" if doc % 2 else "logic", n))
    keep = np.array([t[0] for t in tokens if t[2] > 0 and rng.random() < 0.8], dtype=np.int64)
    store = Store.create(str(path), StoreSpec(layers=list(LAYERS), d_model=D, dtype="bfloat16",
                                              n_rows=len(keep), block_rows=64, chunk_rows=32))
    store.write_row_tokens(keep)
    # Activations depend on the token id, so features track words as real ones would.
    emb = torch.randn(len(WORDS), D)
    tid = torch.tensor([tokens[t][3] for t in keep])
    for b in range(store.spec.n_blocks):
        lo, hi = store.block_range(b)
        store.write_block(b, {
            layer: {"x": emb[tid[lo:hi]] + 0.5 * torch.randn(hi - lo, D), "delta": torch.randn(hi - lo, D)}
            for layer in LAYERS
        })
    cols = list(zip(*tokens))
    store.write_table("tokens", pa.table({
        "token": pa.array(cols[0], pa.int64()), "doc": pa.array(cols[1], pa.int64()),
        "pos": pa.array(cols[2], pa.int32()), "token_id": pa.array(cols[3], pa.int32()),
        "piece": pa.array(cols[4]), "region": pa.array(cols[5]),
    }))
    dcols = list(zip(*docs))
    store.write_table("docs", pa.table({"doc": pa.array(dcols[0], pa.int64()), "id": dcols[1],
                                        "domain": dcols[2], "n_tokens": dcols[3]}))
    return store


def _make_set(activation: str, seed: int) -> AdapterSet:
    g = torch.Generator().manual_seed(seed)
    cfg = AdapterConfig(d_model=D, n_features=F, activation=activation, k=3)
    adapters = {}
    for layer in LAYERS:
        ad = Adapter(cfg)
        with torch.no_grad():
            ad.W_enc.copy_(torch.randn(D, F, generator=g) / D**0.5)
            ad.b_enc.fill_(-0.8)  # sparse: most pre-activations end below zero
            ad.W_dec.copy_(torch.randn(F, D, generator=g))
        adapters[layer] = ad.eval()
    return AdapterSet(adapters, cfg)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("query")
    store = _make_store(root / "store")
    sets = {"relu-a": _make_set("relu", 1), "topk-b": _make_set("topk", 2)}
    for name, aset in sets.items():
        save_adapters(root / name, aset)
    lens = LogitLens.from_pretrained(tiny_pair[1])
    out = root / "one.duckdb"
    index_adapters(store, adapter_layers(root / "relu-a"), out, lens=lens, batch_rows=50)
    return {"root": root, "store": store, "sets": sets, "index": out, "lens": lens, "target": tiny_pair[1]}


def _reference(world, name: str, layer: int, min_act: float = 0.0) -> dict:
    """Brute force: every activation of one adapter's layer, from the stored x in numpy."""
    store, ad = world["store"], world["sets"][name].adapters[layer]
    x = store.read(layer, "x", 0, store.n_rows, torch.float32).numpy()
    W, b = ad.W_enc.detach().numpy(), ad.b_enc.detach().numpy()
    acts = np.maximum(x @ W + b, 0)
    if ad.cfg.activation == "topk":
        acts = np.where(acts >= np.sort(acts, axis=1)[:, [-ad.cfg.k]], acts, 0)
    acts = np.where(acts > min_act, acts, 0)
    tokens = store.table("tokens").to_pydict()
    return {"acts": acts, "row_tokens": store.row_tokens(), "tokens": tokens, "n_rows": store.n_rows}


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


# ---- features statistics -----------------------------------------------------------------------


def test_features_match_numpy(world):
    got = {(r["layer"], r["feature"]): r for r in _rows(query(world["index"], "FROM features"))}
    assert len(got) == len(LAYERS) * F
    lens = world["lens"]
    for layer in LAYERS:
        ref = _reference(world, "relu-a", layer)
        acts = ref["acts"]
        W_dec = world["sets"]["relu-a"].adapters[layer].W_dec.detach().double()
        w = lens.norm_weight.double()
        logits = (W_dec / W_dec.pow(2).mean(1, keepdim=True).add(lens.eps).sqrt() * w) @ lens.unembed.double().T
        for f in range(F):
            row, col = got[(layer, f)], acts[:, f]
            active = col[col > 0]
            assert row["n_active"] == len(active)
            assert row["frequency"] == pytest.approx(len(active) / ref["n_rows"])
            assert row["decoder_norm"] == pytest.approx(float(W_dec[f].norm()), rel=1e-5, abs=1e-6)
            assert row["top_logits"] == [lens.pieces[i] for i in logits[f].argsort(descending=True)[:10]]
            assert row["bottom_logits"] == [lens.pieces[i] for i in logits[f].argsort()[:10]]
            if len(active):
                assert row["max"] == pytest.approx(active.max(), rel=1e-5, abs=1e-6)
                assert row["mean"] == pytest.approx(active.mean(), rel=1e-5, abs=1e-6)
                np.testing.assert_allclose(row["quantiles"], np.quantile(active, [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]), rtol=1e-5, atol=1e-6)
            else:
                assert row["max"] is None and row["mean"] is None
    live = sum(r["n_active"] > 0 for r in got.values())
    assert 0.3 * len(got) < live  # the fixture must exercise live features, not only dead ones


def test_activations_hold_every_nonzero(world):
    layer = LAYERS[0]
    ref = _reference(world, "relu-a", layer)
    rows, feats = np.nonzero(ref["acts"])
    want = sorted(zip(feats.tolist(), ref["row_tokens"][rows].tolist()))
    got = query(world["index"], f"SELECT feature, token, value FROM activations WHERE layer = {layer} ORDER BY ALL")
    assert list(zip(got["feature"].to_pylist(), got["token"].to_pylist())) == want
    np.testing.assert_allclose(got["value"].to_numpy(), ref["acts"][rows, feats][np.lexsort((ref["row_tokens"][rows], feats))], rtol=1e-5, atol=1e-6)


# ---- the macros --------------------------------------------------------------------------------


def _busiest(world, layer: int) -> int:
    return int(query(world["index"], f"SELECT feature FROM features WHERE layer = {layer} ORDER BY n_active DESC, feature LIMIT 1")[0][0].as_py())


def _context(ref, token: int, context: int, col: np.ndarray) -> tuple[list[str], list, int]:
    """Pieces and activations of the tokens within ``context`` of ``token`` in its document."""
    t = ref["tokens"]
    doc, pos = t["doc"][token], t["pos"][token]
    value_of = dict(zip(ref["row_tokens"].tolist(), col.tolist()))
    idx = [i for i in range(len(t["token"])) if t["doc"][i] == doc and abs(t["pos"][i] - pos) <= context]
    values = [value_of.get(t["token"][i]) for i in idx]
    return [t["piece"][i] for i in idx], values, idx.index(token)


def _check_examples(got: list[dict], ref, picks: list[int], col: np.ndarray, context: int) -> None:
    assert [r["token"] for r in got] == picks
    for r in got:
        pieces, values, centre = _context(ref, r["token"], context, col)
        assert r["context_pieces"] == pieces and r["centre_index"] == centre
        assert [v is None for v in r["context_values"]] == [v is None for v in values]
        np.testing.assert_allclose([v for v in r["context_values"] if v is not None],
                                   [v for v in values if v is not None], rtol=1e-5, atol=1e-6)
        assert r["piece"] == pieces[centre] and r["value"] == pytest.approx(values[centre], rel=1e-5, abs=1e-6)


def test_top_examples(world):
    layer = LAYERS[1]
    feature = _busiest(world, layer)
    ref = _reference(world, "relu-a", layer)
    col = ref["acts"][:, feature]
    order = np.lexsort((ref["row_tokens"], -col))
    picks = [int(ref["row_tokens"][i]) for i in order if col[i] > 0][:7]
    got = _rows(query(world["index"], f"FROM top_examples({layer}, {feature}, 7, 4)"))
    assert [r["rank"] for r in got] == list(range(1, 8))
    _check_examples(got, ref, picks, col, 4)


def test_top_per_doc(world):
    layer = LAYERS[0]
    feature = _busiest(world, layer)
    ref = _reference(world, "relu-a", layer)
    col = ref["acts"][:, feature]
    docs = np.array(ref["tokens"]["doc"])[ref["row_tokens"]]
    best = {}
    for i in np.lexsort((ref["row_tokens"], -col)):
        if col[i] > 0:
            best.setdefault(docs[i], int(ref["row_tokens"][i]))
    picks = sorted(best.values(), key=lambda t: (-col[list(ref["row_tokens"]).index(t)], t))[:4]
    got = _rows(query(world["index"], f"FROM top_per_doc({layer}, {feature}, k := 4, context := 2)"))
    assert len({r["doc"] for r in got}) == len(got)
    _check_examples(got, ref, picks, col, 2)


def test_quantile_samples(world):
    layer, n_bins, per_bin = LAYERS[0], 4, 3
    feature = _busiest(world, layer)
    ref = _reference(world, "relu-a", layer)
    col = ref["acts"][:, feature]
    act = np.flatnonzero(col > 0)
    act = act[np.lexsort((ref["row_tokens"][act], col[act]))]  # ascending value, as ntile orders
    sizes = [len(act) // n_bins + (b < len(act) % n_bins) for b in range(n_bins)]
    bins = np.split(act, np.cumsum(sizes)[:-1])
    got = _rows(query(world["index"], f"FROM quantile_samples({layer}, {feature}, {n_bins}, {per_bin}, context := 1)"))
    for b, members in enumerate(bins, start=1):
        mine = [r for r in got if r["bin"] == b]
        assert len(mine) == min(per_bin, len(members))
        tokens = set(ref["row_tokens"][members].tolist())
        assert all(r["token"] in tokens for r in mine)
        assert all(r["bin_min"] == pytest.approx(col[members].min(), rel=1e-5, abs=1e-6) for r in mine)
        assert all(r["bin_max"] == pytest.approx(col[members].max(), rel=1e-5, abs=1e-6) for r in mine)
    assert [r["bin"] for r in got] == sorted((r["bin"] for r in got), reverse=True)


def test_features_on(world):
    layer = LAYERS[0]
    ref = _reference(world, "relu-a", layer)
    pieces = np.array(ref["tokens"]["piece"])[ref["row_tokens"]]
    hits = np.flatnonzero(pieces == " Wait")
    n_active = (ref["acts"] > 0).sum(0)
    want = []
    for f in range(F):
        v = ref["acts"][hits, f]
        if (v > 0).any():
            want.append((f, int((v > 0).sum()), float(v[v > 0].mean()), (v > 0).sum() / len(hits), (v > 0).sum() / n_active[f]))
    want.sort(key=lambda w: (-w[1], -w[2], w[0]))
    got = _rows(query(world["index"], f"FROM features_on('Wait', layer := {layer})"))
    assert [(r["feature"], r["n_hits"]) for r in got] == [(w[0], w[1]) for w in want]
    for r, w in zip(got, want):
        assert r["n_tokens"] == len(hits)
        assert (r["mean_value"], r["hit_rate"], r["precision"]) == pytest.approx(w[2:], rel=1e-5, abs=1e-6)
    assert {r["layer"] for r in _rows(query(world["index"], "FROM features_on('Wait')"))} == set(LAYERS)


def test_cooccurring(world):
    layer = LAYERS[1]
    feature = _busiest(world, layer)
    on = _reference(world, "relu-a", layer)["acts"] > 0
    mine = on[:, feature]
    want = []
    for f in range(F):
        both = int((mine & on[:, f]).sum())
        if f != feature and both:
            want.append((f, both, both / (mine.sum() + on[:, f].sum() - both)))
    want.sort(key=lambda w: (-w[2], -w[1], w[0]))
    got = _rows(query(world["index"], f"FROM cooccurring({layer}, {feature}, k := 5)"))
    assert [(r["other_layer"], r["other_feature"], r["n_both"]) for r in got] == [(layer, w[0], w[1]) for w in want[:5]]
    assert [r["jaccard"] for r in got] == pytest.approx([w[2] for w in want[:5]])
    cross = _rows(query(world["index"], f"FROM cooccurring({layer}, {feature}, k := 1000, same_layer := false)"))
    assert {r["other_layer"] for r in cross} == set(LAYERS)


def test_region_profile(world):
    layer = LAYERS[0]
    feature = _busiest(world, layer)
    ref = _reference(world, "relu-a", layer)
    regions = np.array(ref["tokens"]["region"])[ref["row_tokens"]]
    col = ref["acts"][:, feature]
    got = {r["region"]: r for r in _rows(query(world["index"], f"FROM region_profile({layer}, {feature})"))}
    assert list(got) == ["prompt", "think", "answer"]
    for region, r in got.items():
        inside = regions == region
        assert r["n_rows"] == inside.sum()
        assert r["n_active"] == (col[inside] > 0).sum()
        assert r["frequency"] == pytest.approx((col[inside] > 0).mean())
        assert r["share"] == pytest.approx((col[inside] > 0).sum() / (col > 0).sum())


# ---- several adapters, re-indexing -------------------------------------------------------------


@pytest.fixture()
def two_adapters(world, tmp_path):
    out = tmp_path / "two.duckdb"
    shutil.copy(world["index"], out)
    index_adapters(world["store"], adapter_layers(world["root"] / "topk-b"), out, batch_rows=64)
    return out


def test_adapter_parameter(world, two_adapters):
    with pytest.raises(TcaError, match="several adapters.*relu-a, topk-b"):
        query(two_adapters, "FROM top_examples(1, 0)")
    with pytest.raises(TcaError, match="no adapter nope"):
        query(two_adapters, "FROM top_examples(1, 0, adapter := 'nope')")
    layer = LAYERS[0]
    ref = _reference(world, "topk-b", layer)
    got = query(two_adapters, f"SELECT feature, n_active FROM features WHERE adapter = 'topk-b' AND layer = {layer} ORDER BY feature")
    assert got["n_active"].to_pylist() == (ref["acts"] > 0).sum(0).tolist()
    assert ((ref["acts"] > 0).sum(1) <= 3).all()
    feature = int(np.argmax((ref["acts"] > 0).sum(0)))
    top = _rows(query(two_adapters, f"FROM top_examples({layer}, {feature}, 3, 0, adapter := 'topk-b')"))
    col = ref["acts"][:, feature]
    assert [r["value"] for r in top] == pytest.approx(sorted(col, reverse=True)[:3], rel=1e-5, abs=1e-6)
    one = query(world["index"], "SELECT DISTINCT adapter FROM activations")
    assert one["adapter"].to_pylist() == ["relu-a"]


def test_reindex_replaces_and_failure_keeps_old(world, tmp_path, monkeypatch):
    out = tmp_path / "re.duckdb"
    shutil.copy(world["index"], out)
    before = query(out, "SELECT * FROM activations ORDER BY ALL")
    before_features = query(out, "SELECT * FROM features ORDER BY ALL")
    adapters = adapter_layers(world["root"] / "relu-a")

    real_replace = index_mod._replace

    def fail_after_delete(con, *args):
        real_replace(con, *args)  # deletes, inserts: everything but the commit
        raise RuntimeError("killed mid re-index")

    monkeypatch.setattr(index_mod, "_replace", fail_after_delete)
    with pytest.raises(RuntimeError, match="killed"):
        index_adapters(world["store"], adapters, out, min_act=0.5)
    assert query(out, "SELECT * FROM activations ORDER BY ALL").equals(before)
    assert query(out, "SELECT * FROM features ORDER BY ALL").equals(before_features)

    monkeypatch.setattr(index_mod, "_replace", real_replace)
    index_adapters(world["store"], [a for a in adapters if a.layer == LAYERS[0]], out, min_act=0.5)
    ref = _reference(world, "relu-a", LAYERS[0], min_act=0.5)
    got = query(out, f"SELECT count(*) AS n, min(value) AS lo FROM activations WHERE layer = {LAYERS[0]}")
    assert got["n"][0].as_py() == (ref["acts"] > 0).sum() and got["lo"][0].as_py() > 0.5
    other = f"SELECT * FROM activations WHERE layer = {LAYERS[1]} ORDER BY ALL"
    assert query(out, other).equals(query(world["index"], other))
    meta = _rows(query(out, "SELECT layer, min_act FROM adapters ORDER BY layer"))
    assert meta == [{"layer": LAYERS[0], "min_act": 0.5}, {"layer": LAYERS[1], "min_act": 0.0}]


def test_refuses_adapter_of_another_width(world, tmp_path):
    bad = IndexAdapter("bad", LAYERS[0], lambda x: x, torch.zeros(4, D + 1))
    with pytest.raises(TcaError, match="width 65.*d_model 64"):
        index_adapters(world["store"], [bad], tmp_path / "bad.duckdb")


# ---- read-only SQL -----------------------------------------------------------------------------


@pytest.mark.parametrize("sql, kind", [
    ("COPY (SELECT 1) TO '{out}'", "COPY"),
    ("COPY activations TO '{out}' (FORMAT parquet)", "COPY"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE"),
    ("INSERT INTO activations VALUES ('x', 0, 0, 0, 1.0)", "INSERT"),
    ("DELETE FROM activations", "DELETE"),
    ("ATTACH '{out}' AS other", "ATTACH"),
    ("PRAGMA enable_profiling", "PRAGMA"),
    ("SET threads = 1", "SET"),
    ("EXPORT DATABASE '{out}'", "EXPORT"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'", "EXPLAIN"),
])
def test_sql_refuses_anything_but_reads(world, tmp_path, sql, kind):
    out = tmp_path / "written"
    with pytest.raises(TcaError, match=f"only read queries.*this one is {kind}"):
        query(world["index"], sql.format(out=out))
    assert not out.exists()


def test_sql_refuses_several_statements_and_reads_work(world, tmp_path):
    with pytest.raises(TcaError, match="one statement at a time"):
        query(world["index"], "SELECT 1; COPY (SELECT 1) TO 'x.csv'")
    con = connect(world["index"])
    try:
        assert run_sql(con, "SELECT count(*) AS n FROM docs")["n"][0].as_py() == 6
        assert run_sql(con, "DESCRIBE features").num_rows > 5
        assert run_sql(con, "SELECT ? AS v", [3])["v"][0].as_py() == 3
    finally:
        con.close()
    with pytest.raises(TcaError, match="not an index file"):
        query(tmp_path / "missing.duckdb", "SELECT 1")


# ---- the CLI, the terminal view and the HTML report --------------------------------------------


def test_cli_index_sql_top_report(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.duckdb"
    args = ["index", "--store", str(world["root"] / "store"), "--adapters", str(world["root"] / "relu-a"),
            "--adapters", f"second={world['root'] / 'topk-b'}", "--out", str(out), "--layers", "1",
            "--target", str(world["target"])]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    got = query(out, "SELECT adapter, layer, count(*) AS n FROM activations GROUP BY ALL ORDER BY ALL")
    assert got["adapter"].to_pylist() == ["relu-a", "second"] and got["layer"].to_pylist() == [1, 1]

    res = runner.invoke(main, ["sql", str(out), "SELECT feature, n_active FROM features WHERE adapter = 'second' ORDER BY feature LIMIT 3", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert [r["feature"] for r in json.loads(res.output)] == [0, 1, 2]
    csv_out = tmp_path / "f.csv"
    res = runner.invoke(main, ["sql", str(out), "FROM docs", "--format", "csv", "--out", str(csv_out)])
    assert res.exit_code == 0 and csv_out.read_text().splitlines()[0].startswith('"doc"')
    pq_out = tmp_path / "f.parquet"
    res = runner.invoke(main, ["sql", str(out), "FROM tokens", "--format", "parquet", "--out", str(pq_out)])
    assert res.exit_code == 0 and pq.read_table(pq_out).num_rows == len(world["store"].table("tokens"))
    res = runner.invoke(main, ["sql", str(out), "DROP TABLE activations"])
    assert res.exit_code == 2 and "only read queries" in res.output

    feature = _busiest(world, 1)
    res = runner.invoke(main, ["top", str(out), "1", str(feature), "-k", "3", "--adapter", "relu-a"])
    assert res.exit_code == 0, res.output
    top = _rows(query(out, f"FROM top_examples(1, {feature}, 3, 12, adapter := 'relu-a')"))
    assert f"{top[0]['value']:.3g}" in res.output and "top_logits" not in res.output
    res = runner.invoke(main, ["top", str(out), "1", str(feature)])
    assert res.exit_code == 2 and "several adapters" in res.output

    page = tmp_path / "page.html"
    res = runner.invoke(main, ["report", str(out), "1", str(feature), "--adapter", "relu-a", "-o", str(page)])
    assert res.exit_code == 0, res.output
    assert "<svg" in page.read_text()
    pages = tmp_path / "pages"
    res = runner.invoke(main, ["report", str(out), "--all", "--adapter", "second", "--out", str(pages)])
    assert res.exit_code == 0, res.output
    live = query(out, "SELECT count(*) FROM features WHERE adapter = 'second' AND n_active > 0")[0][0].as_py()
    assert len(list(pages.glob("*.html"))) == live + 1
    assert (pages / "index.html").exists()


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(world, tmp_path):
    from tca.query.report import write_report

    feature = _busiest(world, LAYERS[0])
    page = write_report(world["index"], LAYERS[0], feature, tmp_path / "page.html")
    top = _rows(query(world["index"], f"FROM top_examples({LAYERS[0]}, {feature}, 1, 12)"))[0]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    # The DOM after rendering holds the top example's context as one readable string.
    assert "".join(top["context_pieces"]).strip() in " ".join(dom.split()) or all(
        p.strip() in dom for p in top["context_pieces"])
    assert "Activation histogram" in dom and "<svg" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), *flags, "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_every_sql_example_in_the_docs_runs(world):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "query.md").read_text()
    blocks = [b.split("```", 1)[0].strip().rstrip(";") for b in doc.split("```sql\n")[1:]]
    assert len(blocks) >= 14
    con = connect(world["index"])
    try:
        for sql in blocks:
            run_sql(con, sql)
    finally:
        con.close()
