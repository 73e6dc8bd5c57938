"""Server-side aggregation cost at Llama-7B shapes (not part of the test suite).

One round: 32 layers x (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008) = 224
modules, rank 16, 10 clients. Times ``aggregate`` of each method (FLoRA: its first round,
pure stacking) and compares FedSVD's QR route with a dense full SVD of the 4096x4096
product on a few modules.

FLoRA's server round (aggregate + downlink) is timed on its own, medians over repeats, in
one run against the paths it replaced (kept here only, for the comparison): stacking every
client's factors into fresh tensors, on one intra-op thread and on torch's default threads,
and against the physical floor of those copies (a plain torch copy of as many bytes).
Today's round keeps the client blocks by reference (aggregation.Stacked), so it writes
almost nothing; the copy moves to the codec, which writes the blocks straight into the
wire buffer: that encode is timed against encoding the dense stack, on a few modules.
Rounds run on fresh pages ("cold": what a new state gets from the OS, e.g. the first round
of a server process) and on pages the allocator reuses from the freed previous result
("warm").

    python bench/aggregation.py                 # table
    python bench/aggregation.py --json          # JSON
    python bench/aggregation.py --modules 28 --dense 1   # smaller / quicker
    python bench/aggregation.py --methods flora --dense 0 --round-repeat 7
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from fedlora.protos import Envelope, encode

LAYER = (
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 4096),
    ("self_attn.v_proj", 4096, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 11008, 4096),
    ("mlp.up_proj", 11008, 4096),
    ("mlp.down_proj", 4096, 11008),
)
METHODS = ("fedavg", "ffa", "flora", "fedsvd", "fedsb", "flexlora", "fedex", "rolora", "fedsa")
TARGET_ROUND_S = 1.0
TARGET_FLORA_S = 0.3
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
    """Client k's update: its round-1 uplink roles of ``factors[k]``, 100 + 10 k examples."""
    return [
        ClientUpdate(
            factors={m: {k: f[m][k] for k in method.uplink_in_round(1)} for m in spec.shapes},
            num_examples=100 + 10 * k,
            scaling=spec.scaling,
        )
        for k, f in enumerate(factors)
    ]


def time_aggregate(
    name: str, spec: AdapterSpec, factors: list[dict], repeat: int, before: bool = False
) -> tuple[float, float, Any]:
    """Best wall seconds and the CPU seconds of that run (CPU time shows how much of the
    wall time was spent waiting for a core on a busy machine). ``before``: as the code was
    before the aggregation helpers ran on one intra-op thread (FLoRA: stacking copies)."""
    method = get_method(name)
    state = method.init_state(spec)
    updates = client_updates(method, spec, factors)
    best, cpu, new = float("inf"), float("inf"), None
    for _ in range(repeat):
        new = None  # free the previous result before timing the next one
        with _default_threads() if before else contextlib.nullcontext():
            t0, c0 = time.perf_counter(), time.process_time()
            if before and name == "flora":
                new = flora_aggregate_copy(method, state, updates, one_thread=True)
            else:
                new = method.aggregate(state, updates)
            wall, used = time.perf_counter() - t0, time.process_time() - c0
        if wall < best:
            best, cpu = wall, used
    return best, cpu, new


@contextmanager
def _default_threads() -> Iterator[None]:
    """The aggregation helpers on torch's default intra-op threads, as before they were
    scoped to one thread (the scope replaced by a no-op where it is looked up)."""
    mods = [sys.modules[n] for n in ("fedlora.aggregation.linalg", "fedlora.aggregation.fedsvd")]
    saved = [m.one_intra_op_thread for m in mods]
    for m in mods:
        m.one_intra_op_thread = contextlib.nullcontext
    try:
        yield
    finally:
        for m, f in zip(mods, saved, strict=True):
            m.one_intra_op_thread = f


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


def flora_aggregate_copy(
    method: Method, state: GlobalState, updates: Sequence[ClientUpdate], one_thread: bool
) -> GlobalState:
    """FLoRA's aggregate as it was before the blocks were kept by reference (same math,
    same bits): B_acc <- [B_acc, B_1 ... B_K], A_acc <- [A_acc; p_1 s_1 A_1; ...] written
    into fresh tensors, every client factor copied once per round; ``one_thread``: the
    copies on the calling thread only (the last copying version), else on torch's
    default intra-op threads (the version before it)."""
    p = method._check_updates(state, updates, fixed_rank=False)
    scales = [pk * u.scaling for pk, u in zip(p, updates, strict=True)]
    factors: Factors = {}
    for m, (d_out, d_in) in state.meta["shapes"].items():
        acc = state.factors[m]
        with _threads(1 if one_thread else torch.get_num_threads()):
            b_new = torch.cat([acc["B"].float()] + [u.factors[m]["B"].float() for u in updates], 1)
            a_new = torch.empty(b_new.shape[1], d_in)
            a_new[: acc["A"].shape[0]] = acc["A"]
            row = acc["A"].shape[0]
            for u, scale in zip(updates, scales, strict=True):
                r = u.factors[m]["A"].shape[0]
                torch.mul(u.factors[m]["A"].float(), scale, out=a_new[row : row + r])
                row += r
        if method.options["compress"] or b_new.shape[1] > min(d_out, d_in):
            b_new, a_new = method._compress(b_new, a_new)
        factors[m] = {"B": b_new, "A": a_new}
    return method._next(state, factors, updates, p)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    spec: AdapterSpec, factors: list[dict], repeat: int, before: bool, encode_modules: int,
    old_threads: bool = False,
) -> dict[str, Any]:
    """Median wall/CPU seconds of FLoRA's first server round by reference and by the copy
    paths it replaced, cold and warm, with the bytes a copy writes and the floor for them;
    then the downlink encode (float32) of the first ``encode_modules`` modules, streamed
    from the blocks vs from the dense stack."""
    method = get_method("flora")
    state = method.init_state(spec)
    updates = client_updates(method, spec, factors)

    def by_reference() -> tuple[GlobalState, Factors]:
        new = method.aggregate(state, updates)
        return new, method.downlink(new)

    def copy(one_thread: bool) -> Callable[[], tuple[GlobalState, Factors]]:
        def run() -> tuple[GlobalState, Factors]:
            new = flora_aggregate_copy(method, state, updates, one_thread)
            return new, method.downlink(new)
        return run

    paths = {"by_reference": by_reference, **({"copy_1t": copy(True)} if before else {}),
             **({"copy_nt": copy(False)} if before and old_threads else {})}
    results = {name: fn()[0] for name, fn in paths.items()}  # also warms every path up
    ref = results["by_reference"].tensors()
    same = all(
        all(torch.equal(t, ref[k]) for k, t in other.tensors().items())
        for other in results.values()
    )
    n_floats = sum(t.numel() for f in results["by_reference"].factors.values() for t in f.values())
    enc = encode_timing(method, results, encode_modules)
    del results, ref
    modes = ("cold", "warm") if release_free_memory() else ("warm",)
    samples: dict[str, list[tuple[float, float]]] = {
        f"{p}_{m}": [] for p in paths for m in modes
    }
    for mode in modes:
        for i in range(repeat):
            # Alternate the order, so every path sees the same background load.
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
        "bytes_stacked": 4 * n_floats,
        "bitwise_equal_across_paths": same,
        "rounds": rows,
        "copy": bandwidth,
        "floor_s": {k: 4 * n_floats / v["gb_s"] / 1e9 for k, v in bandwidth.items()},
        "target_s": TARGET_FLORA_S,
        "encode": enc,
    }


def encode_timing(method: Method, results: dict[str, GlobalState], modules: int,
                  repeat: int = 3) -> dict[str, Any]:
    """Seconds to encode the downlink of the first ``modules`` modules (float32): from the
    blocks (by reference) and from the dense stack (a copy path); bytes must be equal."""
    if modules <= 0:
        return {}
    out: dict[str, Any] = {}
    data: dict[str, bytes] = {}
    for name, st in results.items():
        if name not in ("by_reference", "copy_1t"):
            continue
        down = method.downlink(st)
        env = Envelope(method="flora", round=1, direction="down",
                       factors={m: down[m] for m in list(down)[:modules]})
        walls = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            data[name] = encode(env)
            walls.append(time.perf_counter() - t0)
        out[name] = {"wall_s": statistics.median(walls), "bytes": len(data[name])}
    if len(data) == 2:
        out["bytes_equal"] = data["by_reference"] == data["copy_1t"]
    out["modules"] = modules
    return out


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
        # Before and after alternate method by method, so both see the same load.
        old = None
        if args.before:
            old_s, old_cpu, _ = time_aggregate(name, spec, factors, 1, before=True)
            old = {"seconds": old_s, "cpu_seconds": old_cpu}
        seconds, cpu, new = time_aggregate(name, spec, factors, args.repeat)
        if name == "fedsvd":
            fedsvd_state = new
        target = TARGET_FLORA_S if name == "flora" else TARGET_ROUND_S
        rows.append({
            "method": name,
            "seconds": seconds,
            "cpu_seconds": cpu,
            "target_s": target,
            "ok": seconds <= target,
            "before": old,
        })
        del new

    flora_round = (
        flora_server_round(spec, factors, args.round_repeat, args.before, args.encode_modules,
                           args.old_threads)
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
    print(f"{'method':<8} {'wall_s':>9} {'cpu_s':>9} {'before_s':>9} {'before_cpu':>10}  "
          f"target (wall)")
    for row in res["aggregate"]:
        old = row.get("before") or {}
        print(
            f"{row['method']:<8} {row['seconds']:>9.3f} {row['cpu_seconds']:>9.3f} "
            f"{old.get('seconds', float('nan')):>9.3f} {old.get('cpu_seconds', float('nan')):>10.3f}"
            f"  <= {row['target_s']:g} s {'ok' if row['ok'] else 'MISSED'}"
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
    gb = fr["bytes_stacked"] / 1e9
    print(
        f"\nFLoRA server round (aggregate + downlink), medians; a copy path writes {gb:.2f} GB "
        f"of stacked A, B; bitwise equal across paths: {fr['bitwise_equal_across_paths']}"
    )
    print(f"{'path':<18} {'wall_s':>9} {'cpu_s':>9}  target <= {fr['target_s']:g} s wall")
    for name, row in fr["rounds"].items():
        ok = "ok" if row["wall_s"] <= fr["target_s"] else "MISSED"
        print(f"{name:<18} {row['wall_s']:>9.3f} {row['cpu_s']:>9.3f}  {ok}  {row['walls']}")
    print(f"floor of a copy path: a torch copy of {gb:.2f} GB (t = intra-op threads)")
    for name, row in fr["copy"].items():
        print(f"{name:<18} {fr['floor_s'][name]:>9.3f} s at {row['gb_s']:.1f} GB/s")
    enc = fr.get("encode") or {}
    if enc:
        print(f"downlink encode, float32, first {enc['modules']} modules "
              f"(bytes equal: {enc.get('bytes_equal')})")
        for name in ("by_reference", "copy_1t"):
            if name in enc:
                row = enc[name]
                print(f"{name:<18} {row['wall_s']:>9.3f} s for {row['bytes'] / 1e6:.0f} MB")


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
                        help="do not time the replaced paths (default threads; FLoRA's "
                             "stacking copies)")
    parser.add_argument("--old-threads", action="store_true",
                        help="also time FLoRA's stacking copy on torch's default threads "
                             "(the version before the one-thread copy; slow on a busy box)")
    parser.add_argument("--encode-modules", type=int, default=28,
                        help="modules whose FLoRA downlink encode is timed (0: skip)")
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
