"""The causal-LM shapes the LLM benches build (published configurations, random weights),
where they run (``--device``, ``--dtype``, ``--quantization``, passed to child processes
through the environment) and how their peak memory is read."""

from __future__ import annotations

import os
import resource
import tempfile
from pathlib import Path

DEVICE_ENV = "FEDLORA_BENCH_DEVICE"
DTYPE_ENV = "FEDLORA_BENCH_DTYPE"
QUANTIZATION_ENV = "FEDLORA_BENCH_QUANTIZATION"
SAVED_ENV = "FEDLORA_BENCH_SAVED"  # where quantized runs keep the saved random weights
SHAPES = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    # meta-llama/Llama-3.2-1B config.json (rope scaling left out: it does not change cost)
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-5)),
    # meta-llama/Llama-3.1-8B config.json (rope scaling left out: it does not change cost)
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
        rms_norm_eps=1e-5)),
    # A toy of the Qwen2 family, for smoke tests of the benches (tests/test_llm_bench.py).
    "tiny-qwen2": ("Qwen2Config", dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True)),
}


def job_config(shape: str, method: str, mode: str, batch: int, seq: int, directory: Path) -> dict:
    return {
        "model": {"name": shape, "source": "path", "package": None, "path": str(directory),
                  "task": "causal_lm", "target_modules": ["q_proj", "v_proj"],
                  "head_modules": [], "max_length": seq, "dtype": precision()[0],
                  "gradient_checkpointing": False, "quantization": precision()[1]},
        "strategy": {"name": method, "rank": 16, "alpha": 32, "lr": 1e-4, "local_steps": 1,
                     "batch_size": batch, "weighting": "examples", "optimizer": "adamw",
                     "options": {}},
        "privacy": {"enabled": mode != "plain", "grad_sample_mode": mode},
        "federation": {"seed": 0}, "device": str(bench_device()),
    }


def bench_device():
    """Where the benches run: ``--device`` (cpu, cuda), passed to the children."""
    import torch

    return torch.device(os.environ.get(DEVICE_ENV, "cpu"))


def sync() -> None:
    import torch

    if bench_device().type == "cuda":
        torch.cuda.synchronize()


def baseline_bytes() -> int:
    """What the peak is measured from: RSS after the imports (CPU); zero on CUDA, where
    the peak is torch.cuda.max_memory_allocated (the weights included)."""
    import psutil
    import torch

    if bench_device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0
    return psutil.Process().memory_info().rss


def peak_bytes(before: int) -> int:
    import torch

    if bench_device().type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def build(shape: str):
    """The shape's model with random weights (allocated, then one N(0, 0.02) draw)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    transformers.logging.set_verbosity_error()
    config_cls, kwargs = SHAPES[shape]
    config = getattr(transformers, config_cls)(**kwargs)
    dtype, quantization = precision()
    with no_init_weights():  # allocate only; the draw below is one cheap pass
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    if quantization != "none":
        model = quantized(shape, model, dtype, quantization)
    else:
        model = model.to(bench_device())
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, config, generator


def precision() -> tuple[str, str]:
    """The base's (dtype, quantization): ``--dtype`` and ``--quantization``."""
    return os.environ.get(DTYPE_ENV, "float32"), os.environ.get(QUANTIZATION_ENV, "none")


def quantized(shape: str, model, dtype: str, quantization: str):
    """``model`` saved once (safetensors) and loaded back quantized by fedlora's loader."""
    from fedlora.task.llm import load_causal_lm

    saved = Path(os.environ.get(SAVED_ENV) or tempfile.mkdtemp()) / f"{shape}-{dtype}"
    if not (saved / "config.json").exists():
        model.save_pretrained(saved, safe_serialization=True)
    del model
    return load_causal_lm(saved, {"dtype": dtype, "quantization": quantization},
                          str(bench_device()))


def random_data(config, generator, batch: int, seq: int):
    import torch
    from torch.utils.data import TensorDataset

    n = max(4 * batch, 32)
    ids = torch.randint(0, config.vocab_size, (n, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # a prompt half, as instruction data has
    return TensorDataset(ids, torch.ones_like(ids), labels)


def fedlora_adapters(model, method: str, targets: list[str]):
    """Inject ``method``'s adapters (rank 16, alpha 32) on ``targets`` with fedlora's adapter
    host, started as a client's first contact does; returns the trainable parameters."""
    from fedlora.aggregation import AdapterSpec, get_method
    from fedlora.task.adapters import AdapterHost

    impl = get_method(method)
    host = AdapterHost(model, targets, [], impl.adapter_layer)
    shapes = {t: (model.get_submodule(t).out_features, model.get_submodule(t).in_features)
              for t in targets}
    spec = AdapterSpec(shapes=shapes, rank=16, alpha=32.0, seed=0)
    start = impl.client_start(impl.downlink(impl.init_state(spec), first_contact=True), spec)
    return host.start(start, {})


def timed_steps(train, steps: int):
    """One warm-up call (first-step allocations, kernel choices), then ``train(steps)``
    timed between device syncs: (its result, seconds)."""
    import time

    train(1)
    sync()
    started = time.perf_counter()
    result = train(steps)
    sync()
    return result, time.perf_counter() - started
