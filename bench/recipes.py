"""Write conf/recipe/<method>_<preset>.yaml from the equal-budget tuning trials.

Every trial: 10 rounds, cosine schedule, seq 32, seed 0, 10 clients, Dirichlet 0.5. Each
budget has a protocol (the knobs every trial at it shares) and a learning-rate grid, the
same rule for every method:

- epsilon 8: batch 16, 10 local steps; lr in GRID, then one refinement trial at the
  geometric midpoint between the best grid rate and its better neighbour (5 trials).
- epsilon 3 and 1 (SMALL_BUDGET): Poisson rate q = 0.36 (about 64 of a client's ~178
  examples), 5 local steps; lr = the method's epsilon-8 choice x ANCHOR_FACTORS (3 trials).
  At a fixed budget the noise on a client's mean clipped gradient, sigma / (q N_k), grows
  with the number of noisy steps, so small budgets want fewer, larger steps (docs/RESULTS.md,
  "What moves accuracy under DP").

For each (method, budget) the trial with the best final accuracy wins. A small budget with
no finished trial of its own takes the epsilon-8 rate with its protocol (a rule, said in
the file). Every recipe says how many of its trials finished and what each reached.

Usage: python bench/recipes.py [--results bench/results/dp-tuning.jsonl] [--dry-run]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedlora.deploy.tune import read_results, recipe_yaml, trial_key

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "ffa", "flora", "fedsvd", "fedsb")
PRESETS = ("dp_eps8", "dp_eps3", "dp_eps1")
GRID = ("0.01", "0.03", "0.1", "0.3")
ANCHOR_FACTORS = (1.0, 2.0, 0.5)
FIXED = ["model.max_length=32", "federation.rounds=10", "strategy.lr_schedule.kind=cosine"]
SMALL_BUDGET = ["strategy.sample_rate=0.36", "strategy.local_steps=5"]
PROTOCOL_TEXT = {
    "dp_eps8": "batch 16, 10 local steps; lr in {" + ", ".join(GRID) + "}, then one "
               "refinement trial at sqrt(best grid lr x its better neighbour's)",
    "small": "Poisson rate q 0.36, 5 local steps; lr = the method's epsilon-8 choice x "
             "{" + ", ".join(f"{f:g}" for f in ANCHOR_FACTORS) + "}",
}


def _sig2(value: float) -> str:
    return f"{float(f'{value:.2g}'):g}"


def protocol(preset: str) -> list[str]:
    """The knobs every trial at this budget shares (besides FIXED and the rate)."""
    return [] if preset == "dp_eps8" else list(SMALL_BUDGET)


def _key(method: str, preset: str, lr: str) -> str:
    return trial_key([f"strategy={method}", f"privacy={preset}", *FIXED, *protocol(preset),
                      f"strategy.lr={lr}"])


def refinement_lr(found: list[tuple[str, dict]]) -> str | None:
    """sqrt(best * better neighbour) on the grid, to 2 significant digits; None until the
    whole grid has finished (the rule needs both neighbours)."""
    if len(found) != len(GRID):
        return None
    acc = [r["final_accuracy"] for _, r in found]
    i = max(range(len(GRID)), key=acc.__getitem__)
    neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(GRID)]
    j = max(neighbours, key=acc.__getitem__)
    return _sig2(math.sqrt(float(GRID[i]) * float(GRID[j])))


def anchored_grid(anchor_lr: str) -> list[str]:
    """A small budget's rates: the epsilon-8 choice times each factor, 2 significant digits."""
    return [_sig2(float(anchor_lr) * f) for f in ANCHOR_FACTORS]


def best(found: list[tuple[str, dict]]) -> tuple[str, dict]:
    return max(found, key=lambda t: t[1]["final_accuracy"])


def trials(rows: dict[str, dict], method: str, preset: str,
           anchor_lr: str | None = None) -> list[tuple[str, dict]]:
    """The finished trials of (method, budget) by its protocol, as (lr, row)."""
    if preset == "dp_eps8":
        out = [(lr, rows[_key(method, preset, lr)]) for lr in GRID
               if _key(method, preset, lr) in rows]
        extra = refinement_lr(out)
        if extra is not None and _key(method, preset, extra) in rows:
            out.append((extra, rows[_key(method, preset, extra)]))
        return out
    if anchor_lr is None:
        return []
    return [(lr, rows[_key(method, preset, lr)]) for lr in anchored_grid(anchor_lr)
            if _key(method, preset, lr) in rows]


def planned_trials(preset: str) -> int:
    return len(GRID) + 1 if preset == "dp_eps8" else len(ANCHOR_FACTORS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/dp-tuning.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "conf/recipe")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    rows = {r["key"]: r for r in read_results(args.results)}
    for method in METHODS:
        base = trials(rows, method, "dp_eps8")
        anchor = best(base)[0] if base else None
        for preset in PRESETS:
            own = trials(rows, method, preset, anchor)
            if not own and anchor is None:
                print(f"{method} {preset}: no finished trial, recipe left as it is")
                continue
            planned = planned_trials(preset)
            protocol_text = PROTOCOL_TEXT["dp_eps8" if preset == "dp_eps8" else "small"]
            if own:
                lr, chosen = best(own)
                status = "TUNED" if len(own) == planned else \
                    f"PARTIALLY TUNED ({len(own)} of {planned} trials)"
                done = ", ".join(f"lr {x}: {r['final_accuracy']:.3f}" for x, r in own)
                result = f"Trials at {preset}: {done}."
                print(f"{method} {preset}: lr {lr} ({chosen['final_accuracy']:.3f}; "
                      f"{len(own)} of {planned} trials)")
            else:
                lr, status = anchor, f"NOT TUNED (0 of {planned} trials)"
                result = (f"No trial at {preset} yet: the epsilon-8 rate {anchor} with this "
                          "budget's protocol (a rule, not a search).")
                print(f"{method} {preset}: lr {lr} (untuned: the epsilon-8 rate)")
            provenance = [
                f"Recipe {method}_{preset}: {status}. Protocol and grid, the same for every "
                "method (bench/recipes.py):",
                f"{protocol_text};",
                "cosine schedule, 10 rounds, seq 32, seed 0, 10 clients, Dirichlet 0.5 "
                "(bench/results/dp-tuning.jsonl).",
                result,
            ]
            if preset != "dp_eps8":
                provenance.append("Batches are q x N_k (strategy.sample_rate); add "
                                  "strategy.sample_rate=null to use strategy.batch_size.")
            point = [f"strategy.lr={lr}", "strategy.lr_schedule.kind=cosine",
                     "federation.rounds=10", *protocol(preset)]
            if not args.dry_run:
                text = recipe_yaml(f"{method}_{preset}", point, provenance)
                (args.out / f"{method}_{preset}.yaml").write_text(text)


if __name__ == "__main__":
    main()
