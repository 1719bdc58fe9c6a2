"""Local OpenAI-compatible chat endpoints on 127.0.0.1, for tests and offline use (``tca serve``).

- ``HFModel``: generates with a local Hugging Face causal LM (the demo pair's reasoning model in the
  tests): real HTTP and real generation, so ``tca explain``'s client, retries, resume and parsing are
  exercised end to end. A tiny model's explanations are gibberish; that is not the point.
- ``OracleJudge``: answers detection prompts (``tca.query.judge``) from the index's true activations:
  it finds each excerpt in the indexed documents and says it is active when the feature fires on a
  token inside it. Balanced accuracy about 1.
- ``RandomJudge``: says each excerpt is active with probability 1/2. Balanced accuracy about 0.5.
- ``Scripted``: the answers it is given, in turn (refusals, malformed text, HTTP errors), for tests.

``ChatServer`` serves one of them at ``http://127.0.0.1:PORT/v1`` (``/chat/completions``,
``/models``). It binds the loopback interface only, and its loop is bounded: it stops by itself
after ``max_requests`` requests, ``lifetime`` seconds, or ``idle`` seconds without a request.
``fail_first`` and ``fail_after`` make it answer HTTP 503 / 500, to test a client's retries and resume.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from tca import TcaError
from tca.query import judge
from tca.query.sql import connect, run_sql
from tca.ranges import NON_NEGATIVE, POSITIVE, check_ranges

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
"""Loopback only: these servers are for this machine."""


class BadRequest(ValueError):
    """A request this backend cannot answer (HTTP 400)."""


@dataclass
class Completion:
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class HFModel:
    """Chat completions from a local Hugging Face causal LM on the CPU, one generation at a time."""

    def __init__(self, path: str | Path, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = Path(path).name
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.positions = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.seed, self.lock, self.torch = seed, threading.Lock(), torch

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> Completion:
        tok = self.tokenizer
        if tok.chat_template:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tok("\n\n".join(m.get("content") or "" for m in messages))["input_ids"]
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        max_tokens = max(1, min(max_tokens, self.positions // 2))
        ids = ids[-(self.positions - max_tokens):]  # a long prompt keeps its end, where the question is
        with self.lock, self.torch.no_grad():
            self.torch.manual_seed(self.seed)
            out = self.model.generate(
                self.torch.tensor([ids]), attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long),
                max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or None,
                top_p=None, top_k=None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[0, len(ids):].tolist()
        stopped = tok.eos_token_id in new
        text = tok.decode(new, skip_special_tokens=True)
        return Completion(text, "stop" if stopped else "length", len(ids), len(new))


class OracleJudge:
    """Answers detection prompts from the true activations of an index.

    Everything is read once, when it starts (a running ``tca explain`` holds the index for writing):
    every document's text, as the excerpts show it, and every activation's token by feature.
    """

    name = "oracle"

    def __init__(self, index: str | Path):
        con = connect(index)
        try:
            tokens = run_sql(con, "SELECT token, doc, piece FROM tokens ORDER BY doc, pos").to_pydict()
            acts = run_sql(con, "SELECT adapter, layer, feature, list(token) AS tokens FROM activations GROUP BY ALL"
                           ).to_pylist()
        finally:
            con.close()
        parts, starts, owners, last_doc, offset = [], [], [], None, 0
        for token, doc, piece in zip(tokens["token"], tokens["doc"], tokens["piece"]):
            if doc != last_doc:  # documents are kept apart, so no excerpt spans two
                parts.append("\x00")
                offset += 1
                last_doc = doc
            text = judge.one_line(piece)
            starts.append(offset)
            owners.append(token)
            parts.append(text)
            offset += len(text)
        self.text, self.starts, self.owners = "".join(parts), starts, np.array(owners, dtype=np.int64)
        self.active = {(r["adapter"], r["layer"], r["feature"]): set(r["tokens"]) for r in acts}

    def tokens_in(self, excerpt: str) -> list[np.ndarray]:
        """The tokens of every place ``excerpt`` occurs in the documents."""
        found, at = [], self.text.find(excerpt)
        while at >= 0 and excerpt:
            lo = bisect.bisect_right(self.starts, at) - 1
            hi = bisect.bisect_left(self.starts, at + len(excerpt))
            found.append(self.owners[max(lo, 0):hi])
            at = self.text.find(excerpt, at + 1)
        return found

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> Completion:
        parsed = judge.parse_detection_prompt(messages)
        if parsed is None:
            raise BadRequest("the oracle judge answers detection prompts only")
        key, excerpts = parsed
        active = self.active.get(key, set())
        said = [n for n, text in sorted(excerpts.items())
                if any(active.intersection(place.tolist()) for place in self.tokens_in(text))]
        return Completion(json.dumps(said))


class RandomJudge:
    """Says each excerpt of a detection prompt is active with probability 1/2."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng, self.lock = np.random.default_rng(seed), threading.Lock()

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> Completion:
        parsed = judge.parse_detection_prompt(messages)
        if parsed is None:
            raise BadRequest("the random judge answers detection prompts only")
        with self.lock:
            said = [n for n in sorted(parsed[1]) if self.rng.random() < 0.5]
        return Completion(json.dumps(said))


class Scripted:
    """The given answers in turn, cycling: a string is the message; an int is an HTTP error status."""

    name = "scripted"

    def __init__(self, answers: list[str | int]):
        self.answers, self.next, self.lock = list(answers), 0, threading.Lock()

    def complete(self, messages: list[dict], max_tokens: int, temperature: float) -> Completion:
        with self.lock:
            answer = self.answers[self.next % len(self.answers)]
            self.next += 1
        if isinstance(answer, int):
            raise _Status(answer)
        return Completion(answer)


class _Status(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class ChatServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 serving one backend; a bounded loop."""

    def __init__(self, backend, port: int = 0, *, max_requests: int = 10_000, lifetime: float = 3600.0,
                 idle: float = 600.0, fail_first: int = 0, fail_after: int | None = None, delay: float = 0.0):
        self.backend, self.max_requests, self.lifetime, self.idle = backend, max_requests, lifetime, idle
        self.fail_first, self.fail_after, self.delay = fail_first, fail_after, delay
        self.received: list[dict] = []
        """Every request body, in arrival order."""
        self.answered = 0
        self.finished = 0
        """Connections whose response has been written: the request limit counts these, so the last
        answer is out before the server closes."""
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.httpd = ThreadingHTTPServer((HOST, port), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.timeout = 0.2  # how often the loop looks at its limits
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.httpd.server_address[1]}/v1"

    def serve(self) -> None:
        """Handle requests until a limit is reached or ``stop`` is called."""
        start = last = time.monotonic()
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if self.finished >= self.max_requests or now - start > self.lifetime or now - last > self.idle:
                    log.info("serve: stopping (%d requests, %.0fs)", len(self.received), now - start)
                    break
                before = len(self.received)
                self.httpd.handle_request()
                if len(self.received) != before:
                    last = time.monotonic()
        finally:
            self.httpd.server_close()

    def start(self) -> ChatServer:
        self.thread = threading.Thread(target=self.serve, name="tca-serve", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # to logging, not stderr
                log.debug("serve: " + fmt, *args)

            def handle(self):
                try:
                    super().handle()
                finally:
                    with server.lock:
                        server.finished += 1

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server.backend.name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                    messages = body["messages"]
                except (ValueError, KeyError, TypeError):
                    self._send(400, {"error": {"message": "the body is not a chat completion request"}})
                    return
                with server.lock:
                    server.received.append(body)
                    n = len(server.received)
                    failing = n <= server.fail_first or (server.fail_after is not None
                                                         and server.answered >= server.fail_after)
                if failing:
                    self._send(503 if n <= server.fail_first else 500, {"error": {"message": "failing on purpose"}})
                    return
                time.sleep(server.delay)
                try:
                    done = server.backend.complete(messages, int(body.get("max_tokens") or 256),
                                                   float(body.get("temperature") or 0.0))
                except BadRequest as exc:
                    self._send(400, {"error": {"message": str(exc)}})
                    return
                except _Status as exc:
                    self._send(exc.code, {"error": {"message": "scripted failure"}})
                    return
                with server.lock:
                    server.answered += 1
                self._send(200, {
                    "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model") or server.backend.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "finish_reason": done.finish_reason}],
                    "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                              "total_tokens": done.prompt_tokens + done.completion_tokens},
                })

        return Handler


@dataclass
class ServeConfig:
    """``tca serve``: a local OpenAI-compatible chat endpoint on 127.0.0.1."""

    model: str | None = None
    """A Hugging Face model directory to generate with."""
    oracle: Path | None = None
    """Instead: an index whose true activations answer detection prompts (a judge that knows)."""
    random_judge: bool = False
    """Instead: a judge that says each excerpt is active with probability 1/2."""
    port: int = field(default=8000, metadata=NON_NEGATIVE)
    """Port on 127.0.0.1 (0: any free one; the URL is printed)."""
    max_requests: int = field(default=10_000, metadata=POSITIVE)
    """Stop after this many requests."""
    lifetime: float = field(default=3600.0, metadata=POSITIVE)
    """Stop after this many seconds."""
    idle: float = field(default=600.0, metadata=POSITIVE)
    """Stop after this many seconds without a request."""
    seed: int = field(default=0, metadata=NON_NEGATIVE)
    """Seed of sampling and of the random judge."""

    def __post_init__(self):
        check_ranges(self)


def make_server(cfg: ServeConfig) -> ChatServer:
    """The server ``cfg`` describes, bound and ready to ``serve``."""
    chosen = [name for name, on in (("--model", cfg.model), ("--oracle", cfg.oracle), ("--random-judge",
                                                                                     cfg.random_judge)) if on]
    if len(chosen) != 1:
        raise TcaError("serve one backend: give exactly one of --model DIR, --oracle INDEX or --random-judge"
                       + (f" (got {', '.join(chosen)})." if chosen else "."))
    if cfg.model:
        if not Path(cfg.model, "config.json").is_file():
            raise TcaError(f"--model {cfg.model} is not a Hugging Face model directory (it has no config.json).")
        backend = HFModel(cfg.model, cfg.seed)
    elif cfg.oracle:
        backend = OracleJudge(cfg.oracle)
    else:
        backend = RandomJudge(cfg.seed)
    try:
        return ChatServer(backend, cfg.port, max_requests=cfg.max_requests, lifetime=cfg.lifetime, idle=cfg.idle)
    except OSError as exc:
        raise TcaError(f"cannot listen on {HOST}:{cfg.port}: {exc.strerror or exc}.") from None
