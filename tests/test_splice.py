"""Splicing: the adapted model against models built independently from the saved pair."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tca.adapted.generation import generate, questions_of
from tca.adapted.splice import adapted_model, set_mode
from tca.toy.tiny import tiny_conversations
from tca.train.adapter import Adapter, AdapterConfig

IDS = torch.tensor([[1, 5, 9, 22, 40, 7, 3, 11, 60, 2], [4, 8, 15, 16, 23, 42, 9, 9, 30, 12]])


def _load(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _independent_hybrid(base_dir, target_dir, dtype=torch.float32):
    """The target with the base model's MLP weights copied in, by plain transformers calls."""
    hybrid, base = _load(target_dir, dtype), _load(base_dir, dtype)
    for layer, base_layer in zip(hybrid.model.layers, base.model.layers, strict=True):
        layer.mlp.load_state_dict(base_layer.mlp.state_dict())
    return hybrid


def _random_adapter(d: int, f: int, seed: int, zero_decoder: bool = False) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    adapter = Adapter(AdapterConfig(d_model=d, n_features=f), g)
    if not zero_decoder:
        with torch.no_grad():
            adapter.b_enc.normal_(0, 0.1, generator=g)
            adapter.W_dec.normal_(0, 0.1, generator=g)
            adapter.b_dec.normal_(0, 0.1, generator=g)
    return adapter.eval()


class ExactDifference(Adapter):
    """Test-only adapter that computes MLP_target(x) − MLP_base(x) exactly.

    Its features are the gated intermediate activations of both MLPs side by side,
    [act(gate_t x) * up_t x, act(gate_b x) * up_b x] (F = 2 · intermediate), and its decoder
    is [down_t^T ; −down_b^T], so the decoded sum is down_t(h_t) − down_b(h_b).
    """

    def __init__(self, target_mlp, base_mlp):
        inter, d = target_mlp.down_proj.weight.shape[1], target_mlp.down_proj.weight.shape[0]
        super().__init__(AdapterConfig(d_model=d, n_features=2 * inter))
        self.target_mlp, self.base_mlp = copy.deepcopy(target_mlp), copy.deepcopy(base_mlp)
        with torch.no_grad():
            self.W_dec.copy_(torch.cat([target_mlp.down_proj.weight.T, -base_mlp.down_proj.weight.T]))
            self.b_dec.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        t, b = self.target_mlp, self.base_mlp
        return torch.cat([t.act_fn(t.gate_proj(x)) * t.up_proj(x), b.act_fn(b.gate_proj(x)) * b.up_proj(x)], -1)


def _exact_adapters(base_dir, target_dir, layers) -> dict[int, Adapter]:
    base, target = _load(base_dir), _load(target_dir)
    return {i: ExactDifference(target.model.layers[i].mlp, base.model.layers[i].mlp).eval() for i in layers}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_decoder_adapters_give_the_independent_hybrid(tiny_pair, dtype):
    base, target = tiny_pair
    d = _load(target).config.hidden_size
    adapters = {i: _random_adapter(d, 48, seed=i, zero_decoder=True) for i in range(4)}
    model = adapted_model(target, base, adapters, dtype=dtype)
    hybrid = _independent_hybrid(base, target, dtype)
    with torch.no_grad():
        ours, theirs = model(IDS).logits, hybrid(IDS).logits
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    set_mode(model, "hybrid")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, theirs, rtol=0, atol=0)


def test_exact_difference_adapters_reproduce_the_target(tiny_pair):
    base, target = tiny_pair
    model = adapted_model(target, base, _exact_adapters(base, target, range(4)))
    with torch.no_grad():
        adapted, target_logits = model(IDS).logits, _load(target)(IDS).logits
        set_mode(model, "hybrid")
        hybrid = model(IDS).logits
    torch.testing.assert_close(adapted, target_logits, rtol=1e-4, atol=1e-4)
    assert (hybrid - target_logits).abs().max() > 1e-2  # the base MLPs really differ


def test_adapters_on_some_layers_only(tiny_pair):
    base, target = tiny_pair
    d = _load(target).config.hidden_size
    adapters = {i: _random_adapter(d, 48, seed=i) for i in (1, 3)}
    model = adapted_model(target, base, adapters)
    reference = _independent_hybrid(base, target)
    for i, a in adapters.items():
        def add(_module, args, out, a=a):
            return out + torch.relu(args[0] @ a.W_enc + a.b_enc) @ a.W_dec + a.b_dec

        reference.model.layers[i].mlp.register_forward_hook(add)
    with torch.no_grad():
        ours, theirs = model(IDS).logits, reference(IDS).logits
        set_mode(model, "hybrid")
        hybrid = model(IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - hybrid).abs().max() > 1e-3  # the two adapters matter
    assert [layer.mlp.adapter is None for layer in model.model.layers] == [True, False, True, False]


def test_generate_with_exact_adapters_reproduces_the_targets_greedy_output(tiny_pair):
    base, target = tiny_pair
    tokenizer = AutoTokenizer.from_pretrained(target)
    questions = questions_of(tiny_conversations(4))
    model = adapted_model(target, base, _exact_adapters(base, target, range(4)))
    ours = generate(model, tokenizer, questions, max_new_tokens=12)
    theirs = generate(_load(target), tokenizer, questions, max_new_tokens=12)
    assert ours == theirs and any(r.ids for r in ours)
    set_mode(model, "hybrid")
    assert generate(model, tokenizer, questions, max_new_tokens=12) != theirs


def test_target_mode_needs_the_kept_target(tiny_pair):
    base, target = tiny_pair
    with pytest.raises(ValueError, match="keep_target"):
        set_mode(adapted_model(target, base, None), "target")
    kept = adapted_model(target, base, None, keep_target=True)
    set_mode(kept, "target")
    with torch.no_grad():
        torch.testing.assert_close(kept(IDS).logits, _load(target)(IDS).logits, rtol=1e-5, atol=1e-5)
