"""The memory plan of every model-driving command on the paper's pair, as the commands log it.

    python bench/memory_plan.py                       # Qwen2.5-Math-7B -> DeepSeek-R1-Distill-Qwen-7B
    python bench/memory_plan.py --base B --target T   # any pair of local model directories
    python bench/memory_plan.py --device cpu          # float32 on CPU, as dtype auto chooses there

Prints one Markdown table per command (docs/scale.md quotes them), computed by
``tca.cache.memory.memory_plan`` from the config.json numbers alone, with each command's default
settings (read from its config class) and dtype ``auto``. Where a default depends on the data, the
table says what it assumes: harvest documents of up to 4096 tokens (``--seq-len 4096``, as in
docs/scale.md), prompts of up to 256 tokens, and for eval the generation of docs/eval.md
(``--generate 200``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tca.adapted.attribute import AttributionConfig
from tca.adapted.config import RefineConfig
from tca.adapted.evaluate import EvalConfig
from tca.adapted.intervene import InterventionConfig
from tca.adapted.lockstep import KL_CHUNK_TOKENS
from tca.cache.harvest import HarvestConfig
from tca.cache.memory import Workload, memory_plan, model_shape, read_config
from tca.cache.models import resolve_dtype
from tca.query.study import StudyConfig
from tca.train.trainer import default_features

# The two config.json files, less the token ids and other keys no plan reads.
QWEN25_MATH_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
R1_DISTILL_QWEN_7B = QWEN25_MATH_7B | {"max_position_embeddings": 131072}

PROMPT_TOKENS = 256
"""Assumed longest prompt: a math question rendered in the R1 layout."""
HARVEST_SEQ_LEN = 4096
"""Assumed longest harvested document (``--seq-len 4096`` of docs/scale.md's harvest)."""
EVAL_GENERATE = 200
"""Prompts ``tca eval`` generates from in docs/eval.md's run."""


def workloads(n_layers: int, d_model: int) -> list[tuple[str, Workload]]:
    """Every command at its defaults (and the assumptions above), with all layers adapted."""
    layers, features = tuple(range(n_layers)), default_features(d_model)
    h = HarvestConfig
    harvest_tokens = max(h.batch_tokens, HARVEST_SEQ_LEN)
    adapted = dict(layers=layers, n_features=features)

    def teacher_forced(cfg) -> dict:
        return dict(tokens=cfg.batch * cfg.seq_len, seq_len=cfg.seq_len)

    def generation(batch: int, new_tokens: int) -> dict:
        return dict(gen_batch=batch, prompt_len=PROMPT_TOKENS, new_tokens=new_tokens)

    return [
        (f"tca harvest --layers all --seq-len {HARVEST_SEQ_LEN}",
         Workload("harvest", layers=layers, tokens=harvest_tokens, seq_len=HARVEST_SEQ_LEN, rows=harvest_tokens,
                  block_rows=h.block_rows, blocks_in_flight=h.queue_blocks + h.writers + 1)),
        ("tca refine", Workload("refine", **adapted, **teacher_forced(RefineConfig), cutoffs=RefineConfig.cutoffs,
                                chunk=KL_CHUNK_TOKENS)),
        (f"tca eval --generate {EVAL_GENERATE}",
         Workload("eval", **adapted, **teacher_forced(EvalConfig),
                  **generation(min(EvalConfig.gen_batch, EVAL_GENERATE), EvalConfig.max_new_tokens))),
        ("tca intervene", Workload("intervene", **adapted, keep_target=False, **teacher_forced(InterventionConfig),
                                   **generation(InterventionConfig.batch, InterventionConfig.max_new_tokens))),
        ("tca attribute", Workload("attribute", **adapted, **teacher_forced(AttributionConfig))),
        ("tca study hesitation", Workload("study", **adapted, **teacher_forced(StudyConfig),
                                          **generation(min(StudyConfig.gen_batch, StudyConfig.prompts),
                                                       StudyConfig.max_new_tokens))),
        ("tca index --target (logit lens)", Workload("index", tokens=1024)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, help="base model directory (default: Qwen2.5-Math-7B's config)")
    parser.add_argument("--target", type=Path, help="target model directory (default: R1-Distill-Qwen-7B's config)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    base = read_config(args.base) if args.base else QWEN25_MATH_7B
    target = read_config(args.target) if args.target else R1_DISTILL_QWEN_7B
    device = torch.device(args.device)
    shape = model_shape(target)
    plans = []
    for command, work in workloads(shape.n_layers, shape.d):
        dtype = resolve_dtype("auto", device, target, checkpoint_on_cpu=work.command == "harvest")
        plans.append((command, memory_plan(work, target, base, dtype, device)))
    print("| command | device (GB) | host (GB) | held throughout | largest step |\n|---|---:|---:|---:|---|")
    for command, plan in plans:
        where = plan.devices[0]  # the model's device (cpu for a CPU run, where host memory is all there is)
        need, steps = plan.need(), plan.steps(where)
        peak = max(steps, key=steps.get) if steps else None
        on_device = "—" if plan.device == "cpu" else f"{need[where] / 1e9:.1f}"
        on_host = need.get("host", need.get("cpu", 0)) / 1e9
        largest = f"{peak} ({steps[peak] / 1e9:.1f} GB)" if peak else "—"
        print(f"| `{command}` | {on_device} | {on_host:.1f} | {plan.held(where) / 1e9:.1f} | {largest} |")
    for command, plan in plans:
        print(f"\n### `{command}`\n\n{plan.table(markdown=True)}")


if __name__ == "__main__":
    main()
