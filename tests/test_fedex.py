"""FedEx-LoRA: exactness over rounds (with and without compression), the factored residual,
the downlink's bytes against the formula, client start, options, and the real adapter."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings

from fedlora.aggregation import AdapterSpec, ClientUpdate, GlobalState, get_method, shared_a
from fedlora.protos import WIRE_DTYPES, Envelope, encode, payload_bytes

from .contract.helpers import close, dense, scenarios, train, weights

FAST = settings(max_examples=25, deadline=None)
SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def _rank(state: GlobalState, m: str) -> int:
    f = state.factors[m]
    assert f["U"].shape[1] == f["V"].shape[0]
    return f["U"].shape[1]


def _client_model(method, state, spec, update, m) -> torch.Tensor:
    """W_k - W0 as the client really holds it: its merged base_delta plus s B_k A_k."""
    start = method.client_start(method.downlink(state), spec)
    g = update.factors[m]
    return dense(start.base_delta[m]) + start.scaling * dense((g["B"], g["A"]))


# ------------------------------------------------------------------------------ exactness


@FAST
@given(sc=scenarios())
def test_global_model_is_weighted_mean_of_client_models(sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = get_method("fedex", weighting=sc["weighting"], compress=sc["compress"])
    state = method.init_state(spec)
    k, r = len(sc["examples"]), spec.rank
    for _ in range(sc["rounds"] + 1):
        updates = [train(method, state, spec, gen, n=n, seed=i)
                   for i, n in enumerate(sc["examples"])]
        new = method.aggregate(state, updates)
        assert new.round == state.round + 1
        assert method.aggregation_error(state, updates, new) is None
        p = weights(sc)
        for m, (d_out, d_in) in spec.shapes.items():
            want = sum(pk * _client_model(method, state, spec, u, m)
                       for pk, u in zip(p, updates, strict=True))
            via_client_delta = sum(pk * dense(method.client_delta(state, u, m))
                                   for pk, u in zip(p, updates, strict=True))
            assert close(via_client_delta, want)
            assert close(dense(method.delta(new, m)), want)
            # A and B are the plain fedavg averages.
            for role in ("A", "B"):
                avg = sum(pk * u.factors[m][role].double() for pk, u in zip(p, updates, strict=True))
                assert close(new.factors[m][role].double(), avg)
            # The residual rank grows by (K + 1) r per round, refactorized at the cap.
            grown = _rank(state, m) + (k + 1) * r
            cap = min(d_out, d_in)
            if not sc["compress"] and grown <= cap:
                assert _rank(new, m) == grown
            else:
                assert _rank(new, m) <= min(grown, cap)
            assert all(t.dtype == torch.float32 and t.is_contiguous() for t in new.factors[m].values())
        state = new


def test_skipping_client_loads_exactly_the_global_model() -> None:
    method = get_method("fedex")
    spec = AdapterSpec({"q": (12, 10), "v": (8, 14)}, rank=2, alpha=8, seed=3)
    gen = torch.Generator().manual_seed(1)
    state = method.init_state(spec)
    truth = {m: torch.zeros(s, dtype=torch.float64) for m, s in spec.shapes.items()}
    for nodes in [("a", "b", "c"), ("b",), ("b", "c"), ("a", "b", "c"), ("c",)]:
        updates = [train(method, state, spec, gen, n=10 + i, node=node)
                   for i, node in enumerate(nodes)]
        total = sum(u.num_examples for u in updates)
        truth = {m: sum(u.num_examples / total * _client_model(method, state, spec, u, m)
                        for u in updates) for m in spec.shapes}
        state = method.aggregate(state, updates)
        # Node "a" sat out some rounds: the downlink alone gives it the global model.
        start = method.client_start(method.downlink(state), spec, seed=99)
        for m in spec.shapes:
            a, b = start.init[m]["A"], start.init[m]["B"]
            held = dense(start.base_delta[m]) + start.scaling * dense((b, a))
            assert close(held, truth[m]) and close(dense(method.delta(state, m)), truth[m])
    assert _rank(state, "q") <= 10 and _rank(state, "v") <= 8  # capped by compression


def test_compression_finds_the_rank_k_minus_1_residual() -> None:
    """E = sum_k p_k s (B_k - B)(A_k - A) has rank <= (K - 1) r; compress finds it."""
    spec = AdapterSpec({"m": (30, 20)}, rank=2, alpha=4)
    plain, packed = get_method("fedex"), get_method("fedex", compress=True)
    gen = torch.Generator().manual_seed(5)
    state = plain.init_state(spec)
    updates = [train(plain, state, spec, gen, n=n) for n in (1, 2, 5)]
    a, b = plain.aggregate(state, updates), packed.aggregate(state, updates)
    assert _rank(a, "m") == 8 and _rank(b, "m") == 4
    assert close(dense(plain.delta(a, "m")), dense(packed.delta(b, "m")))
    # One client: the residual s B_1 A_1 - s B_1 A_1 vanishes, nothing is kept.
    one = packed.aggregate(state, updates[:1])
    assert _rank(one, "m") == 0
    assert close(dense(packed.delta(one, "m")), dense(packed.client_delta(state, updates[0], "m")))
    zero = ClientUpdate({"m": {"A": torch.zeros(2, 20), "B": torch.zeros(30, 2)}}, 3, 2.0)
    assert _rank(packed.aggregate(state, [zero, zero]), "m") == 0


def test_residual_factors_are_the_stack() -> None:
    """Without compression U_E = [B_1 ... B_K, B], V_E = [p_1 s A_1; ...; -s A]."""
    method = get_method("fedex", weighting="examples")
    spec = AdapterSpec({"m": (9, 7)}, rank=1, alpha=3)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(spec)
    updates = [train(method, state, spec, gen, n=n) for n in (1, 3)]
    new = method.aggregate(state, updates)
    f, s = new.factors["m"], 3.0
    want_u = torch.cat([updates[0].factors["m"]["B"], updates[1].factors["m"]["B"], f["B"]], 1)
    want_v = torch.cat([0.25 * s * updates[0].factors["m"]["A"],
                        0.75 * s * updates[1].factors["m"]["A"], -s * f["A"]], 0)
    assert torch.allclose(f["U"], want_u) and torch.allclose(f["V"], want_v)


# ------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_downlink_floats_match_the_tensors_sent(wire: str) -> None:
    method = get_method("fedex")
    spec = AdapterSpec({"q": (40, 24), "mlp": (16, 48), "o": (50, 60)}, rank=3, alpha=6)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(0)
    k = 2
    for rnd in range(0, 4):
        if rnd:
            updates = [train(method, state, spec, gen, n=1 + i) for i in range(k)]
            for u in updates:
                for m, (d_out, d_in) in spec.shapes.items():
                    assert sum(t.numel() for t in u.factors[m].values()) == \
                        method.uplink_floats(d_out, d_in, 3, round=rnd)
            state = method.aggregate(state, updates)
        down = method.downlink(state, first_contact=rnd % 2 == 0)
        total = 0
        for m, (d_out, d_in) in spec.shapes.items():
            assert set(down[m]) == set(method.downlink_roles)
            sent = sum(t.numel() for t in down[m].values())
            want = method.downlink_floats(d_out, d_in, 3, num_clients=k, round=rnd)
            assert want == (3 + min(rnd * (k + 1) * 3, min(d_out, d_in))) * (d_in + d_out)
            if rnd * (k + 1) * 3 <= min(d_out, d_in):
                assert sent == want  # below the cap: exactly the formula
            else:
                assert sent <= want  # at the cap the refactorized residual may be smaller
            total += sent
        data = encode(Envelope("fedex", rnd, "down", down), wire)
        assert payload_bytes(data) == total * SIZE[wire]
    assert method.downlink_floats(64, 32, 4) == (4 + 2 * 4) * (64 + 32)  # `fedlora methods`


# ------------------------------------------------------------------------------ client, state


def test_init_state_and_client_start() -> None:
    method = get_method("fedex")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4, seed=7)
    state = method.init_state(spec)
    f = state.factors["q"]
    assert torch.equal(f["A"], shared_a(7, "q", 2, 5)) and not f["B"].any()
    assert f["U"].shape == (6, 0) and f["V"].shape == (0, 5)
    assert not dense(method.delta(state, "q")).any()
    start = method.client_start(method.downlink(state, first_contact=True), spec, seed=1)
    assert start.trainable == ("A", "B") and start.rank == 2 and start.scaling == 2.0
    assert torch.equal(start.init["q"]["A"], f["A"])
    assert start.base_delta["q"][0].shape == (6, 0)
    for t in (*start.init["q"].values(), *start.base_delta["q"]):
        t.add_(1.0)  # fresh tensors: the server state is untouched
    assert torch.equal(state.factors["q"]["A"], shared_a(7, "q", 2, 5))
    with pytest.raises(ValueError, match="rank"):
        method.client_start(method.downlink(state), spec, rank=3)
    with pytest.raises(ValueError, match="lacks"):
        method.client_start({"q": {"A": f["A"], "B": f["B"]}}, spec)
    bad = {"q": {**method.downlink(state)["q"], "U": torch.zeros(6, 1)}}
    with pytest.raises(ValueError, match="delta"):
        method.client_start(bad, spec)


def test_state_round_trip_and_inputs_untouched() -> None:
    method = get_method("fedex", compress=True)
    spec = AdapterSpec({"a.q": (7, 5), "a.v": (3, 6)}, rank=2, alpha=4, seed=3)
    state = method.init_state(spec, head={"h": torch.ones(2)})
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        updates = [train(method, state, spec, gen, n=n, head={"h": torch.randn(2, generator=gen)})
                   for n in (2, 5, 1)]
        before_u, before_s = copy.deepcopy(updates), copy.deepcopy(state)
        new = method.aggregate(state, updates)
        for u, v in zip(updates, before_u, strict=True):
            assert all(torch.equal(u.factors[m][r], v.factors[m][r]) for m in u.factors for r in "AB")
        assert all(torch.equal(state.tensors()[k], t) for k, t in before_s.tensors().items())
        state = new
    flat = safetensors.torch.load(safetensors.torch.save(state.tensors()))
    back = GlobalState.from_tensors(state.round, flat, json.loads(json.dumps(state.meta)))
    assert all(torch.equal(back.tensors()[k], t) for k, t in state.tensors().items())
    assert back.meta["options"] == {"compress": True, "rtol": 1e-6}


def test_bad_updates_and_options_rejected() -> None:
    method = get_method("fedex")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    good = train(method, state, spec, torch.Generator().manual_seed(0), n=3)
    bad = copy.deepcopy(good)
    bad.scaling = 3.0
    with pytest.raises(ValueError, match="scaling"):
        method.aggregate(state, [bad])
    bad = copy.deepcopy(good)
    bad.factors["q"]["A"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="shape"):
        method.aggregate(state, [bad])
    with pytest.raises(ValueError, match="made by method"):
        get_method("fedavg").aggregate(state, [good])
    for options in ({"compress": "yes"}, {"rtol": 1.0}, {"rtol": -0.1}, {"rtol": True},
                    {"ranks": [2]}, {"weighting": "median"}):
        with pytest.raises(ValueError):
            get_method("fedex", **options)


def test_real_adapter_holds_the_global_model() -> None:
    """Through task.adapters: the PEFT layer's merged base plus s B A is W0 + U V + s B A."""
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.models import build_model, head_parameter_names, target_module_names

    tiny = {"source": "tiny_bert", "task": "classification", "max_length": 16, "hidden_size": 32,
            "num_layers": 2, "num_heads": 2, "vocab_size": 128, "init_seed": 0}
    model = build_model(tiny, 4)
    targets = target_module_names(model, ["query", "value"])
    host = AdapterHost(model, targets, head_parameter_names(model, ["classifier"]), "lora")
    w0 = {n: w.double() for n, w in host.w0.items()}
    method = get_method("fedex")
    spec = AdapterSpec(shapes=host.shapes(), rank=4, alpha=8)
    state = method.init_state(spec, host.head_state())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        state = method.aggregate(state, [train(method, state, spec, gen, n=n) for n in (3, 1, 2)])
    host.start(method.client_start(method.downlink(state), spec), state.head)
    factors = host.factors(("A", "B"))
    for n in targets:
        held = host.linears[n].weight.double() + spec.scaling * dense(
            (factors[n]["B"], factors[n]["A"]))
        assert close(held, w0[n] + dense(method.delta(state, n)))
