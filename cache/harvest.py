"""The harvester: paired MLP activations of a base and a target model into an activation store.

    plan (tokens, rows)  ->  batches of whole documents  ->  one target forward per batch
    ->  x, delta (, y) of the selected layers  ->  block buffers  ->  writer threads  ->  store

Documents are packed into batches by a padded-token budget, one document per batch row,
right-padded, with an attention mask: no token attends across documents or to padding and
positions count from each document's start, so every value is what the model computes for
the document alone. Padding never becomes a row.

Resuming recomputes the same batches (they follow from the plan and ``batch_tokens``) and
skips those whose rows all lie in committed blocks, so a resumed store is identical to an
uninterrupted one.

With ``layers_per_pass`` the selected layers are harvested a group at a time: one pass over the
same batches per group, holding only that group's base MLPs and writing only its arrays. A pass
flags the layers it wrote per block and the pass that writes a block's last layers commits it, so a
resume skips finished passes and continues a partial one from its flags (``Store.layers_written``).
The values do not depend on the grouping: each layer's rows are computed as in one pass.

Under ``torchrun`` each rank fills its own contiguous range of blocks (``tca.cache.ranks``):
rank 0 creates the store, every rank runs the batches touching its blocks, and the result is
the store one process would write.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from tca import Device, TcaError
from tca.cache.capture import PairedMlps, mlp_inputs, rows_from_inputs
from tca.cache.layers import layer_span, select_layers
from tca.cache.memory import Workload, check_memory, checkpoint_dtype, memory_plan
from tca.cache.models import (
    ModelSource,
    check_mlp_pair,
    check_pair,
    find_model,
    live_mlps,
    load_base_mlps,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from tca.cache.plan import Plan, PlanConfig, build_plan
from tca.cache.ranks import Ranks, process_group, rank0_first
from tca.cache.store import Store, StoreSpec
from tca.cache.threads import DEFAULT_THREADS, command_threads
from tca.cache.writer import BlockWriter
from tca.ranges import POSITIVE, check_ranges

log = logging.getLogger(__name__)


@dataclass
class HarvestConfig:
    """``tca harvest``: which models, data, layers and store layout."""

    base: str
    """Base model: a Hugging Face id or a local directory. Only its selected MLP tensors are read."""
    target: str
    """Target (fine-tuned) model: the only model that runs; its tokenizer tokenizes the data."""
    out: str
    """The store to write: a local path or an fsspec URL."""
    plan: PlanConfig
    """Data, template, sequence length and which tokens become rows."""
    layers: str = "all"
    """Layers to harvest: ``all`` or a list like ``0,3,5-7``."""
    batch_tokens: int = field(default=8192, metadata=POSITIVE)
    """Token budget of one forward pass, padding included; a longer document runs alone."""
    store_y: bool = False
    """Also store ``y = MLP_target(x)``."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype the target runs and the store keeps: ``auto`` (the target's own), ``bfloat16``,
    ``float16`` or ``float32``."""
    device: Device = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    resume: bool = False
    """Continue an interrupted harvest of the same configuration into ``out``."""
    block_rows: int = field(default=4096, metadata=POSITIVE)
    """Rows per shard file (unit of writing and committing); see docs/store.md for the benchmark."""
    chunk_rows: int = field(default=512, metadata=POSITIVE)
    """Rows per chunk inside a shard (unit of reading)."""
    compressor: Literal["none", "zstd"] = "none"
    """``none`` or ``zstd``: activations compress by a few percent only (bench/harvest.py)."""
    writers: int = field(default=2, metadata=POSITIVE)
    """Writer threads."""
    queue_blocks: int = field(default=4, metadata=POSITIVE)
    """Finished blocks that may wait for a writer before the forward pass waits."""
    base_revision: str | None = None
    """Hub revision of the base model."""
    target_revision: str | None = None
    """Hub revision of the target model."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options of ``out`` as a JSON object (credentials, endpoint); none given: s3fs reads the
    ``AWS_*`` environment variables."""
    layers_per_pass: int | None = field(default=None, metadata=POSITIVE)
    """Harvest the selected layers this many at a time, one pass over the data each, for a GPU that
    cannot hold every selected base MLP at once: each pass holds only its layers' base MLPs and
    costs a forward of the target up to its last layer. Unset: all in one pass. Not part of the
    store's identity: a resume may pass another value."""
    threads: int = field(default=DEFAULT_THREADS, metadata=POSITIVE)
    """torch threads on the CPU, fixed whatever the machine's load (``tca.cache.threads``: more than
    one thrashed a busy 2-core machine); recorded in the store's attributes."""

    def identity(self) -> dict:
        """What decides the stored values: a resume must agree on all of it."""
        settings = dataclasses.asdict(self)
        for transient in ("out", "resume", "writers", "queue_blocks", "device", "storage_options", "threads",
                          "layers_per_pass"):
            settings.pop(transient)
        return settings

    def __post_init__(self):
        check_ranges(self)


@dataclass
class Batch:
    """Documents ``[doc0, doc1)`` of the plan, whose rows are ``[row0, row1)``."""

    doc0: int
    doc1: int
    row0: int
    row1: int


@dataclass
class HarvestResult:
    url: str
    n_tokens: int
    n_rows: int
    blocks_written: int
    """Blocks this process wrote arrays of, in any pass (all the store's blocks but those written before,
    or its rank's share)."""
    seconds: float
    rank: int = 0
    world_size: int = 1


def plan_batches(plan: Plan, batch_tokens: int) -> list[Batch]:
    """Consecutive documents while (documents × longest) stays within ``batch_tokens``."""
    lengths = np.diff(plan.doc_start)
    row_of_doc = np.searchsorted(plan.row_tokens, plan.doc_start)
    batches, d0, longest = [], 0, 0
    for d, n in enumerate(lengths):
        if d > d0 and (d - d0 + 1) * max(longest, n) > batch_tokens:
            batches.append(Batch(d0, d, int(row_of_doc[d0]), int(row_of_doc[d])))
            d0, longest = d, 0
        longest = max(longest, int(n))
    batches.append(Batch(d0, len(lengths), int(row_of_doc[d0]), int(row_of_doc[-1])))
    return batches


def batch_inputs(plan: Plan, batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids, the attention mask, and the flat positions of the batch's rows."""
    starts, stops = plan.doc_start[batch.doc0 : batch.doc1], plan.doc_start[batch.doc0 + 1 : batch.doc1 + 1]
    width = int((stops - starts).max())
    ids = np.full((len(starts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(starts), width), dtype=np.int64)
    for i, (a, b) in enumerate(zip(starts, stops)):
        ids[i, : b - a] = plan.token_ids[a:b]
        mask[i, : b - a] = 1
    tokens = plan.row_tokens[batch.row0 : batch.row1]
    select = (plan.doc_of_token[tokens] - batch.doc0) * width + plan.positions[tokens]
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(select)


@command_threads
def harvest(cfg: HarvestConfig) -> HarvestResult:
    """Run a harvest (or resume one) and return what it wrote."""
    try:
        return _harvest(cfg)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise TcaError(
                f"the disk holding {cfg.out} is full; committed blocks are intact, so free space "
                "and run the same command again with --resume."
            ) from None
        raise


def _harvest(cfg: HarvestConfig) -> HarvestResult:
    t0 = time.perf_counter()
    base_src = find_model(cfg.base, cfg.base_revision)
    target_src = find_model(cfg.target, cfg.target_revision)
    check_pair(base_src, target_src)
    layers = select_layers(cfg.layers, range(target_src.n_layers))
    ranks = Ranks.from_env()
    device = ranks.device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device, target_src.config, checkpoint_on_cpu=True)
    with process_group(ranks, device):
        # Refuse a wrong --out before loading any model.
        existing = rank0_first(ranks, lambda: _open_out(cfg))

        tokenizer = load_tokenizer(target_src)
        plan = build_plan(cfg.plan, tokenizer)

        identity = cfg.identity() | {"dtype": str(dtype).removeprefix("torch."), "layers": layers}
        attrs = {
            "models": {"base": base_src.provenance(), "target": target_src.provenance()},
            "harvest": identity,
            "dataset_fingerprint": plan.fingerprint,
            "n_tokens": plan.n_tokens,
            "n_docs": plan.n_docs,
            # what the values were computed in: the model's forward and both MLPs
            "precision": {"model": identity["dtype"], "mlps": "float32",
                          "base_mlp_weights": checkpoint_dtype(base_src.config)},
            "threads": cfg.threads,
        }
        spec = StoreSpec(
            layers=layers, d_model=target_src.d_model, dtype=identity["dtype"], n_rows=len(plan.row_tokens),
            block_rows=cfg.block_rows, chunk_rows=cfg.chunk_rows, store_y=cfg.store_y, compressor=cfg.compressor,
            attrs=attrs,
        )
        # A --resume of another configuration fails here, before any weights load.
        rank0_first(ranks, lambda: _check_existing(existing, spec))
        check_memory(memory_plan(_workload(cfg, plan, spec), target_src.config, base_src.config, dtype, device))
        model = load_model(target_src, dtype, device)
        passes = layer_passes(layers, cfg.layers_per_pass)
        # The first pass's MLPs are read before the store is made, so MLPs that cannot be paired
        # are refused before anything is written.
        first = _paired_mlps(model, base_src, target_src, passes[0], len(layers), device)
        store = rank0_first(ranks, lambda: _prepare_store(cfg, existing, spec, plan))
        if store is None:
            store = _join_store(cfg, spec)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Blocks of other ranks count as written: this rank neither runs nor writes them.
    written = store.layers_written() | ranks.others(spec.n_blocks)
    filled = np.zeros(spec.n_blocks, dtype=bool)
    pending = {0: first}
    del first  # a pass's MLPs are freed when it ends, before the next pass reads its own
    for i, group in enumerate(passes):
        rows = [layers.index(layer) for layer in group]
        skip = written[rows].all(axis=0)
        span = f"layer {group[0]}" if len(group) == 1 else layer_span(group)
        label = f"pass {i + 1}/{len(passes)}: {span}" if len(passes) > 1 else ""
        mlps = pending.pop(i, None)
        if skip.all():
            log.info("%s: every block is written already", label or "harvest")
            continue
        mlps = mlps or _paired_mlps(model, base_src, target_src, group, len(layers), device)
        # Where every other layer is written, this pass's layers complete (commit) the block.
        completes = np.delete(written, rows, axis=0).all(axis=0)
        _run_pass(cfg, plan, store, model, mlps, BlockWriter(store, skip, cfg.writers, cfg.queue_blocks, group,
                                                             completes), pad_id, ranks, label)
        written[rows] = True
        filled |= ~skip
    # Whichever rank finishes last sees every block committed; flags only go from 0 to 1,
    # so no rank can wrongly mark the store complete.
    if store.complete:
        store.drop_layer_flags()
        store.update_attrs(complete=True)
    seconds = time.perf_counter() - t0
    return HarvestResult(cfg.out, plan.n_tokens, store.n_rows, int(filled.sum()), seconds,
                         ranks.rank, ranks.world_size)


def layer_passes(layers: list[int], per_pass: int | None) -> list[list[int]]:
    """The selected layers in groups of ``per_pass`` (all in one when unset), in order."""
    k = per_pass or len(layers)
    return [layers[i : i + k] for i in range(0, len(layers), k)]


def _paired_mlps(model: torch.nn.Module, base_src: ModelSource, target_src: ModelSource, layers: list[int],
                 n_selected: int, device: torch.device) -> PairedMlps:
    """The base MLPs of ``layers`` read from disk beside the target's own, checked to pair up."""
    act = target_src.config.get("hidden_act", "silu")
    mlps = PairedMlps(base=load_base_mlps(base_src, layers, device), target=live_mlps(model, layers, act))
    check_mlp_pair(mlps.base, mlps.target, n_selected)
    return mlps


def _run_pass(cfg: HarvestConfig, plan: Plan, store: Store, model: torch.nn.Module, mlps: PairedMlps,
              writer: BlockWriter, pad_id: int, ranks: Ranks, label: str) -> None:
    """One pass over the batches that touch a block ``writer`` does not skip, writing ``mlps``' layers."""
    batches = [b for b in plan_batches(plan, cfg.batch_tokens) if _needed(b, store, writer.skip)]
    device = next(model.parameters()).device
    n_run = sum(int(plan.doc_start[b.doc1] - plan.doc_start[b.doc0]) for b in batches)
    where = f"rank {ranks.rank} of {ranks.world_size}: " if ranks.distributed else ""
    log.info("%s%sharvesting %d of %d blocks: %d batches, %d tokens, layers %s on %s", where,
             f"{label}: " if label else "", int((~writer.skip).sum()), len(writer.skip), len(batches), n_run,
             mlps.layers, device)
    desc = " ".join(filter(None, [f"harvest {ranks.rank}" if ranks.distributed else "", label])) or "harvest"
    bar = tqdm(total=n_run, unit="tok", unit_scale=True, desc=desc, position=ranks.local_rank, dynamic_ncols=True,
               disable=None)
    try:
        for batch in batches:
            ids, mask, select = batch_inputs(plan, batch, pad_id)
            inputs = mlp_inputs(model, mlps.layers, ids.to(device), mask.to(device))
            writer.add(batch.row0, rows_from_inputs(inputs, select.to(device), mlps, cfg.store_y))
            bar.update(int(mask.sum()))
            bar.set_postfix(rows=writer.rows_written, MB=f"{writer.bytes_written / 1e6:.0f}", refresh=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()


def _workload(cfg: HarvestConfig, plan: Plan, spec: StoreSpec) -> Workload:
    """The sizes the memory plan needs, from the data plan: the largest batch (padded tokens,
    longest document, rows) and the writer's blocks."""
    batches = plan_batches(plan, cfg.batch_tokens)
    docs = [np.diff(plan.doc_start[b.doc0 : b.doc1 + 1]) for b in batches]
    block_rows = spec.shard_layout[0]
    return Workload(
        command="harvest", layers=tuple(spec.layers),
        tokens=max(len(n) * int(n.max(initial=0)) for n in docs), seq_len=max(int(n.max(initial=0)) for n in docs),
        rows=max(b.row1 - b.row0 for b in batches), arrays=len(spec.array_names), block_rows=block_rows,
        # queued, one being written per writer thread, one being filled
        blocks_in_flight=min(cfg.queue_blocks + cfg.writers + 1, spec.n_blocks),
        layers_per_pass=cfg.layers_per_pass or 0,
    )


def _needed(batch: Batch, store: Store, done: np.ndarray) -> bool:
    if batch.row1 == batch.row0:
        return False
    blocks = range(batch.row0 // store.spec.block_rows, (batch.row1 - 1) // store.spec.block_rows + 1)
    return not all(done[b] for b in blocks)


def _open_out(cfg: HarvestConfig) -> Store | None:
    """The store to resume (None when nothing is there yet); without --resume, refuse an existing one."""
    if cfg.resume:
        return _existing_store(cfg)
    _refuse_existing(cfg)
    return None


def _refuse_existing(cfg: HarvestConfig) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(cfg.out, **cfg.storage_options)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise TcaError(f"{cfg.out} already exists; pass --resume to continue it or choose a new --out.")


def _existing_store(cfg: HarvestConfig) -> Store | None:
    """The store to resume, or None when nothing was written yet."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(cfg.out, **cfg.storage_options)
    if not fs.exists(path) or (fs.isdir(path) and not fs.ls(path)):
        return None
    return Store.open(cfg.out, mode="r+", storage_options=cfg.storage_options)


def _join_store(cfg: HarvestConfig, spec: StoreSpec) -> Store:
    """The store rank 0 prepared, checked against this rank's own plan and models."""
    store = Store.open(cfg.out, mode="r+", storage_options=cfg.storage_options)
    _check_resumable(store, spec, "join")
    return store


def _check_existing(existing: Store | None, spec: StoreSpec) -> None:
    """Refuse to resume a store that was set up with another configuration."""
    if existing is not None and existing.setup_complete:
        _check_resumable(existing, spec)


def _prepare_store(cfg: HarvestConfig, existing: Store | None, spec: StoreSpec, plan: Plan) -> Store:
    """The store to write into: ``existing`` (checked by ``_check_existing``) or a new one."""
    if existing is not None and existing.setup_complete:
        log.info("resuming %s: %d of %d blocks committed", cfg.out, int(existing.committed().sum()), spec.n_blocks)
        leftovers = existing.leftover_writes()
        if leftovers:
            log.info("removing %d temporary files of writes cut short by the interruption", len(leftovers))
            existing.fs.rm(leftovers)
        existing.add_layer_flags()
        return existing
    if existing is not None:
        # Killed while creating: nothing was committed, so start the store again.
        log.info("%s was cut short while being created; creating it again", cfg.out)
        existing.fs.rm(existing.root, recursive=True)
    store = Store.create(cfg.out, spec, cfg.storage_options)
    store.write_row_tokens(plan.row_tokens)
    store.write_table("tokens", plan.tokens_table())
    store.write_table("docs", plan.docs_table())
    store.mark_setup_complete()
    return store


def _check_resumable(store: Store, spec: StoreSpec, action: str = "resume") -> None:
    """Refuse, saying what differs, to resume (or join) a store written with another configuration."""
    old = store.spec
    theirs, ours = old.attrs.get("harvest", {}), spec.attrs["harvest"]
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            raise TcaError(
                f"cannot {action} {store.url}: it was harvested with {key}={theirs.get(key)!r}, "
                f"this run has {key}={ours.get(key)!r}."
            )
    for role in ("base", "target"):
        a, b = old.attrs["models"][role]["config_hash"], spec.attrs["models"][role]["config_hash"]
        if a != b:
            raise TcaError(f"cannot {action} {store.url}: the {role} model's config differs from the one it was harvested with.")
    if old.attrs.get("dataset_fingerprint") != spec.attrs["dataset_fingerprint"]:
        raise TcaError(f"cannot {action} {store.url}: the data now gives different tokens or rows than when it was harvested.")
