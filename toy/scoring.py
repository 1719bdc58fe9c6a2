"""Scoring adapters against a planted truth (``tca.toy.pairs``): recovery, copies, L0.

For one planted layer, with the planted unit directions ``V`` [n, d], where each planted neuron
fires (``planted`` [rows, n]), the adapter's decoder ``W_dec`` [F, d] and its activations on the
same rows ``acts`` [rows, F]:

- an adapter feature is *live* when its decoder row is nonzero; only live features fire (a
  feature that writes nothing has no activation worth indexing);
- precision of feature f for planted i: the share of f's firings inside i's firing set;
  recall: the share of i's firings where f fires;
- planted i is *recovered* when one adapter feature has decoder cosine >= ``COSINE`` with V_i
  and precision and recall >= ``MATCH``;
- a *copy* of planted i is an adapter feature with decoder cosine >= ``COSINE`` with V_i and
  precision >= ``COPY_SHARE``; one copy per planted feature is the ideal, more is splitting;
- L0 counts live firing features per row; the true L0 counts firing planted neurons per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COSINE = 0.9
"""Decoder cosine at which an adapter feature points where a planted one does."""
MATCH = 0.8
"""Precision and recall a recovered feature needs against the planted firing set."""
COPY_SHARE = 0.5
"""Share of an adapter feature's firings inside a planted firing set that makes it a copy of it."""


def decoder_cosines(directions: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """[n, F] cosine of each planted direction with each decoder row (0 for a zero row)."""
    rows = W_dec.double()
    norms = rows.norm(dim=1)
    unit = rows / norms.clamp_min(1e-30)[:, None]
    return torch.nn.functional.normalize(directions.double(), dim=1) @ unit.T


def firing_overlap(planted: torch.Tensor, fires: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(precision, recall), each [n, F], of the adapter firings ``fires`` [rows, F] against the
    planted firings ``planted`` [rows, n]; 0 where a feature never fires."""
    both = planted.T.double() @ fires.double()  # [n, F] rows where both fire
    precision = both / fires.sum(0).double().clamp_min(1)[None, :]
    recall = both / planted.sum(0).double().clamp_min(1)[:, None]
    return precision, recall


def live_firing(W_dec: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """[rows, F] bool: positive activation of a feature whose decoder row is nonzero."""
    return (acts > 0) & (W_dec.abs().sum(1) > 0)[None, :]


@dataclass
class LayerScore:
    """One planted layer's adapter against its truth."""

    recovered: list[bool]
    """Per planted feature."""
    copies: list[int]
    """Per planted feature: adapter features that are copies of it."""
    best_cosine: list[float]
    """Per planted feature: its largest decoder cosine over the adapter's features."""
    l0: float
    """Live firing adapter features per row."""
    l0_raw: float
    """Adapter features with a positive activation per row, decoder or not."""
    true_l0: float
    """Firing planted neurons per row."""

    @property
    def recovery(self) -> float:
        return sum(self.recovered) / max(len(self.recovered), 1)

    @property
    def copies_mean(self) -> float:
        return sum(self.copies) / max(len(self.copies), 1)

    def as_dict(self) -> dict:
        return {
            "n_planted": len(self.recovered), "recovery": self.recovery, "copies_mean": self.copies_mean,
            "copies_max": max(self.copies, default=0), "l0": self.l0, "l0_raw": self.l0_raw, "true_l0": self.true_l0,
            "l0_ratio": self.l0 / self.true_l0 if self.true_l0 else None,
            "copies": self.copies, "best_cosine": self.best_cosine, "recovered": self.recovered,
        }


def score_layer(directions: torch.Tensor, planted: torch.Tensor, W_dec: torch.Tensor, acts: torch.Tensor) -> LayerScore:
    """Score one planted layer (see the module docstring for the definitions)."""
    fires = live_firing(W_dec, acts)
    cos = decoder_cosines(directions, W_dec)
    precision, recall = firing_overlap(planted, fires)
    aligned = cos >= COSINE
    recovered = (aligned & (precision >= MATCH) & (recall >= MATCH)).any(1)
    copies = (aligned & (precision >= COPY_SHARE)).sum(1)
    busy = activity(W_dec, acts)
    return LayerScore(
        recovered=recovered.tolist(), copies=copies.tolist(), best_cosine=cos.max(1).values.tolist(),
        l0=busy["l0"], l0_raw=busy["l0_raw"], true_l0=float(planted.sum(1).double().mean()),
    )


def activity(W_dec: torch.Tensor, acts: torch.Tensor) -> dict[str, float]:
    """L0 of live features and of all features (``l0_raw``) per row: a layer where nothing
    changed should show neither."""
    return {"l0": float(live_firing(W_dec, acts).sum(1).double().mean()),
            "l0_raw": float((acts > 0).sum(1).double().mean())}
