"""The hesitation study: which adapter features make the fine-tuned model hesitate.

A reasoning model re-checks its work ("Wait, let me check…"); the base model does not. If
the adapters explain the fine-tune, a few of their features should carry that behaviour.
The study finds them and tests them both ways, on held-out prompts:

1. **Candidates by attribution.** Gradient × activation of each hesitation word's logit with
   respect to every adapter feature, at the positions where the target predicts the word
   (``tca.adapted.attribute``), summed over the words. The ranking is written into the index
   (table ``attributions``) and joined there with each feature's statistics, so the report can
   say what the features fire on and how strongly.
2. **Necessary.** Ablate the top 1, 2, 4, … candidates in the adapted model until hesitations
   per response fall by at least ``cut`` (80%) while accuracy stays within ``accuracy_tolerance``
   (5 points) of the unablated adapted model. The smallest such set is *the hesitation
   features*. The same number of random live features ablated is the control: it shows the
   drop is the features' doing, not any ablation's.
3. **Sufficient.** Clamp the hesitation features on in the hybrid (target backbone, base MLPs,
   no other adapter feature) at a multiple of each feature's mean active value from the index,
   at every position, and count the hesitations that appear where the hybrid has none.
4. **How few.** The hesitation features as a fraction of all the adapters' features.

Everything is written to the output folder: ``study.json`` (every figure), ``study.md`` (the
report) and ``necessity.png`` / ``sufficiency.png``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tca import TcaError
from tca.adapted.attribute import adapter_name, attribute
from tca.adapted.batches import token_batches
from tca.adapted.evaluate import behaviour, prompt_records
from tca.adapted.evaluate import mode as computing_as
from tca.adapted.generation import Figures, generate, questions_of, score
from tca.adapted.intervene import predicted_positions, single_token_ids, token_probability
from tca.adapted.splice import FeatureEdit, adapted_mlps, edits, load_adapted, target_tokenizer
from tca.query.attribution import check_writable, write_attributions
from tca.query.sql import query

log = logging.getLogger(__name__)


@dataclass
class StudyConfig:
    """``tca study hesitation``: find the features that make the target hesitate and test them."""

    adapters: str
    """Adapter set directory; ``NAME=DIR`` names it as in the index (default: the directory's name)."""
    base: str
    """Base model: local directory or Hugging Face id (only its MLPs are read)."""
    target: str
    """Target model: local directory or Hugging Face id."""
    data: str
    """Held-out conversations (JSONL or Parquet) with reference responses: attribution runs on the
    rendered traces, generation on their prompts, accuracy against their answers."""
    index: str
    """The DuckDB index of these adapters (``tca index``); the attributions are written into it."""
    out: str
    """Folder for study.json, study.md and the plots."""
    words: list[str] = field(default_factory=lambda: ["Wait"])
    """Hesitation words, each one token of the target's tokenizer."""
    contrast: bool = True
    """Attribute each word's logit minus the logit of what the target says instead, so features
    that only mark where a hesitation could go (and where the next step goes too) rank low."""
    attribution_tokens: int = 20_000
    """Teacher-forced tokens of ``data`` to attribute over."""
    prompts: int = 100
    """Held-out prompts generated from in every condition."""
    max_new_tokens: int = 256
    """Longest response generated."""
    max_features: int = 64
    """Most candidates tried, best first, before giving up on the necessity criterion."""
    min_before_word: float = 0.05
    """A candidate must sit on the token just before a hesitation word in at least this share of
    its indexed activations. Features that fire at every step (where the next step's arithmetic
    needs them too) also earn attribution there, but removing them breaks the answer."""
    cut: float = 0.8
    """Necessary: ablation must cut hesitations per response by at least this fraction..."""
    accuracy_tolerance: float = 0.05
    """...while accuracy drops by at most this much (absolute)."""
    clamp_scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    """Sufficient: clamp each feature at these multiples of its mean active value."""
    seq_len: int = 1024
    """Tokens kept per document for attribution."""
    batch: int = 8
    """Documents per attribution pass."""
    gen_batch: int = 64
    """Prompts generated together."""
    dtype: str = "float32"
    """``float32`` or ``bfloat16``."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda``."""
    seed: int = 0
    """Seeds the random control set."""


@dataclass
class Feature:
    """A candidate hesitation feature, with what the index knows of it."""

    layer: int
    feature: int
    score: float
    """Attribution summed over the hesitation words."""
    mean: float
    """Mean active value over the indexed store (the clamp unit)."""
    n_active: int
    """Indexed activations."""
    top_logits: list[str]
    """Tokens its decoder direction promotes most (logit lens), when the index has them."""
    before_word: float
    """Share of its indexed activations on the token just before a hesitation word."""


@dataclass
class Trial:
    """One condition: which features were edited and how the model behaved."""

    name: str
    n_features: int
    features: list[tuple[int, int]]
    figures: Figures
    """Greedy generation from the held-out prompts."""
    p_words: float
    """Teacher-forced: mean probability of the hesitation words at the positions where the
    target predicts one of them."""
    kept: bool = True
    """Necessity trials: whether the newest candidate stayed in the ablated set (accuracy held
    and hesitations did not rise)."""


@dataclass
class StudyReport:
    adapter: str
    words: list[str]
    n_positions: int
    """Positions where the target predicts a hesitation word (attributed)."""
    total_features: int
    baseline: dict[str, Figures]
    """Unedited target, hybrid and adapted models."""
    baseline_p_words: dict[str, float]
    """``Trial.p_words`` of the unedited models."""
    target_banned: Figures
    """The target generating with the hesitation words banned: whether the task survives
    without hesitation at all (if not, no ablation can keep accuracy)."""
    candidates: list[Feature]
    necessity: list[Trial]
    """One ablation in the adapted model per candidate tried, best first: the candidate with the
    ones kept so far. It is kept when accuracy stays within the tolerance and hesitations do not
    rise; the search stops as soon as the kept set cuts hesitations enough."""
    control: Trial | None
    """As many random live features ablated as the hesitation features."""
    sufficiency: list[Trial]
    """The hesitation features clamped in the hybrid, one trial per scale."""
    hesitation_features: list[Feature]
    """The kept set: necessary when ``necessary``; otherwise the set that cut most while keeping
    accuracy, which sufficiency then tests."""
    necessary: bool
    sufficient: bool
    """Clamping the hesitation features on in the hybrid adds at least a quarter of the target's
    hesitations per response."""
    hesitation_cut: float | None
    """1 − hesitations after ablation ÷ before, for the hesitation features."""
    accuracy_change: float | None
    fraction_of_features: float


def _edit_sets(features: list[tuple[int, int]], value_of=lambda layer, f: 0.0) -> list[FeatureEdit]:
    """One FeatureEdit per (layer, feature), so each may carry its own value."""
    return [FeatureEdit(layer, [f], float(value_of(layer, f))) for layer, f in features]


def _candidates(cfg: StudyConfig, name: str) -> list[Feature]:
    """Features that raise the hesitation words and fire just before them, best attribution
    first, joined with the index."""
    words = ", ".join("'" + w.replace("'", "''") + "'" for w in cfg.words)
    table = query(cfg.index, f"""
        WITH scored AS (
            SELECT layer, feature, sum(score) AS score FROM attributions
            WHERE adapter = $adapter AND token IN ({words}) GROUP BY layer, feature HAVING sum(score) > 0
        ),
        before AS (  -- activations on the token just before a hesitation word
            SELECT a.layer, a.feature, count(*) AS n
            FROM activations a JOIN tokens t ON t.token = a.token + 1
            WHERE a.adapter = $adapter AND trim(t.piece) IN ({words})
            GROUP BY a.layer, a.feature
        )
        SELECT s.layer, s.feature, s.score, coalesce(f.mean, 0) AS mean, coalesce(f.n_active, 0) AS n_active,
               coalesce(f.top_logits, []) AS top_logits,
               coalesce(b.n, 0) / greatest(coalesce(f.n_active, 0), 1) AS before_word
        FROM scored s
        LEFT JOIN features f ON f.adapter = $adapter AND f.layer = s.layer AND f.feature = s.feature
        LEFT JOIN before b ON b.layer = s.layer AND b.feature = s.feature
        WHERE coalesce(b.n, 0) / greatest(coalesce(f.n_active, 0), 1) >= $min_before
        ORDER BY s.score DESC, s.layer, s.feature
        LIMIT {int(cfg.max_features)}
    """, {"adapter": name, "min_before": cfg.min_before_word})
    return [Feature(r["layer"], r["feature"], r["score"], r["mean"], r["n_active"], list(r["top_logits"]),
                    r["before_word"]) for r in table.to_pylist()]


def hesitation_study(cfg: StudyConfig) -> StudyReport:
    """Run the study and write its report into ``cfg.out``."""
    if not cfg.words or cfg.prompts < 1 or cfg.max_features < 1 or not cfg.clamp_scales:
        raise TcaError("the study needs at least one word, one prompt, one feature and one clamp scale.")
    name, path = adapter_name(cfg.adapters)
    check_writable(cfg.index, name)  # a wrong index or name fails before the models load
    tokenizer = target_tokenizer(cfg.target)
    word_ids = single_token_ids(tokenizer, cfg.words)
    batches = token_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, max_tokens=cfg.attribution_tokens,
                            batch=cfg.batch)
    records = prompt_records(cfg.data, cfg.prompts)
    if not any(len(r["conversations"]) > 1 for r in records):
        raise TcaError(f"{cfg.data} has no reference responses, so accuracy cannot be checked.")
    model = load_adapted(path, cfg.base, cfg.target, device=cfg.device, dtype=cfg.dtype, keep_target=True)
    mlps = {i: m for i, m in adapted_mlps(model).items() if m.adapter is not None}
    total = sum(m.adapter.cfg.n_features for m in mlps.values())

    n_positions = 0
    for word, word_id in zip(cfg.words, word_ids, strict=True):
        result = attribute(model, batches, word_id, contrast=cfg.contrast)
        write_attributions(cfg.index, name, word, result)
        n_positions += result.n_positions
        log.info("%r: attributed at %d positions", word, result.n_positions)
    if n_positions == 0:
        raise TcaError(f"the target never predicts {cfg.words} on {cfg.data}; nothing to attribute.")
    candidates = _candidates(cfg, name)
    if not candidates:
        raise TcaError("no adapter feature both raises the hesitation words' logits and fires before them in "
                       f"at least {cfg.min_before_word:.0%} of its activations; there is nothing to test.")

    with computing_as(model, "target"):
        positions = predicted_positions(model, batches, word_ids)

    def p_words(mode: str) -> float:
        with computing_as(model, mode):
            return token_probability(model, batches, word_ids, positions)

    def run(trial: str, mode: str, features: list[tuple[int, int]], feature_edits: list[FeatureEdit]) -> Trial:
        log.info("%s", trial)
        with edits(model, feature_edits):
            figures = behaviour(model, tokenizer, records, [mode], max_new_tokens=cfg.max_new_tokens,
                                batch_size=cfg.gen_batch)[mode]
            return Trial(trial, len(features), features, figures, p_words(mode))

    baseline = behaviour(model, tokenizer, records, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch)
    baseline_p = {m: p_words(m) for m in baseline}
    with computing_as(model, "target"):
        # what the target itself does when it may not hesitate: how much accuracy can survive
        # the removal of hesitation at all, whatever removes it
        banned = score(tokenizer, records, generate(model, tokenizer, questions_of(records),
                                                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch,
                                                    desc="target, words banned", banned=word_ids))
    adapted = baseline["adapted"]
    if adapted.hesitations <= 0:
        raise TcaError("the adapted model does not hesitate on these prompts, so there is nothing to remove; "
                       "train (or refine) the adapters further first.")

    necessity, hesitation, best, necessary = [], [], None, False
    for c in candidates:
        trial_set = hesitation + [c]
        features = [(f.layer, f.feature) for f in trial_set]
        trial = run(f"ablate {len(features)}: + ({c.layer}, {c.feature})", "adapted", features, _edit_sets(features))
        current = best.figures.hesitations if best else adapted.hesitations
        if not _accuracy_held(cfg, adapted, trial.figures):
            trial.kept, trial.name = False, f"{trial.name} (dropped: accuracy)"
        elif trial.figures.hesitations > current:
            trial.kept, trial.name = False, f"{trial.name} (dropped: more hesitations)"
        necessity.append(trial)
        if trial.kept:
            hesitation, best = trial_set, trial
            if _cut(adapted, trial.figures) >= cfg.cut:
                necessary = True
                break
    control = _control(cfg, name, mlps, hesitation, run) if hesitation else None
    sufficiency = []
    by_key = {(c.layer, c.feature): c for c in candidates}
    features = [(c.layer, c.feature) for c in (hesitation or candidates[:1])]
    for scale in cfg.clamp_scales:
        clamps = _edit_sets(features, lambda layer, f: scale * by_key[(layer, f)].mean)
        sufficiency.append(run(f"clamp x{scale:g} in the hybrid", "hybrid", features, clamps))
    best_clamp = max(t.figures.hesitations for t in sufficiency)
    added = best_clamp - baseline["hybrid"].hesitations
    report = StudyReport(
        adapter=name, words=list(cfg.words), n_positions=n_positions, total_features=total, baseline=baseline,
        baseline_p_words=baseline_p, target_banned=banned,
        candidates=candidates, necessity=necessity, control=control, sufficiency=sufficiency,
        hesitation_features=hesitation, necessary=necessary,
        sufficient=bool(hesitation) and added >= 0.25 * baseline["target"].hesitations,
        hesitation_cut=_cut(adapted, best.figures) if best else None,
        accuracy_change=None if best is None or best.figures.accuracy is None or adapted.accuracy is None
        else best.figures.accuracy - adapted.accuracy,
        fraction_of_features=len(hesitation) / total,
    )
    write_study(report, cfg)
    return report


def _cut(adapted: Figures, ablated: Figures) -> float:
    return 1 - ablated.hesitations / adapted.hesitations


def _accuracy_held(cfg: StudyConfig, adapted: Figures, ablated: Figures) -> bool:
    """Accuracy stays within the tolerance of the unablated adapted model's."""
    return adapted.accuracy is None or ablated.accuracy >= adapted.accuracy - cfg.accuracy_tolerance


def _control(cfg: StudyConfig, name: str, mlps: dict, hesitation: list[Feature], run) -> Trial:
    """As many random features ablated as the hesitation features, drawn from the same layers'
    live features (those the index saw fire) minus the candidates."""
    live = query(cfg.index, "SELECT layer, feature FROM features WHERE adapter = $a AND n_active > 0 ORDER BY ALL",
                 {"a": name}).to_pylist()
    taken = {(f.layer, f.feature) for f in hesitation}
    pool = [(r["layer"], r["feature"]) for r in live if r["layer"] in mlps and (r["layer"], r["feature"]) not in taken]
    features = random.Random(cfg.seed).sample(pool, min(len(hesitation), len(pool)))
    return run("ablate random (control)", "adapted", features, _edit_sets(features))


# ---- the report ---------------------------------------------------------------------------------


def write_study(report: StudyReport, cfg: StudyConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    _plot_necessity(report, out / "necessity.png")
    _plot_sufficiency(report, out / "sufficiency.png")
    (out / "study.md").write_text(study_markdown(report, cfg))
    return out


def study_markdown(report: StudyReport, cfg: StudyConfig) -> str:
    words = ", ".join(f"“{w}”" for w in report.words)
    adapted = report.baseline["adapted"]
    lines = [
        f"# Hesitation study: {report.adapter}",
        "",
        f"Target `{cfg.target}`, base `{cfg.base}`, held-out data `{cfg.data}`, {cfg.prompts} prompts, "
        f"greedy, at most {cfg.max_new_tokens} new tokens. Hesitation words: {words}.",
        "",
        "## Verdict",
        "",
    ]
    n = len(report.hesitation_features)
    kept = [t for t in report.necessity if t.kept]
    effect = "" if not kept else (
        f"ablating {n} feature{'s' * (n > 1)} ({report.fraction_of_features:.2%} of {report.total_features}) cuts "
        f"hesitations per response by {report.hesitation_cut:.0%} ({adapted.hesitations:.2f} → "
        f"{kept[-1].figures.hesitations:.2f}); accuracy changes by {_points(report.accuracy_change)}.")
    if report.necessary:
        lines.append(f"- **Necessary: yes.** {effect[:1].upper()}{effect[1:]}")
    else:
        lines.append(f"- **Necessary: no.** No set of the {len(report.candidates)} candidates cut hesitations by "
                     f"{cfg.cut:.0%} with accuracy within {100 * cfg.accuracy_tolerance:g} points. "
                     + (f"The best set found: {effect}" if kept else "No candidate kept accuracy without raising hesitations."))
    if report.control is not None:
        c = report.control.figures
        lines.append(f"- Control: {report.control.n_features} random live features ablated leave "
                     f"{c.hesitations:.2f} hesitations per response (accuracy {_acc(c.accuracy)}).")
    banned = report.target_banned
    lines.append(f"- Reference: the target itself with the words banned keeps accuracy {_acc(banned.accuracy)} "
                 f"(unbanned {_acc(report.baseline['target'].accuracy)}), mean length {banned.mean_length:.1f}.")
    best = max(report.sufficiency, key=lambda t: t.figures.hesitations)
    lines.append(
        f"- **Sufficient: {'yes' if report.sufficient else 'no'}.** Clamped on in the hybrid ({best.name}), "
        f"{'these ' + str(n) if n else 'the top candidate'} feature{'s' * (n > 1)} "
        f"produce {best.figures.hesitations:.2f} hesitations per response ({best.figures.hesitating:.0%} of responses) "
        f"where the hybrid has {report.baseline['hybrid'].hesitations:.2f} and the target "
        f"{report.baseline['target'].hesitations:.2f}. Teacher-forced on the target's traces, the clamps raise "
        f"p(words) from the hybrid's {report.baseline_p_words['hybrid']:.3f} to at most "
        f"{max(t.p_words for t in report.sufficiency):.3f} (target {report.baseline_p_words['target']:.3f}). "
        f"Generation can only show hesitation where the hybrid writes a trace to hesitate in: its responses "
        f"average {report.baseline['hybrid'].mean_length:.1f} tokens, the target's "
        f"{report.baseline['target'].mean_length:.1f}."
    )
    baseline = [Trial(m, 0, [], f, report.baseline_p_words[m]) for m, f in report.baseline.items()]
    baseline.append(Trial("target, hesitation words banned", 0, [], report.target_banned, 0.0))
    lines += ["", "## Baseline", "", _trials_table(baseline), "",
              "The last row bans the hesitation words from the target's generation: the accuracy the task keeps "
              "without hesitating at all, an upper bound for any ablation.", "",
              f"Attribution ran over {report.n_positions} positions where the target predicts a hesitation word.",
              "", "## Candidates (attribution, joined with the index)", "",
              "| rank | layer | feature | attribution | mean act | indexed activations | before a hesitation word | top logits |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for rank, c in enumerate(report.candidates[:20], start=1):
        mark = " **" if c in report.hesitation_features else ""
        lines.append(f"| {rank}{mark} | {c.layer} | {c.feature} | {c.score:.1f} | {c.mean:.3f} | {c.n_active} | "
                     f"{c.before_word:.0%} | {' '.join(repr(t) for t in c.top_logits[:5])} |")
    lines += ["", "## Necessity: ablations in the adapted model", "",
              "Candidates join the ablated set best first; one that costs more than "
              f"{100 * cfg.accuracy_tolerance:g} points of accuracy, or brings hesitations back up, is dropped "
              "again (marked).", "",
              "![necessity](necessity.png)", "",
              _trials_table(report.necessity + ([report.control] if report.control else [])),
              "", "## Sufficiency: clamps in the hybrid", "",
              "Each feature is clamped at the given multiple of its mean active value, at every position, with "
              "every other adapter feature off.", "", "![sufficiency](sufficiency.png)", "",
              _trials_table(report.sufficiency), "",
              f"p(words): teacher-forced probability of {words} at the {report.n_positions} positions where the "
              "target predicts one; the other columns are greedy generations from the held-out prompts.", "",
              "Find a feature's examples with `tca top INDEX LAYER FEATURE`, or in SQL:", "",
              "```sql",
              "SELECT * FROM attributions JOIN features USING (adapter, layer, feature)",
              f"WHERE adapter = '{report.adapter}' ORDER BY rank LIMIT 20;",
              "```", ""]
    return "\n".join(lines)


def _trials_table(trials: list[Trial]) -> str:
    rows = ["| condition | features | accuracy | mean length | hesitations / response | responses hesitating | p(words) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for t in trials:
        f = t.figures
        rows.append(f"| {t.name} | {t.n_features} | {_acc(f.accuracy)} | {f.mean_length:.1f} | {f.hesitations:.2f} | "
                    f"{f.hesitating:.2f} | {t.p_words:.3f} |")
    return "\n".join(rows)


def _points(change: float | None) -> str:
    return "n/a" if change is None else f"{100 * change:+.1f} points"


def _acc(acc: float | None) -> str:
    return "n/a" if acc is None else f"{acc:.3f}"


def _plot_necessity(report: StudyReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tried = range(1, len(report.necessity) + 1)
    ax.plot(tried, [t.figures.hesitations for t in report.necessity], "o-", label="hesitations / response")
    ax.plot(tried, [t.figures.accuracy or 0 for t in report.necessity], "s--", label="accuracy")
    dropped = [(i, t.figures.hesitations) for i, t in zip(tried, report.necessity, strict=True) if not t.kept]
    if dropped:
        ax.plot(*zip(*dropped, strict=True), "rx", ms=9, label="dropped again")
    ax.axhline(report.baseline["adapted"].hesitations, color="grey", lw=0.8, ls=":", label="adapted, unablated")
    if report.control is not None:
        ax.axhline(report.control.figures.hesitations, color="k", lw=0.8, ls="--", label="random features (control)")
    ax.set_xlabel("candidates tried, best attribution first")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sufficiency(report: StudyReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["hybrid"] + [t.name.split(" in ")[0] for t in report.sufficiency] + ["target"]
    values = ([report.baseline["hybrid"].hesitations] + [t.figures.hesitations for t in report.sufficiency]
              + [report.baseline["target"].hesitations])
    ax.bar(names, values, color=["grey"] + ["C0"] * len(report.sufficiency) + ["C2"])
    ax.set_ylabel("hesitations / response")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
