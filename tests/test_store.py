"""The store format on its own: encodings, commit visibility and the reader API."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from tca import TcaError
from tca.cache.store import Store, StoreSpec


def make_store(path, dtype="bfloat16", n_rows=100, block_rows=32, chunk_rows=16, compressor="none") -> Store:
    spec = StoreSpec(layers=[1, 3], d_model=8, dtype=dtype, n_rows=n_rows, block_rows=block_rows,
                     chunk_rows=chunk_rows, compressor=compressor)
    store = Store.create(str(path), spec)
    store.write_row_tokens(np.arange(n_rows) * 2)
    store.write_table("tokens", pa.table({"token": np.arange(2 * n_rows), "doc": np.arange(2 * n_rows) // 10}))
    store.mark_setup_complete()
    return store


def block_values(store: Store, block: int, seed: int) -> dict:
    start, stop = store.block_range(block)
    g = torch.Generator().manual_seed(seed + block)
    return {
        layer: {name: (torch.randn(stop - start, store.d_model, generator=g) * 100).to(store.dtype)
                for name in store.spec.array_names}
        for layer in store.layers
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_values_round_trip_bit_exactly(tmp_path, dtype, compressor):
    store = make_store(tmp_path / "s", dtype, compressor=compressor)
    written = {b: block_values(store, b, 0) for b in range(store.spec.n_blocks)}
    for b, values in written.items():
        store.write_block(b, values)
    again = Store.open(str(tmp_path / "s"))
    for b, values in written.items():
        start, stop = again.block_range(b)
        for layer in again.layers:
            got = again.read(layer, "delta", start, stop)
            want = values[layer]["delta"]
            assert got.dtype == want.dtype
            assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                               want.view(torch.int16 if want.element_size() == 2 else torch.int32))
            assert torch.equal(again.read(layer, "x", start, stop, torch.float32), values[layer]["x"].float())
    dask = again.dask_array(3, "x").compute()
    assert np.array_equal(dask, again.read(3, "x", 0, again.n_rows, torch.float32).numpy())


def test_bf16_is_stored_as_its_bit_pattern(tmp_path):
    store = make_store(tmp_path / "s", "bfloat16", n_rows=32)
    values = block_values(store, 0, 1)
    store.write_block(0, values)
    meta = json.loads((tmp_path / "s" / "layers" / "1" / "x" / "zarr.json").read_text())
    assert meta["data_type"] == "uint16" and meta["attributes"]["tca_encoding"] == "bfloat16"
    raw = store.array(1, "x")[:]
    expected = values[1]["x"].float().numpy().view(np.uint32) >> 16  # bf16 = top half of float32
    assert np.array_equal(raw, expected.astype(np.uint16))


def test_uncommitted_rows_are_not_readable(tmp_path):
    store = make_store(tmp_path / "s")
    store.write_block(1, block_values(store, 1, 0))
    reader = Store.open(str(tmp_path / "s"))
    assert reader.committed().tolist() == [False, True, False, False]
    reader.read(1, "x", 32, 64)
    with pytest.raises(TcaError, match="not all committed"):
        reader.read(1, "x", 30, 40)
    blocks = list(reader.iter_blocks(3, dtype=torch.float32))
    assert [(b.start, b.stop) for b in blocks] == [(32, 64)]
    assert np.array_equal(blocks[0].tokens, np.arange(32, 64) * 2)
    store.write_block(0, block_values(store, 0, 0))
    reader.read(1, "x", 30, 40)  # a block committed after opening becomes readable


def test_tokens_of_rows(tmp_path):
    store = make_store(tmp_path / "s")
    table = store.tokens_of_rows(np.array([0, 5, 99]))
    assert table.column("token").to_pylist() == [0, 10, 198]
    assert table.column("doc").to_pylist() == [0, 1, 19]


def test_refuses_existing_path_and_other_versions(tmp_path):
    make_store(tmp_path / "s")
    with pytest.raises(TcaError, match="already exists"):
        make_store(tmp_path / "s")
    meta_path = tmp_path / "s" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(TcaError, match="format version 99"):
        Store.open(str(tmp_path / "s"))
    with pytest.raises(TcaError, match="not an activation store"):
        Store.open(str(tmp_path / "nothing"))


@pytest.mark.parametrize("n_rows", [64 + 21, 10, 40])
@pytest.mark.parametrize("compressor", ["none", "zstd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shard_files_equal_what_zarr_itself_writes(tmp_path, compressor, dtype, n_rows):
    """write_block encodes shards itself; zarr, writing the same rows, must produce the same
    bytes, including a short last block (padded last chunk, absent chunks past the end) and
    stores smaller than one block or one chunk."""
    from pathlib import Path

    from tca.cache.store import to_stored

    spec = StoreSpec(layers=[0], d_model=8, dtype=dtype, n_rows=n_rows, block_rows=64, chunk_rows=16,
                     compressor=compressor)
    ours, theirs = Store.create(str(tmp_path / "ours"), spec), Store.create(str(tmp_path / "zarr"), spec)
    values = torch.randn(spec.n_rows, spec.d_model).to(getattr(torch, dtype))
    for block in range(spec.n_blocks):
        start, stop = ours.block_range(block)
        ours.write_block(block, {0: {name: values[start:stop] for name in spec.array_names}})
        for name in spec.array_names:
            theirs.array(0, name)[start:stop] = to_stored(values[start:stop])
    for block in range(spec.n_blocks):
        for name in spec.array_names:
            assert Path(ours.shard_path(0, name, block)).read_bytes() == Path(theirs.shard_path(0, name, block)).read_bytes()
    assert torch.equal(ours.read(0, "x", 0, spec.n_rows), values)
    assert not list(Path(tmp_path / "ours").rglob("*.partial"))


@pytest.mark.parametrize("compressor", ["none", "zstd"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_shard_reader_equals_zarr(tmp_path, compressor, dtype):
    """The loader's direct shard reader returns what zarr returns, for ranges inside a chunk,
    across chunks and across blocks, including a short last block."""
    from tca.cache.store import to_stored

    spec = StoreSpec(layers=[0], d_model=8, dtype=dtype, n_rows=64 * 3 + 21, block_rows=64, chunk_rows=16,
                     compressor=compressor)
    store = Store.create(str(tmp_path / "s"), spec)
    values = torch.randn(spec.n_rows, spec.d_model).to(getattr(torch, dtype))
    for block in range(spec.n_blocks):
        start, stop = store.block_range(block)
        store.write_block(block, {0: {name: values[start:stop] for name in spec.array_names}})
    reader, array = store.shard_reader(0, "delta"), store.array(0, "delta")
    rng = np.random.default_rng(0)
    ranges = [(0, spec.n_rows), (3, 9), (16, 32), (60, 70), (5, 150), (192, spec.n_rows)]
    ranges += [tuple(sorted(rng.integers(0, spec.n_rows + 1, 2))) for _ in range(20)]
    for start, stop in ranges:
        got = reader.read(start, stop)
        assert got.dtype == array.dtype and np.array_equal(got, array[start:stop]), (start, stop)
        assert np.array_equal(got, to_stored(values[start:stop]))


def test_shard_reader_refuses_damaged_shards(tmp_path):
    from pathlib import Path

    spec = StoreSpec(layers=[0], d_model=8, dtype="float32", n_rows=128, block_rows=64, chunk_rows=16)
    store = Store.create(str(tmp_path / "s"), spec)
    for block in range(2):
        store.write_block(block, {0: {name: torch.randn(64, 8) for name in spec.array_names}})
    reader = store.shard_reader(0, "x")
    flipped = Path(store.shard_path(0, "x", 0))
    data = bytearray(flipped.read_bytes())
    data[600] ^= 0xFF  # inside the second chunk (bytes 516 to 1031)
    flipped.write_bytes(bytes(data))
    reader.read(0, 16)  # the first chunk is intact
    with pytest.raises(TcaError, match="checksum"):
        reader.read(10, 20)
    cut = Path(store.shard_path(0, "x", 1))
    cut.write_bytes(cut.read_bytes()[:-3])
    with pytest.raises(TcaError, match="index is damaged"):
        reader.read(64, 70)
    cut.unlink()
    with pytest.raises(TcaError, match="missing"):
        store.shard_reader(0, "x").read(64, 70)
