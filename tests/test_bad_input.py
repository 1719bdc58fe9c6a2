"""Bad input, command by command: exit status 2, one sentence, no traceback, and every input and
every pre-existing output byte for byte as it was."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cli import main
from tca.query.index import IndexConfig, build_index
from tca.train.config import TrainConfig
from tca.train.trainer import train


@dataclass(frozen=True)
class World:
    """A harvest of the tiny pair, adapters trained on it, their index and a few bystander files."""

    root: Path
    base: Path
    target: Path
    data: Path

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def adapters(self) -> Path:
        return self.root / "run"

    @property
    def index(self) -> Path:
        return self.root / "index.duckdb"

    @property
    def text(self) -> Path:
        """A file someone keeps beside the outputs: never to be replaced without --overwrite."""
        return self.root / "notes.txt"

    @property
    def taken(self) -> Path:
        """An existing folder used as an output."""
        return self.root / "taken"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pair, tiny_data) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    w = World(root, *tiny_pair, tiny_data)
    harvest(HarvestConfig(base=str(w.base), target=str(w.target), out=str(w.store), device="cpu",
                          plan=PlanConfig(data=str(w.data), max_tokens=1200), block_rows=64, chunk_rows=32))
    train(TrainConfig(store=str(w.store), out=str(w.adapters), features=16, batch=64, tokens=640, layers="1,2", holdout_frac=0.25,
                      device="cpu"))
    build_index(IndexConfig(store=str(w.store), adapters=[str(w.adapters)], out=w.index))
    w.text.write_text("my notes\n")
    w.taken.mkdir()
    (w.taken / "keep.txt").write_text("keep\n")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (root / "empty.jsonl").write_text("")
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    return w


def _tree(*roots: Path) -> dict[str, str]:
    """Every file under ``roots`` and its content's hash."""
    out = {}
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _one_token(w: World) -> str:
    """A word that is one token of the tiny pair's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w.target)
    return next(t for t in tok.get_vocab() if t.isalpha() and len(t) > 2 and len(tok(t, add_special_tokens=False).input_ids) == 1)


def _corrupt_copy(w: World, dest: Path) -> Path:
    """A copy of the store with one byte of a shard of x flipped."""
    import shutil

    shutil.copytree(w.store, dest)
    shard = next(p for p in sorted((dest / "layers" / "1" / "x").rglob("*")) if p.is_file() and "/c/" in str(p))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return dest


MODELS = ["--base", "{base}", "--target", "{target}"]
CASES = {
    # harvest
    "harvest: binary data": (["harvest", *MODELS, "--data", "{root}/binary.jsonl", "--out", "{root}/h1"], "line 1"),
    "harvest: not UTF-8": (["harvest", *MODELS, "--data", "{root}/latin1.jsonl", "--out", "{root}/h5"], "UTF-8"),
    "harvest: empty data": (["harvest", *MODELS, "--data", "{root}/empty.jsonl", "--out", "{root}/h2"], "empty"),
    "harvest: block rows 0": (["harvest", *MODELS, "--data", "{data}", "--out", "{root}/h3", "--block-rows", "0"],
                              "--block-rows must be a positive integer"),
    "harvest: layers per pass 0": (["harvest", *MODELS, "--data", "{data}", "--out", "{root}/h6",
                                    "--layers-per-pass", "0"], "--layers-per-pass must be a positive integer"),
    "harvest: layer out of range": (["harvest", *MODELS, "--data", "{data}", "--out", "{root}/h4", "--layers", "9"],
                                    "layer 9"),
    "harvest: over an existing store": (["harvest", *MODELS, "--data", "{data}", "--out", "{store}"], "already"),
    # train
    "train: features 0": (["train", "--store", "{store}", "--out", "{root}/t1", "--features", "0"], "--features"),
    "train: features -4": (["train", "--store", "{store}", "--out", "{root}/t2", "--features", "-4"], "--features"),
    "train: batch 0": (["train", "--store", "{store}", "--out", "{root}/t3", "--batch", "0"], "--batch"),
    "train: lr 0": (["train", "--store", "{store}", "--out", "{root}/t4", "--lr", "0"], "--lr"),
    "train: lr -1": (["train", "--store", "{store}", "--out", "{root}/t5", "--lr", "-1"], "--lr"),
    "train: tokens -100": (["train", "--store", "{store}", "--out", "{root}/t6", "--tokens", "-100"], "--tokens"),
    "train: epochs -1": (["train", "--store", "{store}", "--out", "{root}/t7", "--epochs", "-1"], "--epochs"),
    "train: no store": (["train", "--store", "{root}/nowhere", "--out", "{root}/t8"], "nowhere"),
    "train: over a run": (["train", "--store", "{store}", "--out", "{adapters}"], "already"),
    # index
    "index: corrupted chunk": (["index", "--store", "{corrupt}", "--adapters", "{adapters}", "--out", "{root}/i1.duckdb"],
                               "checksum"),
    "index: corrupted chunk, on Dask": (["index", "--store", "{corrupt}", "--adapters", "{adapters}", "--out",
                                         "{root}/i2.duckdb", "--workers", "1"], "checksum"),
    "index: out is a text file": (["index", "--store", "{store}", "--adapters", "{adapters}", "--out", "{text}"],
                                  "index"),
    "index: out is the store": (["index", "--store", "{store}", "--adapters", "{adapters}", "--out", "{store}"],
                                "store"),
    "index: adapter already indexed": (["index", "--store", "{store}", "--adapters", "{adapters}", "--out", "{index}"],
                                       "--overwrite"),
    # sql
    "sql: reads a file": (["sql", "{index}", "SELECT * FROM read_csv('/etc/passwd')"], "only the index"),
    "sql: writes": (["sql", "{index}", "DROP TABLE activations"], "only read queries"),
    "sql: out over a file": (["sql", "{index}", "FROM docs", "--format", "csv", "--out", "{text}"], "--overwrite"),
    "sql: out is the index": (["sql", "{index}", "FROM docs", "--format", "csv", "--out", "{index}", "--overwrite"],
                              "index"),
    "sql: not an index": (["sql", "{text}", "FROM docs"], "index"),
    # census, explain, serve
    "census: not an index": (["census", "{text}"], "index"),
    "census: share above 1": (["census", "{index}", "--min-hesitation", "2"], "--min-hesitation"),
    "explain: a --where that is not a condition": (["explain", "{index}", "--endpoint", "http://127.0.0.1:9",
                                                    "--model", "m", "--where", "DROP TABLE activations"], "parse"),
    "serve: nothing to serve": (["serve", "--port", "0", "--max-requests", "1"], "--model"),
    # top, report, plot
    "top: no such feature": (["top", "{index}", "1", "9999"], "9999"),
    "report: over a file": (["report", "{index}", "1", "0", "-o", "{text}"], "--overwrite"),
    "plot: unknown image type": (["plot", "{adapters}", "-o", "{root}/curves.txt"], "txt"),
    "plot: over a file": (["plot", "{adapters}", "-o", "{text}"], "--overwrite"),
    # export, import
    "export: over a folder": (["export", "{adapters}", "--format", "transcoder", "--out", "{taken}"], "--overwrite"),
    "export: into its input": (["export", "{adapters}", "--format", "transcoder", "--out", "{adapters}",
                                "--overwrite"], "input"),
    "import: not a checkpoint": (["import", "{taken}", "--out", "{root}/imported"], "taken"),
    # the adapted model
    "eval: adapters missing": (["eval", "--adapters", "{root}/none", *MODELS, "--data", "{data}"], "none"),
    "eval: seq len 1": (["eval", "--adapters", "{adapters}", *MODELS, "--data", "{data}", "--seq-len", "1"],
                        "--seq-len"),
    "intervene: bad edit": (["intervene", "--adapters", "{adapters}", *MODELS, "--data", "{data}", "--edit", "x:y"],
                            "edit"),
    "intervene: word of two tokens": (["intervene", "--adapters", "{adapters}", *MODELS, "--data", "{data}",
                                       "--edit", "1:0", "--measure", "Waitfornothing"], "one token"),
    "attribute: layer without adapter": (["attribute", "--adapters", "{adapters}", *MODELS, "--data", "{data}",
                                          "--target-token", "{token}", "--layers", "0"], "layer"),
    "refine: over a run": (["refine", "--adapters", "{adapters}", *MODELS, "--data", "{data}", "--out", "{adapters}"],
                           "already"),
    "refine: no adapters": (["refine", *MODELS, "--data", "{data}", "--out", "{root}/r2"], "--adapters"),
    "study: index missing": (["study", "hesitation", "--adapters", "{adapters}", *MODELS, "--data", "{data}",
                              "--index", "{root}/none.duckdb", "--out", "{root}/s1"], "none.duckdb"),
    # the store
    "cache info: no store": (["cache", "info", "{root}/nowhere"], "nowhere"),
    "cache verify: no store": (["cache", "verify", "{root}/nowhere"], "nowhere"),
    "cache stats: layer out of range": (["cache", "stats", "{store}", "--layers", "7"], "7"),
    # the demo
    "demo: out exists": (["demo", "--out", "{taken}"], "--overwrite"),
    "build-pair: out holds files": (["build-pair", "--out", "{taken}"], "--overwrite"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_sentence_and_changes_nothing(world, name, tmp_path):
    argv, expected = CASES[name]
    places = {"root": world.root, "base": world.base, "target": world.target, "data": world.data,
              "store": world.store, "adapters": world.adapters, "index": world.index, "text": world.text,
              "taken": world.taken, "token": _one_token(world)}
    if any("{corrupt}" in a for a in argv):
        places["corrupt"] = _corrupt_copy(world, tmp_path / "corrupt")
    argv = [a.format(**places) for a in argv]
    roots = [world.root, world.base, world.target, world.data.parent, tmp_path]
    before = _tree(*roots)
    res = CliRunner().invoke(main, argv)
    lines = res.output.strip().splitlines()
    problems = [line for line in lines if line.startswith("error:")]
    assert res.exit_code == 2, f"{name}: exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output and "internal error" not in res.output, res.output
    assert len(problems) == 1 and problems[0] == lines[-1], f"{name}: not one sentence:\n{res.output}"
    assert expected.lower() in problems[0].lower(), f"{name}: {problems[0]!r} does not mention {expected!r}"
    assert _tree(*roots) == before, f"{name} changed files on disk"


def test_the_matrix_covers_every_command():
    from test_cli_config import CONFIG_COMMANDS, PLAIN_COMMANDS

    covered = {" ".join(argv[:2]) if argv[0] in ("cache", "study") else argv[0] for argv, _ in CASES.values()}
    commands = {path for path, _ in CONFIG_COMMANDS} | PLAIN_COMMANDS
    assert commands - covered == set(), f"no bad-input case for {commands - covered}"


def test_base_equal_to_target_warns_in_one_line(world, tmp_path):
    res = CliRunner().invoke(main, ["harvest", "--base", str(world.target), "--target", str(world.target),
                                    "--data", str(world.data), "--out", str(tmp_path / "same"), "--max-tokens", "64",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if "identical" in line]
    assert warnings == ["the base and target MLP weights are identical in every selected layer, so every delta is 0: "
                        "is --base the same model as --target?"], res.output
    assert (tmp_path / "same" / "zarr.json").is_file()
    # and training on it ends cleanly, every layer reported as unchanged
    res = CliRunner().invoke(main, ["train", "--store", str(tmp_path / "same"), "--out", str(tmp_path / "run"),
                                    "--features", "8", "--batch", "8", "--tokens", "64", "--holdout-frac", "0.3",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    logged = [line for line in res.output.splitlines() if line.startswith("layer ") and "no difference" in line]
    shown = [line for line in res.output.splitlines() if "no difference (delta below --unchanged-below)" in line]
    assert len(logged) == len(shown) == 4, res.output  # the tiny pair's four layers, in the log and the result
