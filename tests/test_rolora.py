"""RoLoRA: the B-first alternation, exactness over alternating rounds, the frozen factor
untouched, per-round bytes against the formulas, rejections, and the real adapter."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings

from fedlora.aggregation import AdapterSpec, ClientUpdate, GlobalState, get_method, shared_a
from fedlora.protos import WIRE_DTYPES, Envelope, encode, payload_bytes

from .contract.helpers import close, dense, scenarios, weights

FAST = settings(max_examples=25, deadline=None)
SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def train(method, state, spec, gen, *, n, head=None, node="") -> ClientUpdate:
    """A fake local round of training round state.round + 1: perturb the trainable factor
    and send what uplink_in_round asks for (test_aggregation.train sends uplink_roles)."""
    rnd = state.round + 1
    start = method.client_start(method.downlink(state), spec, round=rnd)
    factors = {}
    for m, init in start.init.items():
        trained = {k: t + torch.randn(t.shape, generator=gen) if k in start.trainable else t
                   for k, t in init.items()}
        factors[m] = {k: trained[k] for k in method.uplink_in_round(rnd)}
    return ClientUpdate(factors=factors, num_examples=n, scaling=start.scaling,
                        head=head or {}, node=node)


# ------------------------------------------------------------------------------ schedule


def test_b_first_alternation() -> None:
    method = get_method("rolora")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    down = method.downlink(method.init_state(spec))
    for rnd, role in ((1, "B"), (2, "A"), (3, "B"), (4, "A"), (11, "B")):
        assert method.uplink_in_round(rnd) == (role,)
        assert method.client_start(down, spec, round=rnd).trainable == (role,)
    assert set(method.uplink_roles) == set(method.client_trains) == {"A", "B"}
    assert method.server_step_roles == () and method.exact


def test_round_one_must_train_b() -> None:
    """Why B first: with B = 0, dL/dA = s B^T dL/dW is exactly zero, dL/dB is not."""
    method = get_method("rolora")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4, seed=3)
    state = method.init_state(spec)
    f = state.factors["q"]
    assert torch.equal(f["A"], shared_a(3, "q", 2, 5)) and not f["B"].any()
    a, b = (f[k].clone().requires_grad_(True) for k in "AB")
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    ((x @ (spec.scaling * b @ a).T) ** 2 + x @ (b @ a).T).sum().backward()
    assert not a.grad.any() and b.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ exactness


@FAST
@given(sc=scenarios())
def test_global_delta_is_weighted_mean_over_alternating_rounds(sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = get_method("rolora", weighting=sc["weighting"])
    state = method.init_state(spec)
    p = weights(sc)
    for _ in range(sc["rounds"] + 2):  # 3 to 5 rounds: both factors move, twice or more
        role = "B" if state.round % 2 == 0 else "A"
        frozen = "A" if role == "B" else "B"
        updates = [train(method, state, spec, gen, n=n) for n in sc["examples"]]
        new = method.aggregate(state, updates)
        assert new.round == state.round + 1
        assert method.aggregation_error(state, updates, new) is None
        for m in spec.shapes:
            assert set(updates[0].factors[m]) == {role}
            # The frozen factor is bit-for-bit the old one; the trained one is the average.
            assert torch.equal(new.factors[m][frozen], state.factors[m][frozen])
            avg = sum(pk * u.factors[m][role].double() for pk, u in zip(p, updates, strict=True))
            assert close(new.factors[m][role].double(), avg)
            want = sum(pk * dense(method.client_delta(state, u, m))
                       for pk, u in zip(p, updates, strict=True))
            assert close(dense(method.delta(new, m)), want), m
        state = new


def test_client_delta_is_what_the_client_holds() -> None:
    """client_delta combines the update with the frozen factor the client really had."""
    method = get_method("rolora")
    spec = AdapterSpec({"q": (8, 6), "v": (5, 9)}, rank=3, alpha=6)
    gen = torch.Generator().manual_seed(4)
    state = method.init_state(spec)
    for rnd in range(1, 5):
        start = method.client_start(method.downlink(state), spec, round=rnd)
        update = train(method, state, spec, gen, n=2)
        for m in spec.shapes:
            held = {**start.init[m], **update.factors[m]}
            want = start.scaling * dense((held["B"], held["A"]))
            assert close(dense(method.client_delta(state, update, m)), want)
        state = method.aggregate(state, [update, train(method, state, spec, gen, n=1)])


def test_skipping_client_loads_exactly_the_global_model() -> None:
    method = get_method("rolora")
    spec = AdapterSpec({"q": (12, 10), "v": (8, 14)}, rank=2, alpha=8, seed=3)
    gen = torch.Generator().manual_seed(1)
    state = method.init_state(spec)
    for nodes in [("a", "b", "c"), ("b",), ("b", "c"), ("a", "b", "c"), ("c",)]:
        updates = [train(method, state, spec, gen, n=10 + i, node=node)
                   for i, node in enumerate(nodes)]
        total = sum(u.num_examples for u in updates)
        truth = {m: sum(u.num_examples / total * dense(method.client_delta(state, u, m))
                        for u in updates) for m in spec.shapes}
        state = method.aggregate(state, updates)
        # Node "a" sat out rounds 2 and 3 (a B and an A round): A and B come down every round.
        start = method.client_start(method.downlink(state), spec, round=state.round + 1)
        for m in spec.shapes:
            held = start.scaling * dense((start.init[m]["B"], start.init[m]["A"]))
            assert close(held, truth[m]) and close(dense(method.delta(state, m)), truth[m])


def test_skipped_round_keeps_the_alternation_aligned() -> None:
    """The server advances state.round on a skipped round; the next round's role follows."""
    method = get_method("rolora")
    spec = AdapterSpec({"q": (4, 3)}, rank=1, alpha=1)
    state = method.init_state(spec)
    skipped = GlobalState(1, state.factors, state.head, state.meta)  # round 1 had no update
    gen = torch.Generator().manual_seed(0)
    update = train(method, skipped, spec, gen, n=1)
    assert set(update.factors["q"]) == {"A"}
    new = method.aggregate(skipped, [update])
    assert new.round == 2 and torch.equal(new.factors["q"]["B"], state.factors["q"]["B"])


# ------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_bytes_match_the_formulas_per_round(wire: str) -> None:
    method = get_method("rolora")
    spec = AdapterSpec({"q": (40, 24), "mlp": (16, 48)}, rank=3, alpha=6)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(spec)
    for rnd in range(1, 5):
        updates = [train(method, state, spec, gen, n=1 + i) for i in range(2)]
        for u in updates:
            total = 0
            for m, (d_out, d_in) in spec.shapes.items():
                sent = sum(t.numel() for t in u.factors[m].values())
                want = method.uplink_floats(d_out, d_in, 3, round=rnd)
                assert sent == want == (d_out * 3 if rnd % 2 else 3 * d_in)
                total += sent
            env = Envelope("rolora", rnd, "up", u.factors, num_examples=u.num_examples,
                           scaling=u.scaling, rank=3)
            assert payload_bytes(encode(env, wire)) == total * SIZE[wire]
        state = method.aggregate(state, updates)
        for first in (False, True):
            down = method.downlink(state, first_contact=first)
            for m, (d_out, d_in) in spec.shapes.items():
                assert set(down[m]) == set(method.downlink_roles)
                assert sum(t.numel() for t in down[m].values()) == method.downlink_floats(
                    d_out, d_in, 3, num_clients=2, round=rnd, first_contact=first
                ) == 3 * (d_in + d_out)
    # Two rounds up: exactly one fedavg round.
    fedavg = get_method("fedavg")
    assert sum(method.uplink_floats(40, 24, 3, round=t) for t in (1, 2)) == \
        fedavg.uplink_floats(40, 24, 3)


# ------------------------------------------------------------------------------ state


def test_heads_state_round_trip_and_inputs_untouched() -> None:
    method = get_method("rolora")
    spec = AdapterSpec({"a.q": (7, 5), "a.v": (3, 6)}, rank=2, alpha=4, seed=3)
    state = method.init_state(spec, head={"h": torch.ones(2), "keep": torch.zeros(3)})
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        heads = [{"h": torch.full((2,), float(i))} for i in (1, 4)]
        updates = [train(method, state, spec, gen, n=n, head=h)
                   for n, h in zip((1, 3), heads, strict=True)]
        before_u, before_s = copy.deepcopy(updates), copy.deepcopy(state)
        new = method.aggregate(state, updates)
        assert torch.allclose(new.head["h"], torch.full((2,), 0.25 * 1 + 0.75 * 4))
        assert torch.equal(new.head["keep"], torch.zeros(3))
        for u, v in zip(updates, before_u, strict=True):
            assert all(torch.equal(u.factors[m][r], v.factors[m][r])
                       for m in u.factors for r in u.factors[m])
        assert all(torch.equal(state.tensors()[k], t) for k, t in before_s.tensors().items())
        state = new
    flat = safetensors.torch.load(safetensors.torch.save(state.tensors()))
    back = GlobalState.from_tensors(state.round, flat, json.loads(json.dumps(state.meta)))
    assert all(torch.equal(back.tensors()[k], t) for k, t in state.tensors().items())
    assert back.meta["method"] == "rolora" and back.meta["options"] == {}
    # Fresh tensors at the client: training in place leaves the server state alone.
    start = method.client_start(method.downlink(state), spec, round=4)
    for t in start.init["a.q"].values():
        t.add_(1.0)
    assert all(torch.equal(state.tensors()[k], t) for k, t in back.tensors().items())


# ------------------------------------------------------------------------------ rejections


def test_bad_updates_rounds_and_options_rejected() -> None:
    method = get_method("rolora")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(0)
    good = train(method, state, spec, gen, n=3)
    wrong = copy.deepcopy(good)  # round 1 trains B: an A is the wrong role
    wrong.factors["q"] = {"A": torch.zeros(2, 5)}
    both = copy.deepcopy(good)
    both.factors["q"]["A"] = torch.zeros(2, 5)
    for bad in (wrong, both):
        with pytest.raises(ValueError, match="roles"):
            method.aggregate(state, [good, bad])
    state2 = method.aggregate(state, [good])
    with pytest.raises(ValueError, match="roles"):  # round 2 trains A: a B is stale
        method.aggregate(state2, [good])
    bad = copy.deepcopy(good)
    bad.factors["q"]["B"] = torch.zeros(6, 3)
    with pytest.raises(ValueError, match="shape"):
        method.aggregate(state, [bad])
    bad = copy.deepcopy(good)
    bad.scaling = 3.0
    with pytest.raises(ValueError, match="scaling"):
        method.aggregate(state, [bad])
    with pytest.raises(ValueError, match="made by method"):
        get_method("ffa").aggregate(state, [good])
    down = method.downlink(state)
    with pytest.raises(ValueError, match="rank"):
        method.client_start(down, spec, rank=3)
    with pytest.raises(ValueError, match="lacks"):
        method.client_start({"q": {"B": down["q"]["B"]}}, spec)
    for rnd in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="round"):
            method.client_start(down, spec, round=rnd)
        with pytest.raises(ValueError, match="round"):
            method.uplink_floats(6, 5, 2, round=rnd)
    for options in ({"first": "A"}, {"period": 2}, {"weighting": "median"}):
        with pytest.raises(ValueError):
            get_method("rolora", **options)


# ------------------------------------------------------------------------------ real adapter


def test_real_adapter_trains_only_the_rounds_factor() -> None:
    """Through task.adapters: only the round's factor requires grad, and the PEFT layer
    holds W0 + s B A of the global state."""
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.models import build_model, head_parameter_names, target_module_names

    tiny = {"source": "tiny_bert", "task": "classification", "max_length": 16, "hidden_size": 32,
            "num_layers": 2, "num_heads": 2, "vocab_size": 128, "init_seed": 0}
    model = build_model(tiny, 4)
    targets = target_module_names(model, ["query", "value"])
    host = AdapterHost(model, targets, head_parameter_names(model, ["classifier"]), "lora")
    method = get_method("rolora")
    spec = AdapterSpec(shapes=host.shapes(), rank=4, alpha=8)
    state = method.init_state(spec, host.head_state())
    gen = torch.Generator().manual_seed(0)
    for rnd in range(1, 4):
        host.start(method.client_start(method.downlink(state), spec, round=rnd), state.head)
        role = method.uplink_in_round(rnd)[0]
        for n in targets:
            assert host._factor(n, role).requires_grad
            assert not host._factor(n, "B" if role == "A" else "A").requires_grad
        state = method.aggregate(state, [train(method, state, spec, gen, n=n) for n in (3, 1)])
    host.start(method.client_start(method.downlink(state), spec, round=4), state.head)
    factors = host.factors(("A", "B"))
    for n in targets:
        assert torch.equal(factors[n]["A"], state.factors[n]["A"])
        assert torch.equal(factors[n]["B"], state.factors[n]["B"])
