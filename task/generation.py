"""Greedy generation from a causal LM, and the scores of generated answers.

Metric names follow the Hugging Face ``evaluate`` library: ``exact_match`` (the share of
answers equal to the reference, surrounding whitespace ignored) and ``rougeL`` (the mean
ROUGE-L F-measure). ROUGE-L is computed here from the longest common subsequence of
tokens, tokenized as the ``rouge_score`` package does by default (lower case, runs of
non-alphanumeric characters as separators, no stemming), so no extra package is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[-1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference."""
    pred, ref = _tokens(prediction), _tokens(reference)
    common = _lcs(pred, ref)
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{"exact_match", "rougeL"}: means over the answers."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need as many predictions as references, at least one")
    n = len(predictions)
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references,
                                                                   strict=True)) / n,
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / n,
    }


def prompt_ids(tokenizer: Any, prompt: str, template: str, room: int,
               vocab_cap: int | None = None) -> list[int]:
    """A templated prompt's tokens, its middle cut to ``room`` as in training."""
    from .instruct import encode_example

    ids = tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]
    if vocab_cap is not None:
        ids = [t % vocab_cap for t in ids]
    return encode_example(ids, [], max(1, room))[0]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, template: str,
             max_length: int, max_new_tokens: int = 32, vocab_cap: int | None = None,
             device: torch.device | None = None) -> list[str]:
    """Greedy answers to templated prompts (one at a time: no padding to get wrong)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt, template,
                                       max_length - max_new_tokens, vocab_cap)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=pad, use_cache=True)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
