"""The wire contract of every registered method: bytes, round trip and the server's gate.

What a user relies on: the payload bytes of an uplink and a downlink (fedlora.protos) are
the method's float formula times the wire dtype's size; what is encoded decodes to the same
tensors (rounded to the wire dtype); the Expectation the federation loop builds accepts a
well-formed update and rejects a malformed one with an UpdateRejected naming the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedlora.aggregation import AdapterSpec, ClientUpdate, Method
from fedlora.protos import (
    WIRE_DTYPES,
    Envelope,
    RejectReason,
    UpdateRejected,
    decode,
    encode,
    payload_bytes,
)

from .helpers import SIZE, TORCH, client_rank, server_expectation, train

SPEC = AdapterSpec({"q": (48, 32), "down": (32, 80)}, rank=4, alpha=8)
HEAD = {"classifier.weight": torch.zeros(3, 48), "classifier.bias": torch.zeros(3)}
# Per-client-rank methods: the clients' own ranks (the server's cap for each is its rank).
RANKS = (2, 4)


def _uplink(method: Method, update: ClientUpdate, rnd: int, rank: int) -> Envelope:
    return Envelope(method.name, rnd, "up", update.factors, head=update.head,
                    num_examples=update.num_examples, scaling=update.scaling, rank=rank)


def _round_updates(method: Method, state, gen: torch.Generator) -> list[tuple[ClientUpdate, int]]:
    """Two clients of the next round with their ranks (RANKS for per-client-rank methods)."""
    ranks = RANKS if method.per_client_rank else (SPEC.rank, SPEC.rank)
    head = {k: torch.randn(v.shape, generator=gen) for k, v in HEAD.items()}
    return [(train(method, state, SPEC, gen, n=5 + k, rank=r, seed=k, head=head), r)
            for k, r in enumerate(ranks)]


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_payload_bytes_are_the_formula_and_round_trip(method: Method, wire: str) -> None:
    """Uplink and downlink payload bytes == floats formula x dtype size; decode(encode(x))
    gives x rounded to the wire dtype; the server's Expectation accepts the uplink."""
    state = method.init_state(SPEC, HEAD)
    gen = torch.Generator().manual_seed(0)
    for rnd in (1, 2):  # below min(d_out, d_in), where growing downlinks are exact
        pairs = _round_updates(method, state, gen)
        for update, rank in pairs:
            env = _uplink(method, update, rnd, rank)
            data = encode(env, wire)
            floats = sum(method.uplink_floats(*s, rank, round=rnd) for s in SPEC.shapes.values())
            assert payload_bytes(data) == floats * SIZE[wire] == payload_bytes(env, wire)
            back = decode(data, server_expectation(method, SPEC, state, rnd, client_rank=rank))
            assert (back.method, back.round, back.num_examples, back.scaling, back.rank) == (
                method.name, rnd, update.num_examples, update.scaling, rank)
            assert back.factors.keys() == update.factors.keys()
            for m, roles in update.factors.items():
                assert back.factors[m].keys() == roles.keys()
                for role, t in roles.items():
                    assert torch.equal(back.factors[m][role], t.to(TORCH[wire]).float())
            assert all(torch.equal(back.head[k], t.to(TORCH[wire]).float())
                       for k, t in update.head.items())
        state = method.aggregate(state, [u for u, _ in pairs])
        if method.per_client_rank:
            continue  # the downlink depends on the round's ranks: checked at one rank below
        for first in (False, True):
            down = method.downlink(state, first_contact=first)
            data = encode(Envelope(method.name, rnd, "down", down), wire)
            floats = sum(method.downlink_floats(*s, SPEC.rank, num_clients=2, round=rnd,
                                                first_contact=first)
                         for s in SPEC.shapes.values())
            assert payload_bytes(data) == floats * SIZE[wire], (rnd, first)
            back = decode(data)
            assert all(torch.equal(back.factors[m][r], t.to(TORCH[wire]).float())
                       for m, roles in down.items() for r, t in roles.items())


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_downlink_bytes_at_one_shared_rank(method: Method, wire: str) -> None:
    """Every client at the spec's rank (the formula's assumption for every method)."""
    state = method.init_state(SPEC, HEAD)
    gen = torch.Generator().manual_seed(1)
    for rnd in (1, 2):
        updates = [train(method, state, SPEC, gen, n=3 + k, rank=SPEC.rank, seed=k)
                   for k in range(2)]
        state = method.aggregate(state, updates)
        for first in (False, True):
            down = method.downlink(state, first_contact=first,
                                   rank=client_rank(method, SPEC.rank))
            data = encode(Envelope(method.name, rnd, "down", down), wire)
            floats = sum(method.downlink_floats(*s, SPEC.rank, num_clients=2, round=rnd,
                                                first_contact=first)
                         for s in SPEC.shapes.values())
            assert payload_bytes(data) == floats * SIZE[wire], (rnd, first)


def _malformed(method: Method, update: ClientUpdate, rnd: int, rank: int
               ) -> dict[RejectReason, ClientUpdate]:
    """Copies of a good round-``rnd`` update at ``rank``, each wrong in one way."""
    roles = method.uplink_in_round(rnd)
    factor_roles = [r for r in roles if r in ("A", "B", "R")]
    assert factor_roles, f"{method.name}: round {rnd} sends no factor role"
    out: dict[RejectReason, ClientUpdate] = {}
    shape_of = {"A": lambda r, o, i: (r, i), "B": lambda r, o, i: (o, r), "R": lambda r, o, i: (r, r)}
    # Wrong shape: the rank-free side of the first factor is off by one.
    bad = copy.deepcopy(update)
    role = factor_roles[0]
    t = bad.factors["q"][role]
    bad.factors["q"][role] = torch.zeros(t.shape[0] + (role == "B"), t.shape[1] + (role != "B"))
    out[RejectReason.WRONG_SHAPE] = bad
    # Wrong role: a factor role the round does not send.
    bad = copy.deepcopy(update)
    other = next(r for r in ("A", "B", "R") if r not in roles)
    bad.factors["q"][other] = torch.zeros(shape_of[other](rank, *SPEC.shapes["q"]))
    out[RejectReason.WRONG_ROLE] = bad
    # NaN in one tensor.
    bad = copy.deepcopy(update)
    bad.factors["q"][role] = bad.factors["q"][role].clone()
    bad.factors["q"][role].view(-1)[0] = float("nan")
    out[RejectReason.NON_FINITE] = bad
    # Wrong rank: every factor of every module consistently at rank + 1 (above the cap).
    bad = copy.deepcopy(update)
    bad.factors = {m: {k: torch.zeros(shape_of[k](rank + 1, *SPEC.shapes[m]))
                       if k in shape_of else t for k, t in rs.items()}
                   for m, rs in bad.factors.items()}
    out[RejectReason.WRONG_RANK] = bad
    return out


def test_malformed_uplinks_are_rejected_with_their_reason(method: Method) -> None:
    """Wrong shape, wrong role, NaN and wrong rank each raise UpdateRejected at the
    server's gate, in every round (methods that alternate roles included)."""
    state = method.init_state(SPEC, HEAD)
    gen = torch.Generator().manual_seed(2)
    for rnd in (1, 2):
        pairs = _round_updates(method, state, gen)
        update, rank = pairs[-1]
        expect = server_expectation(method, SPEC, state, rnd, client_rank=rank)
        decode(encode(_uplink(method, update, rnd, rank)), expect)  # the good one passes
        for reason, bad in _malformed(method, update, rnd, rank).items():
            with pytest.raises(UpdateRejected) as info:
                decode(encode(_uplink(method, bad, rnd, 0)), expect)
            assert info.value.reason is reason, (rnd, str(info.value))
            assert str(info.value).startswith(f"{reason.value}: ")
        state = method.aggregate(state, [u for u, _ in pairs])
