"""``fedlora audit``: an empirical lower bound on a job's epsilon, from one canary run.

The job is composed exactly as ``fedlora simulate`` composes it (the same Hydra overrides,
checks and data split); one client's DP-SGD settings are derived as the client derives
them (sample rate q_k = b_k / N_k, the noise multiplier calibrated once for every step the
client may take); then fedlora's own DP-SGD release runs on white-box gradient canaries
and the canaries' scores give a (confidence) lower bound on epsilon (privacy/audit.py).

  fedlora audit [overrides] [--canaries M] [--confidence C] [--client K] [--json]
  fedlora audit --self-test [overrides] [--json]

Exit status: 0 when the bound stays at or below the claim (self-test: every broken
mechanism caught and the correct one not flagged), 1 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

# The self-test's job when no overrides are given: small, and at an epsilon that m = 1000
# canaries can refute (the one-run bound cannot exceed about 5 at m = 1000, delta 1e-5).
SELF_TEST_DEFAULTS: tuple[str, ...] = ("model=tiny_bert", "data=synthetic", "privacy=dp",
                                       "privacy.epsilon=2")


class AuditInputError(ValueError):
    """A bad command line or job configuration (exit status 2)."""


@dataclass(frozen=True)
class AuditJob:
    """What one client of the job runs under DP-SGD, as the client derives it."""

    settings: Any  # fedlora.privacy.DPSettings (per round)
    rounds: int
    delta: float
    budget: float  # the job's epsilon: the client's ledger refuses beyond it
    client: int
    client_examples: int
    planned_steps: int  # what sigma was calibrated for (init-round steps included)


def _say(line: str) -> None:
    print(f"fedlora audit: {line}", file=sys.stderr, flush=True)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(defaults: tuple[str, ...], given: list[str]) -> list[str]:
    """``defaults`` then ``given``, a given key replacing the default of the same key
    (Hydra refuses two values for one key)."""
    keys = {_key(o) for o in given}
    return [*(o for o in defaults if _key(o) not in keys), *given]


def compose(overrides: list[str]) -> tuple[dict[str, Any], list[int]]:
    """The validated job for ``overrides``, as ``fedlora simulate`` would run it, and its
    clients' partition sizes."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedlora.task.config import ConfigError, compose_job, validate, validate_data
    from fedlora.task.data import partition_sizes

    try:
        job = compose_job(overrides)
    except (HydraException, OmegaConfBaseException, ConfigError) as exc:
        raise AuditInputError(str(exc).strip()) from exc
    privacy = job.get("privacy") or {}
    if not privacy.get("enabled"):
        raise AuditInputError(
            "privacy.enabled is false: there is no DP-SGD to audit (use privacy=dp, or a "
            "preset such as privacy=dp_eps3)")
    try:
        validate(job)
        sizes = partition_sizes(job)
        validate_data(job, sizes)
    except ConfigError as exc:
        raise AuditInputError(str(exc)) from exc
    except ValueError as exc:  # unreadable data or an impossible split
        raise AuditInputError(f"invalid configuration:\n  - {exc}") from exc
    return job, sizes


def client_job(job: dict[str, Any], sizes: list[int], client: int | None = None) -> AuditJob:
    """Client ``client``'s DP-SGD settings (default: the smallest client, whose sample rate
    is the largest when batches are fixed)."""
    from fedlora.aggregation import get_method
    from fedlora.privacy import DPSettings, calibrate_noise_multiplier
    from fedlora.task.training import local_sample_rate

    if client is None:
        client = min(range(len(sizes)), key=lambda k: (sizes[k], k))
    if not 0 <= client < len(sizes):
        raise AuditInputError(f"--client must be in [0, {len(sizes) - 1}] "
                              f"(federation.num_clients={len(sizes)}), got {client}")
    privacy, strategy = job["privacy"], job["strategy"]
    num_examples = sizes[client]
    epsilon, delta = float(privacy["epsilon"]), float(privacy["delta"])
    sample_rate = local_sample_rate(strategy, num_examples)
    method = get_method(strategy["name"], weighting=strategy["weighting"],
                        **dict(strategy.get("options") or {}))
    rounds, local_steps = int(job["federation"]["rounds"]), int(strategy["local_steps"])
    planned = local_steps * rounds + method.init_round_steps()
    sigma = calibrate_noise_multiplier(epsilon, delta, sample_rate, planned,
                                       privacy["accountant"])
    settings = DPSettings(noise_multiplier=sigma, max_grad_norm=float(privacy["max_grad_norm"]),
                          sample_rate=sample_rate, steps=local_steps,
                          accountant=privacy["accountant"],
                          grad_sample_mode=privacy.get("grad_sample_mode", "hooks"),
                          secure_mode=bool(privacy.get("secure_mode", False)))
    return AuditJob(settings, rounds, delta, epsilon, client, num_examples, planned)


def _job_fields(spec: AuditJob) -> dict[str, Any]:
    s = spec.settings
    return {"target_epsilon": spec.budget, "delta": spec.delta,
            "noise_multiplier": s.noise_multiplier, "max_grad_norm": s.max_grad_norm,
            "sample_rate": s.sample_rate, "steps_per_round": s.steps, "rounds": spec.rounds,
            "calibrated_for_steps": spec.planned_steps, "accountant": s.accountant,
            "grad_sample_mode": s.grad_sample_mode, "client": spec.client,
            "client_examples": spec.client_examples}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlora audit",
        description="Empirical lower bound on a job's epsilon from one run of the client's "
                    "DP-SGD with gradient canaries (docs/AUDIT.md).")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as fedlora simulate")
    parser.add_argument("--canaries", type=int, default=1000,
                        help="canaries m, each in with probability 1/2 (default 1000)")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="confidence of the lower bound (default 0.95)")
    parser.add_argument("--client", type=int, default=None,
                        help="which client's settings to audit (default: the smallest)")
    parser.add_argument("--seed", type=int, default=None,
                        help="fix which canaries are in (default: fresh OS randomness); "
                             "the release's noise is always fresh")
    parser.add_argument("--self-test", action="store_true",
                        help="also run deliberately broken mechanisms (no noise, reused "
                             "noise, no clipping): each must be caught")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.canaries < 2:
        raise AuditInputError(f"--canaries must be >= 2, got {args.canaries}")
    if not 0.0 < args.confidence < 1.0:
        raise AuditInputError(f"--confidence must be in (0, 1), got {args.confidence}")


def _row(name: str, r: Any) -> str:
    verdict = "REFUTED" if r.caught else "ok"
    return (f"{name:<13} {r.claimed_epsilon:>8.3f} {r.epsilon_lower_bound:>12.3f} "
            f"{r.correct_guesses:>6}/{r.guesses:<6} {verdict}")


def _table(fields: dict[str, Any], results: dict[str, Any], ceiling: float) -> str:
    lines = [
        f"client {fields['client']}: sigma={fields['noise_multiplier']:.4g} "
        f"C={fields['max_grad_norm']:g} q={fields['sample_rate']:.4g} "
        f"steps={fields['steps_per_round']}x{fields['rounds']} delta={fields['delta']:g} "
        f"({fields['accountant']}; target epsilon {fields['target_epsilon']:g})",
        f"{'mechanism':<13} {'claimed':>8} {'lower bound':>12} {'right/guesses':<13} verdict",
    ]
    lines += [_row(name, r) for name, r in results.items()]
    lines.append(f"bounds hold with probability {next(iter(results.values())).confidence:g}; "
                 f"{next(iter(results.values())).canaries} canaries cannot show more than "
                 f"{ceiling:.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exc:  # argparse already printed the problem
        return int(exc.code or 0)
    try:
        _check_args(args)
        overrides = list(args.overrides)
        if args.self_test:
            overrides = merge_overrides(SELF_TEST_DEFAULTS, overrides)
        _say("composing the job" + (f" ({' '.join(overrides)})" if overrides else ""))
        job, sizes = compose(overrides)
        _say("calibrating the noise multiplier as the client does")
        spec = client_job(job, sizes, args.client)
    except AuditInputError as exc:
        print(f"fedlora audit: {exc}", file=sys.stderr)
        return 2

    from fedlora.privacy.audit import BROKEN, run_audit

    mechanisms = ["correct", *BROKEN] if args.self_test else ["correct"]
    results = {}
    for name in mechanisms:
        _say(f"running the {name} mechanism on {args.canaries} canaries")
        results[name] = run_audit(spec.settings, rounds=spec.rounds, delta=spec.delta,
                                  budget=spec.budget, canaries=args.canaries,
                                  confidence=args.confidence, mechanism=name, seed=args.seed,
                                  progress=_say)
    fields = _job_fields(spec)
    correct = results["correct"]
    if args.self_test:
        passed = not correct.caught and all(results[n].caught for n in BROKEN)
    else:
        passed = not correct.caught

    if args.json:
        if args.self_test:
            payload: dict[str, Any] = {
                "passed": passed, "canaries": args.canaries, "confidence": args.confidence,
                "epsilon_ceiling": correct.epsilon_ceiling, "job": fields,
                "mechanisms": {n: r.to_dict() for n, r in results.items()}}
        else:
            payload = {**fields, **correct.to_dict()}
        print(json.dumps(payload, indent=1))
    else:
        print(_table(fields, results, correct.epsilon_ceiling))

    if args.self_test and not passed:
        missed = [n for n in BROKEN if not results[n].caught]
        if missed:
            hint = ""
            if any(results[n].claimed_epsilon >= correct.epsilon_ceiling for n in missed):
                hint = (f"; claims at or above {correct.epsilon_ceiling:.3f} are beyond what "
                        f"{args.canaries} canaries can refute (more canaries raise that only "
                        "up to a cap set by delta, about 6 at delta 1e-5: docs/AUDIT.md)")
            _say(f"self-test FAILED: not caught: {', '.join(missed)}{hint}")
        if correct.caught:
            _say("self-test FAILED: the correct mechanism was flagged")
    if correct.claimed_epsilon >= correct.epsilon_ceiling:
        _say(f"note: the claim ({correct.claimed_epsilon:.3f}) is above the largest bound "
             f"{args.canaries} canaries can show ({correct.epsilon_ceiling:.3f}) at delta "
             f"{spec.delta:g}: this audit cannot refute it, however the release behaves "
             "(docs/AUDIT.md)")
    if not args.self_test and correct.caught:
        _say("the lower bound exceeds the claimed epsilon: the DP-SGD release leaks more "
             "than its accountant claims")
    return 0 if passed else 1
