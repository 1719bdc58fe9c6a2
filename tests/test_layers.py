"""``select_layers``, the one parser of ``--layers``, against sets written out by hand."""

from __future__ import annotations

import random

import pytest

from tca import TcaError
from tca.cache.layers import select_layers


def _write(layers: set[int], rng: random.Random) -> str:
    """A spec naming exactly ``layers``: runs as ranges or single numbers, in any order, with
    repeats and spaces, the way people type them."""
    parts, run = [], []
    for layer in sorted(layers):
        if run and layer != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(layer)
    parts.append(run)
    written = []
    for run in parts:
        if len(run) > 1 and rng.random() < 0.7:
            cut = rng.randrange(len(run))  # a run may be split into two ranges
            pieces = [run[: cut + 1], run[cut + 1 :]] if rng.random() < 0.3 else [run]
            written += [f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in pieces if p]
        else:
            written += [str(layer) for layer in run]
    written += rng.sample(written, k=min(2, len(written)))  # repeats change nothing
    rng.shuffle(written)
    return ",".join(f" {w} " if rng.random() < 0.2 else w for w in written)


def test_every_written_subset_selects_exactly_its_layers():
    rng = random.Random(0)
    for _ in range(500):
        available = set(rng.sample(range(40), rng.randint(1, 40)))
        wanted = set(rng.sample(sorted(available), rng.randint(1, len(available))))
        spec = _write(wanted, rng)
        assert select_layers(spec, available) == sorted(wanted), spec
        assert select_layers(spec, list(available) * 2) == sorted(wanted), spec
    assert select_layers("all", [5, 1, 3, 1]) == [1, 3, 5]
    assert select_layers(" all ", range(4)) == [0, 1, 2, 3]


def test_a_layer_outside_the_available_ones_names_the_first_and_what_there_is():
    rng = random.Random(1)
    for _ in range(200):
        available = set(rng.sample(range(30), rng.randint(1, 10)))
        wanted = set(rng.sample(range(40), rng.randint(1, 6)))
        if wanted <= available:
            continue
        with pytest.raises(TcaError) as err:
            select_layers(_write(wanted, rng), available, "the store s holds")
        first = min(wanted - available)
        assert str(err.value).startswith(f"layer {first} is out of range; the store s holds layers ")
    with pytest.raises(TcaError, match=r"^layer 9 is out of range; the models have layers 0 to 3\.$"):
        select_layers("1,9", range(4))
    with pytest.raises(TcaError, match=r"^layer 1 is out of range; the adapters cover layers 0, 2\.$"):
        select_layers("0-2", [0, 2], "the adapters cover")
    with pytest.raises(TcaError, match="cover no layers"):
        select_layers("0", [], "the adapters cover")


@pytest.mark.parametrize("spec", ["", " ", "x", "1,,2", "1;2", "-1", "3-", "-", "1-2-3", "5-3", "0,5-3", "1.5", "al"])
def test_what_is_not_a_layer_list_is_one_sentence(spec):
    with pytest.raises(TcaError, match=r"^--layers .* is not 'all' or a list like 0,3,5-7\.$"):
        select_layers(spec, range(8))
