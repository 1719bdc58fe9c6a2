"""Training-step throughput of tca's sparse adapter against a dense step and EleutherAI's
sparsify, side by side in one run; one JSON line per (implementation, shape).

    python bench/kernels.py --quick      # this CPU: d=512, width 8192, batch 4096
    python bench/kernels.py              # the full grid (meant for a GPU)

A step is forward, backward and an AdamW update of a transcoder adapter x -> y at a given
L0 (active features per row). ``speedup`` = tok/s over the dense ReLU step of the same
shape; ``vs_peer`` = tca TopK over sparsify TopK at the same k; ``gemm_frac`` = the share
of tca's step spent in the encoder GEMM, the part no sparse method removes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass

import torch

from tca.kernels import dense_adapter, sparse_adapter

log = logging.getLogger(__name__)


@dataclass
class Shape:
    d: int
    features: int
    l0: int
    batch: int


@dataclass
class Problem:
    """Data and initial weights for one shape; each implementation trains its own copy."""

    x: torch.Tensor
    y: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor

    @classmethod
    def make(cls, shape: Shape, device: torch.device) -> Problem:
        x = torch.randn(shape.batch, shape.d, device=device)
        W_enc = torch.randn(shape.d, shape.features, device=device) / shape.d**0.5
        # One bias for all features, placed so that ReLU keeps l0 entries per row on average.
        cut = (x @ W_enc).reshape(-1).topk(shape.l0 * shape.batch).values.min()
        return cls(x=x, y=torch.randn(shape.batch, shape.d, device=device), W_enc=W_enc,
                   b_enc=torch.full((shape.features,), -cut.item(), device=device),
                   W_dec=torch.randn(shape.features, shape.d, device=device) / shape.d**0.5,
                   b_dec=torch.zeros(shape.d, device=device))

    def params(self) -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(t.clone()) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)]


def adapter_step(problem: Problem, shape: Shape, adapter, **kwargs):
    """A closure doing one step of ``adapter`` (tca's or the dense reference)."""
    params = problem.params()
    opt = torch.optim.AdamW(params, lr=1e-7)
    l1_coeff = 1e-3 if kwargs["activation"] == "relu" else 0.0

    def step():
        out = adapter(problem.x, *params, **kwargs)
        loss = (out.pred - problem.y).pow(2).sum() / shape.batch + l1_coeff * out.l1
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sparsify_step(problem: Problem, shape: Shape):
    """sparsify's SparseCoder (transcoder, TopK at k = l0), or the reason it cannot run."""
    if problem.x.device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as err:
        return None, f"sparsify not importable: {err}"
    coder = SparseCoder(shape.d, SparseCoderConfig(num_latents=shape.features, k=shape.l0, transcode=True),
                        device=problem.x.device)
    with torch.no_grad():
        coder.encoder.weight.copy_(problem.W_enc.t())
        coder.W_dec.copy_(problem.W_dec)
    opt = torch.optim.AdamW(coder.parameters(), lr=1e-7)

    def step():
        coder(problem.x, problem.y).fvu.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, None


def fastest_seconds(fns: dict, device: torch.device, reps: int) -> dict[str, float]:
    """Best time per call of each function, taking turns so that load from other processes
    on a shared machine falls on all of them alike (the minimum is the least disturbed)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {name: float("inf") for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep:  # the first turn is a warm-up: allocations, kernel compilation
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench_shape(shape: Shape, device: torch.device, reps: int) -> list[dict]:
    problem = Problem.make(shape, device)
    timed = {
        "dense": adapter_step(problem, shape, dense_adapter, activation="relu"),
        "tca-relu": adapter_step(problem, shape, sparse_adapter, activation="relu"),
        "tca-topk": adapter_step(problem, shape, sparse_adapter, activation="topk", k=shape.l0),
    }
    peer, peer_missing = sparsify_step(problem, shape)
    if peer is not None:
        timed["sparsify-topk"] = peer
    timed["gemm"] = lambda: torch.addmm(problem.b_enc, problem.x, problem.W_enc)
    secs = fastest_seconds(timed, device, reps)
    gemm = secs.pop("gemm")

    rows = []
    for name, sec in secs.items():
        row = {"impl": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), **vars(shape),
               "tok_s": round(shape.batch / sec), "step_ms": round(sec * 1e3, 1),
               "speedup": round(secs["dense"] / sec, 2)}
        if name.startswith("tca"):
            row["gemm_frac"] = round(min(gemm / sec, 1.0), 2)
        if name == "tca-topk":
            row["vs_peer"] = round(secs["sparsify-topk"] / sec, 2) if peer is not None else None
            if peer is None:
                row["vs_peer_missing"] = peer_missing
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d=512, width 8192 only (a CPU run)")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per implementation")
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dims, widths = ([512], [8192]) if args.quick else ([512, 3584], [8192, 32768])
    for d in dims:
        for features in widths:
            for l0 in (1, 10, 100):
                shape = Shape(d=d, features=features, l0=l0, batch=args.batch)
                log.info("benchmarking %s on %s", shape, device)
                for row in bench_shape(shape, device, args.reps):
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
