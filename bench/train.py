"""Trainer benchmark: ratios measured side by side in one run, printed as JSON lines.

    loader      shuffled batches/s  /  sequential read of the same arrays       (goal >= 0.8)
                (through zarr, block by block; ``ratio_direct`` against tca's own shard
                reader, which the loader uses: the upper bound, since shuffling costs one
                scattered copy of every row that a sequential read does not make)
    trainer     tokens/s end to end /  the same steps on batches already in RAM (goal >= 0.8)
    step        tca's adapter step  /  a plain dense PyTorch step of the same adapter

Runs on a synthetic bf16 store written to a temporary directory.
``python bench/train.py [--rows 65536] [--d 256] [--features 2048]``
``python bench/train.py --shape 7b``: the step figure alone at the 7B pair's width (d 3584, 8192
features; batch 1024, where a dense step takes 3 s on one CPU core, 12 s at 4096 rows). The
loader and trainer figures measure reading, which the store's width does not change.

``step_ratio`` takes the device: bench/gpu_check.py calls it on CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tca.cache.store import Store, from_stored
from tca.toy.synthetic import SyntheticSpec, make_synthetic_store
from tca.train.adapter import Adapter, AdapterConfig, train_step
from tca.train.loader import ActivationLoader, LoaderConfig
from tca.train.trainer import TrainConfig, Trainer

CPU = torch.device("cpu")


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sequential_batches_per_s(store: Store, layer: int, batch: int, direct: bool) -> float:
    """Read every block in order, decode to float32 and cut into batches, as fast as possible:
    through zarr (the format's own reader) or through tca's shard reader (the loader's)."""
    names = ("x", "delta")
    arrays = [store.array(layer, name) for name in names]
    readers = [store.shard_reader(layer, name) for name in names]
    encoding = arrays[0].attrs["tca_encoding"]
    step, n, pending = store.spec.block_rows, 0, 0
    t0 = time.perf_counter()
    for start in range(0, store.n_rows, step):
        stop = min(start + step, store.n_rows)
        raw = [r.read(start, stop) for r in readers] if direct else [a[start:stop] for a in arrays]
        parts = [from_stored(values, encoding).float() for values in raw]
        pending += parts[0].shape[0]
        while pending >= batch:
            pending -= batch
            n += 1
    return n / (time.perf_counter() - t0)


def shuffled_batches_per_s(store: Store, layer: int, batch: int) -> tuple[float, float, dict]:
    loader = ActivationLoader(store, [layer], LoaderConfig(batch=batch, holdout_frac=0.02, shuffle_rows=8 * batch))
    try:
        t0 = time.perf_counter()
        n, first = 0, None
        for _ in loader.epoch(0):
            n += 1
            first = first or time.perf_counter()
        end = time.perf_counter()
        # steady state: after the first window has been read (the pipeline's fill)
        return n / (end - t0), (n - 1) / (end - first), loader.stats.as_dict()
    finally:
        loader.close()


def trainer_ratio(url: str, out: str, features: int, batch: int, steps: int) -> dict:
    cfg = TrainConfig(store=url, out=out, layers="0", features=features, batch=batch, tokens=steps * batch,
                      holdout_frac=0.02, log_every=10**9, eval_every=10**9, checkpoint_every=10**9,
                      shuffle_rows=8 * batch, eval_rows=batch, device="cpu")
    trainer = Trainer(cfg)
    marks = {}

    def on_step(step: int) -> None:
        if step in (1, steps):  # skip the first step (allocation, loss scale)
            marks[step] = (time.perf_counter(), trainer.tokens_seen)

    trainer.run(on_step)
    (t1, n1), (t2, n2) = marks[1], marks[steps]
    end_to_end = (n2 - n1) / (t2 - t1)

    memory = Trainer(TrainConfig(**{**cfg.__dict__, "out": out + "-mem"}))
    batches = []
    for b in memory.loader.epoch(0):
        batches.append(b)
        if len(batches) == steps:
            break
    memory._train_step(batches[0])
    t0 = time.perf_counter()
    for b in batches[1:]:
        memory._train_step(b)
    in_memory = sum(len(b.rows) for b in batches[1:]) / (time.perf_counter() - t0)
    memory.loader.close()
    return {"end_to_end_tok_s": end_to_end, "in_memory_tok_s": in_memory, "ratio": end_to_end / in_memory}


def dense_reference_step(x, delta, params, opt, l1: float, penalty: str = "l1", eps: float = 0.1):
    """The reference's math in plain PyTorch: ReLU, a decoder-norm-weighted sparsity cost (the
    paper's L1, or tca's default ``eps * log(1 + a / eps)`` of the weighted activation a), AdamW."""
    W_enc, b_enc, W_dec, b_dec = params
    acts = torch.relu(x @ W_enc + b_enc)
    pred = acts @ W_dec + b_dec
    weighted = acts * W_dec.norm(dim=1)
    cost = weighted if penalty == "l1" else eps * torch.log1p(weighted / eps)
    loss = (pred - delta).square().sum(-1).mean() + l1 * cost.sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def fastest_seconds(fns: dict, device: torch.device, reps: int) -> dict[str, float]:
    """bench/kernels.py's timing (turns taken, a warm-up turn, synchronised on CUDA), loaded by path:
    bench/ is no package, and ``import kernels`` from the repository root finds tca's kernels/."""
    name = "tca_bench_kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("kernels.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name].fastest_seconds(fns, device, reps)


def step_ratio(d: int, features: int, batch: int, repeats: int, l0: int | None, device: torch.device = CPU,
               penalty: str = "log") -> dict:
    """One ReLU step each way on ``device``, the fastest of ``repeats`` turns; with ``l0``, b_enc is
    set so that about ``l0`` features fire per row, as in a trained adapter (without it, the freshly
    initialised, dense adapter)."""
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(batch, d, generator=g).to(device), torch.randn(batch, d, generator=g).to(device)
    adapter = Adapter(AdapterConfig(d_model=d, n_features=features, l1=0.1, penalty=penalty), g)
    with torch.no_grad():
        adapter.W_dec.normal_(0, 0.05, generator=g)
    adapter.to(device)
    with torch.no_grad():
        if l0 is not None:
            pre = (x @ adapter.W_enc).flatten()
            adapter.b_enc.fill_(-float(pre.kthvalue(int(pre.numel() * (1 - l0 / features))).values))
    opt = torch.optim.AdamW(adapter.parameters(), lr=8e-4, weight_decay=0.0)
    params = [p.detach().clone().requires_grad_() for p in (adapter.W_enc, adapter.b_enc, adapter.W_dec, adapter.b_dec)]
    ref_opt = torch.optim.AdamW(params, lr=8e-4, weight_decay=0.0)
    paths = []

    def tca_step():
        paths.append(train_step(adapter, opt, x, delta).out.path)

    secs = fastest_seconds({"tca": tca_step, "dense": lambda: dense_reference_step(
        x, delta, params, ref_opt, 0.1, penalty, adapter.cfg.penalty_eps)}, device, repeats)
    with torch.no_grad():
        measured = float((torch.relu(x @ adapter.W_enc + adapter.b_enc) > 0).sum(1).float().mean())
    return {"tca_step_ms": round(secs["tca"] * 1e3, 2), "dense_step_ms": round(secs["dense"] * 1e3, 2),
            "speedup": round(secs["dense"] / secs["tca"], 3), "l0_target": l0, "l0": round(measured, 2),
            "tca_path": paths[-1], "d": d, "features": features, "batch": batch, "activation": "relu", "penalty": penalty,
            "device": device.type, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=131072)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=None, help="Rows per batch (default 4096; --shape 7b 1024).")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--shape", choices=("toy", "7b"), default="toy",
                    help="7b: only the step figure, at d 3584 and 8192 features (batch 1024 unless --batch is given).")
    ap.add_argument("--repeats", type=int, default=5, help="Timed turns of each step (after a warm-up turn).")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--penalty", default="log", choices=("l1", "log"),
                    help="the step's sparsity cost (tca train's default: log; l1 is the paper's)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the figures docs/ quotes from this "
                    "bench ran at 2; tca train's own default is tca.cache.threads.DEFAULT_THREADS).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.shape == "7b":
        for l0 in (None, 10):
            emit(bench="step", shape="7b", **step_ratio(3584, 8192, args.batch or 1024, args.repeats, l0, device,
                                                        args.penalty))
        return
    args.batch = args.batch or 4096
    with tempfile.TemporaryDirectory() as tmp:
        doc_len = 256
        spec = SyntheticSpec(d_model=args.d, layers=(0,), n_docs=args.rows // doc_len, doc_len=doc_len,
                             dtype="bfloat16", block_rows=4096, chunk_rows=512)
        store = make_synthetic_store(f"{tmp}/store", spec)
        zarr_seq = direct_seq = shuf = steady = 0.0
        for _ in range(3):  # interleaved, best of three: page cache and other processes hit both alike
            zarr_seq = max(zarr_seq, sequential_batches_per_s(store, 0, args.batch, direct=False))
            direct_seq = max(direct_seq, sequential_batches_per_s(store, 0, args.batch, direct=True))
            rate, rate_steady, stats = shuffled_batches_per_s(store, 0, args.batch)
            shuf, steady = max(shuf, rate), max(steady, rate_steady)
        emit(bench="loader", shuffled_batches_s=shuf, sequential_zarr_batches_s=zarr_seq, ratio=shuf / zarr_seq,
             sequential_direct_batches_s=direct_seq, ratio_direct=shuf / direct_seq,
             steady_batches_s=steady, steady_ratio=steady / zarr_seq,
             mixing=stats["mixing"], docs_per_batch=stats["docs_per_batch"], read_mb_s=stats["read_mb_s"],
             rows=args.rows, d=args.d, dtype="bfloat16", batch=args.batch)
        emit(bench="trainer", **trainer_ratio(f"{tmp}/store", f"{tmp}/run", args.features, args.batch, args.steps),
             features=args.features, d=args.d, batch=args.batch)
        for l0 in (None, 10):
            emit(bench="step", **step_ratio(args.d, args.features, args.batch, args.repeats, l0, device, args.penalty))


if __name__ == "__main__":
    main()
