"""Fed-SB's sketched init round: linear sketches that add up across clients, a recovered
top-r factorization within a stated tolerance of the dense one, the uplink within
4 r (d_in + d_out) floats per module in every wire dtype, and the full-G path kept."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregation import AdapterSpec, ClientUpdate, FedSB, get_method
from fedlora.aggregation.linalg import sketch, sketch_low_rank, sketch_test_matrices
from fedlora.protos import Envelope, Expectation, UpdateRejected, decode, encode, payload_bytes

SPEC = AdapterSpec({"q": (300, 200), "v": (64, 48), "tiny": (6, 5)}, rank=4, alpha=8, seed=3)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def low_rank(d_out: int, d_in: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """A rank-r matrix with singular values 10, 6, 3, 1.5, ... (float64)."""
    u = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))[0]
    s = 10.0 * 0.5 ** torch.arange(r, dtype=torch.float64) + 0.5
    return (u * s) @ v.T


def noisy_clients(noise: float, gen: torch.Generator, clients: int = 3
                  ) -> list[dict[str, torch.Tensor]]:
    """Per client and module: a shared rank-r signal plus noise of ``noise`` times its norm."""
    signal = {m: low_rank(d_out, d_in, min(SPEC.rank, d_out, d_in), gen)
              for m, (d_out, d_in) in SPEC.shapes.items()}
    out = []
    for _ in range(clients):
        grads = {}
        for m, g in signal.items():
            n = torch.randn(g.shape, generator=gen, dtype=torch.float64)
            grads[m] = (g + noise * n / n.norm() * g.norm()).float()
        out.append(grads)
    return out


def updates_of(method: FedSB, grads: list[dict[str, torch.Tensor]]) -> list[ClientUpdate]:
    return [ClientUpdate(method.client_init_payload(g, SPEC), num_examples=10 + 7 * i,
                         scaling=SPEC.scaling) for i, g in enumerate(grads)]


def mean_gradient(grads: list[dict[str, torch.Tensor]], ups: list[ClientUpdate], m: str
                  ) -> torch.Tensor:
    p = get_method("fedsb").weights(ups)
    return sum(pk * g[m].double() for pk, g in zip(p, grads, strict=True))


def top_r(g: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_sketch_roles_sizes_and_shared_test_matrices() -> None:
    method = get_method("fedsb")
    assert method.init_round_roles == ("Y", "W")
    assert get_method("fedsb", init_sketch=False).init_round_roles == ("G",)
    # k = 2 r, l = 2 k, both capped by the module (k <= min(d_out, d_in), k <= l <= d_out).
    assert method.sketch_sizes(300, 200, 4) == (8, 16)
    assert method.sketch_sizes(6, 5, 4) == (5, 6)
    assert FedSB(sketch_range=5, sketch_corange=7).sketch_sizes(300, 200, 4) == (5, 7)
    shapes = method.init_round_shapes(SPEC)
    payload = method.client_init_payload(
        {m: torch.ones(s) for m, s in SPEC.shapes.items()}, SPEC)
    assert {m: {r: tuple(t.shape) for r, t in f.items()} for m, f in payload.items()} == shapes
    # Public, regenerated bit-identically, distinct per module.
    a = sketch_test_matrices(SPEC.seed, "q", 300, 200, 8, 16)
    b = sketch_test_matrices(SPEC.seed, "q", 300, 200, 8, 16)
    c = sketch_test_matrices(SPEC.seed, "v", 300, 200, 8, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("direction", ["sign", "gradient"])
def test_sketch_of_the_sum_is_the_sum_of_the_sketches(direction: str) -> None:
    """Linear: sum_k p_k sketch(G_k) = sketch(sum_k p_k G_k), so secure aggregation (which
    releases only the sum) and the per-update path give the same init."""
    method = FedSB(sketch_direction=direction)
    gen = torch.Generator().manual_seed(0)
    grads = noisy_clients(0.2, gen)
    ups = updates_of(method, grads)
    p = method.weights(ups)
    of_mean = method.client_init_payload(
        {m: sum(pk * g[m] for pk, g in zip(p, grads, strict=True)) for m in SPEC.shapes}, SPEC)
    for m in SPEC.shapes:
        for r in ("Y", "W"):
            summed = sum(pk * u.factors[m][r] for pk, u in zip(p, ups, strict=True))
            torch.testing.assert_close(summed, of_mean[m][r], rtol=1e-5, atol=1e-5)
    mean = ClientUpdate(of_mean, num_examples=1, scaling=SPEC.scaling)
    a, b = method.init_from_updates(SPEC, ups), method.init_from_updates(SPEC, [mean])
    for m in SPEC.shapes:
        got_a = a.factors[m]["B"] @ a.factors[m]["R"] @ a.factors[m]["A"]
        got_b = b.factors[m]["B"] @ b.factors[m]["R"] @ b.factors[m]["A"]
        # sign(Ghat) may flip where Ghat is within rounding of 0: compare in norm.
        assert float((got_a - got_b).norm()) <= 1e-3 * float(got_b.norm())


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.1, 0.3])
def test_recovered_factorization_is_close_to_the_dense_top_r_svd(noise: float) -> None:
    """Stated tolerance: ||[[Q X]]_r - G_r||_F <= 3 ||G - G_r||_F + 1e-5 ||G_r||_F (the
    single-pass bound with k = 2 r, l = 2 k is about 1.8 x the tail; measured <= 2.3 x),
    and exact (to float) on a module small enough that k = min(d_out, d_in)."""
    method = get_method("fedsb")
    gen = torch.Generator().manual_seed(1)
    grads = noisy_clients(noise, gen)
    ups = updates_of(method, grads)
    p = method.weights(ups)
    for m in SPEC.shapes:
        g = mean_gradient(grads, ups, m)
        r = SPEC.rank
        want = top_r(g, r)
        y = sum(pk * u.factors[m]["Y"].double() for pk, u in zip(p, ups, strict=True))
        w = sum(pk * u.factors[m]["W"].double() for pk, u in zip(p, ups, strict=True))
        _, psi = method._test_matrices(SPEC, m)
        u_r, s_r, v_r = sketch_low_rank(y, w, psi, r)
        got = (u_r * s_r) @ v_r.T
        err, tail = float((got - want).norm()), float((g - want).norm())
        if m == "tiny":  # k = min(d_out, d_in): the sketch determines G
            assert err <= 1e-5 * float(want.norm())
        else:
            assert err <= 3.0 * tail + 1e-5 * float(want.norm()), (m, err, tail)


def test_gradient_direction_is_the_rank_r_truncation_of_the_normalized_step() -> None:
    """sketch_direction=gradient: s B R0 A = -c [[Gbar]]_r with c = lr sqrt(d_out d_in) / ||Gbar||_F, ||Gbar||_F^2
    estimated as (||Ybar||^2 + ||Wbar||^2) / (k + l); B, A orthonormal, R0 diagonal."""
    method, lr = FedSB(init_lr=0.01, sketch_direction="gradient"), 0.01
    gen = torch.Generator().manual_seed(2)
    grads = noisy_clients(0.0, gen)  # rank r <= k: the recovery is exact
    ups = updates_of(method, grads)
    state = method.init_from_updates(SPEC, ups)
    assert state.meta["init"] == "sketch" and state.round == 0
    p = method.weights(ups)
    for m, (d_out, d_in) in SPEC.shapes.items():
        g = mean_gradient(grads, ups, m)
        y = sum(pk * u.factors[m]["Y"].double() for pk, u in zip(p, ups, strict=True))
        w = sum(pk * u.factors[m]["W"].double() for pk, u in zip(p, ups, strict=True))
        norm = math.sqrt(float(y.square().sum() + w.square().sum()) / (y.shape[1] + w.shape[0]))
        # The estimate is unbiased; for these shapes it lands within 35% of the truth.
        assert 0.65 < norm / float(g.norm()) < 1.35
        want = -lr * math.sqrt(d_out * d_in) / norm * top_r(g, SPEC.rank)
        f = {k: t.double() for k, t in state.factors[m].items()}
        got = SPEC.scaling * f["B"] @ f["R"] @ f["A"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        assert torch.equal(f["R"], torch.diag(torch.diagonal(f["R"])))
        k = min(SPEC.rank, d_out, d_in)
        eye = torch.diag((torch.arange(SPEC.rank) < k).double())
        torch.testing.assert_close(f["B"].T @ f["B"], eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(f["A"] @ f["A"].T, eye, atol=1e-5, rtol=0)


def test_sign_direction_is_the_full_g_init_when_the_gradient_has_rank_at_most_k() -> None:
    """The default: dW = -lr sign(Ghat); Ghat = Gbar when rank(Gbar) <= k, so the init is
    the full-G path's (up to signs of entries within rounding of 0), with noise close."""
    sketched, full = get_method("fedsb"), get_method("fedsb", init_sketch=False)
    for noise, tol in ((0.0, 1e-3), (0.05, 0.15)):
        grads = noisy_clients(noise, torch.Generator().manual_seed(6))
        a = sketched.init_from_updates(SPEC, updates_of(sketched, grads))
        b = full.init_from_updates(SPEC, updates_of(full, grads))
        assert a.meta["init"] == "sketch" and b.meta["init"] == "gradients"
        for m in SPEC.shapes:
            da = a.factors[m]["B"] @ a.factors[m]["R"] @ a.factors[m]["A"]
            db = b.factors[m]["B"] @ b.factors[m]["R"] @ b.factors[m]["A"]
            assert float((da - db).norm()) <= tol * float(db.norm()), (noise, m)


@pytest.mark.parametrize("direction", ["sign", "gradient"])
def test_zero_sketches_fall_back_to_the_random_init(direction: str) -> None:
    method = FedSB(sketch_direction=direction)
    zero = {m: torch.zeros(s) for m, s in SPEC.shapes.items()}
    state = method.init_from_updates(SPEC, updates_of(method, [zero]))
    rand = method.init_state(SPEC)
    for m in SPEC.shapes:
        assert all(torch.equal(state.factors[m][k], rand.factors[m][k]) for k in "BAR")


@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize(("shape", "rank"), [((384, 384), 16), ((1536, 384), 8),
                                             ((384, 1536), 8), ((300, 200), 4)])
def test_init_uplink_bytes_meet_the_target(wire: str, shape: tuple[int, int], rank: int) -> None:
    """Bytes on the wire = itemsize (k d_out + l d_in) <= itemsize 4 r (d_in + d_out)."""
    d_out, d_in = shape
    spec = AdapterSpec({"m": shape}, rank=rank, alpha=2.0 * rank)
    method = get_method("fedsb")
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    env = Envelope(method="fedsb", round=0, direction="up",
                   factors=method.client_init_payload({"m": g}, spec))
    data = encode(env, wire)
    floats = method.init_uplink_floats(d_out, d_in, rank)
    assert payload_bytes(data) == ITEMSIZE[wire] * floats
    assert floats <= 4 * rank * (d_in + d_out)
    full = get_method("fedsb", init_sketch=False)
    env_g = Envelope(method="fedsb", round=0, direction="up",
                     factors=full.client_init_payload({"m": g}, spec))
    assert payload_bytes(encode(env_g, wire)) == ITEMSIZE[wire] * d_out * d_in
    assert full.init_uplink_floats(d_out, d_in, rank) == d_out * d_in
    # The server's gate accepts the sketch roles and rejects a wrong side.
    expect = Expectation(method="fedsb", round=0, shapes={"m": shape}, roles=("Y", "W"))
    back = decode(data, expect)
    assert {r: tuple(t.shape) for r, t in back.factors["m"].items()} == \
        method.init_round_shapes(spec)["m"]
    bad = Envelope(method="fedsb", round=0, direction="up",
                   factors={"m": {"Y": torch.zeros(d_out + 1, 3), "W": torch.zeros(3, d_in)}})
    with pytest.raises(UpdateRejected, match="wrong_shape"):
        decode(encode(bad), expect)


def test_llama_shapes_meet_the_target_without_tensors() -> None:
    """Llama-7B modules at r 16: 2 r d_out + 4 r d_in floats, vs d_out d_in for G."""
    method = get_method("fedsb")
    for d_out, d_in in ((4096, 4096), (11008, 4096), (4096, 11008)):
        floats = method.init_uplink_floats(d_out, d_in, 16)
        assert floats == 32 * d_out + 64 * d_in <= 4 * 16 * (d_in + d_out)
        assert floats * 40 < d_out * d_in


def test_full_gradient_path_is_still_available() -> None:
    """init_sketch=false: G goes up and the init is today's sign init."""
    method = get_method("fedsb", init_sketch=False)
    gen = torch.Generator().manual_seed(4)
    grads = noisy_clients(0.3, gen)
    ups = updates_of(method, grads)
    assert all(set(u.factors[m]) == {"G"} for u in ups for m in SPEC.shapes)
    a = method.init_from_updates(SPEC, ups)
    b = method.init_from_gradients(SPEC, ups, lr=method.options["init_lr"])
    assert a.meta["init"] == "gradients"
    assert all(torch.equal(a.factors[m][k], b.factors[m][k]) for m in SPEC.shapes for k in "BAR")
    with pytest.raises(ValueError, match="Y of shape"):
        get_method("fedsb").init_from_updates(SPEC, ups)


def test_sketch_options_are_checked() -> None:
    with pytest.raises(ValueError, match="init_sketch"):
        FedSB(init_sketch="yes")
    with pytest.raises(ValueError, match="sketch_corange"):
        FedSB(sketch_range=8, sketch_corange=4)
    with pytest.raises(ValueError, match="sketch_range"):
        FedSB(sketch_range=-1)
    with pytest.raises(ValueError, match="sketch_direction"):
        FedSB(sketch_direction="adam")


def test_sketch_is_linear_on_any_device_dtype() -> None:
    """sketch() keeps G's dtype (float64 in, float64 out) and matches the plain products."""
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    omega, psi = sketch_test_matrices(0, "x", 30, 20, 4, 8)
    y, w = sketch(g, omega, psi)
    assert y.dtype == w.dtype == torch.float64
    torch.testing.assert_close(y, g @ omega.double())
    torch.testing.assert_close(w, psi.double() @ g)
