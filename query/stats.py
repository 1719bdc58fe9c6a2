"""The hesitation study's statistics: intervals over prompts, matched random controls, verdict rules.

Pure numpy, so every rule can be checked on hand-made figures. The unit of resampling is the
*prompt*: a verdict prompt yields one response per condition (and one teacher-forced trace), and
responses to different prompts are independent, while tokens within one response are not.

- **Proportions** (accuracy, responses hesitating): Wilson score interval. Unlike the normal
  approximation it stays inside [0, 1] and keeps its coverage at 0/n or n/n, where the percentile
  bootstrap collapses to a point.
- **Other figures** (a mean over prompts such as hesitations per response or length, or a ratio of
  sums such as p(words), whose positions are grouped by trace): percentile bootstrap over prompts.
- **Changes between two conditions** (the hesitation cut, the accuracy change, the hesitations a
  clamp adds): *paired* percentile bootstrap: each resample draws prompts once and recomputes both
  conditions on those same prompts, so the prompt-to-prompt variation they share cancels.

Every bootstrap draws the same ``RESAMPLES`` index sets from ``numpy.random.default_rng(seed)``,
``integers(0, n, (RESAMPLES, n))``: a figure's interval depends on its data alone, and intervals
of conditions judged on the same prompts use the same resamples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tca import TcaError

Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile: two-sided 95% intervals."""
RESAMPLES = 2000
"""Bootstrap resamples per interval."""
BOOTSTRAP_SEED = 0
"""Seed of the resampled prompt indices; fixed so that a report's intervals are reproducible and
do not move with the pipeline's seed."""


@dataclass(frozen=True)
class Estimate:
    """A figure and its 95% interval (None where the figure is undefined, e.g. no checkable answer)."""

    value: float | None
    ci95: list[float] | None


NONE = Estimate(None, None)


# ---- intervals ----------------------------------------------------------------------------------


def wilson(successes, n) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score 95% interval (lo, hi) of ``successes`` out of ``n``; vectorised."""
    k, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    p = k / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return np.maximum(centre - half, 0.0), np.minimum(centre + half, 1.0)


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples, n]: how many times each of ``n`` prompts is drawn in each bootstrap resample
    (``integers(0, n, (resamples, n))`` of ``default_rng(seed)``, counted). Every statistic here is a
    ratio of sums, so ``counts @ x`` is the resampled sum of ``x``."""
    if n < 1:
        raise TcaError("a bootstrap needs at least one prompt.")
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
    return counts


def ratio_interval(num, den, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σnum / Σden over the last axis and its percentile bootstrap 95% interval (value, lo, hi).

    ``num`` and ``den`` are per prompt (``[..., n]``, leading axes vectorised); resamples whose
    denominator is 0 leave the ratio undefined and are left out of the quantiles."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = num.sum(-1) / den.sum(-1)
        boot = np.einsum("bn,...n->...b", counts, num) / np.einsum("bn,...n->...b", counts, den)
    boot[~np.isfinite(boot)] = np.nan
    lo, hi = np.nanquantile(boot, [0.025, 0.975], axis=-1) if np.isfinite(boot).any() else (np.nan, np.nan)
    return value, lo, hi


def _estimate(value, lo, hi) -> Estimate:
    if not np.isfinite(value):
        return NONE
    return Estimate(float(value), None if not (np.isfinite(lo) and np.isfinite(hi)) else [float(lo), float(hi)])


def proportion(outcomes: Sequence[float | None]) -> Estimate:
    """Share of 1s among the outcomes that are not None, with its Wilson interval."""
    x = np.array([o for o in outcomes if o is not None], dtype=float)
    if x.size == 0:
        return NONE
    lo, hi = wilson(x.sum(), x.size)
    return Estimate(float(x.mean()), [float(lo), float(hi)])


def mean(x: Sequence[float], counts: np.ndarray) -> Estimate:
    """Mean over prompts, bootstrap interval."""
    x = np.asarray(x, dtype=float)
    return _estimate(*ratio_interval(x, np.ones_like(x), counts))


def ratio(num: Sequence[float], den: Sequence[float], counts: np.ndarray) -> Estimate:
    """Σnum / Σden over prompts (e.g. probability mass over positions), bootstrap interval."""
    return _estimate(*ratio_interval(num, den, counts))


def paired_difference(after: Sequence[float | None], before: Sequence[float | None], counts: np.ndarray) -> Estimate:
    """Mean of ``after − before`` over the prompts where both are defined (not None), paired
    bootstrap interval; a resample keeps each prompt's pair together."""
    a = np.array([np.nan if v is None else v for v in after], dtype=float)
    b = np.array([np.nan if v is None else v for v in before], dtype=float)
    both = np.isfinite(a) & np.isfinite(b)
    return _estimate(*ratio_interval(np.where(both, a - b, 0.0), both.astype(float), counts))


def cut(after: Sequence[float], before: Sequence[float], counts: np.ndarray) -> Estimate:
    """1 − Σafter / Σbefore (the share of ``before`` that is gone), paired bootstrap interval."""
    value, lo, hi = ratio_interval(after, before, counts)
    return _estimate(1 - value, 1 - hi, 1 - lo)


# ---- matched random controls --------------------------------------------------------------------

_SLACK = 1e-9


@dataclass
class ControlSet:
    features: list[tuple[int, int]]
    """One replacement per chosen feature, in the chosen features' order."""
    factor: list[float]
    """Per replacement, the frequency factor it was drawn within (the requested ratio unless widened)."""


def matched_controls(
    layers: np.ndarray,
    features: np.ndarray,
    frequency: np.ndarray,
    chosen: Sequence[tuple[int, int]],
    excluded: set[tuple[int, int]],
    n_sets: int,
    ratio: float = 1.5,
    seed: int = 0,
) -> list[ControlSet]:
    """Random feature sets matched to ``chosen``: each chosen feature is replaced by a live feature
    (frequency > 0) of the same layer whose activation frequency lies within ×/÷ ``ratio`` of its
    own, never one of ``excluded`` or of ``chosen``, and never twice in one set.

    ``layers``, ``features`` and ``frequency`` are the columns of the index's features table. Where
    no feature is in range, the range widens to ×/÷ ratio², ratio³, … until one is (recorded in
    ``ControlSet.factor``); a layer with no live feature left at all is an error.
    """
    if ratio <= 1:
        raise TcaError(f"the control frequency ratio must exceed 1 (got {ratio}).")
    layers, features, frequency = (np.asarray(a) for a in (layers, features, frequency))
    freq_of = {(int(l), int(f)): float(q) for l, f, q in zip(layers, features, frequency, strict=True)}
    for layer, feature in chosen:
        if freq_of.get((layer, feature), 0.0) <= 0:
            raise TcaError(f"feature ({layer}, {feature}) has no activation frequency in the index's features table.")
    banned = set(excluded) | {tuple(c) for c in chosen}
    pools = {}
    for layer in sorted({c[0] for c in chosen}):
        keep = (layers == layer) & (frequency > 0)
        order = np.argsort(features[keep], kind="stable")
        f, q = features[keep][order], frequency[keep][order]
        allowed = np.array([(layer, int(i)) not in banned for i in f], dtype=bool)
        pools[layer] = (f[allowed], q[allowed])
        if not allowed.any():
            raise TcaError(f"layer {layer} has no live feature outside the candidates to serve as a control.")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sets):
        taken: set[tuple[int, int]] = set()
        drawn, factors = [], []
        for layer, feature in chosen:
            f, q = pools[layer]
            free = np.array([(layer, int(i)) not in taken for i in f], dtype=bool)
            if not free.any():
                raise TcaError(f"layer {layer} has too few live features outside the candidates for a control set.")
            # distance in units of log(ratio): within ×/÷ ratio**k is distance <= k; the smallest k
            # that holds a free feature (rounding slack so a frequency exactly on a bound is inside)
            distance = np.abs(np.log(q[free] / freq_of[(layer, feature)])) / math.log(ratio)
            k = max(1, math.ceil(distance.min() - _SLACK))
            pick = (layer, int(rng.choice(f[free][distance <= k + _SLACK])))
            taken.add(pick)
            drawn.append(pick)
            factors.append(ratio**k)
        out.append(ControlSet(drawn, factors))
    return out


def spread(values: Sequence[float | None], quantile: float = 0.95) -> dict[str, float | None]:
    """Median and the ``quantile`` (linear interpolation) of the defined values."""
    x = np.array([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return {"median": None, "p95": None}
    return {"median": float(np.median(x)), "p95": float(np.quantile(x, quantile))}


# ---- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """What the verdicts ask of the intervals (written into the report)."""

    cut: float
    """Necessary: the cut's lower bound is at least this."""
    accuracy_tolerance: float
    """Necessary and sufficient: the accuracy change's lower bound is at least minus this."""
    control_quantile: float
    """Necessary: the cut's lower bound exceeds this quantile of the control sets' cuts; sufficient:
    the added re-checks' lower bound exceeds this quantile of what the control sets add."""
    sufficient_fraction: float
    """Sufficient: the lower bound of the hesitations per response the clamp adds to the hybrid is
    at least this fraction of the target's hesitations per response."""
    frequency_ratio: float
    """Controls: each replacement's activation frequency within ×/÷ this of the feature it replaces."""
    resamples: int
    """Bootstrap resamples per interval."""


ROUNDING = 1e-9
"""Slack for comparing a figure with its bound: figures are ratios of counts (0.09 − 0.14 is
−0.05000000000000001 in floating point), and a bound met exactly must not fail on the last bit."""


def reaches(value: float, bound: float) -> bool:
    """``value >= bound``, up to ``ROUNDING``."""
    return value >= bound - ROUNDING


def necessity_rules(cut: Estimate, accuracy_delta: Estimate, control_cuts: Sequence[float | None],
                    t: Thresholds) -> dict[str, bool]:
    """Each of the three conditions of *necessary*; the verdict is their conjunction. An undefined
    figure or interval meets no rule."""
    lo = cut.ci95[0] if cut.ci95 is not None else None
    return {
        "cut": lo is not None and reaches(lo, t.cut),
        "accuracy": _accuracy_kept(accuracy_delta, t),
        "controls": _beats_controls(lo, control_cuts, t),
    }


def _beats_controls(lo: float | None, control_values: Sequence[float | None], t: Thresholds) -> bool:
    """A lower bound above the ``control_quantile`` of the control sets' defined values (none: fails)."""
    controls = [c for c in control_values if c is not None]
    return lo is not None and bool(controls) and lo > float(np.quantile(controls, t.control_quantile))


def _accuracy_kept(accuracy_delta: Estimate, t: Thresholds) -> bool:
    """The accuracy change's lower bound is at least −``accuracy_tolerance``."""
    return accuracy_delta.ci95 is not None and reaches(accuracy_delta.ci95[0], -t.accuracy_tolerance)


def sufficiency_rules(added: Estimate, target_rechecks: float | None, accuracy_delta: Estimate,
                      control_added: Sequence[float | None], t: Thresholds) -> dict[str, bool]:
    """Each condition of *sufficient*: the clamp adds, at its lower bound, at least
    ``sufficient_fraction`` of the target's re-checks (``rechecks``); the clamped hybrid's
    accuracy change's lower bound stays above −``accuracy_tolerance`` (``accuracy``): re-checks
    bought by breaking the model are not the target's behaviour; and the lower bound exceeds the
    ``control_quantile`` of what random sets clamped the same way add (``controls``)."""
    lo = added.ci95[0] if added.ci95 is not None else None
    return {
        "rechecks": lo is not None and target_rechecks is not None
        and reaches(lo, t.sufficient_fraction * target_rechecks),
        "accuracy": _accuracy_kept(accuracy_delta, t),
        "controls": _beats_controls(lo, control_added, t),
    }


def sufficiency_margin(added: Estimate, target_rechecks: float, accuracy_delta: Estimate, t: Thresholds) -> float:
    """How much room a clamp leaves above the ``rechecks`` and ``accuracy`` rules of *sufficient*:
    each rule's slack at the lower bound (the added re-checks' above ``sufficient_fraction`` of the
    target's, as a share of the target's; the accuracy change's above −``accuracy_tolerance``).
    When both are met, the smaller slack (≥ 0); otherwise minus the sum of the missing amounts.
    What the selection part maximises: a clamp chosen on the selection prompts at the edge of the
    rules meets them on the verdict prompts about half the time, since its figures there are a
    fresh draw (the controls are drawn on the verdict part only)."""
    if added.ci95 is None or accuracy_delta.ci95 is None or not target_rechecks:
        return float("-inf")
    rechecks = (added.ci95[0] - t.sufficient_fraction * target_rechecks) / target_rechecks
    accuracy = accuracy_delta.ci95[0] + t.accuracy_tolerance
    if rechecks >= -ROUNDING and accuracy >= -ROUNDING:
        return max(0.0, min(rechecks, accuracy))
    return min(0.0, rechecks) + min(0.0, accuracy)


def as_text(e: Estimate, fmt: str = ".2f") -> str:
    """``value [lo, hi]``, as the reports print an estimate."""
    if e.value is None:
        return "n/a"
    return format(e.value, fmt) + ("" if e.ci95 is None else f" [{format(e.ci95[0], fmt)}, {format(e.ci95[1], fmt)}]")


def as_percent(e: Estimate) -> str:
    return as_text(e, ".0%")


def as_points(e: Estimate) -> str:
    """A change of a proportion in percentage points, signed."""
    if e.value is None:
        return "n/a"
    ci = "" if e.ci95 is None else f" [{100 * e.ci95[0]:+.1f}, {100 * e.ci95[1]:+.1f}]"
    return f"{100 * e.value:+.1f}{ci} points"
