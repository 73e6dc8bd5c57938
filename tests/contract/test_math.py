"""The aggregation contract of every registered method, on simulated clients (no model).

What a user relies on: an exact method's global model is exactly the weighted mean of the
clients' models; an inexact one says how far off it is; heads are averaged; a state
survives a checkpoint; the byte formulas count the tensors really sent; a client's start
is its own copy; a malformed update is refused with a clear error, never aggregated.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings

from fedlora.aggregation import AdapterSpec, GlobalState, Method, get_method, spec_from_meta

from .helpers import client_rank, close, dense, scenarios, train, weights

# The rank-carrying shape of each factor role at rank r (the wire's and the server's rule).
FACTOR_SHAPES = {"A": lambda r, d_out, d_in: (r, d_in), "B": lambda r, d_out, d_in: (d_out, r),
                 "R": lambda r, d_out, d_in: (r, r)}


@settings(max_examples=12, deadline=None)
@given(sc=scenarios())
def test_exactness_as_declared(name: str, sc: dict[str, Any]) -> None:
    """exact: delta(new state) == sum_k p_k client_delta_k, for random shapes, ranks,
    client counts, weights and (per-client-rank methods) client ranks, over 1 to 3 rounds.
    Inexact: aggregation_error reports a finite error per module (None: personalized)."""
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = get_method(name, weighting=sc["weighting"])
    state = method.init_state(spec)
    for _ in range(sc["rounds"]):
        updates = [train(method, state, spec, gen, n=n, rank=r, seed=i)
                   for i, (n, r) in enumerate(zip(sc["examples"], sc["ranks"], strict=True))]
        new = method.aggregate(state, updates)
        assert new.round == state.round + 1
        error = method.aggregation_error(state, updates, new)
        if method.exact:
            assert error is None
            for m in spec.shapes:
                want = sum(p * dense(method.client_delta(state, u, m))
                           for p, u in zip(weights(sc), updates, strict=True))
                assert close(dense(method.delta(new, m)), want), m
        elif error is not None:
            assert set(error) == set(spec.shapes)
            assert all(math.isfinite(e) and e >= 0 for e in error.values()), error
        else:
            assert method.personalized, f"{name}: inexact and reports no aggregation error"
        state = new


def test_heads_are_averaged_and_carried(method: Method) -> None:
    spec = AdapterSpec({"m": (4, 3)}, rank=2, alpha=4)
    head0 = {"classifier.weight": torch.zeros(5, 4), "classifier.bias": torch.ones(5)}
    state = method.init_state(spec, head=head0)
    assert torch.equal(state.head["classifier.bias"], torch.ones(5))
    gen = torch.Generator().manual_seed(0)
    heads = [{"classifier.weight": torch.full((5, 4), float(i))} for i in (1, 4)]
    updates = [train(method, state, spec, gen, n=n, rank=2, head=h)
               for n, h in zip((1, 3), heads, strict=True)]
    new = method.aggregate(state, updates)
    assert torch.allclose(new.head["classifier.weight"], torch.full((5, 4), 0.25 * 1 + 0.75 * 4))
    assert torch.equal(new.head["classifier.bias"], torch.ones(5))  # not sent: kept
    assert torch.equal(state.head["classifier.bias"], torch.ones(5))
    head0["classifier.bias"].add_(1)  # the state holds its own copy
    assert torch.equal(state.head["classifier.bias"], torch.ones(5))


def test_state_round_trip_and_inputs_untouched(method: Method) -> None:
    """A checkpoint (safetensors + JSON meta) restores the state bit for bit; aggregation
    mutates neither the updates nor the old state and is deterministic."""
    spec = AdapterSpec({"a.q": (7, 5), "a.v": (3, 6)}, rank=2, alpha=4, seed=3)
    state = method.init_state(spec, head={"h": torch.ones(2)})
    json.dumps(state.meta)
    gen = torch.Generator().manual_seed(0)
    updates = [train(method, state, spec, gen, n=n, rank=2,
                     head={"h": torch.randn(2, generator=gen)}) for n in (2, 5, 1)]
    before_u, before_s = copy.deepcopy(updates), copy.deepcopy(state)
    new = method.aggregate(state, updates)
    for u, v in zip(updates, before_u, strict=True):
        assert all(torch.equal(u.factors[m][k], v.factors[m][k])
                   for m in u.factors for k in u.factors[m])
        assert torch.equal(u.head["h"], v.head["h"])
    assert all(torch.equal(state.tensors()[k], t) for k, t in before_s.tensors().items())
    assert state.round == 0 and new.round == 1
    for st_ in (state, new):
        flat = safetensors.torch.load(safetensors.torch.save(st_.tensors()))
        back = GlobalState.from_tensors(st_.round, flat, json.loads(json.dumps(st_.meta)))
        assert back.round == st_.round and back.meta == st_.meta
        assert back.tensors().keys() == st_.tensors().keys()
        assert all(torch.equal(back.tensors()[k], t) for k, t in st_.tensors().items())
    assert spec_from_meta(new.meta) == spec
    again = method.aggregate(state, updates)
    assert all(torch.equal(again.tensors()[k], t) for k, t in new.tensors().items())


def test_float_formulas_count_the_tensors_sent(method: Method) -> None:
    """uplink_floats / downlink_floats (what `fedlora methods` and the byte reports use)
    equal the elements of the tensors really sent, over rounds and first contacts. (Methods
    whose downlink grows with the rounds may send less once it reaches min(d_out, d_in),
    where their formula is the bound: the modules here stay below that cap.)"""
    spec = AdapterSpec({"q": (40, 32), "mlp": (32, 48)}, rank=3, alpha=6)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(0)
    for rnd in range(1, 4):
        updates = [train(method, state, spec, gen, n=1 + i, rank=3, seed=i) for i in range(2)]
        for u in updates:
            assert set(u.factors["q"]) == set(method.uplink_in_round(rnd))
            for m, (d_out, d_in) in spec.shapes.items():
                got = sum(t.numel() for t in u.factors[m].values())
                assert got == method.uplink_floats(d_out, d_in, 3, round=rnd), (m, rnd)
        state = method.aggregate(state, updates)
        for first in (False, True):
            down = method.downlink(state, first_contact=first, rank=client_rank(method, 3))
            for m, (d_out, d_in) in spec.shapes.items():
                extra = set(method.node_keeps) if first else set()
                assert set(method.downlink_roles) <= set(down[m]) <= set(
                    method.downlink_roles) | extra, (m, sorted(down[m]))
                want = method.downlink_floats(d_out, d_in, 3, num_clients=2, round=rnd,
                                              first_contact=first)
                assert sum(t.numel() for t in down[m].values()) == want, (m, rnd, first)


def test_client_start_is_a_fresh_copy(method: Method) -> None:
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    r = client_rank(method, 2)

    def start() -> Any:
        return method.client_start(method.downlink(state, first_contact=True, rank=r), spec,
                                   rank=r, seed=1, round=1)

    first = start()
    assert set(first.trainable) <= set(method.client_trains)
    assert set(first.trainable) <= set(first.init["q"])
    assert set(method.uplink_in_round(1)) <= set(first.init["q"])
    assert first.rank == 2 and math.isclose(first.scaling, spec.scaling)
    for role, t in first.init["q"].items():
        assert tuple(t.shape) == FACTOR_SHAPES[role](2, 6, 5), role
    # Training in place must not touch the server state.
    for t in first.init["q"].values():
        t.add_(1.0)
    fresh = start()
    assert all(torch.allclose(fresh.init["q"][k], t - 1.0) for k, t in first.init["q"].items())
    with pytest.raises(ValueError, match="lacks"):
        method.client_start({}, spec, rank=r, seed=1, round=1)


# ------------------------------------------------------------------------------ rejections


def _bad_updates(method: Method, spec: AdapterSpec, good: Any, rnd: int) -> dict[str, Any]:
    """Malformed copies of ``good`` (a round-``rnd`` update), by what is wrong with them."""
    roles = method.uplink_in_round(rnd)
    out: dict[str, Any] = {}
    bad = copy.deepcopy(good)
    del bad.factors["v"]
    out["missing module"] = bad
    bad = copy.deepcopy(good)
    bad.factors["k"] = bad.factors["q"]
    out["unknown module"] = bad
    bad = copy.deepcopy(good)
    bad.factors["q"][roles[0]] = torch.zeros(7, 7)
    out["wrong shape"] = bad
    bad = copy.deepcopy(good)
    other = next(r for r in ("A", "B", "R") if r not in roles)
    d_out, d_in = spec.shapes["q"]
    bad.factors["q"][other] = torch.zeros(FACTOR_SHAPES[other](spec.rank, d_out, d_in))
    out["wrong role"] = bad
    return out


def test_malformed_updates_are_refused(method: Method) -> None:
    """aggregate raises ValueError, naming the problem, for an empty round, a missing or an
    unknown module, a wrong shape, an unexpected role, a bad example count, a state made by
    another method; fixed-rank methods also refuse another rank."""
    spec = AdapterSpec({"q": (6, 5), "v": (4, 4)}, rank=2, alpha=4)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(0)
    good = train(method, state, spec, gen, n=3, rank=2)
    with pytest.raises(ValueError, match="empty"):
        method.aggregate(state, [])
    needles = {"missing module": "missing", "unknown module": "unknown",
               "wrong shape": "shape", "wrong role": "roles"}
    for what, bad in _bad_updates(method, spec, good, 1).items():
        with pytest.raises(ValueError, match=needles[what]):
            method.aggregate(state, [good, bad])
    for n in (-1, 2.5, True):
        bad = copy.deepcopy(good)
        bad.num_examples = n
        with pytest.raises(ValueError, match="num_examples"):
            method.aggregate(state, [bad])
    zero = copy.deepcopy(good)
    zero.num_examples = 0
    with pytest.raises(ValueError, match="num_examples > 0"):
        method.aggregate(state, [zero])
    assert get_method(method.name, weighting="uniform").aggregate(state, [zero]).round == 1
    if not method.per_client_rank:
        bad = copy.deepcopy(good)
        bad.factors = {m: {k: torch.zeros(FACTOR_SHAPES[k](3, *spec.shapes[m])) if k in
                           FACTOR_SHAPES else t for k, t in roles.items()}
                       for m, roles in bad.factors.items()}
        with pytest.raises(ValueError, match="shape"):
            method.aggregate(state, [bad])
        with pytest.raises(ValueError, match="rank"):
            method.client_start(method.downlink(state, first_contact=True), spec, rank=3)
    with pytest.raises(ValueError, match="made by method"):
        method.aggregate(GlobalState(0, state.factors, state.head,
                                     {**state.meta, "method": "another"}), [good])
