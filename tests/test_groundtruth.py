"""The pair builder (tca.toy.pairs) and the ground-truth scoring (tca.toy.scoring), each checked
against a computation of its own: weights read back from the files, plain forwards through
transformers, brute-force counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tca.cache.models import find_model, load_base_mlps
from tca.cache.plan import PlanConfig
from tca.toy.pairs import (
    QWEN2_7B,
    PairShape,
    PlantSpec,
    Truth,
    build_planted_pair,
    build_random_pair,
    pseudo_words,
    qwen2_config,
    tensor_shapes,
    word_ids,
    word_tokenizer,
)
from tca.toy.scoring import firing_overlap, score_layer
from tca.toy.tiny import tiny_tokenizer

SHAPE = PairShape(hidden=64, intermediate=128, layers=4, embed_std=0.3)
PLANTED, UNCHANGED, NOISE = (0, 2), (1,), (3,)


def weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model, read straight from its safetensors files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted pair on 40 documents of pseudo-words: 5 features per planted layer, the last
    two co-firing on a shared word, output directions at cosine 0.3."""
    root = tmp_path_factory.mktemp("planted")
    words = pseudo_words(30, seed=4)
    tokenizer = word_tokenizer(words)
    ids = word_ids(tokenizer, words)
    rng = np.random.default_rng(0)
    with (root / "data.jsonl").open("w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": "".join(" " + words[i] for i in rng.integers(0, len(words), 48))}) + "\n")
    features = [[ids[0]], [ids[1]], [ids[2]], [ids[3], ids[5]], [ids[4], ids[5]]]
    spec = PlantSpec(features={layer: features for layer in PLANTED}, noise_layers=list(NOISE), cosine=0.3)
    pair = build_planted_pair(root / "pair", SHAPE, tokenizer, spec, PlanConfig(data=str(root / "data.jsonl")), seed=3)
    docs = [json.loads(line)["text"] for line in (root / "data.jsonl").read_text().splitlines()]
    return pair, spec, docs


def mlp_inputs_by_hand(model, tokenizer, docs: list[str], layers) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """x of ``layers`` (the post-attention norm's output) and the token ids, flattened in document
    order: one forward of all documents, which are all one token per word and so of one length."""
    xs = {}
    handles = [
        model.model.layers[layer].post_attention_layernorm.register_forward_hook(
            lambda mod, args, out, layer=layer: xs.__setitem__(layer, out.detach().flatten(0, 1)))
        for layer in layers
    ]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] for text in docs])
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return xs, ids.flatten()


def test_planted_activations_match_a_recomputation_from_the_saved_weights(planted):
    pair, spec, docs = planted
    truth = Truth.load(pair.truth)
    tokenizer = AutoTokenizer.from_pretrained(pair.target)
    model = AutoModelForCausalLM.from_pretrained(pair.target, dtype=torch.float32).eval()
    xs, ids = mlp_inputs_by_hand(model, tokenizer, docs, PLANTED)
    w = weights(pair.target)
    assert truth.meta["data"]["n_tokens"] == len(ids)
    for layer in PLANTED:
        meta = truth.meta["layers"][str(layer)]
        slots = [f["slot"] for f in meta["features"]]
        gate, up, down = (w[f"model.layers.{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        x = xs[layer]
        a = F.silu(x @ gate[slots].T) * (x @ up[slots].T) * down[:, slots].norm(dim=0)
        torch.testing.assert_close(truth.acts[layer], a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
        # the recorded directions are the down columns, unit, at the asked pairwise cosine
        v = truth.directions(layer)
        torch.testing.assert_close(v, (down[:, slots] / down[:, slots].norm(dim=0)).T)
        gram = v @ v.T
        torch.testing.assert_close(gram, torch.full_like(gram, spec.cosine).fill_diagonal_(1.0), atol=1e-5, rtol=0)
        # each neuron fires exactly where one of its words is, and the shared word makes two fire
        fires = truth.firing(layer)
        for j, tokens in enumerate(spec.features[layer]):
            assert torch.equal(fires[:, j], torch.isin(ids, torch.tensor(tokens))), (layer, j)
        assert meta["true_l0"] == pytest.approx(float(fires.sum(1).double().mean()))
        assert ((fires[:, 3] & fires[:, 4]).sum() > 0) and ((fires[:, 3] & ~fires[:, 4]).sum() > 0)


def test_target_differs_from_base_only_in_the_changed_mlps(planted):
    pair, _, docs = planted
    wb, wt = weights(pair.base), weights(pair.target)
    assert wb.keys() == wt.keys()
    changed = {n for n in wb if not torch.equal(wb[n], wt[n])}
    assert changed == {f"model.layers.{layer}.mlp.{p}_proj.weight" for layer in PLANTED + NOISE
                       for p in ("gate", "up", "down")}
    # in a planted layer only the planted slots differ, and the base's slots are empty
    truth = Truth.load(pair.truth)
    for layer in PLANTED:
        slots = [f["slot"] for f in truth.meta["layers"][str(layer)]["features"]]
        others = [i for i in range(SHAPE.intermediate) if i not in slots]
        for p in ("gate", "up"):
            name = f"model.layers.{layer}.mlp.{p}_proj.weight"
            assert torch.equal(wb[name][others], wt[name][others]) and not wb[name][slots].any()
        down = f"model.layers.{layer}.mlp.down_proj.weight"
        assert torch.equal(wb[down][:, others], wt[down][:, others]) and not wb[down][:, slots].any()

    tokenizer = AutoTokenizer.from_pretrained(pair.target)
    base = AutoModelForCausalLM.from_pretrained(pair.base, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(pair.target, dtype=torch.float32).eval()
    xs, _ = mlp_inputs_by_hand(target, tokenizer, docs[:4], range(SHAPE.layers))
    with torch.no_grad():
        for layer in UNCHANGED:  # the same input gives bit-identical outputs
            x = xs[layer]
            assert torch.equal(base.model.layers[layer].mlp(x), target.model.layers[layer].mlp(x))
        for layer in PLANTED:  # delta is the planted neurons' outputs
            x = xs[layer]
            delta = target.model.layers[layer].mlp(x) - base.model.layers[layer].mlp(x)
            planted_out = truth.acts[layer][: len(x)] @ truth.directions(layer)
            torch.testing.assert_close(delta, planted_out, rtol=0, atol=1e-5 * float(delta.abs().max()))
        ids = tokenizer(docs[0], return_tensors="pt")["input_ids"]
        base_logits = base(ids).logits
        assert not torch.allclose(target(ids).logits, base_logits)
        # the target with the changed layers' MLPs swapped back is the base, exactly
        for layer in PLANTED + NOISE:
            target.model.layers[layer].mlp.load_state_dict(base.model.layers[layer].mlp.state_dict())
        assert torch.equal(target(ids).logits, base_logits)


def test_sharded_bf16_pair_loads(tmp_path):
    tokenizer = tiny_tokenizer()
    shape = PairShape(hidden=64, intermediate=96, layers=3, heads=4, kv_heads=1, vocab=len(tokenizer) + 37,
                      dtype="bfloat16", shards=3)
    base, target = build_random_pair(tmp_path, shape, tokenizer, seed=5)
    for folder in (base, target):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        assert set(index["weight_map"].values()) == set(files)
        saved = weights(folder)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tokenizer) + 37
        state = model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[n], saved[n]) and saved[n].dtype == torch.bfloat16 for n in saved)
        # tca reads the shards one tensor at a time
        mlp = load_base_mlps(find_model(str(folder)), [1])[1]
        assert torch.equal(mlp.down, saved["model.layers.1.mlp.down_proj.weight"])
        assert AutoTokenizer.from_pretrained(folder)("What is 2 + 3?")["input_ids"] == tokenizer("What is 2 + 3?")["input_ids"]
    wb, wt = weights(base), weights(target)
    # everything moved but the norms, whose 1 + 2e-5 rounds back to 1 in bfloat16
    assert {n for n in wb if torch.equal(wb[n], wt[n])} == {n for n in wb if n.endswith("norm.weight")}
    # the MLPs moved by 0.3 of their spread, the rest by 0.02
    def moved(name: str) -> float:
        return float((wt[name].float() - wb[name].float()).std() / wb[name].float().std())

    assert moved("model.layers.0.mlp.up_proj.weight") == pytest.approx(0.3, rel=0.1)
    assert moved("model.layers.0.self_attn.q_proj.weight") == pytest.approx(0.02, rel=0.1)


def test_the_7b_shape_is_qwen2_7b():
    """The shape another fixture builds: Qwen2.5-7B's parameter count, sized without allocating."""
    config = qwen2_config(QWEN2_7B, tiny_tokenizer())
    assert sum(math.prod(s) for _, s in tensor_shapes(config)) == 7_615_616_512


# ---- scoring -----------------------------------------------------------------------------------


def _truth(n=4, d=16, rows=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(n, d, generator=g), dim=1)
    planted = torch.rand(rows, n, generator=g) < 0.1
    return directions, planted, g


def test_adapter_made_of_the_planted_features_recovers_each_once():
    directions, planted, _ = _truth()
    W_dec = 3.0 * directions
    acts = planted.float() * 2.0
    score = score_layer(directions, planted, W_dec, acts)
    assert score.recovered == [True] * 4 and score.copies == [1] * 4
    assert score.l0 == pytest.approx(float(planted.sum(1).float().mean())) == score.true_l0


def test_duplicates_count_as_copies_and_near_misses_do_not():
    directions, planted, g = _truth()
    # feature 4 duplicates planted 0; feature 5 points at planted 1 but fires on planted 2's rows;
    # feature 6 fires on planted 3's rows with a decoder of cosine 0.85 to it; dead features last
    r = torch.randn(16, generator=g)
    v3_perp = F.normalize(r - (r @ directions[3]) * directions[3], dim=0)
    tilted = 0.85 * directions[3] + math.sqrt(1 - 0.85**2) * v3_perp
    W_dec = torch.cat([directions, directions[:1] * 0.5, directions[1:2], tilted[None], torch.zeros(2, 16)])
    acts = torch.cat([planted.float(), planted[:, :1].float(), planted[:, 2:3].float(), planted[:, 3:4].float(),
                      torch.ones(len(planted), 2)], dim=1)
    score = score_layer(directions, planted, W_dec, acts)
    assert score.copies == [2, 1, 1, 1] and score.recovered == [True] * 4
    assert score.best_cosine[3] == pytest.approx(1.0)
    # zero decoder rows never count as active, however they fire
    assert score.l0_raw - score.l0 == pytest.approx(2.0)
    # without the exact features, planted 1 has only a wrong-firing copy and planted 3 a tilted one
    keep = [0, 4, 5, 6]
    partial = score_layer(directions, planted, W_dec[keep], acts[:, keep])
    assert partial.copies == [2, 0, 0, 0] and partial.recovered == [True, False, False, False]


def test_precision_and_recall_match_brute_force():
    _, planted, g = _truth(n=3, rows=300)
    fires = torch.rand(300, 5, generator=g) < 0.2
    fires[:, 4] = False  # a feature that never fires has precision 0
    precision, recall = firing_overlap(planted, fires)
    P, A = planted.numpy(), fires.numpy()
    for i in range(3):
        for f in range(5):
            both = np.sum(P[:, i] & A[:, f])
            assert precision[i, f] == pytest.approx(both / A[:, f].sum() if A[:, f].sum() else 0.0)
            assert recall[i, f] == pytest.approx(both / P[:, i].sum())
