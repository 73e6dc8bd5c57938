"""Accuracy vs privacy for every method on MiniLM / BBC News, through the real system.

Each cell is `fedlora simulate strategy=M privacy=P federation.seed=S` plus the fixed
overrides (default: sequence length 32): with privacy=dp_epsN the method's tuned recipe
(conf/recipe/M_dp_epsN.yaml) applies; privacy=none runs the method's defaults. The sweep
is resumable and incremental: each finished run is appended to --results at once and a
rerun skips finished cells, so the table can grow over several sessions; a cell whose
resolved config equals a finished tuning trial's (--reuse) is taken from that trial, not
run again. A cell that ran under an older recipe (its stored config digest differs from
what its overrides compose to now) is set aside to <results>-stale.jsonl and runs again.
--collect-only rewrites the generated section of docs/RESULTS.md (between its
markers) and docs/results.png (accuracy vs epsilon, per-round curves) from what has finished.

Usage: python bench/quality.py [--methods ...] [--privacy none dp_eps8 ...] [--seeds 0 1]
       [--results bench/results/quality.jsonl] [--collect-only] [-- extra overrides]
       python bench/quality.py --plan   # the cells still to run; writes nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from stats import mean_interval, paired_difference

from fedlora.deploy.tune import (
    append_result,
    config_digest,
    current_rows,
    read_results,
    run_trials,
    trial_key,
)
from fedlora.task.files import atomic_write

METHODS = ["fedavg", "ffa", "flora", "fedsvd", "fedsb"]
PRIVACY = ["none", "dp_eps8", "dp_eps3", "dp_eps1"]
EPSILON = {"none": None, "dp_eps8": 8.0, "dp_eps3": 3.0, "dp_eps1": 1.0}
LINE_STYLES = ["-", "--", ":", "-."]  # one per privacy level, in PRIVACY order
ROOT = Path(__file__).resolve().parents[1]
FIXED = ["model.max_length=32"]


BEGIN, END = "<!-- bench/quality.py: begin -->", "<!-- bench/quality.py: end -->"


def privacy_of(row: dict) -> str:
    return next((o.split("=", 1)[1] for o in row["overrides"] if o.startswith("privacy=")),
                "none")


def cell_key(method: str, privacy: str, seed: int, fixed: list[str]) -> str:
    return trial_key([*fixed, f"strategy={method}", f"privacy={privacy}",
                      f"federation.seed={seed}"])


def _fmt(values: list[float]) -> str:
    """Mean ± the half width of the 95% t-interval over seeds, with the seed count."""
    return mean_interval(values).text() if values else "-"


MIN_PAIRED_SEEDS = 3


def paired_lines(by_seed: dict[tuple[str, str], dict[int, float]], methods: list[str],
                 privacy: list[str], baseline: str = "fedavg") -> list[str]:
    """Each method minus ``baseline`` per budget, paired by seed, with its 95% interval."""
    if baseline not in methods:
        return []
    lines = ["", f"Paired comparison with {baseline} (final accuracy, method minus {baseline}, "
             "over the seeds both ran; 95% paired t-interval; significant when it excludes "
             f"0, judged from {MIN_PAIRED_SEEDS} seeds on: with two, accuracy's steps of "
             "one test article can make both differences equal and the interval empty; "
             "where every seed's difference is the same, the t-interval has zero width "
             "and is not taken as evidence):", "",
             "| method | budget | difference | significant |", "|---|---|---|---|"]
    for p in privacy:
        for method in methods:
            if method == baseline:
                continue
            d = paired_difference(by_seed.get((method, p), {}), by_seed.get((baseline, p), {}))
            if d is None:
                continue
            if d.n < MIN_PAIRED_SEEDS:
                verdict = "too few seeds"
            elif d.zero_width():
                verdict = "not judged (identical differences)"
            else:
                verdict = "yes" if d.excludes_zero() else "no"
            lines.append(f"| {method} | {p} | {d.text(signed=True)} | {verdict} |")
    return lines


def write_report(rows_by_key: dict, methods: list[str], privacy: list[str], seeds: list[int],
                 fixed: list[str], out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cells(method: str, p: str) -> list[dict]:
        return [rows_by_key[k] for s in seeds
                if (k := cell_key(method, p, s, fixed)) in rows_by_key]

    lines = [
        "## The table",
        "",
        f"Produced by `{command}`. Every cell is a real `fedlora simulate` (Flower simulation",
        "runtime, Opacus DP-SGD): all-MiniLM-L6-v2, BBC News, 10 clients, Dirichlet 0.5,",
        f"fixed overrides `{' '.join(fixed)}`, seeds {seeds}. Private cells run the method's",
        "recipe (conf/recipe/); `none` runs the method's defaults (conf/strategy/).",
        "Final held-out accuracy: mean ± half width of the 95% t-interval over the seeds",
        "that finished (n seeds); '-' = not run.",
        "",
        "| method | " + " | ".join(f"final, {p}" for p in privacy) + " |",
        "|---|" + "---|" * len(privacy),
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(
            _fmt([r["final_accuracy"] for r in cells(method, p)]) for p in privacy) + " |")
    lines += ["", "Best-round accuracy, epsilon spent (max over clients and seeds), bytes per "
              "round (up + down, all clients) and wall time per run:", "",
              "| method | privacy | best round | epsilon spent | MB / round | wall s / run |",
              "|---|---|---|---|---|---|"]
    for method in methods:
        for p in privacy:
            found = cells(method, p)
            if not found:
                continue
            eps = [r["epsilon_max"] for r in found if r.get("epsilon_max") is not None]
            lines.append(
                f"| {method} | {p} | {_fmt([r['best_accuracy'] for r in found])} | "
                f"{max(eps):.3f} |" if eps else
                f"| {method} | {p} | {_fmt([r['best_accuracy'] for r in found])} | - |")
            lines[-1] += (f" {statistics.mean(r['bytes_per_round'] for r in found) / 1e6:.2f} | "
                          f"{statistics.mean(r['elapsed_seconds'] for r in found):.0f} |")
    by_seed = {(m, p): {s: rows_by_key[k]["final_accuracy"] for s in seeds
                        if (k := cell_key(m, p, s, fixed)) in rows_by_key}
               for m in methods for p in privacy}
    lines += paired_lines(by_seed, methods, privacy)
    over = [r for r in rows_by_key.values()
            if (target := EPSILON.get(privacy_of(r))) is not None
            and r.get("epsilon_max") is not None and r["epsilon_max"] > target]
    reused = sum(1 for r in rows_by_key.values() if r.get("reused_from"))
    lines += ["", f"Runs whose reported epsilon exceeded the target: {len(over)}. Cells taken "
              f"from a tuning trial with the same resolved config (not run twice; "
              f"`reused_from` in the results file): {reused}.", "",
              "![accuracy vs epsilon and per-round curves](results.png)", ""]
    table = "\n".join([BEGIN, *lines, END])
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    if BEGIN in text and END in text:  # replace the generated section, keep the prose
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text + "\n" + table + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = list(range(len(privacy)))
    for method in methods:
        ys = [statistics.mean([r["final_accuracy"] for r in c]) if (c := cells(method, p))
              else float("nan") for p in privacy]
        (line,) = left.plot(xs, ys, marker="o", label=method)
        # One colour per method (as on the left), one line style per privacy level.
        for p, style in zip(privacy, LINE_STYLES, strict=False):
            curves = [r["accuracy_per_round"] for r in cells(method, p)]
            if not curves or len({len(c) for c in curves}) != 1:
                continue
            mean_curve = [statistics.mean(values) for values in zip(*curves, strict=True)]
            right.plot(range(1, len(mean_curve) + 1), mean_curve, style,
                       color=line.get_color(), alpha=0.8)
    privacy_labels = [f"eps {EPSILON[p]:g}" if EPSILON[p] else "no DP" for p in privacy]
    left.set_xticks(xs, privacy_labels)
    left.set(ylabel="final held-out accuracy (mean of seeds)", title="Accuracy vs privacy",
             ylim=(0, 1))
    left.legend()
    left.grid(alpha=0.3)
    right.set(xlabel="round", ylabel="held-out accuracy (mean of seeds)",
              title="Per round (colour: method, as on the left)", ylim=(0, 1))
    right.xaxis.get_major_locator().set_params(integer=True)
    right.legend(handles=[plt.Line2D([], [], color="black", linestyle=style, label=label)
                          for style, label in zip(LINE_STYLES, privacy_labels, strict=False)],
                 fontsize=8, loc="lower right")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name("results.png"), dpi=100)
    print(out.read_text())


TUNE_BEGIN, TUNE_END = "<!-- tuning trials: begin -->", "<!-- tuning trials: end -->"


def write_tuning(rows: list[dict], out: Path, sources: list[Path]) -> None:
    """The tuning trials (one row per finished run) as a table in ``out``'s tuning section."""
    def knob(row: dict, key: str, default: str = "-") -> str:
        return next((o.split("=", 1)[1] for o in row["overrides"] if o.startswith(key + "=")),
                    default)

    rows = sorted(rows, key=lambda r: (knob(r, "privacy"), knob(r, "strategy"),
                                       float(knob(r, "strategy.lr", "0"))))
    names = ", ".join(f"`{p.resolve().relative_to(ROOT)}`" for p in sources)
    lines = [TUNE_BEGIN, f"Every finished trial in {names} "
             "(final / best-round held-out accuracy, accuracy per round):", "",
             "| method | privacy | lr | schedule | other | final | best | per round | epsilon | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = " ".join(o for o in r["overrides"] if o.split("=")[0] not in (
            "strategy", "privacy", "strategy.lr", "strategy.lr_schedule.kind",
            "model.max_length", "federation.rounds"))
        curve = " ".join(f"{a:.2f}" for a in r["accuracy_per_round"] if a is not None)
        eps = "-" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.2f}"
        lines.append(f"| {knob(r, 'strategy', 'ffa')} | {knob(r, 'privacy', 'none')} | "
                     f"{knob(r, 'strategy.lr', 'default')} | "
                     f"{knob(r, 'strategy.lr_schedule.kind', 'recipe')} | {other or '-'} | "
                     f"{r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {curve} | {eps} | "
                     f"{r['elapsed_seconds']:.0f} |")
    lines.append(TUNE_END)
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    table = "\n".join(lines)
    if TUNE_BEGIN in text and TUNE_END in text:
        text = text[:text.index(TUNE_BEGIN)] + table + text[text.index(TUNE_END) + len(TUNE_END):]
    else:
        text = text + "\n" + table + "\n"
    out.write_text(text, encoding="utf-8")


def reuse_equivalent(cells: list[list[str]], fixed: list[str], results: Path,
                     sources: list[Path]) -> int:
    """Take a cell from a finished tuning trial that ran the cell's job (the same
    ``config_digest``, recipe_name aside): running it again would only repeat that run. The
    row keeps the trial's key in ``reused_from``. Returns how many cells were filled."""
    done = {r["key"] for r in read_results(results)}
    by_digest: dict[str, dict] = {}
    for row in (r for p in sources for r in read_results(p)):
        if row.get("config_digest"):  # rows from before digests: what they ran is unknown
            by_digest.setdefault(row["config_digest"], row)
    filled = 0
    for cell in cells:
        key = trial_key([*fixed, *cell])
        row = None if key in done else by_digest.get(config_digest([*fixed, *cell]))
        if row is not None:
            append_result(results, {**row, "key": key, "overrides": [*fixed, *cell],
                                    "reused_from": row["key"]})
            print(f"{key}: taken from tuning trial {row['key']}")
            done.add(key)
            filled += 1
    return filled


def missing(cells: list[list[str]], fixed: list[str], results: Path,
            sources: list[Path]) -> list[list[str]]:
    """The cells a sweep would still run (writes nothing): not finished at today's config
    digest, and not equal to a finished tuning trial."""
    finished = {r["key"]: r.get("config_digest") for r in read_results(results)}
    trial_digests = {r.get("config_digest") for p in sources for r in read_results(p)}
    out = []
    for cell in cells:
        digest = config_digest([*fixed, *cell])
        if finished.get(trial_key([*fixed, *cell])) != digest and digest not in trial_digests:
            out.append(cell)
    return out


def set_aside_stale(cells: list[list[str]], fixed: list[str], results: Path) -> int:
    """Move the cells whose run is not the job their overrides mean today (a recipe changed
    since, so the digest differs, or the row predates digests) from ``results`` to
    ``<results>-stale.jsonl``: they are kept, but neither shown nor counted as finished, so
    the next sweep runs them again. Returns how many rows were moved."""
    rows = read_results(results)
    current = {trial_key([*fixed, *cell]): config_digest([*fixed, *cell]) for cell in cells}
    stale = [r for r in rows if r["key"] in current
             and r.get("config_digest") != current[r["key"]]]
    if not stale:
        return 0
    aside = results.with_name(f"{results.stem}-stale.jsonl")
    for row in stale:
        append_result(aside, row)  # first the copy, then the removal: nothing is lost
        print(f"{row['key']}: stale (its recipe changed since it ran), moved to {aside.name}")
    keep = [r for r in rows if r not in stale]
    atomic_write(results, "".join(json.dumps(r, sort_keys=True) + "\n"
                                  for r in keep).encode("utf-8"))
    return len(stale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--privacy", nargs="+", default=PRIVACY)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/quality.jsonl")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md",
                        help="the generated section between its markers is replaced")
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the results file as it stands: no runs, "
                             "no staleness check (rows written by another version count)")
    parser.add_argument("--plan", action="store_true",
                        help="print the cells a sweep would still run and write nothing")
    parser.add_argument("--tuning", type=Path, nargs="*", default=[],
                        help="tuning results files (JSONL) to render as the tuning section")
    parser.add_argument("--reuse", type=Path, nargs="*",
                        default=[ROOT / "bench/results/dp-tuning.jsonl",
                                 ROOT / "bench/results/levers.jsonl"],
                        help="tuning results whose runs equal a cell's config fill that cell")
    args, extra = parser.parse_known_args()
    fixed = FIXED + [e for e in extra if e != "--"]
    trials = [[f"strategy={m}", f"privacy={p}", f"federation.seed={s}"]
              for s in args.seeds for p in args.privacy for m in args.methods]
    sources = [p for p in args.reuse if p.is_file()]
    if args.plan:
        todo = missing(trials, fixed, args.results, sources)
        print("\n".join(" ".join([*fixed, *cell]) for cell in todo))
        print(f"{len(todo)} of {len(trials)} cells to run", file=sys.stderr)
        return
    if not args.report_only:
        set_aside_stale(trials, fixed, args.results)
        reuse_equivalent(trials, fixed, args.results, sources)
    if not (args.collect_only or args.report_only):
        run_trials(trials, args.results, args.runs_dir, fixed)
    rows = current_rows(args.results)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    write_report(rows, args.methods, args.privacy, args.seeds, fixed, args.out, command.strip())
    if args.tuning:
        write_tuning([r for p in args.tuning for r in current_rows(p).values()], args.out,
                     args.tuning)


if __name__ == "__main__":
    main()
