"""Sparse adapter kernels: each Triton kernel against its PyTorch twin, and the whole
sparse adapter (both backends) against dense autograd in float32.

Inputs are small multiples of powers of two, so the encoder pre-activations are exact in
every dtype and never sit on a selection boundary: every implementation must select the
same entries, and only the sums after selection carry rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

from tca import TcaError
from tca.kernels import DensityGate, dense_adapter, sparse_adapter
from tca.kernels.backward import entry_dot_torch, entry_dot_triton, segment_sum_torch, segment_sum_triton
from tca.kernels.decode import decode_torch, decode_triton
from tca.kernels.layout import SparseLayout
from tca.kernels.select import select_above_torch, select_above_triton

HAS_CUDA = torch.cuda.is_available()
CAN_TRITON = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="Triton needs CUDA or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
BANDWIDTH = 0.125


def grid(shape, lo, hi, scale):
    return torch.randint(lo, hi, shape).float() / scale


def adapter_inputs(n_rows=6, d=8, n_features=37):
    """Row 0 has no active feature (x = 0, every bias negative); row 1 has all of them."""
    x = grid((n_rows, d), -2, 3, 4)
    W_enc = grid((d, n_features), -2, 3, 4)
    b_enc = -(grid((n_features,), 0, 5, 1) + 0.5) / 16
    x[0] = 0
    if n_rows > 1:
        x[1] = 0
        x[1, 0] = 2
        W_enc[0] = 0.5
    return {
        "x": x, "W_enc": W_enc, "b_enc": b_enc,
        "W_dec": torch.randn(n_features, d), "b_dec": torch.randn(d),
        "threshold": (grid((n_features,), 1, 9, 1) + 0.25) / 16,
        "dead_mask": torch.rand(n_features) < 0.5,
    }


def close(actual, expected, dtype):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=TOL[dtype] * scale)


# ---- kernel twins -------------------------------------------------------------------------


def random_layout(n_rows, n_features, per_row):
    """Rows with ``per_row[b]`` distinct features each (0 and F allowed)."""
    cols = [torch.randperm(n_features)[:n] for n in per_row]
    rows = torch.arange(n_rows).repeat_interleave(torch.tensor(per_row))
    return SparseLayout.from_rows(rows, torch.cat(cols), n_rows, n_features)


def dense_of(layout, values):
    acts = torch.zeros(layout.n_rows, layout.n_features)
    acts[layout.rows, layout.cols] = values.float()
    return acts


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_triton_matches_twin(dtype):
    inputs = adapter_inputs(n_rows=5, n_features=37)
    pre = torch.addmm(inputs["b_enc"], inputs["x"], inputs["W_enc"]).to(dtype)
    floor = inputs["threshold"] - BANDWIDTH / 2
    expected_layout, expected = select_above_torch(pre, floor)
    # A block of 16 makes 37 features span three blocks, the last one partial.
    layout, values = select_above_triton(pre, floor, block=16)
    assert torch.equal(layout.rows, expected_layout.rows)
    assert torch.equal(layout.cols, expected_layout.cols)
    assert torch.equal(layout.crow, expected_layout.crow)
    assert torch.equal(values, expected)
    mask = pre.float() > floor
    assert torch.equal(values, pre[mask]) and layout.rows.numel() == mask.sum()
    assert layout.crow[1] == 0 and layout.crow[2] - layout.crow[1] == 37  # empty row, full row


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_triton_matches_twin(dtype):
    layout = random_layout(4, 37, [0, 37, 5, 1])
    values = torch.randn(layout.cols.numel()).to(dtype)
    W_dec, b_dec = torch.randn(37, 20).to(dtype), torch.randn(20).to(dtype)
    expected = dense_of(layout, values) @ W_dec.float() + b_dec.float()
    close(decode_torch(layout, values, W_dec, b_dec), expected, dtype)
    close(decode_triton(layout, values, W_dec, b_dec, block_e=4, block_d=16), expected, dtype)
    close(decode_triton(layout, values, W_dec, None, block_e=4, block_d=16), expected - b_dec.float(), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_triton_matches_twin(dtype):
    layout = random_layout(4, 37, [0, 37, 5, 1])
    nnz = layout.cols.numel()
    weights, grad_pred = torch.randn(nnz).to(dtype), torch.randn(4, 20).to(dtype)
    W_dec = torch.randn(37, 20).to(dtype)
    expected_dot = (grad_pred.float()[layout.rows] * W_dec.float()[layout.cols]).sum(1)
    close(entry_dot_torch(layout, grad_pred, W_dec), expected_dot, dtype)
    close(entry_dot_triton(layout, grad_pred, W_dec, block_e=4, block_d=16), expected_dot, dtype)

    expected_sum = dense_of(layout, weights).t() @ grad_pred.float()
    for out in (torch.empty(37, 20, dtype=dtype), torch.empty(20, 37, dtype=dtype).t()):
        close(segment_sum_torch(layout, weights, grad_pred, out), expected_sum, dtype)
        close(segment_sum_triton(layout, weights, grad_pred, out, block_e=4, block_n=16), expected_sum, dtype)


# ---- the adapter against dense autograd ------------------------------------------------------

CASES = {
    "relu": {},
    "jumprelu": {"bandwidth": BANDWIDTH},
    "topk": {"k": 5},
    "batchtopk": {"k": 5},
    "batchtopk-threshold": {},
}


def run(fn, inputs, case, dtype, **extra):
    """Forward, a loss using every output, backward; returns (output, grads by name)."""
    activation = case.split("-")[0]
    params = {name: inputs[name].to(dtype).requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    kwargs = dict(CASES[case])
    if activation == "jumprelu":
        params["threshold"] = inputs["threshold"].to(dtype).requires_grad_()
        kwargs["threshold"] = params["threshold"]
    elif case == "batchtopk-threshold":
        kwargs["threshold"] = torch.tensor(0.3, dtype=dtype)
    out = fn(inputs["x"].to(dtype), params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"],
             activation=activation, dead_mask=inputs["dead_mask"], k_aux=3, **kwargs, **extra)
    weights = torch.linspace(-1, 1, out.pred.numel()).view_as(out.pred)
    loss = (out.pred.float() * weights).sum() + 0.3 * out.l1 + (out.aux_pred.float() * weights.flip(0)).sum()
    loss.backward()
    return out, {name: p.grad for name, p in params.items()}


def active_entries(out):
    """(rows, features, values) of the active entries in row-major order."""
    keep = (out.values != 0).nonzero().squeeze(1)
    keep = keep[torch.argsort(out.rows[keep] * out.counts.numel() + out.indices[keep])]
    return out.rows[keep], out.indices[keep], out.values[keep]


def check_against_dense(inputs, case, dtype, path):
    expected, expected_grads = run(dense_adapter, {k: v.double() if v.is_floating_point() else v
                                                   for k, v in inputs.items()}, case, torch.float64)
    out, grads = run(sparse_adapter, inputs, case, dtype, path=path)
    assert out.path == path
    for name in ("pred", "l1", "aux_pred"):
        close(getattr(out, name), getattr(expected, name), dtype)
    assert torch.equal(out.counts, expected.counts)
    rows, cols, values = active_entries(out)
    expected_rows, expected_cols, expected_values = active_entries(expected)
    assert torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)
    close(values, expected_values, dtype)
    if case == "batchtopk":
        close(out.batch_threshold, expected.batch_threshold, dtype)
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, f"the reference gradient of {name} vanished: a vacuous check"
        close(grads[name], grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
def test_adapter_matches_dense_autograd(path, case, dtype):
    inputs = adapter_inputs()
    check_against_dense(inputs, case, dtype, path)
    assert inputs["x"].grad is None


@pytest.mark.parametrize("case", ["relu", "topk"])
@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
def test_adapter_batch_of_one(path, case):
    inputs = adapter_inputs(n_rows=1)
    inputs["x"][0] = grid((8,), -2, 3, 4)
    check_against_dense(inputs, case, torch.float32, path)


def test_topk_with_every_feature_kept():
    inputs = adapter_inputs(n_features=12)
    out = sparse_adapter(inputs["x"], inputs["W_enc"], inputs["b_enc"], inputs["W_dec"],
                         activation="topk", k=12)
    reference = torch.relu(torch.addmm(inputs["b_enc"], inputs["x"], inputs["W_enc"]))
    close(out.pred, reference @ inputs["W_dec"], torch.float32)
    assert torch.equal(out.counts, (reference > 0).sum(0))


# ---- dispatch ---------------------------------------------------------------------------------


def test_gate_starts_dense_and_follows_measured_density():
    inputs = adapter_inputs()
    args = [inputs[n] for n in ("x", "W_enc", "b_enc", "W_dec")]
    gate = DensityGate(crossover=0.9)
    first = sparse_adapter(*args, activation="relu", gate=gate)
    assert first.path == "dense"
    assert gate.density == pytest.approx(first.counts.sum().item() / (6 * 37))
    assert gate.density < 0.9
    assert sparse_adapter(*args, activation="relu", gate=gate).path == "torch"
    gate.crossover = gate.density / 2
    assert sparse_adapter(*args, activation="relu", gate=gate).path == "dense"
    # TopK's density is k / F up front: 5 / 37 against the crossover, not the measurement.
    assert sparse_adapter(*args, activation="topk", k=5, gate=DensityGate(crossover=0.2)).path == "torch"
    assert sparse_adapter(*args, activation="topk", k=5, gate=DensityGate(crossover=0.1)).path == "dense"


@pytest.mark.parametrize("change, message", [
    ({"activation": "gelu"}, "unknown activation"),
    ({"activation": "topk"}, "needs k"),
    ({"activation": "topk", "k": 99}, "needs k"),
    ({"activation": "jumprelu"}, "threshold"),
    ({"b_enc": torch.zeros(5)}, "b_enc has shape"),
    ({"W_dec": torch.zeros(37, 8, dtype=torch.float16)}, "one dtype"),
    ({"x": torch.zeros(6, 8, requires_grad=True)}, "must not require grad"),
    ({"dead_mask": torch.zeros(37)}, "dead_mask"),
    ({"path": "cuda"}, "unknown path"),
])
def test_bad_input_is_one_clear_error(change, message):
    inputs = adapter_inputs()
    kwargs = {"x": inputs["x"], "W_enc": inputs["W_enc"], "b_enc": inputs["b_enc"],
              "W_dec": inputs["W_dec"], "activation": "relu", **change}
    with pytest.raises(TcaError, match=message):
        sparse_adapter(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES)
def test_triton_on_cuda_matches_dense(case):
    inputs = {k: v.cuda() for k, v in adapter_inputs(n_rows=64, d=64, n_features=300).items()}
    check_against_dense(inputs, case, torch.bfloat16, "triton")
