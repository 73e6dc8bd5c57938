"""Accuracy vs privacy for every method on MiniLM / BBC News, through the real system.

Runs `fedlora simulate -m` over strategy x privacy (none, epsilon 8, 3, 1) for each seed,
with every method at its config defaults (the same tuning effort for each: none beyond
the defaults), then writes docs/RESULTS.md (table) and docs/results.png (accuracy vs
epsilon per method, bytes per round per method).

Usage: python bench/quality.py [--seeds 0 1] [--rounds 5] [--privacy none dp_eps8 ...]
       [--out docs/RESULTS.md] [--sweep-dir DIR] [--collect-only] [extra hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

METHODS = ["fedavg", "ffa", "flora", "fedsvd", "fedsb"]
PRIVACY = ["none", "dp_eps8", "dp_eps3", "dp_eps1"]
ROOT = Path(__file__).resolve().parents[1]


def run_sweep(seed: int, rounds: int, sweep_dir: Path, extra: list[str],
              privacy: list[str]) -> None:
    cmd = [sys.executable, "-m", "fedlora.deploy.cli", "simulate", "-m",
           f"strategy={','.join(METHODS)}", f"privacy={','.join(privacy)}",
           f"federation.seed={seed}", f"federation.rounds={rounds}",
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}", *extra]
    print("running:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)


def collect(sweep_dirs: list[Path]) -> list[dict]:
    rows = []
    for sweep in sweep_dirs:
        for run in sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file()):
            cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
            summary = json.loads((run / "summary.json").read_text())
            privacy = cfg["privacy"]
            rows.append({
                "method": summary["method"],
                "epsilon": float(privacy["epsilon"]) if privacy.get("enabled") else None,
                "seed": cfg["federation"]["seed"],
                "final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"],
                "epsilon_spent": summary.get("epsilon_max"),
                "bytes_per_round": (summary["bytes_up_total"] + summary["bytes_down_total"])
                / summary["rounds"],
                "wall_seconds": summary["wall_seconds"],
                "rounds": summary["rounds"],
            })
    return rows


def _label(eps: float | None) -> str:
    return "none" if eps is None else f"{eps:g}"


def write_report(rows: list[dict], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epsilons = [None, 8.0, 3.0, 1.0]
    table = {}
    for method in METHODS:
        for eps in epsilons:
            accs = [r["final_accuracy"] for r in rows if r["method"] == method
                    and r["epsilon"] == eps]
            table[method, eps] = accs
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# Results: accuracy vs privacy on MiniLM / BBC News",
        "",
        f"Produced by `{command}` (bench/quality.py). Every run is a real `fedlora simulate`",
        "(Flower simulation runtime, Opacus DP-SGD): all-MiniLM-L6-v2, BBC News, 10 clients,",
        f"Dirichlet 0.5, {rows[0]['rounds'] if rows else '?'} rounds, seeds {seeds}. Each method "
        "runs at its config defaults (conf/strategy/), the same (zero) tuning effort for each;",
        "the privacy presets are conf/privacy/dp_eps{8,3,1}.yaml (delta 1e-5, C = 1, PRV).",
        "Held-out accuracy after the last round, mean over seeds (min-max in brackets).",
        "",
        "| method | " + " | ".join(f"eps = {_label(e)}" for e in epsilons) + " | bytes / round |",
        "|---|" + "---|" * (len(epsilons) + 1),
    ]
    for method in METHODS:
        cells = []
        for eps in epsilons:
            accs = table[method, eps]
            if not accs:
                cells.append("-")
            elif len(accs) == 1:
                cells.append(f"{accs[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(accs):.3f} [{min(accs):.3f}-{max(accs):.3f}]")
        traffic = [r["bytes_per_round"] for r in rows if r["method"] == method]
        mb = f"{statistics.mean(traffic) / 1e6:.2f} MB" if traffic else "-"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {mb} |")
    spent = [r["epsilon_spent"] for r in rows if r["epsilon"] is not None]
    over = [r for r in rows if r["epsilon"] is not None and r["epsilon_spent"] > r["epsilon"]]
    lines += ["", f"Epsilon spent never exceeded the target: {not over} "
              f"({len(spent)} private runs; max spent / target = "
              f"{max((r['epsilon_spent'] / r['epsilon'] for r in rows if r['epsilon']), default=0):.3f}).",
              "", "![accuracy vs epsilon](results.png)", ""]
    best_none = max((statistics.mean(table[m, None]) for m in METHODS if table[m, None]),
                    default=None)
    best_8 = max((statistics.mean(table[m, 8.0]) for m in METHODS if table[m, 8.0]),
                 default=None)
    if best_none is not None and best_8 is not None:
        lines.append(f"Best non-private: {best_none:.3f}; best at epsilon 8: {best_8:.3f} "
                     f"(gap {100 * (best_none - best_8):.1f} points; goal <= 10).")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = list(range(len(epsilons)))
    for method in METHODS:
        ys = [statistics.mean(table[method, e]) if table[method, e] else float("nan")
              for e in epsilons]
        left.plot(xs, ys, marker="o", label=method)
    left.set_xticks(xs, [f"eps {_label(e)}" for e in epsilons])
    left.set(ylabel="held-out accuracy", title="Accuracy vs privacy")
    left.legend()
    left.grid(alpha=0.3)
    traffic = [statistics.mean([r["bytes_per_round"] for r in rows if r["method"] == m] or [0])
               / 1e6 for m in METHODS]
    right.bar(METHODS, traffic)
    right.set(ylabel="MB per round (up + down, 10 clients)", title="Communication")
    fig.tight_layout()
    fig.savefig(out.with_name("results.png"), dpi=100)
    print(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument("--sweep-dir", type=Path, default=ROOT / "multirun" / "quality")
    parser.add_argument("--privacy", nargs="+", default=PRIVACY,
                        help=f"privacy presets to sweep (default: {' '.join(PRIVACY)})")
    parser.add_argument("--collect-only", action="store_true")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    dirs = [args.sweep_dir / f"seed-{s}" for s in args.seeds]
    if not args.collect_only:
        for seed, sweep in zip(args.seeds, dirs, strict=True):
            run_sweep(seed, args.rounds, sweep, extra, args.privacy)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    write_report(collect([d for d in dirs if d.is_dir()]), args.out, command.strip())


if __name__ == "__main__":
    main()
