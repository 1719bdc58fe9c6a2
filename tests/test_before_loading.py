"""Inputs that cannot work are refused before any model weights load: a --resume of another
configuration, and a chat template that would drop the traces' thinking. The loaders are
replaced by functions that fail the test, so a refusal that comes after loading cannot pass."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

from tca import TcaError
from tca.adapted.config import RefineConfig
from tca.adapted.refine import refine
from tca.cache.data import read_documents, thinking
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig, build_plan
from tca.cache.template import ASSISTANT, THINK_CLOSE, USER
from tca.toy.tiny import tiny_conversations, write_jsonl

# R1's chat template in miniature: assistant turns keep only what follows </think>, as
# deepseek-ai/DeepSeek-R1-Distill-Qwen-7B's template does (content.split('</think>')[-1]).
R1_LIKE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    + ASSISTANT + "{{ content }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


class _Loaded(AssertionError):
    """Raised by the replaced loaders: the command got as far as loading weights."""


def _no_loading(monkeypatch, *targets: str) -> None:
    def fail(*args, **kwargs):
        raise _Loaded("weights were loaded")

    for target in targets:
        monkeypatch.setattr(target, fail)


@pytest.fixture
def r1_like_target(tiny_pair, tmp_path):
    """The tiny target with R1's habit of stripping the thinking in its chat template."""
    target = tmp_path / "r1-like"
    shutil.copytree(tiny_pair[1], target)
    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = R1_LIKE_TEMPLATE
    tok.save_pretrained(target)
    return target


def test_thinking_of_an_assistant_turn():
    assert thinking("<think>\nA, then B.\n</think>\n\n7") == "A, then B."
    assert thinking("<think>\n\n</think>\n\n7") == ""
    assert thinking("just 7") == ""
    assert thinking("<think>a</think> b </think> c") == "a</think> b"


def test_chat_template_that_drops_the_thinking_is_refused(r1_like_target, tmp_path):
    tok = AutoTokenizer.from_pretrained(r1_like_target)
    records = tiny_conversations(3)
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "<think>\nsecret\n</think>\n\n7"}],
                                       tokenize=False)
    assert "secret" not in rendered and rendered.endswith(ASSISTANT + "\n\n7" + tok.eos_token)  # as R1's does
    data = write_jsonl(records, tmp_path / "traces.jsonl")
    with pytest.raises(TcaError, match=r"traces.jsonl line 1: the target's chat template drops the assistant's "
                                       r"thinking.*--template deepseek"):
        build_plan(PlanConfig(data=str(data), template="chat"), tok)
    # turns that do not think lose nothing, so the same template renders them
    short = [{"conversations": [{"from": "user", "value": "q"},
                                {"from": "assistant", "value": f"<think>\n\n{THINK_CLOSE}\n\n7"}]}]
    (doc,) = read_documents(write_jsonl(short, tmp_path / "short.jsonl"), template="chat", tokenizer=tok)
    assert doc.text == tok.bos_token + USER + "q" + ASSISTANT + "\n\n7" + tok.eos_token


def test_harvest_refuses_the_chat_template_before_loading(tiny_pair, tiny_data, r1_like_target, tmp_path, monkeypatch):
    _no_loading(monkeypatch, "tca.cache.harvest.load_model", "tca.cache.harvest.load_base_mlps")
    cfg = HarvestConfig(base=str(tiny_pair[0]), target=str(r1_like_target), out=str(tmp_path / "store"),
                        device="cpu", plan=PlanConfig(data=str(tiny_data), template="chat"))
    with pytest.raises(TcaError, match="drops the assistant's thinking"):
        harvest(cfg)


def test_harvest_resume_of_another_configuration_is_refused_before_loading(tiny_pair, tiny_data, tmp_path,
                                                                           monkeypatch):
    def cfg(**plan) -> HarvestConfig:
        return HarvestConfig(base=str(tiny_pair[0]), target=str(tiny_pair[1]), out=str(tmp_path / "store"),
                             device="cpu", resume=True, block_rows=64, chunk_rows=32,
                             plan=PlanConfig(data=str(tiny_data), max_tokens=300, **plan))

    harvest(cfg())
    _no_loading(monkeypatch, "tca.cache.harvest.load_model", "tca.cache.harvest.load_base_mlps")
    with pytest.raises(TcaError, match="cannot resume .*keep_frac"):
        harvest(cfg(keep_frac=0.5))
    with pytest.raises(TcaError, match="cannot resume .*seq_len"):
        harvest(cfg(seq_len=16))
    with pytest.raises(_Loaded):  # the same configuration passes the check and goes on to load
        harvest(cfg())


def test_refine_refusals_come_before_loading(tiny_pair, tiny_data, tmp_path, monkeypatch):
    _no_loading(monkeypatch, "tca.adapted.refine.load_adapted")
    base, target = map(str, tiny_pair)

    def cfg(out, **kw) -> RefineConfig:
        return RefineConfig(base=base, target=target, data=str(tiny_data), out=str(out), from_zero=True,
                            device="cpu", **kw)

    with pytest.raises(TcaError, match="no checkpoint to resume"):
        refine(cfg(tmp_path / "never-run", resume=True))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "summary.json").write_text("{}")
    with pytest.raises(TcaError, match="pass --resume"):
        refine(cfg(tmp_path / "used"))
    with pytest.raises(_Loaded):
        refine(cfg(tmp_path / "fresh", tokens=200, seq_len=32, eval_tokens=64))
