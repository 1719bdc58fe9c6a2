"""The data plan: every document's tokens and which of them become stored rows.

The plan is fixed before any activation exists. Tokens are numbered globally in document
order (``token``); a token becomes a row when it survives sink skipping (by position and
token id) and subsampling (a per-token coin from the seed and its global index, so the
choice does not depend on batching, devices or how many workers share the harvest). Rows
follow token order, so ``rows/token`` is known up front and is the same for every layer.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import pyarrow as pa

from tca import TcaError
from tca.cache.data import REGIONS, char_regions, read_documents
from tca.ranges import NON_NEGATIVE, POSITIVE, SHARE, check_ranges

log = logging.getLogger(__name__)


@dataclass
class PlanConfig:
    """Which documents to read and which of their tokens to store."""

    data: str
    """JSONL or Parquet file of conversations or texts."""
    format: Literal["auto", "conversations", "text"] = "auto"
    """``conversations``, ``text`` or ``auto`` (decided per record from its fields)."""
    template: Literal["deepseek", "chat", "none"] = "deepseek"
    """How conversations become text: ``deepseek`` (the R1 layout, keeps thinking), ``chat``
    (the target tokenizer's chat template) or ``none`` (turns joined by blank lines)."""
    seq_len: int = field(default=1024, metadata=POSITIVE)
    """Tokens kept per document (the rest is cut)."""
    max_tokens: int | None = field(default=None, metadata=POSITIVE)
    """Stop after this many tokens in all (the last document is cut to fit)."""
    keep_frac: float = field(default=1.0, metadata=SHARE)
    """Fraction of tokens stored as rows, chosen per token from ``seed`` and its index."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seed of the per-token subsampling."""
    skip_sinks: bool = False
    """Store no rows for attention-sink tokens: the first ``sink_positions`` of each document
    and BOS tokens anywhere (their activations have huge norms and say little)."""
    sink_positions: int = field(default=1, metadata=NON_NEGATIVE)
    """Positions counted as sinks from each document's start when ``skip_sinks``."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class Plan:
    """Tokens of all documents, in order, with what the harvest stores."""

    token_ids: np.ndarray
    """[tokens] int32 token ids."""
    doc_start: np.ndarray
    """[docs + 1] int64: document ``i`` holds tokens ``doc_start[i]:doc_start[i + 1]``."""
    regions: np.ndarray
    """[tokens] int8 index into ``REGIONS``."""
    pieces: list[str]
    """The source text of each token."""
    keep: np.ndarray
    """[tokens] bool: the token becomes a stored row."""
    docs: list[dict] = field(default_factory=list)
    """Per document: its source fields, source line and whether it was cut."""

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_docs(self) -> int:
        return len(self.doc_start) - 1

    @cached_property
    def row_tokens(self) -> np.ndarray:
        """Global token index of each row, ascending."""
        return np.flatnonzero(self.keep).astype(np.int64)

    @cached_property
    def positions(self) -> np.ndarray:
        lengths = np.diff(self.doc_start)
        return (np.arange(self.n_tokens) - np.repeat(self.doc_start[:-1], lengths)).astype(np.int32)

    @cached_property
    def doc_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_docs, dtype=np.int64), np.diff(self.doc_start))

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that decides the rows: token ids, document bounds, the kept set."""
        h = hashlib.sha256()
        for a in (self.token_ids.astype("<i4"), self.doc_start.astype("<i8"), np.packbits(self.keep)):
            h.update(a.tobytes())
        return h.hexdigest()

    def tokens_table(self) -> pa.Table:
        row = np.full(self.n_tokens, -1, dtype=np.int64)
        row[self.row_tokens] = np.arange(len(self.row_tokens))
        return pa.table(
            {
                "token": pa.array(np.arange(self.n_tokens, dtype=np.int64)),
                "doc": pa.array(self.doc_of_token),
                "pos": pa.array(self.positions),
                "token_id": pa.array(self.token_ids.astype(np.int32)),
                "piece": pa.array(self.pieces, pa.string()),
                "region": pa.DictionaryArray.from_arrays(
                    pa.array(self.regions.astype(np.int8)), pa.array(REGIONS, pa.string())
                ),
                "row": pa.array(row),
            }
        )

    def docs_table(self) -> pa.Table:
        keys = sorted({k for d in self.docs for k in d["source"]})
        columns = {
            "doc": pa.array(np.arange(self.n_docs, dtype=np.int64)),
            "n_tokens": pa.array(np.diff(self.doc_start)),
            "source_line": pa.array([d["line"] for d in self.docs], pa.int64()),
            "truncated": pa.array([d["truncated"] for d in self.docs], pa.bool_()),
        }
        for key in keys:
            if key not in columns:
                columns[key] = pa.array([d["source"].get(key) for d in self.docs], pa.string())
        return pa.table(columns)


def keep_mask(n_tokens: int, keep_frac: float, seed: int) -> np.ndarray:
    """Per-token coin flips: token ``i`` is kept when a hash of (seed, i) falls below keep_frac."""
    if not 0.0 < keep_frac <= 1.0:
        raise TcaError(f"--keep-frac must be in (0, 1], got {keep_frac}.")
    if keep_frac == 1.0:
        return np.ones(n_tokens, dtype=bool)
    # splitmix64 of the index offset by the seed: a stateless, well-mixed 64-bit hash.
    with np.errstate(over="ignore"):
        z = np.arange(n_tokens, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < keep_frac


def build_plan(cfg: PlanConfig, tokenizer) -> Plan:
    """Read, render and tokenize the data, then decide which tokens become rows."""
    add_special = cfg.template == "none"
    ids: list[np.ndarray] = []
    regions: list[np.ndarray] = []
    pieces: list[str] = []
    docs: list[dict] = []
    total = 0
    for doc in read_documents(cfg.data, cfg.format, cfg.template, tokenizer):
        enc = tokenizer(doc.text, add_special_tokens=add_special, return_offsets_mapping=True)
        n_full = len(enc["input_ids"])
        budget = cfg.seq_len if cfg.max_tokens is None else min(cfg.seq_len, cfg.max_tokens - total)
        n = min(n_full, budget)
        if n == 0:
            log.warning("skipping line %d: it has no tokens", doc.line)
            continue
        offsets = np.asarray(enc["offset_mapping"][:n], dtype=np.int64).reshape(n, 2)
        char_codes = char_regions(doc.text)
        starts = np.minimum(offsets[:, 0], max(len(doc.text) - 1, 0))
        regions.append(char_codes[starts] if len(doc.text) else np.zeros(n, np.int8))
        ids.append(np.asarray(enc["input_ids"][:n], dtype=np.int32))
        pieces.extend(doc.text[a:b] for a, b in offsets)
        docs.append({"line": doc.line, "source": doc.source, "truncated": n < n_full})
        total += n
        if cfg.max_tokens is not None and total >= cfg.max_tokens:
            break
    if not docs:
        raise TcaError(f"{cfg.data} holds no documents with any tokens.")
    token_ids = np.concatenate(ids)
    doc_start = np.concatenate([[0], np.cumsum([len(a) for a in ids])]).astype(np.int64)
    plan = Plan(token_ids, doc_start, np.concatenate(regions), pieces, np.ones(len(token_ids), bool), docs)
    keep = keep_mask(plan.n_tokens, cfg.keep_frac, cfg.seed)
    if cfg.skip_sinks:
        keep &= plan.positions >= cfg.sink_positions
        if tokenizer.bos_token_id is not None:
            keep &= token_ids != tokenizer.bos_token_id
    plan.keep = keep
    log.info("plan: %d documents, %d tokens, %d rows", plan.n_docs, plan.n_tokens, int(keep.sum()))
    return plan
