"""Whether a hesitation study's findings recur across seeds of the whole pipeline.

Feature indices are arbitrary: seed 1's feature 12 may be seed 0's feature 81. A feature is
identified by its decoder direction instead (its row of ``W_dec``, what it writes into the
residual stream), compared within a layer: two features are *the same* when their directions'
cosine reaches ``min_cosine`` (0.9 by default).

The hesitation features of all seeds are grouped into *directions* by single linkage: two of them
join when they sit in the same layer and match, within a seed (near-copies chosen together) or
across seeds. A direction *recurs* in the seeds whose study chose one of its members; it is
*present* in a seed whose adapters hold a feature matching its first member, chosen or not (an
adapter may hold the direction while its study chose a near-copy elsewhere, or nothing).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

from tca.query.stats import Estimate, as_percent, as_points, as_text


@dataclass
class SeedFindings:
    """One seed's run of the pipeline, as the stability table reads it."""

    seed: int
    features: list[tuple[int, int]]
    """The hesitation features (layer, feature) its study chose."""
    necessary: bool
    sufficient: bool
    necessary_rules: dict[str, bool]
    """Each rule of *necessary* (``cut``, ``accuracy``, ``controls``)."""
    sufficient_rules: dict[str, bool]
    """Each rule of *sufficient* (``rechecks``, ``accuracy``, ``controls``)."""
    support: list[tuple[int, int]]
    """The support features clamped with the hesitation features (empty: they were judged alone)."""
    cut: Estimate
    """Hesitations per response cut by ablating the features, verdict prompts, paired 95% interval."""
    accuracy_delta: Estimate
    """Accuracy after the ablation − before."""
    clamped_rechecks: Estimate
    """Re-checks per response (``count_rechecks``; one cut at the token limit counts none) the
    clamp adds to the hybrid."""
    target_rechecks: Estimate
    """The target's re-checks per response on the verdict prompts (what the clamp is judged
    against)."""
    clamp_scale: float
    clamped_truncated: Estimate
    """Share of the clamped hybrid's responses cut at the token limit: near 1, the clamp's hesitations
    are a loop ("Wait, Wait, …") rather than re-checks in a trace that ends."""
    kl_closed: float | None
    """Evaluation: the share of the hybrid's next-token KL the adapters close."""
    accuracy_gain_recovered: float | None
    """Evaluation: (adapted − hybrid) ÷ (target − hybrid) accuracy."""


@dataclass
class Presence:
    """A direction in one seed's adapters."""

    seed: int
    chosen: list[int]
    """Features of this seed's hesitation set that belong to the direction (empty: not chosen)."""
    feature: int
    """The seed's feature closest to the direction's first member."""
    cosine: float
    """That feature's decoder cosine with the first member."""


@dataclass
class Direction:
    """One hesitation feature as found across seeds: its members and where it recurs."""

    name: str
    layer: int
    members: list[tuple[int, int]]
    """(seed, feature) of every hesitation feature in it, seed order; the first is the reference."""
    chosen_in: int
    """Seeds whose study chose one of its members."""
    present_in: int
    """Seeds whose adapters hold a feature within ``min_cosine`` of the first member."""
    per_seed: list[Presence]
    cosine: list[float] | None
    """[lowest, highest] decoder cosine between members of different seeds (None: one seed only)."""


def unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows scaled to unit norm in float64; an all-zero row (a feature that writes nothing)
    stays zero, so it matches nothing."""
    W = W_dec.detach().double()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-30)


def directions(decoders: dict[int, dict[int, torch.Tensor]], chosen: dict[int, list[tuple[int, int]]],
               min_cosine: float = 0.9, prefix: str = "") -> list[Direction]:
    """Group the seeds' hesitation features into directions.

    ``decoders[seed][layer]`` is that seed's ``W_dec`` [F, d]; ``chosen[seed]`` its hesitation
    features as (layer, feature). Directions come out most recurrent first (then by layer and
    first member), named A, B, … in that order, after ``prefix`` (so two groupings' names differ).
    """
    unit = {s: {layer: unit_rows(w) for layer, w in by_layer.items()} for s, by_layer in decoders.items()}
    nodes = sorted({(s, layer, f) for s, feats in chosen.items() for layer, f in feats})
    parent = list(range(len(nodes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def cos(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
        return float(unit[a[0]][a[1]][a[2]] @ unit[b[0]][b[1]][b[2]])

    for i, a in enumerate(nodes):
        for j in range(i + 1, len(nodes)):
            if a[1] == nodes[j][1] and cos(a, nodes[j]) >= min_cosine:
                parent[root(j)] = root(i)
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for i, node in enumerate(nodes):
        groups.setdefault(root(i), []).append(node)

    found = []
    for group in groups.values():
        ref, layer = group[0], group[0][1]
        per_seed = []
        for s in sorted(decoders):
            sims = unit[s][layer] @ unit[ref[0]][layer][ref[2]]
            best = int(sims.argmax())
            per_seed.append(Presence(s, [f for t, _, f in group if t == s], best, float(sims[best])))
        across = [cos(a, b) for i, a in enumerate(group) for b in group[i + 1:] if a[0] != b[0]]
        found.append(Direction(
            name="", layer=layer, members=[(s, f) for s, _, f in group],
            chosen_in=len({s for s, _, _ in group}),
            present_in=sum(p.cosine >= min_cosine for p in per_seed), per_seed=per_seed,
            cosine=[min(across), max(across)] if across else None))
    found.sort(key=lambda d: (-d.chosen_in, d.layer, d.members[0]))
    for i, d in enumerate(found):
        d.name = prefix + _name(i)
    return found


def _name(i: int) -> str:
    """A, B, …, Z, AA, AB, …"""
    letters = string.ascii_uppercase
    return letters[i] if i < len(letters) else _name(i // len(letters) - 1) + letters[i % len(letters)]


def stability_markdown(findings: list[SeedFindings], found: list[Direction], min_cosine: float,
                       command: str, support: list[Direction] = ()) -> str:
    """The stability table: per seed its findings, then the directions of the hesitation features
    and where they recur, then those of the support features that recur."""
    n = len(findings)
    name_of = {(s, d.layer, f): d.name for d in found for s, f in d.members}
    lines = [
        f"# Stability across {n} seed{'s' * (n > 1)}",
        "",
        f"    {command}",
        "",
        "Each seed runs train → refine → index → eval → study on the same store (harvested once) and is "
        "judged on the same verdict prompts; the seed sets the adapters' initialisation, the training order, "
        "the refinement's order and cut-offs, and the study's control sets. Figures are on the verdict "
        "prompts with paired 95% intervals.",
        "",
        "| seed | hesitation features | necessary | sufficient | hesitation cut | accuracy change | "
        "re-checks the clamp adds (target's) | clamped responses truncated | KL gap closed | "
        "accuracy gain recovered |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in findings:
        feats = ", ".join(f"({layer}, {f}) {name_of[(r.seed, layer, f)]}" for layer, f in r.features) or "none"
        lines.append(
            f"| {r.seed} | {feats} | {_verdict(r.necessary, r.necessary_rules)} | "
            f"{_verdict(r.sufficient, r.sufficient_rules)}{_support(r.support)} | {as_percent(r.cut)} | "
            f"{as_points(r.accuracy_delta)} | {as_text(r.clamped_rechecks)} ({as_text(r.target_rechecks)}) "
            f"×{r.clamp_scale:g} | {as_percent(r.clamped_truncated)} | {_share(r.kl_closed, '.1%')} | "
            f"{_share(r.accuracy_gain_recovered, '.0%')} |")
    if n > 1:
        lines.append(
            f"| range | | {sum(r.necessary for r in findings)} of {n} | {sum(r.sufficient for r in findings)} of {n} | "
            f"{_range([r.cut.value for r in findings], '.0%')} | "
            f"{_range([r.accuracy_delta.value for r in findings], '+.1f', 100)} points | "
            f"{_range([r.clamped_rechecks.value for r in findings], '.2f')} | "
            f"{_range([r.clamped_truncated.value for r in findings], '.0%')} | "
            f"{_range([r.kl_closed for r in findings], '.1%')} | "
            f"{_range([r.accuracy_gain_recovered for r in findings], '.0%')} |")
    lines += [
        "",
        "A `no` names the rules that failed. Necessary: `cut` (the cut's lower bound below the cut asked), "
        "`accuracy` (the accuracy change's lower bound below −tolerance), `controls` (not above the random sets' "
        "95th percentile). Sufficient: `rechecks` (the re-checks the clamp adds, lower bound, below the fraction "
        "of the target's asked), `accuracy` (the clamp costs the hybrid more than the tolerance), `controls` (not "
        "above the 95th percentile of random sets clamped the same way). *+k support* (only with "
        "`--support-features`): k support features were grown on the selection prompts and clamped with the "
        "hesitation features (each seed's study.md lists them and the search). The clamp "
        "column counts re-checks (a hesitation word opening a sentence or line, words after it, in a response "
        "that ends), not words, and shows the scale chosen on the selection prompts (each seed's study.md has "
        "the sweep over scales).",
        "",
        "## Hesitation features across seeds",
        "",
        f"Matched by decoder direction: features of one layer whose rows of the refined `W_dec` have cosine ≥ "
        f"{min_cosine:g} are the same feature (indices are arbitrary across seeds). *Chosen*: the seed's study "
        "picked a member; *present*: the seed's adapters hold a feature within that cosine of the first "
        "member, chosen or not.",
        "",
        "| direction | layer | chosen in | present in | per seed: chosen / closest feature (cosine) "
        "| cosine across seeds |",
        "|---|---:|---:|---:|---|---:|",
    ]
    lines += [_direction_row(d, n) for d in found]
    if not found:
        lines.append("| none | | | | no seed chose a hesitation feature | |")
    lines.append("")
    if support:
        recurring = [d for d in support if d.chosen_in > 1]
        per_seed = {r.seed: len(r.support) for r in findings}
        lines += [
            "## Support features across seeds",
            "",
            f"The support features ({', '.join(f'{k} in seed {s}' for s, k in per_seed.items())}) fall into "
            f"{len(support)} directions, matched the same way; {len(recurring)} of them were grown in more than "
            "one seed:",
            "",
            "| direction | layer | grown in | present in | per seed: grown / closest feature (cosine) "
            "| cosine across seeds |",
            "|---|---:|---:|---:|---|---:|",
        ]
        lines += [_direction_row(d, n) for d in recurring]
        lines.append("")
    return "\n".join(lines)


def _direction_row(d: Direction, n: int) -> str:
    per = "; ".join(f"{p.seed}: {' '.join(map(str, p.chosen)) or '—'} / {p.feature} ({p.cosine:.2f})"
                    for p in d.per_seed)
    span = "—" if d.cosine is None else _range(d.cosine, ".2f")
    return f"| {d.name} | {d.layer} | {d.chosen_in} of {n} | {d.present_in} of {n} | {per} | {span} |"


def _verdict(passed: bool, rules: dict[str, bool]) -> str:
    """``yes``, or ``no`` with the rules that failed."""
    failed = ", ".join(k for k, ok in rules.items() if not ok)
    return "yes" if passed else f"no ({failed})" if failed else "no"


def _support(support: list[tuple[int, int]]) -> str:
    return f" (+{len(support)} support)" if support else ""


def _share(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _range(values: list[float | None], fmt: str, scale: float = 1) -> str:
    """``lo–hi`` of the defined values (one value alone when they agree)."""
    known = [scale * v for v in values if v is not None]
    if not known:
        return "n/a"
    lo, hi = format(min(known), fmt), format(max(known), fmt)
    return lo if lo == hi else f"{lo} – {hi}"
