"""The study's statistics (tca.query.stats) against simulations and brute-force recomputations."""

from __future__ import annotations

import numpy as np
import pytest

from tca import TcaError
from tca.query import stats
from tca.query.stats import Estimate, Thresholds

N, SIMULATIONS = 100, 2000


@pytest.mark.parametrize("p", [0.4, 0.62])
def test_wilson_covers_a_known_binomial_proportion_95_percent_of_the_time(p):
    k = np.random.default_rng(1).binomial(N, p, size=SIMULATIONS)
    lo, hi = stats.wilson(k, N)
    coverage = np.mean((lo <= p) & (p <= hi))
    assert 0.93 <= coverage <= 0.97


def test_wilson_inverts_the_score_test():
    """The interval is every p whose score test |k/n − p| ≤ z·sqrt(p(1 − p)/n) accepts k/n: found
    on a fine grid, independently of the closed form. 0/n and n/n keep a nonzero width."""
    grid = np.linspace(0, 1, 200_001)
    for k, n in [(0, 100), (3, 100), (50, 100), (97, 100), (100, 100), (7, 13)]:
        accepted = grid[np.abs(k / n - grid) <= 1.959963984540054 * np.sqrt(grid * (1 - grid) / n)]
        lo, hi = stats.wilson(k, n)
        assert lo == pytest.approx(accepted.min(), abs=1e-5) and hi == pytest.approx(accepted.max(), abs=1e-5)
    assert stats.wilson(0, 100)[1] > 0.03 and stats.wilson(100, 100)[0] < 0.97


def test_bootstrap_covers_a_known_mean_of_counts():
    """Hesitations per response are counts; the percentile bootstrap of their mean over 100
    prompts covers the true mean about 95% of the time."""
    x = np.random.default_rng(2).poisson(2.0, size=(SIMULATIONS, N))
    _, lo, hi = stats.ratio_interval(x, np.ones_like(x), stats.resample_counts(N))
    assert 0.93 <= np.mean((lo <= 2.0) & (2.0 <= hi)) <= 0.97


def _brute_resamples(n: int, resamples: int = stats.RESAMPLES, seed: int = stats.BOOTSTRAP_SEED) -> np.ndarray:
    """The documented draw: prompt indices, one row per resample."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def test_resample_counts_count_the_documented_draw():
    idx = _brute_resamples(30)
    counts = stats.resample_counts(30)
    assert counts.shape == (stats.RESAMPLES, 30) and (counts.sum(1) == 30).all()
    for row in (0, 1, 999, stats.RESAMPLES - 1):
        assert (counts[row] == np.bincount(idx[row], minlength=30)).all()


def test_paired_bootstrap_matches_a_brute_force_loop():
    """Cut, difference and ratio: each resample draws prompts once and recomputes both conditions
    on the same prompts (a loop over the documented index draws, with np.quantile)."""
    rng = np.random.default_rng(3)
    n = 60
    before = rng.poisson(2.5, n).astype(float)
    after = np.minimum(before, rng.poisson(0.4, n))  # correlated with before, as an ablation's are
    correct_before = [None if i % 7 == 0 else float(rng.random() < 0.6) for i in range(n)]
    correct_after = [None if c is None else float(rng.random() < 0.7) for c in correct_before]
    counts = stats.resample_counts(n)
    idx = _brute_resamples(n)

    cuts = np.array([1 - after[i].sum() / before[i].sum() for i in idx])
    got = stats.cut(after, before, counts)
    assert got.value == pytest.approx(1 - after.sum() / before.sum())
    assert got.ci95 == pytest.approx(list(np.quantile(cuts, [0.025, 0.975])))

    a = np.array([np.nan if c is None else c for c in correct_after])
    b = np.array([np.nan if c is None else c for c in correct_before])
    diffs = []
    for i in idx:
        both = ~np.isnan(a[i]) & ~np.isnan(b[i])
        diffs.append(np.mean(a[i][both] - b[i][both]))
    got = stats.paired_difference(correct_after, correct_before, counts)
    assert got.value == pytest.approx(np.nanmean(a - b))
    assert got.ci95 == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])))

    mass, positions = rng.random(n) * 3, rng.integers(0, 5, n)
    ratios = np.array([mass[i].sum() / positions[i].sum() for i in idx])
    got = stats.ratio(mass, positions, counts)
    assert got.value == pytest.approx(mass.sum() / positions.sum())
    assert got.ci95 == pytest.approx(list(np.quantile(ratios, [0.025, 0.975])))

    # pairing is what narrows it: resampling the two conditions' prompts independently is wider
    other = _brute_resamples(n, seed=99)
    unpaired = np.array([1 - after[j].sum() / before[i].sum() for i, j in zip(idx, other, strict=True)])
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert stats.cut(after, before, counts).ci95[1] - stats.cut(after, before, counts).ci95[0] < hi - lo


def test_undefined_figures_have_no_value():
    counts = stats.resample_counts(4)
    assert stats.proportion([None, None]) == stats.NONE
    assert stats.cut([0, 0, 0, 0], [0, 0, 0, 0], counts) == stats.NONE
    assert stats.paired_difference([None, 1, None, 0], [1, None, 0, None], counts) == stats.NONE


def test_proportion_is_wilson_over_defined_outcomes():
    e = stats.proportion([1.0, 0.0, None, 1.0, 1.0])
    lo, hi = stats.wilson(3, 4)
    assert e == Estimate(0.75, [float(lo), float(hi)])


def test_spread_is_median_and_quantile():
    values = [0.1, None, 0.5, -0.2, 0.3, 0.0]
    x = np.array([0.1, 0.5, -0.2, 0.3, 0.0])
    assert stats.spread(values) == pytest.approx({"median": np.median(x), "p95": np.quantile(x, 0.95)})
    assert stats.spread([None]) == {"median": None, "p95": None}


# ---- matched controls ---------------------------------------------------------------------------


def _features_table():
    """Two layers; layer 0's frequencies span 1e-4 … 0.5, a few dead; layer 1 has one live feature
    far from the chosen one's frequency."""
    rng = np.random.default_rng(4)
    f0 = np.exp(rng.uniform(np.log(1e-4), np.log(0.5), 200))
    f0[[5, 17, 60]] = 0.0
    f0[10] = 0.01
    layers = np.r_[np.zeros(200, int), np.ones(3, int)]
    features = np.r_[np.arange(200), np.arange(3)]
    frequency = np.r_[f0, [0.2, 0.0, 0.001]]
    return layers, features, frequency


def test_controls_match_frequency_within_the_ratio_and_exclude_candidates():
    layers, features, frequency = _features_table()
    freq = {(int(l), int(f)): q for l, f, q in zip(layers, features, frequency, strict=True)}
    chosen = [(0, 10), (0, 42)]
    candidates = {(0, 10), (0, 42)} | {(0, int(f)) for f in features[:200] if 0.008 < frequency[f] < 0.0125}
    sets = stats.matched_controls(layers, features, frequency, chosen, candidates, n_sets=300, ratio=1.5, seed=0)
    assert len(sets) == 300
    reached = set()
    for s in sets:
        assert len(set(s.features)) == len(chosen)
        for (layer, f), (cl, cf), factor in zip(s.features, chosen, s.factor, strict=True):
            assert layer == cl and (layer, f) not in candidates and freq[(layer, f)] > 0
            ratio = freq[(layer, f)] / freq[(cl, cf)]
            assert factor == 1.5 and 1 / 1.5 <= ratio <= 1.5
            reached.add((layer, f))
    # every eligible feature can be drawn, and nothing else is
    eligible = {(0, int(f)) for f in features[:200] if frequency[f] > 0 and (0, int(f)) not in candidates
                and any(1 / 1.5 <= frequency[f] / freq[c] <= 1.5 for c in chosen)}
    assert reached == eligible
    again = stats.matched_controls(layers, features, frequency, chosen, candidates, n_sets=300, ratio=1.5, seed=0)
    assert [s.features for s in again] == [s.features for s in sets]


def test_controls_widen_deterministically_where_nothing_matches():
    """Layer 1 holds one live feature at frequency 0.2 besides the chosen one at 0.001:
    200× away, so the range widens to the smallest power of 1.5 that reaches it (1.5**14)."""
    layers, features, frequency = _features_table()
    sets = stats.matched_controls(layers, features, frequency, [(1, 2)], set(), n_sets=5, ratio=1.5, seed=0)
    k = int(np.ceil(np.log(0.2 / 0.001) / np.log(1.5)))
    assert 1.5 ** (k - 1) < 200 <= 1.5**k
    assert all(s.features == [(1, 0)] and s.factor == [pytest.approx(1.5**k)] for s in sets)
    with pytest.raises(TcaError, match="layer 1"):  # its only other live feature is a candidate
        stats.matched_controls(layers, features, frequency, [(1, 2)], {(1, 0)}, n_sets=1)
    with pytest.raises(TcaError, match="no activation frequency"):  # a dead feature cannot be matched
        stats.matched_controls(layers, features, frequency, [(1, 1)], set(), n_sets=1)


# ---- verdict rules ------------------------------------------------------------------------------

RULES = Thresholds(cut=0.8, accuracy_tolerance=0.05, control_quantile=0.95, sufficient_fraction=0.25,
                   frequency_ratio=1.5, resamples=2000)
CONTROL_CUTS = [0.0, 0.02, -0.05, 0.1, 0.01] * 4


def test_necessary_needs_every_rule():
    cut, acc = Estimate(0.94, [0.88, 0.98]), Estimate(0.17, [0.08, 0.26])
    assert stats.necessity_rules(cut, acc, CONTROL_CUTS, RULES) == {"cut": True, "accuracy": True, "controls": True}
    # the point estimate clears 80% but the lower bound does not
    assert not stats.necessity_rules(Estimate(0.85, [0.79, 0.9]), acc, CONTROL_CUTS, RULES)["cut"]
    # accuracy: a change of −3 points whose interval reaches −6
    assert not stats.necessity_rules(cut, Estimate(-0.03, [-0.06, 0.0]), CONTROL_CUTS, RULES)["accuracy"]
    assert stats.necessity_rules(cut, Estimate(-0.03, [-0.05, 0.0]), CONTROL_CUTS, RULES)["accuracy"]
    # controls whose 95th percentile reaches the cut's lower bound (one wild set of 20 does not)
    assert stats.necessity_rules(cut, acc, CONTROL_CUTS[:-1] + [0.95], RULES)["controls"]
    assert not stats.necessity_rules(cut, acc, CONTROL_CUTS[:-2] + [0.95, 0.95], RULES)["controls"]
    assert not stats.necessity_rules(cut, acc, [0.88] * 20, RULES)["controls"]  # above, not equal
    # a bound met exactly holds, whatever the last bit of the float (0.09 − 0.14 < −0.05 in binary)
    assert stats.necessity_rules(cut, Estimate(0.0, [0.09 - 0.14, 0.05]), CONTROL_CUTS, RULES)["accuracy"]
    assert not stats.necessity_rules(cut, Estimate(0.0, [-0.051, 0.05]), CONTROL_CUTS, RULES)["accuracy"]
    # undefined figures meet nothing
    assert stats.necessity_rules(stats.NONE, stats.NONE, [], RULES) == {"cut": False, "accuracy": False,
                                                                         "controls": False}


def test_sufficient_needs_the_lower_bounds_of_the_added_rechecks_and_of_the_accuracy_change():
    target, held = 2.8, Estimate(0.0, [-0.05, 0.05])  # a quarter of the target: 0.7; tolerance 5 points
    controls = [0.0] * 19 + [0.4]  # 95% quantile (linear): 0.02

    def rechecks(added, target=target, accuracy=held):
        return stats.sufficiency_rules(added, target, accuracy, controls, RULES)["rechecks"]

    assert rechecks(Estimate(2.08, [1.7, 2.4]))
    assert rechecks(Estimate(1.0, [0.7, 1.3]))
    assert not rechecks(Estimate(1.0, [0.69, 1.3]))
    assert not rechecks(stats.NONE)
    assert not rechecks(Estimate(1.0, [0.8, 1.3]), target=None)
    # re-checks that cost the hybrid its answers do not count as the target's behaviour
    added = Estimate(2.0, [1.8, 2.3])
    assert stats.sufficiency_rules(added, target, held, controls, RULES) == {"rechecks": True, "accuracy": True,
                                                                             "controls": True}
    assert stats.sufficiency_rules(added, target, Estimate(-0.12, [-0.2, -0.051]), controls,
                                   RULES)["accuracy"] is False
    assert stats.sufficiency_rules(added, target, stats.NONE, controls, RULES)["accuracy"] is False
    # the lower bound must beat what random sets clamped the same way add; no controls meet nothing
    assert stats.sufficiency_rules(added, target, held, [1.0] * 18 + [1.9, 2.0], RULES)["controls"] is False
    assert stats.sufficiency_rules(added, target, held, [1.0] * 19 + [1.79], RULES)["controls"] is True
    assert stats.sufficiency_rules(added, target, held, [], RULES)["controls"] is False


def test_the_margin_is_the_smaller_slack_when_both_interval_rules_are_met_else_minus_the_missing_amounts():
    target = 2.8  # needs 0.7 added at the lower bound, accuracy lower bound >= -0.05
    assert stats.sufficiency_margin(Estimate(1.0, [0.7, 1.3]), target, Estimate(0.0, [-0.05, 0.05]), RULES) == 0.0
    # room on both: the re-check slack is a share of the target's re-checks, the accuracy slack in proportion
    room = stats.sufficiency_margin(Estimate(1.5, [1.12, 1.9]), target, Estimate(0.1, [0.05, 0.2]), RULES)
    assert room == pytest.approx(min((1.12 - 0.7) / 2.8, 0.05 + 0.05))
    assert stats.sufficiency_margin(Estimate(1.5, [1.12, 1.9]), target, Estimate(0.0, [-0.04, 0.1]),
                                    RULES) == pytest.approx(0.01)
    short = stats.sufficiency_margin(Estimate(1.0, [0.42, 1.3]), target, Estimate(-0.1, [-0.15, 0.0]), RULES)
    assert short == pytest.approx(-((0.7 - 0.42) / 2.8 + 0.10))
    # a rule that is met adds nothing to what is missing
    assert stats.sufficiency_margin(Estimate(3.0, [2.5, 3.5]), target, Estimate(-0.1, [-0.2, 0.0]),
                                    RULES) == pytest.approx(-0.15)
    assert stats.sufficiency_margin(stats.NONE, target, Estimate(0.0, [-0.05, 0.05]), RULES) == float("-inf")
