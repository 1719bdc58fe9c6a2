"""``tca cache info`` and ``tca cache verify``: what a store holds, and whether it is whole.

verify checks the structure (array shapes against the plan, the token and document tables
against the rows), reads every committed block of every array (each chunk carries a CRC32C,
so flipped or cut bytes fail to read; a missing shard file would silently read as zeros, so
its presence is checked first), and with ``recompute`` reruns the target on the documents
of sampled rows and compares x, delta (and y) with what is stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from tca.cache.capture import PairedMlps, mlp_inputs, rows_from_inputs
from tca.cache.models import find_model, live_mlps, load_base_mlps, load_model
from tca.cache.store import Store
from tca.ranges import NON_NEGATIVE, check_ranges

log = logging.getLogger(__name__)


def info(url: str, storage_options: dict | None = None) -> dict:
    """What a store holds: models, layers, rows, tokens, documents, bytes, completeness."""
    store = Store.open(url, storage_options=storage_options)
    done = store.committed()
    # a harvest in passes commits a block only in its last pass; before that only these show progress
    written = store.layers_written() if not done.all() else np.broadcast_to(done, (len(store.layers), len(done)))
    provenance = store.spec.attrs
    return {
        "url": url,
        "format_version": store.attrs["format_version"],
        "models": provenance.get("models"),
        "layers": store.layers,
        "d_model": store.d_model,
        "dtype": store.spec.dtype,
        "arrays": list(store.spec.array_names),
        "rows": store.n_rows,
        "rows_committed": store.committed_rows(),
        "tokens": provenance.get("n_tokens"),
        "docs": provenance.get("n_docs"),
        "blocks": len(done),
        "blocks_committed": int(done.sum()),
        "blocks_written": {layer: int(row.sum()) for layer, row in zip(store.layers, written, strict=True)},
        "complete": bool(done.all()) and store.setup_complete,
        "block_rows": store.spec.block_rows,
        "chunk_rows": store.spec.chunk_rows,
        "compressor": store.spec.compressor,
        "bytes_on_disk": store.bytes_on_disk(),
        "dataset_fingerprint": provenance.get("dataset_fingerprint"),
        "harvest": provenance.get("harvest"),
    }


@dataclass
class VerifyConfig:
    """``tca cache verify``: how thoroughly to check a store."""

    store: str
    """The store to check (a path or an fsspec URL)."""
    recompute: int = field(default=0, metadata=NON_NEGATIVE)
    """Rows to recompute from the models and compare (0: structure and checksums only)."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seed of the rows sampled for recomputing."""
    base: str | None = None
    """Base model to recompute with, when not where the store says it came from."""
    target: str | None = None
    """Target model to recompute with, when not where the store says it came from."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Device of the recomputation."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    blocks_read: int = 0
    rows_recomputed: int = 0
    max_rel_error: dict[str, float] = field(default_factory=dict)
    """Largest relative L2 error per array over recomputed rows."""
    tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def tolerance(dtype: torch.dtype) -> float:
    """Allowed relative L2 error of a recomputed row: the harvest ran documents packed in
    batches, the check runs them alone, so results differ by a few roundings of the dtype."""
    return max(8 * torch.finfo(dtype).eps, 1e-4)


def verify(cfg: VerifyConfig) -> VerifyReport:
    store = Store.open(cfg.store)
    report = VerifyReport(tolerance=tolerance(store.dtype))
    _check_structure(store, report)
    if report.problems and not store.setup_complete:
        return report
    _check_blocks(store, report)
    if cfg.recompute > 0 and not report.problems:
        _recompute(store, cfg, report)
    return report


def _check_structure(store: Store, report: VerifyReport) -> None:
    spec, problems = store.spec, report.problems
    if not store.setup_complete:
        problems.append("the store was cut short while being created (no token tables); harvest again with --resume.")
        return
    for layer in spec.layers:
        for name in spec.array_names:
            shape = store.array(layer, name).shape
            if shape != (spec.n_rows, spec.d_model):
                problems.append(f"layers/{layer}/{name} has shape {shape}, expected {(spec.n_rows, spec.d_model)}.")
    row_tokens = store.row_tokens()
    if row_tokens.shape != (spec.n_rows,):
        problems.append(f"rows/token has {row_tokens.shape[0]} entries for {spec.n_rows} rows.")
        return
    tokens = store.table("tokens")
    n_tokens = spec.attrs.get("n_tokens")
    if tokens.num_rows != n_tokens:
        problems.append(f"tokens.parquet has {tokens.num_rows} tokens, the store's plan {n_tokens}.")
        return
    row = tokens.column("row").to_numpy()
    stored = np.flatnonzero(row >= 0)
    if len(stored) != spec.n_rows or not np.array_equal(stored, row_tokens) or not np.array_equal(row[stored], np.arange(spec.n_rows)):
        problems.append("rows/token and the row column of tokens.parquet disagree.")
    docs = store.table("docs")
    if docs.num_rows != spec.attrs.get("n_docs") or pc.sum(docs.column("n_tokens")).as_py() != n_tokens:
        problems.append("docs.parquet does not add up to the documents and tokens of the plan.")
    leftovers = store.leftover_writes()
    if leftovers:
        problems.append(f"{len(leftovers)} temporary files of interrupted chunk writes remain (e.g. "
                        f"{leftovers[0]}); harvest again with --resume to remove them.")
    undone = int((~store.committed()).sum())
    if undone:
        problems.append(f"{undone} of {spec.n_blocks} blocks are not committed; the harvest is unfinished (resume it with --resume).")


def _check_blocks(store: Store, report: VerifyReport) -> None:
    done = np.flatnonzero(store.committed())
    fs = store.fs
    items = [(layer, name) for layer in store.layers for name in store.spec.array_names]
    for block in tqdm(done, desc="verify", unit="block", disable=None):
        start, stop = store.block_range(block)
        for layer, name in items:
            where = f"layers/{layer}/{name} rows {start}:{stop}"
            if not fs.exists(store.shard_path(layer, name, block)):
                report.problems.append(f"{where}: the shard file is missing.")
                continue
            try:
                store.array(layer, name)[start:stop]
            except Exception as exc:  # zarr raises ValueError for checksums, others for cut files
                report.problems.append(f"{where}: corrupted or truncated ({exc}).")
        report.blocks_read += 1


def _recompute(store: Store, cfg: VerifyConfig, report: VerifyReport) -> None:
    models = store.spec.attrs["models"]
    target_src = find_model(cfg.target or models["target"]["id"], models["target"]["revision"])
    base_src = find_model(cfg.base or models["base"]["id"], models["base"]["revision"])
    device = torch.device(cfg.device)
    model = load_model(target_src, store.dtype, device)
    act = target_src.config.get("hidden_act", "silu")
    mlps = PairedMlps(
        base={k: w.to(device) for k, w in load_base_mlps(base_src, store.layers).items()},
        target={k: w.to(device) for k, w in live_mlps(model, store.layers, act).items()},
    )
    done = store.committed()
    candidates = np.concatenate([np.arange(*store.block_range(b)) for b in np.flatnonzero(done)])
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(candidates, size=min(cfg.recompute, len(candidates)), replace=False))
    tokens = store.table("tokens")
    doc_of = tokens.column("doc").to_numpy()
    pos_of = tokens.column("pos").to_numpy()
    ids = tokens.column("token_id").to_numpy()
    row_tokens = store.row_tokens()[rows]
    errors: dict[str, float] = {}
    for doc in np.unique(doc_of[row_tokens]):
        doc_tokens = np.flatnonzero(doc_of == doc)
        input_ids = torch.from_numpy(ids[doc_tokens].astype(np.int64))[None].to(device)
        inputs = mlp_inputs(model, store.layers, input_ids, torch.ones_like(input_ids))
        doc_rows = rows[doc_of[row_tokens] == doc]
        select = torch.from_numpy(pos_of[store.row_tokens()[doc_rows]].astype(np.int64)).to(device)
        fresh = rows_from_inputs(inputs, select, mlps, store.spec.store_y)
        for layer, named in fresh.items():
            for name, values in named.items():
                stored = torch.stack([store.read(layer, name, r, r + 1, torch.float32)[0] for r in doc_rows])
                err = _relative_error(stored, values.float().cpu())
                errors[name] = max(errors.get(name, 0.0), err)
                if err > report.tolerance:
                    report.problems.append(
                        f"layers/{layer}/{name}: recomputed rows of document {doc} differ from the stored ones "
                        f"(relative error {err:.2e} > {report.tolerance:.1e})."
                    )
    report.rows_recomputed = len(rows)
    report.max_rel_error = errors


def _relative_error(stored: torch.Tensor, fresh: torch.Tensor) -> float:
    """Largest per-row ‖stored − fresh‖ / ‖fresh‖ (rows of zero norm count their absolute error)."""
    diff = (stored - fresh).norm(dim=-1)
    return float((diff / fresh.norm(dim=-1).clamp_min(1e-6)).max())
