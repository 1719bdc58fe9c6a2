"""The memory plan of a model-driving command, computed from the models' config.json alone.

Every command that runs a model (harvest, refine, eval, intervene, attribute, study, and index
for its logit lens) logs this plan before any weight loads: what it will hold on each device,
as weights, copies of weights, optimizer state and the activations of its largest step, and it
refuses with one sentence when a device has less free memory than the plan needs (CUDA:
``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of /proc/meminfo). ``python
bench/memory_plan.py`` prints the plan of the paper's pair, which docs/scale.md quotes.

Weights are counted exactly: the model is built on PyTorch's meta device from its config,
which allocates nothing, and its parameters are counted (tied ones once). Activations are the
largest tensors alive at each step of the command, each named with its shape; what is smaller
than a few [tokens, d] blocks (biases, norms, the tokenizer, CUDA's own context) is left out.
A command's steps run one after another, so a device needs what is held throughout plus its
largest step. GB are 10⁹ bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tca import TcaError

log = logging.getLogger(__name__)

COMMANDS = ("harvest", "refine", "eval", "intervene", "attribute", "study", "index")
"""The commands that run a model (index only for its logit lens)."""
WEIGHTS_ONLY = "adapted model"
"""The ``command`` of a plan of the adapted model's weights alone (a caller that gave no workload)."""

_HINTS = {
    "harvest": "harvest fewer --layers or lower --batch-tokens",
    "refine": "lower --batch or --seq-len, refine fewer --layers, or use --dtype bfloat16",
    "eval": "lower --batch, --seq-len or the generation batch, or use --dtype bfloat16",
    "intervene": "lower --batch, --seq-len or --max-new-tokens, or use --dtype bfloat16",
    "attribute": "lower --batch or --seq-len (the backward pass keeps every layer's activations), or use --dtype bfloat16",
    "study": "lower --batch, --seq-len or the generation batch, or use --dtype bfloat16",
    "index": "build the index without --target (no logit lens) or on a machine with more memory",
    WEIGHTS_ONLY: "use --dtype bfloat16 or a device with more memory",
}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_F32 = 4


def checkpoint_dtype(config: dict) -> str:
    """The dtype a checkpoint declares in its config.json (float32 when it declares none)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    if name not in _ITEMSIZE:
        raise TcaError(f"the model's config.json declares dtype {name!r}; tca runs {sorted(_ITEMSIZE)}.")
    return name


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of one model."""

    d: int
    intermediate: int
    n_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    """Input embedding and unembedding share one tensor."""
    params: int
    """Every parameter, tied ones once."""
    layer_params: int
    """One decoder layer (attention, MLP, norms)."""
    mlp_params: int
    """One decoder layer's MLP."""
    embed_params: int
    """The input embedding."""
    dtype: str
    """The checkpoint's dtype (``checkpoint_dtype``)."""

    @property
    def qkv(self) -> int:
        """Width of one token's queries, keys and values together."""
        return (self.heads + 2 * self.kv_heads) * self.head_dim


def model_shape(config: dict) -> ModelShape:
    """The shape of the model a config.json describes, its parameters counted on the meta device."""
    return _model_shape(json.dumps(config, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _model_shape(config_json: str) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(config_json)
    settings = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    try:
        cfg = AutoConfig.for_model(**settings)
    except (KeyError, ValueError) as exc:
        raise TcaError(f"transformers cannot build a model from this config.json ({exc}).") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layer = model.model.layers[0]
    heads = int(cfg.num_attention_heads)
    return ModelShape(
        d=int(cfg.hidden_size),
        intermediate=int(cfg.intermediate_size),
        n_layers=int(cfg.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
        vocab=int(cfg.vocab_size),
        tied=model.lm_head.weight is model.model.embed_tokens.weight,
        params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in layer.parameters()),
        mlp_params=sum(p.numel() for p in layer.mlp.parameters()),
        embed_params=model.model.embed_tokens.weight.numel(),
        dtype=checkpoint_dtype(config),
    )


def read_config(model_dir: str | Path) -> dict:
    """A model directory's config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise TcaError(f"{model_dir} has no config.json; pass a Hugging Face model directory.")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Workload:
    """The sizes of what one command runs besides its weights: all the plan needs to know."""

    command: str
    """One of ``COMMANDS``, or ``WEIGHTS_ONLY``."""
    layers: tuple[int, ...] = ()
    """harvest: the selected layers; the commands on adapters: the layers that get one."""
    n_features: int = 0
    """Features per adapter."""
    tokens: int = 0
    """Tokens of the largest teacher-forced pass, padding included (batch × seq_len; harvest:
    max(batch_tokens, seq_len); index: decoder rows put through the logit lens at once)."""
    seq_len: int = 0
    """Longest sequence in such a pass."""
    rows: int = 0
    """harvest: most rows one batch stores (its tokens, or fewer with --max-tokens)."""
    gen_batch: int = 0
    """Prompts generated together (0: the command generates nothing)."""
    prompt_len: int = 0
    """Longest prompt, in tokens."""
    new_tokens: int = 0
    """Longest response, in tokens."""
    cutoffs: int = 0
    """refine: mixed models per step (two streams each)."""
    keep_target: bool = True
    """The commands on adapters: the target's own MLPs are kept beside the base's."""
    chunk: int = 0
    """refine: tokens whose full-vocabulary logits are alive at once in the KL."""
    arrays: int = 2
    """harvest: arrays stored per layer (x, delta, and y with --store-y)."""
    block_rows: int = 0
    """harvest: rows of one block in the writer's buffers."""
    blocks_in_flight: int = 0
    """harvest: blocks buffered at once (queued, being written and being filled)."""
    layers_per_pass: int = 0
    """harvest: layers whose base MLPs, inputs and rows one pass over the data holds (0: all)."""

    @property
    def pass_layers(self) -> int:
        """harvest: the most layers one pass holds."""
        return min(self.layers_per_pass or len(self.layers), len(self.layers))


@dataclass(frozen=True)
class Line:
    """One thing a command holds on one device."""

    where: str
    """``cpu``, ``cuda:N`` or ``host`` (the CPU memory of a CUDA run)."""
    kind: str
    """``weights``, ``copies`` (of weights), ``optimizer`` or ``activations``."""
    what: str
    bytes: int
    step: str | None = None
    """The step of the command the line belongs to; None: held throughout."""


@dataclass
class MemoryPlan:
    """What one command will hold, per device."""

    command: str
    dtype: str
    """The precision the models run in."""
    device: str
    lines: list[Line]
    advice: Callable[[dict[str, int | None]], str | None] | None = None
    """Given each device's free bytes (None: unknown), what would fit instead, said in the refusal in
    place of the command's usual hint (harvest: the largest --layers-per-pass that fits)."""

    def need(self) -> dict[str, int]:
        """Bytes each device needs: what is held throughout plus the largest step."""
        return {where: self.held(where) + max(self.steps(where).values(), default=0) for where in self.devices}

    @property
    def devices(self) -> list[str]:
        return list(dict.fromkeys(line.where for line in self.lines))

    def held(self, where: str) -> int:
        return sum(line.bytes for line in self.lines if line.where == where and line.step is None)

    def steps(self, where: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines:
            if line.where == where and line.step is not None:
                out[line.step] = out.get(line.step, 0) + line.bytes
        return out

    def table(self, markdown: bool = False) -> str:
        """The plan as text (for the log) or as a Markdown table (for docs/scale.md)."""
        rows = []
        need = self.need()
        for where in self.devices:
            steps = self.steps(where)
            peak = max(steps, key=steps.get) if steps else None
            for line in self.lines:
                if line.where == where:
                    step = "" if line.step is None else f"[{line.step}{' (largest)' if line.step == peak else ''}] "
                    rows.append((where, line.kind, step + line.what, _gb(line.bytes)))
            rows.append((where, "total", "held throughout" + (f" + largest step ({peak})" if peak else ""),
                         _gb(need[where])))
        label = f"tca {self.command}" if self.command in COMMANDS else f"the {self.command} (weights only)"
        head = f"memory plan of {label} ({self.dtype} on {self.device}; GB = 10^9 bytes)"
        if markdown:
            body = ["| device | kind | what | GB |", "|---|---|---|---:|"]
            body += [f"| {w} | {'**total**' if k == 'total' else k} | {what} | "
                     f"{f'**{gb}**' if k == 'total' else gb} |" for w, k, what, gb in rows]
            return "\n".join([head, "", *body])
        width = max(len(r[2]) for r in rows)
        return "\n".join([head] + [f"  {w:<7} {k:<11} {what:<{width}}  {gb:>7} GB" for w, k, what, gb in rows])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


# ---- what each command holds ---------------------------------------------------------------------


def memory_plan(work: Workload, target: dict, base: dict | None, dtype: torch.dtype,
                device: torch.device) -> MemoryPlan:
    """The plan of ``work`` on a pair whose config.json dicts are ``target`` and ``base`` (the base
    is read for its MLPs' stored dtype; None for index), the models running in ``dtype`` on
    ``device``."""
    if work.command not in (*COMMANDS, WEIGHTS_ONLY):
        raise ValueError(f"unknown command {work.command!r}; plans exist for {COMMANDS}")
    t = model_shape(target)
    name = str(dtype).removeprefix("torch.")
    e = _ITEMSIZE[name]
    dev = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    host = "cpu" if device.type == "cpu" else "host"
    lines: list[Line] = []

    def add(where: str, kind: str, what: str, n: int, step: str | None = None) -> None:
        lines.append(Line(where, kind, what, int(n), step))

    if work.command == "index":
        _logit_lens(add, t, work)
        return MemoryPlan("index", "float32", "cpu", lines)
    # On CPU in the checkpoint's dtype, from_pretrained and safetensors map the files rather than
    # copy them: a weight is resident once read, and what a command never reads costs nothing.
    mapped = device.type == "cpu" and name == t.dtype
    if mapped and work.command == "harvest":
        last = max(work.layers) + 1
        add(dev, "weights", f"target layers 0 to {last - 1}, mapped from the checkpoint and read whole ({name})",
            last * t.layer_params * e)
        add(dev, "weights", f"the rest of the target stays mapped and unread (embedding but its tokens' rows, "
            f"unembedding{', later layers' if last < t.n_layers else ''}): "
            f"{(t.params - last * t.layer_params) * e / 1e9:.2f} GB not resident", 0)
    elif mapped and not t.tied:
        add(dev, "weights", f"target model less its input embedding, {(t.params - t.embed_params) / 1e9:.2f} B "
            f"parameters in {name}", (t.params - t.embed_params) * e)
        add(dev, "weights", f"input embedding mapped from the checkpoint, resident in its tokens' rows only: "
            f"{t.embed_params * e / 1e9:.2f} GB not resident", 0)
    else:
        add(dev, "weights", f"target model, {t.params / 1e9:.2f} B parameters in {name}", t.params * e)
    if work.command != "harvest":
        _adapted(add, t, work, e, name, dev, host)
        return MemoryPlan(work.command, name, dev, lines)
    _harvest(add, t, model_shape(base) if base is not None else t, work, e, dev, host)
    return MemoryPlan("harvest", name, dev, lines, functools.partial(_fewer_per_pass, work, target, base, dtype, device))


def _forward(t: ModelShape, tokens: int, seq_len: int, e: int, n_features: int = 0) -> int:
    """One decoder layer's working set without gradients: the residual stream and its norm
    [tokens, d], then the MLP's gate, up and their product [tokens, I] (or an adapter's
    pre-activations and activations [tokens, F] with its output), and the boolean causal mask
    [batch, seq, seq]."""
    return e * tokens * (2 * t.d + max(3 * t.intermediate, 2 * n_features + t.d)) + tokens * seq_len


def _saved(t: ModelShape, e: int, n_features: int, feature_bytes: int) -> int:
    """Bytes one token of one decoder layer keeps for the backward pass: the inputs of both norms
    in float32 and their outputs, queries, keys, values and attention output, the MLP's input,
    gate, activation, up and product, and the adapter's activations with their gradient."""
    return e * (4 * t.d + t.qkv + 4 * t.intermediate) + 2 * _F32 * t.d + 2 * feature_bytes * n_features


def _harvest(add, t: ModelShape, b: ModelShape, work: Workload, e: int, dev: str, host: str) -> None:
    """One pass over the data: with --layers-per-pass only its layers' base MLPs, inputs and rows are
    held (the weights of one pass are freed before the next pass loads its own)."""
    n, T, R = work.pass_layers, work.tokens, work.rows
    passes = -(-len(work.layers) // n)
    layers = f"{n} layers" if passes == 1 else f"the {n} layers of one pass (of {passes})"
    add(dev, "weights", f"base MLPs of {layers} as stored ({b.dtype})", n * b.mlp_params * _ITEMSIZE[b.dtype])
    add(dev, "activations", f"MLP inputs of the {n} layers until the forward stops: {n} x [{T}, {t.d}]", n * T * t.d * e)
    add(dev, "activations", f"one decoder layer's working set over {T} tokens", _forward(t, T, work.seq_len, e),
        step="forward")
    if e != _F32 or _ITEMSIZE[b.dtype] != _F32:
        add(dev, "copies", f"one MLP weight matrix upcast to float32 while its product runs: [{t.intermediate}, {t.d}]",
            t.intermediate * t.d * _F32, step="MLPs")
    add(dev, "activations", f"both MLPs in float32 on {R} rows: input, gate, up, product, output",
        _F32 * R * (2 * t.d + 3 * t.intermediate), step="MLPs")
    add(dev, "activations", f"rows for the writer: {n} layers x {work.arrays} arrays x [{R}, {t.d}]",
        n * work.arrays * R * t.d * e, step="MLPs")
    add(host, "activations", f"writer buffers: {work.blocks_in_flight} blocks of {work.block_rows} rows x {n} layers "
        f"x {work.arrays} arrays", work.blocks_in_flight * work.block_rows * n * work.arrays * t.d * e)


def _adapted(add, t: ModelShape, work: Workload, e: int, name: str, dev: str, host: str) -> None:
    """The adapted model (target backbone, base MLPs written over the target's, adapters) and
    what each command runs on it."""
    cmd, T, s, F, k = work.command, work.tokens, work.seq_len, work.n_features, len(work.layers)
    L, V, d = t.n_layers, t.vocab, t.d
    if work.keep_target:
        add(dev, "copies", f"the target's MLPs kept beside the base's: {L} layers in {name}", L * t.mlp_params * e)
    adapter_params = k * (2 * d * F + F + d)
    if cmd == "refine":
        add(dev, "weights", f"adapters of {k} layers x {F} features in float32", adapter_params * _F32)
        add(dev, "optimizer", "their gradients and AdamW's two moments, float32", 3 * adapter_params * _F32)
    else:
        add(dev, "weights", f"adapters of {k} layers x {F} features in {name}", adapter_params * e)
    if host != dev:
        add(host, "copies", "the adapter set as read from disk (float32), until it moves to the device",
            adapter_params * _F32, step="loading")

    def teacher_forced(step: str, kept_outputs: bool) -> None:
        add(dev, "activations", f"one decoder layer's working set over {T} tokens", _forward(t, T, s, e, F), step)
        add(dev, "activations", f"logits of two passes: 2 x [{T}, {V}]", 2 * T * V * e, step)
        add(dev, "activations", f"KL in float32: log-softmax of both, exp, difference, product: 5 x [{T}, {V}]",
            5 * T * V * _F32, step)
        if kept_outputs:
            add(dev, "activations", f"decoder-layer outputs of the target and the mode measured: 2 x {L} x [{T}, {d}]",
                2 * L * T * d * e, step)

    def backward(step: str, feature_bytes: int) -> None:
        first = min(work.layers, default=0)
        add(dev, "activations", f"saved for the backward pass: {L - first} layers x {T} tokens",
            (L - first) * T * _saved(t, e, F, feature_bytes), step)

    if cmd == "eval":
        teacher_forced("teacher-forced", kept_outputs=True)
    elif cmd == "intervene":
        teacher_forced("teacher-forced", kept_outputs=False)
    elif cmd in ("attribute", "study"):
        backward("attribution", e)
        add(dev, "activations", f"logits of the target pass, the adapted pass and their gradient: 3 x [{T}, {V}]",
            3 * T * V * e, "attribution")
    elif cmd == "refine":
        streams = 2 + 2 * work.cutoffs
        add(dev, "activations", f"layer boundaries kept by checkpointing: {streams} streams x {L} x [{T}, {d}]",
            streams * L * T * d * e, "step")
        add(dev, "activations", f"one layer recomputed in backward over {T} tokens", T * _saved(t, e, F, _F32), "step")
        c = min(work.chunk, T)
        add(dev, "activations", f"KL of one chunk: logits of T and the stream, and in float32 log-softmax, exp, "
            f"product and gradients: [{c}, {V}] each", c * V * (2 * e + 6 * _F32), "step")
        teacher_forced("held-out evaluation", kept_outputs=True)
    if work.gen_batch:
        g, ctx = work.gen_batch, work.prompt_len + work.new_tokens
        add(dev, "activations", f"KV cache: {g} sequences x {ctx} tokens x {L} layers",
            g * ctx * L * 2 * t.kv_heads * t.head_dim * e, "generation")
        add(dev, "activations", f"prompt pass over {g} x {work.prompt_len} tokens",
            _forward(t, g * work.prompt_len, work.prompt_len, e, F), "generation")
        add(dev, "activations", f"next-token logits, and in float32: 2 x [{g}, {V}]", g * V * (e + _F32), "generation")


def _logit_lens(add, t: ModelShape, work: Workload) -> None:
    """query/lens.py opens the final norm and every [vocab, d] output tensor there is (lm_head and,
    untied, embed_tokens too) as safetensors maps them, converts the unembedding to float32, and
    scores ``tokens`` decoder rows at a time (their logits and, for the bottom tokens, the negated
    logits). A mapped tensor is resident only once read: the unembedding while it converts; an
    untied input embedding is never read (tests/test_7b_shape.py measures both)."""
    w = _ITEMSIZE[t.dtype]
    add("cpu", "weights", f"unembedding in float32: [{t.vocab}, {t.d}]", t.vocab * t.d * _F32)
    add("cpu", "copies", f"the unembedding as stored ({t.dtype}), mapped and read while it converts",
        t.vocab * t.d * w, "loading")
    if not t.tied:
        add("cpu", "weights", f"input embedding mapped beside it and never read: "
            f"{t.vocab * t.d * w / 1e9:.2f} GB not resident", 0)
    add("cpu", "activations", f"logits of {work.tokens} decoder rows and their negation: 2 x [{work.tokens}, {t.vocab}]",
        2 * work.tokens * t.vocab * _F32, "logit lens")


# ---- checking a plan against the device ------------------------------------------------------------


def free_bytes(where: str) -> int | None:
    """Free memory of ``cpu``/``host`` (MemAvailable) or ``cuda:N``; None when it cannot be read."""
    if where.startswith("cuda"):
        return int(torch.cuda.mem_get_info(int(where.partition(":")[2] or 0))[0])
    return _meminfo_available()


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo: what can be allocated without swapping (Linux only)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(plan: MemoryPlan) -> MemoryPlan:
    """Log the plan and refuse, in one sentence, a device that has less free memory than it needs."""
    log.info("%s", plan.table())
    free = {where: free_bytes(where) for where in plan.devices}
    for where, need in plan.need().items():
        if free[where] is None:
            log.warning("cannot read the free memory of %s; the plan above is not checked there", where)
        elif need > free[where]:
            hint = (plan.advice and plan.advice(free)) or _HINTS[plan.command]
            raise TcaError(
                f"tca {plan.command} needs about {_gb(need)} GB on {where} but {_gb(free[where])} GB is free there "
                f"(the memory plan is in the log); {hint}."
            )
    return plan


def _fewer_per_pass(work: Workload, target: dict, base: dict | None, dtype: torch.dtype, device: torch.device,
                    free: dict[str, int | None]) -> str | None:
    """A refused harvest's advice: the largest --layers-per-pass that fits ``free``, if one does."""
    k = largest_pass(work, target, base, dtype, device, free)
    if k is None:
        return None
    return (f"pass --layers-per-pass {k} (the most that fits: {-(-len(work.layers) // k)} passes over the data, "
            f"each a forward of the target), harvest fewer --layers or lower --batch-tokens")


def largest_pass(work: Workload, target: dict, base: dict | None, dtype: torch.dtype, device: torch.device,
                 free: dict[str, int | None]) -> int | None:
    """The most layers per pass, fewer than ``work`` has, whose harvest plan fits ``free`` (bytes per
    device; None: unknown, so not a limit); None when not even one layer per pass fits."""
    for k in range(work.pass_layers - 1, 0, -1):
        need = memory_plan(dataclasses.replace(work, layers_per_pass=k), target, base, dtype, device).need()
        if all(free.get(where) is None or n <= free[where] for where, n in need.items()):
            return k
    return None
