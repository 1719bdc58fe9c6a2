"""What the query stage and ``tca plot`` write: never over an input or an existing file unless
asked, never half-written, and a refusal leaves every byte as it was.

Each refusal is checked against a snapshot of the whole working folder (every file's bytes)
taken before the call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_query import LAYERS, _make_set, _make_store, _reference

from tca import TcaError
from tca.outputs import atomic_dir, atomic_file, check_output
from tca.query import index as index_mod
from tca.query import render as render_mod
from tca.query import report as report_mod
from tca.query.index import IndexConfig, adapter_layers, build_index, index_adapters
from tca.query.render import run_sql_command
from tca.query.report import ReportConfig, make_report
from tca.query.sql import SqlConfig, query
from tca.train.checkpoint import save_adapters
from tca.train.plot import PlotConfig, plot


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden and temporary ones included) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.endswith("."), message
    return message


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    store = _make_store(root / "store")
    sets = {"relu-a": _make_set("relu", 1), "topk-b": _make_set("topk", 2)}
    for name, aset in sets.items():
        save_adapters(root / name, aset)
    index_adapters(store, adapter_layers(root / "relu-a"), root / "one.duckdb", batch_rows=50)
    return {"root": root, "store": store, "sets": sets, "index": root / "one.duckdb"}


@pytest.fixture()
def work(world, tmp_path):
    """A folder holding a copy of the index: what each test may touch."""
    shutil.copy(world["index"], tmp_path / "one.duckdb")
    return tmp_path


def _index_cfg(world, out: Path, adapters: str = "relu-a", store: Path | None = None, **kw) -> IndexConfig:
    return IndexConfig(str(store or world["root"] / "store"), [str(world["root"] / adapters)], out, batch_rows=50, **kw)


def _count_above(world, name: str, min_act: float = 0.0) -> int:
    return int(sum((_reference(world, name, layer, min_act)["acts"] > 0).sum() for layer in LAYERS))


# ---- outputs.py ------------------------------------------------------------------------------


def test_check_output_refuses_inputs_their_folders_and_their_parts(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a")
    with pytest.raises(TcaError, match="also an input") as exc:
        check_output(data / "a.txt", True, [data / "a.txt"])
    _one_sentence(exc)
    with pytest.raises(TcaError, match="holds the input"):
        check_output(tmp_path, True, [data / "a.txt"])
    with pytest.raises(TcaError, match="part of the input"):
        check_output(data / "a.txt", True, [data])
    with pytest.raises(TcaError, match="already exists; pass --overwrite"):
        check_output(data / "a.txt", False, [])
    assert check_output(data / "new.txt", False, [data]) == data / "new.txt"  # a new file beside an input
    assert check_output(data / "a.txt", True, ["s3://bucket/a.txt"]) == data / "a.txt"


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "p.html").write_text("old page")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "keep.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "new" / "deeper" / "x.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "pages") as tmp:
        (tmp / "q.html").write_text("half")
        raise RuntimeError("disk full")
    assert _tree(tmp_path) == before and not (tmp_path / "new").exists()
    with atomic_file(tmp_path / "keep.txt") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "keep.txt").read_text() == "new" and len(list(tmp_path.iterdir())) == 2


# ---- tca index -------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["text file", "folder", "other DuckDB file", "the store", "a file of the store",
                                  "an adapter set"])
def test_index_refuses_an_out_it_must_not_write(world, work, what):
    out = {
        "text file": work / "notes.txt", "folder": work / "folder", "other DuckDB file": work / "other.duckdb",
        "the store": world["root"] / "store", "a file of the store": world["root"] / "store" / "zarr.json",
        "an adapter set": world["root"] / "relu-a",
    }[what]
    if what == "text file":
        out.write_text("my notes\n")
    elif what == "folder":
        out.mkdir()
        (out / "x").write_text("x")
    elif what == "other DuckDB file":
        with duckdb.connect(str(out)) as con:
            con.execute("CREATE TABLE t AS SELECT 42 AS answer")
    before, inputs_before = _tree(work), _tree(world["root"])
    with pytest.raises(TcaError) as exc:
        build_index(_index_cfg(world, out, overwrite=True))
    message = _one_sentence(exc)
    assert str(out) in message
    assert _tree(work) == before and _tree(world["root"]) == inputs_before


def test_index_adds_adapters_but_replaces_one_only_with_overwrite(world, work):
    out = work / "one.duckdb"
    before = _tree(work)
    with pytest.raises(TcaError, match="already holds adapter relu-a layer 1; pass --overwrite") as exc:
        build_index(_index_cfg(world, out, min_act=0.5))
    _one_sentence(exc)
    assert _tree(work) == before

    # A new adapter joins; the old one's rows stay as they were.
    old = "SELECT * FROM activations WHERE adapter = 'relu-a' ORDER BY ALL"
    build_index(_index_cfg(world, out, "topk-b"))
    assert query(out, old).equals(query(world["index"], old))
    got = query(out, "SELECT count(*) AS n FROM activations WHERE adapter = 'topk-b'")["n"][0].as_py()
    assert got == _count_above(world, "topk-b")

    build_index(_index_cfg(world, out, min_act=0.5, overwrite=True))
    got = query(out, "SELECT count(*) AS n, min(value) AS lo FROM activations WHERE adapter = 'relu-a'").to_pylist()[0]
    assert got["n"] == _count_above(world, "relu-a", 0.5) and got["lo"] > 0.5
    assert sorted(p.name for p in work.iterdir()) == ["one.duckdb"]  # no temporary left beside it


def _corrupt_copy(world, to: Path) -> Path:
    shutil.copytree(world["root"] / "store", to)
    shard = to / Path(world["store"].shard_path(LAYERS[1], "x", 0)).relative_to(world["root"] / "store")
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # inside the first chunk's values, so its checksum no longer matches
    shard.write_bytes(bytes(data))
    return to


def test_index_of_a_corrupted_store_leaves_no_file_and_the_old_index_intact(world, work):
    store = _corrupt_copy(world, work.parent / f"{work.name}-store")
    cfg = _index_cfg(world, work / "new.duckdb", store=store)
    before = _tree(work)
    with pytest.raises(TcaError, match="fails its checksum; run `tca cache verify`") as exc:
        build_index(cfg)
    _one_sentence(exc)
    assert _tree(work) == before

    cfg.out, cfg.overwrite = work / "one.duckdb", True
    with pytest.raises(TcaError, match="fails its checksum"):
        build_index(cfg)
    assert _tree(work) == before


@pytest.mark.parametrize("existing", [False, True])
def test_index_failure_mid_build_leaves_nothing_new(world, work, monkeypatch, existing):
    out = work / ("one.duckdb" if existing else "new.duckdb")
    before = _tree(work)
    calls = []
    real = index_mod._replace

    def fail_on_the_second_layer(con, *args):
        # Until the build completes the index's name holds what it held before (or nothing).
        assert out.read_bytes() == before[out.name] if existing else not out.exists()
        calls.append(args)
        real(con, *args)
        if len(calls) == 2:
            raise RuntimeError("killed mid-build")

    monkeypatch.setattr(index_mod, "_replace", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(_index_cfg(world, out, "topk-b", overwrite=True))
    assert len(calls) == 2
    assert _tree(work) == before


def test_index_refuses_a_left_over_write_ahead_log(world, work):
    (work / "one.duckdb.wal").write_bytes(b"left by a killed writer")
    before = _tree(work)
    with pytest.raises(TcaError, match="write-ahead log") as exc:
        build_index(_index_cfg(world, work / "one.duckdb", "topk-b"))
    _one_sentence(exc)
    assert _tree(work) == before


# ---- tca sql --out -------------------------------------------------------------------------


def test_sql_out_refusals(world, work):
    index = work / "one.duckdb"
    (work / "taken.csv").write_text("mine\n")
    before = _tree(work)
    cases = [
        (SqlConfig(index=index, sql="FROM docs", format="csv", out=work / "taken.csv"), "already exists; pass --overwrite"),
        (SqlConfig(index=index, sql="FROM docs", format="csv", out=index, overwrite=True), "also an input"),
        (SqlConfig(index=index, sql="FROM docs", format="csv", out=work, overwrite=True), "holds the input"),
        (SqlConfig(index=index, sql="FROM docs", format="parquet"), "--format parquet needs --out"),
        (SqlConfig(index=index, sql="FROM docs", format="xml"), "unknown format 'xml'"),
        (SqlConfig(index=index, sql="DROP TABLE docs", format="csv", out=work / "new.csv"), "only read queries"),
    ]
    for cfg, match in cases:
        with pytest.raises(TcaError, match=match) as exc:
            run_sql_command(cfg)
        _one_sentence(exc)
    assert _tree(work) == before


def test_sql_out_writes_whole_files_only(world, work, monkeypatch):
    index = work / "one.duckdb"
    expected = query(index, "FROM docs ORDER BY doc")
    assert run_sql_command(SqlConfig(index=index, sql="FROM docs ORDER BY doc", format="parquet",
                                     out=work / "docs.parquet")) is None
    assert pq.read_table(work / "docs.parquet").equals(expected)
    text = run_sql_command(SqlConfig(index=index, sql="FROM docs ORDER BY doc", format="json"))
    assert json.loads(text) == expected.to_pylist()
    shown = run_sql_command(SqlConfig(index=index, sql="SELECT doc, domain FROM docs ORDER BY doc"))
    assert "domain" in shown and "logic" in shown

    (work / "taken.csv").write_text("mine\n")
    before = _tree(work)

    def fail(table, fmt):
        raise OSError("disk full")

    monkeypatch.setattr(render_mod, "export", fail)
    with pytest.raises(OSError):
        run_sql_command(SqlConfig(index=index, sql="FROM docs", format="csv", out=work / "taken.csv", overwrite=True))
    assert _tree(work) == before


# ---- tca report ----------------------------------------------------------------------------


def _busiest(world) -> int:
    acts = _reference(world, "relu-a", LAYERS[0])["acts"]
    return int(np.argmax((acts > 0).sum(0)))


def test_report_refusals_and_overwrite(world, work):
    index, feature = work / "one.duckdb", _busiest(world)
    page = work / "page.html"
    page.write_text("my page")
    before = _tree(work)
    for cfg, match in [
        (ReportConfig(index=index, out=page, layer=LAYERS[0], feature=feature), "already exists"),
        (ReportConfig(index=index, out=index, layer=LAYERS[0], feature=feature, overwrite=True), "also an input"),
        (ReportConfig(index=index, out=work, all_features=True, overwrite=True), "holds the input"),
        (ReportConfig(index=index, out=page, layer=LAYERS[0], feature=10_000, overwrite=True), "not in the index"),
    ]:
        with pytest.raises(TcaError, match=match) as exc:
            make_report(cfg)
        _one_sentence(exc)
    assert _tree(work) == before
    make_report(ReportConfig(index=index, out=page, layer=LAYERS[0], feature=feature, overwrite=True))
    assert f"feature {feature}" in page.read_text()


def test_report_all_is_written_whole_or_not_at_all(world, work, monkeypatch):
    index, pages = work / "one.duckdb", work / "pages"
    pages.mkdir()
    (pages / "stale.html").write_text("from an older index")
    before = _tree(work)
    with pytest.raises(TcaError, match="already exists"):
        make_report(ReportConfig(index=index, out=pages, all_features=True))

    real, calls = report_mod.feature_html, []

    def fail_on_the_third_page(view, back=None):
        calls.append(view.feature)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(view, back)

    monkeypatch.setattr(report_mod, "feature_html", fail_on_the_third_page)
    with pytest.raises(OSError):
        make_report(ReportConfig(index=index, out=pages, all_features=True, overwrite=True))
    assert _tree(work) == before
    monkeypatch.setattr(report_mod, "feature_html", real)

    make_report(ReportConfig(index=index, out=pages, all_features=True, overwrite=True))
    live = query(index, "SELECT layer, feature FROM features WHERE n_active > 0").to_pylist()
    assert sorted(p.name for p in pages.iterdir()) == sorted(
        [f"L{r['layer']}-F{r['feature']}.html" for r in live] + ["index.html"])  # the stale page is gone


# ---- tca plot ------------------------------------------------------------------------------


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": kind, "member": "l1-0.5", "layer": layer, "tokens": t, "loss": 1.0 / (t + 1), "l0": 5.0,
                "fve": t / 1000, "dead_frac": 0.1}
               for layer in (0, 1) for t in range(0, 1000, 100) for kind in ("train", "eval") if kind == "train" or t % 300 == 0]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_plot_refusals(run_dir):
    root = run_dir.parent
    (root / "taken.png").write_bytes(b"mine")
    before = _tree(root)
    for cfg, match in [
        (PlotConfig(run=run_dir, out=root / "x.txt"), r"matplotlib writes; use one of .*\.png"),
        (PlotConfig(run=run_dir, out=root / "curves"), "matplotlib writes"),
        (PlotConfig(run=run_dir, out=root / "taken.png"), "already exists"),
        (PlotConfig(run=run_dir, out=run_dir / "metrics.jsonl", overwrite=True), "also an input"),
        (PlotConfig(run=run_dir, out=run_dir, overwrite=True), "holds the input"),
    ]:
        with pytest.raises(TcaError, match=match) as exc:
            plot(cfg)
        _one_sentence(exc)
    assert _tree(root) == before


def test_plot_writes_the_image_whole(run_dir, monkeypatch):
    import matplotlib.figure
    import matplotlib.image

    out = plot(PlotConfig(run=run_dir, out=run_dir / "curves.png"))  # beside the metrics is fine
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (7 * 120, 11 * 120)  # figsize (11, 7) at 120 dpi

    before = _tree(run_dir.parent)

    def half_written(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    with pytest.raises(OSError):
        plot(PlotConfig(run=run_dir, out=run_dir / "curves.png", overwrite=True))
    assert _tree(run_dir.parent) == before
