"""The fault suite: every fault fedlora must survive, run for real, with a table of figures.

Scenarios (tiny_bert, synthetic data, DP on so the privacy ledgers can be checked):
  - each kind of malformed update, one faulty client per kind beside two healthy ones,
    2 rounds;
  - a client crash mid-round;
  - a straggler slower than the round timeout (its late reply is discarded);
  - fewer valid updates than min_clients (the round is skipped, the run goes on);
  - the server process tree SIGKILLed right after round 2's checkpoint, then
    `fedlora resume`;
  - in a real deployment (`fedlora deploy local`), a SuperNode SIGKILLed after round 1.

The malformed updates, the crash and the straggler are injected by the test plug-in
(tests/plugin: fedlora_test_plugin/faults.py, a ClientApp mod; these runs go through its
`python -m fedlora_test_plugin.faulty_cli`), which must be installed (`.ci/setup`).

Columns: survived (the run finished, exit 0), rounds lost (rounds without aggregation),
updates lost (updates not aggregated), ledger intact (every ledger parses, its epsilon is
the replay of its history, and no round is recorded twice).

Usage: python bench/faults.py [--json] [--markdown docs/RELIABILITY.md]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
from fedlora_test_plugin import faulty_cli
from fedlora_test_plugin.faults import EXPECTED_REJECTION

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_bert", "data=synthetic", "privacy=dp", "privacy.epsilon=8"]


def cli(args: list[str], run_dir: Path, *, check: bool = False) -> int:
    """`fedlora ARGS`; with a ``faults=`` argument, through the test plug-in's fault
    injection (faulty_cli)."""
    module = faulty_cli.__name__ if any(a.startswith("faults=") for a in args) \
        else "fedlora.deploy.cli"
    cmd = [sys.executable, "-m", module, *args]
    if args[0] == "simulate":
        cmd.append(f"hydra.run.dir={run_dir}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if check and proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return proc.returncode


def rows_of(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ledgers_intact(run_dir: Path) -> bool:
    return ledgers_intact_in(run_dir / "privacy")


def ledgers_intact_in(directory: Path) -> bool:
    from fedlora.privacy import PrivacyLedger, epsilon_for_history

    paths = sorted(directory.rglob("*.privacy.json"))
    if not paths:
        return False
    for path in paths:
        data = json.loads(path.read_text())
        ledger = PrivacyLedger.load(path)
        replay = epsilon_for_history(ledger.history, ledger.delta, ledger.mechanism)
        rounds = [r["round"] for r in data["rounds"]]
        if abs(replay - data["epsilon_spent"]) > 1e-9 or len(rounds) != len(set(rounds)):
            return False
    return True


def summarize(name: str, code: int, run_dir: Path, expect_lost: int, detail: str) -> dict:
    rows = rows_of(run_dir)
    lost_rounds = sum(1 for r in rows if r.get("skipped"))
    lost_updates = sum(len(r["rejected"]) + len(r["lost"]) + len(r["refused"]) for r in rows)
    return {"fault": name, "survived": code == 0 and bool(rows), "rounds": len(rows),
            "rounds_lost": lost_rounds, "updates_lost": lost_updates,
            "expected_updates_lost": expect_lost, "ledger_intact": ledgers_intact(run_dir),
            "detail": detail}


def malformed(work: Path) -> list[dict]:
    kinds = list(EXPECTED_REJECTION)
    clients = len(kinds) + 2
    faults = ",".join(f"{k}:{kind}" for k, kind in enumerate(kinds))
    run = work / "malformed"
    code = cli(["simulate", *TINY, "data.num_train=1600", "strategy=fedavg",
                "federation.rounds=2", f"federation.num_clients={clients}",
                f"federation.clients_per_round={clients}", "federation.dirichlet_alpha=100",
                "federation.max_update_norm=1000", f"faults={{{faults}}}"], run, check=True)
    results = []
    rows = rows_of(run)
    for k, kind in enumerate(kinds):
        reasons = [r["reason"] for row in rows for r in row["rejected"]
                   if r["node"] == f"partition-{k}"]
        ok = len(reasons) == len(rows) and all(x.startswith(EXPECTED_REJECTION[kind]) for x in reasons)
        entry = summarize(kind, code, run, len(rows), reasons[0][:60] if reasons else "-")
        entry["updates_lost"] = len(reasons)
        entry["survived"] = entry["survived"] and ok
        results.append(entry)
    return results


def crash_slow_and_minimum(work: Path) -> list[dict]:
    out = []
    run = work / "crash"
    code = cli(["simulate", *TINY, "strategy=ffa", "federation.rounds=2",
                "federation.num_clients=3", "federation.clients_per_round=3",
                "faults={0:crash}"], run, check=True)
    out.append(summarize("client crash mid-round", code, run, 2, "round aggregates the others"))
    run = work / "slow"
    code = cli(["simulate", *TINY, "strategy=ffa", "federation.rounds=2",
                "federation.num_clients=3", "federation.clients_per_round=3",
                "federation.round_timeout_s=12", "faults={0:slow}"], run, check=True)
    out.append(summarize("straggler past the round timeout", code, run, 2,
                         "late reply discarded and counted"))
    run = work / "minimum"
    code = cli(["simulate", *TINY, "strategy=ffa", "federation.rounds=2",
                "federation.num_clients=3", "federation.clients_per_round=3",
                "federation.min_clients=2", "faults={0:nan,1:truncated}"], run, check=True)
    out.append(summarize("below min_clients", code, run, 4, "rounds skipped, run goes on"))
    return out


def kill_and_resume(work: Path) -> dict:
    run = work / "killed"
    token = uuid.uuid4().hex  # marks every process of this run, Ray's included
    cmd = [sys.executable, "-m", "fedlora.deploy.cli", "simulate", *TINY, "strategy=ffa",
           "federation.rounds=4", "federation.num_clients=3", "federation.clients_per_round=3",
           f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, FEDLORA_BENCH_RUN=token))
    checkpoint = run / "checkpoints" / "round-000002"
    while not checkpoint.is_dir() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDLORA_BENCH_RUN") == token:
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    code = cli(["resume", str(run)], run, check=True)
    entry = summarize("server SIGKILL after round 2, resume", code, run, 0,
                      "4 rounds, no round counted twice")
    entry["survived"] = entry["survived"] and [r["round"] for r in rows_of(run)] == [1, 2, 3, 4]
    return entry


def supernode_killed(work: Path) -> dict:
    """Deployment: one SuperNode SIGKILLed after round 1; the others carry the run."""
    run = work / "node-loss"
    token = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "fedlora.deploy.cli", "deploy", "local", "--nodes", "3",
           *TINY, "strategy=ffa", "federation.rounds=3", "federation.min_clients=2",
           "federation.round_timeout_s=40", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, FEDLORA_BENCH_RUN=token))
    victim = None
    while proc.poll() is None and victim is None:
        if len(rows_of(run)) >= 1:
            for p in psutil.process_iter():
                try:
                    if (p.environ().get("FEDLORA_BENCH_RUN") == token
                            and "flower-supernode" in " ".join(p.cmdline())
                            and "partition-id=2" in " ".join(p.cmdline())):
                        victim = p
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            if victim is not None:
                victim.kill()
        time.sleep(0.2)
    code = proc.wait()
    rows = rows_of(run)
    later = rows[1:]
    entry = summarize("SuperNode SIGKILLed mid-run (deployment)", code, run, 2,
                      "later rounds aggregate the 2 live nodes")
    entry["ledger_intact"] = ledgers_intact_in(run / "deploy" / "nodes")
    entry["survived"] = (entry["survived"] and victim is not None and len(rows) == 3
                         and all(len(r["clients"]) == 2 and not r["skipped"] for r in later))
    return entry


def markdown(results: list[dict]) -> str:
    lines = ["| fault | survived | rounds lost | updates lost | privacy ledger intact | detail |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['fault']} | {'yes' if r['survived'] else 'NO'} | {r['rounds_lost']} "
                     f"| {r['updates_lost']} | {'yes' if r['ledger_intact'] else 'NO'} "
                     f"| {r['detail']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the table into this file (docs/RELIABILITY.md)")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedlora-faults-") as tmp:
        work = Path(tmp)
        results = (malformed(work) + crash_slow_and_minimum(work) + [kill_and_resume(work)]
                   + [supernode_killed(work)])
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(markdown(results))
        print(f"\n{sum(r['survived'] for r in results)}/{len(results)} faults survived "
              f"in {time.perf_counter() - started:.0f} s")
    if args.markdown:
        text = args.markdown.read_text() if args.markdown.exists() else ""
        start, end = "<!-- faults table -->", "<!-- end faults table -->"
        table = f"{start}\n{markdown(results)}\n{end}"
        if start in text and end in text:
            text = text[: text.index(start)] + table + text[text.index(end) + len(end):]
        else:
            text += "\n" + table + "\n"
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
