"""The demo pair's tokenizer: a byte-level BPE built exactly the way Qwen2's is.

transformers 5 picks the tokenizer class from the model type, so a ``qwen2`` folder loads
``Qwen2Tokenizer``, which rebuilds its pipeline (NFC, Qwen2's split regex, byte-level BPE,
no post-processor) from the vocabulary and merges alone and ignores any other pipeline a
``tokenizer.json`` describes. Training the BPE on that very pipeline makes what
``AutoTokenizer`` loads identical to what the models were trained with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer

from tca.cache.template import (
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
)

# The split regex of Qwen2's tokenizer (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE]


def _qwen2_pipeline(model: BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> Qwen2Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` entries on ``corpus`` (deterministic)."""
    raw = _qwen2_pipeline(BPE())
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer=trainer)
    model = raw.model
    vocab = raw.get_vocab()
    merges = _merges_of(model)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, THINK_OPEN, THINK_CLOSE],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    return tok


def _merges_of(model: BPE) -> list[tuple[str, str]]:
    """The merges of a trained BPE model, in priority order."""
    state = json.loads(Tokenizer(model).to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state]
