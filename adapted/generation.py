"""What a model does when it generates: response length, truncation, hesitation and answer accuracy.

Prompts are questions rendered as generation prompts in the DeepSeek-R1 layout
(``render_deepseek(question)``), so the response starts inside the thinking. Generation is
greedy and stops at the tokenizer's end-of-sentence token (and any other the model's
generation config names); a response that reaches ``max_new_tokens`` first is *truncated*.

**Answers.** A response's final answer is read from the text after its last ``</think>``; a
response that never closes its thinking (a truncated R1 trace) has none. In that text the last
``\\boxed{…}`` or ``\\fbox{…}`` holds the answer (R1 boxes its final answer after the thinking,
and a later box corrects an earlier one), its argument read with balanced braces (so
``\\boxed{\\frac{1}{2}}`` is whole); a last box whose argument never closes gives no answer. Without
any box the whole text is the answer (the demo pair answers bare). A record's reference answer
is read from its assistant turn the same way, and answers match when they are equal after
``normalize_answer``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from tca import TcaError
from tca.adapted.splice import paired
from tca.cache.memory import Workload
from tca.cache.template import THINK_CLOSE, render_deepseek

log = logging.getLogger(__name__)

HESITATION_WORDS = ("Wait",)
"""The hesitation words every command counts (and the study attributes) unless told otherwise:
the word that opens most re-checks in R1 traces and in the demo pair's, and one token of both
tokenizers. On R1 traces pass ``Wait,Hmm,Alternatively`` for the wider set."""


# ---- answers ------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_UNBRACED_ARG_RE = re.compile(r"[^\s${}]+")


def _group(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == "{"`` and the index after its
    closing brace; None when it never closes. Escaped characters (``\\{``, ``\\}``) do not count."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def boxed(text: str) -> list[str | None]:
    """The argument of every top-level ``\\boxed`` / ``\\fbox`` in ``text``, in order; None for one
    whose argument never closes. ``\\boxed{…}`` takes a brace group; the unbraced ``\\boxed 5`` (as
    MATH writes it) takes the characters up to the next space, ``$`` or brace."""
    out: list[str | None] = []
    at = 0
    while (m := _BOX_RE.search(text, at)) is not None:
        i = m.end()
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            group = _group(text, i)
            if group is None:
                out.append(None)
                break
            out.append(group[0])
            at = group[1]
        else:
            arg = _UNBRACED_ARG_RE.match(text, i)
            out.append(arg.group() if arg else None)
            at = arg.end() if arg else i
    return out


def final_answer(response: str) -> str | None:
    """The answer a response gives after its thinking (see the module docstring), stripped; None
    when it never closes its thinking or its last box never closes."""
    if THINK_CLOSE not in response:
        return None
    tail = response.rsplit(THINK_CLOSE, 1)[1]
    boxes = boxed(tail)
    answer = boxes[-1] if boxes else tail
    return None if answer is None else answer.strip()


_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_UNIT_RE = re.compile(r"(?<=.)\\(?:text|mbox)\{\s[^{}]*\}$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_FRAC_STYLE_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SIZING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[!,;: ]|\\q?quad(?![A-Za-z])|~")
_DEGREES_RE = re.compile(r"\^\{?\\circ\}?")
_SLASH_FRACTION_RE = re.compile(r"^(-?)(\d+)/(\d+)$")
_VARIABLE_RE = re.compile(r"^[A-Za-z]=(?=.)")
_NUMBER_RE = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d*)(?:\.\d*)?$")


def _braced_args(text: str, macro: str, n: int) -> str:
    """``text`` with the first ``n`` arguments of every ``\\macro`` in braces: ``\\frac12`` becomes
    ``\\frac{1}{2}``, as LaTeX reads it (an unbraced argument is one character)."""
    pattern = re.compile(re.escape("\\" + macro) + r"(?![A-Za-z])")
    out, at = [], 0
    while (m := pattern.search(text, at)) is not None:
        out.append(text[at : m.end()])
        i = m.end()
        for _ in range(n):
            if i < len(text) and text[i] == "{":
                group = _group(text, i)
                if group is None:
                    break
                out.append("{" + group[0] + "}")
                i = group[1]
            elif i < len(text) and text[i] not in "\\[":  # a command or \sqrt's optional [n]
                out.append("{" + text[i] + "}")
                i += 1
            else:
                break
        at = i
    out.append(text[at:])
    return "".join(out)


def _canonical_number(text: str) -> str:
    """A plain decimal without thousands commas, a bare leading point or trailing zeros:
    ``1,000`` → ``1000``, ``.5`` → ``0.5``, ``2.50`` → ``2.5``, ``3.0`` → ``3``."""
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    digits = digits.replace(",", "")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    if not digits or digits.startswith("."):
        digits = "0" + digits
    return sign + digits


def normalize_answer(answer: str) -> str:
    """An answer in the form two equal MATH-style answers share, so that writing differences do
    not count as wrong answers:

    - surrounding ``$…$``, ``\\(…\\)``, ``\\[…\\]``, whitespace and a trailing period go;
    - a trailing unit ``\\text{ cm}`` (text after a space, after something else) goes, and other
      ``\\text{…}`` / ``\\mathrm{…}`` / ``\\mbox{…}`` keep their content (``\\text{(A)}`` is ``(A)``);
    - ``\\dfrac`` / ``\\tfrac`` are ``\\frac``; ``\\left`` / ``\\right`` and the spacing commands
      ``\\!  \\,  \\;  \\:  \\quad  ~`` go, then every space;
    - degrees (``^\\circ``) and percent signs go;
    - unbraced arguments get braces (``\\frac12`` is ``\\frac{1}{2}``, ``\\sqrt3`` is ``\\sqrt{3}``),
      and an integer ratio ``1/2`` is ``\\frac{1}{2}``;
    - a single-letter variable in front (``x=5``) goes;
    - a plain number loses thousands commas and trailing zeros after the point (``1,000.50`` is
      ``1000.5``) and gains a zero before a bare point (``.5`` is ``0.5``).

    Mathematical equivalence (``0.5`` against ``\\frac{1}{2}``, reordered sums) is not judged.
    """
    text = answer
    while True:
        before = text
        text = text.strip().removesuffix(".").strip()
        for left, right in _DELIMITERS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left) : -len(right)]
                break
        if text == before:
            break
    text = _UNIT_RE.sub("", text)
    text = _TEXT_RE.sub(r"\1", text)
    text = _FRAC_STYLE_RE.sub(r"\\frac", text)
    text = _SIZING_RE.sub("", text)
    text = _SPACING_RE.sub("", text)
    text = re.sub(r"\s+", "", text)
    text = _DEGREES_RE.sub("", text).replace("\\%", "").replace("%", "")
    text = text.removesuffix(".")
    text = _braced_args(_braced_args(text, "frac", 2), "sqrt", 1)
    text = _SLASH_FRACTION_RE.sub(r"\1\\frac{\2}{\3}", text)
    text = _VARIABLE_RE.sub("", text)
    if _NUMBER_RE.match(text) and any(c.isdigit() for c in text):
        text = _canonical_number(text)
    return text


def answers_match(answer: str | None, truth: str | None) -> bool:
    """Whether a response's final answer is the reference's (no answer never matches)."""
    return answer is not None and truth is not None and normalize_answer(answer) == normalize_answer(truth)


# ---- hesitations --------------------------------------------------------------------------------


def check_words(words: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The hesitation words stripped of surrounding spaces; one sentence when there are none."""
    stripped = tuple(dict.fromkeys(w.strip() for w in words if w.strip()))
    if not stripped:
        raise TcaError("no hesitation words were given; pass at least one, e.g. --words Wait.")
    return stripped


def _any_of(words: tuple[str, ...]) -> str:
    """A regex group matching any of the words, the longest first (so "Hmm" never cuts "Hmmm" short)."""
    return "(?:" + "|".join(map(re.escape, sorted(check_words(words), key=len, reverse=True))) + ")"


@lru_cache(maxsize=16)
def _hesitation_re(words: tuple[str, ...]) -> re.Pattern:
    return re.compile(r"(?<!\w)" + _any_of(words) + r"(?!\w)")


def count_hesitations(text: str, words: tuple[str, ...] | list[str] = HESITATION_WORDS) -> int:
    """How many times ``words`` occur in ``text`` as whole words (case-sensitive; a word's
    surrounding spaces, as in the token ``" Wait"``, are ignored)."""
    return len(_hesitation_re(tuple(words)).findall(text))


@lru_cache(maxsize=16)
def _recheck_re(words: tuple[str, ...]) -> re.Pattern:
    opening = r"(?:^|(?<=\n)|(?<=[.!?] ))[ \t]*"  # the start of the text, a line or a sentence
    going_on = r"[,.!?:…]*[ ]+[^\W\d_]"  # then words on the same line: "Wait, let me", "Hmm. So"
    return re.compile(opening + _any_of(words) + going_on, re.MULTILINE)


def count_rechecks(text: str, words: tuple[str, ...] | list[str] = HESITATION_WORDS) -> int:
    """How many times a word of ``words`` opens a sentence or line and words follow it ("Wait, let
    me check…", "Hmm, so"): a hesitation as a reasoning model writes one. A word written where a
    digit or another token belongs ("5+4=Wait", "Wait+4=8", a line of "Wait" alone) is a hesitation
    word to ``count_hesitations`` but no re-check."""
    return len(_recheck_re(tuple(words)).findall(text))


# ---- generating and scoring ---------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """One generated response."""

    ids: list[int]
    """Generated token ids, the stop token and anything after it removed."""
    truncated: bool
    """It reached ``max_new_tokens`` before any stop token: cut off, so it has no final answer."""


@dataclass(frozen=True)
class Figures:
    """One model's behaviour on a set of prompts."""

    accuracy: float | None
    """Fraction of responses whose final answer matches the reference's (None: no checkable answers)."""
    mean_length: float
    """Mean number of generated tokens per response, the end-of-sentence token excluded."""
    truncated: float
    """Fraction of responses cut off at ``max_new_tokens``; each counts as wrong, so a high share
    means the accuracy measures the limit, not the model."""
    hesitations: float
    """Mean number of hesitation words per response."""
    hesitating: float
    """Fraction of responses with at least one hesitation."""
    n: int
    """Number of prompts."""


def questions_of(records: list[dict]) -> list[str]:
    """The user turn of each conversation record."""
    return [r["conversations"][0]["value"] for r in records]


def workload(command: str, batches: list = (), tokenizer=None, records: list[dict] = (), *, gen_batch: int = 0,
             new_tokens: int = 0, **sizes) -> Workload:
    """The sizes of a command's passes, read off its data before any weights load, for the memory
    plan: the largest teacher-forced batch (``TokenBatch``es) and the longest prompt generated from."""
    prompt_len = max((len(tokenizer(render_deepseek(q), add_special_tokens=False).input_ids)
                      for q in questions_of(records)), default=0) if records else 0
    return Workload(
        command, tokens=max((b.input_ids.numel() for b in batches), default=0),
        seq_len=max((b.input_ids.shape[1] for b in batches), default=0),
        gen_batch=min(gen_batch, len(records)) if records else 0, prompt_len=prompt_len,
        new_tokens=new_tokens if records else 0, **sizes)


def stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a response: the tokenizer's end-of-sentence and those of the model's
    generation config (which may name several)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id} | set(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise TcaError("the target's tokenizer has no end-of-sentence token, so a response could never end.")
    return sorted(ids)


class _FollowSecondHalf(LogitsProcessor):
    """Patched generation: the first half of the rows (the adapted model, the activations'
    source) takes the second half's scores, so both write the patched model's text."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        half = scores.shape[0] // 2
        return torch.cat([scores[half:], scores[half:]])


@torch.no_grad()
def generate(
    model,
    tokenizer,
    questions: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 128,
    desc: str = "generate",
    banned: list[int] | None = None,
) -> list[Response]:
    """Greedy responses to ``questions``, each ended at its first stop token (``stop_ids``) or
    cut at ``max_new_tokens``; ``banned`` token ids are never generated. A model in ``patched``
    mode (``tca.adapted.splice``) generates each prompt twice in one batch, the adapted copy
    following the patched copy's tokens, and the patched copy's responses are returned."""
    tokenizer.padding_side = "left"
    stops = stop_ids(model, tokenizer)
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, stops[0]) if t is not None)
    device = next(model.parameters()).device
    responses = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False):
        prompts = [render_deepseek(q) for q in questions[start : start + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        twice = paired(model)
        if twice:
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad,
            bad_words_ids=[[t] for t in banned] if banned else None,
            logits_processor=LogitsProcessorList([_FollowSecondHalf()]) if twice else None,
        )
        if twice:
            out = out[out.shape[0] // 2 :]
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            # a row that never stopped ran all max_new_tokens steps: nothing in it is padding
            responses.append(Response(row, True) if end is None else Response(row[:end], False))
    cut = sum(r.truncated for r in responses)
    if cut:
        log.warning("%s: %d of %d responses reached the limit of %d new tokens before ending and count as "
                    "unanswered; raise --max-new-tokens", desc, cut, len(responses), max_new_tokens)
    return responses


def score(
    tokenizer, records: list[dict], responses: list[Response], words: tuple[str, ...] | list[str] = HESITATION_WORDS
) -> Figures:
    """Figures of ``responses`` against the reference answers in ``records`` (same order),
    counting ``words`` as hesitations."""
    correct = checkable = hesitations = hesitating = length = truncated = 0
    for record, response in zip(records, responses, strict=True):
        text = tokenizer.decode(response.ids, skip_special_tokens=False)
        truth = final_answer(record["conversations"][1]["value"]) if len(record["conversations"]) > 1 else None
        if truth is not None:
            checkable += 1
            correct += answers_match(final_answer(text), truth)
        n_words = count_hesitations(text, words)
        hesitations += n_words
        hesitating += n_words > 0
        length += len(response.ids)
        truncated += response.truncated
    n = len(records)
    return Figures(correct / checkable if checkable else None, length / n, truncated / n, hesitations / n,
                   hesitating / n, n)


def figures_table(figures: dict[str, Figures]) -> str:
    """A Markdown table of the figures, one row per model."""
    header = "| model | accuracy | mean response length (tokens) | truncated | hesitations per response | "
    rows = [header + "responses hesitating |", "|---|---:|---:|---:|---:|---:|"]
    for name, f in figures.items():
        acc = "n/a" if f.accuracy is None else f"{f.accuracy:.3f}"
        rows.append(f"| {name} | {acc} | {f.mean_length:.1f} | {f.truncated:.3f} | {f.hesitations:.2f} | "
                    f"{f.hesitating:.3f} |")
    return "\n".join(rows)


def figures_json(figures: dict[str, Figures]) -> dict[str, dict]:
    return {name: asdict(f) for name, f in figures.items()}
