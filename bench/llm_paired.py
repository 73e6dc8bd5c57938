"""``bench/llm.py --paired``: every mode's steps interleaved in one process per (shape,
method), so that adjacent steps see the same load and their speed ratios can be trusted
on a shared machine."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_models import bench_device, build, fedlora_adapters, job_config, random_data, sync


def run_paired(shape: str, method: str, modes: list[str], batch: int, seq: int,
               cycles: int) -> dict:
    """Every mode's steps interleaved in one process: ``cycles`` rounds of one step per
    mode (after one warm-up round), on one copy of the base weights (the PEFT baseline and
    fedlora's adapter host wrap two module trees that share them). A shared machine's load
    drifts over minutes; adjacent steps see about the same load, so their ratios are what
    this reports (each cycle's ratio to the bare PEFT step, and the median of those)."""
    import statistics

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from fedlora.client.train import train_plain, train_private
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.models import target_module_names

    base, config, generator = build(shape)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config)
    twin.load_state_dict(base.state_dict(), assign=True)  # the same tensors, no copy
    for name, buffer in base.named_buffers():  # non-persistent ones too (rotary tables)
        owner, _, leaf = name.rpartition(".")
        twin.get_submodule(owner)._buffers[leaf] = buffer
    twin.requires_grad_(False)
    twin.config.use_cache = False
    data = random_data(config, generator, batch, seq)
    n = len(data)
    steps: dict[str, object] = {}
    if "peft" in modes:
        peft_model = get_peft_model(twin, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]))
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                      lr=1e-4)
        batches = iter(())
        order = torch.Generator().manual_seed(1)

        def peft_step() -> int:
            nonlocal batches
            try:
                ids, mask, labels = (t.to(bench_device()) for t in next(batches))
            except StopIteration:
                batches = iter(DataLoader(data, batch_size=batch, shuffle=True,
                                          generator=order))
                ids, mask, labels = (t.to(bench_device()) for t in next(batches))
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
            return len(ids)

        steps["peft"] = peft_step
    trainable = fedlora_adapters(base, method, target_module_names(base, ["q_proj", "v_proj"]))
    job = job_config(shape, method, "plain", batch, seq, Path("."))
    strategy = dict(job["strategy"], local_steps=1)
    device = bench_device()
    ledger = PrivacyLedger.open(tempfile.mkdtemp(), node="bench", federation="bench",
                                mechanism="rdp", target_epsilon=1e9, delta=1e-5)
    shuffle = torch.Generator().manual_seed(1)

    def fedlora_step(mode: str):
        def step() -> int:
            if mode == "plain":
                return train_plain(trainable, data, strategy, "causal_lm", device,
                                   shuffle).examples_seen
            settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                  sample_rate=batch / n, steps=1, accountant="rdp",
                                  grad_sample_mode=mode)
            return train_private(trainable, data, strategy, "causal_lm", device, settings,
                                 ledger, 1, 1e9).examples_seen
        return step

    for mode in modes:
        if mode != "peft":
            steps[mode] = fedlora_step(mode)
    for step in steps.values():  # warm-up
        step()
    timings: dict[str, list[tuple[float, int]]] = {mode: [] for mode in steps}
    for _ in range(cycles):
        for mode, step in steps.items():
            sync()
            started = time.perf_counter()
            seen = step()
            sync()
            timings[mode].append((time.perf_counter() - started, seen))
    rows = {}
    for mode, runs in timings.items():
        seconds, seen = sum(t for t, _ in runs), sum(k for _, k in runs)
        rows[mode] = {"tokens_per_s": seen * seq / seconds, "seconds_per_step": seconds / cycles,
                      "steps": [round(t, 2) for t, _ in runs], "examples": [k for _, k in runs]}
    for ref in ("peft", "plain"):
        if ref not in timings:
            continue
        for mode, runs in timings.items():
            if mode == ref:
                continue
            ratios = [(k / t) / (k_ref / t_ref)
                      for (t, k), (t_ref, k_ref) in zip(runs, timings[ref], strict=True)]
            rows[mode][f"speed_vs_{ref}"] = statistics.median(ratios)
            rows[mode][f"speed_vs_{ref}_cycles"] = [round(r, 3) for r in ratios]
    return {"shape": shape, "method": method, "batch": batch, "seq": seq, "cycles": cycles,
            "device": str(bench_device()),
            "threads": torch.get_num_threads(), "modes": rows}



def run_all(args: argparse.Namespace) -> int:
    modes = args.modes.split(",")
    results = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            proc = subprocess.run(
                [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                 "import llm_paired; print(json.dumps(llm_paired.run_paired(sys.argv[2], sys.argv[3], "
                 "sys.argv[4].split(','), *map(int, sys.argv[5:]))))",
                 str(Path(__file__).resolve().parent), shape, method, ",".join(modes),
                 str(args.batch), str(args.seq), str(args.steps)],
                capture_output=True, text=True)
            if proc.returncode:
                results.append({"shape": shape, "method": method,
                                "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if not args.json:
                _print_paired(results[-1])
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def _print_paired(result: dict) -> None:
    head = f"{result['shape']:<13} {result['method']:<7}"
    if "error" in result:
        print(f"{head} error: {result['error']}", flush=True)
        return
    print(f"{head} batch {result['batch']} seq {result['seq']}, {result['cycles']} "
          f"interleaved cycles, {result['threads']} threads:", flush=True)
    for mode, row in result["modes"].items():
        ratios = "".join(f" | vs {ref}: {row[f'speed_vs_{ref}']:.2f}x (cycles "
                         f"{row[f'speed_vs_{ref}_cycles']})"
                         for ref in ("peft", "plain") if f"speed_vs_{ref}" in row)
        print(f"  {mode:<6} {row['tokens_per_s']:8.1f} tokens/s, {row['seconds_per_step']:6.1f} "
              f"s/step (steps {row['steps']}, examples {row['examples']}){ratios}", flush=True)


