"""The one parser of layer specs (``--layers``): ``all`` or a list like ``0,3,5-7``."""

from __future__ import annotations

from collections.abc import Iterable

from tca import TcaError


def select_layers(spec: str, available: Iterable[int], held_by: str = "the models have") -> list[int]:
    """The layers ``spec`` names, sorted: every one of ``available`` for ``all``.

    ``available`` is what the caller can serve (a model's ``range(n_layers)``, a store's layers,
    an adapter set's layers); ``held_by`` names who holds them, with its verb, for the error
    (``"the models have"``, ``"/runs/store holds"``).
    """
    available = sorted(set(available))
    if spec.strip() == "all":
        return available
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first:  # "5-3" would silently select nothing
                raise ValueError
            layers.update(range(first, last + 1))
    except ValueError:
        raise TcaError(f"--layers {spec!r} is not 'all' or a list like 0,3,5-7.") from None
    missing = sorted(layers - set(available))
    if missing:
        raise TcaError(f"layer {missing[0]} is out of range; {held_by} {layer_span(available)}.")
    return sorted(layers)


def layer_span(layers: list[int]) -> str:
    """``layers 0 to 27`` for a run of consecutive layers, ``layers 0, 2, 5`` otherwise."""
    if not layers:
        return "no layers"
    if len(layers) > 2 and layers[-1] - layers[0] == len(layers) - 1:
        return f"layers {layers[0]} to {layers[-1]}"
    return "layers " + ", ".join(map(str, layers))
