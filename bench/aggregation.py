"""Server-side aggregation cost at Llama-7B shapes (not part of the test suite).

One round: 32 layers x (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008) = 224
modules, rank 16, 10 clients. Times ``aggregate`` of each method (FLoRA: its first round,
pure stacking) and compares FedSVD's QR route with a dense full SVD of the 4096x4096
product on a few modules.

FLoRA's server round (aggregate + downlink) is timed on its own: medians over repeats,
against the code before issue 10 (kept here only, for the comparison) and against its
physical floor, the stacked A and B written once (a plain torch copy of as many bytes).
Both on fresh pages ("cold": what a new state gets from the OS, e.g. the first round of a
server process) and on pages the allocator reuses from the freed previous result ("warm").

    python bench/aggregation.py                 # table
    python bench/aggregation.py --json          # JSON
    python bench/aggregation.py --modules 28 --dense 1   # smaller / quicker
    python bench/aggregation.py --methods flora --dense 0 --round-repeat 7
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedlora.aggregation import (
    AdapterSpec,
    ClientUpdate,
    Factors,
    GlobalState,
    Method,
    get_method,
    refactorize,
)

LAYER = (
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
)
METHODS = ("fedavg", "ffa", "flora", "fedsvd", "fedsb")
TARGET_ROUND_S = 1.0
TARGET_SPEEDUP = 1000.0


def llama7b_shapes(n_modules: int) -> dict[str, tuple[int, int]]:
    shapes = {
        f"model.layers.{i}.{name}": (d_out, d_in)
        for i in range(32)
        for name, d_out, d_in in LAYER
    }
    return dict(list(shapes.items())[:n_modules])


def client_factors(
    spec: AdapterSpec, clients: int, seed: int
) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Random A_k, B_k, R_k for every client and module (distinct memory per client, so
    the timings include reading every update, as on a real server)."""
    gen = torch.Generator().manual_seed(seed)
    r = spec.rank
    out = []
    for _ in range(clients):
        out.append({
            m: {
                "A": torch.empty(r, d_in).uniform_(-1, 1, generator=gen),
                "B": torch.empty(d_out, r).uniform_(-1, 1, generator=gen),
                "R": torch.empty(r, r).uniform_(-1, 1, generator=gen),
            }
            for m, (d_out, d_in) in spec.shapes.items()
        })
    return out


def client_updates(method: Any, spec: AdapterSpec, factors: list[dict]) -> list[ClientUpdate]:
    """Client k's update: its uplink roles of ``factors[k]``, 100 + 10 k examples."""
    return [
        ClientUpdate(
            factors={m: {k: f[m][k] for k in method.uplink_roles} for m in spec.shapes},
            num_examples=100 + 10 * k,
            scaling=spec.scaling,
        )
        for k, f in enumerate(factors)
    ]


def time_aggregate(
    name: str, spec: AdapterSpec, factors: list[dict], repeat: int
) -> tuple[float, float, Any]:
    """Best wall seconds and the CPU seconds of that run (CPU time shows how much of the
    wall time was spent waiting for a core on a busy machine)."""
    method = get_method(name)
    state = method.init_state(spec)
    updates = client_updates(method, spec, factors)
    best, cpu, new = float("inf"), float("inf"), None
    for _ in range(repeat):
        new = None  # free the previous result before timing the next one
        t0, c0 = time.perf_counter(), time.process_time()
        new = method.aggregate(state, updates)
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, cpu = wall, used
    return best, cpu, new


def fedsvd_vs_dense(b_bar: torch.Tensor, a: torch.Tensor, qr_reps: int = 5) -> dict[str, float]:
    """Seconds of the QR route vs a dense full SVD of the product, and their difference."""
    refactorize(b_bar, a)  # warm-up (LAPACK workspaces)
    t_qr = float("inf")
    for _ in range(qr_reps):
        t0 = time.perf_counter()
        b_new, a_new = refactorize(b_bar, a)
        t_qr = min(t_qr, time.perf_counter() - t0)
    r = a.shape[0]
    t0 = time.perf_counter()
    m = b_bar @ a
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    t_dense = time.perf_counter() - t0
    dense_rank_r = (u[:, :r] * s[:r]) @ vh[:r]
    ours = b_new @ a_new
    diff = float((ours - dense_rank_r).abs().max())
    return {
        "qr_route_s": t_qr,
        "dense_svd_s": t_dense,
        "speedup": t_dense / t_qr,
        "max_abs_diff": diff,
        "max_abs_product": float(m.abs().max()),
        "max_abs_diff_vs_product": float((ours - m).abs().max()),
    }


# ----------------------------------------------------------------- FLoRA's server round


def flora_aggregate_before(
    method: Method, state: GlobalState, updates: Sequence[ClientUpdate]
) -> GlobalState:
    """FLoRA's aggregate as it was before issue 10 (same math, same bits): every copy on
    torch's default intra-op threads, so ~4,500 OpenMP fork/joins per round."""
    p = method._check_updates(state, updates, fixed_rank=False)
    factors: Factors = {}
    for m, (d_out, d_in) in state.meta["shapes"].items():
        b_acc, a_acc = state.factors[m]["B"], state.factors[m]["A"]
        ranks = [u.factors[m]["A"].shape[0] for u in updates]
        total = b_acc.shape[1] + sum(ranks)
        b_new = torch.cat([b_acc.float()] + [u.factors[m]["B"].float() for u in updates], 1)
        a_new = torch.empty(total, d_in)
        a_new[: a_acc.shape[0]] = a_acc
        row = a_acc.shape[0]
        for pk, u, r in zip(p, updates, ranks, strict=True):
            torch.mul(u.factors[m]["A"].float(), pk * u.scaling, out=a_new[row : row + r])
            row += r
        if method.options["compress"] or total > min(d_out, d_in):
            b_new, a_new = method._compress(b_new, a_new)
        factors[m] = {"B": b_new.contiguous(), "A": a_new.contiguous()}
    return method._next(state, factors, updates, p)


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the OS (glibc malloc_trim), so the next
    allocation gets fresh pages, as a new state does the first time; False if unavailable."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def timed(fn: Callable[[], Any], cold: bool) -> tuple[float, float]:
    """Wall and CPU seconds of one call (its result freed before returning)."""
    if cold:
        release_free_memory()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del out
    return wall, cpu


def copy_bandwidth(n_floats: int, repeat: int) -> dict[str, dict[str, float]]:
    """Median seconds and GB/s of copying n_floats float32 (one read, one write of each
    byte, as stacking does) on one and on all intra-op threads, into fresh pages (clone
    after malloc_trim) and into pages already mapped (copy_ into a touched buffer)."""
    src = torch.empty(n_floats).uniform_(-1, 1)
    dst = torch.zeros(n_floats)
    nbytes = 4 * n_floats
    threads = torch.get_num_threads()
    out: dict[str, dict[str, float]] = {}

    def into_mapped() -> None:
        dst.copy_(src)

    try:
        for nt in sorted({1, threads}):
            torch.set_num_threads(nt)
            for mode, fn, cold in (("fresh", src.clone, True), ("mapped", into_mapped, False)):
                walls = [timed(fn, cold)[0] for _ in range(repeat)]
                sec = statistics.median(walls)
                out[f"{mode}_{nt}t"] = {"seconds": sec, "gb_s": nbytes / sec / 1e9}
    finally:
        torch.set_num_threads(threads)
    return out


def flora_server_round(
    spec: AdapterSpec, factors: list[dict], repeat: int, before: bool
) -> dict[str, Any]:
    """Median wall/CPU seconds of FLoRA's first server round, now and before, cold and
    warm, with the bytes it must write and the copy floor for them."""
    method = get_method("flora")
    state = method.init_state(spec)
    updates = client_updates(method, spec, factors)

    def now() -> tuple[GlobalState, Factors]:
        new = method.aggregate(state, updates)
        return new, method.downlink(new)

    def then() -> tuple[GlobalState, Factors]:
        new = flora_aggregate_before(method, state, updates)
        return new, method.downlink(new)

    a, b = now()[0], then()[0]  # also warms both paths up
    same = all(torch.equal(t, b.tensors()[k]) for k, t in a.tensors().items())
    n_floats = sum(t.numel() for f in a.factors.values() for t in f.values())
    del a, b
    paths = {"after": now, **({"before": then} if before else {})}
    modes = ("cold", "warm") if release_free_memory() else ("warm",)
    samples: dict[str, list[tuple[float, float]]] = {
        f"{p}_{m}": [] for p in paths for m in modes
    }
    for mode in modes:
        for i in range(repeat):
            # Alternate the order, so both paths see the same background load.
            for p in (list(paths) if i % 2 == 0 else list(paths)[::-1]):
                samples[f"{p}_{mode}"].append(timed(paths[p], mode == "cold"))
    rows = {
        k: {"wall_s": statistics.median(w for w, _ in v),
            "cpu_s": statistics.median(c for _, c in v),
            "walls": [round(w, 3) for w, _ in v]}
        for k, v in samples.items()
    }
    bandwidth = copy_bandwidth(n_floats, max(3, repeat // 2))
    return {
        "bytes_written": 4 * n_floats,
        "bitwise_equal_to_before": same,
        "rounds": rows,
        "copy": bandwidth,
        "floor_s": {k: 4 * n_floats / v["gb_s"] / 1e9 for k, v in bandwidth.items()},
        "target_s": TARGET_ROUND_S,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = llama7b_shapes(args.modules)
    spec = AdapterSpec(shapes=shapes, rank=args.rank, alpha=2.0 * args.rank, seed=args.seed)
    t0 = time.perf_counter()
    factors = client_factors(spec, args.clients, args.seed)
    gen_s = time.perf_counter() - t0

    # Warm-up on one module so one-off costs (LAPACK init, allocator) are not timed.
    small = AdapterSpec(shapes=dict(list(shapes.items())[:1]), rank=args.rank, alpha=spec.alpha)
    methods = [m for m in METHODS if m in args.methods.split(",")]
    for name in methods:
        time_aggregate(name, small, [{m: f[m] for m in small.shapes} for f in factors], 1)

    rows = []
    fedsvd_state = None
    for name in methods:
        seconds, cpu, new = time_aggregate(name, spec, factors, args.repeat)
        if name == "fedsvd":
            fedsvd_state = new
        rows.append({
            "method": name,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "target_s": TARGET_ROUND_S,
            "ok": seconds <= TARGET_ROUND_S,
        })
        del new

    flora_round = (
        flora_server_round(spec, factors, args.round_repeat, args.before)
        if "flora" in methods and args.round_repeat > 0 else None
    )

    dense_rows = []
    square = [m for m, (d_out, d_in) in shapes.items() if d_out == d_in == 4096][: args.dense]
    method = get_method("fedsvd")
    init = method.init_state(spec)
    for m in square:
        p = [100 + 10 * k for k in range(args.clients)]
        b_bar = sum(pk / sum(p) * f[m]["B"] for pk, f in zip(p, factors, strict=True))
        res = fedsvd_vs_dense(b_bar, init.factors[m]["A"])
        dense_rows.append({"module": m, **res, "ok": res["speedup"] >= TARGET_SPEEDUP})
    del fedsvd_state

    return {
        "config": {
            "modules": len(shapes),
            "rank": args.rank,
            "clients": args.clients,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "update_floats_per_client": sum(
                args.rank * (d_out + d_in) for d_out, d_in in shapes.values()
            ),
            "data_generation_s": gen_s,
            # Other processes competing for the cores make every wall time longer.
            "loadavg_1min": os.getloadavg()[0],
            "cpus": os.cpu_count(),
        },
        "aggregate": rows,
        "flora_server_round": flora_round,
        "fedsvd_vs_dense": dense_rows,
    }


def print_table(res: dict[str, Any]) -> None:
    c = res["config"]
    gb = c["update_floats_per_client"] * c["clients"] * 4 / 1e9
    print(
        f"aggregate(): one round, {c['modules']} modules (Llama-7B shapes), r={c['rank']}, "
        f"K={c['clients']} clients ({gb:.2f} GB of fp32 A,B), torch {c['torch']}, "
        f"{c['threads']} threads, {c['cpus']} CPUs, load average {c['loadavg_1min']:.1f}"
    )
    print(f"{'method':<8} {'wall_s':>9} {'cpu_s':>9}  target <= {TARGET_ROUND_S:g} s wall")
    for row in res["aggregate"]:
        print(
            f"{row['method']:<8} {row['seconds']:>9.3f} {row['cpu_seconds']:>9.3f}  "
            f"{'ok' if row['ok'] else 'MISSED'}"
        )
    if res["flora_server_round"]:
        print_flora_round(res["flora_server_round"])
    if res["fedsvd_vs_dense"]:
        print(
            f"\nFedSVD refactorization per 4096x4096 module: QR route vs dense full SVD "
            f"(target >= {TARGET_SPEEDUP:g}x)"
        )
        print(f"{'module':<28} {'qr_s':>9} {'dense_s':>9} {'speedup':>9} {'max|diff|':>10}")
        for row in res["fedsvd_vs_dense"]:
            print(
                f"{row['module']:<28} {row['qr_route_s']:>9.4f} {row['dense_svd_s']:>9.2f} "
                f"{row['speedup']:>8.0f}x {row['max_abs_diff']:>10.2e}  "
                f"{'ok' if row['ok'] else 'MISSED'}"
            )


def print_flora_round(fr: dict[str, Any]) -> None:
    gb = fr["bytes_written"] / 1e9
    print(
        f"\nFLoRA server round (aggregate + downlink), medians; it writes {gb:.2f} GB of "
        f"stacked A, B once; bitwise equal to before: {fr['bitwise_equal_to_before']}"
    )
    print(f"{'path':<13} {'wall_s':>9} {'cpu_s':>9}  target <= {fr['target_s']:g} s wall")
    for name, row in fr["rounds"].items():
        ok = "ok" if row["wall_s"] <= fr["target_s"] else "MISSED"
        print(f"{name:<13} {row['wall_s']:>9.3f} {row['cpu_s']:>9.3f}  {ok}  {row['walls']}")
    print(f"floor: a torch copy of {gb:.2f} GB (t = intra-op threads)")
    for name, row in fr["copy"].items():
        print(f"{name:<13} {fr['floor_s'][name]:>9.3f} s at {row['gb_s']:.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fedlora aggregation benchmark")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--modules", type=int, default=224, help="number of modules (<= 224)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dense", type=int, default=2, help="4096x4096 modules for the dense SVD")
    parser.add_argument("--repeat", type=int, default=1, help="timed repetitions (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to time (default: all)")
    parser.add_argument("--round-repeat", type=int, default=5,
                        help="timed repetitions of FLoRA's server round (median; 0: skip)")
    parser.add_argument("--no-before", dest="before", action="store_false",
                        help="do not time the pre-issue-10 FLoRA path")
    args = parser.parse_args(argv)
    if not 1 <= args.modules <= 224:
        parser.error("--modules must be in 1..224")
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
