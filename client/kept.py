"""Factors a node keeps between rounds, as arrays in its Flower node state.

A method declares them in ``node_keeps``: roles that arrive once at first contact (e.g.
Fed-SB's fixed B and A) and personalized roles the node trains and never sends (e.g.
FedSA-LoRA's B). Later downlinks carry only what changes; the node fills in the rest.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context

from fedlora.aggregation import SEP, Factors

from .runtime import ClientRuntime

STATE_KEY = "fedlora-kept-factors"


def _stored(context: Context) -> dict[str, torch.Tensor]:
    if STATE_KEY not in context.state.array_records:
        return {}
    return context.state.array_records[STATE_KEY].to_torch_state_dict()


def with_kept_factors(context: Context, runtime: ClientRuntime, factors: Factors) -> Factors:
    """The downlink completed with the roles the node keeps (node_keeps)."""
    keeps = runtime.method.node_keeps
    if not keeps:
        return dict(factors)
    first = next(iter(factors.values()), {})
    stored = _stored(context)
    if all(role in first for role in keeps):  # first contact: remember them
        fresh = {f"{m}{SEP}{r}": t.detach().cpu().contiguous()
                 for m, roles in factors.items() for r, t in roles.items() if r in keeps}
        # A repeated first contact (e.g. after a server restart) never replaces a kept
        # role the node trains itself (a personalized factor): that is the node's model.
        own = {k: v for k, v in stored.items()
               if k.partition(SEP)[2] in runtime.method.client_trains}
        context.state[STATE_KEY] = ArrayRecord({**fresh, **own})
        if not own:
            return dict(factors)
        factors = {m: dict(roles) for m, roles in factors.items()}
        for key, tensor in own.items():
            module, _, role = key.partition(SEP)
            factors[module][role] = tensor
        return factors
    if not stored:
        raise RuntimeError(f"{runtime.method.name}: this node never received "
                           f"{'/'.join(keeps)} (its first contact was lost)")
    kept: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in stored.items():
        module, _, role = key.partition(SEP)
        kept.setdefault(module, {})[role] = tensor
    return {m: {**kept[m], **roles} for m, roles in factors.items()}


def keep_trained(context: Context, runtime: ClientRuntime, trained: tuple[str, ...],
                 directory: Path | None = None, run_name: str = "") -> None:
    """Kept roles that this round trained (a personalized factor) are kept as trained,
    and written to ``directory`` (the node's own, never sent anywhere) as
    :func:`personal_factors_path`: what `fedlora generate --node-factors` reads."""
    keeps = tuple(r for r in runtime.method.node_keeps if r in trained)
    if not keeps:
        return
    stored = _stored(context)
    personal = {}
    for module, roles in runtime.host.factors(keeps).items():
        for role, tensor in roles.items():
            stored[f"{module}{SEP}{role}"] = personal[f"{module}{SEP}{role}"] = \
                tensor.detach().cpu().contiguous()
    context.state[STATE_KEY] = ArrayRecord(stored)
    if directory is not None:
        from safetensors.torch import save

        from fedlora.task.files import atomic_write

        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(personal_factors_path(directory, run_name), save(personal), mode=0o600)


def personal_factors_path(directory: Path, run_name: str) -> Path:
    """Where a node keeps a personalized method's factors for run ``run_name``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_name) or "run"
    return directory / f"personal-factors-{safe}.safetensors"
