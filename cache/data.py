"""Reading documents (JSONL or Parquet), rendering conversations to text and labelling regions.

Two record schemas are read:

- conversations: ``{"conversations": [{"from": "user", "value": …}, {"from": "assistant",
  "value": …}], …}`` (``human``/``gpt`` are accepted as roles), or the same as
  ``{"messages": [{"role": …, "content": …}]}``;
- text: ``{"text": …}``.

``--template chat`` renders conversations with the target tokenizer's chat template and refuses
one whose rendering lost an assistant turn's thinking (R1's template strips it).

Every other top-level scalar field of a record (``id``, ``domain``, …) is kept as a source
field of its document.

Regions label each character of a rendered document, from the markers of the DeepSeek-R1
layout (see ``cache/template.py``), scanning left to right:

- ``other``: the BOS and EOS markers and any text before the first turn marker;
- ``prompt``: a ``<｜User｜>`` marker, the user's text, and the ``<｜Assistant｜>`` marker that
  closes it;
- ``think``: from ``<think>`` through ``</think>``, both markers included;
- ``answer``: assistant text outside the think block (after ``</think>``, or all of it when
  the turn has no think block), up to the EOS marker.

A token takes the region of its first character. Text without these markers (plain text,
``--template none``) is all ``other``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tca import TcaError
from tca.cache.template import ASSISTANT, BOS, EOS, THINK_CLOSE, THINK_OPEN, USER, render_deepseek

REGIONS = ("other", "prompt", "think", "answer")
FORMATS = ("auto", "conversations", "text")
TEMPLATES = ("deepseek", "chat", "none")
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_CONTENT_KEYS = ("conversations", "messages", "text")


@dataclass
class Document:
    """One record of the data, rendered to the string that gets tokenized."""

    line: int
    """1-based line of a JSONL file, or 1-based row of a Parquet file."""
    text: str
    source: dict[str, str | None]
    """The record's other top-level scalar fields, as strings."""


def read_documents(path: str | Path, fmt: str = "auto", template: str = "deepseek", tokenizer=None) -> Iterator[Document]:
    """The documents of a JSONL or Parquet file, rendered (conversations) or as they are (text)."""
    if fmt not in FORMATS:
        raise TcaError(f"unknown --format {fmt!r}; use one of {list(FORMATS)}.")
    if template not in TEMPLATES:
        raise TcaError(f"unknown --template {template!r}; use one of {list(TEMPLATES)}.")
    path = Path(path)
    if not path.is_file():
        raise TcaError(f"data file {path} does not exist.")
    for line, record in read_records(path):
        kind = fmt if fmt != "auto" else _detect(record, path, line)
        text = _render(record, kind, template, tokenizer, path, line)
        source = {k: None if v is None else str(v) for k, v in record.items() if k not in _CONTENT_KEYS and _scalar(v)}
        yield Document(line=line, text=text, source=source)


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line or row, record) of a JSONL or Parquet file."""
    return _parquet_records(path) if path.suffix == ".parquet" else _jsonl_records(path)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        for line, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError:
                raise TcaError(f"{path} line {line} is not UTF-8 text; pass a JSONL or Parquet file.") from None
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TcaError(f"{path} line {line} is not valid JSON ({exc.msg}).") from None
            if not isinstance(record, dict):
                raise TcaError(f"{path} line {line} is not a JSON object.")
            yield line, record


def _parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        reader = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise TcaError(f"{path} is not a readable Parquet file ({exc}).") from None
    line = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            line += 1
            yield line, record


def _detect(record: dict, path: Path, line: int) -> str:
    if "conversations" in record or "messages" in record:
        return "conversations"
    if "text" in record:
        return "text"
    raise TcaError(f"{path} line {line} has neither 'conversations', 'messages' nor 'text'.")


def _scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def turns_of(record: dict, path: Path, line: int) -> list[tuple[str, str]]:
    """The (role, text) turns of a conversation record; one sentence naming the line when malformed."""
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise TcaError(f"{path} line {line} has no list of conversation turns.")
    turns = []
    for turn in raw:
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in _ROLES or not isinstance(content, str):
            raise TcaError(f"{path} line {line} has a turn without a known role (user/assistant/system) and text.")
        turns.append((_ROLES[role], content))
    return turns


def _render(record: dict, kind: str, template: str, tokenizer, path: Path, line: int) -> str:
    if kind == "text":
        text = record.get("text")
        if not isinstance(text, str):
            raise TcaError(f"{path} line {line} has no string field 'text'.")
        return text
    turns = turns_of(record, path, line)
    if template == "none":
        return "\n\n".join(content for _, content in turns)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TcaError("--template chat needs a target tokenizer with a chat template; use --template deepseek.")
        text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
        # R1's own chat template keeps only what follows </think> in assistant turns (it is
        # written for feeding earlier turns back), which would silently drop every trace's thinking
        if any(thinking(c) not in text for r, c in turns if r == "assistant"):
            raise TcaError(f"{path} line {line}: the target's chat template drops the assistant's thinking "
                           "(as R1's does), so --template chat would lose the traces; use --template deepseek.")
        return text
    return render_turns_deepseek(turns)


def thinking(content: str) -> str:
    """The reasoning of an assistant turn: what comes before its last ``</think>``, without the
    opening ``<think>`` and surrounding whitespace (empty when the turn does not think)."""
    if THINK_CLOSE not in content:
        return ""
    head = content.rsplit(THINK_CLOSE, 1)[0]
    return head.split(THINK_OPEN, 1)[-1].strip()


def render_turns_deepseek(turns: list[tuple[str, str]]) -> str:
    """Any number of turns in the DeepSeek-R1 layout (a system turn goes right after BOS)."""
    if len(turns) == 2 and [r for r, _ in turns] == ["user", "assistant"]:
        return render_deepseek(turns[0][1], turns[1][1])
    parts = [BOS]
    for role, content in turns:
        if role == "system":
            parts.append(content)
        elif role == "user":
            parts.append(USER + content)
        else:
            parts.append(ASSISTANT + content + EOS)
    return "".join(parts)


_MARKERS = re.compile("|".join(re.escape(m) for m in (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE)))
# (region of the marker itself, region of the text after it)
_TRANSITIONS = {
    BOS: ("other", "other"),
    EOS: ("other", "other"),
    USER: ("prompt", "prompt"),
    ASSISTANT: ("prompt", "answer"),
    THINK_OPEN: ("think", "think"),
    THINK_CLOSE: ("think", "answer"),
}


def char_regions(text: str) -> np.ndarray:
    """The region code (index into ``REGIONS``) of every character of ``text``."""
    codes = np.zeros(len(text), dtype=np.int8)
    state, at = "other", 0
    for m in _MARKERS.finditer(text):
        codes[at : m.start()] = REGIONS.index(state)
        marker_region, state = _TRANSITIONS[m.group()]
        codes[m.start() : m.end()] = REGIONS.index(marker_region)
        at = m.end()
    codes[at:] = REGIONS.index(state)
    return codes
