"""Causal LMs from a local Hugging Face directory: family defaults, dtype, gradient
checkpointing, a 4-/8-bit base, and the checks that refuse what cannot work, with why.

Model options (``model.*``, conf/model/hf_local.yaml):

- ``target_modules: [auto]``: each family's usual LoRA targets, found by module name:
  q_proj/v_proj (Llama, Mistral, Qwen2, Gemma, Phi), qkv_proj (Phi-3), c_attn (GPT-2),
  query/value (BERT-style encoders), query_key_value (GPT-NeoX, Falcon).
- ``head_modules: [auto]``: none for a causal LM; the classifier (or score) head for
  classification.
- ``dtype``: auto (float32 on CPU, bfloat16 on CUDA where supported), float32, bfloat16,
  float16. Half precision on CPU is refused: CPU kernels for it are slow or missing.
- ``gradient_checkpointing``: recompute each layer's activations in backward.
- ``quantization``: none, nf4 (4-bit NormalFloat, double quantization) or int8: a frozen
  base through bitsandbytes, CUDA only.

GPT-2's attention projection is a transformers ``Conv1D`` (x W + b with W stored d_in x
d_out). It is swapped for the equal ``nn.Linear`` at load time, so the adapters, Opacus's
per-sample hooks and the W0 fingerprint see one kind of layer; the exported PEFT adapter
still loads on the original GPT-2 (PEFT handles Conv1D targets itself).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
# Candidate target sets, first match wins: the family is read from the module names, so a
# fine-tune with a custom model_type still gets its architecture's usual targets.
FAMILY_TARGETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("llama/mistral/qwen2/gemma/phi", ("q_proj", "v_proj")),
    ("phi3", ("qkv_proj",)),
    ("gpt2", ("c_attn",)),
    ("bert", ("query", "value")),
    ("gpt-neox/falcon", ("query_key_value",)),
)
HEAD_CANDIDATES = ("classifier", "score")


def default_targets(model: nn.Module) -> list[str]:
    """The usual LoRA target names of ``model``'s family (its linear layers' last names)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, nn.Linear)}
    for _, targets in FAMILY_TARGETS:
        if set(targets) <= names:
            return list(targets)
    raise ValueError(f"model.target_modules=[auto]: no known family's attention projections "
                     f"in {type(model).__name__}; name them, e.g. model.target_modules=[...] "
                     f"from its linear layers {sorted(names)[:12]}")


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    return default_targets(model) if list(targets) in (["auto"], []) else list(targets)


def resolve_heads(model: nn.Module, model_cfg: Mapping[str, Any]) -> list[str]:
    heads = list(model_cfg.get("head_modules") or [])
    if heads != ["auto"]:
        return heads
    if model_cfg.get("task") == "causal_lm":
        return []  # the LM head stays frozen: only the adapters train
    children = dict(model.named_children())
    return [h for h in HEAD_CANDIDATES if h in children][:1]


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The base's dtype for ``model.dtype`` on ``device`` (cpu, cuda[:N], auto)."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if name == "auto":
        if cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers Conv1D by the equal nn.Linear (weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        d_in, d_out = module.weight.shape
        linear = nn.Linear(d_in, d_out, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        swapped += 1
    return swapped


def load_causal_lm(directory: Path, model_cfg: Mapping[str, Any], device: str = "cpu"
                   ) -> nn.Module:
    """A causal LM from a local directory with the config's dtype, quantization and
    gradient checkpointing."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(str(model_cfg.get("dtype") or "auto"), device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    quant = str(model_cfg.get("quantization") or "none")
    if quant != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    conv1d_to_linear(model)
    if model_cfg.get("gradient_checkpointing"):
        # Non-reentrant checkpointing: the frozen embeddings' outputs need no requires_grad.
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is for generation only
    return model


def llm_problems(cfg: Mapping[str, Any]) -> list[str]:
    """What a causal-LM job cannot do on this machine or under its privacy settings."""
    model, data, privacy = cfg["model"], cfg["data"], cfg.get("privacy") or {}
    device = str(cfg.get("device", "cpu"))
    problems: list[str] = []
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if data.get("kind") == "instruct" and model.get("task") != "causal_lm":
        problems.append(f"data={data.get('name')} is instruction data: it needs "
                        f"model.task=causal_lm (got {model.get('task')!r})")
    dtype = str(model.get("dtype") or "auto")
    if dtype not in DTYPES:
        problems.append(f"model.dtype must be one of {DTYPES}, got {dtype!r}")
    elif dtype in ("bfloat16", "float16") and not cuda:
        problems.append(f"model.dtype={dtype} needs device=cuda: CPU training runs in "
                        f"float32 (half-precision CPU kernels are slow or missing); use "
                        f"model.dtype=float32 or auto")
    quant = str(model.get("quantization") or "none")
    if quant not in QUANTIZATIONS:
        problems.append(f"model.quantization must be one of {QUANTIZATIONS}, got {quant!r}")
    elif quant != "none":
        import importlib.util

        if not cuda:
            problems.append(f"model.quantization={quant} needs device=cuda: bitsandbytes "
                            f"quantizes the base on an NVIDIA GPU only; use "
                            f"model.quantization=none on {device}")
        elif importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"model.quantization={quant} needs the bitsandbytes package "
                            f"(pip install bitsandbytes)")
        if model.get("source") != "path":
            problems.append(f"model.quantization={quant} is for a model directory "
                            f"(model=hf_local), not model.source={model.get('source')!r}")
        method = _method_class(cfg)
        if method is not None and method.merges_into_base:
            problems.append(f"model.quantization={quant} with strategy={method.name}: its "
                            f"clients merge the server's accumulated delta into the frozen "
                            f"base weights, which a quantized base stores packed; use "
                            f"model.quantization=none or another strategy")
    if privacy.get("enabled"):
        if model.get("gradient_checkpointing"):
            problems.append("model.gradient_checkpointing=true under DP: Opacus computes "
                            "per-sample gradients from activations its hooks capture in the "
                            "forward pass, and a checkpointed layer reruns its forward in "
                            "backward, which Opacus does not support; turn one off (ghost "
                            "clipping, privacy.grad_sample_mode=ghost, already saves most "
                            "of the per-sample memory)")
        if data.get("packing"):
            problems.append("data.packing=true under DP: a packed row holds several "
                            "examples, so DP-SGD would protect rows, not examples; turn "
                            "packing off")
    return problems


def _method_class(cfg: Mapping[str, Any]) -> Any:
    """The job's aggregation method class (None where the name is unknown: refused elsewhere)."""
    from ..aggregation.registry import available_methods, get_method

    name = (cfg.get("strategy") or {}).get("name")
    return type(get_method(name)) if name in available_methods() else None


def check_llm(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError naming every problem of a causal-LM job (no-op otherwise)."""
    from .config import ConfigError

    if cfg["model"].get("task") != "causal_lm" and cfg["data"].get("kind") != "instruct":
        return
    problems = llm_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
