"""Shared helpers of the method contract suite (and of the method test modules).

Clients are simulated without a model: a client starts from what the method sends it
(``downlink`` -> ``client_start``), perturbs the roles it trains and sends up what the
method asks for in that round (``uplink_in_round``), at its own rank for per-client-rank
methods. Everything here reads only what a method declares, never its name.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from hypothesis import strategies as st

from fedlora.aggregation import (
    AdapterSpec,
    ClientUpdate,
    GlobalState,
    Method,
    available_methods,
    get_method,
)
from fedlora.protos import Expectation

# Bytes per element of each wire dtype, and the torch dtype it rounds to.
SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BUILTIN_PACKAGE = "fedlora.aggregation."
# The test plug-in's method (tests/plugin, installed by .ci/setup).
PLUGIN_METHOD = "frozenb"


def builtin_methods() -> list[str]:
    """Registered methods defined in fedlora.aggregation (plug-ins left out), sorted."""
    return [n for n in available_methods()
            if type(get_method(n)).__module__.startswith(BUILTIN_PACKAGE)]


def dense(uv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """U @ V in float64."""
    u, v = uv
    return u.double() @ v.double()


def amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def close(x: torch.Tensor, y: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal to float tolerance, relative to the larger of the two (plus an absolute 1)."""
    assert x.shape == y.shape, (x.shape, y.shape)
    return amax(x - y) <= rtol * (1.0 + max(amax(x), amax(y)))


def client_rank(method: Method, requested: int | None) -> int | None:
    """The rank a client trains at: its own for per-client-rank methods, else the shared one."""
    return requested if method.per_client_rank else None


def train(
    method: Method,
    state: GlobalState,
    spec: AdapterSpec,
    gen: torch.Generator,
    *,
    n: int,
    rank: int | None = None,
    seed: int = 0,
    head: dict[str, torch.Tensor] | None = None,
    node: str = "",
    step: float = 1.0,
) -> ClientUpdate:
    """A fake local round of training round state.round + 1: start from the (first-contact)
    downlink, perturb the trainable roles by ``step`` N(0, 1) and send what the method asks
    for in that round. ``rank`` is the client's own rank (used by per-client-rank methods)."""
    rnd = state.round + 1
    r = client_rank(method, rank)
    start = method.client_start(method.downlink(state, first_contact=True, rank=r), spec,
                                rank=r, seed=seed, round=rnd)
    factors = {}
    for m, init in start.init.items():
        trained = {
            k: (t + step * torch.randn(t.shape, generator=gen) if k in start.trainable else t)
            for k, t in init.items()
        }
        factors[m] = {k: trained[k] for k in method.uplink_in_round(rnd)}
    return ClientUpdate(
        factors=factors, num_examples=n, scaling=start.scaling, head=head or {}, node=node
    )


@st.composite
def scenarios(draw: st.DrawFn, max_dim: int = 9) -> dict[str, Any]:
    """Random shapes, ranks, client counts, weights, client ranks and seeds."""
    n_modules = draw(st.integers(1, 3))
    rank = draw(st.integers(1, 4))
    shapes = {
        f"layer{i}.proj": (draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim)))
        for i in range(n_modules)
    }
    k = draw(st.integers(1, 5))
    weighting = draw(st.sampled_from(["examples", "uniform"]))
    examples = draw(st.lists(st.integers(0, 50), min_size=k, max_size=k))
    if weighting == "examples" and sum(examples) == 0:
        examples[0] = 1
    return {
        "spec": AdapterSpec(
            shapes=shapes, rank=rank, alpha=draw(st.sampled_from([1.0, 8.0, 16.0])),
            seed=draw(st.integers(0, 2**31)),
        ),
        "weighting": weighting,
        "examples": examples,
        "ranks": draw(st.lists(st.integers(1, 5), min_size=k, max_size=k)),
        "rounds": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**31)),
        "period": draw(st.integers(1, 3)),
        "compress": draw(st.booleans()),
    }


def weights(sc: dict[str, Any]) -> list[float]:
    """The p_k a scenario's clients must get."""
    n = sc["examples"]
    if sc["weighting"] == "uniform":
        return [1 / len(n)] * len(n)
    return [x / sum(n) for x in n]


def server_expectation(method: Method, spec: AdapterSpec, state: GlobalState,
                       server_round: int, *, client_rank: int | None = None) -> Expectation:
    """The Expectation the federation loop checks an uplink against, built by the loop's own
    code (server/loop.py FederationLoop.expectation) on a stand-in for the loop."""
    from fedlora.server.loop import FederationLoop

    node = SimpleNamespace(rank=client_rank if client_rank is not None else spec.rank)
    loop = SimpleNamespace(method=method, spec=spec, state=state, nodes={1: node},
                           max_node_rank=node.rank,
                           fed={}, max_norm=None, evaluator=SimpleNamespace(fingerprint=""))
    loop._max_bytes = lambda r: FederationLoop._max_bytes(loop, r)  # type: ignore[attr-defined]
    return FederationLoop.expectation(loop, server_round, 1)  # type: ignore[arg-type]
