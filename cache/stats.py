"""Per-layer statistics of a store, computed by Dask workers over its row blocks.

For each layer and each of ``x`` and ``delta``: the mean row, the per-dimension variance, the
distribution of row norms (quantiles) and the outlier rows, those whose norm is far above the
layer's median (attention sinks and other massive activations, which the trainer's
``--drop-outliers`` filters). Means and variances are accumulated in float64 from the stored
values, so the result does not depend on how the rows are split among workers beyond float64
rounding; norms are computed row by row, so their quantiles and the outliers are exact.

Only committed blocks are read, so statistics of a harvest still running are those of the
rows written so far.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from tca.cache.cluster import ClusterConfig, dask_client
from tca.cache.layers import select_layers
from tca.cache.store import Store
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges

log = logging.getLogger(__name__)

QUANTILES = (0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0)
"""Probabilities of the reported row-norm quantiles (linear interpolation, as ``numpy.quantile``)."""

STAT_ARRAYS = ("x", "delta")


@dataclass
class StatsConfig:
    """``tca cache stats``: which store and layers, and where the work runs."""

    store: str
    """The activation store (path or fsspec URL)."""
    layers: str = "all"
    """``all`` or a list like ``0,3,5-7`` of the store's layers."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The Dask cluster: a local one of ``workers`` processes unless a scheduler address is given."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options of the store (credentials, endpoint)."""
    outlier_factor: float = field(default=10.0, metadata=POSITIVE)
    """A row is an outlier when its norm exceeds this multiple of the layer's median norm."""
    top_outliers: int = field(default=10, metadata=NON_NEGATIVE)
    """Largest-norm rows listed per layer and array."""

    def __post_init__(self):
        check_ranges(self)


@dataclass
class ArrayStats:
    """Statistics of one array (``x`` or ``delta``) of one layer."""

    mean: list[float]
    """[d] mean of the rows."""
    variance: list[float]
    """[d] per-dimension population variance (ddof 0)."""
    norm_quantiles: dict[str, float]
    """Row L2 norm at each probability of ``QUANTILES`` (keys as text, e.g. ``"0.5"``)."""
    n_outliers: int
    """Rows whose norm exceeds ``outlier_factor`` × the median norm."""
    outliers: list[dict]
    """The ``top_outliers`` largest-norm rows: row, token, doc, pos, piece, norm, norm ÷ median."""


@dataclass
class StoreStats:
    url: str
    rows: int
    """Committed rows the statistics cover (per layer)."""
    layers: dict[int, dict[str, ArrayStats]]
    seconds: float = 0.0
    rows_per_s: float = 0.0
    """Rows × layers per second, each row counted once for x and delta together."""


def store_stats(cfg: StatsConfig) -> StoreStats:
    """Open the store named by ``cfg`` and compute its statistics on a Dask cluster."""
    store = Store.open(cfg.store, storage_options=cfg.storage_options)
    layers = select_layers(cfg.layers, store.layers, f"{store.url} holds")
    with dask_client(cfg.cluster) as client:
        return compute_stats(store, layers, client, cfg.outlier_factor, cfg.top_outliers)


def compute_stats(store: Store, layers: list[int], client, outlier_factor: float = 10.0,
                  top_outliers: int = 10) -> StoreStats:
    """Statistics of ``layers`` with the work on ``client``'s workers, one layer at a time.

    Layer by layer keeps only one layer's row norms (8 bytes a row) in this process at once.
    """
    rows = store.committed_row_indices()
    result = StoreStats(store.url, len(rows), {})
    start = time.perf_counter()
    for layer in layers:
        graphs = []
        for name in STAT_ARRAYS:
            a = store.dask_array(layer, name, dtype="float64", committed_only=True)
            graphs += [a.mean(axis=0), a.var(axis=0), np.sqrt((a * a).sum(axis=1))]
        computed = client.compute(graphs, sync=True)
        result.layers[layer] = {
            name: _array_stats(store, rows, *computed[3 * i : 3 * i + 3], outlier_factor, top_outliers)
            for i, name in enumerate(STAT_ARRAYS)
        }
        log.info("layer %d: median |x| %.3g, %d outlier rows", layer,
                 result.layers[layer]["x"].norm_quantiles["0.5"], result.layers[layer]["x"].n_outliers)
    result.seconds = time.perf_counter() - start
    result.rows_per_s = len(rows) * len(layers) / max(result.seconds, 1e-9)
    return result


def _array_stats(store: Store, rows: np.ndarray, mean: np.ndarray, var: np.ndarray, norms: np.ndarray,
                 outlier_factor: float, top_outliers: int) -> ArrayStats:
    if not len(norms):
        return ArrayStats([], [], {}, 0, [])
    median = float(np.median(norms))
    # Largest first; ties by row so the listing is deterministic.
    top = np.lexsort((rows, -norms))[:top_outliers]
    context = store.tokens_of_rows(rows[top]).to_pylist() if len(top) else []
    outliers = [
        {"row": int(rows[i]), "token": c["token"], "doc": c["doc"], "pos": c["pos"], "piece": c["piece"],
         "norm": float(norms[i]), "norm_over_median": float(norms[i] / median) if median > 0 else float("inf")}
        for i, c in zip(top, context)
    ]
    return ArrayStats(
        mean=mean.tolist(),
        variance=var.tolist(),
        norm_quantiles={str(q): float(v) for q, v in zip(QUANTILES, np.quantile(norms, QUANTILES))},
        n_outliers=int((norms > outlier_factor * median).sum()),
        outliers=outliers,
    )
