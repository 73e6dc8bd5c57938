"""Property tests of the aggregation math: exactness, FedAvg's error, FFA's shared A, Fed-SB init."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.aggregation import (
    AdapterSpec,
    ClientUpdate,
    FedSB,
    GlobalState,
    Method,
    get_method,
    shared_a,
)

from .contract.helpers import close, dense, scenarios, train, weights

FAST = settings(max_examples=15, deadline=None)


# ------------------------------------------------------------------------------ helpers


def make(name: str, sc: dict) -> Method:
    options: dict = {}
    if name == "fedsvd":
        options["period"] = sc["period"]
    if name == "flora":
        options["compress"] = sc["compress"]
    return get_method(name, weighting=sc["weighting"], **options)


# ------------------------------------------------------------------------------ exactness


# Every method's declared exactness (default options) is in tests/contract/test_math.py;
# here the options and the init that change an exact method's path (FedSVD's period,
# FLoRA's compression, Fed-SB's gradient init): specific to these three methods.
@pytest.mark.parametrize("name", ["fedsvd", "flora", "fedsb"])
@FAST
@given(sc=scenarios())
def test_exact_with_options_and_gradient_init(name: str, sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = make(name, sc)
    state = method.init_state(spec)
    if name == "fedsb" and sc["compress"]:  # (a spare coin) start from the LoRA-SB init
        state = method.init_from_gradients(spec, _grad_updates(spec, gen, sc["examples"]), lr=0.1)
    for _ in range(sc["rounds"]):
        updates = [
            train(method, state, spec, gen, n=n, rank=r if name == "flora" else None, seed=i)
            for i, (n, r) in enumerate(zip(sc["examples"], sc["ranks"], strict=True))
        ]
        new = method.aggregate(state, updates)
        assert new.round == state.round + 1
        assert method.aggregation_error(state, updates, new) is None
        for m in spec.shapes:
            want = sum(
                p * dense(method.client_delta(state, u, m))
                for p, u in zip(weights(sc), updates, strict=True)
            )
            assert close(dense(method.delta(new, m)), want), m
        state = new


@FAST
@given(sc=scenarios())
def test_fedsvd_refactorizes_every_period_rounds(sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = make("fedsvd", sc)
    state = method.init_state(spec)
    for _ in range(sc["rounds"] + 1):
        updates = [train(method, state, spec, gen, n=n) for n in sc["examples"]]
        new = method.aggregate(state, updates)
        p = weights(sc)
        for m, (_, d_in) in spec.shapes.items():
            a, b = new.factors[m]["A"], new.factors[m]["B"]
            assert a.shape == (spec.rank, d_in) and a.is_contiguous()
            if spec.rank <= d_in:  # orthonormal rows exist only then
                assert close(a.double() @ a.double().T, torch.eye(spec.rank, dtype=torch.float64))
            b_bar = sum(pk * u.factors[m]["B"].double() for pk, u in zip(p, updates, strict=True))
            if new.round % sc["period"]:
                assert torch.equal(a, state.factors[m]["A"])
                assert close(b.double(), b_bar)
            else:
                assert close(b.double() @ a.double(), b_bar @ state.factors[m]["A"].double())
        state = new


def test_fedsvd_orthonormal_rows_from_generic_b() -> None:
    method = get_method("fedsvd")
    spec = AdapterSpec({"m": (40, 30)}, rank=6, alpha=12)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(0)
    updates = [train(method, state, spec, gen, n=n) for n in (3, 5, 9)]
    a = method.aggregate(state, updates).factors["m"]["A"].double()
    assert torch.allclose(a @ a.T, torch.eye(6, dtype=torch.float64), atol=1e-6)


def test_flora_heterogeneous_ranks_and_skipping_client() -> None:
    """A client that skipped rounds gets exactly the merged weights from the downlink."""
    method = get_method("flora")
    spec = AdapterSpec({"q": (12, 10), "v": (8, 14)}, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(1)
    state = method.init_state(spec)
    truth = {m: torch.zeros(s, dtype=torch.float64) for m, s in spec.shapes.items()}
    ranks = {"a": 1, "b": 2, "c": 5}
    for rnd, nodes in enumerate([("a", "b", "c"), ("b",), ("b", "c"), ("a", "b")]):
        updates = [
            train(method, state, spec, gen, n=10 + i, rank=ranks[node], seed=rnd, node=node)
            for i, node in enumerate(nodes)
        ]
        total = sum(u.num_examples for u in updates)
        for m in spec.shapes:
            truth[m] += sum(
                u.num_examples / total * u.scaling * dense((u.factors[m]["B"], u.factors[m]["A"]))
                for u in updates
            )
        state = method.aggregate(state, updates)
        # Client "a" sat out rounds 2 and 3: whatever it missed, it loads the full delta.
        start = method.client_start(method.downlink(state), spec, rank=ranks["a"], seed=99)
        assert start.rank == 1 and start.scaling == spec.alpha / 1
        for m in spec.shapes:
            assert close(dense(start.base_delta[m]), truth[m])
            assert close(dense(method.delta(state, m)), truth[m])
            assert torch.equal(start.init[m]["B"], torch.zeros(spec.shapes[m][0], 1))
    # Accumulated rank is capped at min(d_out, d_in) by exact compression.
    assert state.factors["q"]["B"].shape[1] <= 10 and state.factors["v"]["A"].shape[0] <= 8


def test_flora_fresh_a_is_seeded_per_client() -> None:
    method = get_method("flora")
    spec = AdapterSpec({"q": (12, 10)}, rank=4, alpha=8)
    down = method.downlink(method.init_state(spec))
    a = [method.client_start(down, spec, rank=3, seed=s).init["q"]["A"] for s in (1, 1, 2)]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2]) and a[0].shape == (3, 10)


def test_flora_compress_keeps_smallest_exact_form() -> None:
    method = get_method("flora", compress=True)
    spec = AdapterSpec({"m": (30, 20)}, rank=3, alpha=3)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(2)
    # Two clients with the same A_k: the stacked delta has rank 3, not 6.
    u1 = train(method, state, spec, gen, n=1)
    u2 = copy.deepcopy(u1)
    u2.factors["m"]["B"] = torch.randn(30, 3, generator=gen)
    new = method.aggregate(state, [u1, u2])
    assert new.factors["m"]["B"].shape == (30, 3)
    want = 0.5 * dense((u1.factors["m"]["B"] + u2.factors["m"]["B"], u1.factors["m"]["A"]))
    assert close(dense(method.delta(new, "m")), want)


def test_flora_zero_updates_compress_to_rank_zero() -> None:
    method = get_method("flora", compress=True)
    spec = AdapterSpec({"m": (5, 4)}, rank=2, alpha=2)
    state = method.init_state(spec)
    u = ClientUpdate({"m": {"A": torch.zeros(2, 4), "B": torch.zeros(5, 2)}}, 3, 1.0)
    new = method.aggregate(state, [u])
    assert new.factors["m"]["B"].shape == (5, 0) and new.factors["m"]["A"].shape == (0, 4)


# ------------------------------------------------------------------------------ fedavg


@FAST
@given(sc=scenarios())
def test_fedavg_aggregation_error_equals_dense(sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = make("fedavg", sc)
    state = method.init_state(spec)
    updates = [train(method, state, spec, gen, n=n) for n in sc["examples"]]
    new = method.aggregate(state, updates)
    err = method.aggregation_error(state, updates, new)
    assert err is not None and set(err) == set(spec.shapes)
    for m in spec.shapes:
        p = weights(sc)
        a_bar = sum(pk * u.factors[m]["A"].double() for pk, u in zip(p, updates, strict=True))
        b_bar = sum(pk * u.factors[m]["B"].double() for pk, u in zip(p, updates, strict=True))
        assert close(new.factors[m]["A"].double(), a_bar)
        assert close(new.factors[m]["B"].double(), b_bar)
        mean = sum(
            pk * dense(method.client_delta(state, u, m)) for pk, u in zip(p, updates, strict=True)
        )
        want = float(torch.linalg.matrix_norm(mean - dense(method.delta(new, m))))
        assert abs(err[m] - want) <= 1e-5 * (1 + want) + 1e-4 * float(mean.norm())


def test_fedavg_is_inexact_for_generic_clients() -> None:
    method = get_method("fedavg")
    spec = AdapterSpec({"m": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(3)
    updates = [train(method, state, spec, gen, n=n) for n in (1, 2)]
    assert method.aggregation_error(state, updates, method.aggregate(state, updates))["m"] > 1e-3
    # One client: averaging is trivially exact.
    one = method.aggregate(state, updates[:1])
    assert method.aggregation_error(state, updates[:1], one)["m"] < 1e-5


# ------------------------------------------------------------------------------ ffa


def test_ffa_shared_a_is_bit_identical_and_seeded() -> None:
    a = shared_a(7, "model.layers.0.q_proj", 8, 64)
    assert torch.equal(a, shared_a(7, "model.layers.0.q_proj", 8, 64))
    assert not torch.equal(a, shared_a(8, "model.layers.0.q_proj", 8, 64))
    assert not torch.equal(a, shared_a(7, "model.layers.0.v_proj", 8, 64))
    assert float(a.abs().max()) <= 1 / 64**0.5  # PEFT's Kaiming-uniform bound 1/sqrt(d_in)
    torch.manual_seed(123)  # the global RNG must play no part
    assert torch.equal(a, shared_a(7, "model.layers.0.q_proj", 8, 64))

    method = get_method("ffa")
    spec = AdapterSpec({"model.layers.0.q_proj": (32, 64)}, rank=8, alpha=16, seed=7)
    state = method.init_state(spec)
    assert torch.equal(state.factors["model.layers.0.q_proj"]["A"], a)
    for rnd in range(2):
        start = method.client_start(method.downlink(state), spec, seed=rnd)
        assert torch.equal(start.init["model.layers.0.q_proj"]["A"], a)
        assert start.trainable == ("B",)
        gen = torch.Generator().manual_seed(rnd)
        state = method.aggregate(state, [train(method, state, spec, gen, n=1)])
        assert torch.equal(state.factors["model.layers.0.q_proj"]["A"], a)


def test_ffa_shared_a_golden_bits() -> None:
    """Pins the bits: clients on another machine or torch build must draw the same A.

    If this fails after a torch upgrade, FFA clients on different torch versions would
    silently disagree on A: pin torch across the federation or send A once.
    """
    a = shared_a(7, "model.layers.0.q_proj", 2, 8)
    digest = hashlib.sha256(a.numpy().tobytes()).hexdigest()
    assert digest == "bb9ce32cd8ac00e041448d70380b3c21ef5468dcf0ddd5c1101bdc5e10f7454f"


# ------------------------------------------------------------------------------ fedsb


def _grad_updates(spec: AdapterSpec, gen: torch.Generator, examples: list[int]) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            factors={m: {"G": torch.randn(s, generator=gen)} for m, s in spec.shapes.items()},
            num_examples=n, scaling=spec.scaling,
        )
        for n in examples
    ]


@settings(max_examples=20, deadline=None)
@given(sc=scenarios(max_dim=12), lr=st.sampled_from([1e-3, 0.1, 2.0]))
def test_fedsb_init_is_rank_r_truncation_of_sign_step(sc: dict, lr: float) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = make("fedsb", sc)
    updates = _grad_updates(spec, gen, sc["examples"])
    state = method.init_from_gradients(spec, updates, lr=lr)
    assert state.round == 0 and state.meta["init"] == "gradients"
    for m in spec.shapes:
        g_bar = sum(p * u.factors[m]["G"].double() for p, u in zip(weights(sc), updates, strict=True))
        u, s, vh = torch.linalg.svd(-lr * torch.sign(g_bar.float()).double(), full_matrices=False)
        k = min(spec.rank, s.numel())
        want = u[:, :k] * s[:k] @ vh[:k]
        got = dense(method.delta(state, m))
        if k < s.numel() and s[k - 1] - s[k] < 1e-6 * s[0]:
            continue  # degenerate gap: the truncation is not unique
        assert close(got, want, rtol=1e-4)
        f = state.factors[m]
        r = f["R"]
        assert torch.equal(r, torch.diag(torch.diagonal(r)))  # R0 diagonal
        assert close(f["B"].double().T @ f["B"].double(), torch.diag((torch.arange(spec.rank) < k).double()))


def test_fedsb_init_lowrank_path_large_module() -> None:
    """svd_lowrank path on a module whose sign matrix has exact rank r (block signs)."""
    d_out, d_in, r = 300, 200, 4
    spec = AdapterSpec({"m": (d_out, d_in)}, rank=r, alpha=8, seed=5)
    gen = torch.Generator().manual_seed(4)
    rows = torch.randint(0, r, (d_out,), generator=gen)
    cols = torch.randint(0, r, (d_in,), generator=gen)
    pattern = torch.tensor([[1.0, -1, 1, 1], [-1, 1, 1, -1], [1, 1, -1, 1], [1, -1, -1, -1]])
    magnitude = torch.rand(d_out, d_in, generator=gen) + 0.1
    g = pattern[rows][:, cols] * magnitude
    updates = [ClientUpdate({"m": {"G": g * c}}, n, spec.scaling) for c, n in ((1.0, 3), (2.0, 1))]
    method = FedSB(init_svd="lowrank")
    state = method.init_from_gradients(spec, updates, lr=0.01)
    want = -0.01 * torch.sign(g).double()
    assert close(dense(method.delta(state, "m")), want, rtol=1e-4)
    again = FedSB(init_svd="lowrank").init_from_gradients(spec, updates, lr=0.01)
    assert all(torch.equal(again.factors["m"][k], state.factors["m"][k]) for k in "BAR")


def test_fedsb_downlink_first_contact_and_client_start() -> None:
    method = get_method("fedsb")
    spec = AdapterSpec({"m": (6, 5)}, rank=3, alpha=6)
    state = method.init_state(spec)
    assert set(method.downlink(state)["m"]) == {"R"}
    assert set(method.downlink(state, first_contact=True)["m"]) == {"R", "B", "A"}
    start = method.client_start(method.downlink(state), spec)
    assert set(start.init["m"]) == {"R"} and start.trainable == ("R",)
    start = method.client_start(method.downlink(state, first_contact=True), spec)
    assert set(start.init["m"]) == {"R", "B", "A"}
    b = state.factors["m"]["B"].double()
    assert close(b.T @ b, torch.eye(3, dtype=torch.float64))


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "kwargs",
    [
        {"shapes": {}, "rank": 2, "alpha": 1.0},
        {"shapes": {"m": (3, 0)}, "rank": 2, "alpha": 1.0},
        {"shapes": {"m": (3,)}, "rank": 2, "alpha": 1.0},
        {"shapes": {"m": (3, 2.5)}, "rank": 2, "alpha": 1.0},
        {"shapes": {"m": (3, 4)}, "rank": 0, "alpha": 1.0},
        {"shapes": {"m": (3, 4)}, "rank": 2, "alpha": 0.0},
        {"shapes": {"m": (3, 4)}, "rank": 2, "alpha": float("nan")},
        {"shapes": {"a::b": (3, 4)}, "rank": 2, "alpha": 1.0},
        {"shapes": {"head": (3, 4)}, "rank": 2, "alpha": 1.0},
        {"shapes": {"": (3, 4)}, "rank": 2, "alpha": 1.0},
    ],
)
def test_bad_spec_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        AdapterSpec(**kwargs)


def test_spec_scaling_and_normalized_shapes() -> None:
    spec = AdapterSpec({"m": [3, 4]}, rank=4, alpha=8)  # type: ignore[dict-item]
    assert spec.scaling == 2.0 and spec.shapes == {"m": (3, 4)}


@pytest.mark.parametrize(
    "name, options",
    [("fedavg", {"period": 2}), ("fedsvd", {"period": 0}), ("fedsvd", {"period": 1.5}),
     ("flora", {"rtol": 2.0}), ("flora", {"compress": "yes"}), ("fedsb", {"init_svd": "x"}),
     ("ffa", {"weighting": "median"})],
)
def test_bad_options_rejected(name: str, options: dict) -> None:
    with pytest.raises(ValueError):
        get_method(name, **options)


def test_flora_and_fedsb_specific_rejections() -> None:
    flora = get_method("flora")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    down = flora.downlink(flora.init_state(spec))
    with pytest.raises(ValueError, match="rank"):
        flora.client_start(down, spec, rank=0)
    with pytest.raises(ValueError, match="delta"):
        flora.client_start({"q": {"B": torch.zeros(6, 1), "A": torch.zeros(2, 5)}}, spec)
    fedsb = FedSB()
    g = [ClientUpdate({"q": {"G": torch.ones(6, 5)}}, 1, 2.0)]
    with pytest.raises(ValueError, match="lr"):
        fedsb.init_from_gradients(spec, g, lr=0.0)
    with pytest.raises(ValueError, match="G of shape"):
        fedsb.init_from_gradients(spec, [ClientUpdate({"q": {"G": torch.ones(5, 6)}}, 1, 2.0)], lr=1)
    with pytest.raises(ValueError, match="empty"):
        fedsb.init_from_gradients(spec, [], lr=1.0)


def test_from_tensors_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        GlobalState.from_tensors(0, {"noseparator": torch.zeros(1)}, {})
    with pytest.raises(ValueError):
        GlobalState.from_tensors(0, {"m::Z": torch.zeros(1)}, {})


def test_flora_alpha_per_rank_gives_every_rank_the_same_scaling() -> None:
    spec = AdapterSpec(shapes={"m": (6, 5)}, rank=8, alpha=16)
    down = get_method("flora").downlink(get_method("flora").init_state(spec))
    plain, per_rank = get_method("flora"), get_method("flora", alpha_per_rank=True)
    assert [plain.client_start(down, spec, rank=r).scaling for r in (4, 8, 16)] == [4, 2, 1]
    assert [per_rank.client_start(down, spec, rank=r).scaling for r in (4, 8, 16)] == [2, 2, 2]
    # Still exact: the stack folds each update's own scaling.
    gen = torch.Generator().manual_seed(0)
    state = per_rank.init_state(spec)
    updates = [train(per_rank, state, spec, gen, n=n, rank=r, seed=r)
               for n, r in ((10, 4), (30, 16))]
    new = per_rank.aggregate(state, updates)
    want = sum(p * dense(per_rank.client_delta(state, u, "m"))
               for p, u in zip((0.25, 0.75), updates, strict=True))
    assert close(dense(per_rank.delta(new, "m")), want)
