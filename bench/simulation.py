"""Clients per second and peak memory of a simulated federation as the client count grows.

Runs `fedlora simulate` (tiny_bert, synthetic data, ffa, no DP, IID split of about two
examples per client, one local step) with a fixed cohort per round, and samples the
resident memory of the whole process tree (the driver, Ray's processes, its workers)
every 0.2 s. With one tiny local step the time per client is almost all fixed cost
(message decode, client build, adapter load, encode): ``fixed_s_per_client`` is the
round's wall time x the number of client actors / the clients trained. With ``--rounds``
above one, ``fastest_round_seconds`` is the least disturbed round on a shared machine;
``total_seconds`` includes start-up (Ray, registering and describing every node).

Usage: python bench/simulation.py [--clients 100 1000 10000] [--per-round 100]
                                  [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(clients: int, per_round: int, rounds: int, workdir: Path, cpus: int) -> dict:
    run_dir = workdir / f"clients-{clients}"
    cohort = min(per_round, clients)
    cmd = [sys.executable, "-m", "fedlora.deploy.cli", "simulate", "model=tiny_bert",
           "data=synthetic", f"data.num_train={2 * clients}", "data.num_test=200",
           "strategy=ffa", "strategy.local_steps=1", "privacy=none",
           "federation.partitioner=iid", f"federation.rounds={rounds}",
           f"federation.num_clients={clients}", f"federation.clients_per_round={cohort}",
           f"federation.min_clients={min(2, cohort)}", f"simulation.num_cpus={cpus}",
           f"hydra.run.dir={run_dir}"]
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
    trained = sum(len(r["clients"]) for r in rows)
    seconds = sum(r["wall_seconds"] for r in rows)
    return {"clients": clients, "clients_per_round": cohort, "rounds": len(rows),
            "total_seconds": round(time.perf_counter() - start, 2),
            "round_seconds": round(seconds / len(rows), 3),
            # On a shared machine the fastest round is the least disturbed one.
            "fastest_round_seconds": round(min(r["wall_seconds"] for r in rows), 3),
            "clients_per_second": round(trained / seconds, 2),
            "fixed_s_per_client": round(seconds * cpus / trained, 4),
            "peak_rss_mb": round(peak / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1),
                        help="Ray CPUs = client actors (one CPU each)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-sim-") as tmp:
        results = [run(c, args.per_round, args.rounds, Path(tmp), args.cpus)
                   for c in args.clients]
    base = results[0]
    for r in results:
        r["memory_ratio"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"tiny_bert, synthetic data (2 examples/client), ffa, 1 local step, "
          f"{args.per_round} clients per round, {args.cpus} actors")
    print(f"{'clients':>8} {'s/round':>9} {'fastest':>8} {'clients/s':>10} "
          f"{'fixed s/client':>15} {'peak MB':>8} {'mem ratio':>10} {'run s':>7}")
    for r in results:
        print(f"{r['clients']:>8} {r['round_seconds']:>9.2f} {r['fastest_round_seconds']:>8.2f} "
              f"{r['clients_per_second']:>10.1f} {r['fixed_s_per_client']:>15.3f} "
              f"{r['peak_rss_mb']:>8} {r['memory_ratio']:>10.2f} {r['total_seconds']:>7.0f}")
    print("targets: fixed cost <= 0.1 s per client; peak memory at 1,000 clients <= 1.2x 100")


if __name__ == "__main__":
    main()
