"""The data plan: regions, subsampling, sinks, cutting, and bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DEMO_PAIR
from transformers import AutoTokenizer

from tca import TcaError
from tca.cache.data import REGIONS
from tca.cache.plan import PlanConfig, build_plan, keep_mask
from tca.cache.template import ASSISTANT, EOS, THINK_CLOSE, THINK_OPEN
from tca.toy.tiny import tiny_conversations, write_jsonl


def expected_regions(ids: np.ndarray, tok) -> list[str]:
    """Regions from token ids alone: BOS other, up to <｜Assistant｜> prompt, <think>…</think>
    think, then answer, EOS other (one exchange per document)."""
    idx = {m: int(np.flatnonzero(ids == tok.convert_tokens_to_ids(m))[0]) for m in (ASSISTANT, THINK_OPEN, THINK_CLOSE)}
    out = []
    for i, t in enumerate(ids):
        if i == 0 or t == tok.convert_tokens_to_ids(EOS):
            out.append("other")
        elif i <= idx[ASSISTANT]:
            out.append("prompt")
        elif idx[THINK_OPEN] <= i <= idx[THINK_CLOSE]:
            out.append("think")
        else:
            out.append("answer")
    return out


def check_regions(data, model_dir) -> int:
    tok = AutoTokenizer.from_pretrained(model_dir)
    plan = build_plan(PlanConfig(data=str(data)), tok)
    table = plan.tokens_table().to_pydict()
    for d in range(plan.n_docs):
        a, b = plan.doc_start[d], plan.doc_start[d + 1]
        assert table["region"][a:b] == expected_regions(plan.token_ids[a:b], tok), f"document {d}"
        assert "".join(table["piece"][a:b]) == tok.decode(plan.token_ids[a:b].tolist())
    return plan.n_docs


def test_regions_on_tiny_data(tiny_pair, tiny_data):
    assert check_regions(tiny_data, tiny_pair[1]) == 24


@pytest.mark.slow
def test_regions_on_demo_data():
    data, model = DEMO_PAIR / "data" / "val.jsonl", DEMO_PAIR / "reasoning"
    if not data.exists() or not model.exists():
        pytest.skip("the demo pair is not built")
    assert check_regions(data, model) > 0


def test_keep_frac_keeps_the_requested_fraction_independent_of_length():
    n, frac = 200_000, 0.3
    keep = keep_mask(n, frac, seed=7)
    sigma = np.sqrt(frac * (1 - frac) / n)
    assert abs(keep.mean() - frac) < 5 * sigma
    # A token's fate depends only on (seed, index): a shorter plan is a prefix of a longer one.
    assert np.array_equal(keep_mask(1000, frac, seed=7), keep[:1000])
    assert not np.array_equal(keep_mask(1000, frac, seed=8), keep[:1000])
    # Neighbouring tokens are independent: the kept fraction among tokens after a kept one.
    after = keep[1:][keep[:-1]]
    assert abs(after.mean() - frac) < 5 * np.sqrt(frac * (1 - frac) / len(after))


def test_plan_rows_follow_keep_frac_and_sinks(tiny_pair, tiny_data):
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    plan = build_plan(PlanConfig(data=str(tiny_data), keep_frac=0.5, seed=3, skip_sinks=True), tok)
    expected = keep_mask(plan.n_tokens, 0.5, 3) & (plan.positions > 0) & (plan.token_ids != tok.bos_token_id)
    assert np.array_equal(plan.row_tokens, np.flatnonzero(expected))
    table = plan.tokens_table().to_pydict()
    rows = np.asarray(table["row"])
    assert np.array_equal(np.flatnonzero(rows >= 0), plan.row_tokens)
    assert np.array_equal(rows[plan.row_tokens], np.arange(len(plan.row_tokens)))


def test_seq_len_and_max_tokens_cut(tiny_pair, tiny_data):
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    full = build_plan(PlanConfig(data=str(tiny_data)), tok)
    cut = build_plan(PlanConfig(data=str(tiny_data), seq_len=10, max_tokens=95), tok)
    assert cut.n_tokens == 95 and cut.n_docs == 10
    assert np.diff(cut.doc_start).tolist() == [10] * 9 + [5]
    for d in range(cut.n_docs):
        a = full.doc_start[d]
        n = cut.doc_start[d + 1] - cut.doc_start[d]
        assert np.array_equal(cut.token_ids[cut.doc_start[d] : cut.doc_start[d + 1]], full.token_ids[a : a + n])
    docs = cut.docs_table().to_pydict()
    assert all(docs["truncated"]) and docs["id"][:2] == ["tiny-0", "tiny-1"]


def test_text_and_parquet_inputs(tiny_pair, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    texts = ["What is 4 + 5?", "We add 1 and 2."]
    jsonl = write_jsonl([{"text": t, "domain": "math"} for t in texts], tmp_path / "t.jsonl")
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": texts, "domain": ["math", "math"]}), parquet)
    for path in (jsonl, parquet):
        plan = build_plan(PlanConfig(data=str(path)), tok)
        assert plan.n_docs == 2
        assert tok.decode(plan.token_ids[: plan.doc_start[1]].tolist()) == texts[0]
        assert set(plan.tokens_table().column("region").to_pylist()) == {"other"}
        assert plan.docs_table().column("domain").to_pylist() == ["math", "math"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no documents"),
        ('{"text": "a"}\n{"text": "b"}\n{"text": \n', "line 3 is not valid JSON"),
        ('{"text": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"text": "a"}\n{"prompt": "b"}\n', "line 2 has neither"),
        ('{"conversations": [{"from": "robot", "value": "x"}]}\n', "line 1 has a turn without a known role"),
    ],
)
def test_bad_data_names_the_line(tiny_pair, tmp_path, content, message):
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TcaError, match=message):
        build_plan(PlanConfig(data=str(path)), tok)


def test_chat_template_renders_like_deepseek(tiny_pair, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_pair[1])
    data = write_jsonl(tiny_conversations(3), tmp_path / "c.jsonl")
    a = build_plan(PlanConfig(data=str(data), template="deepseek"), tok)
    b = build_plan(PlanConfig(data=str(data), template="chat"), tok)
    # The toy tokenizer's chat template is the DeepSeek-R1 layout (template.CHAT_TEMPLATE).
    assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.regions, b.regions)
    assert set(REGIONS) == set(a.tokens_table().column("region").to_pylist())
    assert json.loads(data.read_text().splitlines()[0])["id"] == a.docs_table().column("id")[0].as_py()
