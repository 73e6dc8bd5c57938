"""Write conf/recipe/<method>_<preset>.yaml from the equal-budget tuning trials.

One protocol for every trial (PROTOCOL: Poisson rate q = 0.36, about 64 of a client's ~178
examples, 5 local steps, 10 rounds, cosine schedule, seq 32, seed 0, 10 clients,
Dirichlet 0.5): at a fixed budget the noise on a client's mean clipped gradient,
sigma / (q N_k), grows with the number of noisy steps, so DP wants few, large steps
(docs/RESULTS.md). The learning-rate search is the same for every method and budget: lr in
GRID, then one refinement trial, the geometric midpoint of the best rate and its better
neighbour, or, when the best is at the grid's edge, one step of sqrt(10) further out
(4 trials per method and budget, 12 per method).

For each (method, budget) the trial with the best final accuracy wins. Only trials that
ran the job their overrides mean today count (their stored config digest; a trial from
before a default changed, such as the pooler-head era in bench/results/cls-pooler/, does
not). A (method, budget) with no trial yet keeps its file's rate and says NOT TUNED.

Usage: python bench/recipes.py [--results bench/results/dp-tuning.jsonl] [--dry-run]
       python bench/recipes.py --plan > queue.txt   # what the rule still needs
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import yaml

from fedlora.deploy.tune import current_rows, recipe_yaml, trial_key

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fedavg", "ffa", "flora", "fedsvd", "fedsb")
PRESETS = ("dp_eps8", "dp_eps3", "dp_eps1")
GRID = ("0.03", "0.1", "0.3")
# The sequence length is part of the protocol, and so of every recipe: `fedlora simulate
# privacy=dp_eps8` then runs the job that was tuned (MiniLM's own default is 64).
PROTOCOL = ["model.max_length=32", "federation.rounds=10", "strategy.lr_schedule.kind=cosine",
            "strategy.sample_rate=0.36", "strategy.local_steps=5"]
GRID_TEXT = ("lr in {" + ", ".join(GRID) + "}, then one refinement trial (the midpoint of "
             "the best and its better neighbour, or sqrt(10) beyond an edge)")


def _sig2(value: float) -> str:
    return f"{float(f'{value:.2g}'):g}"


def _key(method: str, preset: str, lr: str) -> str:
    return trial_key([f"strategy={method}", f"privacy={preset}", *PROTOCOL, f"strategy.lr={lr}"])


def refinement_lr(found: list[tuple[str, dict]]) -> str | None:
    """None until the whole grid has finished (the rule needs the neighbours)."""
    if len(found) != len(GRID):
        return None
    acc = [r["final_accuracy"] for _, r in found]
    i = max(range(len(GRID)), key=acc.__getitem__)
    if i in (0, len(GRID) - 1):
        return _sig2(float(GRID[i]) * math.sqrt(10) ** (1 if i else -1))
    j = max((i - 1, i + 1), key=acc.__getitem__)
    return _sig2(math.sqrt(float(GRID[i]) * float(GRID[j])))


def best(found: list[tuple[str, dict]]) -> tuple[str, dict]:
    return max(found, key=lambda t: t[1]["final_accuracy"])


def trials(rows: dict[str, dict], method: str, preset: str) -> list[tuple[str, dict]]:
    """The finished trials of (method, budget), as (lr, row): the grid, then its refinement."""
    out = [(lr, rows[_key(method, preset, lr)]) for lr in GRID
           if _key(method, preset, lr) in rows]
    extra = refinement_lr(out)
    if extra is not None and _key(method, preset, extra) in rows:
        out.append((extra, rows[_key(method, preset, extra)]))
    return out


PLANNED_TRIALS = len(GRID) + 1


def plan(rows: dict[str, dict]) -> list[list[str]]:
    """The trials the rule still needs, as override lists: every (method, budget)'s missing
    grid rates, then its refinement once its grid has finished."""
    out = []
    for preset in PRESETS:
        for method in METHODS:
            found = trials(rows, method, preset)
            done = {lr for lr, _ in found}
            wanted = [lr for lr in GRID if lr not in done]
            extra = refinement_lr(found[:len(GRID)])
            if extra is not None and extra not in done:
                wanted.append(extra)
            out += [[f"strategy={method}", f"privacy={preset}", *PROTOCOL, f"strategy.lr={lr}"]
                    for lr in wanted]
    return out


def _file_lr(path: Path) -> str | None:
    if not path.is_file():
        return None
    return str(((yaml.safe_load(path.read_text()) or {}).get("strategy") or {}).get("lr"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/dp-tuning.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "conf/recipe")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--plan", action="store_true",
                        help="print the trials the rule still needs (one per line, for "
                             "bench/sweep.py --trials) and write nothing")
    args = parser.parse_args()
    rows = current_rows(args.results)
    if args.plan:
        print("\n".join(" ".join(trial) for trial in plan(rows)))
        return
    for method in METHODS:
        for preset in PRESETS:
            path = args.out / f"{method}_{preset}.yaml"
            own = trials(rows, method, preset)
            planned = PLANNED_TRIALS
            if own:
                lr, chosen = best(own)
                status = "TUNED" if len(own) == planned else \
                    f"PARTIALLY TUNED ({len(own)} of {planned} trials)"
                done = ", ".join(f"lr {x}: {r['final_accuracy']:.3f}" for x, r in own)
                result = f"Trials at {preset}: {done}."
                print(f"{method} {preset}: lr {lr} ({chosen['final_accuracy']:.3f}; "
                      f"{len(own)} of {planned} trials)")
            else:
                lr = _file_lr(path)
                if lr is None:
                    print(f"{method} {preset}: no trial and no recipe file; skipped")
                    continue
                status = f"NOT TUNED (0 of {planned} trials)"
                result = (f"No trial at {preset} under this protocol and model yet: lr {lr} is "
                          "carried over from the previous recipe (a rule, not a search).")
                print(f"{method} {preset}: lr {lr} (not tuned: carried over)")
            provenance = [
                f"Recipe {method}_{preset}: {status}. Protocol and grid, the same for every "
                "method (bench/recipes.py):",
                "Poisson rate q 0.36, 5 local steps, cosine schedule, 10 rounds;",
                f"{GRID_TEXT};",
                "seq 32, seed 0, 10 clients, Dirichlet 0.5 (bench/results/dp-tuning.jsonl).",
                result,
                "Batches are q x N_k (strategy.sample_rate); add strategy.sample_rate=null to "
                "use strategy.batch_size.",
            ]
            if not args.dry_run:
                path.write_text(recipe_yaml(f"{method}_{preset}",
                                            [f"strategy.lr={lr}", *PROTOCOL], provenance))


if __name__ == "__main__":
    main()
