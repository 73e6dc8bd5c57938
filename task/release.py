"""What a client releases, field by field, and the check that keeps it that way under DP
(shared: the client checks its replies against it, the server states it in the report).

The DP guarantee (sample-level, add/remove adjacency: one example added to or removed
from one node's training set) covers the adapter update that leaves a node: clipped,
noised and accounted. Under DP every other value in a reply must be either

- public: fixed by the job or node config, or by the shapes (partition id, rank, bytes,
  budget, clip norm, delta, step count, the accountant's name); or
- declared public by the data owner: the training-set size, only when the node config
  sets ``public-num-examples`` (that declared value is what is sent, not the true one);
  in simulation the job's ``simulation.public_sizes`` speaks for the simulated owners
  (each declares its true size; client/node.py). Only then is the epsilon spent released
  too (rounded up): it is a function of q = b / N_k, and rounded or not it changes with
  one example where N_k is private. Without a declared size the server knows the node's
  budget and the job's plan, and the node's ledger keeps the exact spend; or
- a refusal code: one of the fixed codes of privacy/policy.py, never free text; or
- outside the guarantee by the owner's choice: evaluation results, only from a node whose
  policy sets ``allow-evaluation`` (the run's report lists them as such).

Withheld under DP: the training loss (a function of the private examples outside the
mechanism: it stays in the node's log), the exact example count (it changes by one with
one example), the sample rate q = b / N_k, the noise multiplier and the epsilon spent
(functions of N_k), the training time (it grows with the sampled batch sizes), and every
error or refusal text (details stay in the node's log). The server then
weighs clients uniformly unless every node of the round declared a size.

A field that is in none of these lists makes :func:`check_release` raise: a new reply
field must be classified here before a private client may send it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PUBLIC_METRICS: dict[str, str] = {
    "partition-id": "node config",
    "rank": "job or node config (the method's rank rule)",
    "bytes-up": "fixed by the shapes, the head and the wire dtype",
    "refused": "the node's refusal: decided on public quantities (policy, planned steps)",
    "epsilon-budget": "the job's epsilon (within the node's policy)",
    "delta": "job config",
    "max-grad-norm": "job config",
    "steps": "DP steps this run has taken on the node: local_steps per admitted round",
}
DECLARED_METRICS: dict[str, str] = {
    "num-examples": "only the value of node config public-num-examples",
    "epsilon": "the ledger's replay, rounded up to 2 decimals; only with a declared size",
}
EVALUATION_METRICS: dict[str, str] = {
    "eval-loss": "outside the guarantee: only from a node whose policy allows evaluation",
    "eval-accuracy": "outside the guarantee: only from a node whose policy allows evaluation",
    "num-examples": "outside the guarantee: only from a node whose policy allows evaluation",
}
# The only text a private reply may carry: a refusal code (privacy/policy.py).
NOTE_FIELDS: dict[str, str] = {"reason": "a fixed refusal code"}
# Envelope fields (protos/fedlora/v1/adapter.proto) and their status under DP.
ENVELOPE_FIELDS: dict[str, str] = {
    "method": "public", "round": "public", "direction": "public", "fingerprint": "public",
    "node": "public", "rank": "public", "scaling": "public",
    "factors": "accounted (the DP-SGD output)", "head": "accounted (trained under DP-SGD)",
    "num_examples": "declared (public-num-examples) or 0 = not released",
    "privacy": "public or accounted (see PRIVACY_FIELDS)",
}
PRIVACY_FIELDS: dict[str, str] = {
    "epsilon": "declared (only with a declared size; rounded up)", "delta": "public",
    "max_grad_norm": "public", "steps": "public", "accountant": "public",
}


class UnclassifiedRelease(RuntimeError):
    """A private client was about to send a field nobody classified."""


def round_up(epsilon: float, decimals: int = 2) -> float:
    """Epsilon rounded up: coarse enough not to pin down q = b / N_k, never below the spend."""
    scale = 10 ** decimals
    return math.ceil(epsilon * scale - 1e-9) / scale


def check_release(metrics: Mapping[str, Any], envelope_fields: Mapping[str, Any] | None,
                  privacy: Mapping[str, Any] | None, *, declared_size: bool,
                  notes: Mapping[str, Any] | None = None, evaluation: bool = False) -> None:
    """Raise :class:`UnclassifiedRelease` for any field a private reply may not carry.

    ``notes`` are the reply's strings: only a fixed refusal code may leave. ``evaluation``:
    the node's policy lets evaluation results leave (outside the guarantee).
    """
    from fedlora.privacy.policy import REFUSAL_CODES

    allowed = dict(PUBLIC_METRICS)
    if declared_size:
        allowed.update(DECLARED_METRICS)
    if evaluation:
        allowed.update(EVALUATION_METRICS)
    bad = sorted(set(metrics) - set(allowed))
    if envelope_fields is not None:
        bad += [f"envelope.{k}" for k in sorted(set(envelope_fields) - set(ENVELOPE_FIELDS))]
    if privacy is not None:
        fields = set(PRIVACY_FIELDS) - (set() if declared_size else {"epsilon"})
        bad += [f"envelope.privacy.{k}" for k in sorted(set(privacy) - fields)]
    for key, value in (notes or {}).items():
        if key not in NOTE_FIELDS or value not in REFUSAL_CODES:
            bad.append(f"note {key!r} (only a fixed refusal code may leave)")
    if bad:
        raise UnclassifiedRelease(
            f"a private reply may not carry {bad}: each field must be public, accounted or "
            "declared public by the data owner (fedlora/task/release.py)")


def released_privacy(epsilon: float, setup: Any, *,
                     declared_size: bool) -> dict[str, float | int | str]:
    """The envelope's privacy message under DP: public figures, and the epsilon spent
    (rounded up) only where the node declared its size public."""
    out: dict[str, float | int | str] = {
        # The delta the ledger accounts at: the released epsilon is at this delta.
        "delta": float(setup.ledger.delta), "max_grad_norm": setup.settings.max_grad_norm,
        "steps": int(setup.run_steps()), "accountant": setup.ledger.mechanism}
    if declared_size:
        out["epsilon"] = round_up(epsilon)
    return out


def released_metrics(epsilon: float, setup: Any, *, declared_size: bool) -> dict[str, float]:
    """The same figures as reply metrics (numbers only), plus the job's budget."""
    spent = released_privacy(epsilon, setup, declared_size=declared_size)
    metrics = {k.replace("_", "-"): float(v) for k, v in spent.items() if k != "accountant"}
    metrics["epsilon-budget"] = float(setup.job_epsilon)
    return metrics


def privacy_statement(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What a private run's guarantee protects, what each round releases, what is public."""
    privacy = cfg["privacy"]
    return {
        "guarantee": (f"sample-level ({privacy['epsilon']}, {privacy['delta']})-DP per node "
                      "(DP-SGD, Opacus, accountant " + str(privacy["accountant"]) + "); the run's "
                      "guarantee is the max over nodes, whose data are disjoint"),
        "adjacency": "add/remove one training example at one node (Poisson sampling)",
        "protects": ("each example of a node's training data, against anyone who sees what "
                     "the node sends: the server, other nodes, an eavesdropper on the wire"),
        "does_not_protect": ("a whole node's data (that is client-level DP), the fact that a "
                             "node takes part, or anything the data owner declares public"),
        "released_per_round": ["the adapter update (clipped, noised, accounted)",
                               "the head parameters (trained under the same DP-SGD)",
                               "epsilon spent (rounded up), only from nodes that declared "
                               "their size public"],
        "public": sorted(PUBLIC_METRICS),
        "declared_public_if_set": {"num-examples": DECLARED_METRICS["num-examples"]},
        "withheld": ["training loss (node log only)", "exact example count",
                     "sample rate q = b / N_k", "noise multiplier", "training time",
                     "epsilon spent (unless the size is declared)",
                     "error and refusal text (fixed codes only)"],
        "outside_guarantee": ["evaluation results from nodes whose policy allows them"],
        "weighting": ("uniform unless every node of a round declared public-num-examples"),
    }


def client_level_statement(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What client-level DP protects, and from whom (composes with the sample-level one)."""
    section = cfg["privacy"]["client_level"]
    secure = bool(cfg.get("secure_aggregation"))
    return {
        "guarantee": (f"client-level ({section['epsilon']}, {section['delta']})-DP over the "
                      f"released global models (DP-FedAvg, accountant {section['accountant']}, "
                      f"server ledger)"),
        "adjacency": "add/remove one whole client (all of its data) from the federation",
        "protects": ("everything one client contributes, against anyone who sees the global "
                     "models: other clients, users of the final adapter"
                     + ("; the server sees only the masked sum (distributed DP: the clients "
                        "add the noise before secure aggregation; the collusion and server "
                        "assumptions are in client_level_threat_model)" if secure else
                        "; NOT against the server, which sees each update before adding the "
                        "noise (trusted server)")),
        "sampling": ("Poisson, q = clients_per_round / num_clients (amplification counted)"
                     if section["sampling"] == "poisson" else
                     "fixed-size cohort, accounted as if every client took part every round"),
        "composition": ("separate from the sample-level guarantee when both are on: each "
                        "holds on its own (one for an example, one for a whole client)"),
        "denominator": "the expected cohort size, fixed (weights by example count would leak)",
    }
