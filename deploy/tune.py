"""`fedlora tune`: search a recipe's knobs with real runs and write the best as a recipe file.

Each trial is one `fedlora simulate` with a set of Hydra overrides, run in a child process
and appended to a JSONL results file as soon as it finishes (key = its sorted overrides),
so a killed search resumes where it stopped and a rerun only runs what is missing. The
search draws ``--trials`` points from the grid given by ``--space`` with a fixed seed: two
methods tuned with the same space, trials and seed get exactly the same tuning budget.
The best point (mean over ``--seeds`` of the final accuracy on a validation split carved
from the training examples, ``data.validation_fraction``, 0.1 unless ``--validation-fraction``
says otherwise) is written to conf/recipe/<strategy>_<privacy>.yaml with its provenance. The
test split is never used to choose: it is reported beside, for the record.

Privacy caveat: every trial trains on the clients' data. Choosing the best of many private
runs leaks through the choice; per-run accounting does not show it (Papernot & Steinke,
"Hyperparameter Tuning with Renyi Differential Privacy", ICLR 2022). Tune on a proxy split
or public data, or account for the trials (README, Tuning).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.errors import HydraException

from fedlora.task.config import ConfigError
from fedlora.task.files import atomic_write

CONF = Path(__file__).resolve().parents[1] / "conf"
# The recipe knobs (what a recipe file may set); a search space must stay inside them.
RECIPE_KEYS = ("strategy.lr", "strategy.optimizer", "strategy.momentum", "strategy.batch_size",
               "strategy.sample_rate", "strategy.local_steps", "strategy.lr_schedule.",
               "strategy.server_optimizer.", "federation.rounds", "privacy.max_grad_norm",
               "model.max_length")

def trial_key(overrides: Sequence[str]) -> str:
    return " ".join(sorted(overrides))


def config_digest(overrides: Sequence[str]) -> str:
    """A fingerprint of the job ``overrides`` compose to today (its recipe's name aside).

    Stored with each result when the run starts: the same overrides can mean another job
    once a recipe file changes, and the digest is how a stored result tells whether it
    still answers for them (bench/quality.py sets stale cells aside, and reuses a tuning
    trial only for a cell with the same digest)."""
    from fedlora.task.config import compose_job
    from fedlora.task.schema import schema_default, schema_fields

    cfg = compose_job(list(overrides))
    cfg.pop("recipe_name", None)
    # A key at its schema default is left out: a knob added later, at the value that runs
    # the job stored results ran, does not make them stale.
    for key, f in schema_fields():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node.get(part, {})
        if leaf in node and node[leaf] == schema_default(f):
            del node[leaf]
    text = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_results(results: Path) -> list[dict[str, Any]]:
    rows = []
    if results.is_file():
        for line in results.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed search
    return rows


def current_rows(results: Path) -> dict[str, dict[str, Any]]:
    """The rows of ``results`` that ran the job their overrides compose to today (same
    config digest), by key, the last of a key winning. A row from before a default or a
    recipe changed answers for another job: it is left out (and its trial runs again)."""
    digests: dict[str, str] = {}
    out = {}
    for row in read_results(results):
        key = row["key"]
        if key not in digests:
            digests[key] = config_digest(row["overrides"])
        if row.get("config_digest") == digests[key]:
            out[key] = row
    return out


def grid(axes: Sequence[str]) -> list[list[str]]:
    """'key=v1,v2' axes -> every combination, as override lists."""
    options = []
    for axis in axes:
        key, _, values = axis.partition("=")
        if not key or not values:
            raise ValueError(f"search axis {axis!r} is not key=v1,v2,...")
        options.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*options)]


def sample_points(space: Sequence[str], trials: int, seed: int) -> list[list[str]]:
    """``trials`` distinct grid points, the same ones for every method given the same seed."""
    points = grid(space)
    if trials >= len(points):
        return points
    return random.Random(seed).sample(points, trials)


def summarize_run(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return {
        "final_accuracy": summary.get("final_accuracy"),
        "final_val_accuracy": summary.get("final_val_accuracy"),
        "best_accuracy": summary.get("best_accuracy"),
        "accuracy_per_round": [r.get("accuracy") for r in rows],
        "epsilon_max": summary.get("epsilon_max"),
        "client_level_epsilon": summary.get("client_level_epsilon"),
        "bytes_per_round": (summary["bytes_up_total"] + summary["bytes_down_total"])
        / max(1, summary["rounds"]),
        "rounds": summary["rounds"],
        "wall_seconds": summary["wall_seconds"],
    }


def append_result(results: Path, row: dict[str, Any]) -> None:
    """Append one finished trial's row as a line of JSON (the file is append-only: a crash
    mid-sweep loses at most the trial that was running)."""
    with open(results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def run_trial(overrides: Sequence[str], runs_dir: Path, results: Path,
              fixed: Sequence[str] = ()) -> dict[str, Any] | None:
    """One real `fedlora simulate`; its row is appended to ``results`` (None on failure)."""
    key = trial_key([*fixed, *overrides])
    try:
        digest = config_digest([*fixed, *overrides])
    except (ConfigError, HydraException) as exc:  # this trial is invalid; the others may not be
        print(f"  FAILED before running: invalid config: {exc}", flush=True)
        return None
    run_dir = (runs_dir / hashlib.sha256(key.encode()).hexdigest()[:12]).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.exists():  # a trial killed earlier: its rows must not mix into this run's
        shutil.rmtree(run_dir)
    log = run_dir.with_suffix(".log")
    cmd = [sys.executable, "-m", "fedlora.deploy.cli", "simulate", *fixed, *overrides,
           f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
    elapsed = time.perf_counter() - started
    if code != 0 or not (run_dir / "summary.json").is_file():
        print(f"  FAILED (exit {code}) after {elapsed:.0f} s; log: {log}", flush=True)
        return None
    row = {"key": key, "overrides": [*fixed, *overrides], "run_dir": str(run_dir),
           "config_digest": digest, "elapsed_seconds": round(elapsed, 1), **summarize_run(run_dir)}
    append_result(results, row)
    print(f"  {elapsed:5.0f} s  final {row['final_accuracy']:.3f}  best "
          f"{row['best_accuracy']:.3f}  epsilon {row['epsilon_max']}", flush=True)
    return row


def run_trials(trials: Sequence[Sequence[str]], results: Path, runs_dir: Path,
               fixed: Sequence[str] = ()) -> None:
    """Run every trial not yet in ``results`` (resumable, incremental)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    done = current_rows(results)
    todo = [t for t in trials if trial_key([*fixed, *t]) not in done]
    print(f"{len(trials)} trials, {len(trials) - len(todo)} already in {results}", flush=True)
    for i, overrides in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {' '.join([*fixed, *overrides])}", flush=True)
        run_trial(overrides, runs_dir, results, fixed)


def best_point(rows: Sequence[dict[str, Any]], points: Sequence[Sequence[str]],
               fixed: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], float, int]:
    """The point with the highest mean final validation accuracy over the seeds that
    finished (``final_val_accuracy``; never the test split's ``final_accuracy``)."""
    by_key = {row["key"]: row for row in rows}
    best: tuple[list[str], float, int] | None = None
    for point in points:
        accs = [by_key[k]["final_val_accuracy"] for s in seeds
                if (k := trial_key([*fixed, *point, f"federation.seed={s}"])) in by_key
                and by_key[k].get("final_val_accuracy") is not None]
        if accs and (best is None or statistics.mean(accs) > best[1]):
            best = (list(point), statistics.mean(accs), len(accs))
    if best is None:
        raise RuntimeError("no trial finished: nothing to choose from")
    return best


def recipe_yaml(name: str, point: Sequence[str], provenance: Sequence[str]) -> str:
    """A `# @package _global_` recipe setting the chosen overrides (values YAML-typed)."""
    tree: dict[str, Any] = {"recipe_name": name}
    for override in sorted(point):
        key, _, value = override.partition("=")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    header = ["# @package _global_", *(f"# {line}" for line in provenance)]
    return "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=True)


def check_space(space: Sequence[str]) -> None:
    for axis in space:
        key = axis.partition("=")[0]
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RECIPE_KEYS):
            raise SystemExit(f"fedlora tune: {key!r} is not a recipe knob; allowed: "
                             f"{', '.join(RECIPE_KEYS)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedlora tune", description=__doc__.split("\n\n")[0],
        epilog="Example: fedlora tune --strategy ffa --privacy dp_eps8 --trials 6 "
               "--space strategy.lr=0.03,0.1,0.2 strategy.lr_schedule.kind=constant,cosine "
               "-- model.max_length=32")
    parser.add_argument("--strategy", required=True, help="method to tune (conf/strategy)")
    parser.add_argument("--privacy", required=True, help="privacy preset (conf/privacy)")
    parser.add_argument("--space", nargs="+", required=True,
                        help="search axes key=v1,v2,... over the recipe knobs")
    parser.add_argument("--trials", type=int, default=8,
                        help="grid points to try (drawn with --search-seed; default 8)")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="federation seeds per point; the score is the mean")
    parser.add_argument("--results", type=Path, default=Path("runs/tune/results.jsonl"))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/tune"))
    parser.add_argument("--write-recipe", action="store_true",
                        help="write <recipe-dir>/<strategy>_<privacy>.yaml from the best point")
    parser.add_argument("--recipe-dir", type=Path, default=CONF / "recipe",
                        help="where --write-recipe writes (default: the package's conf/recipe)")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="training examples carved out as the split trials are ranked on")
    parser.add_argument("extra", nargs="*", help="overrides for every trial (after --)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    if not 0 < args.validation_fraction < 1:
        parser.error("--validation-fraction must be in (0, 1): trials are ranked on it")
    try:
        check_space(args.space)
        points = sample_points(args.space, args.trials, args.search_seed)
    except ValueError as exc:
        parser.error(str(exc))
    fixed = [f"strategy={args.strategy}", f"privacy={args.privacy}",
             f"data.validation_fraction={args.validation_fraction:g}", *args.extra]
    trials = [[*p, f"federation.seed={s}"] for p in points for s in args.seeds]
    run_trials(trials, args.results, args.runs_dir, fixed)
    done = current_rows(args.results)
    point, score, count = best_point(list(done.values()), points, fixed, args.seeds)
    print(f"best: {' '.join(point)}  (mean final validation accuracy {score:.3f} over "
          f"{count} seed(s))")
    runs = sum(trial_key([*fixed, *t]) in done for t in trials)
    if args.privacy != "none":
        print(f"privacy: this search made {runs} private run(s) on the same data; choosing the "
              "best of them spends more than one run's epsilon (README: Private training, "
              "the privacy caveat)")
    if args.write_recipe:
        name = f"{args.strategy}_{args.privacy}"
        provenance = [
            f"Recipe {name}: written by `fedlora tune` from {len(points)} trial point(s) x "
            f"{len(args.seeds)} seed(s)",
            f"space: {' '.join(args.space)}; fixed: {' '.join(args.extra) or 'none'}",
            f"chosen on the validation split (data.validation_fraction="
            f"{args.validation_fraction:g}): mean final validation accuracy {score:.3f}",
        ]
        path = args.recipe_dir / f"{name}.yaml"
        atomic_write(path, recipe_yaml(name, point, provenance).encode("utf-8"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
