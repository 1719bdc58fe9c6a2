"""``tca refine``: train adapters end to end with the reference's objective.

The adapted model is the target's backbone with the base's MLPs plus the adapters
(``adapted_model(..., keep_target=True)``); only the adapters' parameters train. Per step, on a
batch of documents (``tca.adapted.batches``) and over its real tokens only, with ``L`` layers and
``C = cutoffs`` distinct cut-offs ``k`` drawn uniformly from ``1..L-1`` by a seeded generator:

    KL_A        mean over tokens of KL(target ‖ adapted) of the next-token distributions
    KL_mix(k)   KL(target ‖ adapted below k, target from k) + KL(target ‖ target below k, adapted from k)
    NMSE        mean over layers l of Σ‖h_l(adapted) − h_l(target)‖² / Σ‖h_l(target)‖²,
                h_l the output of decoder layer l
    L1          Σ over adapted layers of mean over tokens of Σ_f acts_f · ‖W_dec[f]‖ / loss_scale

    loss = lambda_kl · (KL_A + mean_k KL_mix(k)) + lambda_nmse · NMSE + l1 · L1

``loss_scale`` is the offline trainer's: the RMS norm of ``MLP_target(x) − MLP_base(x)``
(stored with offline adapters; with ``from_zero`` estimated from the first batch), so one ``l1``
weighs sparsity alike in both recipes and on every layer. The L1 term applies to ReLU adapters;
TopK's sparsity is structural. The streams are run by ``tca.adapted.lockstep`` (checkpointed layer
by layer, KL in token chunks, bf16 autocast on CUDA).

Optimisation is ``tca train``'s: AdamW without weight decay, linear warm-up then cosine to zero
(``tca.train.trainer.lr_at``), gradient-norm clipping (over all adapters together, since they share
one loss). Records, checkpoints (exact resume) and the output adapter set have ``tca train``'s
formats; the first documents of ``--data`` (``eval_tokens`` of them) are held out for the
summary's KL, fraction of the hybrid's KL closed, hidden-state NMSE and L0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch

from tca import TcaError
from tca.adapted.batches import TokenBatch, batches_of, pad_id_of, tokenize_documents
from tca.adapted.config import REFINE_ACTIVATIONS, RefineConfig
from tca.adapted.evaluate import kl_and_nmse, mode
from tca.adapted.lockstep import KL_CHUNK_TOKENS, Lockstep, StreamsOut
from tca.adapted.splice import adapted_mlps, load_adapted, target_tokenizer
from tca.cache.layers import select_layers
from tca.cache.memory import Workload
from tca.cache.models import find_model, resolve_device
from tca.cache.threads import command_threads
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import (
    AdapterSet,
    load_adapters,
    optimizer_tensors,
    prefixed,
    restore_optimizer,
    save_adapters,
    save_checkpoint,
    truncate_metrics,
    unprefixed,
)
from tca.train.run import RunLog, due, open_run, run_settings, seeded
from tca.train.trainer import default_features, default_lr, lr_at

log = logging.getLogger(__name__)


class Refiner:
    """Holds the model, data and optimizer of one run; ``run`` trains to the end."""

    def __init__(self, cfg: RefineConfig):
        self.out = Path(cfg.out)
        state, tensors = open_run(self.out, cfg.resume) or (None, None)
        if state is not None:
            cfg = dataclasses.replace(RefineConfig(**state["config"]), device=cfg.device, threads=cfg.threads,
                                      resume=True)
        self._check(cfg)
        target_src = find_model(cfg.target)
        n_layers = target_src.n_layers
        # data before weights: a bad dataset fails before gigabytes load
        self.tokenizer = target_tokenizer(cfg.target)
        budget = None if cfg.tokens is None else cfg.eval_tokens + cfg.tokens
        docs = tokenize_documents(cfg.data, self.tokenizer, seq_len=cfg.seq_len, max_tokens=budget)
        self.eval_docs, self.train_docs = _split(docs, cfg.eval_tokens)
        if not self.train_docs:
            raise TcaError(f"{cfg.data} has no documents left for training after the {cfg.eval_tokens} held-out tokens; "
                           f"give more data or a smaller eval_tokens.")
        self.source = self._adapter_set(cfg, target_src.d_model, n_layers)
        if cfg.lr is None:
            lr = default_lr(self.source.config.n_features)
            cfg = dataclasses.replace(cfg, lr=lr if cfg.from_zero else lr / cfg.lr_refine_div)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        work = Workload("refine", tokens=cfg.batch * cfg.seq_len, seq_len=cfg.seq_len, cutoffs=cfg.cutoffs,
                        chunk=KL_CHUNK_TOKENS)
        self.model = load_adapted(self.source, cfg.base, cfg.target, device=str(self.device), dtype=cfg.dtype,
                                  keep_target=True, work=work)
        self.model.requires_grad_(False)
        # AdaptedMLP casts between the model's dtype and the adapter's, so adapters stay float32
        # training mode: a feature without a decoder row still fires, which is how its row grows
        # from zero (in eval mode, which ``evaluate`` switches to, it is not active)
        self.adapters = {i: m.adapter.float().train() for i, m in adapted_mlps(self.model).items()
                         if m.adapter is not None}
        params = [p for a in self.adapters.values() for p in a.parameters()]
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        self.runner = Lockstep(self.model, checkpointing=cfg.checkpointing)
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.n_layers = n_layers
        self.pad_id = pad_id_of(self.tokenizer)
        self.epoch_tokens = sum(len(d) for d in self.train_docs)
        self.batches_per_epoch = math.ceil(len(self.train_docs) / cfg.batch)
        tokens = cfg.tokens if cfg.tokens is not None else self.epoch_tokens
        self.total_steps = max(1, round(tokens * self.batches_per_epoch / self.epoch_tokens))
        self.eval_every = cfg.eval_every or max(1, self.total_steps // 5)
        self.cutoff_gen = seeded(cfg.seed, 17)
        self.step, self.tokens_seen = 0, 0
        self.last_eval: dict | None = None
        self._epoch: tuple[int, list[TokenBatch]] | None = None
        if state is not None:
            self._restore(state, tensors)

    # ---- set-up --------------------------------------------------------------------------------

    @staticmethod
    def _check(cfg: RefineConfig) -> None:
        if cfg.from_zero == (cfg.adapters is not None):
            raise TcaError("give either --adapters (offline adapters to refine) or --from-zero, not both or neither.")
        if cfg.activation not in REFINE_ACTIVATIONS:
            raise TcaError(f"refinement trains {' or '.join(REFINE_ACTIVATIONS)} adapters, not {cfg.activation!r}.")

    def _adapter_set(self, cfg: RefineConfig, d_model: int, n_layers: int) -> AdapterSet:
        """The adapters to start from: the offline set's chosen layers, or new ones."""
        if cfg.cutoffs > max(n_layers - 1, 0):
            raise TcaError(f"--cutoffs {cfg.cutoffs} exceeds the {n_layers - 1} cut-offs 1..{n_layers - 1} of {cfg.target}.")
        if cfg.from_zero:
            layers = select_layers(cfg.layers, range(n_layers), f"{cfg.target} has")
            features = cfg.features or default_features(d_model)
            acfg = AdapterConfig(d_model=d_model, n_features=features, activation=cfg.activation, l1=cfg.l1, k=cfg.k)
            adapters = {i: Adapter(acfg, seeded(cfg.seed, i)) for i in layers}
            return AdapterSet(adapters, acfg)
        if not Path(cfg.adapters).is_dir():
            raise TcaError(f"the adapters directory {cfg.adapters} does not exist.")
        aset = load_adapters(cfg.adapters)
        if aset.config.activation not in REFINE_ACTIVATIONS:
            raise TcaError(f"{cfg.adapters} holds {aset.config.activation} adapters; refinement trains "
                           f"{' or '.join(REFINE_ACTIVATIONS)} adapters.")
        if aset.config.d_model != d_model:
            raise TcaError(f"{cfg.adapters} reads width {aset.config.d_model}, but {cfg.target} has hidden size "
                           f"{d_model}; the adapters were trained on another model.")
        chosen = select_layers(cfg.layers, aset.layers, f"{cfg.adapters} has adapters for")
        return dataclasses.replace(aset, adapters={i: aset.adapters[i] for i in chosen})

    @torch.no_grad()
    def _scale_from_target(self, batch: TokenBatch) -> None:
        """Each new adapter's ``loss_scale``: the RMS norm of MLP_target(x) − MLP_base(x) over the
        first batch's real tokens, x the target's MLP inputs (what the trainer measures on the store)."""
        keep = batch.attention_mask.bool()
        mlps = adapted_mlps(self.model)
        xs: dict[int, torch.Tensor] = {}
        hooks = [mlps[i].register_forward_pre_hook(lambda _m, args, i=i: xs.__setitem__(i, args[0][keep]))
                 for i in self.adapters]
        try:
            with mode(self.model, "target"):
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        finally:
            for h in hooks:
                h.remove()
        for i, adapter in self.adapters.items():
            delta = mlps[i].target_mlp(xs[i]) - mlps[i].mlp(xs[i])
            adapter.loss_scale.fill_(float(delta.float().square().sum(-1).mean().sqrt().clamp_min(1e-12)))

    # ---- data ----------------------------------------------------------------------------------

    def batch_at(self, step: int) -> TokenBatch:
        """Batch ``step``: epochs of the training documents, each in a seeded order."""
        epoch, index = divmod(step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = torch.randperm(len(self.train_docs), generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
            self._epoch = (epoch, batches_of([self.train_docs[i] for i in order], self.cfg.batch, self.pad_id))
        return self._epoch[1][index]

    def sample_cutoffs(self) -> list[int]:
        """``cutoffs`` distinct layers from 1..L-1."""
        if self.cfg.cutoffs == 0:
            return []
        return sorted(1 + int(i) for i in torch.randperm(self.n_layers - 1, generator=self.cutoff_gen)[: self.cfg.cutoffs])

    # ---- checkpoints ---------------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict]:
        tensors = {"rng.cutoffs": self.cutoff_gen.get_state()}
        for i, a in self.adapters.items():
            tensors |= prefixed(f"adapter.{i}.", a.state_dict())
        opt_t, groups = optimizer_tensors("opt", self.opt)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "config": dataclasses.asdict(self.cfg),
                 "optimizer": groups}
        return state, tensors | opt_t

    def _restore(self, state: dict, tensors: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.cutoff_gen.set_state(tensors["rng.cutoffs"])
        for i, a in self.adapters.items():
            a.load_state_dict(unprefixed(f"adapter.{i}.", tensors))
        restore_optimizer("opt", self.opt, tensors, state["optimizer"])
        truncate_metrics(self.out / "metrics.jsonl", self.step)

    # ---- training ------------------------------------------------------------------------------

    def loss(self, streams: StreamsOut) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (the module docstring's formulas)."""
        n = max(streams.tokens, 1)
        kl_a = streams.kl_adapted / n
        mixes = [(m1 + m2) / n for m1, m2 in streams.kl_mix.values()]
        kl_mix = torch.stack(mixes).mean() if mixes else kl_a.new_zeros(())
        l1 = sum(streams.l1.values(), kl_a.new_zeros(())) / n
        nmse = streams.nmse
        total = self.cfg.lambda_kl * (kl_a + kl_mix) + self.cfg.lambda_nmse * nmse + self.cfg.l1 * l1
        return {"loss": total, "kl": kl_a, "kl_mix": kl_mix, "nmse": nmse, "l1": l1}

    def train_step(self) -> dict:
        cfg = self.cfg
        batch = self.batch_at(self.step).to(self.device)
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_frac)
        for group in self.opt.param_groups:
            group["lr"] = lr
        streams = self.runner.run(batch.input_ids, batch.attention_mask, self.sample_cutoffs(), self.autocast)
        terms = self.loss(streams)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for a in self.adapters.values() for p in a.parameters()], cfg.grad_clip)
        self.opt.step()
        self.step += 1
        self.tokens_seen += streams.tokens
        l0 = {str(i): float(c) / max(streams.tokens, 1) for i, c in streams.active.items()}
        return {"kind": "train", "step": self.step, "tokens": self.tokens_seen, "lr": lr,
                **{k: float(v.detach()) for k, v in terms.items()}, "cutoffs": sorted(streams.kl_mix),
                "l0": sum(l0.values()) / max(len(l0), 1), "l0_layers": l0}

    def run(self, on_step: Callable[[int], None] | None = None) -> dict:
        """Train to ``total_steps``; ``on_step(step)`` runs after each step (tests stop runs with it)."""
        if self.step == 0 and self.cfg.from_zero:
            self._scale_from_target(self.batch_at(0).to(self.device))
        with RunLog(self.out, "refine", self.total_steps, self.step, self.tokens_seen) as run_log:
            while self.step < self.total_steps:
                record = self.train_step()
                if due(self.step, self.cfg.log_every, self.total_steps):
                    run_log.write([record])
                if due(self.step, self.eval_every, self.total_steps):
                    self.last_eval = self.evaluate()
                    run_log.write([self.last_eval])
                if due(self.step, self.cfg.checkpoint_every, self.total_steps):
                    run_log.flush()
                    save_checkpoint(self.out / "checkpoint", *self._state())
                run_log.stepped(self.tokens_seen, {"loss": f"{record['loss']:.4f}", "KL": f"{record['kl']:.4f}",
                                                   "L0": f"{record['l0']:.1f}"})
                if on_step:
                    on_step(self.step)
        return self.finish()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """On the held-out documents: KL of the adapted and hybrid models against the target,
        the fraction of the hybrid's KL closed, per-layer hidden-state NMSE and L0."""
        for a in self.adapters.values():
            a.eval()
        try:
            return self._evaluate()
        finally:
            for a in self.adapters.values():
                a.train()

    def _evaluate(self) -> dict:
        batches = [b.to(self.device) for b in batches_of(self.eval_docs, self.cfg.batch, self.pad_id)]
        faith = kl_and_nmse(self.model, batches)
        active = {i: 0.0 for i in self.adapters}
        for b in batches:
            streams = self.runner.run(b.input_ids, b.attention_mask, autocast=self.autocast)
            for i, c in streams.active.items():
                active[i] += float(c)
        l0 = {str(i): c / faith.tokens for i, c in active.items()}
        return {"kind": "eval", "step": self.step, "tokens": self.tokens_seen, "eval_tokens": faith.tokens,
                "kl_adapted": faith.kl_adapted, "kl_hybrid": faith.kl_hybrid, "fraction_closed": faith.fraction_closed,
                "nmse_adapted": {str(k): v for k, v in faith.nmse_adapted.items()},
                "nmse_hybrid": {str(k): v for k, v in faith.nmse_hybrid.items()},
                "l0": sum(l0.values()) / max(len(l0), 1), "l0_layers": l0}

    def finish(self) -> dict:
        """Write the refined adapter set and ``summary.json``; return the summary."""
        final = self.last_eval or self.evaluate()
        settings = run_settings(self.cfg)
        adapters = {i: a.cpu().eval() for i, a in self.adapters.items()}
        extra = {**self.source.extra, "refine": settings, "refined_from": self.cfg.adapters,
                 "refine_tokens_seen": self.tokens_seen}
        save_adapters(self.out, AdapterSet(adapters, self.source.config, self.source.store, self.source.models, extra))
        summary = {"adapters": str(self.out), "refined_from": self.cfg.adapters, "tokens_seen": self.tokens_seen,
                   "steps": self.step, "layers": sorted(self.adapters),
                   "dtype": str(self.model.dtype).removeprefix("torch."), "threads": self.cfg.threads,
                   **{k: v for k, v in final.items() if k not in ("kind", "step", "tokens")}}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _split(docs: list[list[int]], eval_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """The first documents holding ``eval_tokens`` (at least one), and the rest."""
    total, cut = 0, 0
    while cut < len(docs) and (cut == 0 or total < eval_tokens):
        total += len(docs[cut])
        cut += 1
    return docs[:cut], docs[cut:]



@command_threads
def refine(cfg: RefineConfig, on_step: Callable[[int], None] | None = None) -> dict:
    """Refine (or resume refining) the adapters ``cfg`` describes and return the summary."""
    return Refiner(cfg).run(on_step)
