"""One block of one array as a file: the layout of zarr's sharding codec, written and read here.

A shard holds a block's inner chunks one after another (little-endian values, optionally zstd,
each followed by its CRC32C) and ends in an index of ``(offset, length)`` pairs, little-endian
uint64, with its own CRC32C; an absent chunk has both set to 2**64 - 1 and reads as zeros.

Zarr reads and writes this layout too, but through a per-call asynchronous pipeline whose
overhead (~2 ms a call, measured) dwarfs the copy of one chunk. The harvester writes whole
shards and the trainer's loader reads scattered chunks, so both go straight to the files;
every other reader uses zarr. Checksums are verified on every read, so a corrupted chunk fails
here exactly as it does through zarr.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import fsspec
import numpy as np

from tca import TcaError

ZSTD_LEVEL = 1
EMPTY_CHUNK = 2**64 - 1
_CRC_BYTES = 4


def _crc32c(payload: bytes | memoryview) -> int:
    import google_crc32c

    return int(google_crc32c.value(bytes(payload) if isinstance(payload, memoryview) else payload))


def shard_bytes(values: np.ndarray, block_rows: int, chunk_rows: int, compressor: str) -> bytes:
    """One block of a 2-D array as its shard file. A short last block pads its last chunk with
    the fill value 0, and chunks past the array's end are absent."""
    from numcodecs.zstd import Zstd

    def with_crc(payload: bytes) -> bytes:
        return payload + _crc32c(payload).to_bytes(_CRC_BYTES, "little")

    zstd = Zstd(level=ZSTD_LEVEL) if compressor == "zstd" else None
    rows = values.shape[0]
    index = np.full((block_rows // chunk_rows, 2), EMPTY_CHUNK, dtype="<u8")
    parts, offset = [], 0
    for i, c0 in enumerate(range(0, rows, chunk_rows)):
        chunk = values[c0 : c0 + chunk_rows]
        if chunk.shape[0] < chunk_rows:
            chunk = np.concatenate([chunk, np.zeros((chunk_rows - chunk.shape[0], *chunk.shape[1:]), chunk.dtype)])
        raw = np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<")).tobytes()
        encoded = with_crc(zstd.encode(raw) if zstd else raw)
        index[i] = (offset, len(encoded))
        parts.append(encoded)
        offset += len(encoded)
    parts.append(with_crc(index.tobytes()))
    return b"".join(parts)


class ShardReader:
    """Rows of one array straight from its shard files, for readers of many scattered chunks.

    ``path_of(block)`` names a block's file inside ``fs``. Indexes are cached per block: only
    committed blocks are read, and a committed block is never rewritten.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path_of, dtype: np.dtype, width: int,
                 block_rows: int, chunk_rows: int, compressor: str):
        self.fs, self.path_of, self.width = fs, path_of, width
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.block_rows, self.chunk_rows = block_rows, chunk_rows
        self.n_chunks = block_rows // chunk_rows
        self._zstd = None
        if compressor == "zstd":
            from numcodecs.zstd import Zstd

            self._zstd = Zstd(level=ZSTD_LEVEL)
        self._indexes: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in their stored dtype, across blocks if need be."""
        out = np.empty((stop - start, self.width), dtype=self.dtype)
        for at, rows in self.pieces(start, stop):
            out[at : at + len(rows)] = rows
        return out

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows ``[start, stop)`` as ``(offset from start, rows)`` pieces, one per chunk, viewing
        the bytes read (no copy for uncompressed chunks): a caller that scatters rows to other
        places copies each row once."""
        at = start
        while at < stop:
            block = at // self.block_rows
            upto = min(stop, (block + 1) * self.block_rows)
            base = block * self.block_rows
            for offset, rows in self._block_pieces(block, at - base, upto - base):
                yield offset + base - start, rows
            at = upto

    def _block_pieces(self, block: int, lo: int, hi: int) -> Iterator[tuple[int, np.ndarray]]:
        path = self.path_of(block)
        index = self._index(block, path)
        first, last = lo // self.chunk_rows, (hi - 1) // self.chunk_rows
        entries = index[first : last + 1]
        present = entries[:, 0] != EMPTY_CHUNK
        data = begin = None
        if present.any():  # one request for the whole range
            begin = int(entries[present, 0].min())
            data = memoryview(self.fs.cat_file(path, start=begin, end=int((entries[present, 0] + entries[present, 1]).max())))
        for i, (offset, length) in enumerate(entries):
            c0 = (first + i) * self.chunk_rows
            a, b = max(lo, c0), min(hi, c0 + self.chunk_rows)
            if present[i]:
                chunk = self._decode(data[int(offset) - begin : int(offset) - begin + int(length)], path)
                rows = chunk.reshape(self.chunk_rows, self.width)[a - c0 : b - c0]
            else:
                rows = np.zeros((b - a, self.width), dtype=self.dtype)
            yield a, rows

    def _decode(self, encoded: memoryview, path: str) -> np.ndarray:
        payload, crc = encoded[:-_CRC_BYTES], encoded[-_CRC_BYTES:]
        if _crc32c(payload) != int.from_bytes(crc, "little"):
            raise TcaError(f"{path}: a chunk fails its checksum; run `tca cache verify` on the store.")
        raw = self._zstd.decode(payload) if self._zstd else payload
        return np.frombuffer(raw, dtype=self.dtype)

    def _index(self, block: int, path: str) -> np.ndarray:
        with self._lock:
            index = self._indexes.get(block)
        if index is not None:
            return index
        size = self.n_chunks * 16 + _CRC_BYTES
        try:
            tail = memoryview(self.fs.tail(path, size))
        except FileNotFoundError:
            raise TcaError(f"{path} is missing; run `tca cache verify` on the store.") from None
        if len(tail) != size or _crc32c(tail[:-_CRC_BYTES]) != int.from_bytes(tail[-_CRC_BYTES:], "little"):
            raise TcaError(f"{path}: the shard index is damaged; run `tca cache verify` on the store.")
        index = np.frombuffer(tail[:-_CRC_BYTES], dtype="<u8").reshape(self.n_chunks, 2)
        with self._lock:
            self._indexes[block] = index
        return index
