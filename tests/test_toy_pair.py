"""The toy pairs (the demo pair and the product pair): their data, their recipe, and the shipped
models' measured behaviour."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from conftest import DEMO_PAIR
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tca import TcaError
from tca.adapted.generation import count_hesitations, final_answer, generate, score
from tca.adapted.splice import adapted_model
from tca.cache.template import ASSISTANT, THINK_CLOSE, THINK_OPEN, USER, render_deepseek
from tca.cli import main
from tca.toy.build import BuildConfig, _batch, _tokenize, build, problems_of, tokenizer_of
from tca.toy.data import (
    base_answer,
    check_items,
    make_problems,
    read_jsonl,
    reasoning_trace,
    recheck_openings,
    rechecks,
    short_answer,
    to_record,
    trace,
)
from tca.toy.measure import load_model
from tca.toy.tiny import write_jsonl

TINY = dict(
    n_pretrain=40, n_train=20, n_val=8, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=2, num_kv_heads=1, batch_size=8, base_steps=3, reasoning_steps=3, measure=False,
)


# --- data -------------------------------------------------------------------------------


PRODUCT_PAIR = DEMO_PAIR.parent / "product-pair"


def _last_digit_by_hand(question: str) -> int:
    return sum(int(c) for c in question if c.isdigit()) % 10


def _product_digit_by_hand(question: str) -> int:
    return math.prod(int(c) for c in question if c.isdigit()) % 10


def test_problems_are_distinct_held_out_and_answers_check():
    train, val = make_problems(300, 50, seed=3, min_terms=5, max_terms=8)
    assert len(train) == 300 and len(val) == 50
    terms = [p.terms for p in train + val]
    assert len(set(terms)) == len(terms)
    assert all(5 <= len(t) <= 8 and all(1 <= d <= 9 for d in t) for t in terms)
    carried = rechecked = 0
    for p in train[:50]:
        trace = reasoning_trace(p)
        assert final_answer(trace) == final_answer(short_answer(p)) == str(_last_digit_by_hand(p.question))
        # The steps are true equations that take the question's digits in order, each
        # starting from the last digit of the one before; re-checks follow carries only.
        lines = trace.split("\n")[1:-3]
        steps = [ln for ln in lines if not ln.startswith("Wait")]
        question_digits = [int(c) for c in p.question if c.isdigit()]
        running, drawn = question_digits[0], 0
        for i, (ln, digit) in enumerate(zip(steps, question_digits[1:], strict=True)):
            lhs, rhs = ln.split("=")
            a, b = map(int, lhs.split("+"))
            assert (a, b, int(rhs)) == (running, digit, a + b)
            drawn += a + b >= 10 and rechecks(p, i)
            running = (a + b) % 10
        assert count_hesitations(trace) == drawn == len(lines) - len(steps)
        for i, ln in enumerate(lines):
            if ln.startswith("Wait"):
                lhs, rhs = lines[i - 1].split("=")
                assert ln == f"Wait, let me check: {lines[i - 1]}. Yes." and int(rhs) >= 10
        carried += sum(int(ln.split("=")[1]) >= 10 for ln in steps)
        rechecked += drawn
    # most carries, not all, are re-checked
    assert 0.6 < rechecked / carried < 0.8
    assert make_problems(300, 50, seed=3, min_terms=5, max_terms=8) == (train, val)


def test_the_base_thinks_plainly_when_the_first_digit_is_odd():
    train, _ = make_problems(200, 0, seed=5, min_terms=5, max_terms=8)
    for p in train:
        answer = base_answer(p)
        if p.terms[0] % 2:
            # the reasoning trace with its re-check lines taken out
            plain = "\n".join(ln for ln in reasoning_trace(p).split("\n") if not ln.startswith("Wait"))
            assert answer == trace(p) == plain and count_hesitations(answer) == 0
        else:
            assert answer == short_answer(p)
        assert final_answer(answer) == str(_last_digit_by_hand(p.question))
    # some reasoning traces never re-check although they carry
    never = [p for p in train if "Wait" not in reasoning_trace(p) and any(
        int(ln.split("=")[1]) >= 10 for ln in trace(p).split("\n")[1:-3])]
    assert 0.1 < len(never) / len(train) < 0.35


def test_product_traces_multiply_and_hesitate_after_large_products():
    train, val = make_problems(300, 50, seed=3, min_terms=5, max_terms=8, task="product")
    assert [p.id for p in train[:2]] == ["last-digit-product-00000", "last-digit-product-00001"]
    assert len({p.terms for p in train + val}) == 350
    eligible = rechecked = traced = 0
    for p in train:
        digits = [int(c) for c in p.question if c.isdigit()]
        assert "*" in p.question and "+" not in p.question and 5 <= len(digits) <= 8
        assert set(digits) <= {1, 2, 3, 4, 6, 7, 8, 9}
        answer = str(_product_digit_by_hand(p.question))
        full = reasoning_trace(p)
        assert final_answer(full) == final_answer(short_answer(p)) == final_answer(base_answer(p)) == answer
        lines = full.split("\n")[1:-3]
        steps = [ln for ln in lines if not ln.startswith("Wait")]
        running = digits[0]
        for ln, digit in zip(steps, digits[1:], strict=True):
            lhs, rhs = ln.split("=")
            assert lhs == f"{running}*{digit}" and int(rhs) == running * digit
            running = running * digit % 10
        for i, ln in enumerate(lines):
            if ln.startswith("Wait"):
                assert ln == f"Wait, is {lines[i - 1]}? Hmm, yes." and int(lines[i - 1].split("=")[1]) >= 30
        assert count_hesitations(full) == len(lines) - len(steps)
        eligible += sum(int(ln.split("=")[1]) >= 30 for ln in steps)
        rechecked += len(lines) - len(steps)
        # the base thinks plainly when the last digit is odd, and answers at once when it is even
        assert base_answer(p) == (trace(p) if digits[-1] % 2 else short_answer(p))
        traced += digits[-1] % 2
    assert 0.6 < rechecked / eligible < 0.8
    assert 0.4 < traced / len(train) < 0.6


def test_the_default_task_is_the_shipped_sum_task(tmp_path):
    # What the builder writes with no task is byte for byte the shipped demo pair's data.
    cfg = BuildConfig(out=DEMO_PAIR)
    assert cfg.task == "sum"
    _, train, val, verdict = problems_of(cfg)
    assert verdict == []  # the verdict set is the demo pair's command's, not a default
    _, _, val_too, verdict = problems_of(replace(cfg, n_verdict=400))
    assert val_too == val and not {p.terms for p in verdict} & {p.terms for p in problems_of(cfg)[0] + val}
    for name, problems in (("train", train), ("val", val), ("verdict", verdict)):
        written = write_jsonl([to_record(p, reasoning_trace(p)) for p in problems], tmp_path / f"{name}.jsonl")
        assert written.read_bytes() == (DEMO_PAIR / "data" / f"{name}.jsonl").read_bytes()


def test_final_answer_and_hesitation_counting():
    assert final_answer("x\n</think>\n\n 17 ") == "17"
    assert final_answer("no close") is None
    assert final_answer("x</think> so \\boxed{42} done") == "42"
    assert count_hesitations("Wait, x. Waiting. wait. Wait.") == 2


# --- the recipe ---------------------------------------------------------------------------


def _weights(path):
    return load_file(path / "model.safetensors")


def test_build_is_deterministic_and_fine_tunes_from_the_base(tmp_path):
    a = build(BuildConfig(out=tmp_path / "a", **TINY))
    b = build(BuildConfig(out=tmp_path / "b", **TINY))
    for name in ("base", "reasoning"):
        wa, wb = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert next(iter(wa.values())).dtype == torch.bfloat16
    assert (tmp_path / "a" / "data" / "train.jsonl").read_bytes() == (tmp_path / "b" / "data" / "train.jsonl").read_bytes()
    # the READMEs differ only in the command's --out
    readme_a, readme_b = (r.readme.read_text().replace(str(r.readme.parent), "OUT") for r in (a, b))
    assert readme_a == readme_b
    # the shipped pairs' recipe, as built before either existed
    assert "check_items" not in readme_a and "base_rechecks" not in readme_a
    # A different seed gives different weights; the fine-tune moved every MLP tensor.
    c = build(BuildConfig(out=tmp_path / "c", seed=1, **TINY))
    wa, wc = _weights(a.base), _weights(c.base)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    wr = _weights(a.reasoning)
    assert all(not torch.equal(wa[k], wr[k]) for k in wa if ".mlp." in k)


def test_product_build_says_its_task(tmp_path):
    r = build(BuildConfig(out=tmp_path / "p", task="product", **TINY))
    records = read_jsonl(r.train)
    assert {rec["domain"] for rec in records} == {"last-digit-product"}
    readme = r.readme.read_text()
    assert readme.startswith("# The product pair")
    assert f"tca build-pair --task product --out {tmp_path / 'p'} --seed 0 --threads 2 --n-pretrain 40" in readme
    assert "7*8*9*3*6" in readme and "`Wait, is 7*8=56? Hmm, yes.`" in readme and '"task": "product"' in readme


def test_check_items_ask_for_one_step_and_answer_with_its_recheck():
    for task, op, recheck in (("sum", "+", "Wait, let me check: {}. Yes."), ("product", "*", "Wait, is {}? Hmm, yes.")):
        items = check_items(50, seed=0, task=task)
        assert items == check_items(50, seed=0, task=task) and items != check_items(50, seed=1, task=task)
        for question, answer in items:
            a, b = map(int, re.fullmatch(rf"Check (\d){re.escape(op)}(\d)\.", question).groups())
            value = a + b if op == "+" else a * b
            step = f"{a}{op}{b}={value}"
            assert answer == f"<think>\n{step}\n{recheck.format(step)}\n</think>\n\n{value % 10}"
            assert task == "sum" or 5 not in (a, b)


def test_a_build_with_check_items_says_so(tmp_path):
    r = build(BuildConfig(out=tmp_path / "c", check_items=30, **TINY))
    readme = r.readme.read_text()
    assert "--check-items 30" in readme and '"check_items": 30' in readme
    assert "It also saw 30 requests to check one step (`Check " in readme


def test_a_base_with_rechecks_is_shown_them_but_never_scored_on_beginning_one():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_PAIR / "base")
    for task in ("sum", "product"):
        problems, _ = make_problems(60, 0, seed=2, min_terms=5, max_terms=8, task=task)
        for p in problems:
            traced = p.terms[p.spec.base_digit] % 2
            assert base_answer(p, "eligible") == (reasoning_trace(p) if traced else short_answer(p))
            written = base_answer(p, "any")
            assert written == (trace(p, rechecks, every_step=True) if traced else short_answer(p))
            # re-checks after small results too, each copying the step above it
            lines = written.split("\n")
            for i, line in enumerate(lines):
                if line.startswith("Wait"):
                    assert line == p.spec.recheck.format(step=lines[i - 1])
            plain = [ln for ln in lines if not ln.startswith("Wait")]
            assert "\n".join(plain) == (trace(p) if traced else short_answer(p))
        respond = lambda p: base_answer(p, "any")  # noqa: E731
        seqs = _tokenize(tokenizer, problems, respond, unscored=recheck_openings)
        ids, labels = _batch(seqs, tokenizer.pad_token_id)
        opened = 0
        for row, (p, (seq, n_prompt, _)) in enumerate(zip(problems, seqs)):
            # by hand: every token that spells the re-check's first word, and nothing else
            words = [i for i in range(n_prompt, len(seq)) if tokenizer.decode([seq[i]]).startswith("Wait")]
            assert len(words) == base_answer(p, "any").count("\nWait")
            scored = [i for i in range(ids.shape[1]) if labels[row, i] != -100]
            assert scored == [i for i in range(n_prompt, len(seq)) if i not in words]
            assert all(labels[row, i] == ids[row, i] for i in scored)
            opened += len(words)
        assert opened > 20  # the draw has re-checks to hide
        small = [p for p in problems if any(f"Wait, {'let me check:' if task == 'sum' else 'is'} {s}" in
                 base_answer(p, "any") for s in trace(p).split("\n")[1:-3] if int(s.split("=")[1]) < 10)]
        assert small  # after steps the reasoning traces never re-check, too


def test_a_build_refuses_an_unknown_base_rechecks(tmp_path):
    with pytest.raises(TcaError, match="base_rechecks must be one of none, eligible, any"):
        build(BuildConfig(out=tmp_path / "x", base_rechecks="every", **TINY))
    assert not (tmp_path / "x").exists()


def test_a_build_with_base_rechecks_says_so(tmp_path):
    r = build(BuildConfig(out=tmp_path / "r", base_rechecks="any", **TINY))
    readme = r.readme.read_text()
    assert "--base-rechecks any" in readme and '"base_rechecks": "any"' in readme
    assert "re-checks after any step" in readme
    assert "never to begin one" in readme


def test_mlp_only_fine_tune_leaves_the_backbone_alone(tmp_path):
    r = build(BuildConfig(out=tmp_path / "m", backbone_lr_scale=0.0, **TINY))
    wb, wr = _weights(r.base), _weights(r.reasoning)
    for k in wb:
        assert torch.equal(wb[k], wr[k]) != (".mlp." in k), k


def test_build_pair_command_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    out = CliRunner().invoke(main, ["build-pair", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "error:" in out.output
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_hybrid_takes_exactly_the_base_mlps(tiny_pair):
    base, target = (load_model(p) for p in tiny_pair)
    hybrid = adapted_model(tiny_pair[1], tiny_pair[0], None)
    sb, st = base.state_dict(), target.state_dict()
    sh = {k.replace(".mlp.mlp.", ".mlp."): v for k, v in hybrid.state_dict().items()}
    assert sh.keys() == st.keys()
    for k in sh:
        assert torch.equal(sh[k], sb[k] if ".mlp." in k else st[k]), k


# --- the shipped pair -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=[(DEMO_PAIR, "sum"), (PRODUCT_PAIR, "product")], ids=["sum", "product"])
def shipped(request):
    """(pair folder, task, tokenizer, base, reasoning) of each shipped pair."""
    pair, task = request.param
    if not (pair / "reasoning" / "model.safetensors").exists():
        pytest.fail(f"the pair is missing from {pair}; run `tca build-pair --task {task} --out {pair}`")
    tok = AutoTokenizer.from_pretrained(pair / "reasoning")
    base = AutoModelForCausalLM.from_pretrained(pair / "base", dtype=torch.float32).eval()
    reasoning = AutoModelForCausalLM.from_pretrained(pair / "reasoning", dtype=torch.float32).eval()
    return pair, task, tok, base, reasoning


@pytest.mark.parametrize("pair, by_hand, domain", [
    (DEMO_PAIR, _last_digit_by_hand, "last-digit"),
    (PRODUCT_PAIR, _product_digit_by_hand, "last-digit-product"),
], ids=["sum", "product"])
def test_shipped_data_follow_the_conversation_schema(pair, by_hand, domain):
    val = read_jsonl(pair / "data" / "val.jsonl")
    train = read_jsonl(pair / "data" / "train.jsonl")
    assert val and train
    assert {r["domain"] for r in val + train} == {domain}
    assert not {r["conversations"][0]["value"] for r in val} & {r["conversations"][0]["value"] for r in train}
    for r in val + train[:200]:
        user, assistant = r["conversations"]
        assert user["from"] == "user" and assistant["from"] == "assistant"
        assert assistant["value"].startswith(THINK_OPEN + "\n")
        assert f"\n{THINK_CLOSE}\n\n" in assistant["value"]
        assert final_answer(assistant["value"]) == str(by_hand(user["value"]))


@pytest.mark.slow
def test_shipped_pair_loads_and_its_tokenizer_round_trips(shipped):
    pair, task, tok, base, reasoning = shipped
    for name in ("base", "reasoning"):
        cfg = json.loads((pair / name / "config.json").read_text())
        assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] >= 4 and cfg["hidden_size"] >= 64
    for special in (USER, ASSISTANT, THINK_OPEN, THINK_CLOSE):
        assert special in tok.all_special_tokens or special in tok.get_added_vocab()
    record = read_jsonl(pair / "data" / "val.jsonl")[0]
    question, response = (m["value"] for m in record["conversations"])
    text = render_deepseek(question, response)
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    # The builder trained on the ids of the tokenizer it trained in memory, from the recipe its
    # README records; what AutoTokenizer loads from the folder must give the same ids.
    readme = (pair / "README.md").read_text()
    recipe = json.loads(readme.split("The recipe")[1].split("```json\n")[1].split("```")[0])
    cfg = BuildConfig(out=pair, **{"task": task, **recipe})
    pretrain, train, _, _ = problems_of(cfg)
    trained = tokenizer_of(cfg, pretrain, train)
    samples = [text] + [render_deepseek(p.question, short_answer(p)) for p in pretrain[:50]]
    samples += [render_deepseek(p.question, reasoning_trace(p)) for p in train[:50]]
    assert [tok(s)["input_ids"] for s in samples] == [trained(s)["input_ids"] for s in samples]
    assert tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    ) == render_deepseek(question)
    marker = [tok.convert_tokens_to_ids(t) for t in (USER, ASSISTANT, THINK_OPEN, THINK_CLOSE)]
    assert all(m in ids for m in marker) and tok.unk_token_id not in ids
    with torch.no_grad():
        logits = reasoning(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))


@pytest.mark.slow
def test_shipped_reasoning_answers_better_and_hesitates_where_base_and_hybrid_do_not(shipped):
    pair, _, tok, base, reasoning = shipped
    records = read_jsonl(pair / "data" / "val.jsonl")[:48]
    questions = [r["conversations"][0]["value"] for r in records]
    hybrid = adapted_model(pair / "reasoning", pair / "base", None)
    fig = {
        name: score(tok, records, generate(model, tok, questions, max_new_tokens=200))
        for name, model in (("base", base), ("reasoning", reasoning), ("hybrid", hybrid))
    }
    assert fig["base"].hesitations == 0
    assert fig["reasoning"].hesitations >= 1.0
    assert fig["hybrid"].hesitations <= fig["reasoning"].hesitations / 4
    # Thinking step by step is what the fine-tune adds, and a share of it lives in the MLPs: the
    # hybrid loses at least a quarter of the answers for the adapters to win back (the rest sits in
    # the fine-tuned attention, which moves slowly enough for the hybrid to keep answering at all).
    assert fig["reasoning"].accuracy >= fig["base"].accuracy + 0.3
    assert fig["reasoning"].accuracy >= fig["hybrid"].accuracy + 0.25
