"""A client of OpenAI-compatible chat endpoints (vLLM, llama.cpp's server, OpenAI and the like),
standard library only: one POST to ``{endpoint}/chat/completions`` per request.

Transient failures (a refused or reset connection, a timeout, HTTP 429 and 5xx) are retried with
exponential backoff and jitter, honouring ``Retry-After``; a request that still fails comes back as
an ``error`` answer for the caller to record, so one bad feature never stops a run. Failures that
every later request would share (HTTP 401, 403, 404: a wrong key, model or URL) raise ``TcaError``
at once. A shared ``RateLimiter`` spaces requests from all threads.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tca import TcaError

log = logging.getLogger(__name__)

_RETRIED = {408, 409, 429, 500, 502, 503, 504}
_FATAL = {401: "the API key was refused", 403: "access was refused", 404: "the URL or model does not exist"}
MAX_BACKOFF = 60.0
"""Longest wait between two tries of one request, in seconds."""


@dataclass
class Answer:
    """What one request got back."""

    text: str | None
    """The message content; None when the request failed (``error`` says why)."""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    error: str | None = None
    tries: int = 1


class RateLimiter:
    """At most ``per_minute`` request starts per minute over all threads (0: no limit)."""

    def __init__(self, per_minute: float):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self.next_start = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(start - now, 0.0))


@dataclass
class ChatClient:
    """Sends chat requests to one endpoint."""

    endpoint: str
    """Base URL, e.g. ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended."""
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 1.0
    limiter: RateLimiter | None = None

    @property
    def url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def body(self, messages: list[dict], max_tokens: int, temperature: float) -> dict:
        """The request body; also what a dry run writes for a batch API."""
        return {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}

    def complete(self, messages: list[dict], max_tokens: int, temperature: float = 0.0) -> Answer:
        """One chat completion, retried on transient failures; never raises for those."""
        data = json.dumps(self.body(messages, max_tokens, temperature)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if self.limiter is not None:
                self.limiter.wait()
            wait = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with _opener(self.url).open(request, timeout=self.timeout) as response:
                    payload = response.read()
                return parse_answer(payload, attempt + 1)
            except urllib.error.HTTPError as exc:
                detail = _error_text(exc)
                if exc.code in _FATAL:
                    raise TcaError(f"{self.url} answered HTTP {exc.code} ({_FATAL[exc.code]}): {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
                if exc.code not in _RETRIED:
                    return Answer(None, error=last, tries=attempt + 1)
                wait = _retry_after(exc)
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except ValueError as exc:  # a 200 whose body is not a chat completion
                return Answer(None, error=f"unreadable response: {exc}", tries=attempt + 1)
            if attempt < self.retries:
                delay = wait if wait is not None else min(self.backoff * 2**attempt, MAX_BACKOFF)
                delay += random.uniform(0, self.backoff)  # spreads threads that failed together
                log.debug("retrying in %.1fs after %s", delay, last)
                time.sleep(delay)
        return Answer(None, error=f"gave up after {self.retries + 1} tries: {last}", tries=self.retries + 1)


def _opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener, without the environment's HTTP proxy for a server on this machine (a proxy
    elsewhere cannot reach it)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def parse_answer(payload: bytes, tries: int) -> Answer:
    try:
        body = json.loads(payload)
        choice = body["choices"][0]
        text = choice["message"].get("content")
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"{type(exc).__name__} in {payload[:200]!r}") from None
    usage = body.get("usage") or {}
    return Answer(text if isinstance(text, str) else None, choice.get("finish_reason"), usage.get("prompt_tokens"),
                  usage.get("completion_tokens"), body.get("model"),
                  None if isinstance(text, str) else "the answer has no message content", tries)


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode(errors="replace").strip()
    except OSError:
        text = ""
    return (text or exc.reason or "").splitlines()[0][:300] if (text or exc.reason) else ""


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return min(float(value), MAX_BACKOFF) if value is not None else None
    except ValueError:
        return None


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_REFUSAL = re.compile(r"^\s*(I'?m sorry|I am sorry|I cannot|I can'?t|I won'?t|I'?m not able|I am not able|"
                      r"I'?m unable|I am unable|As an AI)\b", re.IGNORECASE)


def final_text(text: str) -> str | None:
    """An answer without the reasoning a thinking model writes before it: everything up to the last
    ``</think>`` goes (R1's template opens ``<think>`` in the prompt, so the answer may hold only the
    close); None when a ``<think>`` is never closed (the model ran out of tokens while thinking)."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1].strip()
    if _THINK_OPEN in text:
        return None
    return text.strip()


def refused(answer: Answer) -> bool:
    """Whether the endpoint declined: a content filter stopped it, or the answer opens like a refusal."""
    if answer.finish_reason == "content_filter":
        return True
    return bool(answer.text and _REFUSAL.match(final_text(answer.text) or ""))
