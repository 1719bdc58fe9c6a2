"""Encoding row runs into activation tables, in this process or as Parquet parts on Dask workers.

The unit of index building is one run of consecutive committed rows of one layer: read its
``x``, run every adapter of that layer, keep the (feature, token, value) of each activation
above ``min_act``. The single-process index does this in a loop (``encode_run``). With a Dask
cluster, each run is a task that writes one Parquet *part* per adapter; one process then
reads the parts back in row order (``read_parts``, through fsspec and pyarrow, so parts on
object storage work without DuckDB's httpfs) and loads them into DuckDB exactly as it would
have loaded the tables it computed itself, so both paths build the same index.

Parts live in a fresh directory under ``parts_url`` (a local path, or an ``s3://…`` URL that
the workers and the loading process all reach) and are removed once loaded.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from tca.cache.store import Store, from_stored

log = logging.getLogger(__name__)

Encoder = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
"""[B, d] float32 -> dense activations [B, F], or (indices, values) [B, k] for sparse encoders."""

ACTIVATION_SCHEMA = pa.schema([("feature", pa.int32()), ("token", pa.int64()), ("value", pa.float32())])


@torch.no_grad()
def nonzeros(encode: Encoder, x: torch.Tensor, tokens: np.ndarray, min_act: float) -> pa.Table:
    """The (feature, token, value) of every activation above ``min_act`` in one batch of rows."""
    acts = encode(x)
    if isinstance(acts, tuple):
        indices, values = acts
        keep = values > min_act
        row = keep.nonzero(as_tuple=True)[0]
        feature, value = indices[keep], values[keep]
    else:
        row, feature = (acts > min_act).nonzero(as_tuple=True)
        value = acts[row, feature]
    return pa.table({
        "feature": pa.array(feature.to(torch.int32).numpy()),
        "token": pa.array(tokens[row.numpy()].astype(np.int64)),
        "value": pa.array(value.float().numpy()),
    }, schema=ACTIVATION_SCHEMA)


def encode_run(store: Store, layer: int, encoders: Sequence[Encoder], lo: int, hi: int, min_act: float) -> list[pa.Table]:
    """Rows ``[lo, hi)`` of ``layer`` through each encoder: one activation table per encoder."""
    # through the shard reader, which checks each chunk's checksum and names a corrupted one
    reader, encoding = store.shard_reader(layer, "x"), store.array(layer, "x").attrs["tca_encoding"]
    x = from_stored(reader.read(lo, hi), encoding, torch.float32)
    tokens = store.row_tokens(lo, hi)
    return [nonzeros(encode, x, tokens, min_act) for encode in encoders]


@dataclass
class Part:
    """One run of rows of one layer, encoded: a Parquet file per adapter of the layer."""

    layer: int
    lo: int
    hi: int
    paths: list[str]
    """One file per encoder of the layer, in the encoders' order (paths inside the parts filesystem)."""


@dataclass
class Parts:
    """Every part of one index build, and where they are."""

    url: str
    """The directory holding them (a fresh one under the ``parts_url`` given)."""
    storage_options: dict
    by_layer: dict[int, list[Part]]
    """Each layer's parts in row order."""

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url, **self.storage_options)[0]

    def read(self, layer: int) -> Iterator[tuple[int, list[pa.Table]]]:
        """(rows, one table per encoder) of each part of ``layer``, in row order."""
        fs = self.fs
        for part in self.by_layer.get(layer, []):
            tables = []
            for path in part.paths:
                with fs.open(path, "rb") as f:
                    tables.append(pq.read_table(f))
            yield part.hi - part.lo, tables

    def remove(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        if fs.exists(root):
            fs.rm(root, recursive=True)


def _encode_part(store_url: str, storage_options: dict, layer: int, encoders: Sequence[Encoder], lo: int, hi: int,
                 min_act: float, parts_url: str) -> Part:
    """A Dask task: encode one run and write its parts."""
    store = Store.open(store_url, storage_options=storage_options)
    fs, root = fsspec.core.url_to_fs(parts_url, **storage_options)
    folder = f"{root.rstrip('/')}/layer-{layer}"
    fs.makedirs(folder, exist_ok=True)
    paths = []
    for i, table in enumerate(encode_run(store, layer, encoders, lo, hi, min_act)):
        path = f"{folder}/rows-{lo:012d}-adapter-{i}.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(table, f)
        paths.append(path)
    return Part(layer, lo, hi, paths)


def write_parts(
    client,
    store: Store,
    encoders: dict[int, list[Encoder]],
    runs: Sequence[tuple[int, int]],
    min_act: float,
    parts_url: str,
) -> Parts:
    """Encode every run of every layer on ``client``'s workers into Parquet parts under ``parts_url``."""
    from distributed import as_completed, wait

    url = f"{parts_url.rstrip('/')}/{uuid.uuid4().hex}"
    parts = Parts(url, store.storage_options, {layer: [] for layer in encoders})
    # Each layer's adapters go to every worker once, not with every task.
    shipped = {layer: client.scatter(list(encs), broadcast=True, hash=False) for layer, encs in encoders.items()}
    futures = [
        client.submit(_encode_part, store.url, store.storage_options, layer, shipped[layer], lo, hi, min_act, url,
                      pure=False)
        for layer in encoders
        for lo, hi in runs
    ]
    bar = tqdm(total=len(futures), unit="part", desc="encode", dynamic_ncols=True, disable=None)
    try:
        for future in as_completed(futures):
            part = future.result()
            parts.by_layer[part.layer].append(part)
            bar.update()
    except BaseException:
        # Let the tasks in flight end (cancelling leaves them running) so none writes a part after
        # the removal below; errors do not stop ``wait``.
        wait(futures)
        parts.remove()
        raise
    finally:
        bar.close()
    for layer_parts in parts.by_layer.values():
        layer_parts.sort(key=lambda p: p.lo)
    log.info("encoded %d parts under %s", len(futures), url)
    return parts
