"""Harvest benchmark: overhead over the unavoidable compute, bytes per row, store I/O vs numpy.

    python bench/harvest.py                 # the demo pair in examples/toy-pair
    python bench/harvest.py --tiny          # a random pair built on the spot (no demo pair needed)
    python bench/harvest.py --shape 7b      # a 2-layer pair of Qwen2.5-7B's shapes (6.2 GB, built
                                            # in about 2 minutes; --fixture DIR keeps it for reuse)

Prints JSON lines, each a ratio measured side by side in one run:

- ``harvest_overhead``: wall time of a whole harvest (plan, model loading, forward passes,
  writing) ÷ the unavoidable compute over the same tokens done back to back in memory
  (the target forward up to the last selected layer plus both MLPs on the captured x, in the
  harvest's own batches and torch threads), timed before and after the harvest and averaged
  (design.md §12: limit 1.0, goal ≤ 1.10);
- ``harvest_passes``: wall (and CPU) time of the same harvest with ``--layers-per-pass 1``, a pass
  over the data per layer, ÷ the one-pass harvest's (docs/scale.md: each pass runs the target
  forward again, up to its layer; the MLPs and the writing are the same);
- ``bytes_per_row``: bytes on disk of the layer arrays per stored row per layer ÷ (2·d·itemsize);
- ``store_io``: write and read MB/s of each chunk layout (and compressor) ÷ plain sequential
  numpy I/O of the same bytes (``tofile``/``fromfile``).

``compute_only`` and ``harvest_ratio`` take the device: bench/gpu_check.py calls them on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tca.cache.capture import PairedMlps, mlp_inputs, rows_from_inputs
from tca.cache.harvest import HarvestConfig, batch_inputs, harvest, plan_batches
from tca.cache.layers import select_layers
from tca.cache.models import (
    find_model,
    live_mlps,
    load_base_mlps,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from tca.cache.plan import PlanConfig, build_plan
from tca.cache.store import Store, StoreSpec
from tca.cache.threads import DEFAULT_THREADS, torch_threads
from tca.toy.tiny import build_tiny_pair, tiny_conversations, write_jsonl

DEMO = Path(__file__).resolve().parent.parent / "examples" / "toy-pair"
CPU = torch.device("cpu")
SIZES = {"toy": {"max_tokens": 20000, "batch_tokens": 4096}, "7b": {"max_tokens": 2048, "batch_tokens": 512}}
"""Defaults of --max-tokens and --batch-tokens per --shape: at 7B a token of the 2-layer pair costs
about 2.6 GFLOP on one core, so 2048 tokens take minutes per pass, and the harvest needs several
batches to overlap writing with computing."""


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def compute_only(cfg: HarvestConfig, device: torch.device = CPU) -> tuple[float, float]:
    """Wall and CPU seconds of the forward passes and MLPs of a harvest on ``device``, with models
    and inputs already in memory, loaded as cache/harvest.py loads them and run in its torch threads."""
    target_src, base_src = find_model(cfg.target), find_model(cfg.base)
    layers = select_layers(cfg.layers, range(target_src.n_layers))
    tokenizer = load_tokenizer(target_src)
    plan = build_plan(cfg.plan, tokenizer)
    model = load_model(target_src, resolve_dtype(cfg.dtype, device, target_src.config, checkpoint_on_cpu=True), device)
    mlps = PairedMlps(base=load_base_mlps(base_src, layers, device),
                      target=live_mlps(model, layers, target_src.config.get("hidden_act", "silu")))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [[t.to(device) for t in batch_inputs(plan, b, pad_id)]
               for b in plan_batches(plan, cfg.batch_tokens) if b.row1 > b.row0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch_threads(cfg.threads):
        sync()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for ids, mask, select in batches:
            rows_from_inputs(mlp_inputs(model, layers, ids, mask), select, mlps, cfg.store_y)
        sync()
        return time.perf_counter() - t0, time.process_time() - cpu0


def harvest_ratio(cfg: HarvestConfig, device: torch.device) -> dict:
    """The ``harvest_overhead`` figure: a whole harvest's wall time ÷ ``compute_only``'s, timed before
    and after it so that drift of the machine falls on both sides; and ``cpu_ratio``, the same in CPU
    seconds of this process (the writer threads' included), which other work on a shared machine
    does not inflate."""
    before, cpu_before = compute_only(cfg, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the harvest's memory plan sees what the measurement freed
    cpu0 = time.process_time()
    result = harvest(cfg)
    harvest_cpu = time.process_time() - cpu0
    after, cpu_after = compute_only(cfg, device)
    compute, compute_cpu = (before + after) / 2, (cpu_before + cpu_after) / 2
    return dict(ratio=round(result.seconds / compute, 3), harvest_s=round(result.seconds, 3),
                compute_s=round(compute, 3), compute_s_before=round(before, 3), compute_s_after=round(after, 3),
                cpu_ratio=round(harvest_cpu / compute_cpu, 3), harvest_cpu_s=round(harvest_cpu, 3),
                compute_cpu_s=round(compute_cpu, 3), tokens=result.n_tokens, rows=result.n_rows, layers=cfg.layers,
                batch_tokens=cfg.batch_tokens, tokens_per_s=round(result.n_tokens / result.seconds),
                threads=cfg.threads, device=device.type)


def passes_ratio(cfg: HarvestConfig, one_pass: dict) -> dict:
    """The ``harvest_passes`` figure: ``cfg`` harvested a layer per pass ÷ ``one_pass``, the one-pass
    harvest that ``harvest_ratio`` timed, in wall and in CPU seconds of this process."""
    cpu0 = time.process_time()
    result = harvest(dataclasses.replace(cfg, out=cfg.out + "-passes", layers_per_pass=1))
    cpu = time.process_time() - cpu0
    return dict(ratio=round(result.seconds / one_pass["harvest_s"], 3),
                cpu_ratio=round(cpu / one_pass["harvest_cpu_s"], 3), harvest_s=round(result.seconds, 3),
                one_pass_s=one_pass["harvest_s"], harvest_cpu_s=round(cpu, 3), one_pass_cpu_s=one_pass["harvest_cpu_s"],
                layers_per_pass=1, layers=cfg.layers, tokens=result.n_tokens)


def bench_overhead(base: Path, target: Path, data: Path, work: Path, args) -> None:
    plan = PlanConfig(data=str(data), max_tokens=args.max_tokens, seq_len=args.seq_len)
    cfg = HarvestConfig(base=str(base), target=str(target), out=str(work / "store"), plan=plan,
                        layers=args.layers, batch_tokens=args.batch_tokens, device=args.device, threads=args.threads)
    one_pass = harvest_ratio(cfg, torch.device(args.device))
    emit(figure="harvest_overhead", **one_pass)
    emit(figure="harvest_passes", **passes_ratio(cfg, one_pass))
    store = Store.open(cfg.out)
    itemsize = torch.empty(0, dtype=store.dtype).element_size()
    layer_bytes = store.fs.du(f"{store.root}/layers", total=True)
    per_row_layer = layer_bytes / store.n_rows / len(store.layers)
    emit(figure="bytes_per_row", ratio=round(per_row_layer / (2 * store.d_model * itemsize), 4),
         bytes_per_row_per_layer=round(per_row_layer, 1), d_model=store.d_model, dtype=store.spec.dtype,
         block_rows=store.spec.block_rows, chunk_rows=store.spec.chunk_rows)


def bench_io(work: Path, args) -> None:
    """Write then read ``args.io_mb`` of random bf16 rows per layout, against numpy on the same bytes."""
    d = args.io_d
    n_rows = int(args.io_mb * 1e6 / (2 * d * 2)) // args.block_rows * args.block_rows
    values = torch.randn(n_rows, d).to(torch.bfloat16)
    nbytes = 2 * values.numel() * 2  # x and delta
    raw = values.view(torch.int16).numpy()
    t0 = time.perf_counter()
    for i in range(2):
        raw.tofile(work / f"np{i}.bin")
    np_write = nbytes / (time.perf_counter() - t0) / 1e6
    t0 = time.perf_counter()
    for i in range(2):
        np.fromfile(work / f"np{i}.bin", dtype=np.int16)
    np_read = nbytes / (time.perf_counter() - t0) / 1e6
    for chunk_rows in args.chunk_rows:
        for compressor in ("none", "zstd"):
            url = str(work / f"io-{chunk_rows}-{compressor}")
            spec = StoreSpec(layers=[0], d_model=d, dtype="bfloat16", n_rows=n_rows, block_rows=args.block_rows,
                             chunk_rows=chunk_rows, compressor=compressor)
            store = Store.create(url, spec)
            t0 = time.perf_counter()
            for b in range(spec.n_blocks):
                start, stop = store.block_range(b)
                store.write_block(b, {0: {"x": values[start:stop], "delta": values[start:stop]}})
            write = nbytes / (time.perf_counter() - t0) / 1e6
            t0 = time.perf_counter()
            for block in store.iter_blocks(0):
                pass
            read = nbytes / (time.perf_counter() - t0) / 1e6
            size = store.fs.du(f"{store.root}/layers", total=True)
            emit(figure="store_io", chunk_rows=chunk_rows, block_rows=args.block_rows, compressor=compressor,
                 write_ratio=round(write / np_write, 3), read_ratio=round(read / np_read, 3),
                 write_MBps=round(write), read_MBps=round(read), numpy_write_MBps=round(np_write),
                 numpy_read_MBps=round(np_read), bytes_ratio=round(size / nbytes, 4), MB=round(nbytes / 1e6))
            shutil.rmtree(url)


def seven_b_pair(fixture: Path | None, work: Path) -> tuple[Path, Path]:
    """The 2-layer pair of Qwen2.5-7B's shapes (tca.toy.pairs.QWEN2_7B), built into ``fixture`` (or
    the scratch folder) unless it is already there."""
    from tca.toy.pairs import QWEN2_7B, build_random_pair
    from tca.toy.tiny import tiny_tokenizer

    folder = fixture or work / "pair-7b"
    if not (folder / "target" / "config.json").exists():
        t0 = time.perf_counter()
        build_random_pair(folder, dataclasses.replace(QWEN2_7B, layers=2), tiny_tokenizer())
        emit(figure="fixture", path=str(folder), build_s=round(time.perf_counter() - t0, 1))
    return folder / "base", folder / "target"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", type=Path, default=DEMO, help="Demo pair folder (base/, reasoning/, data/).")
    p.add_argument("--tiny", action="store_true", help="Use a random pair built on the spot instead.")
    p.add_argument("--shape", choices=("toy", "7b"), default="toy",
                   help="7b: a random 2-layer pair of Qwen2.5-7B's shapes, with toy traces as data.")
    p.add_argument("--fixture", type=Path, default=None,
                   help="--shape 7b: folder of the pair, reused when it holds one, else built there and kept.")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads of the harvest and of "
                   "the compute it is measured against (the harvest's --threads).")
    p.add_argument("--layers", default="all")
    p.add_argument("--max-tokens", type=int, default=None, help="Default: 20000; --shape 7b 2048.")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=None, help="Default: 4096; --shape 7b 512.")
    p.add_argument("--io-mb", type=float, default=128, help="MB of rows written per layout.")
    p.add_argument("--io-d", type=int, default=3584, help="Row width of the I/O benchmark (7B: 3584).")
    p.add_argument("--block-rows", type=int, default=4096)
    p.add_argument("--chunk-rows", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a temporary one).")
    args = p.parse_args()
    for name, value in SIZES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if args.shape == "7b":
            base, target = seven_b_pair(args.fixture, work)
            # the toy traces run to about 45 tokens each
            data = write_jsonl(tiny_conversations(args.max_tokens // 30), work / "data.jsonl")
            pair = "7b"
        elif args.tiny or not (args.pair / "reasoning").exists():
            if not args.tiny:
                raise SystemExit(f"no demo pair at {args.pair}; build it (tca build-pair) or pass --tiny")
            base, target = build_tiny_pair(work / "pair", hidden_size=256, intermediate_size=768, num_layers=4)
            data = write_jsonl(tiny_conversations(600), work / "data.jsonl")
            pair = "tiny"
        else:
            base, target, data = args.pair / "base", args.pair / "reasoning", args.pair / "data" / "train.jsonl"
            pair = str(args.pair)
        emit(figure="setup", pair=pair, threads=args.threads, device=args.device)
        bench_overhead(base, target, data, work, args)
        bench_io(work, args)


if __name__ == "__main__":
    main()
