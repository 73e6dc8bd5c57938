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
import resource
import subprocess
import sys
import tempfile
import time
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


def _job(shape: str, method: str, mode: str, batch: int, seq: int, directory: Path) -> dict:
    return {
        "model": {"name": shape, "source": "path", "package": None, "path": str(directory),
                  "task": "causal_lm", "target_modules": ["q_proj", "v_proj"],
                  "head_modules": [], "max_length": seq, "dtype": _precision()[0],
                  "gradient_checkpointing": False, "quantization": _precision()[1]},
        "strategy": {"name": method, "rank": 16, "alpha": 32, "lr": 1e-4, "local_steps": 1,
                     "batch_size": batch, "weighting": "examples", "optimizer": "adamw",
                     "options": {}},
        "privacy": {"enabled": mode != "plain", "grad_sample_mode": mode},
        "federation": {"seed": 0}, "device": str(_device()),
    }


def _device():
    """Where the benches run: ``--device`` (cpu, cuda), passed to the children."""
    import torch

    return torch.device(os.environ.get(DEVICE_ENV, "cpu"))


def _sync() -> None:
    import torch

    if _device().type == "cuda":
        torch.cuda.synchronize()


def _baseline() -> int:
    """What the peak is measured from: RSS after the imports (CPU); zero on CUDA, where
    the peak is torch.cuda.max_memory_allocated (the weights included)."""
    import psutil
    import torch

    if _device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0
    return psutil.Process().memory_info().rss


def _peak(before: int) -> int:
    import torch

    if _device().type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def _build(shape: str):
    """The shape's model with random weights (allocated, then one N(0, 0.02) draw)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    transformers.logging.set_verbosity_error()
    config_cls, kwargs = SHAPES[shape]
    config = getattr(transformers, config_cls)(**kwargs)
    dtype, quantization = _precision()
    with no_init_weights():  # allocate only; the draw below is one cheap pass
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    if quantization != "none":
        model = _quantized(shape, model, dtype, quantization)
    else:
        model = model.to(_device())
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, config, generator


def _precision() -> tuple[str, str]:
    """The base's (dtype, quantization): ``--dtype`` and ``--quantization``."""
    return os.environ.get(DTYPE_ENV, "float32"), os.environ.get(QUANTIZATION_ENV, "none")


def _quantized(shape: str, model, dtype: str, quantization: str):
    """``model`` saved once (safetensors) and loaded back quantized by fedlora's loader."""
    from fedlora.task.llm import load_causal_lm

    saved = Path(os.environ.get(SAVED_ENV) or tempfile.mkdtemp()) / f"{shape}-{dtype}"
    if not (saved / "config.json").exists():
        model.save_pretrained(saved, safe_serialization=True)
    del model
    return load_causal_lm(saved, {"dtype": dtype, "quantization": quantization},
                          str(_device()))


def _data(config, generator, batch: int, seq: int):
    import torch
    from torch.utils.data import TensorDataset

    n = max(4 * batch, 32)
    ids = torch.randint(0, config.vocab_size, (n, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # a prompt half, as instruction data has
    return TensorDataset(ids, torch.ones_like(ids), labels)


def run_peft(shape: str, batch: int, seq: int, steps: int) -> dict:
    """The baseline: a bare PEFT LoRA loop on the same model, batch and loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    from fedlora.task.memory import estimate

    before = _baseline()
    model, config, generator = _build(shape)
    need = estimate(_job(shape, "ffa", "plain", batch, seq, Path(".")), model=model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-4)
    data = _data(config, generator, batch, seq)
    loader = DataLoader(data, batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(1))

    def train(count: int) -> int:
        seen = 0
        while True:
            for batch_ in loader:
                ids, mask, labels = (t.to(_device()) for t in batch_)
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss.item()
                seen += len(ids)
                count -= 1
                if not count:
                    return seen

    train(1)  # warm-up, as for the fedlora modes
    _sync()
    started = time.perf_counter()
    seen = train(steps)
    _sync()
    seconds = time.perf_counter() - started
    peak = _peak(before)
    return {"shape": shape, "method": "-", "mode": "peft", "batch": batch, "seq": seq,
            "steps": steps, "device": str(_device()), "tokens_per_s": seen * seq / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak / 2**20,
            "estimate_mib": need.total / 2**20, "threads": torch.get_num_threads()}


def run_one(shape: str, method: str, mode: str, batch: int, seq: int, steps: int) -> dict:
    """One measurement (call in a fresh process)."""
    if mode == "peft":
        return run_peft(shape, batch, seq, steps)
    import peft  # noqa: F401 - before the baseline, as below
    import torch

    from fedlora.aggregation import get_method
    from fedlora.client.train import train_plain, train_private
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.memory import estimate
    from fedlora.task.models import fingerprint, target_module_names

    # What fedlora imports on first use (PEFT in the adapter host, Opacus in a private
    # round) is imported before the baseline, as the PEFT row imports PEFT: the peak
    # counts the training, not the libraries' code.
    if mode != "plain":
        import fedlora.privacy.dpsgd  # noqa: F401
    before = _baseline()
    model, config, generator = _build(shape)
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
    data = _data(config, generator, batch, seq)
    n = len(data)
    device = _device()

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
    _sync()
    started = time.perf_counter()
    result = train(steps)
    _sync()
    seconds = time.perf_counter() - started
    peak = _peak(before)
    # Under DP the batches are Poisson draws: tokens/s counts the examples actually seen.
    return {"shape": shape, "method": method, "mode": mode, "batch": batch, "seq": seq,
            "steps": steps, "device": str(_device()),
            "tokens_per_s": result.examples_seen * seq / seconds,
            "seconds_per_step": seconds / steps, "peak_rss_mib": peak / 2**20,
            "estimate_mib": need.total / 2**20, "threads": torch.get_num_threads(),
            "examples_seen": result.examples_seen}


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

    from fedlora.aggregation import AdapterSpec, get_method
    from fedlora.client.train import train_plain, train_private
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.models import target_module_names

    base, config, generator = _build(shape)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config)
    twin.load_state_dict(base.state_dict(), assign=True)  # the same tensors, no copy
    for name, buffer in base.named_buffers():  # non-persistent ones too (rotary tables)
        owner, _, leaf = name.rpartition(".")
        twin.get_submodule(owner)._buffers[leaf] = buffer
    twin.requires_grad_(False)
    twin.config.use_cache = False
    data = _data(config, generator, batch, seq)
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
                ids, mask, labels = (t.to(_device()) for t in next(batches))
            except StopIteration:
                batches = iter(DataLoader(data, batch_size=batch, shuffle=True,
                                          generator=order))
                ids, mask, labels = (t.to(_device()) for t in next(batches))
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
            return len(ids)

        steps["peft"] = peft_step
    impl = get_method(method)
    targets = target_module_names(base, ["q_proj", "v_proj"])
    host = AdapterHost(base, targets, [], impl.adapter_layer)
    shapes = {t: (base.get_submodule(t).out_features, base.get_submodule(t).in_features)
              for t in targets}
    spec = AdapterSpec(shapes=shapes, rank=16, alpha=32.0, seed=0)
    start = impl.client_start(impl.downlink(impl.init_state(spec), first_contact=True), spec)
    trainable = host.start(start, {})
    job = _job(shape, method, "plain", batch, seq, Path("."))
    strategy = dict(job["strategy"], local_steps=1)
    device = _device()
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
            _sync()
            started = time.perf_counter()
            seen = step()
            _sync()
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
            "device": str(_device()),
            "threads": torch.get_num_threads(), "modes": rows}


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
        return _paired(args)
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


def _paired(args: argparse.Namespace) -> int:
    modes = args.modes.split(",")
    results = []
    for shape in args.shapes.split(","):
        for method in args.methods.split(","):
            proc = subprocess.run(
                [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); "
                 "import llm; print(json.dumps(llm.run_paired(sys.argv[2], sys.argv[3], "
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
