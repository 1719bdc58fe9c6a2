"""Memory at 7B: MLPs in float32 without float32 copies, the memory plan, its refusal, dtype auto."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
import transformers.utils
from conftest import random_adapter_set
from transformers import AutoModelForCausalLM

import tca.cache.memory as memory
from tca import TcaError
from tca.adapted.splice import load_adapted
from tca.cache.capture import PairedMlps, mlp_inputs, rows_from_inputs
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.memory import Workload, check_memory, memory_plan, model_shape
from tca.cache.models import (
    find_model,
    live_mlps,
    load_base_mlps,
    load_model,
    load_pretrained,
    mlp_forward,
    resolve_dtype,
)
from tca.cache.plan import PlanConfig
from tca.cache.store import Store
from tca.train.checkpoint import save_adapters

# Qwen2.5-7B's config.json (Qwen2.5-Math-7B and DeepSeek-R1-Distill-Qwen-7B share these numbers).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
}
D, I, L, V, KV = 3584, 18944, 28, 152064, 4 * 128


def hand_params() -> tuple[int, int]:
    """Every parameter of Qwen2.5-7B, and one layer's MLP, counted from the architecture."""
    attention = (D * D + D) + 2 * (D * KV + KV) + D * D  # q (bias), k, v (bias), o (no bias)
    mlp = 3 * D * I
    layer = attention + mlp + 2 * D  # two RMSNorms
    return L * layer + D + 2 * V * D, mlp  # final norm, untied embedding and unembedding


# ---- float32 MLPs without float32 copies ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlps_in_float32_equal_float32_copies_exactly(tiny_pair, bf16_pair, dtype):
    """x, delta and y of the harvest's capture equal, bit for bit, the old computation on float32
    copies of both MLPs; and the weights stay in their stored dtype (the target's are the model's own)."""
    pair = tiny_pair if dtype == torch.float32 else bf16_pair
    base_src, target_src = find_model(str(pair[0])), find_model(str(pair[1]))
    layers = [0, 2, 3]
    model = load_model(target_src, dtype, torch.device("cpu"))
    mlps = PairedMlps(load_base_mlps(base_src, layers), live_mlps(model, layers, "silu"))
    for layer in layers:
        assert mlps.base[layer].gate.dtype == dtype
        assert mlps.target[layer].gate.data_ptr() == model.model.layers[layer].mlp.gate_proj.weight.data_ptr()

    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    select = torch.tensor([0, 3, 11, 12, 20])
    rows = rows_from_inputs(mlp_inputs(model, layers, ids, mask), select, mlps, store_y=True)

    # the old way: float32 copies of both models' MLP modules, applied to the same x
    base_model = AutoModelForCausalLM.from_pretrained(pair[0], dtype=dtype)
    for layer in layers:
        x = rows[layer]["x"]
        target32 = copy.deepcopy(model.model.layers[layer].mlp).float()
        base32 = copy.deepcopy(base_model.model.layers[layer].mlp).float()
        with torch.no_grad():
            y_old, base_old = target32(x.float()), base32(x.float())
            assert torch.equal(mlp_forward(mlps.target[layer], x), y_old)
            assert torch.equal(mlp_forward(mlps.base[layer], x), base_old)
        assert torch.equal(rows[layer]["delta"], (y_old - base_old).to(dtype))
        assert torch.equal(rows[layer]["y"], y_old.to(dtype))


# ---- the plan ---------------------------------------------------------------------------------------


def test_parameter_count_from_the_config_equals_the_loaded_model(tiny_pair):
    model = AutoModelForCausalLM.from_pretrained(tiny_pair[1])
    shape = model_shape(json.loads((tiny_pair[1] / "config.json").read_text()))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[3].parameters())
    assert shape.mlp_params == sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    assert shape.embed_params == model.model.embed_tokens.weight.numel()


def test_parameter_count_of_the_real_pair_equals_the_architecture():
    params, mlp = hand_params()
    assert params == 7_615_616_512  # Qwen2.5-7B's published count
    shape = model_shape(QWEN25_7B)
    assert (shape.params, shape.mlp_params, shape.qkv, shape.dtype) == (params, mlp, (28 + 8) * 128, "bfloat16")
    assert (shape.layer_params, shape.embed_params) == ((params - D - 2 * V * D) // L, V * D)


def test_a_cpu_harvest_in_the_checkpoint_dtype_counts_only_the_layers_it_reads():
    """from_pretrained maps a checkpoint of the run's dtype: the embedding, unembedding and the
    layers after the last harvested one are never read, so never resident (tests/test_7b_shape.py
    measures it)."""
    params, mlp = hand_params()
    layer = (params - D - 2 * V * D) // L
    work = Workload("harvest", layers=(3, 7), tokens=64, seq_len=64, rows=64, block_rows=64, blocks_in_flight=1)
    mapped = memory_plan(work, QWEN25_7B, QWEN25_7B, torch.bfloat16, torch.device("cpu"))
    assert mapped.held("cpu") == 8 * layer * 2 + 2 * mlp * 2 + 2 * 64 * D * 2 + 1 * 64 * 2 * 2 * D * 2
    converted = memory_plan(work, QWEN25_7B, QWEN25_7B, torch.float32, torch.device("cpu"))
    assert converted.held("cpu") == params * 4 + 2 * mlp * 2 + 2 * 64 * D * 4 + 1 * 64 * 2 * 2 * D * 4


T_HARVEST, S_HARVEST, R_HARVEST = 8192, 4096, 8192
"""--batch-tokens 8192 over documents of up to 4096 tokens, every token a row."""


def harvest_plan(layers_per_pass: int = 0) -> memory.MemoryPlan:
    """The plan of a harvest of every layer of the real pair at its defaults, on CUDA."""
    work = Workload("harvest", layers=tuple(range(L)), tokens=T_HARVEST, seq_len=S_HARVEST, rows=R_HARVEST,
                    block_rows=4096, blocks_in_flight=7, layers_per_pass=layers_per_pass)
    return memory_plan(work, QWEN25_7B, QWEN25_7B, torch.bfloat16, torch.device("cuda"))


@pytest.mark.parametrize("k", [L, 7])
def test_harvest_plan_of_the_real_pair_equals_a_hand_computation(k):
    """With --layers-per-pass k only k layers' base MLPs, MLP inputs, rows and buffers are held."""
    params, mlp = hand_params()
    T, s, R = T_HARVEST, S_HARVEST, R_HARVEST
    plan = harvest_plan(k)
    weights = params * 2 + k * mlp * 2  # the bf16 target, and the pass's base MLPs as stored
    captured = k * T * D * 2  # each layer's MLP input until the forward stops
    forward = 2 * T * (2 * D + 3 * I) + T * s  # residual, norm, gate, up, product; boolean mask
    mlps = D * I * 4 + 4 * R * (2 * D + 3 * I) + k * 2 * R * D * 2  # one float32 matrix, the MLP math, the rows
    assert plan.need() == {"cuda:0": weights + captured + max(forward, mlps), "host": 7 * 4096 * k * 2 * D * 2}
    if k == L:
        assert round(plan.need()["cuda:0"] / 1e9, 1) == 33.9  # the figure docs/scale.md quotes
        assert plan.need() == harvest_plan(0).need() == harvest_plan(99).need()
    else:
        assert "base MLPs of the 7 layers of one pass (of 4) as stored (bfloat16)" in plan.table()


def test_a_refused_harvest_names_the_largest_layers_per_pass_that_fits(monkeypatch):
    needs = {k: harvest_plan(k).need()["cuda:0"] for k in range(1, L + 1)}
    assert all(needs[k] < needs[k + 1] for k in range(1, L))
    free = {"cuda:0": (needs[9] + needs[10]) // 2, "host": 10**12}
    monkeypatch.setattr(memory, "free_bytes", lambda where: free[where])
    advice = (r"; pass --layers-per-pass 9 \(the most that fits: 4 passes over the data, each a forward of the "
              r"target\), harvest fewer --layers or lower --batch-tokens\.$")
    for k in (0, 12):
        with pytest.raises(TcaError, match=r"^tca harvest needs about \d+\.\d\d GB on cuda:0 but \d+\.\d\d GB is free "
                                           r"there \(the memory plan is in the log\)" + advice) as e:
            check_memory(harvest_plan(k))
        assert e.value.args[0].count(". ") == 0  # one sentence
    free["cuda:0"] = needs[1] - 1  # not even one layer per pass: the usual advice
    with pytest.raises(TcaError, match=r"; harvest fewer --layers or lower --batch-tokens\.$"):
        check_memory(harvest_plan())
    free["cuda:0"] = needs[9]
    assert check_memory(harvest_plan(9)).need()["cuda:0"] == needs[9]


def test_adapted_model_plans_of_the_real_pair_equal_a_hand_computation():
    params, mlp = hand_params()
    F, T = 8192, 8 * 1024
    adapters = L * (2 * D * F + F + D)
    common = dict(layers=tuple(range(L)), n_features=F, tokens=T, seq_len=1024)
    cuda = torch.device("cuda")

    evaluation = memory_plan(Workload("eval", **common), QWEN25_7B, QWEN25_7B, torch.bfloat16, cuda)
    held = params * 2 + L * mlp * 2 + adapters * 2  # model, the target MLPs kept, bf16 adapters
    forward = 2 * T * (2 * D + 3 * I) + T * 1024
    step = forward + 2 * T * V * 2 + 5 * T * V * 4 + 2 * L * T * D * 2  # logits, float32 KL, layer outputs
    assert evaluation.need() == {"cuda:0": held + step, "host": adapters * 4}

    intervene = memory_plan(Workload("intervene", keep_target=False, gen_batch=32, prompt_len=200, new_tokens=300,
                                     **common), QWEN25_7B, QWEN25_7B, torch.bfloat16, cuda)
    kv_cache = 32 * 500 * L * 2 * KV * 2
    assert intervene.held("cuda:0") == params * 2 + adapters * 2
    assert intervene.steps("cuda:0") == {"teacher-forced": step - 2 * L * T * D * 2,
                                         "generation": kv_cache + 2 * 32 * 200 * (2 * D + 3 * I) + 32 * 200 * 200
                                         + 32 * V * 6}

    refine = memory_plan(Workload("refine", cutoffs=1, chunk=2048, **common), QWEN25_7B, QWEN25_7B,
                         torch.bfloat16, cuda)
    assert refine.held("cuda:0") == params * 2 + L * mlp * 2 + 4 * adapters * 4  # + float32 grads, AdamW moments

    index = memory_plan(Workload("index", tokens=1024), QWEN25_7B, None, torch.float32, torch.device("cpu"))
    assert index.need() == {"cpu": V * D * 4 + max(V * D * 2, 2 * 1024 * V * 4)}  # one bf16 [V, D] read, not two


def test_check_refuses_a_device_too_small_in_one_sentence(monkeypatch):
    plan = memory_plan(Workload("eval", layers=(0,), n_features=64, tokens=64, seq_len=64), QWEN25_7B, QWEN25_7B,
                       torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (20 * 10**9, 24 * 10**9))
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 10**12)
    with pytest.raises(TcaError, match=r"^tca eval needs about 2\d\.\d\d GB on cuda:0 but 20\.00 GB is free there") as e:
        check_memory(plan)
    assert e.value.args[0].count(". ") == 0  # one sentence
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (80 * 10**9, 80 * 10**9))
    assert check_memory(plan) is plan


def test_harvest_refuses_before_loading_when_memory_is_short(tiny_pair, tiny_data, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("tca.cache.harvest.load_model", no_loading)
    monkeypatch.setattr(memory, "free_bytes", lambda where: 1000)
    cfg = HarvestConfig(base=str(tiny_pair[0]), target=str(tiny_pair[1]), out=str(tmp_path / "store"),
                        plan=PlanConfig(data=str(tiny_data)), device="cpu")
    with pytest.raises(TcaError, match=r"tca harvest needs about 0\.\d\d GB on cpu but 0\.00 GB is free there.*"
                                       r"harvest fewer --layers or lower --batch-tokens\.$"):
        harvest(cfg)


def test_load_adapted_refuses_before_loading_when_memory_is_short(tiny_pair, tmp_path, monkeypatch):
    save_adapters(tmp_path / "adapters", random_adapter_set(32, seed=0, b_enc=-0.5, dec_scale=0.1))
    monkeypatch.setattr("tca.adapted.splice.load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(memory, "free_bytes", lambda where: 1000)
    with pytest.raises(TcaError, match=r"tca attribute needs about .* GB on cpu"):
        load_adapted(tmp_path / "adapters", str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", keep_target=True,
                     work=Workload("attribute", tokens=2048, seq_len=256))


# ---- precision ----------------------------------------------------------------------------------------


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cuda, QWEN25_7B) == torch.bfloat16
    assert resolve_dtype("auto", cuda, {"dtype": "float16", "torch_dtype": "bfloat16"}) == torch.float16
    assert resolve_dtype("auto", cuda, {}) == torch.float32
    assert resolve_dtype("auto", cpu, QWEN25_7B) == torch.float32
    assert resolve_dtype("auto", cpu, QWEN25_7B, checkpoint_on_cpu=True) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu, {}) == torch.bfloat16
    with pytest.raises(TcaError, match="unknown activation dtype 'float64'"):
        resolve_dtype("float64", cpu, {})
    with pytest.raises(TcaError, match="declares dtype 'int8'"):
        resolve_dtype("auto", cuda, {"torch_dtype": "int8"})


def test_harvest_records_its_precision(bf16_pair, tiny_data, tmp_path):
    cfg = HarvestConfig(base=str(bf16_pair[0]), target=str(bf16_pair[1]), out=str(tmp_path / "store"),
                        plan=PlanConfig(data=str(tiny_data), max_tokens=200), device="cpu")
    harvest(cfg)
    attrs = Store.open(cfg.out).spec.attrs
    assert attrs["harvest"]["dtype"] == "bfloat16"  # auto keeps the checkpoint's dtype on CPU for the harvest
    assert attrs["precision"] == {"model": "bfloat16", "mlps": "float32", "base_mlp_weights": "bfloat16"}


def test_load_adapted_resolves_auto_and_loads_onto_the_device(bf16_pair, tmp_path):
    save_adapters(tmp_path / "adapters", random_adapter_set(32, seed=0, b_enc=-0.5, dec_scale=0.1))
    on_cpu = load_adapted(tmp_path / "adapters", str(bf16_pair[0]), str(bf16_pair[1]), device="cpu")
    assert on_cpu.dtype == torch.float32  # auto on CPU
    half = load_adapted(tmp_path / "adapters", str(bf16_pair[0]), str(bf16_pair[1]), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # adapters included


def test_loading_onto_cuda_asks_transformers_for_the_device_directly(tiny_pair, monkeypatch):
    calls = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda: True)
    load_pretrained(tiny_pair[1], torch.bfloat16, torch.device("cuda"))
    assert calls == [{"dtype": torch.bfloat16, "device_map": {"": "cuda:0"}}]
    monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda: False)
    with pytest.raises(TcaError, match="needs the accelerate package"):
        load_pretrained(tiny_pair[1], torch.bfloat16, torch.device("cuda"))
