"""Wall time per round and peak memory of a simulated federation: 10 vs 100 virtual clients.

Runs `fedlora simulate` on tiny_bert with synthetic data (the same data for both sizes,
every client in every round) and samples the resident memory of the whole process tree
(the driver, Ray's processes and its workers) every 0.2 s.

Usage: python bench/simulation.py [--clients 10 100] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run(clients: int, rounds: int, workdir: Path) -> dict:
    run_dir = workdir / f"clients-{clients}"
    cmd = [sys.executable, "-m", "fedlora.deploy.cli", "simulate", "model=tiny_bert",
           "data=synthetic", "data.num_train=6400", "strategy=ffa", "privacy=none",
           "federation.dirichlet_alpha=100", "federation.min_client_examples=16",
           f"federation.rounds={rounds}", f"federation.num_clients={clients}",
           f"federation.clients_per_round={clients}", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watcher = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(watcher))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"simulate with {clients} clients failed:\n{err[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_round = [r["wall_seconds"] for r in rows]
    return {"clients": clients, "total_seconds": time.perf_counter() - start,
            "seconds_per_round": sum(per_round) / len(per_round),
            "seconds_per_client_update": sum(per_round) / len(per_round) / clients,
            "peak_rss_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-sim-") as tmp:
        results = [run(c, args.rounds, Path(tmp)) for c in args.clients]
    base = results[0]
    for r in results:
        r["memory_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"tiny_bert, synthetic data, ffa, {args.rounds} rounds, all clients every round")
    print(f"{'clients':>8} {'s/round':>9} {'s/update':>9} {'peak MB':>9} {'mem ratio':>10}")
    for r in results:
        print(f"{r['clients']:>8} {r['seconds_per_round']:>9.2f} "
              f"{r['seconds_per_client_update']:>9.3f} {r['peak_rss_mb']:>9.0f} "
              f"{r['memory_ratio']:>10.2f}")
    print("goal: 100 clients <= 1.1x the peak memory of 10")


if __name__ == "__main__":
    main()
