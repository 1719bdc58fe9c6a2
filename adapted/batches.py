"""Teacher-forced token batches from a dataset, for the stages that run whole models
(refinement, evaluation, attribution) rather than reading the cache.

Documents are read and rendered exactly as the harvester reads them (``tca.cache.data``),
tokenized with the target's tokenizer (special tokens added only for un-templated text, since
the templates write their own), cut to ``seq_len`` and padded on the right into batches of
``batch_size`` documents. Padding is masked by ``attention_mask``: every consumer must ignore
positions where it is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tca import TcaError
from tca.cache.data import read_documents


@dataclass
class TokenBatch:
    input_ids: torch.Tensor
    """[B, T] token ids, right-padded."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens, 0 for padding."""
    docs: list[int]
    """The 0-based index of each row's document in the dataset."""

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.docs)


def tokenize_documents(
    data: str | Path,
    tokenizer,
    *,
    seq_len: int,
    max_tokens: int | None = None,
    fmt: str = "auto",
    template: str = "deepseek",
) -> list[list[int]]:
    """The token ids of each document, cut to ``seq_len``, until ``max_tokens`` are gathered."""
    add_special = template == "none"
    docs, total = [], 0
    for doc in read_documents(data, fmt, template, tokenizer):
        ids = tokenizer(doc.text, add_special_tokens=add_special)["input_ids"][:seq_len]
        if max_tokens is not None and total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        if len(ids) >= 2:  # a next-token target needs at least two tokens
            docs.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not docs:
        raise TcaError(f"{data} holds no document with at least two tokens.")
    return docs


def batches_of(docs: list[list[int]], batch_size: int, pad_id: int, *, first_doc: int = 0) -> list[TokenBatch]:
    """Right-padded batches of ``batch_size`` documents, in order."""
    out = []
    for start in range(0, len(docs), batch_size):
        group = docs[start : start + batch_size]
        width = max(len(d) for d in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, d in enumerate(group):
            ids[row, : len(d)] = torch.tensor(d)
            mask[row, : len(d)] = 1
        out.append(TokenBatch(ids, mask, list(range(first_doc + start, first_doc + start + len(group)))))
    return out


def token_batches(data: str | Path, tokenizer, *, seq_len: int, max_tokens: int | None, batch: int) -> list[TokenBatch]:
    """Teacher-forced batches of ``data``, rendered and tokenized as the harvester does."""
    docs = tokenize_documents(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    return batches_of(docs, batch, pad_id_of(tokenizer))


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id, falling back to end-of-sentence (masked either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0
