"""Resumable sweep over arbitrary Hydra overrides (the engine of `fedlora tune`).

Each trial (one line of --trials: overrides separated by spaces) is one real
`fedlora simulate`; each finished run is appended to --results at once, and a rerun skips
trials already there.

Usage: python bench/sweep.py --results bench/results/dp-tuning.jsonl --trials FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.deploy.tune import run_trials

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "sweep")
    parser.add_argument("--trials", type=Path, required=True,
                        help="one trial (overrides) per line; # starts a comment")
    args = parser.parse_args()
    trials = [line.split() for line in args.trials.read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    run_trials(trials, args.results, args.runs_dir)


if __name__ == "__main__":
    main()
