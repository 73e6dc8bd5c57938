"""Instruction data: formats, templates, response-only labels, truncation, packing, groups,
clear errors for bad files, and the generation metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.task.config import ConfigError
from fedlora.task.data import dirichlet_partition, load_data
from fedlora.task.generation import generation_scores, rouge_l
from fedlora.task.instruct import encode_example, pack, read_records
from fedlora.task.templates import render

from .llm_models import model_cfg, model_dir

ALPACA = [{"instruction": "Name the colour.", "input": "The sky", "output": "blue", "cat": "a"},
          {"instruction": "Say hi.", "output": "hi there", "cat": "b"}] * 10
CHAT = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}], "cat": "x"}] * 20


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return model_dir("llama", tmp_path_factory.getbasetemp() / "llm-models")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return model_dir("gpt2", tmp_path_factory.getbasetemp() / "llm-models")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def data_cfg(path: Path, **extra) -> dict:
    return {"name": "instruct", "kind": "instruct", "source": "jsonl", "path": str(path),
            "test_path": None, "format": "auto", "template": "auto", "group_column": None,
            "packing": False, "generation_prompts": 2, "max_new_tokens": 8,
            "test_fraction": 0.2, "split_seed": 0, "max_train_examples": None,
            "max_test_examples": None, **extra}


def test_formats_read_from_jsonl_and_csv(tmp_path):
    alpaca = read_records(write_jsonl(tmp_path / "a.jsonl", ALPACA[:2]), "jsonl")
    assert alpaca[0].messages == [{"role": "user", "content": "Name the colour."},
                                  {"role": "user", "content": "The sky"},
                                  {"role": "assistant", "content": "blue"}]
    assert len(alpaca[1].messages) == 2  # no input: no context turn
    pc = read_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "completion": "A"}]),
                      "jsonl")
    assert pc[0].messages[-1] == {"role": "assistant", "content": "A"}
    share = {"conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]}
    assert read_records(write_jsonl(tmp_path / "s.jsonl", [share]), "jsonl")[0].messages[1] == \
        {"role": "assistant", "content": "yo"}
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('messages,cat\n"[{""role"": ""user"", ""content"": ""hi""}, '
                        '{""role"": ""assistant"", ""content"": ""ho""}]",z\n')
    (record,) = read_records(csv_path, "csv", group_column="cat")
    assert record.group == "z" and record.messages[-1]["content"] == "ho"


@pytest.mark.parametrize("rows, message", [
    ([ALPACA[0], {"instruction": "x", "input": "y"}], ":2: missing field 'output'"),
    ([ALPACA[0], "{not json"], ":2: not a JSON object"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
     ":1: the last message must be the assistant's response"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}],
     ":1: messages[0] is missing field 'content'"),
    ([{"text": "no known fields"}], ":1: cannot tell the record format"),
])
def test_bad_records_name_file_line_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ConfigError) as err:
        read_records(path, "jsonl")
    assert str(path) + message in str(err.value)


def test_missing_group_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [ALPACA[0], {"instruction": "a", "output": "b"}])
    with pytest.raises(ConfigError, match=r"g.jsonl:2: missing field 'cat'"):
        read_records(path, "jsonl", group_column="cat")


def test_truncation_keeps_the_response_and_masks_the_prompt():
    prompt, response = list(range(100, 160)), [1, 2, 3, 4, 5]
    ids, labels, prompt_cut, response_cut = encode_example(prompt, response, 32)
    assert len(ids) == 32 and prompt_cut and not response_cut
    assert ids[-5:] == response and labels[-5:] == response
    assert labels[:-5] == [-100] * 27
    assert ids[:10] == prompt[:10] and ids[26] == prompt[-1]  # head and tail of the prompt
    ids, labels, _, response_cut = encode_example([7, 8], list(range(50)), 16)
    assert response_cut and len(ids) == 16 and labels[0] == -100 and ids[1:] == list(range(15))


def test_packing_keeps_groups_apart_and_examples_whole():
    examples = [([1] * 5, [-100] * 4 + [1]), ([2] * 6, [-100] * 5 + [2]),
                ([3] * 4, [-100] * 3 + [3]), ([4] * 9, [-100] * 8 + [4])]
    rows, groups = pack(examples, [0, 0, 1, 0], 12)
    assert groups == [0, 1, 0]
    assert rows[0][0] == [1] * 5 + [2] * 6 and rows[1][0] == [3] * 4 and rows[2][0] == [4] * 9
    assert all(len(ids) == len(labels) <= 12 for ids, labels in rows)


def test_templates_alpaca_plain_and_chat(llama):
    from fedlora.task.models import load_tokenizer

    tok = load_tokenizer(model_cfg(llama))
    messages = [{"role": "user", "content": "Name it."}, {"role": "user", "content": "ctx"},
                {"role": "assistant", "content": "ans"}]
    prompt, response = render(messages, "alpaca", tok)
    assert "### Instruction:\nName it." in prompt and "### Input:\nctx" in prompt
    assert prompt.endswith("### Response:\n") and response == "ans"
    assert render(messages, "plain", tok) == ("Name it.\n\nctx\n", "ans")
    prompt, response = render(messages, "chat", tok)
    assert prompt.endswith("<|im_start|>assistant\n") and response == "ans<|im_end|>\n"


def test_labels_cover_the_response_only_with_a_chat_template(tmp_path, llama):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    data = load_data(data_cfg(path), model_cfg(llama))
    from fedlora.task.models import load_tokenizer

    tok = load_tokenizer(model_cfg(llama))
    ids, mask, labels = data.train[0]
    assert data.template == "chat"
    assert tok.decode(labels[labels != -100]) == "4<|im_end|>\n"
    assert tok.decode(ids[mask == 1]).endswith("<|im_start|>assistant\n4<|im_end|>\n")
    assert (labels[mask == 0] == -100).all()
    assert data.gen_prompts[0].endswith("<|im_start|>assistant\n") and data.gen_references == \
        ["4", "4"]


def test_group_column_keys_a_non_iid_split(tmp_path, gpt2):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA * 4)
    data = load_data(data_cfg(path, group_column="cat", template="plain"), model_cfg(gpt2))
    assert data.template == "plain" and sorted(data.train_labels.unique().tolist()) == [0, 1]
    parts = dirichlet_partition(data.train_labels, len(data.train), 2, 0.05, 0, min_size=4)
    shares = [torch.bincount(data.train_labels[p], minlength=2).float() / len(p) for p in parts]
    assert max(s.max().item() for s in shares) > 0.9  # small alpha: nearly one group each


def test_rouge_l_and_exact_match():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0
    # LCS "the sat" = 2 of 3 and 2 of 4 tokens: F = 2 * (2/3) * (1/2) / (2/3 + 1/2)
    assert rouge_l("the cat sat", "The dog, sat down") == pytest.approx(4 / 7)
    scores = generation_scores(["tech ", "Sport"], ["tech", "sport"])
    assert scores == {"exact_match": 0.5, "rougeL": 1.0}


def test_bbc_instruct_builds_offline_and_splits_by_section(gpt2):
    from fedlora.task.bbc_instruct import bbc_alpaca

    articles = bbc_alpaca()
    assert len(articles) == 2225 and all(len(a) == 2 for a in articles)
    headline, section = articles[0]
    assert headline["output"] == "Ad sales boost Time Warner profit"
    assert not headline["input"].startswith("Ad sales boost")  # the headline is not given
    assert section["output"] == "business" and section["section"] == "business"
    cfg = {"name": "bbc_instruct", "kind": "instruct", "source": "bbc_news", "path": None,
           "tasks": ["headline", "section"], "article_chars": 300, "template": "auto",
           "group_column": "section", "packing": False, "generation_prompts": 4,
           "max_new_tokens": 8, "test_fraction": 0.1, "split_seed": 0,
           "max_train_examples": 60, "max_test_examples": 10}
    data = load_data(cfg, model_cfg(gpt2, max_length=128))
    assert len(data.train) == 60 and len(data.test) == 10
    assert data.train_labels is not None and len(data.train_labels.unique()) > 1
    assert len(data.gen_prompts) == 4 and data.gen_prompts[0].endswith("### Response:\n")
