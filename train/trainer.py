"""``tca train``: adapters for several layers, and a sweep of them, from one pass over a store.

Every batch of rows feeds every *member* (one adapter for one layer and one sweep value), each
with its own AdamW (no weight decay), learning-rate schedule (linear warm-up over the first
5% of steps, then cosine to zero) and gradient clipping. All members of a layer start from the
same initial weights, so a sweep member ends exactly where a separate run with its value would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tca import TcaError
from tca.cache.layers import select_layers
from tca.cache.models import resolve_device
from tca.cache.ranks import Ranks
from tca.cache.store import Store
from tca.cache.threads import command_threads
from tca.train.adapter import Adapter, AdapterConfig, train_step
from tca.train.checkpoint import (
    AdapterSet,
    optimizer_tensors,
    prefixed,
    restore_optimizer,
    save_adapters,
    save_checkpoint,
    store_models,
    truncate_metrics,
    unprefixed,
)
from tca.train.config import MAX_LR_SCALE, MIN_STEPS, PAPER_BATCH, PAPER_D, PAPER_FEATURES, PAPER_LR, TrainConfig
from tca.train.loader import ActivationLoader, Batch, LoaderConfig
from tca.train.metrics import MetricSums, decoder_copies, relative
from tca.train.parallel import merge_shares, prepare_share
from tca.train.run import RunLog, due, open_run, run_settings, seeded
from tca.train.sweep import member_dir, sweep_values

log = logging.getLogger(__name__)


def default_features(d_model: int) -> int:
    """The paper's 8192 features at width 3584, scaled to ``d_model`` (the nearest power of two)."""
    return max(32, 2 ** round(math.log2(PAPER_FEATURES * d_model / PAPER_D)))


def default_lr(features: int) -> float:
    """The paper's lr 8e-4 at 8192 features, times sqrt(8192 / features), at most 8x."""
    return PAPER_LR * min(math.sqrt(PAPER_FEATURES / features), MAX_LR_SCALE)


def scaled_defaults(cfg: TrainConfig, d_model: int, n_rows: int) -> TrainConfig:
    """``cfg`` with every size left at None fixed from the store's width and rows, so the
    checkpoint records concrete values and a resumed run cannot drift."""
    features = cfg.features or default_features(d_model)
    train_rows = max(1, int(n_rows * (1 - cfg.holdout_frac)))
    batch = cfg.batch or max(8, min(PAPER_BATCH, 2 ** int(math.log2(max(train_rows // 256, 1)))))
    lr = cfg.lr or default_lr(features)
    epochs = cfg.epochs
    if epochs is None and cfg.tokens is None:
        epochs = float(max(1, math.ceil(MIN_STEPS / max(train_rows // batch, 1))))
    return dataclasses.replace(cfg, features=features, batch=batch, lr=lr, epochs=epochs)


@dataclass
class Member:
    """One adapter being trained: a layer and a sweep value, with its optimizer."""

    name: str
    layer: int
    adapter: Adapter
    opt: torch.optim.Optimizer
    l0_ema: float | None = None
    """The smoothed training L0 that steers ``target_l0``: one batch's L0 is too noisy to act on."""

    @property
    def key(self) -> str:
        return f"{self.name}/{self.layer}"


STEER_GAIN = 0.005
"""Per step, ``target_l0`` moves l1 by at most a factor exp(0.005): L0 follows l1 only after the
decoder norms settle (at 0.02 on a synthetic store l1 overshot 100-fold and the decoder
collapsed), yet the 1400 steps after a default run's warm-up span a factor e^7 either way."""
STEER_SMOOTHING = 0.95
"""EMA weight of the training L0 that steers l1 (an average over about 20 batches)."""


def steered_l1(l1: float, l0: float, target: float) -> float:
    """The next sparsity coefficient: up when L0 is above ``target``, down when below, by the log
    of the miss clipped to +-1 times ``STEER_GAIN`` (a miss of e or more moves it at full speed)."""
    miss = math.log(max(l0, 1e-3) / target)
    return l1 * math.exp(STEER_GAIN * max(-1.0, min(1.0, miss)))


def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, round(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Holds the store, loader and members of one run; ``run`` trains to the end.

    With ``ranks`` of several processes it holds only this process's share of the run's
    adapters (train/parallel.py merges the shares).
    """

    def __init__(self, cfg: TrainConfig, ranks: Ranks = Ranks()):
        self.out = Path(cfg.out)
        state, tensors = open_run(self.out, cfg.resume) or (None, None)
        if state is not None:
            saved = TrainConfig.from_saved(state["config"])
            cfg = dataclasses.replace(saved, store=cfg.store, device=cfg.device, threads=cfg.threads, resume=True)
        self.store = Store.open(cfg.store)
        self.cfg = cfg = scaled_defaults(cfg, self.store.d_model, self.store.n_rows)
        self.models = store_models(self.store)
        if state is not None and state.get("models") and self.models and state["models"] != self.models:
            raise TcaError(
                f"{cfg.store} was harvested from other models than the checkpoint in {self.out} "
                f"({self.models} vs {state['models']}); resume with the store it was trained on."
            )
        if cfg.target_l0 is not None and cfg.activation in ("topk", "batchtopk"):
            raise TcaError(f"--target-l0 steers the sparsity coefficient of relu or jumprelu; "
                           f"{cfg.activation} fixes L0 with --k instead.")
        self.run_layers = select_layers(cfg.layers, self.store.layers, f"{cfg.store} holds")
        self.device = ranks.device(resolve_device(cfg.device))
        self.members = self._members(ranks)
        self.layers = [layer for layer in self.run_layers if any(m.layer == layer for m in self.members)]
        self.loader = ActivationLoader(
            self.store,
            # a row that is an outlier in any layer of the run is dropped from all, so a share
            # of the run must read every layer to see the batches a serial run sees
            self.run_layers if cfg.drop_outliers else self.layers,
            LoaderConfig(
                batch=cfg.batch, seed=cfg.seed, holdout_frac=cfg.holdout_frac, drop_outliers=cfg.drop_outliers,
                shuffle_rows=cfg.shuffle_rows, read_threads=cfg.read_threads, eval_rows=cfg.eval_rows,
                pin_memory=self.device.type == "cuda",
            ),
        )
        steps = cfg.tokens // cfg.batch if cfg.tokens else int(cfg.epochs * self.loader.batches_per_epoch)
        self.total_steps = max(steps, 1)
        self.eval_every = cfg.eval_every or max(1, self.total_steps // 10)
        self.unchanged = self._unchanged_layers()
        self.warmup_steps = max(1, round(cfg.warmup_frac * self.total_steps))
        self.step, self.tokens_seen = 0, 0
        if state is not None:
            self._restore(state, tensors)

    # ---- set-up --------------------------------------------------------------------------------

    @torch.no_grad()
    def _unchanged_layers(self) -> set[int]:
        """This process's layers whose delta is nothing next to x (``unchanged_below``), from the
        held-out rows (the same every time, so a resumed run finds the same)."""
        sq_delta = dict.fromkeys(self.layers, 0.0)
        sq_x = dict.fromkeys(self.layers, 0.0)
        for batch in self.loader.eval_batches():
            for layer in self.layers:
                sq_delta[layer] += batch.delta[layer].double().square().sum().item()
                sq_x[layer] += batch.x[layer].double().square().sum().item()
        unchanged = set()
        for layer in self.layers:
            ratio = math.sqrt(relative(sq_delta[layer], sq_x[layer]))
            if ratio <= self.cfg.unchanged_below:
                unchanged.add(layer)
                log.info("layer %d: no difference (RMS delta / RMS x = %.3g on the held-out rows, at most "
                         "unchanged_below %g); its adapter is not trained", layer, ratio, self.cfg.unchanged_below)
        return unchanged

    def _adapter_config(self, overrides: dict) -> AdapterConfig:
        cfg = self.cfg
        values = dict(
            d_model=self.store.d_model, n_features=cfg.features, activation=cfg.activation, l1=cfg.l1[0],
            k=cfg.k[0], dec_bias=cfg.dec_bias, dead_after_tokens=cfg.dead_after_tokens,
            penalty=cfg.penalty, penalty_eps=cfg.penalty_eps,
        )
        return AdapterConfig(**(values | overrides))

    def _members(self, ranks: Ranks) -> list[Member]:
        """This process's members: every ``world_size``-th of the run's (sweep value, layer) jobs."""
        jobs = [(name, overrides, layer) for name, overrides in sweep_values(self.cfg) for layer in self.run_layers]
        if ranks.world_size > len(jobs):
            raise TcaError(f"WORLD_SIZE={ranks.world_size} exceeds the {len(jobs)} adapters of this run; "
                           f"start at most {len(jobs)} processes.")
        members = []
        for name, overrides, layer in jobs[ranks.rank :: ranks.world_size]:
            # the init depends on the seed and layer only: sweep members match separate runs,
            # and an adapter starts alike whichever process trains it
            adapter = Adapter(self._adapter_config(overrides), seeded(self.cfg.seed, layer)).to(self.device)
            opt = torch.optim.AdamW(adapter.parameters(), lr=self.cfg.lr, weight_decay=0.0)
            members.append(Member(name, layer, adapter, opt))
        return members

    def _set_loss_scale(self, batch: Batch) -> None:
        """Normalise each layer's loss by the RMS norm of delta in the first batch."""
        for m in self.members:
            if m.layer in self.unchanged:
                # a zero delta gives no scale; the default 1 keeps the L1 term of a later
                # refinement, which divides by it, finite
                continue
            rms = batch.delta[m.layer].square().sum(-1).mean().sqrt().clamp_min(1e-12)
            m.adapter.loss_scale.fill_(float(rms))

    # ---- checkpoints ---------------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict]:
        tensors = {"rng.torch": torch.get_rng_state()}
        groups = {}
        for m in self.members:
            tensors |= prefixed(f"adapter.{m.key}.", m.adapter.state_dict())
            opt_t, groups[m.key] = optimizer_tensors(f"opt.{m.key}", m.opt)
            tensors |= opt_t
        state = {
            "step": self.step, "tokens_seen": self.tokens_seen, "config": dataclasses.asdict(self.cfg),
            "models": self.models, "store": self.cfg.store, "optimizers": groups,
            # the density that picks each adapter's next training path: without it a resumed
            # run's first step would take the dense path where the uninterrupted one took
            # the sparse kernels, and the weights would agree only to rounding
            "gate_density": {m.key: m.adapter.gate.density for m in self.members},
            # target_l0 steers each adapter's coefficient away from the config's
            "l1": {m.key: m.adapter.cfg.l1 for m in self.members},
            "l0_ema": {m.key: m.l0_ema for m in self.members},
        }
        return state, tensors

    def _restore(self, state: dict, tensors: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(tensors["rng.torch"])
        for m in self.members:
            m.adapter.load_state_dict(unprefixed(f"adapter.{m.key}.", tensors))
            restore_optimizer(f"opt.{m.key}", m.opt, tensors, state["optimizers"][m.key])
            m.adapter.gate.density = state.get("gate_density", {}).get(m.key)
            m.adapter.cfg.l1 = state.get("l1", {}).get(m.key, m.adapter.cfg.l1)
            m.l0_ema = state.get("l0_ema", {}).get(m.key)
        truncate_metrics(self.out / "metrics.jsonl", self.step)

    def save_checkpoint(self) -> None:
        save_checkpoint(self.out / "checkpoint", *self._state())

    # ---- training ------------------------------------------------------------------------------

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train to ``total_steps``; ``on_step(step)`` runs after each step (tests stop runs with it)."""
        per_epoch = self.loader.batches_per_epoch
        try:
            with RunLog(self.out, "train", self.total_steps, self.step, self.tokens_seen) as run_log:
                while self.step < self.total_steps:
                    epoch, first = divmod(self.step, per_epoch)
                    for batch in self.loader.epoch(epoch, first):
                        if self.step == 0:
                            self._set_loss_scale(batch)
                        records = self._train_step(batch)
                        self.step += 1
                        self.tokens_seen += len(batch.rows)
                        run_log.write(records)
                        if due(self.step, self.eval_every, self.total_steps):
                            run_log.write(self.evaluate())
                        if due(self.step, self.cfg.checkpoint_every, self.total_steps):
                            run_log.flush()
                            self.save_checkpoint()
                        run_log.stepped(self.tokens_seen, _postfix(records) if records else None)
                        if on_step:
                            on_step(self.step)
                        if self.step >= self.total_steps:
                            break
        finally:
            self.loader.close()
        return self.finish()

    def _train_step(self, batch: Batch) -> list[dict]:
        lr = lr_at(self.step, self.total_steps, self.cfg.lr, self.cfg.warmup_frac)
        logging_step = (self.step + 1) % self.cfg.log_every == 0
        records = []
        for m in self.members:
            if m.layer in self.unchanged:
                continue  # nothing to learn, and a loss scaled by a zero delta would learn noise
            x = batch.x[m.layer].to(self.device, non_blocking=True)
            delta = batch.delta[m.layer].to(self.device, non_blocking=True)
            for group in m.opt.param_groups:
                group["lr"] = lr
            loss = train_step(m.adapter, m.opt, x, delta, self.cfg.grad_clip)
            if self.cfg.target_l0 is not None:
                self._steer(m, loss.out.l0)
            if logging_step:
                sums = MetricSums(delta.shape[-1])
                sums.add(loss.out.pred, delta)
                records.append({
                    "kind": "train", "step": self.step + 1, "tokens": self.tokens_seen + len(batch.rows),
                    "member": m.name, "layer": m.layer, "lr": lr, "loss": loss.total.item(),
                    "mse": loss.mse.item(), "sparsity": loss.sparsity.item(), "aux": loss.aux.item(),
                    "fve": sums.fve, "nmse": sums.nmse, "l0": loss.out.l0,
                    "dead_frac": m.adapter.dead_mask.float().mean().item(),
                })
        return records

    def _steer(self, m: Member, l0: float) -> None:
        """``target_l0``'s controller: smooth the training L0; after warm-up (while the decoder is
        still growing from zero, L0 says nothing of the final one) steer the coefficient by it."""
        w = STEER_SMOOTHING
        m.l0_ema = l0 if m.l0_ema is None else w * m.l0_ema + (1 - w) * l0
        if self.step >= self.warmup_steps:
            m.adapter.cfg.l1 = steered_l1(m.adapter.cfg.l1, m.l0_ema, self.cfg.target_l0)

    @torch.no_grad()
    def evaluate(self) -> list[dict]:
        """Held-out FVE/NMSE of delta (and of y where stored), L0 and never-firing features."""
        d = self.store.d_model
        sums = {m.key: MetricSums(d) for m in self.members}
        sums_y = {m.key: MetricSums(d) for m in self.members}
        hybrid_y = {layer: MetricSums(d) for layer in self.layers}
        fired = {m.key: torch.zeros(self.cfg.features, dtype=torch.bool, device=self.device) for m in self.members}
        for m in self.members:
            m.adapter.eval()
        for batch in self.loader.eval_batches():
            for layer in self.layers:
                if batch.y:
                    y = batch.y[layer]
                    hybrid_y[layer].add(y - batch.delta[layer], y)
            for m in self.members:
                x, delta = batch.x[m.layer].to(self.device), batch.delta[m.layer].to(self.device)
                out = m.adapter(x)
                sums[m.key].add(out.pred, delta, out.acts)
                fired[m.key] |= (out.acts > 0).any(0)
                if batch.y:
                    # the adapted MLP is y - delta + pred, so its error against y is pred - delta
                    y = batch.y[m.layer].to(self.device)
                    sums_y[m.key].add(y - delta + out.pred, y)
        records = []
        for m in self.members:
            m.adapter.train()
            s = sums[m.key]
            record = {
                "kind": "eval", "step": self.step, "tokens": self.tokens_seen, "member": m.name, "layer": m.layer,
                "fve": s.fve, "nmse": s.nmse, "l0": s.l0, "dead_frac": 1 - fired[m.key].float().mean().item(),
                "rows": s.rows,
            }
            # live: fired on the held-out rows (an eval-mode adapter fires only decoded features)
            record["copies"], record["max_cosine"] = decoder_copies(m.adapter.W_dec, fired[m.key])
            if m.adapter.cfg.activation in ("relu", "jumprelu"):
                record["l1"] = m.adapter.cfg.l1
            if m.layer in self.unchanged:
                record["unchanged"] = True
            if sums_y[m.key].rows:
                record |= {"fve_y": sums_y[m.key].fve, "nmse_y": sums_y[m.key].nmse, "nmse_y_hybrid": hybrid_y[m.layer].nmse}
            records.append(record)
        self.last_eval = records
        return records

    # ---- results -------------------------------------------------------------------------------

    def member_dir(self, name: str) -> Path:
        return member_dir(self.out, self.cfg, name)

    def finish(self) -> dict:
        """Write each sweep member's adapter set and ``summary.json``; return the summary."""
        evals = getattr(self, "last_eval", None) or self.evaluate()
        by_name: dict[str, dict[int, Adapter]] = {}
        for m in self.members:
            by_name.setdefault(m.name, {})[m.layer] = m.adapter.cpu().eval()
        train_settings = run_settings(self.cfg)
        for name, adapters in by_name.items():
            config = next(iter(adapters.values())).cfg
            save_adapters(
                self.member_dir(name),
                AdapterSet(adapters, config, self.cfg.store, self.models, {"train": train_settings, "tokens_seen": self.tokens_seen}),
            )
        summary = {
            "store": self.cfg.store, "tokens_seen": self.tokens_seen, "steps": self.step, "threads": self.cfg.threads,
            "loader": self.loader.stats.as_dict(),
            "members": {
                name: {
                    "path": str(self.member_dir(name)),
                    "layers": {str(r["layer"]): _eval_summary(r) for r in evals if r["member"] == name},
                }
                for name in by_name
            },
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


@command_threads
def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) the run ``cfg`` describes and return its summary.

    Under torchrun (``WORLD_SIZE`` > 1) each process trains its share of the adapters and rank 0
    writes the files a serial run writes (train/parallel.py).
    """
    ranks = Ranks.from_env()
    if not ranks.distributed:
        return Trainer(cfg).run(on_step)
    trainer = Trainer(dataclasses.replace(cfg, out=str(prepare_share(cfg, ranks))), ranks)
    if trainer.device.type == "cuda":
        torch.cuda.set_device(trainer.device)  # the sparse kernels launch on the current device
    log.info("rank %d of %d trains %s", ranks.rank, ranks.world_size, [m.key for m in trainer.members])
    summary = trainer.run(on_step)
    if ranks.rank != 0:
        return summary  # the summary of this process's share
    run_cfg = dataclasses.replace(trainer.cfg, out=cfg.out)
    return merge_shares(Path(cfg.out), run_cfg, trainer.run_layers, ranks.world_size, trainer.total_steps)


def _eval_summary(record: dict) -> dict:
    keys = ("fve", "nmse", "l0", "dead_frac", "copies", "max_cosine", "l1", "fve_y", "nmse_y", "nmse_y_hybrid",
            "rows", "unchanged")
    return {k: record[k] for k in keys if k in record}


def _postfix(records: list[dict]) -> dict:
    n = len(records)
    return {
        "loss": f"{sum(r['loss'] for r in records) / n:.4f}",
        "L0": f"{sum(r['l0'] for r in records) / n:.1f}",
        "FVE": f"{sum(r['fve'] for r in records) / n:.3f}",
    }
