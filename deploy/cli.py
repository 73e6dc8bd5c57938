"""The ``fedlora`` command.

  fedlora simulate [hydra overrides]      a simulated federation (Flower simulation runtime)
  fedlora deploy local --nodes N [...]    a real local SuperLink + N SuperNodes over gRPC/TLS
  fedlora resume RUN_DIR                  continue a run from its last round checkpoint
  fedlora methods                         the registered aggregation methods
  fedlora privacy RUN_DIR                 the per-client privacy report of a run
  fedlora tune --strategy S --privacy P --space k=v1,v2 ...   search a recipe (real runs)
  fedlora audit [hydra overrides] [--self-test] [--json]   empirical lower bound on epsilon
  fedlora generate RUN_DIR --prompt TEXT  a causal LM run's answer (docs/LLM.md)
  fedlora export RUN_DIR --out DIR [--merged]   the adapter, or merged full weights
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.strip())
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"simulate": _simulate, "resume": _resume, "methods": _methods,
                "privacy": _privacy, "deploy": _deploy, "tune": _tune, "audit": _audit,
                "generate": _generate, "export": _export}
    if command not in commands:
        print(f"fedlora: unknown command {command!r}\n\n{USAGE.strip()}", file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except KeyboardInterrupt:
        from .simulate import stop_everything

        stop_everything()
        print("\nfedlora: interrupted; every process it started was stopped", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # The ServerApp runs in a worker thread that may be blocked waiting for replies
        # from workers that are gone: exit without joining it.
        os._exit(130)


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Inherited by Ray's workers: transformers' deprecation notice, raised through PEFT.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    logging.getLogger("fedlora").setLevel(logging.INFO)
    # Flower logs through its own console handler; propagating too would print twice
    # (and at DEBUG through Hydra's root handler).
    logging.getLogger("flwr").propagate = False
    for noisy in ("alembic", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _tune(rest: list[str]) -> int:
    from .tune import main as tune_main

    return tune_main(rest)


def _generate(rest: list[str]) -> int:
    from .generate import main_generate

    _quiet()
    return main_generate(rest)


def _export(rest: list[str]) -> int:
    from .generate import main_export

    _quiet()
    return main_export(rest)


def _audit(rest: list[str]) -> int:
    from .audit import main as audit_main

    _quiet()
    return audit_main(rest)


# Hydra's own flags that take a value (the next argument), and --info's optional one.
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                      "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _overrides_in(args: list[str]) -> list[str]:
    """The overrides among Hydra's command-line arguments (its flags and their values out)."""
    out, skip = [], False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in _HYDRA_VALUE_FLAGS:
            skip = True
        elif arg in ("--info", "-i"):
            skip = i + 1 < len(args) and args[i + 1] in _INFO_TOPICS
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _simulate(rest: list[str]) -> int:
    """Hydra owns the argument list: overrides, -m for multirun, hydra.run.dir=..."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    from fedlora.task.config import ConfigError, check_overrides, refuse_bad_overrides

    from .simulate import RunFailed, prepare_run, run_simulation, stop_everything

    _quiet()
    try:  # every wrong type at once, before Hydra (which stops at the first)
        refuse_bad_overrides(_overrides_in(rest))
    except ConfigError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        return 2
    status = {"code": 0}

    @hydra.main(config_path="pkg://fedlora.conf", config_name="config", version_base=None)
    def task(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            job = OmegaConf.to_container(cfg, resolve=True)
            check_overrides(job, list(HydraConfig.get().overrides.task))
            job = prepare_run(job, run_dir)
        except ConfigError as exc:
            print(f"fedlora: {exc}", file=sys.stderr)
            status["code"] = 2
            return
        try:
            # A multirun's jobs share one Ray session, stopped once after the last job.
            run_simulation(job, keep_ray=HydraConfig.get().mode == RunMode.MULTIRUN)
        except RunFailed as exc:
            print(f"fedlora: {exc}; completed rounds are kept in {run_dir}", file=sys.stderr)
            status["code"] = 1

    sys.argv = ["fedlora simulate", *rest]
    try:
        task()
    finally:
        stop_everything()
    return status["code"]


def _resume(rest: list[str]) -> int:
    from fedlora.server.app import load_job_config

    from .simulate import RunFailed, run_simulation

    parser = argparse.ArgumentParser(prog="fedlora resume",
                                     description="Continue a run from its last checkpoint.")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(rest)
    config = args.run_dir / "config.yaml"
    if not config.is_file():
        print(f"fedlora: {config} not found: not a fedlora run directory", file=sys.stderr)
        return 2
    _quiet()
    job = load_job_config(config)
    if Path(job["run_dir"]).resolve() != args.run_dir.resolve():
        job["run_dir"] = str(args.run_dir)
        job["ledger_dir"] = str(args.run_dir / "privacy")
    try:
        if job.get("deployment"):
            from .local_run import resume_local

            return resume_local(job)
        run_simulation(job, resume=True)
    except RunFailed as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        return 1
    return 0


def _methods(rest: list[str]) -> int:
    from fedlora.aggregation import available_methods, get_method

    parser = argparse.ArgumentParser(prog="fedlora methods")
    parser.add_argument("--d-out", type=int, default=384)
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(rest)
    rows = []
    for name in available_methods():
        method = get_method(name)
        rows.append({
            "method": name, "trains": "+".join(method.client_trains),
            "up": "+".join(method.uplink_roles), "down": "+".join(method.downlink_roles),
            "exact": method.exact,
            "bytes_up": 4 * method.uplink_floats(args.d_out, args.d_in, args.rank),
            "bytes_down": 4 * method.downlink_floats(args.d_out, args.d_in, args.rank),
            "summary": method.summary,
            "options": {k: {"default": d, "help": h}
                        for k, (d, h) in method.describe_options().items()},
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"per module per round, float32, d_out={args.d_out} d_in={args.d_in} r={args.rank}"
          " (flora, fedex: one client, first round; rolora: a B round)")
    header = f"{'method':<9} {'trains':<7} {'up':<5} {'down':<8} {'exact':<6} {'bytes up':>9} " \
             f"{'bytes down':>10}  summary"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<9} {r['trains']:<7} {r['up']:<5} {r['down']:<8} "
              f"{str(r['exact']).lower():<6} {r['bytes_up']:>9} {r['bytes_down']:>10}  "
              f"{r['summary']}")
    print("\noptions (strategy.options.NAME=VALUE):")
    for r in rows:
        for key, opt in r["options"].items():
            print(f"  {r['method']}.{key} = {opt['default']!r}: {opt['help']}")
    return 0


def _privacy(rest: list[str]) -> int:
    from fedlora.privacy import LedgerError, format_privacy_table, read_ledgers

    parser = argparse.ArgumentParser(prog="fedlora privacy",
                                     description="Per-client privacy report from the ledgers.")
    parser.add_argument("run_dir", type=Path, help="run directory (or a ledger directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(rest)
    directory = args.run_dir / "privacy" if (args.run_dir / "privacy").is_dir() else args.run_dir
    try:
        rows = read_ledgers(directory)
    except LedgerError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"fedlora: no privacy ledger under {directory} (was privacy=dp on?)",
              file=sys.stderr)
        return 1
    summary_path = args.run_dir / "summary.json"
    statement = None
    if summary_path.is_file():
        statement = json.loads(summary_path.read_text()).get("privacy_statement")
    if args.json:
        print(json.dumps({"statement": statement, "ledgers": rows}, indent=1))
        return 0
    if statement:
        for key, value in statement.items():
            text = ", ".join(value) if isinstance(value, list) else value
            if isinstance(value, dict):
                text = "; ".join(f"{k}: {v}" for k, v in value.items())
            print(f"{key.replace('_', ' ')}: {text}")
        print()
    print(format_privacy_table(rows))
    return 0


def _deploy(rest: list[str]) -> int:
    if not rest or rest[0] != "local":
        print("usage: fedlora deploy local --nodes N [--insecure] [hydra overrides]",
              file=sys.stderr)
        return 2
    from .local_run import deploy_local

    _quiet()
    return deploy_local(rest[1:])


if __name__ == "__main__":
    sys.exit(main())
