"""Causal LMs from real Hugging Face directories: family targets, GPT-2's Conv1D, exact
loss masking, the refusals that name why, and the memory estimate against measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora.task.config import ConfigError, compose_job
from fedlora.task.evaluate import forward, loss_of
from fedlora.task.llm import check_llm, default_targets
from fedlora.task.models import build_model

from .conftest import ROOT
from .llm_models import model_cfg, model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "llm-models"
    return {family: model_dir(family, root) for family in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("config, expected", [
    ("LlamaConfig", ["q_proj", "v_proj"]), ("MistralConfig", ["q_proj", "v_proj"]),
    ("Qwen2Config", ["q_proj", "v_proj"]), ("GemmaConfig", ["q_proj", "v_proj"]),
    ("PhiConfig", ["q_proj", "v_proj"]), ("Phi3Config", ["qkv_proj"]), ("GPT2Config", ["c_attn"]),
])
def test_family_default_targets(config, expected):
    import transformers
    from transformers import AutoModelForCausalLM

    from fedlora.task.llm import conv1d_to_linear

    kwargs = {"n_embd": 32, "n_layer": 1, "n_head": 2} if config == "GPT2Config" else {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, config)(vocab_size=64,
                                                                                **kwargs))
    conv1d_to_linear(model)
    assert default_targets(model) == expected


def test_gpt2_conv1d_swap_keeps_the_function(models):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    original = AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()
    swapped = build_model(model_cfg(models["gpt2"]), 1)
    assert isinstance(swapped.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert torch.allclose(original(ids).logits, swapped(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_tokens_contribute_zero_gradient(models, family):
    """On the real loss (training's and DP's per-sequence loss): the gradient reaching
    the logits at every prompt position is exactly zero; response positions get one."""
    from peft import LoraConfig, get_peft_model

    from fedlora.privacy.common import per_sample_loss

    model = get_peft_model(build_model(model_cfg(models[family]), 1),
                           LoraConfig(r=4, target_modules=default_targets(
                               build_model(model_cfg(models[family]), 1))))
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100  # the prompt
    labels[1, 14:] = -100  # padding
    captured = {}

    def keep(module, args, output):  # noqa: ARG001 - forward hook signature
        output.logits.retain_grad()
        captured["logits"] = output.logits

    for reduce in (loss_of, lambda lg, tg: per_sample_loss(lg, tg).mean()):
        handle = model.register_forward_hook(keep)
        logits, targets = forward(model, (ids, torch.ones_like(ids), labels), "causal_lm")
        handle.remove()
        reduce(logits, targets).backward()
        grad = captured["logits"].grad  # (B, T, V): position t predicts token t + 1
        predicts_prompt = labels[:, 1:] == -100
        assert grad[:, :-1][predicts_prompt].abs().max() == 0
        assert (grad[:, :-1][~predicts_prompt].abs().amax(-1) > 0).all()
        assert grad[:, -1].abs().max() == 0
        model.zero_grad()


def _job(path: Path, *overrides: str) -> dict:
    return compose_job(["model=hf_local", f"model.path={path}", "model.task=causal_lm",
                        "data=bbc_instruct", *overrides])


def test_refusals_name_why(models):
    path = models["llama"]
    cases = [
        (["privacy=none", "model.dtype=bfloat16"], "model.dtype=bfloat16 needs device=cuda"),
        (["privacy=none", "model.quantization=nf4"], "model.quantization=nf4 needs device=cuda"),
        (["privacy=none", "model.quantization=nf4", "strategy=flora"],
         "model.quantization=nf4 with strategy=flora: its clients merge"),
        (["privacy=none", "model.quantization=int8", "strategy=fedex"],
         "model.quantization=int8 with strategy=fedex: its clients merge"),
        (["privacy=dp", "model.gradient_checkpointing=true"],
         "model.gradient_checkpointing=true under DP"),
        (["privacy=dp", "data.packing=true"], "data.packing=true under DP"),
        (["privacy=none", "model.task=classification"], "it needs model.task=causal_lm"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_llm(_job(path, *overrides))
    check_llm(_job(path, "privacy=none", "model.gradient_checkpointing=true"))


def test_memory_refusal_gives_the_numbers(models, monkeypatch):
    import fedlora.task.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: (10 * 2**20, "available RAM"))
    with pytest.raises(ConfigError) as err:
        memory.check_memory(_job(models["llama"], "privacy=none"))
    assert "available RAM is 10 MiB" in str(err.value) and "activations" in str(err.value)


def test_gradient_checkpointing_trains_the_same(models):
    cfg = model_cfg(models["qwen2"])
    ids = torch.randint(5, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        from peft import LoraConfig, get_peft_model

        model = build_model({**cfg, "gradient_checkpointing": checkpointing}, 1)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        model.train()
        loss_of(*forward(model, (ids, torch.ones_like(ids), ids), "causal_lm")).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("shape, strategy, batch, seq", [
    ((256, 512, 4), "ffa", 8, 128), ((768, 2048, 2), "fedsb", 24, 96)])
def test_memory_estimate_within_a_quarter_of_peak_rss(tmp_path_factory, shape, strategy,
                                                      batch, seq):
    """Tiny (hidden 64) models are all fixed overhead (imports, allocator); at these shapes
    activations and weights dominate and the estimate must be within 25% of the RSS peak."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .llm_models import train_tokenizer

    hidden, inter, layers = shape
    path = tmp_path_factory.getbasetemp() / f"llm-mem-{hidden}"
    if not (path / "config.json").is_file():
        tok = train_tokenizer(chat=True)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=512, hidden_size=hidden, intermediate_size=inter,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, pad_token_id=tok.pad_token_id)).save_pretrained(path)
        tok.save_pretrained(path)
    job = _job(path, f"model.max_length={seq}", "data.max_train_examples=64",
               "data.max_test_examples=8", "data.generation_prompts=0", "privacy=none",
               f"strategy={strategy}", f"strategy.batch_size={batch}", "strategy.sample_rate=null")
    job["run_dir"] = str(path / "run")
    config = path / f"{strategy}.json"
    config.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, "-m", "tests.llm_memory_probe", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert 0.75 <= result["estimate"] / result["measured"] <= 1.25, result
