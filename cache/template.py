"""How a conversation becomes one string: the DeepSeek-R1 layout and its regions.

Reasoning traces are stored as ``{"conversations": [{"from": "user", "value": …},
{"from": "assistant", "value": "<think>\\n…\\n</think>\\n\\nanswer"}]}``. The DeepSeek-R1
layout renders them as ``<｜begin▁of▁sentence｜><｜User｜>question<｜Assistant｜><think>\\n…``
and keeps the thinking, which some chat templates strip from earlier turns.
"""

from __future__ import annotations

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# A Jinja chat template that renders exactly the layout of ``render_deepseek``; with
# ``add_generation_prompt`` it opens the assistant turn and its thinking.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK_OPEN + "\n{% endif %}"
)


def render_deepseek(question: str, response: str | None = None) -> str:
    """The DeepSeek-R1 layout of one exchange; without ``response``, the generation prompt."""
    prompt = f"{BOS}{USER}{question}{ASSISTANT}"
    if response is None:
        return prompt + THINK_OPEN + "\n"
    return prompt + response + EOS
