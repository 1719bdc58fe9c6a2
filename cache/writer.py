"""Rows into whole blocks, and blocks onto disk in background threads behind a bounded queue.

The forward pass hands over rows in plan order; ``BlockWriter`` copies them into per-block
buffers and, once a block is full, queues it for the writer threads. The queue is bounded,
so when the disk is slower than the model the forward pass waits (backpressure) instead of
filling memory. A block is committed by ``Store.write_block`` after all of its arrays are
written, so a harvest killed at any instant leaves only whole blocks visible. A pass of a harvest
in passes hands over some layers only: a block that still lacks others after them gets those
layers' flags instead (``Store.write_layers``).
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from tca.cache.store import Store

_DONE = None


class BlockWriter:
    """Assembles rows into blocks and writes them with ``n_threads`` threads."""

    def __init__(self, store: Store, skip: np.ndarray, n_threads: int = 2, max_queued: int = 4,
                 layers: list[int] | None = None, completes: np.ndarray | None = None):
        self.store = store
        self.skip = skip
        """Blocks already written: their rows are dropped."""
        self.layers = store.layers if layers is None else layers
        """The layers handed over (all the store's, or one pass's)."""
        self.completes = np.ones(len(skip), dtype=bool) if completes is None else completes
        """Per block: the other layers are written, so these complete it (commit it, not flag layers)."""
        self._open: dict[int, tuple[dict[int, dict[str, torch.Tensor]], int]] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max(max_queued, 1))
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.rows_written = 0
        self.bytes_written = 0
        self._threads = [threading.Thread(target=self._run, name=f"tca-writer-{i}", daemon=True) for i in range(max(n_threads, 1))]
        for t in self._threads:
            t.start()

    def add(self, start: int, arrays: dict[int, dict[str, torch.Tensor]]) -> None:
        """Rows ``[start, start + n)`` of every array, in the model dtype."""
        self._raise_if_failed()
        n = next(iter(next(iter(arrays.values())).values())).shape[0]
        block_rows = self.store.spec.block_rows
        at = start
        while at < start + n:
            block = at // block_rows
            b0, b1 = self.store.block_range(block)
            end = min(b1, start + n)
            if not self.skip[block]:
                buffers, filled = self._open.get(block) or (self._new_buffers(b1 - b0), 0)
                for layer, named in arrays.items():
                    for name, values in named.items():
                        buffers[layer][name][at - b0 : end - b0] = values[at - start : end - start].cpu()
                filled += end - at
                if filled == b1 - b0:
                    self._open.pop(block, None)
                    self._put((block, buffers))
                else:
                    self._open[block] = (buffers, filled)
            at = end

    def _new_buffers(self, rows: int) -> dict[int, dict[str, torch.Tensor]]:
        spec = self.store.spec
        return {
            layer: {name: torch.empty(rows, spec.d_model, dtype=self.store.dtype) for name in spec.array_names}
            for layer in self.layers
        }

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _DONE or self._error is not None:
                    continue
                block, buffers = item
                write = self.store.write_block if self.completes[block] else self.store.write_layers
                write(block, buffers)
                n = next(iter(next(iter(buffers.values())).values())).shape[0]
                with self._lock:
                    self.rows_written += n
                    self.bytes_written += sum(t.nbytes for named in buffers.values() for t in named.values())
            except BaseException as exc:  # handed to the main thread, which raises it
                self._error = exc
            finally:
                self._queue.task_done()
                if item is _DONE:
                    return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued block to be written; raise a writer's error if one failed."""
        if self._open:
            raise RuntimeError(f"blocks {sorted(self._open)} were never filled; the plan and the batches disagree")
        for _ in self._threads:
            self._put(_DONE)
        for t in self._threads:
            t.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop the writer threads without writing what is still queued."""
        self._error = self._error or RuntimeError("aborted")
        # Once an error is set the threads skip queued blocks, so these puts wait only briefly.
        for _ in self._threads:
            self._queue.put(_DONE)
        for t in self._threads:
            t.join()
