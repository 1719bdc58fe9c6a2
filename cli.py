"""The ``tca`` command line: click commands that turn flags into configs and call one function.

Each command's options come from its config dataclass (tca.options): the field docstrings are the
``--help``. What stays here is per command: which function runs and how its result reads.

Results go to stdout; logs and progress bars go to stderr. A ``TcaError`` (bad input the
user can fix) becomes one sentence and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys

import click

from tca import TcaError, __version__
from tca.options import config_command

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



json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@config_command(main, "demo", "tca.toy.demo:DemoConfig")
@json_option
def demo_cmd(cfg, as_json) -> None:
    """The whole pipeline on the shipped demo pair: harvest, train, refine, index, eval, study.

    About 350 CPU seconds per seed at --threads 1 (docs/study.md, On the demo pair; the stage
    timings it prints are CPU seconds, which a shared machine's load does not inflate). Everything
    lands in --out: the store, the offline and the refined adapters, the index, eval.json and the
    hesitation study (study/study.md); with --seeds N each seed's in --out/seed-S/, and
    stability.md compares the seeds.
    """
    from pathlib import Path

    from tca.adapted.generation import Figures, figures_table
    from tca.toy.demo import run_demo

    result = run_demo(cfg)

    def render(d: dict) -> None:
        ev, st = d["eval"], d["study"]
        faith, rec = ev["faithfulness"], ev.get("recovery") or {}
        click.echo(f"stages (s): {', '.join(f'{k} {v:g}' for k, v in d['seconds'].items())}")
        if len(d["seeds"]) > 1:
            # the table itself is the comparison; the first seed's figures would read as the result
            click.echo(Path(d["paths"]["stability"]).read_text())
        else:
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
        if len(d["seeds"]) == 1:
            click.echo(f"  report    {d['paths']['study']}/study.md")

    emit(dataclasses.asdict(result), as_json, render)


@config_command(main, "build-pair", "tca.toy.build:BuildConfig")
@json_option
def build_pair(cfg, as_json: bool) -> None:
    """Build the demo base/reasoning pair from a fixed seed and measure it (minutes on a CPU)."""
    from tca.adapted.generation import figures_json
    from tca.toy.build import build  # torch-heavy; keeps `tca --help` quick

    result = build(cfg)
    data = {
        "base": result.base, "reasoning": result.reasoning, "readme": result.readme,
        "figures": figures_json(result.figures) if result.figures else None,
        "seconds": round(result.seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1),
        "threads": result.threads, "bytes": result.bytes,
    }
    emit(data, as_json, lambda d: click.echo(
        f"wrote {cfg.out} in {d['seconds']:.0f}s wall, {d['cpu_seconds']:.0f}s CPU on {d['threads']} threads; "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in d["bytes"].items()) + f" (figures in {d['readme']})"))


@config_command(main, "harvest", "tca.cache.harvest:HarvestConfig")
@json_option
def harvest(cfg, as_json) -> None:
    """Paired MLP activations (x, delta) of a base and a target model into a Zarr store.

    Under torchrun, each rank harvests its own share of the store's blocks into the same --out.
    """
    from tca.cache.harvest import harvest as run_harvest

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
@json_option
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
        if any(n != d["blocks_committed"] for n in d["blocks_written"].values()):  # a harvest in passes, mid-way
            click.echo(f"{'written':<12}" + ", ".join(f"layer {layer}: {n}/{d['blocks']}"
                                                      for layer, n in d["blocks_written"].items()) + " blocks")
        click.echo(f"{'tokens':<12}{d['tokens']} in {d['docs']} documents")
        click.echo(f"{'on disk':<12}{d['bytes_on_disk'] / 1e6:.1f} MB  (blocks of {d['block_rows']} rows, "
                   f"chunks of {d['chunk_rows']}, compressor {d['compressor']})")

    emit(info(store), as_json, render)


@config_command(cache, "verify", "tca.cache.verify:VerifyConfig", arguments=("store",))
@json_option
@click.pass_context
def cache_verify(ctx, cfg, as_json) -> None:
    """Find missing, truncated or corrupted chunks and row mismatches; exit 1 when any."""
    from tca.cache.verify import verify

    report = verify(cfg)

    def render(d: dict) -> None:
        for problem in d["problems"]:
            click.echo(f"FAIL  {problem}")
        errors = ", ".join(f"{k} {v:.1e}" for k, v in d["max_rel_error"].items())
        click.echo(f"{'ok' if d['ok'] else 'failed'}: {d['blocks_read']} blocks read, "
                   f"{d['rows_recomputed']} rows recomputed{f' (max relative error {errors})' if errors else ''}")

    emit(dataclasses.asdict(report) | {"ok": report.ok}, as_json, render)
    ctx.exit(0 if report.ok else 1)


@config_command(cache, "stats", "tca.cache.stats:StatsConfig", arguments=("store",))
@click.option("--json", "as_json", is_flag=True, help="Print everything (mean and variance vectors too) as JSON.")
def cache_stats(cfg, as_json) -> None:
    """Per layer: mean, row-norm quantiles, per-dimension variance and outlier rows of x and delta (Dask)."""
    from tca.cache.stats import store_stats

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


@config_command(main, "index", "tca.query.index:IndexConfig")
@json_option
def index_cmd(cfg, as_json) -> None:
    """Encode every stored row with adapters and index every nonzero activation in DuckDB."""
    from tca.query.index import build_index

    summary = build_index(cfg)
    emit(dataclasses.asdict(summary), as_json, lambda d: click.echo(
        f"indexed {sum(d['written'].values())} activations of {len(d['written'])} adapter layers "
        f"({d['rows']} rows each, {d['rows_per_s']:.0f} rows/s) into {d['out']}"))


@config_command(main, "sql", "tca.query.sql:SqlConfig", arguments=("index", "sql"))
def sql_cmd(cfg) -> None:
    """Run one read-only SQL query over INDEX (the macros top_examples, features_on, … are there).

    A query reaches the index and nothing else: no other file, URL, extension or setting.
    """
    from tca.query.render import run_sql_command

    text = run_sql_command(cfg)
    if text is not None:
        click.echo(text, nl=False)


@config_command(main, "top", "tca.query.render:TopConfig", arguments=("index", "layer", "feature"))
def top_cmd(cfg) -> None:
    """A feature's top examples, highlighted, with its statistics and logit lens."""
    from tca.query.render import show_top

    show_top(cfg)


@config_command(main, "report", "tca.query.report:ReportConfig", arguments=("index", "layer", "feature"))
def report_cmd(cfg) -> None:
    """Static HTML feature pages (examples, histogram, region profile, logit lens); no server needed."""
    from tca.query.report import make_report

    click.echo(f"wrote {make_report(cfg)}")


@config_command(main, "train", "tca.train.config:TrainConfig")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train_cmd(cfg, as_json: bool) -> None:
    """Train sparse transcoder adapters offline from an activation store."""
    from tca.train.trainer import train

    summary = train(cfg)

    def render(d: dict) -> None:
        for name, member in d["members"].items():
            for layer, m in member["layers"].items():
                if m.get("unchanged"):
                    click.echo(f"{name:<10} layer {layer:>3}  no difference (delta below --unchanged-below): "
                               f"no adapter activity  -> {member['path']}")
                    continue
                click.echo(f"{name:<10} layer {layer:>3}  FVE {m['fve']:.3f}  NMSE {m['nmse']:.4f}  "
                           f"L0 {m['l0']:.1f}  dead {m['dead_frac']:.1%}  -> {member['path']}")
        click.echo(f"{d['tokens_seen']} tokens; loader mixing {d['loader']['mixing']:.2f} of ideal")

    emit(summary, as_json, render)


@config_command(main, "refine", "tca.adapted.config:RefineConfig")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def refine_cmd(cfg, as_json: bool) -> None:
    """Refine adapters end to end: KL to the target (also at layer cut-offs), hidden-state NMSE and L1."""
    from tca.adapted.refine import refine

    summary = refine(cfg)

    def render(d: dict) -> None:
        closed = "n/a" if d["fraction_closed"] is None else f"{d['fraction_closed']:.1%}"
        click.echo(f"{d['adapters']}: {d['tokens_seen']} tokens, {d['steps']} steps; held out: KL(target || adapted) "
                   f"{d['kl_adapted']:.4f} vs hybrid {d['kl_hybrid']:.4f} nats/token, gap closed {closed}")
        for layer, l0 in d["l0_layers"].items():
            click.echo(f"layer {layer:>3}  L0 {l0:.1f}  hidden-state NMSE {d['nmse_adapted'][layer]:.4f}")

    emit(summary, as_json, render)



@config_command(main, "export", "tca.adapted.export:ExportConfig", arguments=("adapters",))
def export_cmd(cfg) -> None:
    """Write ADAPTERS as the reference implementation's HF checkpoint or per-layer transcoder files."""
    from tca.adapted.export import export

    click.echo(f"wrote {export(cfg)}")


@config_command(main, "import", "tca.adapted.export:ImportConfig", arguments=("checkpoint",))
def import_cmd(cfg) -> None:
    """Read the adapters of a reference-layout HF checkpoint into a tca adapter set."""
    from tca.adapted.export import import_hf_reference

    aset = import_hf_reference(**dataclasses.asdict(cfg))
    click.echo(f"wrote {cfg.out}: layers {aset.layers}, {aset.config.n_features} features")


@config_command(main, "eval", "tca.adapted.evaluate:EvalConfig")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_cmd(cfg, as_json) -> None:
    """Faithfulness of spliced adapters: KL, hidden-state NMSE and behaviour vs the target and the hybrid."""
    from tca.adapted.evaluate import evaluate
    from tca.adapted.generation import figures_table

    report = evaluate(cfg)

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


@config_command(main, "intervene", "tca.adapted.intervene:InterventionConfig")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def intervene_cmd(cfg, as_json) -> None:
    """Ablate or clamp adapter features; p(tokens), KL, length, hesitations and accuracy before and after.

    --edit '2:17,40;3:5-7=4.5' ablates features 17 and 40 of layer 2 and clamps 5, 6, 7 of layer 3
    at 4.5 (a VALUE of 0, the default, ablates).
    """
    from tca.adapted.generation import figures_table
    from tca.adapted.intervene import run_intervention

    report = run_intervention(cfg)

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


@config_command(main, "attribute", "tca.adapted.attribute:AttributionConfig")
@click.option("--index", type=click.Path(dir_okay=False), default=None,
              help="Write the whole ranking into this index's attributions table (replacing this adapter and token's).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and the top features as JSON.")
def attribute_cmd(cfg, index, as_json) -> None:
    """Rank adapter features by gradient x activation of a token's logit where the target predicts it."""
    from tca.adapted.attribute import run_attribution
    from tca.query.attribution import check_writable, write_attributions
    from tca.train.checkpoint import named_set

    if index is not None:
        check_writable(index, named_set(cfg.adapters)[0])
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


@config_command(study, "hesitation", "tca.query.study:StudyConfig")
@click.option("--json", "as_json", is_flag=True, help="Print the whole study as JSON.")
def study_hesitation(cfg, as_json) -> None:
    """Find the features that make the target hesitate; test that they are necessary and sufficient.

    The held-out prompts are split by a hash of each question: features are chosen on one half
    (attribution of each hesitation word's logit, the index's filter for features that fire just
    before a hesitation word, a greedy ablation search, the clamp scale) and judged on the other.
    Necessary: ablating the set cuts hesitations per response by at least --cut at the lower end
    of its 95% interval, keeps accuracy within --accuracy-tolerance, and beats --controls random
    sets matched in activation frequency. Sufficient: clamping the set on in the hybrid brings at
    least --sufficient-fraction of the target's re-checks (a hesitation word opening a sentence,
    words after it, in a response that ends), lower bound again, without costing the hybrid more
    than --accuracy-tolerance of accuracy, and beats random sets clamped the same way. When no
    clamp scale of the set alone meets those rules on the selection half, up to --support-features
    more adapter features (largest attribution first, each as the adapter computes it) join it
    there, and the verdict judges the whole set. The report
    (study.md, study.json, necessity.png, sufficiency.png) goes to --out.
    """
    from tca.query.study import hesitation_study

    report = hesitation_study(cfg)

    def render(d: dict) -> None:
        base_h = d["baseline"]
        click.echo(f"hesitations per response: target {base_h['target']['hesitations']:.2f}, "
                   f"hybrid {base_h['hybrid']['hesitations']:.2f}, adapted {base_h['adapted']['hesitations']:.2f}")
        chosen = [(f["layer"], f["feature"]) for f in d["hesitation_features"]]
        verdict = "yes" if d["necessary"] else "no"
        if chosen and d["hesitation_cut"] is None:
            click.echo(f"necessary: {verdict}; the adapted model never hesitates on the verdict prompts: {chosen}")
        elif chosen:
            click.echo(f"necessary: {verdict}; ablating {len(chosen)} features ({d['fraction_of_features']:.2%} of "
                       f"{d['total_features']}) cuts hesitations by {d['hesitation_cut']:.0%}, accuracy "
                       f"{100 * (d['accuracy_change'] or 0):+.1f} points (verdict prompts): {chosen}")
        else:
            click.echo("necessary: no; no candidate kept accuracy without raising hesitations")
        clamped = d["sufficiency"][0]
        if d["support_features"]:
            click.echo(f"support features clamped with them: {[tuple(x) for x in d['support_features']]}")
        click.echo(f"sufficient: {'yes' if d['sufficient'] else 'no'} ({clamped['name']}: "
                   f"{clamped['rechecks']:.2f} re-checks per response, "
                   f"{clamped['figures']['truncated']:.0%} cut at the token limit)")
        click.echo(f"report: {cfg.out}/study.md")

    emit(dataclasses.asdict(report), as_json, render)


@config_command(main, "plot", "tca.train.plot:PlotConfig", arguments=("run",))
def plot_cmd(cfg) -> None:
    """Loss, L0, FVE and dead fraction against tokens for the training run in RUN."""
    from tca.train.plot import plot

    click.echo(f"wrote {plot(cfg)}")



@config_command(main, "census", "tca.query.census:CensusConfig", arguments=("index",))
@json_option
def census_cmd(cfg, as_json) -> None:
    """Classify every feature from the index alone (no language model): hesitation, think, answer or other.

    A feature is reasoning-related when at least --min-hesitation of its activations sit just before
    (or on) a hesitation word, or when it fires at least --min-region-ratio times as often per token
    inside <think> (or the answer) as outside, the same token types compared; features with fewer
    than --min-active activations stay unclassified. The macros census() and census_summary() give
    the same figures in SQL (docs/query.md, Census).
    """
    from tca.query.census import census_json, run_census

    report = run_census(cfg)

    def render(d: dict) -> None:
        click.echo(f"{'layer':>5} {'live':>6} {'classed':>7} {'hesitation':>10} {'think':>6} {'answer':>6} "
                   f"{'other':>6}  reasoning-related")
        for r in d["layers"] + [d["total"]]:
            share = "n/a" if r["reasoning_share"] is None else (
                f"{r['reasoning_share']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]")
            k = r["kinds"]
            click.echo(f"{'all' if r['layer'] is None else r['layer']:>5} {r['n_live']:>6} {r['n_classified']:>7} "
                       f"{k['hesitation']:>10} {k['think']:>6} {k['answer']:>6} {k['other']:>6}  "
                       f"{r['n_reasoning']} ({share})")
        click.echo(f"words {', '.join(d['words'])}; {d['rule']} "
                   f"({', '.join(f'{k} {v:g}' for k, v in d['criteria'].items())}); {d['seconds']:.2f}s")
        if d["out"]:
            click.echo(f"wrote {d['out']}")

    emit(census_json(report), as_json, render)



@config_command(main, "explain", "tca.query.explain:ExplainConfig", arguments=("index",))
@json_option
@click.pass_context
def explain_cmd(ctx, cfg, as_json) -> None:
    """Explain features with a language model; score the explanations and classify them (into INDEX).

    Any OpenAI-compatible chat endpoint (vLLM, an API; the key from --api-key-env) reads each
    feature's examples and writes one sentence into INDEX's explanations table. --score has a judge
    pick the active ones among held-out excerpts (balanced accuracy and its 95% interval); --classify
    sorts each explanation into hesitation, planning, answer_formatting (reasoning-related) or other.
    A rerun asks only for what is missing, so a killed run resumes; --dry-run writes the requests as
    batch-API JSONL and --import loads the answers (docs/explain.md). Exit status 1 when a request
    still failed after its retries (a rerun asks again).
    """
    from tca.query.explain import explain, summary_json

    summary = explain(cfg)

    def render(d: dict) -> None:
        for stage, s in d["stages"].items():
            answered = ", ".join(f"{k} {v}" for k, v in sorted(s["answered"].items())) or "nothing asked"
            verb = "written" if d["dry_run"] else "answered"
            click.echo(f"{stage:<9} {s['pending']} to ask ({s['already']} already answered): {verb} {answered}; "
                       f"about {s['est_prompt_tokens']:,} prompt tokens"
                       + (f", endpoint counted {s['prompt_tokens']:,} + {s['completion_tokens']:,}"
                          if s["prompt_tokens"] else ""))
        for r in d["census"]:
            score = "n/a" if r["mean_detection"] is None else f"{r['mean_detection']:.2f}"
            share = "n/a" if r["reasoning_share"] is None else f"{r['reasoning_share']:.1%}"
            click.echo(f"layer {'all' if r['layer'] is None else r['layer']:>3}: {r['n_explained']} explained, "
                       f"{r['n_scored']} scored (mean balanced accuracy {score}), {r['n_classified']} classified, "
                       f"{r['n_reasoning']} reasoning-related ({share})")
        if d["dry_run"]:
            click.echo(f"wrote the requests to {d['dry_run']}; nothing was sent")
        if d["refused_lines"]:
            click.echo(f"skipped {d['refused_lines']} imported lines (see the warning)")

    emit(summary_json(summary), as_json, render)
    if summary.errors:
        click.echo(f"{summary.errors} requests failed after their retries; run the command again to retry them.",
                   err=True)
        ctx.exit(1)


@config_command(main, "serve", "tca.toy.serve:ServeConfig")
def serve_cmd(cfg) -> None:
    """A local OpenAI-compatible chat endpoint on 127.0.0.1 for tca explain: a Hugging Face model, or a judge.

    --oracle INDEX answers detection prompts from the index's true activations (a judge that knows);
    --random-judge guesses. It stops by itself after --max-requests, --lifetime or --idle.
    """
    from tca.toy.serve import make_server

    server = make_server(cfg)
    click.echo(f"serving {server.backend.name} at {server.url} (chat completions at {server.url}/chat/completions)")
    server.serve()


if __name__ == "__main__":
    main()
