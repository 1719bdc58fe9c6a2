"""Feature interventions against independent computations: zeroed decoder rows, hand-computed
MLP outputs, per-position logits, greedy decoding without a cache, and a direct softmax."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import random_adapter_set
from transformers import AutoModelForCausalLM, AutoTokenizer

from tca import TcaError
from tca.adapted.batches import token_batches
from tca.adapted.evaluate import mode as computing_as
from tca.adapted.generation import generate, questions_of, score
from tca.adapted.intervene import (
    InterventionConfig,
    forward_logits,
    intervention_effect,
    parse_edits,
    run_intervention,
    single_token_ids,
    token_probability,
)
from tca.adapted.splice import FeatureEdit, adapted_model, edits, set_mode
from tca.cache.template import render_deepseek
from tca.cli import main
from tca.train.checkpoint import AdapterSet, save_adapters

D, F, LAYERS = 64, 16, (0, 1, 2, 3)


def random_set(seed: int = 0) -> AdapterSet:
    return random_adapter_set(F, seed=seed, b_enc=-0.5, dec_scale=0.2, d_model=D, layers=LAYERS)


@pytest.fixture(scope="module")
def world(tiny_pair, tiny_data, tmp_path_factory):
    base, target = tiny_pair
    aset = random_set()
    # Feature 3 of layer 1 fires at every position, so ablating it must change the logits.
    aset.adapters[1].b_enc.data[3] = 3.0
    path = save_adapters(tmp_path_factory.mktemp("intervene") / "adapters", aset)
    tok = AutoTokenizer.from_pretrained(target)
    batches = token_batches(str(tiny_data), tok, seq_len=64, max_tokens=500, batch=4)
    records = [json.loads(line) for line in tiny_data.read_text().splitlines()]
    return {"base": base, "target": target, "aset": aset, "path": path, "tok": tok, "batches": batches,
            "records": records, "data": tiny_data}


def _model(world, aset=None):
    return adapted_model(world["target"], world["base"], aset or world["aset"])


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _base_mlp(world, layer):
    return AutoModelForCausalLM.from_pretrained(world["base"]).model.layers[layer].mlp


def _capture(model, layer):
    """The (input, output) of one layer's MLP at the next forward."""
    seen = {}

    def hook(_module, args, out):
        seen["x"], seen["out"] = args[0].detach(), out.detach()

    return seen, model.model.layers[layer].mlp.register_forward_hook(hook)


# ---- parsing -----------------------------------------------------------------------------------


def test_parse_edits_reads_the_documented_syntax():
    got = parse_edits("2:17,40;3:5-7=4.5 ; 0:1=-2", frozenset({9}))
    want = [FeatureEdit(2, [17, 40], 0.0, frozenset({9})), FeatureEdit(3, [5, 6, 7], 4.5, frozenset({9})),
            FeatureEdit(0, [1], -2.0, frozenset({9}))]
    assert got == want


@pytest.mark.parametrize("spec", ["", "2", "2:", "x:1", "2:7-5", "2:1=abc", "2:1,,", "2:-1", "2:1;;3"])
def test_parse_edits_refuses_bad_syntax(spec):
    with pytest.raises(TcaError):
        parse_edits(spec)


def test_single_token_ids(world):
    tok = world["tok"]
    assert single_token_ids(tok, [" Wait", " So"]) == [tok.convert_tokens_to_ids("ĠWait"), tok.convert_tokens_to_ids("ĠSo")]
    with pytest.raises(TcaError, match="not a single token"):
        single_token_ids(tok, ["Wait"])  # no leading space: two tokens in this vocabulary


# ---- the edits ---------------------------------------------------------------------------------


def test_ablation_equals_removing_the_decoder_row(world):
    layer, f = 1, 3
    model = _model(world)
    removed = copy.deepcopy(world["aset"])
    removed.adapters[layer].W_dec.data[f] = 0
    reference = _model(world, removed)
    for batch in world["batches"]:
        plain = _logits(model, batch)
        with edits(model, [FeatureEdit(layer, [f])]):
            ablated = _logits(model, batch)
        want = _logits(reference, batch)
        torch.testing.assert_close(ablated, want, rtol=1e-5, atol=1e-5)
        real = batch.attention_mask.bool()
        assert (plain - ablated).abs().amax(-1)[real].min() > 1e-4  # the feature fires everywhere: every logit moves


@pytest.mark.parametrize("mode", ["adapted", "hybrid"])
def test_clamp_sets_the_activation(world, mode):
    layer, f, value = 2, 5, 2.5
    model = _model(world)
    set_mode(model, mode)
    ad = world["aset"].adapters[layer]
    base_mlp = _base_mlp(world, layer)
    batch = world["batches"][0]
    seen, handle = _capture(model, layer)
    others = {i: _capture(model, i) for i in LAYERS if i != layer}
    with edits(model, [FeatureEdit(layer, [f], value)]):
        _logits(model, batch)
    handle.remove()
    with torch.no_grad():
        x = seen["x"]
        if mode == "adapted":
            acts = torch.relu(x @ ad.W_enc + ad.b_enc)
            acts[..., f] = value
            want = base_mlp(x) + acts @ ad.W_dec + ad.b_dec
        else:  # the hybrid adds value * W_dec[f] and nothing else, on this layer only
            want = base_mlp(x) + value * ad.W_dec[f]
        torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-5)
        if mode == "hybrid":
            for i, (other, h) in others.items():
                h.remove()
                torch.testing.assert_close(other["out"], _base_mlp(world, i)(other["x"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["adapted", "hybrid"])
def test_relative_edit_scales_the_feature_where_it_fires(world, mode):
    layer, scale = 1, 2.5
    ad = world["aset"].adapters[layer]
    model = _model(world)
    set_mode(model, mode)
    base_mlp = _base_mlp(world, layer)
    batch = world["batches"][0]
    seen, handle = _capture(model, layer)
    with edits(model, [FeatureEdit(layer, [3, 6], scale, relative=True)]):
        _logits(model, batch)
    handle.remove()
    with torch.no_grad():
        x = seen["x"]
        acts = torch.relu(x @ ad.W_enc + ad.b_enc)
        scaled = acts[..., [3, 6]] * scale
        assert (acts[..., 6] == 0).any() and (acts[..., 6] > 0).any()  # the draw fires at some positions only
        if mode == "adapted":
            acts[..., [3, 6]] = scaled
            want = base_mlp(x) + acts @ ad.W_dec + ad.b_dec
        else:  # the hybrid decodes the scaled features alone, without the decoder bias
            want = base_mlp(x) + scaled @ ad.W_dec[[3, 6]]
        torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="during a forward"):
        model.model.layers[layer].mlp.encoded()


def test_token_restricted_edits_change_only_those_positions(world):
    tok = world["tok"]
    (so,) = single_token_ids(tok, [" So"])
    model = _model(world)
    for layer in (3, 0):
        edit = FeatureEdit(layer, [2, 7], 3.0, frozenset({so}))
        for batch in world["batches"]:
            plain = _logits(model, batch)
            with edits(model, [edit]):
                edited = _logits(model, batch)
            moved = (plain - edited).abs().amax(-1)
            real = batch.attention_mask.bool()
            hit = (batch.input_ids == so) & real
            assert hit.any()
            if layer == 3:  # the last layer: only the edited positions themselves can change
                assert moved[hit].min() > 1e-4
                assert moved[real & ~hit].max() == 0
            else:  # earlier layers reach later positions through attention, never earlier ones
                before_first = torch.cumsum(hit.int(), 1) == 0
                assert moved[real & before_first].max() == 0
                assert moved[hit].min() > 1e-4


def test_edits_apply_under_generate(world):
    """Cached generation with a token-restricted clamp equals greedy decoding without a cache."""
    tok, model = world["tok"], _model(world)
    records = world["records"][:2]
    evens = frozenset(range(0, len(tok), 2))
    chosen = [FeatureEdit(1, [0, 4], 6.0, evens), FeatureEdit(3, [9], 4.0)]
    n_new = 6
    plain = generate(model, tok, questions_of(records), max_new_tokens=n_new, batch_size=1)
    with edits(model, chosen):
        cached = generate(model, tok, questions_of(records), max_new_tokens=n_new, batch_size=1)
        for question, got in zip(questions_of(records), cached):
            response, ended = _greedy_without_cache(lambda ids: model(ids).logits, tok, question, n_new)
            assert got.ids == response and got.truncated is not ended
    assert cached != plain  # the edits change what is generated


@torch.no_grad()
def _greedy_without_cache(logits_of, tok, question: str, n_new: int) -> tuple[list[int], bool]:
    """Greedy decoding that recomputes the whole sequence each step; whether it ended."""
    ids = tok(render_deepseek(question), add_special_tokens=False)["input_ids"]
    response = []
    for _ in range(n_new):
        nxt = int(logits_of(torch.tensor([ids + response]))[0, -1].argmax())
        if nxt == tok.eos_token_id:
            return response, True
        response.append(nxt)
    return response, False


PATCHES = {1: ([3, 6], 2.0), 3: ([9], 4.0)}
"""layer -> (features, scale) of the patched-mode tests."""


@torch.no_grad()
def _patched_reference(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the hybrid with each patched feature added by a plain forward hook, at scale times
    the activation the adapted model gives it on the same tokens (taken from a separate adapted run)."""
    mlps = {layer: model.model.layers[layer].mlp for layer in PATCHES}
    inputs, handles = {}, []
    for layer, mlp in mlps.items():
        handles.append(mlp.register_forward_hook(lambda _m, args, _o, layer=layer: inputs.__setitem__(layer, args[0])))
    set_mode(model, "adapted")
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    for layer, (features, scale) in PATCHES.items():
        ad = mlps[layer].adapter
        source = ad.encode(inputs[layer])[..., features]

        def add(_m, _args, out, ad=ad, source=source, features=features, scale=scale):
            return out + scale * source @ ad.W_dec[features]
        handles.append(mlps[layer].register_forward_hook(add))
    set_mode(model, "hybrid")
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()


def _patches() -> list[FeatureEdit]:
    return [FeatureEdit(layer, features, scale, relative=True) for layer, (features, scale) in PATCHES.items()]


def test_patched_mode_takes_each_features_activation_from_the_adapted_model(world):
    model = _model(world)
    for batch in world["batches"][:2]:
        want = _patched_reference(model, batch.input_ids, batch.attention_mask)
        with computing_as(model, "patched"), edits(model, _patches()):
            got = forward_logits(model, batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with computing_as(model, "patched"):  # without edits the patched copy is the hybrid
            torch.testing.assert_close(forward_logits(model, batch), _hybrid_logits(model, batch), rtol=1e-5,
                                       atol=1e-5)
        assert not torch.allclose(got, _hybrid_logits(model, batch), atol=1e-4)


@torch.no_grad()
def _hybrid_logits(model, batch):
    with computing_as(model, "hybrid"):
        return _logits(model, batch)


def test_patched_generation_equals_greedy_decoding_of_the_reference(world):
    """Cached patched generation (each prompt twice in the batch, the adapted copy following the
    patched copy) equals greedy decoding without a cache of the hook-based reference."""
    tok, model = world["tok"], _model(world)
    records, n_new = world["records"][:2], 6
    with computing_as(model, "hybrid"):
        hybrid = generate(model, tok, questions_of(records), max_new_tokens=n_new, batch_size=1)
    with computing_as(model, "patched"), edits(model, _patches()):
        patched = generate(model, tok, questions_of(records), max_new_tokens=n_new, batch_size=1)
    for question, got in zip(questions_of(records), patched, strict=True):
        response, ended = _greedy_without_cache(lambda ids: _patched_reference(model, ids), tok, question, n_new)
        assert got.ids == response and got.truncated is not ended
    assert patched != hybrid  # the patch changes what is generated


def test_patched_mode_needs_the_batch_twice(world):
    model = _model(world)
    set_mode(model, "patched")
    with pytest.raises(ValueError, match="even"):
        model(torch.tensor([[1, 2, 3]]))


# ---- measuring ---------------------------------------------------------------------------------


def _direct_probability(model, world, token_ids):
    """Each document alone, unpadded: the mean over its positions of softmax mass on token_ids."""
    total = count = 0
    with torch.no_grad():
        for batch in world["batches"]:
            for row, mask in zip(batch.input_ids, batch.attention_mask):
                ids = row[mask.bool()][None]
                probs = torch.softmax(model(ids).logits[0].double(), -1)
                total += probs[:, token_ids].sum().item()
                count += ids.shape[1]
    return total / count


def test_token_probability_is_the_mean_softmax_mass(world):
    model = _model(world)
    ids = single_token_ids(world["tok"], [" Wait", " So"])
    assert token_probability(model, world["batches"], ids) == pytest.approx(_direct_probability(model, world, ids), rel=1e-5)


def test_probability_at_the_positions_a_model_predicts_the_token(world):
    from tca.adapted.intervene import predicted_positions

    model = adapted_model(world["target"], world["base"], world["aset"], keep_target=True)
    with computing_as(model, "target"), torch.no_grad():
        # a random target predicts few words; take the one it predicts most, and one other
        predicted = torch.cat([_logits(model, b).argmax(-1)[b.attention_mask.bool()] for b in world["batches"]])
    ids = [int(predicted.mode().values), single_token_ids(world["tok"], [" Wait"])[0]]
    with computing_as(model, "target"):
        positions = predicted_positions(model, world["batches"], ids)
    total = count = 0
    with torch.no_grad():
        for batch in world["batches"]:
            for row, mask in zip(batch.input_ids, batch.attention_mask):
                x = row[mask.bool()][None]
                with computing_as(model, "target"):
                    chosen = torch.isin(model(x).logits[0].argmax(-1), torch.tensor(ids))
                probs = torch.softmax(model(x).logits[0].double(), -1)[chosen]
                total += probs[:, ids].sum().item()
                count += int(chosen.sum())
    assert count > 0 and sum(int(p.sum()) for p in positions) == count
    assert token_probability(model, world["batches"], ids, positions) == pytest.approx(total / count, rel=1e-5)


def test_intervention_effect_before_and_after(world):
    model, tok = _model(world), world["tok"]
    ids = single_token_ids(tok, [" Wait"])
    chosen = [FeatureEdit(1, [3]), FeatureEdit(2, [1], 5.0)]
    records = world["records"][:3]
    # count as hesitations the word the unedited model writes most, so the count is not zero
    texts = [tok.decode(r.ids) for r in generate(model, tok, questions_of(records), max_new_tokens=5)]
    written = [w for t in texts for w in re.findall(r"\w+", t)]
    words = [max(set(written), key=written.count)]
    effect = intervention_effect(model, tok, world["batches"], records, chosen, "adapted", ids, 3, 5, batch_size=2,
                                 words=words)
    assert effect.p_before == pytest.approx(_direct_probability(model, world, ids), rel=1e-5)
    with edits(model, chosen):
        assert effect.p_after == pytest.approx(_direct_probability(model, world, ids), rel=1e-5)
        after = score(tok, records, generate(model, tok, questions_of(records), max_new_tokens=5, batch_size=2),
                      words)
    assert effect.p_after != pytest.approx(effect.p_before, rel=1e-3)
    assert effect.after == after
    assert effect.before == score(tok, records, generate(model, tok, questions_of(records), max_new_tokens=5),
                                  words)
    assert effect.before.hesitations == pytest.approx(written.count(words[0]) / len(records)) and written
    # KL(before || after) per position, computed on each document alone
    kl = n = 0
    with torch.no_grad():
        for batch in world["batches"]:
            for row, mask in zip(batch.input_ids, batch.attention_mask):
                x = row[mask.bool()][None]
                p = torch.log_softmax(model(x).logits[0].double(), -1)
                with edits(model, chosen):
                    q = torch.log_softmax(model(x).logits[0].double(), -1)
                kl += (p.exp() * (p - q)).sum().item()
                n += x.shape[1]
    assert effect.n_positions == n
    assert effect.kl == pytest.approx(kl / n, rel=1e-4)

    set_mode(model, "hybrid", [2])
    intervention_effect(model, tok, world["batches"], [], chosen, "hybrid", ids, 0, 1)
    assert [model.model.layers[i].mlp.mode for i in LAYERS] == ["adapted", "adapted", "hybrid", "adapted"]


def test_hybrid_clamp_effect_is_the_clamped_hybrid(world):
    model, tok = _model(world), world["tok"]
    ids = single_token_ids(tok, [" So"])
    chosen = [FeatureEdit(2, [4], 8.0)]
    effect = intervention_effect(model, tok, world["batches"], [], chosen, "hybrid", ids, 0, 1)
    set_mode(model, "hybrid")
    assert effect.p_before == pytest.approx(_direct_probability(model, world, ids), rel=1e-5)
    with edits(model, chosen):
        assert effect.p_after == pytest.approx(_direct_probability(model, world, ids), rel=1e-5)
    assert effect.p_after != pytest.approx(effect.p_before, rel=1e-3)


# ---- the command -------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _args(world, *extra):
    return ["intervene", "--adapters", world["path"], "--base", world["base"], "--target", world["target"],
            "--data", world["data"], "--device", "cpu", "--max-tokens", 300, "--batch", 4, "--measure", " Wait", *extra]


def test_intervene_refuses_empty_words_before_loading(world, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tca.adapted.intervene.load_adapted", loaded)
    cfg = InterventionConfig(adapters=str(world["path"]), base=str(world["base"]), target=str(world["target"]),
                             data=str(world["data"]), edits="1:3", words=[""], device="cpu")
    with pytest.raises(TcaError, match="no hesitation words"):
        run_intervention(cfg)


def test_cli_intervene_json(world):
    res = _run(*_args(world, "--edit", "1:3;2:1=5", "--measure", " Wait, So", "--at-tokens", " So",
                      "--generate", 2, "--max-new-tokens", 4, "--json"))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    (so,) = single_token_ids(world["tok"], [" So"])
    assert out["edits"] == [
        {"layer": 1, "features": [3], "value": 0.0, "token_ids": [so], "relative": False},
        {"layer": 2, "features": [1], "value": 5.0, "token_ids": [so], "relative": False},
    ]
    effect = out["effect"]
    assert out["measure"] == [" Wait", " So"] and effect["before"]["n"] == 2
    model = _model(world)
    batches = token_batches(str(world["data"]), world["tok"], seq_len=1024, max_tokens=300, batch=4)
    ids = single_token_ids(world["tok"], [" Wait", " So"])
    assert effect["p_before"] == pytest.approx(token_probability(model, batches, ids), rel=1e-5)
    with edits(model, parse_edits("1:3;2:1=5", frozenset({so}))):
        assert effect["p_after"] == pytest.approx(token_probability(model, batches, ids), rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--edit", "1:3=x"], "is not a number"),
    (["--edit", "1;2"], "cannot read the edit"),
    (["--edit", f"1:{F}"], f"feature {F} is out of range"),
    (["--edit", "7:1"], "no adapter at layer 7"),
    (["--edit", "1:3", "--measure", "Wait"], "not a single token"),
    (["--edit", "1:3", "--at-tokens", "zzqq"], "not a single token"),
])
def test_cli_intervene_bad_input(world, extra, message):
    res = _run(*_args(world, *extra, "--generate", 0))
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == errors[0]  # one line, the last one (model loading logs above)
