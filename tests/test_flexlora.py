"""FlexLoRA: the merged delta over rounds with heterogeneous ranks, its SVD form, the
per-client truncation and its reported error, padding, bytes, options, the real adapter."""

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


def _train(method, state, spec, gen, *, n, rank, head=None, node="", steps=1.0) -> ClientUpdate:
    """A fake local round at the client's own rank: start from its cut, perturb A and B."""
    start = method.client_start(method.downlink(state, rank=rank), spec, rank=rank)
    factors = {m: {k: t + steps * torch.randn(t.shape, generator=gen) for k, t in init.items()}
               for m, init in start.init.items()}
    return ClientUpdate(factors=factors, num_examples=n, scaling=start.scaling,
                        head=head or {}, node=node)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x) if x.numel() else torch.zeros(0, dtype=x.dtype)


def _top(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _tail(x: torch.Tensor, r: int) -> float:
    """||X - trunc_r(X)||_F from a dense SVD (independent of ties in the spectrum)."""
    return float(_spectrum(x)[r:].square().sum().sqrt())


# ------------------------------------------------------------------------------ aggregation


@FAST
@given(sc=scenarios())
def test_merged_delta_is_weighted_sum_and_cuts_are_truncations(sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = get_method("flexlora", weighting=sc["weighting"])
    state = method.init_state(spec)
    p = weights(sc)
    for _ in range(sc["rounds"]):
        updates = [_train(method, state, spec, gen, n=n, rank=r)
                   for n, r in zip(sc["examples"], sc["ranks"], strict=True)]
        new = method.aggregate(state, updates)
        assert new.round == state.round + 1
        err = method.aggregation_error(state, updates, new)
        assert err is not None and set(err) == set(spec.shapes)
        for m, (d_out, d_in) in spec.shapes.items():
            # The server holds sum_k p_k s_k B_k A_k: it replaces the previous M.
            want = sum(pk * dense(method.client_delta(state, u, m))
                       for pk, u in zip(p, updates, strict=True))
            got = dense(method.delta(new, m))
            assert close(got, want)
            u, v = new.factors[m]["U"].double(), new.factors[m]["V"].double()
            k = u.shape[1]
            assert k <= min(sum(sc["ranks"]), d_out, d_in)
            assert all(t.dtype == torch.float32 and t.is_contiguous()
                       for t in new.factors[m].values())
            # Balanced SVD factors: U^T U = V V^T = diag(S), S descending = M's spectrum.
            s = u.norm(dim=0) * v.norm(dim=1)
            assert close(u.T @ u, torch.diag(s)) and close(v @ v.T, torch.diag(s))
            assert torch.all(s[:-1] >= s[1:] - 1e-5 * (1 + _top(s)))
            dense_s = _spectrum(want)
            assert close(s, dense_s[:k]) and _top(dense_s[k:]) <= 1e-5 * (1 + _top(dense_s))
            # The reported error is the smallest client's truncation loss.
            r_min = min(sc["ranks"])
            assert abs(err[m] - _tail(want, r_min)) <= 1e-5 * (1 + float(want.norm()))
            # Each client's cut: s_k B A is the top-r_k truncation of M (Eckart-Young).
            for r in set(sc["ranks"]):
                start = method.client_start(method.downlink(new, rank=r), spec, rank=r)
                held = start.scaling * dense((start.init[m]["B"], start.init[m]["A"]))
                assert close(held, dense((u[:, :r], v[:r])))
                assert abs(float((got - held).norm()) - _tail(got, r)) <= 1e-5 * (
                    1 + float(got.norm()))
        state = new


def test_clients_that_do_not_move_reproduce_m_when_ranks_suffice() -> None:
    """The new M replaces the old one: untrained clients of rank >= rank(M) give M back,
    a client of smaller rank gives its truncation."""
    method = get_method("flexlora", weighting="uniform")
    spec = AdapterSpec({"m": (20, 15)}, rank=4, alpha=8, seed=2)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(spec)
    state = method.aggregate(state, [_train(method, state, spec, gen, n=1, rank=r) for r in (2, 3)])
    m_old = dense(method.delta(state, "m"))
    assert state.factors["m"]["U"].shape[1] == 5
    same = [_train(method, state, spec, gen, n=1, rank=r, steps=0.0) for r in (5, 8)]
    assert close(dense(method.delta(method.aggregate(state, same), "m")), m_old)
    cut = [_train(method, state, spec, gen, n=1, rank=r, steps=0.0) for r in (2, 8)]
    trunc2 = dense((state.factors["m"]["U"][:, :2], state.factors["m"]["V"][:2]))
    new = method.aggregate(state, cut)
    assert close(dense(method.delta(new, "m")), 0.5 * trunc2 + 0.5 * m_old)
    err = method.aggregation_error(state, cut, new)["m"]
    assert abs(err - _tail(dense(method.delta(new, "m")), 2)) < 1e-5
    one = method.aggregate(state, same[:1])  # one client at a rank >= rank(M): no loss
    assert method.aggregation_error(state, same[:1], one)["m"] < 1e-5


def test_zero_updates_and_rtol_drop() -> None:
    method = get_method("flexlora")
    spec = AdapterSpec({"m": (5, 4)}, rank=2, alpha=2)
    state = method.init_state(spec)
    zero = ClientUpdate({"m": {"A": torch.zeros(2, 4), "B": torch.zeros(5, 2)}}, 3, 1.0)
    new = method.aggregate(state, [zero, zero])
    assert new.factors["m"]["U"].shape == (5, 0) and new.factors["m"]["V"].shape == (0, 4)
    assert method.aggregation_error(state, [zero], new)["m"] == 0.0
    # Two clients with the same A: rank 2, not 4 (the zero singular values are dropped).
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, generator=gen)
    ups = [ClientUpdate({"m": {"A": a, "B": torch.randn(5, 2, generator=gen)}}, 1, 1.0)
           for _ in range(2)]
    assert method.aggregate(state, ups).factors["m"]["U"].shape == (5, 2)


# ------------------------------------------------------------------------------ downlink, client


def test_round_one_is_plain_lora_and_padding_is_kaiming() -> None:
    method = get_method("flexlora")
    spec = AdapterSpec({"q": (6, 5), "v": (4, 7)}, rank=2, alpha=4, seed=7)
    state = method.init_state(spec)
    assert not dense(method.delta(state, "q")).any()
    for r in (1, 3, 9):
        start = method.client_start(method.downlink(state, rank=r), spec, rank=r, seed=5)
        assert start.rank == r and start.scaling == 4 / r and start.base_delta == {}
        assert start.trainable == ("A", "B")
        for m, (d_out, d_in) in spec.shapes.items():
            assert torch.equal(start.init[m]["A"], shared_a(7, m, r, d_in))
            assert torch.equal(start.init[m]["B"], torch.zeros(d_out, r))
    # M of rank 1 sent to a rank-3 client: the first row is M's, the rest pad (B columns 0).
    gen = torch.Generator().manual_seed(3)
    state = method.aggregate(state, [_train(method, state, spec, gen, n=1, rank=1)])
    down = method.downlink(state, rank=3)
    again = method.downlink(state, rank=3)  # deterministic: every client of rank 3 agrees
    assert all(torch.equal(down[m][k], again[m][k]) for m in down for k in "AB")
    for m, (_, d_in) in spec.shapes.items():
        b, a = down[m]["B"], down[m]["A"]
        assert torch.equal(a[1:], shared_a(7, m, 3, d_in)[1:]) and not b[:, 1:].any()
        assert close(4 / 3 * dense((b, a)), dense(method.delta(state, m)))
        # Balanced split: ||B|| = ||A|| on M's part.
        assert abs(float(b[:, 0].norm() - a[0].norm())) < 1e-5 * (1 + float(a[0].norm()))


def test_client_start_is_fresh_and_checks_the_rank() -> None:
    method = get_method("flexlora")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(spec)
    state = method.aggregate(state, [_train(method, state, spec, gen, n=1, rank=3)])
    before = copy.deepcopy(state)
    start = method.client_start(method.downlink(state, rank=2), spec, rank=2)
    for t in start.init["q"].values():
        t.add_(1.0)  # fresh tensors: the server state is untouched
    assert all(torch.equal(state.tensors()[k], t) for k, t in before.tensors().items())
    assert method.client_start(method.downlink(state), spec).rank == 2  # rank None: spec.rank
    with pytest.raises(ValueError, match="rank-3"):
        method.client_start(method.downlink(state, rank=2), spec, rank=3)
    with pytest.raises(ValueError, match="rank"):
        method.client_start(method.downlink(state, rank=2), spec, rank=0)
    with pytest.raises(ValueError, match="rank"):
        method.downlink(state, rank=0)
    with pytest.raises(ValueError, match="lacks"):
        method.client_start({"q": {"A": torch.zeros(2, 5)}}, spec)


# ------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_floats_match_the_tensors_sent(wire: str) -> None:
    method = get_method("flexlora")
    spec = AdapterSpec({"q": (40, 24), "mlp": (16, 48), "o": (50, 60)}, rank=3, alpha=6)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(0)
    ranks = (1, 4, 30)  # 30 > min(d_out, d_in) of "mlp": padded, never sent short
    for rnd in range(1, 4):
        updates = [_train(method, state, spec, gen, n=1 + i, rank=r) for i, r in enumerate(ranks)]
        for u, r in zip(updates, ranks, strict=True):
            for m, (d_out, d_in) in spec.shapes.items():
                assert sum(t.numel() for t in u.factors[m].values()) == \
                    method.uplink_floats(d_out, d_in, r, round=rnd) == r * (d_in + d_out)
        state = method.aggregate(state, updates)
        for r in ranks:
            down = method.downlink(state, rank=r, first_contact=rnd == 1)
            total = 0
            for m, (d_out, d_in) in spec.shapes.items():
                assert set(down[m]) == set(method.downlink_roles)
                sent = sum(t.numel() for t in down[m].values())
                assert sent == method.downlink_floats(d_out, d_in, r, num_clients=3, round=rnd)
                assert sent == r * (d_in + d_out)
                total += sent
            data = encode(Envelope("flexlora", rnd, "down", down), wire)
            assert payload_bytes(data) == total * SIZE[wire]
    assert method.downlink_floats(64, 32, 4) == method.uplink_floats(64, 32, 4) == 4 * 96


# ------------------------------------------------------------------------------ options, state


def test_options_and_client_rank() -> None:
    method = get_method("flexlora", ranks=[2, 6])
    spec = AdapterSpec({"m": (4, 4)}, rank=4, alpha=8)
    assert [method.client_rank(spec, k) for k in range(3)] == [2, 6, 2]
    assert method.client_rank(spec, 0, declared=5) == 5  # the node's own budget wins
    assert method.per_client_rank and not method.exact and method.server_step_roles == ()
    for options in ({"ranks": []}, {"ranks": [0]}, {"ranks": [2.5]}, {"ranks": [True]},
                    {"ranks": "4"}, {"rtol": 1.0}, {"rtol": -0.1}, {"rtol": True},
                    {"compress": True}, {"weighting": "median"}):
        with pytest.raises(ValueError):
            get_method("flexlora", **options)


def test_state_round_trip_heads_and_inputs_untouched() -> None:
    method = get_method("flexlora")
    spec = AdapterSpec({"a.q": (7, 5), "a.v": (3, 6)}, rank=2, alpha=4, seed=3)
    state = method.init_state(spec, head={"h": torch.ones(2), "g": torch.zeros(1)})
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        updates = [_train(method, state, spec, gen, n=n, rank=r, head={"h": torch.full((2,), h)})
                   for n, r, h in ((1, 1, 1.0), (3, 4, 5.0))]
        before_u, before_s = copy.deepcopy(updates), copy.deepcopy(state)
        new = method.aggregate(state, updates)
        for u, v in zip(updates, before_u, strict=True):
            assert all(torch.equal(u.factors[m][k], v.factors[m][k]) for m in u.factors for k in "AB")
        assert all(torch.equal(state.tensors()[k], t) for k, t in before_s.tensors().items())
        assert torch.allclose(new.head["h"], torch.full((2,), 4.0))
        assert torch.equal(new.head["g"], torch.zeros(1))  # not sent: kept
        again = method.aggregate(state, updates)
        assert all(torch.equal(again.tensors()[k], t) for k, t in new.tensors().items())
        state = new
    flat = safetensors.torch.load(safetensors.torch.save(state.tensors()))
    back = GlobalState.from_tensors(state.round, flat, json.loads(json.dumps(state.meta)))
    assert all(torch.equal(back.tensors()[k], t) for k, t in state.tensors().items())
    assert back.meta["options"] == {"ranks": [4, 8, 16], "rtol": 1e-6}


def test_bad_updates_rejected() -> None:
    method = get_method("flexlora")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    good = _train(method, state, spec, torch.Generator().manual_seed(0), n=3, rank=3)
    bad = copy.deepcopy(good)
    bad.factors["q"]["B"] = torch.zeros(6, 2)  # B's rank differs from A's
    with pytest.raises(ValueError, match="shape"):
        method.aggregate(state, [bad])
    bad = copy.deepcopy(good)
    bad.scaling = float("nan")
    with pytest.raises(ValueError, match="scaling"):
        method.aggregate(state, [bad])
    with pytest.raises(ValueError, match="made by method"):
        get_method("flora").aggregate(state, [good])
    with pytest.raises(ValueError, match="empty"):
        method.aggregate(state, [])


def test_large_module_stays_factored() -> None:
    """20000 x 20000 (a dense float64 M would be 3.2 GB): the stack's QR route is cheap."""
    method = get_method("flexlora")
    spec = AdapterSpec({"big": (20000, 20000)}, rank=2, alpha=4)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(spec)
    updates = [_train(method, state, spec, gen, n=1, rank=r) for r in (2, 3)]
    new = method.aggregate(state, updates)
    assert new.factors["big"]["U"].shape == (20000, 5)
    assert method.aggregation_error(state, updates, new)["big"] > 0


def test_real_adapter_holds_the_truncation() -> None:
    """Through task.adapters: a rank-r_k client's PEFT layer holds W0 + trunc_{r_k}(M)."""
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.models import build_model, head_parameter_names, target_module_names

    tiny = {"source": "tiny_bert", "task": "classification", "max_length": 16, "hidden_size": 32,
            "num_layers": 2, "num_heads": 2, "vocab_size": 128, "init_seed": 0}
    model = build_model(tiny, 4)
    targets = target_module_names(model, ["query", "value"])
    host = AdapterHost(model, targets, head_parameter_names(model, ["classifier"]), "lora")
    w0 = {n: w.double() for n, w in host.w0.items()}
    method = get_method("flexlora")
    spec = AdapterSpec(shapes=host.shapes(), rank=4, alpha=8)
    state = method.init_state(spec, host.head_state())
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        state = method.aggregate(state, [_train(method, state, spec, gen, n=n, rank=r)
                                         for n, r in ((3, 2), (1, 4), (2, 8))])
    for r in (2, 8, 20):
        start = method.client_start(method.downlink(state, rank=r), spec, rank=r)
        host.start(start, state.head)
        factors = host.factors(("A", "B"))
        for n in targets:
            u, v = method.delta(state, n)
            held = host.linears[n].weight.double() + start.scaling * dense(
                (factors[n]["B"], factors[n]["A"]))
            assert close(held, w0[n] + dense((u[:, :r], v[:r])))
