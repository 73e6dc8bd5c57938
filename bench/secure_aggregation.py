"""Secure aggregation's overhead per round: bytes per stage and compute time, against the
plain uplink of the same contribution (float32 on the wire).

Runs the real protocol (task/secagg.py: key agreement, encrypted Shamir shares, masking,
unmasking) for K clients in one process, so the times are compute only (no network); the
bytes are what the four exchanges carry. Vector lengths: ffa and fedsb on MiniLM (6
layers x query, value at 384 x 384, rank 8 / 16, plus the 5-class head).

Usage: python bench/secure_aggregation.py [--clients 10] [--drop 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fedlora.task.secagg import SecAggClient, SecAggParams, SecAggServer

HEAD = 384 * 5 + 5
SHAPES = {"ffa (B, r=8)": 12 * 384 * 8 + HEAD, "fedsb (R, r=16)": 12 * 16 * 16 + HEAD}


def one_round(n: int, length: int, drop: int, bits: int) -> dict[str, float]:
    params = SecAggParams(num_clients=n, threshold=max(2, -(-2 * n // 3)), clip_range=1.0,
                          bits=bits)
    ids = list(range(1, n + 1))
    rng = np.random.default_rng(0)
    vectors = {i: rng.uniform(-0.01, 0.01, length) for i in ids}
    server = SecAggServer(params, ids)
    times: dict[str, float] = {}
    sizes: dict[str, int] = {}

    t = time.perf_counter()
    clients = {i: SecAggClient(params, i) for i in ids}
    keys = {i: c.public_keys() for i, c in clients.items()}
    public = server.collect_public_keys(keys)
    times["keys"] = time.perf_counter() - t
    sizes["keys up"] = sum(len(a) + len(b) for a, b in keys.values())
    sizes["keys down"] = n * sum(len(a) + len(b) for a, b in public.values())

    t = time.perf_counter()
    dealt = {i: c.share_keys(public) for i, c in clients.items()}
    routed = server.route(dealt)
    times["shares"] = time.perf_counter() - t
    sizes["shares up"] = sum(len(ct) for d in dealt.values() for ct in d.values())

    survivors = ids[drop:]  # the first `drop` clients die after the shares were dealt
    t = time.perf_counter()
    masked = {i: clients[i].masked_input(vectors[i], routed[i]) for i in survivors}
    times["mask"] = time.perf_counter() - t
    # On the wire as uint32 when M <= 2^32 (client/secure.py), else uint64.
    width = 4 if params.modulus_bits <= 32 else 8
    sizes["masked up"] = sum(width * v.size for v in masked.values())

    t = time.perf_counter()
    dropped = ids[:drop]
    shares = {i: clients[i].unmask_shares(survivors, dropped) for i in survivors}
    total = server.unmask(masked, shares)
    times["unmask"] = time.perf_counter() - t
    sizes["unmask up"] = sum(len(s) for d in shares.values() for part in d.values()
                             for s in part.values())
    exact = sum(vectors[i] for i in survivors)
    return {"times": times, "sizes": sizes, "error": float(np.abs(total - exact).max()),
            "bound": params.sum_error_bound(len(survivors)), "plain": n * length * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--drop", type=int, default=1)
    parser.add_argument("--bits", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.clients} clients, {args.drop} dropped after the shares were dealt, "
          f"{args.bits} bits; compute seconds (median of {args.repeat}) and bytes per round")
    for name, length in SHAPES.items():
        runs = [one_round(args.clients, length, args.drop, args.bits) for _ in range(args.repeat)]
        times = {k: statistics.median(r["times"][k] for r in runs) for k in runs[0]["times"]}
        sizes = runs[0]["sizes"]
        overhead = sum(v for k, v in sizes.items() if k != "masked up")
        print(f"\n{name}: {length} floats per client")
        print("  seconds  " + "  ".join(f"{k} {v:.3f}" for k, v in times.items())
              + f"  total {sum(times.values()):.3f}")
        print("  bytes    " + "  ".join(f"{k} {v}" for k, v in sizes.items()))
        print(f"  masked uplink {sizes['masked up']} B vs plain float32 {runs[0]['plain']} B "
              f"({sizes['masked up'] / runs[0]['plain']:.2f}x); protocol bytes besides it "
              f"{overhead} B ({overhead / runs[0]['plain']:.3f}x of plain)")
        print(f"  max error of the sum {max(r['error'] for r in runs):.2e} "
              f"(bound {runs[0]['bound']:.2e})")


if __name__ == "__main__":
    main()
