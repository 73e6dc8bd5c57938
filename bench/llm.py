"""Client training speed and peak memory for causal LMs at real shapes, random weights.

    python bench/llm.py [--json] [--shapes qwen2.5-0.5b,llama-3.2-1b] [--methods ffa,fedsb,fedavg]
                        [--modes peft,plain,hooks,ghost] [--batch 4] [--seq 128] [--steps 2]
                        [--repeat 1] [--paired] [--device cpu]
                        [--dtype float32] [--quantization none]

Each (shape, method, mode) runs in a fresh process: the model is built from the published
configuration (no download; weights drawn at random, N(0, 0.02)), the method's adapters
are injected by fedlora's adapter host on q_proj/v_proj (rank 16), one warm-up step runs,
then ``--steps`` timed optimizer steps through fedlora's client training (plain, or DP-SGD
through Opacus with per-sample hooks or ghost clipping). It prints tokens per second and
the peak RSS growth over the process's baseline (after imports), with fedlora's memory
estimate beside it. It prints numbers; it asserts nothing.

Mode ``peft`` is the baseline: a bare PEFT loop on the same model, batch and sequence
(``peft.get_peft_model`` with ``LoraConfig(r=16, lora_alpha=32, target_modules=[q_proj,
v_proj])``, ``torch.optim.AdamW`` on the LoRA parameters, the model's own causal-LM loss
through ``labels=``), run once per shape; every fedlora row prints its speed and peak
memory as a ratio to it. ``--repeat N`` runs the whole rotation of processes N times
(on a shared machine the load drifts) and reports each row's fastest run, its peak
memory from the same run. ``--device cuda`` runs them on a GPU (float32 as on CPU; the
peak is then ``torch.cuda.max_memory_allocated``, the weights included); there
``--dtype bfloat16`` runs the base in bf16 and ``--quantization nf4`` (or int8) loads it
4-bit through fedlora's own loader (bitsandbytes), from a safetensors copy of the random
weights that the first process writes and the others reuse. ``bench/llm_gpu.sh`` is the
GPU table.

``--paired`` measures speed only, in one process per (shape, method): one step of every
mode in turn, ``--steps`` times over (after a warm-up round), on one copy of the base
weights; each cycle's adjacent steps give a ratio, and the median ratio is reported. On a
shared machine whose load drifts this is the comparison to trust; the fresh-process rows
give the peak memory.
"""


from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llm_models import (
    DEVICE_ENV,
    DTYPE_ENV,
    QUANTIZATION_ENV,
    SAVED_ENV,
    baseline_bytes,
    bench_device,
    build,
    fedlora_adapters,
    job_config,
    peak_bytes,
    random_data,
    timed_steps,
)


def run_peft(shape: str, batch: int, seq: int, steps: int) -> dict:
    """The baseline: a bare PEFT LoRA loop on the same model, batch and loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from fedlora.task.memory import estimate

    before = baseline_bytes()
    model, config, generator = build(shape)
    need = estimate(job_config(shape, "ffa", "plain", batch, seq, Path(".")), model=model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-4)
    data = random_data(config, generator, batch, seq)
    loader = DataLoader(data, batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(1))

    def train(count: int) -> int:
        seen = 0
        while True:
            for batch_ in loader:
                ids, mask, labels = (t.to(bench_device()) for t in batch_)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss.item()
                seen += len(ids)
                count -= 1
                if not count:
                    return seen

    seen, seconds = timed_steps(train, steps)  # after a warm-up, as for the fedlora modes
    peak = peak_bytes(before)
    return {"shape": shape, "method": "-", "mode": "peft", "batch": batch, "seq": seq,
            "steps": steps, "device": str(bench_device()), "tokens_per_s": seen * seq / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak / 2**20,
            "estimate_mib": need.total / 2**20, "threads": torch.get_num_threads()}


def run_one(shape: str, method: str, mode: str, batch: int, seq: int, steps: int) -> dict:
    """One measurement (call in a fresh process)."""
    if mode == "peft":
        return run_peft(shape, batch, seq, steps)
    import peft  # noqa: F401 - before the baseline, as below
    import torch

    import fedlora.aggregation  # noqa: F401 - the adapter code, before the baseline
    import fedlora.task.adapters  # noqa: F401
    from fedlora.client.train import train_plain, train_private
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.memory import estimate
    from fedlora.task.models import fingerprint, target_module_names

    # What fedlora imports on first use (PEFT in the adapter host, Opacus in a private
    # round) is imported before the baseline, as the PEFT row imports PEFT: the peak
    # counts the training, not the libraries' code.
    if mode != "plain":
        import fedlora.privacy.dpsgd  # noqa: F401
    before = baseline_bytes()
    model, config, generator = build(shape)
    job = job_config(shape, method, mode, batch, seq, Path("."))
    need = estimate(job, model=model)  # before the adapters wrap the target layers
    targets = target_module_names(model, ["q_proj", "v_proj"])
    fingerprint(model, targets[:1])
    trainable = fedlora_adapters(model, method, targets)
    data = random_data(config, generator, batch, seq)
    n = len(data)
    device = bench_device()

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

    result, seconds = timed_steps(train, steps)
    peak = peak_bytes(before)
    # Under DP the batches are Poisson draws: tokens/s counts the examples actually seen.
    return {"shape": shape, "method": method, "mode": mode, "batch": batch, "seq": seq,
            "steps": steps, "device": str(bench_device()),
            "tokens_per_s": result.examples_seen * seq / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak / 2**20,
            "estimate_mib": need.total / 2**20, "threads": torch.get_num_threads(),
            "examples_seen": result.examples_seen}



def _jobs(shapes: list[str], methods: list[str], modes: list[str]) -> list[tuple[str, str, str]]:
    jobs = []
    for shape in shapes:
        if "peft" in modes:
            jobs.append((shape, "-", "peft"))
        jobs += [(shape, method, mode) for method in methods for mode in modes if mode != "peft"]
    return jobs


def summarize(rows: list[dict]) -> list[dict]:
    """Each (shape, method, mode)'s fastest run, with its ratios: speed (tokens/s) and peak
    RSS growth over the shape's bare PEFT row, and over the method's own plain row."""
    best: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        if "error" in row:
            continue
        key = (row["shape"], row["method"], row["mode"])
        if key not in best or row["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = dict(row, runs=0)
    for row in rows:
        key = (row["shape"], row["method"], row["mode"])
        if key in best:
            best[key]["runs"] += 1
    for (shape, method, _), row in best.items():
        for name, ref in (("peft", best.get((shape, "-", "peft"))),
                          ("plain", best.get((shape, method, "plain")))):
            if ref is not None and ref is not row and row["mode"] != "peft":
                row[f"speed_vs_{name}"] = row["tokens_per_s"] / ref["tokens_per_s"]
                row[f"memory_vs_{name}"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
    return list(best.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--shapes", default="qwen2.5-0.5b,llama-3.2-1b")
    parser.add_argument("--methods", default="ffa,fedsb,fedavg")
    parser.add_argument("--modes", default="peft,plain,hooks,ghost")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--device", default=None,
                        help="cpu (default) or cuda; on CUDA the peak is "
                             "torch.cuda.max_memory_allocated")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the base's dtype (bfloat16: CUDA)")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4", "int8"),
                        help="a quantized frozen base through bitsandbytes (CUDA)")
    parser.add_argument("--paired", action="store_true",
                        help="interleave every mode's steps in one process per (shape, "
                             "method); --steps cycles; speed ratios only (no peak memory)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # shape:method:mode, in a child
    args = parser.parse_args(argv)
    if args.device:
        os.environ[DEVICE_ENV] = args.device  # the children inherit it
    if (args.dtype != "float32" or args.quantization != "none") and \
            not str(args.device or "cpu").startswith("cuda"):
        parser.error("--dtype bfloat16 and --quantization run on --device cuda only "
                     "(fedlora trains in float32 on CPU; bitsandbytes quantizes on GPUs)")
    if args.quantization != "none" and args.paired:
        parser.error("--paired shares one copy of unquantized weights between modes; "
                     "drop --paired for a quantized base")
    os.environ[DTYPE_ENV], os.environ[QUANTIZATION_ENV] = args.dtype, args.quantization
    if args.quantization != "none" and not args.one and not os.environ.get(SAVED_ENV):
        saved = tempfile.TemporaryDirectory(prefix="fedlora-bench-")
        os.environ[SAVED_ENV] = saved.name  # removed when this process exits
    if args.paired:
        import llm_paired

        return llm_paired.run_all(args)
    if args.one:
        shape, method, mode = args.one.split(":")
        print(json.dumps(run_one(shape, method, mode, args.batch, args.seq, args.steps)))
        return 0
    rows = []
    jobs = _jobs(args.shapes.split(","), args.methods.split(","), args.modes.split(","))
    for _ in range(args.repeat):
        for shape, method, mode in jobs:
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
    summary = summarize(rows)
    if args.json:
        print(json.dumps({"runs": rows, "summary": summary}, indent=1))
    else:
        print("\nbest of", args.repeat, "run(s); ratios to the bare PEFT loop and to the "
              "method's plain row (speed: tokens/s, memory: peak RSS growth):")
        for row in summary:
            _print_row(row)
    return 0



def _ratio(row: dict, name: str) -> str:
    if f"speed_vs_{name}" not in row:
        return ""
    return (f" | vs {name}: speed {row[f'speed_vs_{name}']:.2f}x, "
            f"memory {row[f'memory_vs_{name}']:.2f}x")


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['shape']:<13} {row['method']:<7} {row['mode']:<6} error: {row['error']}")
        return
    print(f"{row['shape']:<13} {row['method']:<7} {row['mode']:<6} batch {row['batch']} "
          f"seq {row['seq']}: {row['tokens_per_s']:8.1f} tokens/s, "
          f"{row['seconds_per_step']:6.1f} s/step, peak +{row['peak_rss_mib']:7.0f} MiB "
          f"(estimate {row['estimate_mib']:7.0f} MiB)"
          + _ratio(row, "peft") + _ratio(row, "plain"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
