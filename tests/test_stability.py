"""Matching hesitation features across seeds by decoder direction (tca.query.stability)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tca.query.stability import Direction, SeedFindings, _name, directions, stability_markdown
from tca.query.stats import Estimate


def _nudged(row: torch.Tensor, cosine: float, generator: torch.Generator) -> torch.Tensor:
    """A vector at exactly ``cosine`` to ``row``, of another length."""
    u = row / row.norm()
    other = torch.randn(row.shape, generator=generator, dtype=torch.float64)
    other -= (other @ u) * u
    other /= other.norm()
    return 3.0 * (cosine * u + (1 - cosine ** 2) ** 0.5 * other)


def _seeds():
    """Three seeds, 2 layers of 16 features in 8 dimensions, with a hesitation direction h in layer 1:
    seed 0 chose it as feature 3, seed 1 as feature 9 (cosine 0.95) and also a near-copy, feature 10
    (0.97 to its feature 9, 0.93 to seed 0's); seed 2 holds it as feature 5 (cosine 0.92) but chose
    another layer-1 feature, 7 (a direction of its own), and layer 0's feature 2."""
    g = torch.Generator().manual_seed(0)
    dec = {s: {layer: torch.randn(16, 8, generator=g, dtype=torch.float64) for layer in (0, 1)} for s in range(3)}
    h = dec[0][1][3]
    dec[1][1][9] = _nudged(h, 0.95, g)
    dec[1][1][10] = _nudged(dec[1][1][9], 0.97, g)
    dec[2][1][5] = _nudged(h, 0.92, g)
    dec[2][1][7] = _nudged(h, 0.2, g)
    dec[2][0][4] = 0.0  # a feature that writes nothing matches nothing
    chosen = {0: [(1, 3)], 1: [(1, 9), (1, 10)], 2: [(0, 2), (1, 7)]}
    return dec, chosen


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a[None], b[None]).item())


def test_directions_group_seeds_by_decoder_cosine():
    dec, chosen = _seeds()
    found = directions(dec, chosen, min_cosine=0.9)
    by_first = {d.members[0]: d for d in found}
    h = by_first[(0, 3)]
    # seed 1's two picks join seed 0's (directly or through each other); seed 2's do not
    assert h.layer == 1 and h.members == [(0, 3), (1, 9), (1, 10)] and h.chosen_in == 2
    assert [p.chosen for p in h.per_seed] == [[3], [9, 10], []]
    # present wherever some feature of the layer lies within 0.9 of the first member, chosen or not
    for p in h.per_seed:
        sims = [_cos(dec[0][1][3], row) for row in dec[p.seed][1]]
        assert p.feature == max(range(16), key=sims.__getitem__)
        assert abs(p.cosine - max(sims)) < 1e-12
    assert [p.feature for p in h.per_seed] == [3, 9, 5] and h.present_in == 3
    across = [_cos(dec[0][1][3], dec[1][1][9]), _cos(dec[0][1][3], dec[1][1][10])]
    assert h.cosine == [min(across), max(across)]
    # seed 2's own picks are directions of one seed each
    assert {d.members[0] for d in found} == {(0, 3), (2, 2), (2, 7)}
    assert all(d.chosen_in == 1 and d.cosine is None for d in found if d is not h)
    # most recurrent first, then by layer: names follow that order
    assert [(d.name, d.members[0]) for d in found] == [("A", (0, 3)), ("B", (2, 2)), ("C", (2, 7))]


def test_threshold_and_silent_features():
    dec, chosen = _seeds()
    # above every cross-seed cosine (0.92-0.97), nothing recurs: one direction per pick, within seed 1 too
    strict = directions(dec, chosen, min_cosine=0.98)
    assert sorted(d.members[0] for d in strict) == [(0, 3), (1, 9), (1, 10), (2, 2), (2, 7)]
    assert all(d.chosen_in == 1 for d in strict)
    # a chosen feature whose decoder row is zero has cosine 0 with everything, itself included
    dec[2][0][2] = 0.0
    silent = next(d for d in directions(dec, chosen) if d.members == [(2, 2)])
    assert silent.per_seed[2].cosine == 0.0 and silent.present_in == 0


def test_names_run_past_z():
    assert [_name(i) for i in (0, 25, 26, 27, 51, 52)] == ["A", "Z", "AA", "AB", "AZ", "BA"]


def _finding(seed: int, cut: float, necessary: bool, features, truncated: float = 0.0,
             sufficient: bool = True) -> SeedFindings:
    return SeedFindings(
        seed=seed, features=features, necessary=necessary, sufficient=sufficient,
        necessary_rules={"cut": necessary, "accuracy": True, "controls": True},
        sufficient_rules={"rechecks": True, "accuracy": sufficient, "controls": True},
        support=[(0, 5)] if seed == 1 else [],
        cut=Estimate(cut, [cut - 0.1, min(cut + 0.1, 1.0)]), accuracy_delta=Estimate(0.02, [-0.01, 0.05]),
        clamped_rechecks=Estimate(1.5, [1.2, 1.8]), target_rechecks=Estimate(2.8, [2.6, 3.0]),
        clamp_scale=2.0, clamped_truncated=Estimate(truncated, [max(truncated - 0.1, 0.0), truncated]),
        kl_closed=0.99, accuracy_gain_recovered=0.7)


def test_markdown_names_each_seeds_features_and_the_ranges():
    dec, chosen = _seeds()
    found = directions(dec, chosen)
    findings = [_finding(0, 0.95, True, chosen[0]), _finding(1, 0.81, True, chosen[1], truncated=0.5),
                _finding(2, 0.6, False, chosen[2], sufficient=False)]
    text = stability_markdown(findings, found, 0.9, "tca demo --seeds 3")
    assert "    tca demo --seeds 3" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "(1, 9) A, (1, 10) A" in rows["1"] and "(0, 2) B, (1, 7) C" in rows["2"]
    assert "| no (cut) | no (accuracy) |" in rows["2"] and "| yes | yes |" in rows["0"]
    assert "| yes (+1 support) |" in rows["1"]
    # the range row: verdict counts and min-max of each figure over the seeds
    assert "| 2 of 3 | 2 of 3 | 60% – 95% | +2.0 points | 1.50 | 0% – 50% |" in rows["range"]
    assert "×2 | 50% [40%, 50%] |" in rows["1"]
    assert "| 2 of 3 | 3 of 3 |" in rows["A"] and "0: 3 / 3 (1.00); 1: 9 10 / 9" in rows["A"]
    assert "## Support features" not in text


def test_markdown_lists_the_support_directions_grown_in_more_than_one_seed():
    dec, chosen = _seeds()
    # the same picks as support sets: seeds 0 and 1 share direction A, seed 2's two are its own
    support = directions(dec, chosen, prefix="S")
    findings = [_finding(s, 0.95, True, chosen[s]) for s in range(3)]
    for f in findings:
        f.support = chosen[f.seed]
    text = stability_markdown(findings, directions(dec, chosen), 0.9, "tca demo --seeds 3", support)
    section = text.split("## Support features across seeds")[1]
    assert "(1 in seed 0, 2 in seed 1, 2 in seed 2) fall into 3 directions" in section
    assert "1 of them were grown in more than one seed" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| direction")]
    assert len(rows) == 1 and rows[0].startswith("| SA | 1 | 2 of 3 | 3 of 3 | 0: 3 / 3 (1.00); 1: 9 10 / 9")


def test_direction_is_json_ready():
    from dataclasses import asdict

    dec, chosen = _seeds()
    d = asdict(directions(dec, chosen)[0])
    assert set(d) == {f for f in Direction.__dataclass_fields__}
    assert isinstance(d["per_seed"][0]["cosine"], float)
