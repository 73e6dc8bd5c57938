"""Client-level DP with 1,000 clients and 100 per round (MiniLM / BBC News): a resumable
sweep over methods, budgets and seeds at one recipe, and its table.

Each run is one real `fedlora simulate` (through deploy/tune.py's trial runner: each
finished run is appended to --results at once; a rerun skips runs already there). The
recipe was chosen on the validation split (10% of the training pool) at federation.seed 0;
the table reports the untouched test split on other seeds.

Usage:
  python bench/client_level.py --methods fedsb --epsilons 8 3 --seeds 1 2 3
  python bench/client_level.py --report-only --out docs/SCALE.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from stats import mean_interval  # noqa: E402

from fedlora.deploy.tune import current_rows, run_trials, trial_key  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "client-level-1000-clients-seeds.jsonl"
BEGIN, END = "<!-- client-level table: begin -->", "<!-- client-level table: end -->"

# The federation and the DP-FedAvg recipe (server momentum, cosine server rate, adaptive
# clipping from C = 0.5); per method, the client's own training knobs.
FEDERATION = [
    "privacy=client_dp", "federation.num_clients=1000", "federation.clients_per_round=100",
    "federation.rounds=30", "model.max_length=32", "eval_every=5",
    "data.validation_fraction=0.1",
    "strategy.server_optimizer.name=momentum", "strategy.server_optimizer.momentum=0.9",
    "strategy.server_optimizer.lr=1.0", "strategy.server_optimizer.schedule=cosine",
    "strategy.server_optimizer.min_factor=0.1",
    "privacy.client_level.clip=0.5", "privacy.client_level.adaptive=true",
]
METHOD_KNOBS = {
    "fedsb": ["strategy.local_steps=5", "strategy.lr=0.1"],
    "ffa": ["strategy.local_steps=5", "strategy.lr=0.005"],
    "fedavg": ["strategy.local_steps=5", "strategy.lr=0.005"],
}


def trial(method: str, epsilon: float, seed: int) -> list[str]:
    return [f"strategy={method}", *METHOD_KNOBS[method],
            f"privacy.client_level.epsilon={epsilon:g}", f"federation.seed={seed}"]


def report(rows: dict[str, dict], methods: list[str], epsilons: list[float],
           seeds: list[int]) -> str:
    lines = ["| method | epsilon | test accuracy (mean ± 95% CI) | validation | seeds | "
             "epsilon spent (max) | minutes per run |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        for eps in epsilons:
            found = [rows[k] for s in seeds
                     if (k := trial_key([*FEDERATION, *trial(method, eps, s)])) in rows]
            if not found:  # not run: left out of the table
                continue
            test = mean_interval([r["final_accuracy"] for r in found])
            val = mean_interval([r["final_val_accuracy"] for r in found])
            spent = max(r.get("client_level_epsilon") or 0.0 for r in found)
            minutes = sum(r["wall_seconds"] for r in found) / len(found) / 60
            used = ", ".join(str(s) for s in seeds if trial_key(
                [*FEDERATION, *trial(method, eps, s)]) in rows)
            lines.append(f"| {method} | {eps:g} | {test.text()} | {val.mean:.3f} | {used} | "
                         f"{spent:.3f} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fedsb"], choices=sorted(METHOD_KNOBS))
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 3.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "client-level")
    parser.add_argument("--out", type=Path, help="replace the table between its markers")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        # Seed-major order: a sweep stopped early leaves every cell with a similar count.
        trials = [trial(m, e, s) for s in args.seeds for e in args.epsilons for m in args.methods]
        run_trials(trials, args.results, args.runs_dir, fixed=FEDERATION)
    table = report(current_rows(args.results) if args.results.exists() else {},
                   args.methods, args.epsilons, args.seeds)
    print(table)
    if args.out:
        text = args.out.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            raise SystemExit(f"{args.out}: no {BEGIN} ... {END} markers")
        head, rest = text.split(BEGIN, 1)
        args.out.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}",
                            encoding="utf-8")


if __name__ == "__main__":
    main()
