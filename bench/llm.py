"""Client training speed and peak memory for causal LMs at real shapes, random weights.

    python bench/llm.py [--json] [--shapes qwen2.5-0.5b,llama-3.2-1b] [--methods ffa,fedsb,fedavg]
                        [--modes plain,hooks,ghost] [--batch 4] [--seq 128] [--steps 2]

Each (shape, method, mode) runs in a fresh process: the model is built from the published
configuration (no download; weights drawn at random, N(0, 0.02)), the method's adapters
are injected by fedlora's adapter host on q_proj/v_proj (rank 16), one warm-up step runs,
then ``--steps`` timed optimizer steps through fedlora's client training (plain, or DP-SGD
through Opacus with per-sample hooks or ghost clipping). It prints tokens per second and
the peak RSS growth over the process's baseline (after imports), with fedlora's memory
estimate beside it. It prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
}


def _job(shape: str, method: str, mode: str, batch: int, seq: int, directory: Path) -> dict:
    return {
        "model": {"name": shape, "source": "path", "package": None, "path": str(directory),
                  "task": "causal_lm", "target_modules": ["q_proj", "v_proj"],
                  "head_modules": [], "max_length": seq, "dtype": "float32",
                  "gradient_checkpointing": False, "quantization": "none"},
        "strategy": {"name": method, "rank": 16, "alpha": 32, "lr": 1e-4, "local_steps": 1,
                     "batch_size": batch, "weighting": "examples", "optimizer": "adamw",
                     "options": {}},
        "privacy": {"enabled": mode != "plain", "grad_sample_mode": mode},
        "federation": {"seed": 0}, "device": "cpu",
    }


def run_one(shape: str, method: str, mode: str, batch: int, seq: int, steps: int) -> dict:
    """One measurement (call in a fresh process)."""
    import psutil
    import torch
    import transformers
    from torch.utils.data import TensorDataset
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from fedlora.aggregation import get_method
    from fedlora.client.train import train_plain, train_private
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.memory import estimate
    from fedlora.task.models import fingerprint, target_module_names

    transformers.logging.set_verbosity_error()
    before = psutil.Process().memory_info().rss
    config_cls, kwargs = SHAPES[shape]
    config = getattr(transformers, config_cls)(**kwargs)
    with no_init_weights():  # allocate only; the draw below is one cheap pass
        model = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    model.requires_grad_(False)
    model.config.use_cache = False
    job = _job(shape, method, mode, batch, seq, Path("."))
    need = estimate(job, model=model)  # before the adapters wrap the target layers
    targets = target_module_names(model, ["q_proj", "v_proj"])
    fingerprint(model, targets[:1])
    impl = get_method(method)
    host = AdapterHost(model, targets, [], impl.adapter_layer)
    from fedlora.aggregation import AdapterSpec

    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
              for n in targets}
    spec = AdapterSpec(shapes=shapes, rank=16, alpha=32.0, seed=0)
    start = impl.client_start(impl.downlink(impl.init_state(spec), first_contact=True), spec)
    trainable = host.start(start, {})
    n = max(4 * batch, 32)
    ids = torch.randint(0, config.vocab_size, (n, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # a prompt half, as instruction data has
    data = TensorDataset(ids, torch.ones_like(ids), labels)
    device = torch.device("cpu")

    def train(count: int):
        strategy = dict(job["strategy"], local_steps=count)
        if mode == "plain":
            return train_plain(trainable, data, strategy, "causal_lm", device,
                               torch.Generator().manual_seed(1))
        settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=batch / n,
                              steps=count, accountant="rdp", grad_sample_mode=mode)
        ledger = PrivacyLedger.open(tempfile.mkdtemp(), node="bench", federation="bench",
                                    mechanism="rdp", target_epsilon=1e9, delta=1e-5)
        return train_private(trainable, data, strategy, "causal_lm", device, settings,
                             ledger, 1, 1e9)

    train(1)  # warm-up: first-step allocations and kernel choices
    started = time.perf_counter()
    result = train(steps)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"shape": shape, "method": method, "mode": mode, "batch": batch, "seq": seq,
            "steps": steps, "tokens_per_s": result.examples_seen * seq / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak / 2**20,
            "estimate_mib": need.total / 2**20, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b")
    parser.add_argument("--methods", default="ffa,fedsb,fedavg")
    parser.add_argument("--modes", default="plain,hooks,ghost")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # shape:method:mode, in a child
    args = parser.parse_args(argv)
    if args.one:
        shape, method, mode = args.one.split(":")
        print(json.dumps(run_one(shape, method, mode, args.batch, args.seq, args.steps)))
        return 0
    rows = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", f"{shape}:{method}:{mode}",
                     "--batch", str(args.batch), "--seq", str(args.seq),
                     "--steps", str(args.steps)], capture_output=True, text=True)
                if proc.returncode:
                    rows.append({"shape": shape, "method": method, "mode": mode,
                                 "error": proc.stderr.strip().splitlines()[-1:]})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if not args.json:
                    _print_row(rows[-1])
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['shape']:<13} {row['method']:<7} {row['mode']:<6} error: {row['error']}")
        return
    print(f"{row['shape']:<13} {row['method']:<7} {row['mode']:<6} batch {row['batch']} "
          f"seq {row['seq']}: {row['tokens_per_s']:8.1f} tokens/s, "
          f"{row['seconds_per_step']:6.1f} s/step, peak +{row['peak_rss_mib']:7.0f} MiB "
          f"(estimate {row['estimate_mib']:7.0f} MiB)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
