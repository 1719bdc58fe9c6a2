"""The ``tca`` command line: click commands that turn flags into configs and call one function.

Results go to stdout; logs and progress bars go to stderr. A ``TcaError`` (bad input the
user can fix) becomes one sentence and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import inspect
import json
import logging
import re
import sys
import types
import typing

import click

from tca import TcaError, __version__
from tca.adapted.config import RefineConfig
from tca.train.config import TrainConfig, parse_list

log = logging.getLogger("tca")


class _Group(click.Group):
    """Turns every failure below it into one sentence on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # the one place that decides how failures look
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {_sentence(exc)}", err=True)
            ctx.exit(2 if isinstance(exc, (TcaError, KeyboardInterrupt)) else 1)


def _sentence(exc: BaseException) -> str:
    if isinstance(exc, TcaError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "the disk is full; free space and run the command again with --resume."
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}."
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


# Options several commands share, defined once so their help reads the same everywhere.
base_option = click.option("--base", required=True,
                           help="Base model: Hugging Face id or local directory (only its MLPs are read).")
target_option = click.option("--target", required=True,
                             help="Target (fine-tuned) model: Hugging Face id or local directory.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
splice_dtype_option = click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
                                   show_default=True)


class _CommaList(click.ParamType):
    """A comma list of positive numbers such as ``0.001,0.003`` (``parse_list``'s one sentence when not)."""

    def __init__(self, kind: type):
        self.kind, self.name = kind, f"{kind.__name__},..."

    def convert(self, value, param, ctx):
        return value if isinstance(value, list) else parse_list(value, self.kind, param.opts[0])


def _click_type(hint):
    """The click type of a field's annotation: str, int, float, ``X | None``, Literal or list."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _click_type(args[0])
    if origin is typing.Literal:
        return click.Choice(args)
    if origin is list:
        return _CommaList(args[0])
    return hint


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal after it) as one paragraph, for ``--help``:
    a ``name`` in it reads as that field's flag, or that constant's value, or else the bare name."""
    names = {f.name for f in dataclasses.fields(cls)}
    constants = vars(sys.modules[cls.__module__])

    def plain(m: re.Match) -> str:
        name = m.group(1)
        if name in names:
            return "--" + name.replace("_", "-")
        value = constants.get(name)
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else name

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        node.target.id: re.sub(r"``([^`]+)``", plain, " ".join(after.value.value.split()))
        for node, after in zip(body, body[1:])
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
    }


def config_options(cls):
    """A decorator adding one option per field of the dataclass ``cls``, so the config is the one
    place a setting is described: ``--field-name`` of the field's type and default, its docstring
    as help; a field without a default is required, a bool is a flag (``--x/--no-x`` when on by
    default), a list is a comma list."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)

    def option(f: dataclasses.Field):
        flag, hint, doc = "--" + f.name.replace("_", "-"), hints[f.name], docs[f.name]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if hint is bool:
            decl = f"{flag}/--no-{flag[2:]}" if default else flag
            return click.option(decl, f.name, is_flag=True, default=default, show_default=default, help=doc)
        if default is dataclasses.MISSING:
            return click.option(flag, f.name, type=_click_type(hint), required=True, help=doc)
        if isinstance(default, list):
            default = ",".join(map(str, default))  # shown as typed, parsed like a typed value
        return click.option(flag, f.name, type=_click_type(hint), default=default, show_default=default is not None,
                            help=doc)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):  # last first, as stacked decorators: --help in field order
            fn = option(f)(fn)
        return fn

    return decorate


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tca")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug logs).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int, quiet: bool) -> None:
    """tca: activation caches for model diffing with transcoder adapters.

    \b
    The pipeline, one command per stage:
      harvest   paired MLP activations of a base and a fine-tuned model -> Zarr store
      train     sparse transcoder adapters offline from the store
      index     every feature activation into DuckDB; then `tca sql`, `tca top`
      eval      splice adapters into the model and measure what they recover
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s", force=True)


def emit(data: dict, as_json: bool, render) -> None:
    """Print a command's result: JSON on request, else the command's own rendering."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


@main.command("demo")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for everything the demo writes.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--quick", is_flag=True, help="Small budgets everywhere: a smoke test of every stage (what CI runs).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo_cmd(out, overwrite, quick, device, as_json) -> None:
    """The whole pipeline on the shipped demo pair: harvest, train, refine, index, eval, study.

    About 5 minutes on 2 CPU cores. Everything lands in --out: the store, the offline and the
    refined adapters, the index, eval.json and the hesitation study (study/study.md).
    """
    import dataclasses

    from tca.adapted.generation import Figures, figures_table
    from tca.toy.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=out, overwrite=overwrite, quick=quick, device=device))

    def render(d: dict) -> None:
        ev, st = d["eval"], d["study"]
        faith, rec = ev["faithfulness"], ev.get("recovery") or {}
        click.echo(f"stages (s): {', '.join(f'{k} {v:g}' for k, v in d['seconds'].items())}")
        click.echo(f"KL(target || hybrid) {faith['kl_hybrid']:.3f}, KL(target || adapted) {faith['kl_adapted']:.3f}: "
                   f"gap closed {faith['fraction_closed']:.1%}")
        if ev.get("behaviour"):
            b = ev["behaviour"]
            click.echo(figures_table({name: Figures(**f) for name, f in b.items()}))
            gain = rec.get("accuracy_gain_recovered")
            click.echo(f"accuracy gain recovered {'n/a' if gain is None else f'{gain:.0%}'}, "
                       f"length adapted/target {rec.get('length_ratio') or 0:.2f}")
        chosen = len(st["hesitation_features"])
        click.echo(f"hesitation features: {chosen} ({st['fraction_of_features']:.2%} of {st['total_features']}); "
                   f"necessary {'yes' if st['necessary'] else 'no'}, sufficient {'yes' if st['sufficient'] else 'no'}")
        for name, path in d["paths"].items():
            click.echo(f"  {name:<9} {path}")
        click.echo(f"  report    {d['paths']['study']}/study.md")

    emit(dataclasses.asdict(result), as_json, render)


@main.command("build-pair")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory to write base/, reasoning/, data/ and README.md into.")
@click.option("--seed", default=0, show_default=True, help="Seed of the problems, initialisation and batch order.")
@click.option("--threads", default=2, show_default=True, help="CPU threads (part of the recipe: results depend on it).")
@click.option("--force", is_flag=True, help="Overwrite the pair in a directory that already holds files.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths and measured figures as JSON.")
def build_pair(out: str, seed: int, threads: int, force: bool, as_json: bool) -> None:
    """Build the demo base/reasoning pair from a fixed seed and measure it (minutes on a CPU)."""
    from pathlib import Path

    from tca.adapted.generation import figures_json
    from tca.toy.build import BuildConfig, build  # torch-heavy; keeps `tca --help` quick

    result = build(BuildConfig(out=Path(out), seed=seed, threads=threads, overwrite=force))
    data = {
        "base": result.base, "reasoning": result.reasoning, "readme": result.readme,
        "figures": figures_json(result.figures) if result.figures else None,
        "seconds": round(result.seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1),
        "threads": result.threads, "bytes": result.bytes,
    }
    emit(data, as_json, lambda d: click.echo(
        f"wrote {out} in {d['seconds']:.0f}s wall, {d['cpu_seconds']:.0f}s CPU on {d['threads']} threads; "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in d["bytes"].items()) + f" (figures in {d['readme']})"))


@main.command()
@base_option
@target_option
@click.option("--data", required=True, help="JSONL or Parquet file of conversations or texts.")
@click.option("--out", required=True, help="Store to write: a path or an fsspec URL.")
@click.option("--layers", default="all", show_default=True, help="'all' or a list like 0,3,5-7.")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many tokens in all.")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens kept per document.")
@click.option("--batch-tokens", default=8192, show_default=True, help="Padded tokens per forward pass.")
@click.option("--keep-frac", default=1.0, show_default=True, help="Fraction of tokens stored, chosen per token from --seed.")
@click.option("--seed", default=0, show_default=True, help="Seed of the per-token subsampling.")
@click.option("--skip-sinks", is_flag=True, help="Store no rows for the first position and BOS tokens.")
@click.option("--store-y", is_flag=True, help="Also store y = MLP_target(x).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True)
@device_option
@click.option("--format", "fmt", type=click.Choice(["auto", "conversations", "text"]), default="auto", show_default=True)
@click.option("--template", type=click.Choice(["deepseek", "chat", "none"]), default="deepseek", show_default=True,
              help="How conversations become text (deepseek keeps the thinking).")
@click.option("--block-rows", default=4096, show_default=True, help="Rows per shard file (unit of writing).")
@click.option("--chunk-rows", default=512, show_default=True, help="Rows per chunk (unit of reading).")
@click.option("--compressor", type=click.Choice(["none", "zstd"]), default="none", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted harvest of the same configuration.")
@click.option("--storage-options", default=None, help="fsspec options of --out as JSON (default: AWS_* variables for s3://).")
@click.option("--writers", default=2, show_default=True, help="Writer threads (more for object storage).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def harvest(base, target, data, out, layers, max_tokens, seq_len, batch_tokens, keep_frac, seed, skip_sinks,
            store_y, dtype, device, fmt, template, block_rows, chunk_rows, compressor, resume, storage_options,
            writers, as_json) -> None:
    """Paired MLP activations (x, delta) of a base and a target model into a Zarr store.

    Under torchrun, each rank harvests its own share of the store's blocks into the same --out.
    """
    import dataclasses

    from tca.cache.harvest import HarvestConfig
    from tca.cache.harvest import harvest as run_harvest
    from tca.cache.plan import PlanConfig
    from tca.cache.store import parse_storage_options

    plan = PlanConfig(data=data, format=fmt, template=template, seq_len=seq_len, max_tokens=max_tokens,
                      keep_frac=keep_frac, seed=seed, skip_sinks=skip_sinks)
    cfg = HarvestConfig(base=base, target=target, out=out, plan=plan, layers=layers, batch_tokens=batch_tokens,
                        store_y=store_y, dtype=dtype, device=device, resume=resume, block_rows=block_rows,
                        chunk_rows=chunk_rows, compressor=compressor, writers=writers,
                        storage_options=parse_storage_options(storage_options))
    result = run_harvest(cfg)
    emit(dataclasses.asdict(result), as_json, lambda d: click.echo(
        f"wrote {d['n_rows']} rows of {d['n_tokens']} tokens to {d['url']} in {d['seconds']:.1f}s"
        if d["world_size"] == 1 else
        f"rank {d['rank']} of {d['world_size']} wrote {d['blocks_written']} blocks to {d['url']} in {d['seconds']:.1f}s"))


@main.group()
def cache() -> None:
    """Inspect and check activation stores."""


@cache.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def cache_info(store: str, as_json: bool) -> None:
    """Models, layers, rows, tokens, documents, bytes on disk and completeness of STORE."""
    from tca.cache.verify import info

    def render(d: dict) -> None:
        models = d["models"] or {}
        for role in ("base", "target"):
            click.echo(f"{role:<12}{(models.get(role) or {}).get('id')}")
        click.echo(f"{'layers':<12}{d['layers']}  d_model={d['d_model']}  dtype={d['dtype']}  arrays={d['arrays']}")
        click.echo(f"{'rows':<12}{d['rows_committed']} of {d['rows']} committed "
                   f"({d['blocks_committed']}/{d['blocks']} blocks){'' if d['complete'] else '  INCOMPLETE'}")
        click.echo(f"{'tokens':<12}{d['tokens']} in {d['docs']} documents")
        click.echo(f"{'on disk':<12}{d['bytes_on_disk'] / 1e6:.1f} MB  (blocks of {d['block_rows']} rows, "
                   f"chunks of {d['chunk_rows']}, compressor {d['compressor']})")

    emit(info(store), as_json, render)


@cache.command("verify")
@click.argument("store")
@click.option("--recompute", default=0, show_default=True, help="Rows to recompute from the models and compare.")
@click.option("--seed", default=0, show_default=True, help="Seed of the sampled rows.")
@click.option("--base", default=None, help="Base model to use instead of the one recorded in the store.")
@click.option("--target", default=None, help="Target model to use instead of the one recorded in the store.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def cache_verify(ctx, store, recompute, seed, base, target, device, as_json) -> None:
    """Find missing, truncated or corrupted chunks and row mismatches; exit 1 when any."""
    import dataclasses

    from tca.cache.verify import VerifyConfig, verify

    report = verify(VerifyConfig(url=store, recompute=recompute, seed=seed, base=base, target=target, device=device))

    def render(d: dict) -> None:
        for problem in d["problems"]:
            click.echo(f"FAIL  {problem}")
        errors = ", ".join(f"{k} {v:.1e}" for k, v in d["max_rel_error"].items())
        click.echo(f"{'ok' if d['ok'] else 'failed'}: {d['blocks_read']} blocks read, "
                   f"{d['rows_recomputed']} rows recomputed{f' (max relative error {errors})' if errors else ''}")

    emit(dataclasses.asdict(report) | {"ok": report.ok}, as_json, render)
    ctx.exit(0 if report.ok else 1)


@main.command("index")
@click.option("--cache", "cache_url", required=True, help="The activation store (path or fsspec URL).")
@click.option("--adapters", multiple=True, required=True,
              help="Adapter set directory; NAME=DIR names it (default: the directory's name). Repeatable.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="DuckDB index to create or update.")
@click.option("--layers", default="all", show_default=True, help="'all' or a list like 0,3,5-7.")
@click.option("--min-act", default=0.0, show_default=True, help="Keep activations strictly above this value.")
@click.option("--target", default=None, help="Target model directory for the logit lens (default: the recorded one).")
@click.option("--batch-rows", default=4096, show_default=True, help="Rows encoded at once.")
@click.option("--workers", type=int, default=None, help="Encode on a local Dask cluster of N worker processes.")
@click.option("--scheduler", default=None, help="Encode on the Dask cluster at this address (tcp://host:8786).")
@click.option("--parts", default=None,
              help="Where Dask workers write Parquet parts (a path or URL they all reach; default: beside --out).")
@click.option("--storage-options", default=None, help="fsspec options of the store and parts as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def index_cmd(cache_url, adapters, out, layers, min_act, target, batch_rows, workers, scheduler, parts,
              storage_options, as_json) -> None:
    """Encode every stored row with adapters and index every nonzero activation in DuckDB."""
    import dataclasses
    from pathlib import Path

    from tca.cache.cluster import ClusterConfig
    from tca.cache.store import parse_storage_options
    from tca.query.index import IndexConfig, build_index

    cluster = None
    if workers is not None or scheduler is not None:
        cluster = ClusterConfig(scheduler=scheduler, workers=2 if workers is None else workers)
    cfg = IndexConfig(cache=cache_url, adapters=list(adapters), out=Path(out), layers=layers, min_act=min_act,
                      target=target, batch_rows=batch_rows, cluster=cluster, parts=parts,
                      storage_options=parse_storage_options(storage_options))
    summary = build_index(cfg)
    emit(dataclasses.asdict(summary), as_json, lambda d: click.echo(
        f"indexed {sum(d['written'].values())} activations of {len(d['written'])} adapter layers "
        f"({d['rows']} rows each, {d['rows_per_s']:.0f} rows/s) into {d['out']}"))


@main.command("sql")
@click.argument("index", type=click.Path(dir_okay=False))
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the result to this file.")
def sql_cmd(index, query, fmt, out) -> None:
    """Run one read-only SQL query over INDEX (the macros top_examples, features_on, … are there)."""
    from pathlib import Path

    from tca.query.sql import SqlConfig, export
    from tca.query.sql import query as run_query

    cfg = SqlConfig(index=Path(index), sql=query, format=fmt, out=Path(out) if out else None)
    if cfg.format == "parquet" and cfg.out is None:
        raise TcaError("--format parquet needs --out FILE.")
    table = run_query(cfg.index, cfg.sql)
    if cfg.format == "table" and cfg.out is None:
        from rich.console import Console

        from tca.query.render import arrow_table

        Console().print(arrow_table(table))
    elif cfg.out is not None:
        cfg.out.write_bytes(export(table, "csv" if cfg.format == "table" else cfg.format))
    else:
        click.echo(export(table, cfg.format), nl=False)


@main.command("top")
@click.argument("index", type=click.Path(dir_okay=False))
@click.argument("layer", type=int)
@click.argument("feature", type=int)
@click.option("-k", default=20, show_default=True, help="Examples to show.")
@click.option("--context", default=12, show_default=True, help="Tokens of context either side.")
@click.option("--adapter", default=None, help="Adapter name (default: the index's only one).")
def top_cmd(index, layer, feature, k, context, adapter) -> None:
    """A feature's top examples, highlighted, with its statistics and logit lens."""
    from tca.query.render import print_feature
    from tca.query.sql import connect
    from tca.query.view import feature_view

    con = connect(index)
    try:
        view = feature_view(con, layer, feature, adapter, k, context)
    finally:
        con.close()
    print_feature(view)


@main.command("report")
@click.argument("index", type=click.Path(dir_okay=False))
@click.argument("layer", type=int, required=False)
@click.argument("feature", type=int, required=False)
@click.option("-o", "--out", required=True, type=click.Path(), help="The page, or with --all a directory.")
@click.option("--all", "all_features", is_flag=True, help="A page per live feature (of LAYER if given) + index.html.")
@click.option("--adapter", default=None, help="Adapter name (default: the index's only one).")
@click.option("-k", default=20, show_default=True, help="Examples per page.")
@click.option("--context", default=12, show_default=True, help="Tokens of context either side.")
def report_cmd(index, layer, feature, out, all_features, adapter, k, context) -> None:
    """Static HTML feature pages (examples, histogram, region profile, logit lens); no server needed."""
    from pathlib import Path

    from tca.query.report import ReportConfig, make_report

    page = make_report(ReportConfig(index=Path(index), out=Path(out), layer=layer, feature=feature,
                                    all_features=all_features, adapter=adapter, k=k, context=context))
    click.echo(f"wrote {page}")


@main.command("train")
@config_options(TrainConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_cmd(as_json: bool, **fields) -> None:
    """Train sparse transcoder adapters offline from an activation store."""
    from tca.train.trainer import train

    summary = train(TrainConfig(**fields))

    def render(d: dict) -> None:
        for name, member in d["members"].items():
            for layer, m in member["layers"].items():
                click.echo(f"{name:<10} layer {layer:>3}  FVE {m['fve']:.3f}  NMSE {m['nmse']:.4f}  "
                           f"L0 {m['l0']:.1f}  dead {m['dead_frac']:.1%}  -> {member['path']}")
        click.echo(f"{d['tokens_seen']} tokens; loader mixing {d['loader']['mixing']:.2f} of ideal")

    emit(summary, as_json, render)


@main.command("refine")
@config_options(RefineConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def refine_cmd(as_json: bool, **fields) -> None:
    """Refine adapters end to end: KL to the target (also at layer cut-offs), hidden-state NMSE and L1."""
    from tca.adapted.refine import refine

    summary = refine(RefineConfig(**fields))

    def render(d: dict) -> None:
        closed = "n/a" if d["fraction_closed"] is None else f"{d['fraction_closed']:.1%}"
        click.echo(f"{d['adapters']}: {d['tokens_seen']} tokens, {d['steps']} steps; held out: KL(target || adapted) "
                   f"{d['kl_adapted']:.4f} vs hybrid {d['kl_hybrid']:.4f} nats/token, gap closed {closed}")
        for layer, l0 in d["l0_layers"].items():
            click.echo(f"layer {layer:>3}  L0 {l0:.1f}  hidden-state NMSE {d['nmse_adapted'][layer]:.4f}")

    emit(summary, as_json, render)


@main.command("export")
@click.argument("adapters", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hf-reference", "transcoder"]), default="hf-reference",
              show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--base", default=None, help="Base model directory (hf-reference: its MLP weights).")
@click.option("--target", default=None, help="Target model directory (hf-reference: backbone, config, tokenizer).")
def export_cmd(adapters, fmt, out, base, target) -> None:
    """Write ADAPTERS as the reference implementation's HF checkpoint or per-layer transcoder files."""
    from tca.adapted.export import ExportConfig, export

    click.echo(f"wrote {export(ExportConfig(adapters=adapters, out=out, format=fmt, base=base, target=target))}")


@main.command("import")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter set directory to write.")
def import_cmd(checkpoint, out) -> None:
    """Read the adapters of a reference-layout HF checkpoint into a tca adapter set."""
    from tca.adapted.export import import_hf_reference

    aset = import_hf_reference(checkpoint, out)
    click.echo(f"wrote {out}: layers {aset.layers}, {aset.config.n_features} features")


@main.command("eval")
@click.option("--adapters", required=True, help="Adapter set directory to splice into the target.")
@base_option
@target_option
@click.option("--data", required=True, help="Held-out JSONL or Parquet of conversations or texts.")
@click.option("--max-tokens", type=int, default=100_000, show_default=True, help="Teacher-forced tokens for KL and NMSE.")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens kept per document.")
@click.option("--batch", default=8, show_default=True, help="Documents per forward pass.")
@click.option("--generate", "n_generate", default=0, show_default=True,
              help="Also generate from the first N prompts of --data in each mode (0: skip).")
@click.option("--max-new-tokens", default=512, show_default=True, help="Longest generated response.")
@splice_dtype_option
@device_option
@click.option("--layers", default="all", show_default=True, help="Splice only these layers' adapters: all or 0,3,5-7.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_cmd(adapters, base, target, data, max_tokens, seq_len, batch, n_generate, max_new_tokens, dtype, device,
             layers, as_json) -> None:
    """Faithfulness of spliced adapters: KL, hidden-state NMSE and behaviour vs the target and the hybrid."""
    import dataclasses

    from tca.adapted.evaluate import EvalConfig, evaluate
    from tca.adapted.generation import figures_table

    report = evaluate(EvalConfig(adapters=adapters, base=base, target=target, data=data, max_tokens=max_tokens,
                                 seq_len=seq_len, batch=batch, generate=n_generate, max_new_tokens=max_new_tokens,
                                 dtype=dtype, device=device, layers=layers))

    def pct(v) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    def render(d: dict) -> None:
        f = d["faithfulness"]
        click.echo(f"{d['adapters']}: layers {d['layers']} spliced, {d['dtype']} on {d['device']}, "
                   f"{f['tokens']} tokens")
        click.echo(f"KL(target || hybrid)   {f['kl_hybrid']:.4f} nats/token")
        click.echo(f"KL(target || adapted)  {f['kl_adapted']:.4f} nats/token   gap closed {pct(f['fraction_closed'])}")
        click.echo("| layer | NMSE hybrid | NMSE adapted |\n|---:|---:|---:|")
        for layer, h in f["nmse_hybrid"].items():
            click.echo(f"| {layer} | {h:.4f} | {f['nmse_adapted'][layer]:.4f} |")
        if report.behaviour is not None:
            r = d["recovery"]
            click.echo(figures_table(report.behaviour))
            ratio = "n/a" if r["length_ratio"] is None else f"{r['length_ratio']:.2f}"
            click.echo(f"accuracy gain recovered {pct(r['accuracy_gain_recovered'])}, hesitation gain recovered "
                       f"{pct(r['hesitation_gain_recovered'])}, length adapted/target {ratio}")

    emit(dataclasses.asdict(report), as_json, render)


@main.command("intervene")
@click.option("--adapters", required=True, help="Adapter set directory to splice into the target.")
@base_option
@target_option
@click.option("--data", required=True, help="JSONL or Parquet of conversations: teacher-forced text and prompts.")
@click.option("--edit", "edit_spec", required=True,
              help="Features to set: LAYER:FEATURES[=VALUE] joined by ';', FEATURES indices and ranges. "
                   "'2:17,40;3:5-7=4.5' ablates features 17 and 40 of layer 2 and clamps 5, 6, 7 of layer 3 "
                   "at 4.5 (VALUE 0, the default, ablates).")
@click.option("--mode", type=click.Choice(["adapted", "hybrid"]), default="adapted", show_default=True,
              help="adapted: edit the adapted model (ablation: necessity); hybrid: adapters off but the clamped "
                   "features (clamping: sufficiency).")
@click.option("--at-tokens", default=None,
              help="Edit only at positions whose input token is one of these (comma-separated, each one token).")
@click.option("--measure", default="Wait", show_default=True,
              help="Comma-separated tokens whose next-token probability mass is measured (each one token).")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Teacher-forced tokens of --data.")
@click.option("--generate", "n_generate", default=32, show_default=True,
              help="Generate from the first N prompts of --data before and after the edits (0: skip).")
@click.option("--max-new-tokens", default=256, show_default=True, help="Longest generated response.")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens kept per document.")
@click.option("--batch", default=16, show_default=True, help="Documents or prompts per forward pass.")
@splice_dtype_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def intervene_cmd(adapters, base, target, data, edit_spec, mode, at_tokens, measure, max_tokens, n_generate,
                  max_new_tokens, seq_len, batch, dtype, device, as_json) -> None:
    """Ablate or clamp adapter features; p(tokens), KL, length, hesitations and accuracy before and after."""
    import dataclasses

    from tca.adapted.generation import figures_table
    from tca.adapted.intervene import InterventionConfig, run_intervention, split_words

    report = run_intervention(InterventionConfig(
        adapters=adapters, base=base, target=target, data=data, edits=edit_spec, mode=mode,
        at_tokens=split_words(at_tokens) if at_tokens is not None else None, measure=split_words(measure),
        max_tokens=max_tokens, generate_n=n_generate, max_new_tokens=max_new_tokens, seq_len=seq_len, batch=batch,
        dtype=dtype, device=device))

    def render(d: dict) -> None:
        e = report.effect
        for edit in d["edits"]:
            where = f" at tokens {edit['token_ids']}" if edit["token_ids"] else ""
            click.echo(f"layer {edit['layer']} features {edit['features']} = {edit['value']:g}{where} ({d['mode']} model)")
        ratio = f"x{e.p_after / e.p_before:.3g}" if e.p_before > 0 else "n/a"
        click.echo(f"p({'|'.join(d['measure'])}) {e.p_before:.4g} -> {e.p_after:.4g} ({ratio}) over "
                   f"{e.n_positions} positions; KL(before || after) {e.kl:.4g} nats/token")
        if e.before is not None:
            click.echo(figures_table({"before": e.before, "after": e.after}))

    emit(dataclasses.asdict(report), as_json, render)


@main.command("attribute")
@click.option("--adapters", required=True,
              help="Adapter set directory; NAME=DIR names it as in the index (default: the directory's name).")
@base_option
@target_option
@click.option("--data", required=True, help="JSONL or Parquet of conversations or texts.")
@click.option("--target-token", "token", required=True,
              help="The token whose logit is attributed, e.g. Wait (one token of the target's tokenizer).")
@click.option("--layers", default="all", show_default=True, help="Layers to attribute to: 'all' or 0,3,5-7.")
@click.option("--max-tokens", type=int, default=20_000, show_default=True, help="Tokens of --data read.")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens kept per document.")
@click.option("--batch", default=8, show_default=True, help="Documents per forward and backward pass.")
@splice_dtype_option
@device_option
@click.option("--index", type=click.Path(dir_okay=False), default=None,
              help="Write the whole ranking into this index's attributions table (replacing this adapter and token's).")
@click.option("--contrast", is_flag=True,
              help="Attribute the token's logit minus that of the target's most likely other token there.")
@click.option("--top", default=20, show_default=True, help="Features printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and the top features as JSON.")
def attribute_cmd(adapters, base, target, data, token, layers, max_tokens, seq_len, batch, dtype, device, index,
                  contrast, top, as_json) -> None:
    """Rank adapter features by gradient x activation of a token's logit where the target predicts it."""
    from tca.adapted.attribute import AttributionConfig, adapter_name, run_attribution
    from tca.query.attribution import check_writable, write_attributions

    cfg = AttributionConfig(adapters=adapters, base=base, target=target, data=data, token=token, layers=layers,
                            max_tokens=max_tokens, seq_len=seq_len, batch=batch, dtype=dtype, device=device,
                            contrast=contrast, top=top)
    if index is not None:
        check_writable(index, adapter_name(adapters)[0])
    run = run_attribution(cfg)
    summary = run.summary(cfg.top)
    if index is not None:
        summary |= {"index": index, "rows_written": write_attributions(index, run.adapter, run.token, run.result)}

    def render(d: dict) -> None:
        click.echo(f"{d['token']!r} (id {d['token_id']}): the target predicts it at {d['n_positions']} of "
                   f"{d['n_tokens']} positions; adapter {d['adapter']}, layers {d['layers']}")
        click.echo(f"{'rank':>4} {'layer':>5} {'feature':>7} {'score':>10} {'per pos':>9} {'active':>9}")
        for r in d["top"]:
            click.echo(f"{r['rank']:>4} {r['layer']:>5} {r['feature']:>7} {r['score']:>10.4g} {r['mean_score']:>9.4g} "
                       f"{r['n_active']:>5}/{r['n_positions']}")
        if d.get("index"):
            click.echo(f"wrote {d['rows_written']} rows to {d['index']} (table attributions)")

    emit(summary, as_json, render)


@main.group("study")
def study() -> None:
    """Automated studies that join attribution, interventions and the index."""


@study.command("hesitation")
@click.option("--adapters", required=True,
              help="Adapter set directory; NAME=DIR names it as in the index (default: the directory's name).")
@base_option
@target_option
@click.option("--data", required=True, help="Held-out conversations with reference responses (JSONL or Parquet).")
@click.option("--index", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The index of these adapters (tca index); the attributions are written into it.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for study.md, study.json, plots.")
@click.option("--words", default="Wait", show_default=True, help="Hesitation words, comma-separated, one token each.")
@click.option("--prompts", default=100, show_default=True, help="Held-out prompts generated from per condition.")
@click.option("--max-new-tokens", default=256, show_default=True, help="Longest generated response.")
@click.option("--max-features", default=64, show_default=True,
              help="Most candidates tried before giving up on the necessity criterion.")
@click.option("--min-before-word", default=0.05, show_default=True,
              help="Least share of a candidate's indexed activations on the token just before a hesitation word.")
@click.option("--clamp-scales", default="0.25,0.5,1,2", show_default=True,
              help="Clamp values in the hybrid, as multiples of each feature's mean active value.")
@click.option("--attribution-tokens", default=20_000, show_default=True, help="Teacher-forced tokens attributed over.")
@click.option("--contrast/--no-contrast", default=True, show_default=True,
              help="Attribute each word's logit minus that of what the target says instead.")
@splice_dtype_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole study as JSON.")
def study_hesitation(adapters, base, target, data, index, out, words, prompts, max_new_tokens, max_features,
                     min_before_word, clamp_scales, attribution_tokens, contrast, dtype, device, as_json) -> None:
    """Find the features that make the target hesitate; test that they are necessary and sufficient.

    Attribution of each hesitation word's logit ranks the adapter features; the index keeps
    those that fire just before a hesitation word. Candidates are ablated in the adapted model
    best first, each joining the set if accuracy stays within 5 points and hesitations do not
    rise, until the set cuts hesitations per response by 80% (a random set of the same size is
    the control); clamping the set on in the hybrid tests whether it brings hesitation back.
    The report (study.md, study.json, necessity.png, sufficiency.png) goes to --out.
    """
    import dataclasses

    from tca.query.study import StudyConfig, hesitation_study

    cfg = StudyConfig(adapters=adapters, base=base, target=target, data=data, index=index, out=out,
                      words=[w.strip() for w in words.split(",") if w.strip()], prompts=prompts,
                      max_new_tokens=max_new_tokens, max_features=max_features, min_before_word=min_before_word,
                      clamp_scales=parse_list(clamp_scales, float, "--clamp-scales"),
                      attribution_tokens=attribution_tokens, contrast=contrast, dtype=dtype, device=device)
    report = hesitation_study(cfg)

    def render(d: dict) -> None:
        base_h = d["baseline"]
        click.echo(f"hesitations per response: target {base_h['target']['hesitations']:.2f}, "
                   f"hybrid {base_h['hybrid']['hesitations']:.2f}, adapted {base_h['adapted']['hesitations']:.2f}")
        chosen = [(f["layer"], f["feature"]) for f in d["hesitation_features"]]
        verdict = "yes" if d["necessary"] else "no"
        if chosen:
            click.echo(f"necessary: {verdict}; ablating {len(chosen)} features ({d['fraction_of_features']:.2%} of "
                       f"{d['total_features']}) cuts hesitations by {d['hesitation_cut']:.0%}, accuracy "
                       f"{100 * (d['accuracy_change'] or 0):+.1f} points: {chosen}")
        else:
            click.echo("necessary: no; no candidate kept accuracy without raising hesitations")
        best = max(d["sufficiency"], key=lambda t: t["figures"]["hesitations"])
        click.echo(f"sufficient: {'yes' if d['sufficient'] else 'no'} ({best['name']}: "
                   f"{best['figures']['hesitations']:.2f} hesitations per response)")
        click.echo(f"report: {out}/study.md")

    emit(dataclasses.asdict(report), as_json, render)


@main.command("plot")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", default="curves.png", show_default=True, type=click.Path(dir_okay=False))
def plot_cmd(run, out) -> None:
    """Loss, L0, FVE and dead fraction against tokens for the training run in RUN."""
    from tca.train.plot import plot

    click.echo(f"wrote {plot(run, out)}")


@cache.command("stats")
@click.argument("store")
@click.option("--layers", default="all", show_default=True, help="'all' or a list like 0,3,5-7.")
@click.option("--scheduler", default=None, help="Run on the Dask cluster at this address (tcp://host:8786).")
@click.option("--workers", default=2, show_default=True, help="Worker processes of the local Dask cluster.")
@click.option("--outlier-factor", default=10.0, show_default=True, help="Outlier: norm above this × the median.")
@click.option("--top", "top_outliers", default=10, show_default=True, help="Largest-norm rows listed per array.")
@click.option("--storage-options", default=None, help="fsspec options of STORE as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print everything (mean and variance vectors too) as JSON.")
def cache_stats(store, layers, scheduler, workers, outlier_factor, top_outliers, storage_options, as_json) -> None:
    """Per layer: mean, row-norm quantiles, per-dimension variance and outlier rows of x and delta (Dask)."""
    import dataclasses

    from tca.cache.cluster import ClusterConfig
    from tca.cache.stats import StatsConfig, store_stats
    from tca.cache.store import parse_storage_options

    cfg = StatsConfig(store=store, layers=layers, cluster=ClusterConfig(scheduler=scheduler, workers=workers),
                      storage_options=parse_storage_options(storage_options), outlier_factor=outlier_factor,
                      top_outliers=top_outliers)
    stats = store_stats(cfg)

    def render(d: dict) -> None:
        click.echo(f"{d['url']}: {d['rows']} committed rows, {len(d['layers'])} layers "
                   f"({d['rows_per_s']:.0f} rows/s)")
        for layer, arrays in d["layers"].items():
            for name, s in arrays.items():
                if not s["mean"]:
                    continue
                q = s["norm_quantiles"]
                mean_norm = sum(v * v for v in s["mean"]) ** 0.5
                mean_var = sum(s["variance"]) / len(s["variance"])
                click.echo(f"layer {layer:>3} {name:<6} |mean| {mean_norm:.4g}  mean var {mean_var:.4g}  "
                           f"norm p50 {q['0.5']:.4g} p99 {q['0.99']:.4g} max {q['1.0']:.4g}  "
                           f"{s['n_outliers']} outlier rows")
                for o in s["outliers"][:3]:
                    click.echo(f"    row {o['row']} (doc {o['doc']} pos {o['pos']} {o['piece']!r}): "
                               f"norm {o['norm']:.4g} = {o['norm_over_median']:.1f} x median")

    emit(dataclasses.asdict(stats), as_json, render)


if __name__ == "__main__":
    main()
