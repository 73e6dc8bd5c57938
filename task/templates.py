"""Prompt templates for instruction tuning: the tokenizer's chat template, or a named one.

An instruction example is a list of chat messages ({role, content}) whose last message is
the assistant's response. :func:`render` turns it into (prompt text, response text): the
prompt is everything the model reads before it answers (system and user turns, the
template's markers and the generation prompt), the response is what it is trained to
write. Only the response's tokens carry a loss.

Templates (``data.template``):

- ``auto``: the tokenizer's own chat template when it has one, else ``alpaca``.
- ``chat``: the tokenizer's chat template (an error if it has none).
- ``alpaca``: the Stanford Alpaca prompt ("Below is an instruction ... ### Response:").
- ``plain``: the turns' contents joined by blank lines, the response after a newline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TEMPLATES = ("auto", "chat", "alpaca", "plain")

_ALPACA_HEAD = ("Below is an instruction that describes a task{more}. Write a response "
                "that appropriately completes the request.\n\n")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(name: str, tokenizer: Any) -> str:
    """The concrete template (chat, alpaca or plain) for ``data.template``."""
    if name not in TEMPLATES:
        raise ValueError(f"data.template must be one of {TEMPLATES}, got {name!r}")
    if name == "auto":
        return "chat" if has_chat_template(tokenizer) else "alpaca"
    if name == "chat" and not has_chat_template(tokenizer):
        raise ValueError("data.template=chat but the tokenizer has no chat_template; use "
                         "data.template=alpaca or plain (or add a chat template to "
                         "tokenizer_config.json)")
    return name


def _alpaca_prompt(messages: Sequence[dict[str, str]]) -> str:
    # An Alpaca record arrives as [system?, user(instruction), user(input)?]: the
    # instruction is the first user turn, any further context goes under "### Input:".
    users = [m["content"] for m in messages if m["role"] == "user"]
    systems = [m["content"] for m in messages if m["role"] == "system"]
    instruction = users[0] if users else ""
    context = "\n\n".join(users[1:])
    head = _ALPACA_HEAD.format(more=", paired with an input that provides further context"
                               if context else "")
    text = ("\n\n".join(systems) + "\n\n" if systems else "") + head
    text += f"### Instruction:\n{instruction}\n\n"
    if context:
        text += f"### Input:\n{context}\n\n"
    return text + "### Response:\n"


def render_prompt(messages: Sequence[dict[str, str]], template: str, tokenizer: Any) -> str:
    """The text the model reads before answering (the generation prompt included)."""
    if template == "chat":
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    if template == "alpaca":
        return _alpaca_prompt(messages)
    if template == "plain":
        return "\n\n".join(m["content"] for m in messages) + "\n"
    raise ValueError(f"unknown template {template!r}")


def render(messages: Sequence[dict[str, str]], template: str, tokenizer: Any) -> tuple[str, str]:
    """(prompt, response) of an example whose last message is the assistant's answer."""
    *context, answer = messages
    prompt = render_prompt(context, template, tokenizer)
    if template != "chat":
        return prompt, answer["content"]
    # The template may wrap the answer (end-of-turn markers): the response is whatever
    # the full conversation adds after the generation prompt.
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    return prompt, answer["content"]  # a template that rewrites earlier turns
