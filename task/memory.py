"""An estimate of one client's peak training memory, checked before the weights load.

The estimate reads the model's shapes without allocating them (a ``meta``-device model)
and adds, in bytes:

- weights: every parameter at the base's dtype (2 for bf16/fp16, 4 for fp32; the linear
  layers of a quantized base at about 0.55 (NF4 with double quantization) or 1.06 (int8));
- the W0 copy of the target weights the adapter host keeps (to reset them every round);
- adapters: every adapter factor in fp32, and for the trained ones the gradient and the
  optimizer state (AdamW: two moments);
- activations: per token and layer, what the backward of a frozen base with adapters
  keeps (14 hidden-size, 11 MLP-size and 3 x heads x sequence attention values at the
  activation dtype, fitted to measured peaks), plus the logits and the loss's copies of
  them (5 vocabulary-size values per token); gradient checkpointing keeps one hidden state
  per layer plus one layer's worth; under DP the batch is a Poisson draw, counted at
  b + 2 sqrt(b);
- under DP with per-sample hooks, one gradient per example of every trained factor
  (ghost clipping keeps per-example norms only);
- the client's tokenized data.

The constants were measured on CPU (docs/LLM.md, Memory). :func:`check_memory` refuses a
job whose estimate exceeds the device's available memory, with the numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# Bytes per parameter of a quantized linear layer (bitsandbytes): NF4 with double
# quantization (4 bits + block constants), int8 (1 byte + per-row scale and outliers).
_QUANT_BYTES = {"nf4": 0.55, "int8": 1.06}
# Values kept per token and layer, fitted to the peak RSS of CPU training steps (Llama
# shapes, hidden 256-768, MLP 512-2048; docs/LLM.md): what autograd saves for the backward
# plus the gradients alive at the peak and what the allocator keeps cached.
_HIDDEN_PER_TOKEN = 14  # hidden-size values
_MLP_PER_TOKEN = 11  # MLP-size values
_SCORES_PER_HEAD = 3  # attention scores per head (x sequence length): probabilities, grads
_LOGIT_COPIES = 5  # logits, their shifted copy, log-softmax, and two gradients
_ROLE_SHAPES = {"A": lambda r, o, i: r * i, "B": lambda r, o, i: o * r, "R": lambda r, o, i: r * r}


@dataclass
class MemoryEstimate:
    weights: int
    w0_copy: int
    adapters: int
    optimizer: int
    activations: int
    per_sample: int
    data: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def describe(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / 2**20:.0f} MiB"
                          for k, v in asdict(self).items())
        return f"{self.total / 2**20:.0f} MiB ({parts})"


def _meta_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The model's modules with shapes only (no memory), as build_model would build it."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from .models import model_directory

    with torch.device("meta"):
        if model_cfg["source"] == "tiny_llama":
            hidden = int(model_cfg["hidden_size"])
            return LlamaForCausalLM(LlamaConfig(
                vocab_size=int(model_cfg["vocab_size"]), hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=int(model_cfg["num_layers"]),
                num_attention_heads=int(model_cfg["num_heads"]),
                num_key_value_heads=int(model_cfg["num_heads"]),
                max_position_embeddings=max(64, int(model_cfg["max_length"]))))
        config = AutoConfig.from_pretrained(model_directory(model_cfg))
        return AutoModelForCausalLM.from_config(config)


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def estimate(cfg: Mapping[str, Any], *, examples: int = 0, model: nn.Module | None = None
             ) -> MemoryEstimate:
    """Peak memory of one client's training step for a causal-LM job config.

    ``examples``: the client's tokenized examples (0: not counted). ``model``: a built (or
    meta) model to read the shapes from; default: a meta model from the config."""
    from fedlora.aggregation import get_method

    from .llm import conv1d_to_linear, resolve_targets, torch_dtype
    from .models import target_module_names
    from .training import local_batch_size

    model_cfg, strategy, privacy = cfg["model"], cfg["strategy"], cfg.get("privacy") or {}
    model = model if model is not None else _meta_model(model_cfg)
    conv1d_to_linear(model)
    dtype = torch_dtype(str(model_cfg.get("dtype") or "auto"), str(cfg.get("device", "cpu")))
    width = torch.tensor([], dtype=dtype).element_size()
    quant = str(model_cfg.get("quantization") or "none")
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weights, seen = 0.0, set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:  # tied embeddings count once
                continue
            seen.add(id(param))
            quantized = (quant != "none" and isinstance(module, nn.Linear)
                         and module is not lm_head)
            weights += param.numel() * (_QUANT_BYTES[quant] if quantized else width)
    targets = target_module_names(model, resolve_targets(model, list(model_cfg["target_modules"])))
    method = get_method(strategy["name"])
    rank = int(strategy["rank"])
    factors = ("A", "B", "R") if method.adapter_layer == "lora_sb" else ("A", "B")
    adapter_params = trained = w0 = 0
    for name in targets:
        linear = model.get_submodule(name)
        d_out, d_in = linear.out_features, linear.in_features
        w0 += d_out * d_in * width
        adapter_params += sum(_ROLE_SHAPES[f](rank, d_out, d_in) for f in factors)
        trained += sum(_ROLE_SHAPES[f](rank, d_out, d_in) for f in method.client_trains
                       if f in factors)
    if quant != "none":
        w0 = 0  # a quantized base is never reset from a copy
    adamw = strategy.get("optimizer", "adamw") == "adamw"
    momentum = float(strategy.get("momentum") or 0.0) > 0
    optimizer = trained * 4 * (3 if adamw else (2 if momentum else 1))  # grad (+ moments)
    batch = local_batch_size(strategy, max(examples, int(strategy["batch_size"])))
    if privacy.get("enabled"):
        # Poisson sampling: a batch is b on average; the peak comes from the large ones.
        batch = int(batch + 2 * batch ** 0.5)
        if privacy.get("max_physical_batch_size"):
            batch = min(batch, int(privacy["max_physical_batch_size"]))
    text = _text_config(model.config)
    seq = int(model_cfg["max_length"])
    hidden = int(text.hidden_size)
    inter = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                or 4 * hidden)
    layers = int(text.num_hidden_layers)
    vocab = int(text.vocab_size)
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1))
    act_width = 4 if dtype == torch.float32 else 2
    per_layer = batch * seq * (_HIDDEN_PER_TOKEN * hidden + _MLP_PER_TOKEN * inter
                               + _SCORES_PER_HEAD * heads * seq) * act_width
    if model_cfg.get("gradient_checkpointing"):
        layer_acts = batch * seq * hidden * act_width * layers + per_layer
    else:
        layer_acts = per_layer * layers
    activations = layer_acts + batch * seq * vocab * 4 * _LOGIT_COPIES
    per_sample = 0
    if privacy.get("enabled") and privacy.get("grad_sample_mode", "hooks") == "hooks":
        per_sample = batch * trained * 4
    data = examples * seq * 3 * 8  # input ids, mask, labels as int64
    return MemoryEstimate(int(weights), int(w0), adapter_params * 4, int(optimizer),
                          int(activations), int(per_sample), int(data))


def available_bytes(device: str) -> tuple[int, str]:
    """(bytes free, what was measured) on ``device``."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        index = torch.device(device).index if device.startswith("cuda:") else None
        free, _ = torch.cuda.mem_get_info(index)
        return int(free), f"free GPU memory on {device}"
    import psutil

    return int(psutil.virtual_memory().available), "available RAM"


def check_memory(cfg: Mapping[str, Any], examples: int = 0) -> MemoryEstimate | None:
    """Refuse (ConfigError, with the numbers) a causal-LM job that will not fit."""
    from .config import ConfigError

    if cfg["model"].get("task") != "causal_lm":
        return None
    need = estimate(cfg, examples=examples)
    device = str(cfg.get("device", "cpu"))
    free, what = available_bytes(device)
    if need.total > free:
        raise ConfigError(
            f"invalid configuration:\n  - one client needs about {need.describe()}, but the "
            f"{what} is {free / 2**20:.0f} MiB: lower strategy.batch_size or model.max_length, "
            f"set model.gradient_checkpointing=true (not under DP), "
            f"privacy.grad_sample_mode=ghost or privacy.max_physical_batch_size (DP), or a "
            f"4-bit base (model.quantization=nf4, CUDA); model.check_memory=false skips this "
            f"check")
    return need
