"""Synthetic activation stores whose delta is a known sparse function of x.

    delta = relu(x @ E.T - t) @ V  (+ noise)

with ``n_true`` unit encoder directions ``E``, thresholds ``t`` chosen so each true feature
fires on ``fire_prob`` of the rows, and random decoder directions ``V``. An adapter with at
least ``n_true`` features can explain nearly all of delta at L0 near ``n_true * fire_prob``,
so tests and benchmarks can check training against a known target without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import torch

from tca.cache.store import Store, StoreSpec


@dataclass
class SyntheticSpec:
    """The shape and content of a synthetic store."""

    d_model: int = 32
    layers: tuple[int, ...] = (0, 1)
    n_docs: int = 64
    doc_len: int = 64
    n_true: int = 16
    """True sparse features behind delta."""
    fire_prob: float = 0.1
    """How often each true feature fires."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to delta."""
    sink_scale: float = 0.0
    """If > 0, the first token of every document gets x scaled by this (an attention sink)."""
    dtype: str = "float32"
    block_rows: int = 512
    chunk_rows: int = 128
    store_y: bool = False
    seed: int = 0
    unchanged: tuple[int, ...] = ()
    """Layers whose delta is exactly zero, as where fine-tuning left an MLP alone."""


def make_synthetic_store(url: str, spec: SyntheticSpec) -> Store:
    """Create the store at ``url`` with every block committed."""
    n = spec.n_docs * spec.doc_len
    g = torch.Generator().manual_seed(spec.seed)
    store = Store.create(
        url,
        StoreSpec(
            layers=list(spec.layers), d_model=spec.d_model, dtype=spec.dtype, n_rows=n,
            block_rows=spec.block_rows, chunk_rows=spec.chunk_rows, store_y=spec.store_y,
            attrs={"models": {"base": {"id": "synthetic-base"}, "target": {"id": f"synthetic-target-{spec.seed}"}}},
        ),
    )
    doc = np.repeat(np.arange(spec.n_docs), spec.doc_len)
    pos = np.tile(np.arange(spec.doc_len), spec.n_docs)
    threshold = NormalDist().inv_cdf(1 - spec.fire_prob)
    data = {}
    for layer in spec.layers:
        E = torch.nn.functional.normalize(torch.randn(spec.n_true, spec.d_model, generator=g), dim=-1)
        V = torch.randn(spec.n_true, spec.d_model, generator=g) / spec.d_model**0.5
        base = torch.randn(spec.d_model, spec.d_model, generator=g) / spec.d_model**0.5
        x = torch.randn(n, spec.d_model, generator=g)
        if spec.sink_scale > 0:
            x[pos == 0] *= spec.sink_scale
        delta = torch.relu(x @ E.T - threshold) @ V
        if spec.noise:
            delta += spec.noise * torch.randn(n, spec.d_model, generator=g)
        if layer in spec.unchanged:  # zeroed after drawing, so the other layers' data stay as they were
            delta.zero_()
        data[layer] = {"x": x, "delta": delta, "y": x @ base + delta}
    store.write_row_tokens(np.arange(n))
    for block in range(store.spec.n_blocks):
        a, b = store.block_range(block)
        store.write_block(block, {layer: {k: v[a:b] for k, v in arrays.items()} for layer, arrays in data.items()})
    store.write_table(
        "tokens",
        pa.table({
            "token": np.arange(n), "doc": doc, "pos": pos, "token_id": (np.arange(n) * 7919) % 1000,
            "piece": [f"t{i % 1000}" for i in range(n)], "region": ["think"] * n,
        }),
    )
    store.write_table("docs", pa.table({"doc": np.arange(spec.n_docs), "n_tokens": np.full(spec.n_docs, spec.doc_len)}))
    return store
