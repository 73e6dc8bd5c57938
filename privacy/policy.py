"""A node's privacy policy: what its data owner requires, which a job can only tighten.

The owner sets it in the node's own configuration (for a deployed SuperNode: its
``--node-config``); whatever the owner leaves unset is pinned from the first job the node
admits (trust on first use) and stored in the node's key directory, so a later job cannot
loosen it either. A job asking for less than the policy (DP off where it is required, a
larger epsilon or delta, no secure aggregation where it is required, evaluation results
leaving the node) is refused before any training, with a fixed reason code.

Two budget rules, both on public quantities only, so that admitting or refusing a round
reveals nothing about the node's data:

- per run: a job's noise multiplier is calibrated for ``planned_steps`` at its epsilon;
  the node admits at most that many DP steps under that calibration (a round trained
  again spends steps again);
- lifetime: every run reserves its epsilon when it first trains; the reservations of all
  runs stay within the owner's ``max_epsilon``. A new run name therefore never means a
  new budget.

The ledger's accountant replay stays the authority on what was spent; it is checked too
(privacy/ledger.py), and within these two rules it never binds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .accounting import check_delta, check_epsilon
from .ledger_file import write_durably

# The node-config keys of the policy (Flower node config: key=value pairs).
NODE_CONFIG_KEYS = {
    "require-dp": "require_dp",
    "max-epsilon": "max_epsilon",
    "max-delta": "max_delta",
    "require-secure-aggregation": "require_secure_aggregation",
    "allow-evaluation": "allow_evaluation",
}

# Fixed reason codes: the only text a private node sends with a refusal.
REFUSAL_CODES: dict[str, str] = {
    "policy-requires-dp": "the node's policy requires sample-level DP; the job turned it off",
    "policy-epsilon": "the job's epsilon is above the node's lifetime budget",
    "policy-delta": "the job's delta is above the node's policy delta",
    "policy-requires-secure-aggregation": "the node requires secure aggregation; the round "
                                          "was not run under it",
    "policy-forbids-evaluation": "the node's policy keeps evaluation results on the node",
    "budget-exhausted": "the round would pass the run's planned steps or the node's "
                        "lifetime budget",
    "ledger-unavailable": "the node's privacy ledger cannot be used (see the node's log)",
    "ledger-missing": "the node's key directory shows a ledger that is gone; the node "
                      "refuses rather than restart its budget",
    "node-config": "the node is not configured for DP (see the node's log)",
    "invalid-delta": "delta must be below 1/N for the node's data",
    "invalid-batch": "the job's batch does not fit the node's data",
    "invalid-partition": "the job's partitioning does not fit the node's data",
    "secure-round-already-masked": "this round's masks already covered another update",
    "client-error": "the node failed; details stay in the node's log",
}


class PolicyRefusal(Exception):
    """A job or round the node refuses; ``code`` is one of :data:`REFUSAL_CODES`."""

    def __init__(self, code: str, detail: str = "") -> None:
        if code not in REFUSAL_CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        self.code, self.detail = code, detail
        super().__init__(f"{code}: {detail or REFUSAL_CODES[code]}")


def _as_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"node config {key}={value!r} must be true or false")


@dataclass(frozen=True)
class NodePolicy:
    """What the node's owner requires of every job."""

    require_dp: bool
    max_epsilon: float | None  # lifetime, across every run and run name
    max_delta: float | None
    require_secure_aggregation: bool = False
    allow_evaluation: bool = False

    def __post_init__(self) -> None:
        if self.require_dp and (self.max_epsilon is None or self.max_delta is None):
            raise ValueError("a policy that requires DP needs max-epsilon and max-delta")
        if self.max_epsilon is not None:
            check_epsilon(self.max_epsilon, "max-epsilon")
        if self.max_delta is not None:
            check_delta(self.max_delta)

    @staticmethod
    def owner_settings(node_config: Mapping[str, Any]) -> dict[str, Any]:
        """The policy fields the owner set in the node config (typed)."""
        out: dict[str, Any] = {}
        for key, field in NODE_CONFIG_KEYS.items():
            value = node_config.get(key)
            if value in (None, ""):
                continue
            if field in ("max_epsilon", "max_delta"):
                out[field] = float(value)
            else:
                out[field] = _as_bool(value, key)
        if "max_epsilon" in out and "require_dp" not in out:
            out["require_dp"] = True  # an owner who sets a budget means DP
        return out

    @classmethod
    def from_job(cls, privacy: Mapping[str, Any], secure: bool) -> NodePolicy:
        """The policy a job implies (what is pinned at first contact where unset)."""
        enabled = bool(privacy.get("enabled"))
        return cls(require_dp=enabled,
                   max_epsilon=float(privacy["epsilon"]) if enabled else None,
                   max_delta=float(privacy["delta"]) if enabled else None,
                   require_secure_aggregation=secure, allow_evaluation=not enabled)

    def admit(self, privacy: Mapping[str, Any], secure: bool) -> None:
        """Raise :class:`PolicyRefusal` if the job asks for less than this policy."""
        if not privacy.get("enabled"):
            if self.require_dp:
                raise PolicyRefusal("policy-requires-dp")
        else:
            if self.max_epsilon is not None and float(privacy["epsilon"]) > self.max_epsilon:
                raise PolicyRefusal("policy-epsilon")
            if self.max_delta is not None and float(privacy["delta"]) > self.max_delta:
                raise PolicyRefusal("policy-delta")
        if self.require_secure_aggregation and not secure:
            raise PolicyRefusal("policy-requires-secure-aggregation")

    def private(self, privacy: Mapping[str, Any]) -> bool:
        """Whether this node's replies fall under the DP release rules."""
        return self.require_dp or bool(privacy.get("enabled"))


def resolve_policy(node_config: Mapping[str, Any], key_dir: Path | None,
                   privacy: Mapping[str, Any], secure: bool) -> NodePolicy:
    """The node's policy: the owner's node config, the rest pinned in ``key_dir``.

    The pinned file (policy.json) is written once, from the first job, and never
    rewritten by a job; the owner changes it by editing the node config (or the file).
    Without a key directory nothing can be pinned: the owner's settings and, for what they
    leave unset, the job's (a node without a key directory cannot hold the server to
    anything it did not set itself).
    """
    owner = NodePolicy.owner_settings(node_config)
    job = asdict(NodePolicy.from_job(privacy, secure))
    pinned = _complete({**job, **owner}, privacy)
    if key_dir is not None:
        path = Path(key_dir) / "policy.json"
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            pinned = {f.name: stored[f.name] for f in fields(NodePolicy)}
        else:
            Path(key_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            write_durably(path, json.dumps(pinned, indent=2) + "\n")
    return NodePolicy(**_complete({**pinned, **owner}, privacy))


def _complete(settings: dict[str, Any], privacy: Mapping[str, Any]) -> dict[str, Any]:
    """A policy that requires DP needs a budget: what the owner left out comes from the job
    (when it runs DP), delta from the usual 1e-5; with neither the node cannot train."""
    out = dict(settings)
    if out["require_dp"]:
        if out["max_epsilon"] is None:
            if not privacy.get("enabled"):
                raise PolicyRefusal("policy-requires-dp", "no budget known: set max-epsilon")
            out["max_epsilon"] = float(privacy["epsilon"])
        if out["max_delta"] is None:
            out["max_delta"] = float(privacy["delta"]) if privacy.get("enabled") else 1e-5
    return out
