"""`tca eval`: KL, NMSE and the gap arithmetic against direct calculations, and the command."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer

from tca import TcaError
from tca.adapted.batches import batches_of, pad_id_of, tokenize_documents
from tca.adapted.evaluate import (
    EvalConfig,
    behaviour,
    evaluate,
    fraction_closed,
    kl_and_nmse,
    mode,
    recovered,
    recovery,
)
from tca.adapted.generation import Figures, Response, generate, questions_of, score
from tca.adapted.splice import adapted_mlps, adapted_model, set_mode
from tca.cache.template import THINK_CLOSE, render_deepseek
from tca.cli import main
from tca.toy.tiny import tiny_conversations
from tca.train.adapter import Adapter, AdapterConfig
from tca.train.checkpoint import AdapterSet, save_adapters

D, F = 64, 48


def _adapters(path, layers=(0, 1, 2, 3), d=D) -> AdapterSet:
    cfg = AdapterConfig(d_model=d, n_features=F)
    adapters = {}
    for layer in layers:
        g = torch.Generator().manual_seed(layer)
        adapter = Adapter(cfg, g)
        with torch.no_grad():
            adapter.b_enc.normal_(0, 0.1, generator=g)
            adapter.W_dec.normal_(0, 0.05, generator=g)
        adapters[layer] = adapter.eval()
    aset = AdapterSet(adapters, cfg)
    save_adapters(path, aset)
    return aset


@pytest.fixture(scope="module")
def spliced(tiny_pair, tmp_path_factory):
    base, target = tiny_pair
    aset = _adapters(tmp_path_factory.mktemp("adapters") / "set")
    return adapted_model(target, base, aset, keep_target=True), AutoTokenizer.from_pretrained(target)


def _direct(model, rows: list[list[int]]):
    """Per mode: summed KL(target ‖ mode) and, per layer, summed squared error and squared
    target norm of the decoder layers' outputs, each row run alone (no padding at all)."""
    n_layers = len(model.model.layers)
    kl = {"hybrid": 0.0, "adapted": 0.0}
    err = {m: [0.0] * n_layers for m in kl}
    norm = [0.0] * n_layers
    for row in rows:
        ids = torch.tensor([row])
        runs = {}
        for name in ("target", "hybrid", "adapted"):
            outs = []
            hooks = [layer.register_forward_hook(lambda _m, _a, o: outs.append(o[0].double()))
                     for layer in model.model.layers]
            set_mode(model, name)
            with torch.no_grad():
                logits = model(ids).logits[0].double()
            for h in hooks:
                h.remove()
            runs[name] = (logits, outs)
        p = torch.softmax(runs["target"][0], -1)
        for layer in range(n_layers):
            norm[layer] += runs["target"][1][layer].square().sum().item()
        for name in kl:
            q = torch.softmax(runs[name][0], -1)
            kl[name] += (p * (p.log() - q.log())).sum().item()
            for layer in range(n_layers):
                err[name][layer] += (runs[name][1][layer] - runs["target"][1][layer]).square().sum().item()
    set_mode(model, "adapted")
    return kl, err, norm


def test_kl_and_nmse_match_a_direct_calculation_over_real_tokens(spliced, tiny_data):
    model, tokenizer = spliced
    docs = tokenize_documents(tiny_data, tokenizer, seq_len=40, max_tokens=400)
    batches = batches_of(docs, 3, pad_id_of(tokenizer))
    assert any((b.attention_mask == 0).any() for b in batches)  # padding is there to be masked
    got = kl_and_nmse(model, batches)

    kl, err, norm = _direct(model, docs)
    tokens = sum(len(d) for d in docs)
    assert got.tokens == tokens
    # the tiny pair's KLs are ~1e-4 nats, computed in float32 by tca and float64 here: rel 1e-3;
    # counting the padded positions would move them by far more
    assert got.kl_hybrid == pytest.approx(kl["hybrid"] / tokens, rel=1e-3)
    assert got.kl_adapted == pytest.approx(kl["adapted"] / tokens, rel=1e-3)
    assert got.fraction_closed == pytest.approx(1 - kl["adapted"] / kl["hybrid"], rel=1e-3)
    for layer in range(4):
        assert got.nmse_hybrid[layer] == pytest.approx(err["hybrid"][layer] / norm[layer], rel=1e-4)
        assert got.nmse_adapted[layer] == pytest.approx(err["adapted"][layer] / norm[layer], rel=1e-4)
    assert got.kl_hybrid > 0 and got.kl_adapted != got.kl_hybrid
    assert all(m.mode == "adapted" for m in adapted_mlps(model).values())  # modes restored


def test_mode_restores_each_layers_mode(spliced):
    model, _ = spliced
    set_mode(model, "hybrid", [1])
    with mode(model, "target"):
        assert {m.mode for m in adapted_mlps(model).values()} == {"target"}
    assert [m.mode for m in adapted_mlps(model).values()] == ["adapted", "hybrid", "adapted", "adapted"]
    set_mode(model, "adapted")


def test_gap_arithmetic():
    assert fraction_closed(0.25, 2.0) == pytest.approx(1 - 0.25 / 2.0)
    assert fraction_closed(0.0, 0.0) is None
    assert recovered(0.9, 0.1, 0.5) == pytest.approx((0.5 - 0.1) / (0.9 - 0.1))
    assert recovered(0.3, 0.3, 0.5) is None and recovered(None, 0.1, 0.2) is None

    target, hybrid = Figures(0.9, 80.0, 0.0, 3.0, 1.0, 10), Figures(0.2, 5.0, 0.0, 0.0, 0.0, 10)
    adapted = Figures(0.6, 40.0, 0.0, 1.5, 0.5, 10)
    r = recovery({"target": target, "hybrid": hybrid, "adapted": adapted})
    assert r.accuracy_gain_recovered == pytest.approx((0.6 - 0.2) / (0.9 - 0.2))
    assert r.hesitation_gain_recovered == pytest.approx((1.5 - 0.0) / (3.0 - 0.0))
    assert r.length_ratio == pytest.approx(40.0 / 80.0)
    none = recovery({"target": Figures(None, 0.0, 0.0, 0, 0, 1), "hybrid": hybrid, "adapted": adapted})
    assert none.accuracy_gain_recovered is None and none.length_ratio is None


def test_accuracy_counts_matching_final_answers(spliced):
    _, tokenizer = spliced
    records = tiny_conversations(6)
    truths = [r["conversations"][1]["value"].rsplit(THINK_CLOSE, 1)[1].strip() for r in records]
    texts = [f"think {THINK_CLOSE}\n\n{t if i % 3 else 'wrong'}" for i, t in enumerate(truths)]
    responses = [Response(tokenizer(t, add_special_tokens=False)["input_ids"], False) for t in texts]
    figures = score(tokenizer, records, responses)
    correct = sum(tokenizer.decode(r.ids).rsplit(THINK_CLOSE, 1)[1].strip() == t for r, t in zip(responses, truths))
    assert figures.accuracy == pytest.approx(correct / len(records)) and 0 < correct < len(records)
    assert figures.truncated == 0


def test_behaviour_runs_each_mode(spliced):
    model, tokenizer = spliced
    records = tiny_conversations(3)
    figures = behaviour(model, tokenizer, records, max_new_tokens=6)
    assert list(figures) == ["target", "hybrid", "adapted"]
    for name, f in figures.items():
        set_mode(model, name)
        direct = score(tokenizer, records, generate(model, tokenizer, questions_of(records), max_new_tokens=6))
        assert f == direct, name
    set_mode(model, "adapted")


def _greedy(model, tokenizer, question: str, n: int, stops: set[int]) -> tuple[list[int], bool]:
    """Greedy decoding without a cache or padding: the tokens before the first stop token, and
    whether none came within ``n`` tokens."""
    ids = tokenizer(render_deepseek(question), add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in stops:
                return out, False
            out.append(nxt)
    return out, True


def test_generation_stops_at_every_stop_token_and_counts_truncation(spliced, monkeypatch):
    model, tokenizer = spliced
    records = tiny_conversations(5)
    questions = questions_of(records)
    # make a token the model writes for the first question, but not for every question, a stop
    # token, as a model's generation config may name stop tokens beyond the tokenizer's own
    plain = [_greedy(model, tokenizer, q, 8, {tokenizer.eos_token_id})[0] for q in questions]
    stop = next(t for t in plain[0][1:] if any(t not in ids for ids in plain[1:]))
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop)
    stops = {tokenizer.eos_token_id, stop}
    got = generate(model, tokenizer, questions, max_new_tokens=8, batch_size=2)
    want = [_greedy(model, tokenizer, q, 8, stops) for q in questions]
    assert [(r.ids, r.truncated) for r in got] == want
    assert not got[0].truncated and any(r.truncated for r in got)
    assert all(len(r.ids) == 8 for r in got if r.truncated)
    figures = score(tokenizer, records, got)
    assert figures.truncated == pytest.approx(sum(t for _, t in want) / len(records))
    assert figures.mean_length == pytest.approx(sum(len(ids) for ids, _ in want) / len(records))


def test_behaviour_counts_the_given_words(spliced):
    model, tokenizer = spliced
    records = tiny_conversations(4)
    texts = [tokenizer.decode(r.ids) for r in generate(model, tokenizer, questions_of(records), max_new_tokens=12)]
    words = [re.findall(r"\w+", t) for t in texts]
    common = max({w for ws in words for w in ws}, key=lambda w: sum(ws.count(w) for ws in words))
    figures = behaviour(model, tokenizer, records, ["adapted"], max_new_tokens=12, words=[common])["adapted"]
    expected = sum(ws.count(common) for ws in words) / len(records)
    assert figures.hesitations == pytest.approx(expected) and expected > 0
    assert figures.hesitating == pytest.approx(sum(common in ws for ws in words) / len(records))


def test_eval_refuses_empty_words_before_loading(tiny_pair, tiny_data, tmp_path, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("tca.adapted.evaluate.load_adapted", loaded)
    _adapters(tmp_path / "set")
    cfg = EvalConfig(adapters=str(tmp_path / "set"), base=str(tiny_pair[0]), target=str(tiny_pair[1]),
                     data=str(tiny_data), generate=2, words=[" "], device="cpu")
    with pytest.raises(TcaError, match="no hesitation words"):
        evaluate(cfg)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_command_json_matches_the_python_api(tiny_pair, tiny_data, tmp_path):
    base, target = tiny_pair
    _adapters(tmp_path / "set", layers=(0, 2))
    args = dict(adapters=str(tmp_path / "set"), base=str(base), target=str(target), data=str(tiny_data),
                max_tokens=200, seq_len=32, batch=4, generate=3, max_new_tokens=6, device="cpu", layers="2")
    res = _run("eval", "--adapters", args["adapters"], "--base", base, "--target", target, "--data", tiny_data,
               "--max-tokens", 200, "--seq-len", 32, "--batch", 4, "--generate", 3, "--max-new-tokens", 6,
               "--device", "cpu", "--layers", 2, "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    report = evaluate(EvalConfig(**args))
    assert got["layers"] == report.layers == [2]
    f = report.faithfulness
    assert got["faithfulness"]["kl_adapted"] == pytest.approx(f.kl_adapted)
    assert got["faithfulness"]["fraction_closed"] == pytest.approx(f.fraction_closed)
    assert got["faithfulness"]["nmse_adapted"] == {str(k): pytest.approx(v) for k, v in f.nmse_adapted.items()}
    for below in ("0", "1"):  # below the only adapter the adapted model is the hybrid
        assert got["faithfulness"]["nmse_adapted"][below] == got["faithfulness"]["nmse_hybrid"][below] > 0
    assert got["behaviour"]["adapted"]["n"] == 3
    assert got["recovery"]["length_ratio"] == pytest.approx(report.recovery.length_ratio)

    table = _run("eval", "--adapters", args["adapters"], "--base", base, "--target", target, "--data", tiny_data,
                 "--max-tokens", 100, "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert "KL(target || adapted)" in table.stdout and "| 3 |" in table.stdout


@pytest.mark.parametrize("case", ["width", "layers", "missing", "empty", "no-such-layer"])
def test_eval_command_refuses_bad_input(tiny_pair, tmp_path, tiny_data, case):
    base, target = tiny_pair
    adapters, data = tmp_path / "set", tiny_data
    extra = []
    if case == "width":
        _adapters(adapters, d=32)
    elif case == "layers":
        _adapters(adapters, layers=(0, 7))
    elif case == "missing":
        adapters = tmp_path / "nowhere"
    elif case == "empty":
        _adapters(adapters)
        data = tmp_path / "empty.jsonl"
        data.write_text("")
    else:
        _adapters(adapters, layers=(0,))
        extra = ["--layers", "1"]
    res = _run("eval", "--adapters", adapters, "--base", base, "--target", target, "--data", data,
               "--device", "cpu", *extra)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1 and "Traceback" not in res.output
