"""The LLM-free census: what kind of feature each adapter feature is, from the index alone.

The paper's census has a language model read every feature's examples and finds a small share
(about 8%) reasoning-related. Much of that can be read off the index without any model: where a
feature fires (the prompt, the ``<think>`` span, the answer) and whether it fires on the token
just before a hesitation word. Two table macros, installed in every index by ``tca index`` (and
by ``tca census`` in an index built before them), hold the whole definition, so the criteria are
in the file beside the data and any DuckDB client gets the same answer:

    census(words := ['Wait'], min_active := 10, min_hesitation := 0.2, min_region_ratio := 10.0,
           layer := NULL, adapter := NULL)
    census_summary(<the same parameters>)

``census`` returns one row per feature of the adapter (dead ones included); ``census_summary``
counts them per layer and over all layers (``layer`` NULL).

**The rule** (``kind``, the first that holds; ``reasoning_related`` for the first three):

1. ``NULL`` (unclassified) when the feature has fewer than ``min_active`` indexed activations:
   too few to say where it fires. These are left out of the shares.
2. ``hesitation`` when at least ``min_hesitation`` of its activations sit on the token just before
   a hesitation word (``before_share``, the hesitation study's criterion: the next token of the
   same document is one of ``words``), or on a hesitation word itself (``word_share``).
3. ``think`` when it fires, per stored token of the same kind, at least ``min_region_ratio`` times as
   often inside ``<think>`` as outside it (``think_ratio``).
4. ``answer`` the same for the answer after ``</think>`` (``answer_ratio``): answer formatting.
5. ``other`` otherwise: features that fire on digits, operators or the prompt wherever they occur.

A region ratio compares the same token pieces inside and outside the region (a Mantel-Haenszel
rate ratio stratified by piece): with, for each piece p, ``a_in``/``a_out`` the feature's
activations on p inside/outside the region and ``n_in``/``n_out`` the stored tokens of p there,

    ratio = Σ_p a_in·n_out/(n_in + n_out)  ÷  (Σ_p a_out·n_in/(n_in + n_out) + 1)

Matching pieces makes it a statement about context, not vocabulary: a digit feature fires on
digits in the question as in the thinking (ratio near 1), and a feature on a token that only ever
occurs inside ``<think>`` ("=" in the demo's sums) has nothing to compare with (ratio 0), where a
plain per-token rate ratio would call both thinking features. The +1 keeps the ratio finite for a
feature that never fires outside, and keeps a handful of activations from passing on chance.
Shares (``think_share`` …) are shown too but not used: ``<think>`` holds most tokens of a trace,
so a feature that fires everywhere has most of its activations there as well.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

from tca import TcaError
from tca.adapted.generation import HESITATION_WORDS, check_words
from tca.outputs import atomic_file, check_output
from tca.query.sql import connect, export, in_transaction, run_sql
from tca.query.stats import wilson
from tca.ranges import NON_NEGATIVE, POSITIVE, PROPORTION, check_ranges

log = logging.getLogger(__name__)

CENSUS_VERSION = 1
"""Bumped whenever the macros below change, so ``tca census`` reinstalls them in older indexes."""

KINDS = ("hesitation", "think", "answer", "other")
REASONING_KINDS = ("hesitation", "think", "answer")

DEFAULT_MIN_ACTIVE = 10
DEFAULT_MIN_HESITATION = 0.2
DEFAULT_MIN_REGION_RATIO = 10.0


def _sql_list(words) -> str:
    return "[" + ", ".join("'" + w.replace("'", "''") + "'" for w in words) + "]"


_PARAMS = (f"words := {_sql_list(HESITATION_WORDS)}, min_active := {DEFAULT_MIN_ACTIVE}, "
           f"min_hesitation := {DEFAULT_MIN_HESITATION}, min_region_ratio := {DEFAULT_MIN_REGION_RATIO}, "
           "layer := NULL, adapter := NULL")
_ARGS = ("words := words, min_active := min_active, min_hesitation := min_hesitation, "
         "min_region_ratio := min_region_ratio, layer := layer, adapter := adapter")

_KIND_COUNTS = ", ".join(f"count(*) FILTER (WHERE c.kind = '{k}') AS n_{k}" for k in KINDS)

# Macro parameters shadow column names (``layer``, ``adapter``), so every column is qualified.
MACROS: dict[str, str] = {
    "census": f"""
CREATE OR REPLACE MACRO census({_PARAMS}) AS TABLE
WITH marked AS (  -- every stored token: its region, and whether it is or precedes a hesitation word
    SELECT t.token, t.piece, t.region,
           coalesce(list_contains(words, trim(nxt.piece)), false) AS before_word,
           list_contains(words, trim(t.piece)) AS on_word
    FROM tokens t LEFT JOIN tokens nxt ON nxt.doc = t.doc AND nxt.pos = t.pos + 1
    WHERE t.stored_row IS NOT NULL
),
stored AS (SELECT count(*) AS n, count(*) FILTER (WHERE marked.before_word) AS before_word FROM marked),
stored_piece AS (  -- stored tokens of each piece, inside <think>, inside the answer
    SELECT marked.piece, count(*) AS n,
           count(*) FILTER (WHERE marked.region = 'think') AS think,
           count(*) FILTER (WHERE marked.region = 'answer') AS answer
    FROM marked GROUP BY ALL
),
fired_piece AS (
    SELECT a.layer, a.feature, m.piece, count(*) AS n,
           count(*) FILTER (WHERE m.region = 'prompt') AS n_prompt,
           count(*) FILTER (WHERE m.region = 'think') AS n_think,
           count(*) FILTER (WHERE m.region = 'answer') AS n_answer,
           count(*) FILTER (WHERE m.before_word) AS n_before,
           count(*) FILTER (WHERE m.on_word) AS n_word
    FROM activations a JOIN marked m ON m.token = a.token
    WHERE a.adapter = resolve_adapter(adapter) AND (layer IS NULL OR a.layer = layer)
    GROUP BY ALL
),
fired AS (  -- totals, and the Mantel-Haenszel sums of the piece-matched region ratios
    SELECT fp.layer, fp.feature, sum(fp.n)::BIGINT AS n, sum(fp.n_prompt)::BIGINT AS n_prompt,
           sum(fp.n_think)::BIGINT AS n_think, sum(fp.n_answer)::BIGINT AS n_answer,
           sum(fp.n_before)::BIGINT AS n_before, sum(fp.n_word)::BIGINT AS n_word,
           sum(fp.n_think * (sp.n - sp.think) / sp.n) AS think_in,
           sum((fp.n - fp.n_think) * sp.think / sp.n) AS think_out,
           sum(fp.n_answer * (sp.n - sp.answer) / sp.n) AS answer_in,
           sum((fp.n - fp.n_answer) * sp.answer / sp.n) AS answer_out
    FROM fired_piece fp JOIN stored_piece sp ON sp.piece IS NOT DISTINCT FROM fp.piece
    GROUP BY ALL
),
measured AS (
    SELECT f.adapter, f.layer, f.feature, coalesce(fired.n, 0) AS n_active,
           fired.n_prompt / fired.n AS prompt_share,
           fired.n_think / fired.n AS think_share,
           fired.n_answer / fired.n AS answer_share,
           (fired.n - fired.n_prompt - fired.n_think - fired.n_answer) / fired.n AS other_share,
           fired.n_before / fired.n AS before_share,
           fired.n_word / fired.n AS word_share,
           (fired.n_before / fired.n) / nullif(stored.before_word / stored.n, 0) AS before_lift,
           fired.think_in / (fired.think_out + 1) AS think_ratio,
           fired.answer_in / (fired.answer_out + 1) AS answer_ratio
    FROM features f CROSS JOIN stored
    LEFT JOIN fired ON fired.layer = f.layer AND fired.feature = f.feature
    WHERE f.adapter = resolve_adapter(adapter) AND (layer IS NULL OR f.layer = layer)
),
classed AS (
    SELECT measured.*,
           CASE WHEN measured.n_active < min_active THEN NULL
                WHEN measured.before_share >= min_hesitation OR measured.word_share >= min_hesitation THEN 'hesitation'
                WHEN measured.think_ratio >= min_region_ratio THEN 'think'
                WHEN measured.answer_ratio >= min_region_ratio THEN 'answer'
                ELSE 'other' END AS kind
    FROM measured
)
SELECT classed.*, list_contains({_sql_list(REASONING_KINDS)}, classed.kind) AS reasoning_related
FROM classed ORDER BY classed.layer, classed.feature
""",
    "census_summary": f"""
CREATE OR REPLACE MACRO census_summary({_PARAMS}) AS TABLE
SELECT c.adapter, c.layer, count(*) AS n_features,
       count(*) FILTER (WHERE c.n_active > 0) AS n_live,
       count(c.kind) AS n_classified,
       {_KIND_COUNTS},
       count(*) FILTER (WHERE c.reasoning_related) AS n_reasoning,
       count(*) FILTER (WHERE c.reasoning_related) / nullif(count(c.kind), 0) AS reasoning_share
FROM census({_ARGS}) c
GROUP BY GROUPING SETS ((c.adapter, c.layer), (c.adapter))
ORDER BY c.layer NULLS LAST
""",
}


def install(con: duckdb.DuckDBPyConnection) -> None:
    """(Re)create the census macros and record their version; the caller holds the transaction."""
    for sql in MACROS.values():
        con.execute(sql)
    con.execute("INSERT OR REPLACE INTO index_meta VALUES ('census_version', ?)", [str(CENSUS_VERSION)])


def installed_version(con: duckdb.DuckDBPyConnection) -> int:
    """The census macros' version in an open index (0 when it has none)."""
    rows = con.sql("SELECT value FROM index_meta WHERE key = 'census_version'").fetchall()
    return int(rows[0][0]) if rows else 0


def ensure_installed(index: str | Path) -> None:
    """Install the census macros in an index built before them (one transaction); a no-op when
    they are current, so an up-to-date index is never opened for writing."""
    con = connect(index)
    try:
        current = installed_version(con) == CENSUS_VERSION
    finally:
        con.close()
    if current:
        return

    log.info("installing the census macros in %s (built before them)", index)
    try:
        con = duckdb.connect(str(index))
    except duckdb.Error as exc:
        raise TcaError(f"cannot open {index} to add the census macros: {str(exc).strip().splitlines()[0]}") from None
    try:
        in_transaction(con, lambda: install(con))
    finally:
        con.close()


@dataclass
class CensusConfig:
    """``tca census``: classify every feature from the index alone (no language model)."""

    index: Path
    """The DuckDB index."""
    words: list[str] = field(default_factory=lambda: list(HESITATION_WORDS))
    """Hesitation words (a comma list), matched against token pieces with spaces trimmed."""
    min_active: int = field(default=DEFAULT_MIN_ACTIVE, metadata=POSITIVE)
    """Features with fewer indexed activations are left unclassified (and out of the shares)."""
    min_hesitation: float = field(default=DEFAULT_MIN_HESITATION, metadata=PROPORTION)
    """``hesitation``: at least this share of a feature's activations on the token just before a
    hesitation word, or on one."""
    min_region_ratio: float = field(default=DEFAULT_MIN_REGION_RATIO, metadata=POSITIVE)
    """``think`` / ``answer``: the feature fires at least this many times as often inside the region as
    outside it, per stored token of the same piece (its activations outside counted + 1)."""
    layer: int | None = field(default=None, metadata=NON_NEGATIVE)
    """Only this layer (default: every layer)."""
    adapter: str | None = None
    """The adapter (default: the index's only one)."""
    out: Path | None = None
    """Also write the per-feature census here (.csv, .json or .parquet)."""
    overwrite: bool = False
    """Replace ``out`` if it exists."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class CensusLayer:
    layer: int | None
    """None: every layer together."""
    n_features: int
    n_live: int
    n_classified: int
    kinds: dict[str, int]
    n_reasoning: int
    reasoning_share: float | None
    """Reasoning-related features over classified features."""
    ci95: list[float] | None
    """Wilson interval of ``reasoning_share``."""


@dataclass
class CensusReport:
    index: str
    adapter: str
    words: list[str]
    criteria: dict[str, float]
    rule: str
    layers: list[CensusLayer]
    total: CensusLayer
    seconds: float
    out: str | None = None


RULE = ("reasoning-related = hesitation, think or answer, the first that holds, among features with at least "
        "min_active activations: hesitation when before_share >= min_hesitation or word_share >= min_hesitation; "
        "think when think_ratio >= min_region_ratio; answer when answer_ratio >= min_region_ratio; else other")


def _params(cfg: CensusConfig, words: list[str]) -> dict:
    return {"words": words, "min_active": cfg.min_active, "min_hesitation": cfg.min_hesitation,
            "min_region_ratio": cfg.min_region_ratio, "layer": cfg.layer, "adapter": cfg.adapter}


_CALL = ("words := $words, min_active := $min_active, min_hesitation := $min_hesitation, "
         "min_region_ratio := $min_region_ratio, layer := $layer, adapter := $adapter")


def run_census(cfg: CensusConfig) -> CensusReport:
    """The census of ``cfg.index``: counts per layer and overall; the per-feature rows to ``cfg.out``."""
    suffix = cfg.out.suffix.lstrip(".") if cfg.out is not None else None
    if suffix is not None:
        if suffix not in ("csv", "json", "parquet"):
            raise TcaError(f"--out {cfg.out}: name a .csv, .json or .parquet file.")
        check_output(cfg.out, cfg.overwrite, [cfg.index])
    words = list(check_words(cfg.words))
    ensure_installed(cfg.index)
    start = time.perf_counter()
    con = connect(cfg.index)
    try:
        params = _params(cfg, words)
        summary = run_sql(con, f"FROM census_summary({_CALL})", params).to_pylist()
        per_feature = run_sql(con, f"FROM census({_CALL})", params) if suffix else None
    finally:
        con.close()
    if not summary:
        raise TcaError(f"{cfg.index} has no features{'' if cfg.layer is None else f' on layer {cfg.layer}'}.")
    seconds = time.perf_counter() - start
    if per_feature is not None:
        with atomic_file(cfg.out) as tmp:
            tmp.write_bytes(export(per_feature, suffix))
    layers = [_layer(row) for row in summary]
    criteria = {"min_active": cfg.min_active, "min_hesitation": cfg.min_hesitation,
                "min_region_ratio": cfg.min_region_ratio}
    return CensusReport(str(cfg.index), summary[0]["adapter"], words, criteria, RULE,
                        [r for r in layers if r.layer is not None], next(r for r in layers if r.layer is None),
                        round(seconds, 3), None if cfg.out is None else str(cfg.out))


def _layer(row: dict) -> CensusLayer:
    n, k = row["n_classified"], row["n_reasoning"]
    ci = [float(v) for v in wilson(k, n)] if n else None
    return CensusLayer(row["layer"], row["n_features"], row["n_live"], n, {kind: row[f"n_{kind}"] for kind in KINDS},
                       k, row["reasoning_share"], ci)


def census_json(report: CensusReport) -> dict:
    return asdict(report)
