"""The logit lens of decoder directions: which tokens a feature pushes up and down.

A feature's decoder row is added to the residual stream, so its direct effect on the output
is that row passed through the target's final norm and unembedding. Only those two tensors
are read (safetensors loads single tensors), never the whole model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from tca import TcaError

log = logging.getLogger(__name__)

_NORM = "model.norm.weight"
_UNEMBED = ("lm_head.weight", "model.embed_tokens.weight")  # the second when embeddings are tied


LENS_BATCH = 1024
"""Decoder rows scored against the vocabulary at once (the index's memory plan counts them)."""


@dataclass
class LogitLens:
    """The target's final RMSNorm and unembedding, with the tokenizer that names the logits."""

    norm_weight: torch.Tensor
    """[d] final RMSNorm scale."""
    unembed: torch.Tensor
    """[vocab, d] output embedding."""
    eps: float
    pieces: list[str]
    """The decoded text of every vocabulary id."""

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> LogitLens:
        """Load only the final norm and unembedding of a Hugging Face checkpoint directory."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.exists():
            raise TcaError(f"{model_dir} is not a model directory (no config.json); pass the target model with --target.")
        config = json.loads(config_path.read_text())
        tensors = _read_tensors(model_dir, [_NORM, *_UNEMBED])
        unembed = tensors.get(_UNEMBED[0], tensors.get(_UNEMBED[1]))
        if _NORM not in tensors or unembed is None:
            raise TcaError(f"{model_dir} has no final norm and unembedding ({_NORM}, {_UNEMBED[0]}) in its safetensors.")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = list(range(unembed.shape[0]))
        # A token that is part of a UTF-8 character decodes to U+FFFD alone; show its raw form instead.
        pieces = [d if "\ufffd" not in d else str(raw) for d, raw in
                  zip(tokenizer.batch_decode([[i] for i in ids]), tokenizer.convert_ids_to_tokens(ids))]
        return cls(tensors[_NORM].float(), unembed.float(), float(config.get("rms_norm_eps", 1e-6)), pieces)

    @property
    def d_model(self) -> int:
        return self.unembed.shape[1]

    def logits(self, directions: torch.Tensor) -> torch.Tensor:
        """[n, vocab] logits of each direction after the final norm."""
        d = directions.float()
        normed = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        return normed @ self.unembed.T

    def top_bottom(self, directions: torch.Tensor, n: int = 10, batch: int = LENS_BATCH) -> tuple[list[list[str]], list[list[str]]]:
        """The ``n`` most promoted and most suppressed tokens of each direction, strongest first."""
        if directions.shape[1] != self.d_model:
            raise TcaError(
                f"the adapter's decoder has width {directions.shape[1]} but the target model's is {self.d_model}; "
                "pass the model the adapter was trained on with --target."
            )
        n = min(n, self.unembed.shape[0])
        top, bottom = [], []
        for start in range(0, directions.shape[0], batch):
            logits = self.logits(directions[start : start + batch])
            for ids, out in ((logits.topk(n).indices, top), ((-logits).topk(n).indices, bottom)):
                out.extend([[self.pieces[i] for i in row] for row in ids.tolist()])
        return top, bottom


def _read_tensors(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Those of ``names`` found in the directory's safetensors files, each read on its own."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in set(names) & set(f.keys()):
                found[name] = f.get_tensor(name)
    return found
