"""``tca train`` under torchrun: a run's adapters dealt out over processes, merged into one run.

Every (sweep value, layer) adapter is a *job*; of ``W`` processes, rank ``r`` trains jobs
``r, r + W, …`` of the serial order on its own device (``cuda:LOCAL_RANK`` or the CPU). An
adapter sees the same batches and starts from the same weights whichever process trains it:
the loader's order is a function of the seed alone and the init of the seed and layer. So each
adapter ends where the serial run's does (bit for bit on the same kind of device and thread
count).

Each process is a plain ``Trainer`` on its share (``tca.train.trainer.train`` starts it), with
``OUT/ranks/<r>/`` as its run directory (checkpoints, metrics, adapters, summary). When rank 0
has finished its share it waits for the others' summaries, then writes exactly the files of a
serial run — adapter sets, metrics.jsonl, summary.json, checkpoint/ — and removes ``OUT/ranks``.
The hand-over goes through files, not a collective, so shares that finish far apart hit no
timeout; torchrun stops every process when one fails. A killed run resumes with ``--resume`` and the same number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from tca.cache.ranks import Ranks
from tca.train.checkpoint import AdapterSet, load_adapters, load_checkpoint, save_adapters, save_checkpoint
from tca.train.config import TrainConfig
from tca.train.run import refuse_existing_run
from tca.train.sweep import member_dir, sweep_values

log = logging.getLogger(__name__)

SHARES_DIR = "ranks"
POLL_S = 0.5


def prepare_share(cfg: TrainConfig, ranks: Ranks) -> Path:
    """This process's run directory, ``OUT/ranks/<rank>``; a new run must not find a run in ``OUT``."""
    out = Path(cfg.out)
    share = out / SHARES_DIR / str(ranks.rank)
    if not cfg.resume:
        refuse_existing_run(out)
    elif (share / "summary.json").exists():
        # a finished share is written again: rank 0 must not take the old files for the new ones
        (share / "summary.json").unlink()
    return share


def _finished(share: Path, total_steps: int) -> bool:
    """Whether a share has written its summary (its last file) for the whole run."""
    try:
        return json.loads((share / "summary.json").read_text())["steps"] >= total_steps
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def _wait_for(shares: list[Path], total_steps: int) -> None:
    pending = list(shares)
    if pending:
        log.info("waiting for the shares in %s", [str(p) for p in pending])
    while pending:
        pending = [p for p in pending if not _finished(p, total_steps)]
        if pending:
            time.sleep(POLL_S)


def merge_shares(out: Path, cfg: TrainConfig, layers: list[int], world_size: int, total_steps: int) -> dict:
    """On rank 0, once its own share is done: wait for the other shares to finish all
    ``total_steps``, write the adapter sets, metrics.jsonl, summary.json and checkpoint of the
    serial run from them, and remove the shares. Returns the run's summary.

    ``cfg`` is the run's configuration (``out`` as the user gave it); ``layers`` the run's layers in
    their serial order.
    """
    shares = [out / SHARES_DIR / str(r) for r in range(world_size)]
    _wait_for(shares[1:], total_steps)
    names = [name for name, _ in sweep_values(cfg)]
    order = {f"{name}/{layer}": i for i, (name, layer) in enumerate((n, la) for n in names for la in layers)}
    summaries = [json.loads((s / "summary.json").read_text()) for s in shares]

    for name in names:
        sets = [load_adapters(member_dir(s, cfg, name)) for s in shares
                if (member_dir(s, cfg, name) / "adapters.json").exists()]
        adapters = {layer: a.adapters[layer] for layer in layers for a in sets if layer in a.adapters}
        first = sets[0]
        save_adapters(member_dir(out, cfg, name), AdapterSet(adapters, first.config, first.store, first.models, first.extra))

    # the serial run writes each step's training records, then its evaluations, in member order
    records = [line for s in shares for line in (s / "metrics.jsonl").read_text().splitlines()]

    def position(line: str) -> tuple[int, int, int]:
        r = json.loads(line)
        return r["step"], r["kind"] != "train", order[f"{r['member']}/{r['layer']}"]

    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in sorted(records, key=position)))

    summary = dict(summaries[0])
    summary["members"] = {
        name: {
            "path": str(member_dir(out, cfg, name)),
            "layers": {str(layer): s["members"][name]["layers"][str(layer)] for layer in layers for s in summaries
                       if str(layer) in s["members"].get(name, {}).get("layers", {})},
        }
        for name in names
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    _merge_checkpoints(out, cfg, order, shares)
    shutil.rmtree(out / SHARES_DIR)
    return summary


def _merge_checkpoints(out: Path, cfg: TrainConfig, order: dict[str, int], shares: list[Path]) -> None:
    """One checkpoint holding every member, as the serial run writes it (a serial --resume reads it)."""
    loaded = [load_checkpoint(s / "checkpoint") for s in shares]
    state = dict(loaded[0][0])
    state["config"] = dataclasses.asdict(cfg)
    for key, value in state.items():
        # per-member entries (optimizer groups, gate densities, …) are keyed by member
        if isinstance(value, dict) and value and set(value) <= set(order):
            merged = {k: v for st, _ in loaded for k, v in st[key].items()}
            state[key] = {k: merged[k] for k in sorted(merged, key=order.__getitem__)}
    tensors = {}
    for _, t in reversed(loaded):  # rank 0's run-wide tensors (the RNG state) win
        tensors |= t
    save_checkpoint(out / "checkpoint", state, tensors)
