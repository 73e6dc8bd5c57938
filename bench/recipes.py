"""Write conf/recipe/<method>_<preset>.yaml from the equal-budget tuning trials.

The grid is the same for every method (GRID below: learning rate with a cosine schedule,
10 rounds, batch 16, 10 local steps, seq 32, seed 0), then one refinement trial per method
by the same rule for all (refinement_lr: the geometric midpoint between the method's best
grid rate and its better neighbour). For each (method, budget) the trial with the best
final accuracy wins; a budget with no finished trial of its own reuses the
method's epsilon-8 choice (a rule, said in the file). Every recipe says how many of its
trials finished and what each reached.

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
FIXED = ["model.max_length=32", "federation.rounds=10", "strategy.lr_schedule.kind=cosine"]


def _key(method: str, preset: str, lr: str) -> str:
    return trial_key([f"strategy={method}", f"privacy={preset}", *FIXED, f"strategy.lr={lr}"])


def refinement_lr(found: list[tuple[str, dict]]) -> str | None:
    """sqrt(best * better neighbour) on the grid, to 2 significant digits; None until the
    whole grid has finished (the rule needs both neighbours)."""
    if len(found) != len(GRID):
        return None
    acc = [r["final_accuracy"] for _, r in found]
    i = max(range(len(GRID)), key=acc.__getitem__)
    neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(GRID)]
    j = max(neighbours, key=acc.__getitem__)
    return f"{float(f'{math.sqrt(float(GRID[i]) * float(GRID[j])):.2g}'):g}"


def trials(rows: dict[str, dict], method: str, preset: str) -> list[tuple[str, dict]]:
    """The grid's finished trials, then the refinement trial if it has finished."""
    out = [(lr, rows[_key(method, preset, lr)]) for lr in GRID
           if _key(method, preset, lr) in rows]
    extra = refinement_lr(out)
    if extra is not None and _key(method, preset, extra) in rows:
        out.append((extra, rows[_key(method, preset, extra)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/dp-tuning.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "conf/recipe")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    rows = {r["key"]: r for r in read_results(args.results)}
    for method in METHODS:
        base = trials(rows, method, "dp_eps8")
        for preset in PRESETS:
            own = trials(rows, method, preset)
            found = own or base
            if not found:
                print(f"{method} {preset}: no finished trial, recipe left as it is")
                continue
            lr, best = max(found, key=lambda t: t[1]["final_accuracy"])
            done = ", ".join(f"lr {x}: {r['final_accuracy']:.3f}" for x, r in found)
            planned = len(GRID) + 1  # the grid and its refinement trial
            status = "TUNED" if len(found) == planned else \
                f"PARTIALLY TUNED ({len(found)} of {planned} trials)"
            source = preset if own else "dp_eps8"
            provenance = [
                f"Recipe {method}_{preset}: {status}. Grid, the same for every method: lr in "
                f"{{{', '.join(GRID)}}},",
                "then one refinement trial at sqrt(best grid lr x its better neighbour's); "
                "cosine schedule, 10 rounds,",
                "batch 16, 10 local steps (seq 32, seed 0, 10 clients, Dirichlet 0.5; "
                "bench/results/dp-tuning.jsonl).",
                f"Trials at {source}: {done}.",
            ]
            if not own:
                provenance.append(f"No trial at {preset} yet: the epsilon-8 choice is reused "
                                  "(a rule, not a search).")
            point = [f"strategy.lr={lr}", "strategy.lr_schedule.kind=cosine",
                     "federation.rounds=10"]
            text = recipe_yaml(f"{method}_{preset}", point, provenance)
            print(f"{method} {preset}: lr {lr} ({best['final_accuracy']:.3f} at {source}; "
                  f"{len(found)} trials)")
            if not args.dry_run:
                (args.out / f"{method}_{preset}.yaml").write_text(text)


if __name__ == "__main__":
    main()
