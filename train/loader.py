"""Batches of ``(x, delta)`` from an activation store, shuffled without random row reads.

An epoch's order is fixed by the seed before anything is read: whole chunks in a random order,
grouped into *windows* of about ``shuffle_rows`` rows; the training rows of a window are
permuted, and the windows' rows, one after another, form the epoch's stream, cut into batches.
So batch ``b`` of epoch ``e`` is a pure function of the seed, which makes resuming exact, while
reading stays sequential: every chunk is read whole, on background threads, the next window
while the current one is consumed. A window mixes rows of many documents; ``mixing`` reports
distinct documents per batch against a uniform draw over all training rows.

The hold-out split is by document (a seeded hash of the document id), so no held-out
document is ever trained on. ``drop_outliers`` removes rows whose input norm is more than
Z times the layer's median (attention sinks); rows are shared by all layers of a batch, so a
row that is an outlier in any of them is dropped from all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from tca import TcaError
from tca.cache.store import Store, from_stored

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    """How rows are split, shuffled and batched."""

    batch: int = 4096
    """Rows per training batch."""
    seed: int = 0
    """Seeds the hold-out split and every epoch's order."""
    holdout_frac: float = 0.05
    """Fraction of documents held out for evaluation (never trained on)."""
    drop_outliers: float | None = None
    """Drop rows whose ||x|| exceeds this many times the layer's median; None keeps all."""
    shuffle_rows: int = 65536
    """Rows mixed together: a window of whole chunks is read and permuted at once."""
    read_threads: int = 4
    """Chunks read concurrently."""
    prefetch: int = 2
    """Batches prepared ahead of the training step."""
    eval_rows: int = 65536
    """At most this many held-out rows are used for evaluation."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (for fast copies to a GPU)."""


@dataclass
class Batch:
    rows: np.ndarray
    """Global row indices of the batch (after outliers are dropped)."""
    x: dict[int, torch.Tensor]
    delta: dict[int, torch.Tensor]
    y: dict[int, torch.Tensor] = field(default_factory=dict)
    """MLP_target(x), for evaluation batches of stores that hold it."""
    n_docs: int = 0
    """Distinct documents among the batch's rows."""


def holdout_docs(docs: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Whether each document id is held out: a seeded 64-bit hash mapped to [0, 1) < frac."""
    with np.errstate(over="ignore"):  # splitmix64 relies on wrap-around
        z = docs.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed + 1) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) < frac


def row_docs(store: Store) -> np.ndarray:
    """The document of every row, from ``rows/token`` and the tokens table."""
    tokens = store.table("tokens").select(["token", "doc"])
    token = tokens.column("token").to_numpy()
    doc = tokens.column("doc").to_numpy()
    order = np.argsort(token, kind="stable")
    row_token = store.row_tokens()
    pos = np.searchsorted(token, row_token, sorter=order)
    pos = np.minimum(pos, len(token) - 1)
    found = token[order[pos]] == row_token
    if not found.all():
        raise TcaError(f"{store.url}: {int((~found).sum())} stored rows have no entry in tokens.parquet.")
    return doc[order[pos]]


class ActivationLoader:
    """Training batches (``epoch``) and held-out batches (``eval_batches``) for some layers."""

    def __init__(self, store: Store, layers: list[int], cfg: LoaderConfig):
        self.store, self.layers, self.cfg = store, list(layers), cfg
        self.readers = {(layer, name): store.shard_reader(layer, name)
                        for layer in layers for name in store.spec.array_names}
        self.encoding = store.array(layers[0], "x").attrs["tca_encoding"]
        self.has_y = "y" in store.spec.array_names
        self.chunks = self._committed_chunks()
        usable = np.zeros(store.n_rows, dtype=bool)
        for start, stop in self.chunks:
            usable[start:stop] = True
        self.docs = row_docs(store)
        self.held_out = holdout_docs(self.docs, cfg.holdout_frac, cfg.seed) & usable
        self.train_mask = usable & ~self.held_out
        self.n_train, self.n_holdout = int(self.train_mask.sum()), int(self.held_out.sum())
        if self.n_holdout == 0 or self.n_train < cfg.batch:
            raise TcaError(
                f"{store.url} has too little data for a hold-out: {self.n_train} training rows and "
                f"{self.n_holdout} held-out rows with --holdout-frac {cfg.holdout_frac} and --batch "
                f"{cfg.batch}; harvest more tokens, lower --batch or raise --holdout-frac."
            )
        self.stats = LoaderStats(ideal_docs=self._ideal_docs())
        self.medians = self._median_norms() if cfg.drop_outliers else {}
        self._pool = ThreadPoolExecutor(max(cfg.read_threads, 1), thread_name_prefix="tca-read")

    @property
    def batches_per_epoch(self) -> int:
        return self.n_train // self.cfg.batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- the plan ------------------------------------------------------------------------------

    def _committed_chunks(self) -> list[tuple[int, int]]:
        spec = self.store.spec
        committed = self.store.committed()
        if not committed.any():
            raise TcaError(f"{self.store.url} has no committed rows yet; harvest (or --resume) it first.")
        if not committed.all():
            log.warning("%s: training on %d of %d committed blocks", self.store.url, committed.sum(), len(committed))
        chunks = []
        for block in np.flatnonzero(committed):
            start, stop = self.store.block_range(int(block))
            chunks += [(s, min(s + spec.chunk_rows, stop)) for s in range(start, stop, spec.chunk_rows)]
        return chunks

    def windows(self, epoch: int) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
        """Epoch ``epoch`` as windows: (chunks to read, permuted training rows among them)."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(len(self.chunks))
        windows, current, n = [], [], 0
        for i in order:
            current.append(self.chunks[i])
            n += current[-1][1] - current[-1][0]
            if n >= self.cfg.shuffle_rows:
                windows.append(current)
                current, n = [], 0
        if current:
            windows.append(current)
        out = []
        for w, chunks in enumerate(windows):
            rows = np.concatenate([np.arange(a, b) for a, b in chunks])
            rows = rows[self.train_mask[rows]]
            out.append((chunks, np.random.default_rng([self.cfg.seed, epoch, w]).permutation(rows)))
        return out

    # ---- reading -------------------------------------------------------------------------------

    def _read_chunk(self, start: int, stop: int, names: tuple[str, ...]) -> dict[tuple[int, str], torch.Tensor]:
        out = {}
        for (layer, name), reader in self.readers.items():
            if name in names:
                out[layer, name] = from_stored(reader.read(start, stop), self.encoding)
        self.stats.add_read(sum(t.numel() * t.element_size() for t in out.values()))
        return out

    def _read_into(self, start, stop, local: np.ndarray, places: np.ndarray, dest) -> None:
        """Put rows ``start + local`` (ascending) at ``places`` of the window ``dest``: one copy
        per row, in numpy, straight from the bytes read."""
        nbytes = 0
        for key, out in dest.items():
            for at, rows in self.readers[key].pieces(start, stop):
                lo, hi = np.searchsorted(local, [at, at + len(rows)])
                out[places[lo:hi]] = rows if hi - lo == len(rows) else rows[local[lo:hi] - at]
                nbytes += rows.nbytes
        self.stats.add_read(nbytes)

    def _submit_window(self, chunks, rows: np.ndarray) -> tuple[dict, list[Future]]:
        """Start reading a window: each read puts its rows straight at their shuffled places
        (one copy, on the read threads); neighbouring chunks are merged into one read."""
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        dest = {key: np.empty((len(rows), self.store.d_model), dtype=reader.dtype)
                for key, reader in self.readers.items() if key[1] in ("x", "delta")}
        runs: list[list[int]] = []
        for a, b in sorted(chunks):
            if runs and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b])
        futures = []
        for a, b in runs:
            lo, hi = np.searchsorted(ordered, [a, b])
            if lo < hi:  # a run of held-out rows only is not read at all
                futures.append(self._pool.submit(self._read_into, a, b, ordered[lo:hi] - a, order[lo:hi], dest))
        return dest, futures

    # ---- training batches ----------------------------------------------------------------------

    def epoch(self, epoch: int, start_batch: int = 0):
        """The batches of one epoch from ``start_batch`` on, prepared on a background thread."""
        q: queue.Queue = queue.Queue(maxsize=max(self.cfg.prefetch, 1))
        stop = threading.Event()

        def put(item) -> bool:
            """Queue an item unless the consumer has gone; False once it has."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self._epoch_batches(epoch, start_batch):
                    if not put(batch):
                        return
                put(None)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)

        thread = threading.Thread(target=produce, name="tca-batches", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.stats.wait_s += time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _plan(self, epoch: int, start_batch: int) -> list[tuple[list[tuple[int, int]], np.ndarray]]:
        """The windows of an epoch still to read, each with the rows it contributes, in order."""
        skip = start_batch * self.cfg.batch
        remaining = (self.batches_per_epoch - start_batch) * self.cfg.batch
        plan = []
        for chunks, rows in self.windows(epoch):
            if remaining <= 0:
                break
            if skip >= len(rows):
                skip -= len(rows)
                continue
            take = rows[skip:][:remaining]
            skip, remaining = 0, remaining - len(take)
            plan.append((chunks, take))
        return plan

    def _epoch_batches(self, epoch: int, start_batch: int):
        B = self.cfg.batch
        plan = self._plan(epoch, start_batch)
        pending: list[tuple[dict, np.ndarray]] = []
        n_pending = 0
        ahead = self._submit_window(*plan[0]) if plan else None
        try:
            for w, (_, rows) in enumerate(plan):
                dest, futures = ahead
                ahead = self._submit_window(*plan[w + 1]) if w + 1 < len(plan) else None
                for future in futures:
                    future.result()
                pending.append(({key: from_stored(values, self.encoding) for key, values in dest.items()}, rows))
                n_pending += len(rows)
                while n_pending >= B:
                    batch, pending, n_pending = self._cut(pending, B)
                    yield batch
        finally:
            if ahead is not None:
                for future in ahead[1]:
                    future.cancel()

    def _cut(self, pending, B):
        """The first ``B`` pending rows as a batch, and what is left."""
        pieces, rest, n = [], [], 0
        for data, rows in pending:
            need = B - n
            if need <= 0:
                rest.append((data, rows))
                continue
            if len(rows) > need:
                rest.append(({k: v[need:] for k, v in data.items()}, rows[need:]))
                data, rows = {k: v[:need] for k, v in data.items()}, rows[:need]
            pieces.append((data, rows))
            n += len(rows)
        data = pieces[0][0] if len(pieces) == 1 else {k: torch.cat([p[0][k] for p in pieces]) for k in pieces[0][0]}
        rows = np.concatenate([p[1] for p in pieces])
        batch = self._make_batch(data, rows)
        self.stats.add_batch(batch.n_docs)
        return batch, rest, sum(len(r) for _, r in rest)

    def _make_batch(self, data, rows) -> Batch:
        n_docs = len(np.unique(self.docs[rows]))
        keep = self._keep(data)
        if keep is not None:
            rows = rows[keep.numpy()]
            self.stats.dropped += int((~keep).sum())
            data = {k: v[keep] for k, v in data.items()}
        data = {k: v.float() for k, v in data.items()}
        if self.cfg.pin_memory:
            data = {k: v.pin_memory() for k, v in data.items()}
        by_name = {name: {layer: data[layer, name] for layer in self.layers if (layer, name) in data}
                   for name in ("x", "delta", "y")}
        return Batch(rows, by_name["x"], by_name["delta"], by_name["y"], n_docs)

    def _keep(self, data) -> torch.Tensor | None:
        if not self.cfg.drop_outliers:
            return None
        keep = None
        for layer in self.layers:
            ok = data[layer, "x"].float().norm(dim=-1) <= self.cfg.drop_outliers * self.medians[layer]
            keep = ok if keep is None else keep & ok
        return keep

    # ---- evaluation ----------------------------------------------------------------------------

    def eval_batches(self):
        """Held-out rows (at most ``eval_rows``, the same every time) in batches, with ``y`` if stored."""
        names = ("x", "delta", "y") if self.has_y else ("x", "delta")
        rng = np.random.default_rng([self.cfg.seed, 1 << 20])
        budget = self.cfg.eval_rows
        for i in rng.permutation(len(self.chunks)):
            if budget <= 0:
                return
            a, b = self.chunks[i]
            rows = np.flatnonzero(self.held_out[a:b])[:budget] + a
            if not len(rows):
                continue
            budget -= len(rows)
            data = self._read_chunk(a, b, names)
            yield self._make_batch({k: v[torch.from_numpy(rows - a)] for k, v in data.items()}, rows)

    # ---- statistics ----------------------------------------------------------------------------

    def _median_norms(self) -> dict[int, float]:
        """Median ||x|| per layer from up to 16 chunks spread over the store."""
        picks = np.unique(np.linspace(0, len(self.chunks) - 1, min(16, len(self.chunks))).astype(int))
        norms = {layer: [] for layer in self.layers}
        for i in picks:
            data = self._read_chunk(*self.chunks[i], ("x",))
            for layer in self.layers:
                norms[layer].append(data[layer, "x"].float().norm(dim=-1))
        return {layer: float(np.median(torch.cat(v).numpy())) for layer, v in norms.items()}

    def _ideal_docs(self) -> float:
        """Expected distinct documents in a batch drawn uniformly from all training rows."""
        _, counts = np.unique(self.docs[self.train_mask], return_counts=True)
        p = counts / counts.sum()
        return float(np.sum(1 - np.power(1 - p, self.cfg.batch)))


@dataclass
class LoaderStats:
    """Read throughput and mixing, for the progress bar and the summary."""

    ideal_docs: float
    bytes_read: int = 0
    batches: int = 0
    docs_sum: int = 0
    dropped: int = 0
    wait_s: float = 0.0
    """Time the consumer waited for a batch (the loader starving the step)."""
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self._lock = threading.Lock()

    def add_read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def add_batch(self, n_docs: int) -> None:
        self.batches += 1
        self.docs_sum += n_docs

    def as_dict(self) -> dict:
        elapsed = time.perf_counter() - self.started
        docs = self.docs_sum / max(self.batches, 1)
        return {
            "read_mb_s": self.bytes_read / 1e6 / max(elapsed, 1e-9),
            "docs_per_batch": docs,
            "ideal_docs_per_batch": self.ideal_docs,
            "mixing": docs / max(self.ideal_docs, 1e-9),
            "dropped_rows": self.dropped,
            "wait_s": self.wait_s,
        }
