"""``tca explain`` against real local endpoints: the demo pair's reasoning model generating over HTTP,
an oracle judge that answers from the true activations, a random judge, scripted answers and
failing servers; prompts, labels and scores checked against the planted ground truth."""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner
from conftest import DEMO_PAIR
from test_census import build_planted

from tca import TcaError
from tca.cli import main
from tca.query import judge
from tca.query.chat import Answer, ChatClient, final_text, refused
from tca.query.explain import (
    ExplainConfig,
    estimate_tokens,
    explain,
    explain_request,
    parse_class,
    parse_explanation,
    select_features,
)
from tca.query.report import write_all, write_report
from tca.query.sql import connect, run_sql
from tca.toy.serve import ChatServer, HFModel, OracleJudge, RandomJudge, Scripted, ServeConfig, make_server

LIVE = [0, 1, 2, 3, 4, 7]
"""The planted features with at least 10 activations (5 is too rare, 6 dead)."""


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_planted(tmp_path_factory.mktemp("explain"))


@pytest.fixture(scope="module")
def model_server():
    if not (DEMO_PAIR / "reasoning").is_dir():
        pytest.skip("the demo pair is missing")
    with ChatServer(HFModel(DEMO_PAIR / "reasoning"), lifetime=1800) as server:
        yield server


def copy_of(planted, tmp_path, name="index.duckdb") -> Path:
    path = tmp_path / name
    shutil.copyfile(planted["index"], path)
    return path


def rows(index: Path) -> dict[int, dict]:
    con = connect(index)
    try:
        return {r["feature"]: r for r in run_sql(con, "FROM explanations").to_pylist()}
    finally:
        con.close()


def cfg(index: Path, **kw) -> ExplainConfig:
    return ExplainConfig(index=index, model=kw.pop("model", "demo"), backoff=kw.pop("backoff", 0.0), **kw)


def truth_of(planted, feature: int) -> dict[int, bool]:
    """Per token, whether the planted feature fires on it (from the documents, not the index)."""
    out = {}
    for token, doc, pos, *_ in planted["tokens"]:
        out[token] = feature in planted["truth"][doc][pos] and token in planted["stored"]
    return out


# ---- prompts -----------------------------------------------------------------------------------


def test_explanation_prompt_marks_active_tokens_and_profiles_regions(planted):
    con = connect(planted["index"])
    try:
        request = explain_request(con, "planted", 1, 0, cfg(planted["index"]))
    finally:
        con.close()
    text = request.messages[1]["content"]
    examples = [ln for ln in text.splitlines() if ln[:1].isdigit()]
    assert len(examples) == 10 + 9  # 10 strongest; 5 bins x 2 less the one already among the strongest
    # feature 0 fires on the "." before "Wait", and on nothing else: every example marks exactly that
    assert all(ln.count("<<") == ln.count(">>") == 1 and "<<.>>Wait" in ln for ln in examples)
    assert "think 100%" in text and "prompt 0%" in text and "answer 0%" in text
    n_think = sum(1 for t, d, p, *_ in planted["tokens"]
                  if t in planted["stored"] and planted["docs"][d][p][1] == "think")
    assert f"({51 / n_think:.2%})" in text  # 51 activations over the stored <think> tokens
    assert request.extra["shown_docs"] and request.sha == explain_request(
        connect(planted["index"]), "planted", 1, 0, cfg(planted["index"])).sha  # deterministic


def test_held_out_excerpts_are_labelled_by_the_truth_and_never_from_shown_documents(planted):
    con = connect(planted["index"])
    try:
        shown = explain_request(con, "planted", 1, 2, cfg(planted["index"])).extra["shown_docs"]
        held = judge.held_out(con, "planted", 1, 2, shown, 10, 8, seed=0)
        doc_of = {r["token"]: r["doc"] for r in run_sql(con, "SELECT token, doc FROM tokens").to_pylist()}
    finally:
        con.close()
    truth = truth_of(planted, 2)
    assert sum(held.labels) == len(held.labels) - sum(held.labels) == 10
    assert [truth[t] for t in held.tokens] == held.labels
    assert not {doc_of[t] for t in held.tokens} & set(shown)
    by_token = {t: (d, p) for t, d, p, *_ in planted["tokens"]}
    for token, text, label in zip(held.tokens, held.texts, held.labels):
        d, p = by_token[token]
        window = planted["docs"][d][max(p - 8, 0):p + 9]
        assert text == "".join(judge.one_line(piece) for piece, _ in window)
        if not label:  # an inactive excerpt has no planted activation on any stored token
            assert not any(truth[t] for t, dd, pp, *_ in planted["tokens"] if dd == d and abs(pp - p) <= 8)


# ---- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, finish, status, value", [
    ("Explanation: the dot before Wait.", "stop", "ok", "the dot before Wait."),
    ("<think>hmm, dots</think>\n\n**Explanation:** fires on dots", "stop", "ok", "fires on dots"),
    ("lots of thinking</think>Explanation: a line break in the answer", "stop", "ok", "a line break in the answer"),
    ("<think>never ends", "length", "malformed", None),
    ("   \n\n", "stop", "malformed", None),
    ("I'm sorry, but I can't help with that.", "stop", "refused", None),
    ("anything", "content_filter", "refused", None),
    (None, None, "error", None),
])
def test_parse_explanation(text, finish, status, value):
    assert parse_explanation(Answer(text, finish)) == (status, value)


@pytest.mark.parametrize("text, status, kind", [
    ("planning", "ok", "planning"), ("**Answer formatting**", "ok", "answer_formatting"),
    ("<think>other or hesitation?</think> hesitation", "ok", "hesitation"),
    ("hesitation or planning", "malformed", None), ("no idea", "malformed", None),
    ("I cannot classify this.", "refused", None),
])
def test_parse_class(text, status, kind):
    assert parse_class(Answer(text, "stop")) == (status, kind)


def test_detection_score_is_balanced_accuracy_with_a_wilson_interval():
    labels = [True, True, True, False, False, False]
    d = judge.score_detection(labels, Answer("The active ones: [1, 2, 4]", "stop"))
    tpr, tnr = 2 / 3, 2 / 3
    assert d.status == "ok" and d.score == pytest.approx((tpr + tnr) / 2) and d.correct == 4
    z, n, p = 1.959963984540054, 6, 4 / 6  # the Wilson interval written out
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert d.ci95 == pytest.approx([centre - half, centre + half])
    assert judge.score_detection(labels, Answer("[1, 2, 3]", "stop")).ci95[1] == 1.0
    assert judge.score_detection(labels, Answer("[0, 2]", "stop")).status == "malformed"  # no excerpt 0
    assert judge.score_detection(labels, Answer("[7]", "stop")).status == "malformed"
    assert judge.score_detection(labels, Answer("none of them", "stop")).status == "malformed"
    assert judge.score_detection(labels, Answer("[]", "stop")).score == 0.5
    assert judge.score_detection(labels, Answer("I can't do that", "stop")).status == "refused"


def test_final_text_and_refusals():
    assert final_text("<think>a</think> b") == "b" and final_text("a</think>b</think>c") == "c"
    assert final_text("<think>unfinished") is None and final_text(" plain ") == "plain"
    assert refused(Answer("As an AI, I won't", "stop")) and not refused(Answer("Sorry-looking feature", "stop"))


# ---- end to end against the model ---------------------------------------------------------------


def test_a_hugging_face_model_answers_over_http(planted, tiny_pair, tmp_path):
    """Real generation behind real HTTP (the tiny random pair's target: gibberish, quickly)."""
    index = copy_of(planted, tmp_path)
    with ChatServer(HFModel(tiny_pair[1])) as server:
        explain(cfg(index, endpoint=server.url, max_tokens=16, where="feature < 2"))
        assert len(server.received) == 2
    got = rows(index)
    assert sorted(got) == [0, 1] and {r["status"] for r in got.values()} <= {"ok", "malformed"}
    assert all(r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 16 for r in got.values())


@pytest.mark.slow
def test_end_to_end_resumes_without_resending(planted, model_server, tmp_path):
    index = copy_of(planted, tmp_path)
    with ChatServer(OracleJudge(index)) as oracle:
        args = ["explain", str(index), "--endpoint", model_server.url, "--model", "demo", "--max-tokens", "32",
                "--score", "--judge-endpoint", oracle.url, "--judge-model", "oracle", "--classify", "--json",
                "--backoff", "0"]
        before = len(model_server.received)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        sent_to_model, sent_to_judge = len(model_server.received) - before, len(oracle.received)
        got = rows(index)
        assert sorted(got) == LIVE and all(r["status"] in ("ok", "malformed") for r in got.values())
        for r in got.values():  # what is stored is what the model said, read by the parser
            assert parse_explanation(Answer(r["answer"], "stop"))[1] == r["explanation"]
        explained = [f for f, r in got.items() if r["status"] == "ok"]
        assert explained, "the demo model answered nothing usable"
        scored = [f for f in explained if got[f]["detection_status"] == "ok"]
        assert sent_to_model == len(LIVE) + len(explained) and sent_to_judge == len(scored)
        for f in scored:
            r = got[f]
            truth = truth_of(planted, f)
            assert r["detection_labels"] == [truth[t] for t in r["detection_tokens"]]
            assert r["detection_n"] == 2 * sum(r["detection_labels"])
            assert r["detection_lo"] <= r["detection"] <= r["detection_hi"] and r["judge_model"] == "oracle"
        assert summary["stages"]["explain"]["answered"] == Counter(r["status"] for r in got.values())
        assert all(r["class_status"] in ("ok", "malformed") for f, r in got.items() if f in explained)
        # a second run finds everything answered and sends nothing
        again = CliRunner().invoke(main, args)
        assert again.exit_code == 0, again.output
        assert len(model_server.received) - before == sent_to_model and len(oracle.received) == sent_to_judge
    page = write_report(index, 1, explained[0], tmp_path / "page.html").read_text()
    assert html.escape(got[explained[0]]["explanation"]) in page and "Kind: " in page
    listing = write_all(index, tmp_path / "pages").read_text()
    assert "<th>explanation</th><th>detection</th><th>kind</th>" in listing


def test_oracle_judge_scores_near_one_and_random_near_half(planted, tmp_path):
    scores = {}
    for name in ("oracle", "random"):
        index = copy_of(planted, tmp_path, f"{name}.duckdb")
        with ChatServer(Scripted(["Explanation: fires where it fires."])) as writer:
            explain(cfg(index, endpoint=writer.url))
        judge_backend = OracleJudge(index) if name == "oracle" else RandomJudge(seed=1)
        with ChatServer(judge_backend) as server:
            explain(cfg(index, explain=False, score=True, judge_endpoint=server.url, detect_examples=20))
        scores[name] = [r for r in rows(index).values() if r["detection_status"] == "ok"]
    oracle, guessed = scores["oracle"], scores["random"]
    assert len(oracle) >= 5 and len(guessed) >= 5
    # an excerpt that also occurs where the feature fires can cost the oracle a point; chance cannot win
    assert min(r["detection"] for r in oracle) >= 0.9 and all(r["detection_lo"] > 0.75 for r in oracle)
    pooled = sum(r["detection_correct"] for r in guessed) / sum(r["detection_n"] for r in guessed)
    assert 0.35 < pooled < 0.65
    assert sum(r["detection_lo"] <= 0.5 <= r["detection_hi"] for r in guessed) >= len(guessed) - 1


def test_malformed_refused_and_failed_answers_are_recorded(planted, tmp_path):
    index = copy_of(planted, tmp_path)
    script = ["I'm sorry, I can't help with that.", "<think>I keep thinking", "", 500,
              "Explanation: fires on digits.", "explanation: a dot before Wait"]
    with ChatServer(Scripted(script)) as server:
        summary = explain(cfg(index, endpoint=server.url, concurrency=1, retries=0))
    got = rows(index)
    assert [got[f]["status"] for f in LIVE] == ["refused", "malformed", "malformed", "error", "ok", "ok"]
    assert got[4]["explanation"] == "fires on digits."
    assert got[3]["answer"].startswith("gave up after 1 tries: HTTP 500")
    assert summary.errors == 1
    with ChatServer(Scripted(["[1, 99]", "I cannot judge", "nothing"])) as server:
        explain(cfg(index, explain=False, score=True, judge_endpoint=server.url, concurrency=1))
    got = rows(index)
    assert got[4]["detection_status"] == "malformed" and got[7]["detection_status"] == "refused"
    with ChatServer(Scripted(["hesitation", "planning or other"])) as server:
        explain(cfg(index, explain=False, classify=True, endpoint=server.url, concurrency=1))
    got = rows(index)
    assert (got[4]["class"], got[4]["reasoning_related"], got[7]["class_status"]) == ("hesitation", True, "malformed")
    census = {r["layer"]: r for r in run_sql(connect(index), "FROM explanation_census").to_pylist()}
    assert census[None]["n_explained"] == 2 and census[None]["n_reasoning"] == 1
    assert census[None]["reasoning_share"] == 1.0  # of the one classified


def test_retries_then_fatal_errors_stop_the_run(planted, tmp_path):
    index = copy_of(planted, tmp_path)
    with ChatServer(Scripted(["Explanation: x"]), fail_first=3) as server:
        explain(cfg(index, endpoint=server.url, concurrency=1, retries=3, where="feature = 0"))
        assert len(server.received) == 4 and rows(index)[0]["status"] == "ok"
    with ChatServer(Scripted([401])) as server, pytest.raises(TcaError, match="API key was refused"):
        explain(cfg(index, endpoint=server.url, redo=True))


def test_a_server_that_fails_part_way_is_resumed_without_resending(planted, tmp_path):
    index = copy_of(planted, tmp_path)
    with ChatServer(Scripted(["Explanation: first"]), fail_after=2) as server:
        result = CliRunner().invoke(main, ["explain", str(index), "--endpoint", server.url, "--model", "m",
                                           "--concurrency", "1", "--retries", "1", "--backoff", "0"])
    assert result.exit_code == 1 and "failed after their retries" in result.output
    first = rows(index)
    done = {f for f, r in first.items() if r["status"] == "ok"}
    assert len(done) == 2 and {r["status"] for f, r in first.items() if f not in done} == {"error"}
    with ChatServer(Scripted(["Explanation: second"])) as server:
        explain(cfg(index, endpoint=server.url))
        asked = {int(b["messages"][1]["content"].split("#", 1)[1].split("\n", 1)[0]) for b in server.received}
    assert asked == set(LIVE) - done and len(server.received) == len(LIVE) - 2
    assert {r["explanation"] for f, r in rows(index).items() if f in done} == {"first"}


def test_resume_after_a_kill(planted, tmp_path):
    """SIGKILL the command once a few answers are in; a second run asks only for the rest."""
    index = copy_of(planted, tmp_path)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with ChatServer(Scripted(["Explanation: killed run"]), delay=0.5) as server:
        proc = subprocess.Popen([sys.executable, "-m", "tca.cli", "explain", str(index), "--endpoint", server.url,
                                 "--model", "m", "--concurrency", "1"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while server.answered < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # the third answer is being written
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored_first = {f for f, r in rows(index).items() if r["status"] == "ok"}
    assert 2 <= len(stored_first) <= 3
    with ChatServer(Scripted(["Explanation: resumed"])) as server:
        explain(cfg(index, endpoint=server.url))
        asked = [int(b["messages"][1]["content"].split("#", 1)[1].split("\n", 1)[0]) for b in server.received]
    assert not set(asked) & stored_first and sorted(asked) == sorted(set(LIVE) - stored_first)
    assert {f for f, r in rows(index).items() if r["status"] == "ok"} == set(LIVE)


def test_dry_run_then_import(planted, tmp_path):
    index = copy_of(planted, tmp_path)
    requests = tmp_path / "requests.jsonl"
    CliRunner().invoke(main, ["explain", str(index), "--model", "gpt-x", "--dry-run", str(requests)],
                       catch_exceptions=False)
    lines = [json.loads(x) for x in requests.read_text().splitlines()]
    assert len(lines) == len(LIVE) and not rows_exist(index)  # nothing was written into the index
    assert all(x["body"]["model"] == "gpt-x" and x["url"] == "/v1/chat/completions" for x in lines)
    output = tmp_path / "output.jsonl"
    output.write_text("".join(json.dumps({"custom_id": x["custom_id"], "response": {"status_code": 200, "body": {
        "model": "gpt-x", "choices": [{"message": {"content": f"Explanation: feature {i}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3}}}}) + "\n" for i, x in enumerate(lines)))
    result = CliRunner().invoke(main, ["explain", str(index), "--import", str(output), "--json"])
    assert result.exit_code == 0, result.output
    got = rows(index)
    assert {r["explanation"] for r in got.values()} == {f"feature {i}" for i in range(len(LIVE))}
    # the judge's prompts go out the same way, and come back answered by the oracle
    judged = tmp_path / "judge.jsonl"
    explain(cfg(index, explain=False, score=True, judge_model="oracle", dry_run=judged))
    oracle = OracleJudge(index)
    answers = [{"custom_id": x["custom_id"], "content": oracle.complete(x["body"]["messages"], 10, 0).text}
               for x in map(json.loads, judged.read_text().splitlines())]
    stage, layer, feature, _, adapter = answers[0]["custom_id"].split("/", 4)
    tampered = dict(answers[0], custom_id=f"{stage}/{layer}/{feature}/{'0' * 16}/{adapter}")  # another prompt
    (tmp_path / "judged.jsonl").write_text("".join(json.dumps(a) + "\n" for a in [tampered] + answers))
    summary = explain(cfg(index, import_file=tmp_path / "judged.jsonl"))
    assert summary.refused_lines == 1 and summary.imported == len(answers)
    assert all(r["detection"] >= 0.9 for r in rows(index).values() if r["detection_status"] == "ok")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(TcaError, match="line 1 is not a tca request's answer"):
        explain(cfg(index, import_file=tmp_path / "bad.jsonl"))
    again = CliRunner().invoke(main, ["explain", str(index), "--model", "m", "--dry-run", str(requests)])
    assert again.exit_code == 2 and "already exists" in again.output


def rows_exist(index: Path) -> bool:
    con = connect(index)
    try:
        return bool(run_sql(con, "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'explanations'"
                            )["n"][0].as_py())
    finally:
        con.close()


def test_where_selects_with_sql_and_stays_read_only(planted, tmp_path):
    con = connect(planted["index"])
    try:
        chosen = select_features(con, cfg(planted["index"],
                                          where="feature IN (SELECT feature FROM census() WHERE kind = 'hesitation')"))
        assert [r["feature"] for r in chosen] == [0, 4]
        assert [r["feature"] for r in select_features(con, cfg(planted["index"], limit=2))] == [0, 1]
        with pytest.raises(TcaError, match="does not parse"):
            select_features(con, cfg(planted["index"], where="true; DROP TABLE activations"))
        with pytest.raises(TcaError, match="reads only the index"):
            select_features(con, cfg(planted["index"], where="feature IN (SELECT 1 FROM read_csv('/etc/passwd'))"))
    finally:
        con.close()
    with pytest.raises(TcaError, match="--endpoint"):
        explain(cfg(planted["index"]))
    with pytest.raises(TcaError, match="has at least"):
        explain(cfg(planted["index"], dry_run=tmp_path / "x.jsonl", where="feature = 6"))


def test_a_reindexed_layer_is_explained_again(planted, tmp_path):
    index = copy_of(planted, tmp_path)
    with ChatServer(Scripted(["Explanation: old"])) as server:
        explain(cfg(index, endpoint=server.url))
    con = duckdb.connect(str(index))
    con.execute("UPDATE adapters SET indexed_at = indexed_at + INTERVAL 1 SECOND")
    con.close()
    with ChatServer(Scripted(["Explanation: new"])) as server:
        explain(cfg(index, endpoint=server.url))
        assert len(server.received) == len(LIVE)
    assert {r["explanation"] for r in rows(index).values()} == {"new"}


def test_rate_limit_spaces_requests(planted, tmp_path):
    index = copy_of(planted, tmp_path)
    with ChatServer(Scripted(["Explanation: x"])) as server:
        start = time.monotonic()
        explain(cfg(index, endpoint=server.url, requests_per_minute=600, concurrency=4, where="feature < 3"))
        assert time.monotonic() - start >= 2 * 0.1  # 3 starts at least 0.1 s apart


def test_serve_command_binds_loopback_and_stops_by_itself(tmp_path):
    with pytest.raises(TcaError, match="exactly one of"):
        make_server(ServeConfig())
    with pytest.raises(TcaError, match="exactly one of"):
        make_server(ServeConfig(random_judge=True, model="x"))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tca.cli", "serve", "--random-judge", "--port", "0",
                             "--max-requests", "1", "--idle", "60"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        assert url.startswith("http://127.0.0.1:")
        messages = judge.detection_messages("a", 1, 2, "x", ["one", "two"])
        answer = ChatClient(url, "random").complete(messages, 10)
        assert answer.text is not None and json.loads(answer.text) in ([], [1], [2], [1, 2])
        assert proc.wait(timeout=30) == 0  # stopped by itself after its one request
    finally:
        proc.kill()


def test_token_and_cost_estimate_is_logged_before_sending(planted, tmp_path, caplog):
    messages = [{"role": "system", "content": "abcdefgh"}, {"role": "user", "content": "xx 12↵3"}]
    # pieces "1", "2", "\n" (shown as ↵), "3": one token each; the other 11 characters, 4 to a token; 4 per message
    assert estimate_tokens(messages, ["1", "2", "\n", "3"]) == math.ceil(11 / 4) + 4 + 8
    index = copy_of(planted, tmp_path)
    with caplog.at_level(logging.INFO, logger="tca.query.explain"), ChatServer(Scripted(["Explanation: x"])) as server:
        summary = explain(cfg(index, endpoint=server.url, price_prompt=2.0, price_completion=8.0, max_tokens=100))
    s = summary.stages["explain"]
    assert s.pending == len(LIVE) and s.max_completion_tokens == len(LIVE) * 100
    assert s.est_cost == pytest.approx((s.est_prompt_tokens * 2.0 + len(LIVE) * 100 * 8.0) / 1e6)
    line = next(r.getMessage() for r in caplog.records if "prompt tokens" in r.getMessage())
    assert line.startswith(f"explain: {len(LIVE)} requests") and f"at most ${s.est_cost:,.2f}" in line
    assert s.est_prompt_tokens > 0 and s.answered == {"ok": len(LIVE)}
