"""The activation store: one Zarr v3 group per harvest run, plus two Parquet tables.

    STORE/
      zarr.json              group attributes (see ``StoreSpec`` and ``Store.attrs``)
      layers/<L>/x           [rows, d]  target MLP input, model dtype
      layers/<L>/delta       [rows, d]  MLP_target(x) - MLP_base(x), model dtype
      layers/<L>/y           [rows, d]  optional: MLP_target(x)
      rows/token             [rows]     int64 global token index of each row
      _progress/committed    [blocks]   uint8, 1 once every array of that row block is written
      _progress/layers/<L>   [blocks]   uint8, 1 once layer L's arrays of that block are written
                                        (a harvest in passes, before the block's last layer)
      tokens.parquet, docs.parquet

Rows are fixed by the data plan before any activation exists, so every array is created at
its full size and a harvest only fills blocks in. A *block* is ``block_rows`` consecutive
rows (one shard of every array): writers write whole blocks, so no two writers ever touch
one file, and a block becomes visible to readers only once its flag in ``_progress`` is set,
after all of its arrays are written. A harvest in several passes (``--layers-per-pass``) writes a
block one group of layers at a time: each group's flags in ``_progress/layers`` record its
progress, and the pass that writes a block's last layers commits the block.

Zarr v3 has no bfloat16, so bf16 activations are stored as their uint16 bit pattern with
``"tca_encoding": "bfloat16"`` in the array's attributes; ``decode`` turns them back. Every
chunk ends in a CRC32C checksum, so a corrupted or truncated chunk fails to read instead of
returning wrong numbers. docs/store.md describes the format for readers without tca.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem

from tca import TcaError
from tca.cache.shard import ZSTD_LEVEL, ShardReader, shard_bytes

log = logging.getLogger(__name__)

FORMAT = "tca-activations"
FORMAT_VERSION = 1
ARRAY_NAMES = ("x", "delta", "y")

_STORAGE_DTYPES = {
    torch.float32: ("float32", "float32"),
    torch.float16: ("float16", "float16"),
    torch.bfloat16: ("uint16", "bfloat16"),
}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an encoding or dtype name (``"bfloat16"``, ``"float32"``, …)."""
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise TcaError(f"unknown activation dtype {name!r}; use one of {sorted(_TORCH_DTYPES)}.") from None


def to_stored(t: torch.Tensor) -> np.ndarray:
    """A tensor in its storage form: bf16 as its uint16 bit pattern, others as they are."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def from_stored(a: np.ndarray, encoding: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stored values as a tensor of their own dtype, or cast to ``dtype``."""
    a = np.ascontiguousarray(a)
    if encoding == "bfloat16":
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


@dataclass
class StoreSpec:
    """Everything fixed when a store is created."""

    layers: list[int]
    """Model layers with stored activations, ascending."""
    d_model: int
    """Width of x and delta (the model's hidden size)."""
    dtype: str
    """Activation dtype as the model computes it: ``bfloat16``, ``float16`` or ``float32``."""
    n_rows: int
    """Rows per array, fixed by the data plan (one per kept token)."""
    block_rows: int = 4096
    """Rows per shard: the unit of writing, committing and parallel work."""
    chunk_rows: int = 512
    """Rows per chunk inside a shard: the unit of reading and compression."""
    store_y: bool = False
    """Also store ``y = MLP_target(x)``."""
    compressor: str = "none"
    """``none`` or ``zstd`` (level 1); random-mantissa floats compress little."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """Provenance: models, harvest config, dataset fingerprint, token counts."""

    @property
    def n_blocks(self) -> int:
        return -(-self.n_rows // self.block_rows)

    @property
    def shard_layout(self) -> tuple[int, int]:
        """(rows per shard, rows per chunk) of the layer arrays: ``block_rows`` and ``chunk_rows``,
        shrunk for a store smaller than one block (a shard stays a whole number of chunks)."""
        n = max(self.n_rows, 1)
        chunk = min(self.chunk_rows, n)
        return min(self.block_rows, -(-n // chunk) * chunk), chunk

    @property
    def array_names(self) -> tuple[str, ...]:
        return ARRAY_NAMES if self.store_y else ARRAY_NAMES[:2]


@dataclass
class RowBlock:
    """Consecutive rows ``[start, stop)`` of one layer with the tokens they belong to."""

    start: int
    stop: int
    tokens: np.ndarray
    """Global token index of each row (an index into ``tokens.parquet``)."""
    arrays: dict[str, torch.Tensor]
    """``x``, ``delta`` (and ``y``) as ``[stop - start, d_model]`` tensors."""


def _split_url(url: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


class Store:
    """An activation store opened for reading (``mode="r"``) or filling in (``mode="r+"``)."""

    def __init__(self, url: str, group: zarr.Group, storage_options: dict | None = None):
        self.url = url
        self.group = group
        self.storage_options = storage_options or {}
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise TcaError(f"{url} is not a tca activation store (no '{FORMAT}' format tag).")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise TcaError(
                f"{url} has store format version {attrs.get('format_version')}, this tca reads "
                f"version {FORMAT_VERSION}; harvest it again or use a matching tca release."
            )
        self.spec = StoreSpec(**{f.name: attrs[f.name] for f in dataclasses.fields(StoreSpec)})
        self._committed: np.ndarray | None = None

    # ---- creating and opening -------------------------------------------------------------

    @classmethod
    def create(cls, url: str, spec: StoreSpec, storage_options: dict | None = None) -> Store:
        """Create an empty store with every array at full size; refuses an existing path.

        The group's attributes are written first and in one piece, with ``setup_complete``
        false until the caller has written the row tokens and tables (``mark_setup_complete``),
        so a creation cut short is recognisable and can be redone.
        """
        fs, path = _split_url(url, storage_options)
        if fs.exists(path) and fs.ls(path):
            raise TcaError(f"{url} already exists; pass --resume to continue it or choose a new --out.")
        if spec.block_rows % spec.chunk_rows:
            raise TcaError(f"block_rows ({spec.block_rows}) must be a multiple of chunk_rows ({spec.chunk_rows}).")
        storage, encoding = _STORAGE_DTYPES[torch_dtype(spec.dtype)]
        compressors = _compressors(spec.compressor)
        meta = dataclasses.asdict(spec) | {
            "format": FORMAT, "format_version": FORMAT_VERSION, "setup_complete": False,
        }
        group = zarr.create_group(url, attributes=meta, storage_options=storage_options or None)
        n = max(spec.n_rows, 1)
        shard_rows, chunk_rows = spec.shard_layout
        for layer in spec.layers:
            for name in spec.array_names:
                group.create_array(
                    f"layers/{layer}/{name}",
                    shape=(spec.n_rows, spec.d_model),
                    dtype=storage,
                    chunks=(chunk_rows, spec.d_model),
                    shards=(shard_rows, spec.d_model),
                    compressors=compressors,
                    fill_value=0,
                    attributes={"tca_encoding": encoding},
                )
        group.create_array(
            "rows/token", shape=(spec.n_rows,), dtype="int64",
            chunks=(min(spec.block_rows, n),), compressors=_compressors("zstd"), fill_value=-1,
        )
        # One file per flag, so writers of different blocks never share a file.
        _create_flags(group, "_progress/committed", spec.n_blocks)
        store = cls(url, group, storage_options)
        store.add_layer_flags()
        return store

    @classmethod
    def open(cls, url: str, mode: str = "r", storage_options: dict | None = None) -> Store:
        """Open an existing store; ``mode="r+"`` to fill in blocks."""
        fs, path = _split_url(url, storage_options)
        if not fs.exists(fs.sep.join([path.rstrip(fs.sep), "zarr.json"])):
            raise TcaError(f"{url} is not an activation store (no zarr.json there).")
        group = zarr.open_group(url, mode=mode, storage_options=storage_options or None)
        return cls(url, group, storage_options)

    # ---- what the store holds ----------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def update_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    @property
    def setup_complete(self) -> bool:
        """True once the row tokens and the token and document tables are written."""
        return bool(self.group.attrs.get("setup_complete", False))

    def mark_setup_complete(self) -> None:
        self.update_attrs(setup_complete=True)

    def leftover_writes(self) -> list[str]:
        """Temporary files of chunk writes that a killed process never renamed into place.

        Zarr writes a local chunk to ``<chunk>.<uuid>.partial`` and renames it, so after a
        SIGKILL such files hold no readable data, only disk space; object stores write whole
        objects and leave none.
        """
        return sorted(self.fs.glob(self.root.rstrip("/") + "/**/*.partial"))

    @functools.cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _split_url(self.url, self.storage_options)[0]

    @functools.cached_property
    def root(self) -> str:
        """The store's path inside ``fs``."""
        return _split_url(self.url, self.storage_options)[1].rstrip("/")

    def shard_path(self, layer: int, name: str, block: int) -> str:
        """Path inside ``fs`` of the file holding one block of one array."""
        return f"{self.root}/layers/{layer}/{name}/c/{block}/0"

    def bytes_on_disk(self) -> int:
        return int(self.fs.du(self.root, total=True))

    @property
    def layers(self) -> list[int]:
        return list(self.spec.layers)

    @property
    def d_model(self) -> int:
        return self.spec.d_model

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.spec.dtype)

    @property
    def n_rows(self) -> int:
        return self.spec.n_rows

    def array(self, layer: int, name: str) -> zarr.Array:
        if layer not in self.spec.layers:
            raise TcaError(f"layer {layer} is not in {self.url}; it holds layers {self.spec.layers}.")
        if name not in self.spec.array_names:
            raise TcaError(f"{self.url} has no '{name}' arrays; it holds {list(self.spec.array_names)}.")
        return self.group[f"layers/{layer}/{name}"]

    def shard_reader(self, layer: int, name: str) -> ShardReader:
        """One array's rows straight from its shard files, for scattered reads of committed
        rows; it does not check the commit flags (the loader reads only committed chunks)."""
        self.array(layer, name)  # refuses a layer or array the store lacks
        shard_rows, chunk_rows = self.spec.shard_layout
        return ShardReader(self.fs, lambda block: self.shard_path(layer, name, block),
                           np.dtype(_STORAGE_DTYPES[self.dtype][0]), self.spec.d_model,
                           shard_rows, chunk_rows, self.spec.compressor)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.spec.block_rows
        return start, min(start + self.spec.block_rows, self.spec.n_rows)

    # ---- reading -----------------------------------------------------------------------------

    def read(self, layer: int, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of one array as a tensor (the model dtype unless ``dtype``).

        Refuses rows of blocks that are not committed yet, so a reader never sees a block
        that a harvest is still writing.
        """
        arr = self.array(layer, name)
        self._require_committed(start, stop)
        return from_stored(arr[start:stop], arr.attrs["tca_encoding"], dtype)

    def iter_blocks(
        self,
        layer: int,
        names: Sequence[str] = ("x", "delta"),
        dtype: torch.dtype | None = None,
        blocks: Sequence[int] | None = None,
    ) -> Iterator[RowBlock]:
        """Committed row blocks of one layer in order (or the given ``blocks``), as tensors."""
        done = self.committed()
        for block in range(self.spec.n_blocks) if blocks is None else blocks:
            if not done[block]:
                continue
            start, stop = self.block_range(block)
            yield RowBlock(
                start=start,
                stop=stop,
                tokens=self.row_tokens(start, stop),
                arrays={name: self.read(layer, name, start, stop, dtype) for name in names},
            )

    def tokens_of_rows(self, rows: np.ndarray) -> pa.Table:
        """The token-table entries (token, doc, pos, token_id, piece, region) of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        tokens = self.row_tokens()[rows]
        return self.table("tokens").take(pa.array(tokens))

    def row_tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Global token index of rows ``[start, stop)``."""
        return self.group["rows/token"][start : self.n_rows if stop is None else stop]

    def committed(self) -> np.ndarray:
        """One bool per block: True once all of its arrays are written."""
        self._committed = self.group["_progress/committed"][:].astype(bool)
        return self._committed.copy()

    def layers_written(self) -> np.ndarray:
        """``[layers, blocks]`` bools, rows in ``layers`` order: True where that layer's arrays of the
        block are written (the block is committed, or the layer's flag is set)."""
        written = np.zeros((len(self.spec.layers), self.spec.n_blocks), dtype=bool)
        for i, layer in enumerate(self.spec.layers):
            written[i, self._flagged(f"{self.root}/{LAYER_FLAGS}/{layer}/c")] = True
        return written | self.committed()

    def _flagged(self, folder: str) -> list[int]:
        """The blocks whose flag file exists in ``folder``: a flag is only ever written as 1, and one
        listing costs less than a read per block on an object store."""
        self.fs.invalidate_cache(folder)
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []
        return [int(n) for n in names if n.isdigit()]

    def add_layer_flags(self) -> None:
        """Create the per-layer flags a harvest in passes needs, where they are missing."""
        for layer in self.spec.layers:
            # stores made before harvests in passes have none
            if f"{LAYER_FLAGS}/{layer}" not in self.group:
                _create_flags(self.group, f"{LAYER_FLAGS}/{layer}", self.spec.n_blocks)

    def drop_layer_flags(self) -> None:
        """Remove the set per-layer flags of a complete store: its block flags say all they said,
        and a harvest in passes leaves one file per layer and block."""
        for folder in self.fs.glob(f"{self.root}/{LAYER_FLAGS}/*/c"):
            try:
                self.fs.rm(folder, recursive=True)
            except FileNotFoundError:  # another rank, also finishing, removed it first
                pass

    def _require_committed(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        blocks = slice(start // self.spec.block_rows, (stop - 1) // self.spec.block_rows + 1)
        # Flags only ever go from 0 to 1, so a cached True stays true; re-read only on a miss.
        if self._committed is None or not self._committed[blocks].all():
            if not self.committed()[blocks].all():
                raise TcaError(
                    f"rows {start}:{stop} of {self.url} are not all committed yet; the harvest "
                    "is unfinished (resume it with --resume) or still running."
                )

    @property
    def complete(self) -> bool:
        return bool(self.committed().all())

    def committed_rows(self) -> int:
        done = np.flatnonzero(self.committed())
        return int(sum(stop - start for start, stop in map(self.block_range, done)))

    def dask_array(self, layer: int, name: str, dtype: str | None = "float32", committed_only: bool = False):
        """One array as a dask array with one chunk per block (shard), decoded (to ``dtype`` if given).

        ``committed_only`` keeps only the rows of committed blocks (all rows of a complete store).
        """
        import dask.array as da

        arr = self.array(layer, name)
        raw = da.from_zarr(arr, chunks=(self.spec.block_rows, self.spec.d_model))
        if committed_only and not self.complete:
            done = np.flatnonzero(self.committed())
            raw = da.concatenate([raw[slice(*self.block_range(b))] for b in done]) if len(done) else raw[:0]
        if arr.attrs["tca_encoding"] == "bfloat16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw if dtype is None else raw.astype(dtype)

    def committed_row_indices(self) -> np.ndarray:
        """Indices of the rows in committed blocks, ascending (the rows of ``committed_only``)."""
        done = np.flatnonzero(self.committed())
        if not len(done):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(*self.block_range(b), dtype=np.int64) for b in done])

    def table(self, name: str) -> pa.Table:
        """``tokens`` or ``docs`` as an Arrow table."""
        fs, path = _split_url(self.url, self.storage_options)
        with fs.open(f"{path.rstrip('/')}/{name}.parquet", "rb") as f:
            return pq.read_table(f)

    # ---- writing -----------------------------------------------------------------------------

    def write_block(self, block: int, arrays: dict[int, dict[str, torch.Tensor]]) -> None:
        """Write every array of one block, then mark it committed (the commit is last).

        ``arrays`` holds every stored layer, or, in the last pass of a harvest in passes, the
        layers that the block still lacks: the caller has checked that the others are written
        (``layers_written``).
        """
        self._write_shards(block, arrays)
        self.group["_progress/committed"][block] = 1

    def write_layers(self, block: int, arrays: dict[int, dict[str, torch.Tensor]]) -> None:
        """Write the arrays of some layers of one block, then set those layers' flags (a pass of a
        harvest in passes whose block still lacks other layers: it stays uncommitted)."""
        self._write_shards(block, arrays)
        for layer in arrays:
            self.group[f"{LAYER_FLAGS}/{layer}"][block] = 1

    def _write_shards(self, block: int, arrays: dict[int, dict[str, torch.Tensor]]) -> None:
        """Every array of the layers in ``arrays`` for one block.

        A block is exactly one shard file per array, so the shard is encoded here
        (``shard_bytes``) and written whole, instead of through zarr's per-chunk asynchronous
        pipeline, which costs ~40x more CPU per block and competes with the forward pass.
        """
        start, stop = self.block_range(block)
        fs = self.fs
        for layer in arrays:
            if layer not in self.spec.layers:
                raise ValueError(f"layer {layer} is not stored in {self.url}")
            for name in self.spec.array_names:
                values = arrays[layer][name]
                if values.shape != (stop - start, self.spec.d_model):
                    raise ValueError(f"block {block} of layer {layer}/{name} has shape {tuple(values.shape)}")
                data = shard_bytes(to_stored(values.to(self.dtype)), *self.spec.shard_layout, self.spec.compressor)
                _write_whole(fs, self.shard_path(layer, name, block), data)

    def write_row_tokens(self, tokens: np.ndarray) -> None:
        self.group["rows/token"][:] = np.asarray(tokens, dtype=np.int64)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write ``tokens`` or ``docs``; to a temporary name first so it appears whole."""
        fs, path = _split_url(self.url, self.storage_options)
        final = f"{path.rstrip('/')}/{name}.parquet"
        tmp = final + ".tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, final)


COMPRESSORS = ("none", "zstd")
LAYER_FLAGS = "_progress/layers"
"""Where the per-layer flags of a harvest in passes live, one array per layer."""


def _create_flags(group: zarr.Group, path: str, n_blocks: int) -> None:
    """A uint8 flag per block at ``path``, one file each (absent: 0)."""
    group.create_array(path, shape=(n_blocks,), dtype="uint8", chunks=(1,), compressors=None, fill_value=0)


def _write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a file so that readers see it absent or whole: on a local disk through a temporary
    name (the same ``.<uuid>.partial`` pattern as zarr, so ``leftover_writes`` finds both) and a
    rename; object stores put whole objects."""
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    import os
    import uuid

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _compressors(name: str) -> list:
    """The chunk codecs after serialisation: optional zstd, then always a CRC32C checksum."""
    if name not in COMPRESSORS:
        raise TcaError(f"unknown compressor {name!r}; use one of {list(COMPRESSORS)}.")
    codecs = [zarr.codecs.ZstdCodec(level=ZSTD_LEVEL)] if name == "zstd" else []
    return codecs + [zarr.codecs.Crc32cCodec()]
