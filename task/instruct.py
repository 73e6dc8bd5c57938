"""Instruction-tuning data for causal LMs: read, template, tokenize with response-only loss.

Records come from a local JSONL, CSV or ``datasets.load_from_disk`` file (``data.source``)
in one of three formats (``data.format``, ``auto`` picks from the first record's fields):

- ``alpaca``: ``instruction``, optional ``input``, ``output``;
- ``chat``: ``messages``, a list of ``{role, content}`` whose last turn is the assistant's
  (ShareGPT's ``conversations`` of ``{from, value}`` is read too); earlier assistant turns
  are context, the last one is the response;
- ``prompt_completion``: ``prompt`` and ``completion``.

Each record becomes (prompt, response) text through :mod:`fedlora.task.templates`, then
tokens with labels -100 on every prompt token, so the loss (and under DP each sequence's
clipped gradient) covers the response only. A record longer than ``model.max_length``
loses the end of its prompt's longest turn (an article, say; the instruction and the
template's markers stay whole), then if need be the middle of the prompt's tokens; the
response is cut only if it alone does not fit.
``data.packing`` packs whole examples of one group into shared rows.

``data.group_column`` names a metadata field (e.g. a category): its values become the
partition key, so ``federation.dirichlet_alpha`` draws a non-IID split over it. A bad
record is a :class:`~fedlora.task.config.ConfigError` naming the file, line and field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from .config import ConfigError
from .data import TokenizedData, _split
from .templates import render, render_prompt, resolve_template

FORMATS = ("auto", "alpaca", "chat", "prompt_completion")
_FIELDS = {"alpaca": ("instruction", "output"), "chat": ("messages",),
           "prompt_completion": ("prompt", "completion")}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}


@dataclass
class InstructData(TokenizedData):
    """Tokenized instruction data plus the held-out prompts generation is scored on."""

    gen_prompts: list[str] = field(default_factory=list)  # templated, ready to tokenize
    gen_references: list[str] = field(default_factory=list)
    template: str = "alpaca"
    truncated_prompts: int = 0  # examples whose prompt lost its middle
    truncated_responses: int = 0  # examples whose response alone exceeded max_length


@dataclass
class Record:
    messages: list[dict[str, str]]
    group: str
    where: str  # "file:line", for error messages


# -- reading -------------------------------------------------------------------------
def _rows(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    """(location, raw row) pairs of a JSONL, CSV or datasets-on-disk file."""
    if not path.exists():
        raise ConfigError(f"data.path {path} does not exist")
    if source == "jsonl":
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}:{number}: not a JSON object ({exc.msg})") from exc
    elif source == "csv":
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    elif source == "disk":
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"]
        for index, row in enumerate(loaded):
            yield f"{path} row {index}", row
    else:
        raise ConfigError(f"instruction data reads data.source jsonl, csv or disk, got {source!r}")


def detect_format(row: Mapping[str, Any], where: str) -> str:
    if "messages" in row or "conversations" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row:
        return "alpaca"
    raise ConfigError(f"{where}: cannot tell the record format from its fields {sorted(row)}; "
                      "expected instruction/input/output (alpaca), messages (chat) or "
                      "prompt/completion; or set data.format")


def _text(row: Mapping[str, Any], key: str, where: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and key != "input"):
        raise ConfigError(f"{where}: missing field {key!r} ({fmt} records need "
                          f"{', '.join(_FIELDS[fmt])})")
    return str(value)


def _chat(row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    turns = row.get("messages", row.get("conversations"))
    if isinstance(turns, str):  # a CSV cell holds the list as JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: field 'messages' is not a JSON list ({exc.msg})") from exc
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: missing field 'messages' (chat records need a non-empty "
                          "list of {role, content})")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ConfigError(f"{where}: messages[{i}] is not an object")
        role = turn.get("role", _SHAREGPT_ROLES.get(str(turn.get("from"))))
        content = turn.get("content", turn.get("value"))
        if role is None:
            raise ConfigError(f"{where}: messages[{i}] is missing field 'role'")
        if content is None:
            raise ConfigError(f"{where}: messages[{i}] is missing field 'content'")
        messages.append({"role": str(role), "content": str(content)})
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's response "
                          f"(role 'assistant'), got role {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise ConfigError(f"{where}: a chat record needs a prompt turn before the response")
    return messages


def to_messages(row: Mapping[str, Any], fmt: str, where: str) -> list[dict[str, str]]:
    """A record as chat messages ending with the assistant's response."""
    if not isinstance(row, Mapping):
        raise ConfigError(f"{where}: a record must be an object, got {type(row).__name__}")
    if fmt == "chat":
        return _chat(row, where)
    if fmt == "alpaca":
        messages = [{"role": "user", "content": _text(row, "instruction", where, fmt)}]
        context = row.get("input")
        if context is not None and str(context).strip():
            messages.append({"role": "user", "content": str(context)})
        return messages + [{"role": "assistant", "content": _text(row, "output", where, fmt)}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _text(row, "prompt", where, fmt)},
                {"role": "assistant", "content": _text(row, "completion", where, fmt)}]
    raise ConfigError(f"data.format must be one of {FORMATS}, got {fmt!r}")


def read_records(path: str | Path, source: str, fmt: str = "auto",
                 group_column: str | None = None) -> list[Record]:
    """Every record of an instruction file, validated; errors name the file and line."""
    path = Path(str(path)).expanduser()
    if fmt not in FORMATS:
        raise ConfigError(f"data.format must be one of {FORMATS}, got {fmt!r}")
    records = []
    for where, row in _rows(path, source):
        if fmt == "auto":
            fmt = detect_format(row, where) if isinstance(row, Mapping) else "alpaca"
        group = ""
        if group_column:
            if not isinstance(row, Mapping) or row.get(group_column) in (None, ""):
                raise ConfigError(f"{where}: missing field {group_column!r} "
                                  "(data.group_column)")
            group = str(row[group_column])
        records.append(Record(to_messages(row, fmt, where), group, where))
    if not records:
        raise ConfigError(f"{path} holds no records")
    return records


# -- tokenizing ----------------------------------------------------------------------
def encode_example(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int
                   ) -> tuple[list[int], list[int], bool, bool]:
    """(ids, labels, prompt_cut, response_cut): labels -100 on the prompt; the prompt's
    middle gives way first, the response is cut only past ``max_length - 1`` tokens."""
    prompt, response = list(prompt_ids), list(response_ids)
    response_cut = len(response) > max_length - 1
    if response_cut:  # at least one prompt token: the first position predicts nothing
        response = response[: max_length - 1]
    room = max_length - len(response)
    prompt_cut = len(prompt) > room
    if prompt_cut:
        tail = min(32, room // 4)
        prompt = prompt[: room - tail] + (prompt[len(prompt) - tail:] if tail else [])
    return prompt + response, [-100] * len(prompt) + response, prompt_cut, response_cut


def _rows_to_dataset(rows: list[tuple[list[int], list[int]]], max_length: int, pad: int
                     ) -> TensorDataset:
    n = len(rows)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    labels = torch.full((n, max_length), -100, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return TensorDataset(ids, mask, labels)


def pack(examples: list[tuple[list[int], list[int]]], groups: list[int], max_length: int
         ) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Whole examples of one group packed greedily, in order, into rows of <= max_length.

    Every example starts with a prompt token labelled -100, so no token is trained to
    follow the previous example's end (attention does cross the boundary, as usual)."""
    rows: list[tuple[list[int], list[int]]] = []
    row_groups: list[int] = []
    open_row: dict[int, int] = {}  # group -> index of its row still filling
    for (ids, labels), group in zip(examples, groups, strict=True):
        at = open_row.get(group)
        if at is not None and len(rows[at][0]) + len(ids) <= max_length:
            rows[at][0].extend(ids)
            rows[at][1].extend(labels)
            continue
        open_row[group] = len(rows)
        rows.append((list(ids), list(labels)))
        row_groups.append(group)
    return rows, row_groups


def _shorten(messages: list[dict[str, str]], excess: int, tokenizer: Any
             ) -> list[dict[str, str]]:
    """The prompt turns with the longest one's content cut by about ``excess`` tokens
    (from its end): the instruction and the template's markers stay whole."""
    *context, answer = messages
    longest = max(range(len(context)), key=lambda i: len(context[i]["content"]))
    ids = tokenizer(context[longest]["content"], add_special_tokens=False)["input_ids"]
    keep = max(0, len(ids) - excess - 2)  # a margin: re-tokenizing may merge differently
    cut = dict(context[longest], content=tokenizer.decode(ids[:keep]))
    return [*context[:longest], cut, *context[longest + 1:], answer]


def tokenize_records(records: list[Record], tokenizer: Any, template: str, max_length: int,
                     *, vocab_cap: int | None = None) -> tuple[list[tuple[list[int], list[int]]],
                                                               int, int]:
    """(examples, prompts cut, responses cut) for templated records."""
    # Named templates are plain text: the tokenizer adds its BOS; a chat template writes
    # its own special tokens, and the response gets the template's end-of-turn marker
    # instead of EOS.
    add_special = template != "chat"
    eos = [] if template == "chat" or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    texts = [render(r.messages, template, tokenizer) for r in records]
    # Prompt and response are tokenized apart so no token straddles the boundary.
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=add_special)["input_ids"]
    responses = [ids + eos for ids in tokenizer([r for _, r in texts],
                                                add_special_tokens=False)["input_ids"]]
    shortened = [False] * len(records)
    for i, record in enumerate(records):
        # A prompt too long loses the end of its longest turn's text (an article, say);
        # encode_example then cuts the middle of whatever still does not fit.
        room = max_length - min(len(responses[i]), max_length - 1)
        if len(prompts[i]) > room and len(record.messages) > 1:
            shorter = _shorten(record.messages, len(prompts[i]) - room, tokenizer)
            prompt = render_prompt(shorter[:-1], template, tokenizer)
            prompts[i] = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
            shortened[i] = True
    out, prompt_cuts, response_cuts = [], 0, 0
    for p_ids, r_ids, was_cut in zip(prompts, responses, shortened, strict=True):
        if vocab_cap is not None:  # in-memory tiny models: fold the vocabulary into theirs
            p_ids, r_ids = [t % vocab_cap for t in p_ids], [t % vocab_cap for t in r_ids]
        ids, labels, p_cut, r_cut = encode_example(p_ids, r_ids, max_length)
        prompt_cuts += was_cut or p_cut
        response_cuts += r_cut
        out.append((ids, labels))
    return out, prompt_cuts, response_cuts


def build_instruct(data_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any]) -> InstructData:
    """Tokenized train/test instruction data for a data and model config."""
    from .models import load_tokenizer

    if model_cfg.get("task") != "causal_lm":
        raise ConfigError("instruction data (data.kind=instruct) needs a causal LM: set "
                          "model.task=causal_lm")
    group_column = data_cfg.get("group_column") or None
    test_records = None
    if data_cfg["source"] == "bbc_news":
        from .bbc_instruct import bbc_records

        # One unit per article (its headline and section examples): the held-out split
        # never shares an article with the training split.
        units = bbc_records(list(data_cfg.get("tasks") or ["headline", "section"]),
                            int(data_cfg.get("article_chars") or 0))
    else:
        fmt = str(data_cfg.get("format") or "auto")
        units = [[r] for r in read_records(data_cfg["path"], data_cfg["source"], fmt,
                                           group_column)]
        test_path = data_cfg.get("test_path")
        if test_path:
            test_records = read_records(test_path, data_cfg["source"], fmt, group_column)
    names = sorted({unit[0].group for unit in units})
    index = {name: i for i, name in enumerate(names)}
    if test_records is None:
        raw = _split(units, [index[u[0].group] for u in units], names,
                     float(data_cfg["test_fraction"]), int(data_cfg["split_seed"]))
        train = [r for unit in raw.train_text for r in unit]
        test = [r for unit in raw.test_text for r in unit]
    else:
        train, test = [r for unit in units for r in unit], test_records
    if data_cfg.get("max_train_examples"):
        train = train[: int(data_cfg["max_train_examples"])]
    if data_cfg.get("max_test_examples"):
        test = test[: int(data_cfg["max_test_examples"])]
    tokenizer = load_tokenizer(model_cfg)
    template = resolve_template(str(data_cfg.get("template") or "auto"), tokenizer)
    max_length = int(model_cfg["max_length"])
    cap = int(model_cfg["vocab_size"]) if str(model_cfg["source"]).startswith("tiny") else None
    train_ex, p_cut, r_cut = tokenize_records(train, tokenizer, template, max_length,
                                              vocab_cap=cap)
    test_ex, _, _ = tokenize_records(test, tokenizer, template, max_length, vocab_cap=cap)
    groups = [index.get(r.group, 0) for r in train]
    if data_cfg.get("packing"):
        train_ex, groups = pack(train_ex, groups, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_gen = min(int(data_cfg.get("generation_prompts") or 0), len(test))
    gen = test[:n_gen]
    return InstructData(
        train=_rows_to_dataset(train_ex, max_length, pad),
        test=_rows_to_dataset(test_ex, max_length, pad),
        label_names=[],
        # The partition key: the group of each training row (one group: an IID split).
        train_labels=torch.tensor(groups) if group_column and len(names) > 1 else None,
        gen_prompts=[render_prompt(r.messages[:-1], template, tokenizer) for r in gen],
        gen_references=[r.messages[-1]["content"] for r in gen],
        template=template, truncated_prompts=p_cut, truncated_responses=r_cut,
    )
