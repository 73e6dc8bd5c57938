"""The secure-aggregation protocol core (task/secagg.py), with real crypto, n = 5, t = 3."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    generate_key_pairs,
    public_key_to_bytes,
)

from fedlora.task.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    dequantize_sum,
    mask_prg,
    quantize_vector,
)

PARAMS = SecAggParams(num_clients=5, threshold=3, clip_range=1.0, bits=8)
IDS = [11, 22, 33, 44, 55]


def _vectors(length: int = 64, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-1, 1, length) for i in IDS}


def _until_masked(vectors, *, reload: bool = False, skip_mask=()):
    """Stages 1-3; returns (server, clients, masked). ``reload`` stores each client as bytes
    between stages, as the Flower Context does."""
    server = SecAggServer(PARAMS, IDS)
    clients = {i: SecAggClient(PARAMS, i) for i in IDS}
    hop = (lambda c: SecAggClient.from_bytes(c.to_bytes())) if reload else (lambda c: c)
    keys = server.collect_public_keys({i: c.public_keys() for i, c in clients.items()})
    clients = {i: hop(c) for i, c in clients.items()}
    cts = {i: c.share_keys(keys) for i, c in clients.items()}
    clients = {i: hop(c) for i, c in clients.items()}
    inbox = server.route(cts)
    masked = {i: clients[i].masked_input(vectors[i], inbox[i]) for i in IDS if i not in skip_mask}
    clients = {i: hop(c) for i, c in clients.items()}
    return server, clients, masked


def _finish(server, clients, masked, *, skip_unmask=()):
    alive, gone = server.unmask_request(masked)
    shares = {i: clients[i].unmask_shares(alive, gone) for i in alive if i not in skip_unmask}
    return server.unmask(masked, shares)


def _check_sum(result, vectors, members):
    err = np.abs(result - sum(vectors[i] for i in members))
    bound = PARAMS.sum_error_bound(len(members))
    assert err.max() <= bound
    assert err.max() > 0  # stochastic rounding really happened: the bound is not vacuous
    assert err.mean() < bound / 2  # and unbiased rounding keeps the typical error well below


def test_no_dropout_recovers_the_sum_within_the_bound():
    vectors = _vectors()
    server, clients, masked = _until_masked(vectors)
    assert all(m.dtype == np.uint64 and int(m.max()) < PARAMS.modulus for m in masked.values())
    _check_sum(_finish(server, clients, masked), vectors, IDS)


def test_client_dropping_before_its_masked_input_is_left_out():
    vectors = _vectors(seed=1)
    server, clients, masked = _until_masked(vectors, skip_mask={33})
    assert server.unmask_request(masked) == ([11, 22, 44, 55], [33])
    _check_sum(_finish(server, clients, masked), vectors, [11, 22, 44, 55])


def test_client_dropping_before_unmasking_is_still_in_the_sum():
    vectors = _vectors(seed=2)
    server, clients, masked = _until_masked(vectors, skip_mask={55})
    _check_sum(_finish(server, clients, masked, skip_unmask={22}), vectors, [11, 22, 33, 44])


def test_fewer_than_t_survivors_releases_nothing():
    server, clients, masked = _until_masked(_vectors(), skip_mask={11, 22, 33})
    with pytest.raises(ValueError, match="2 survivors < threshold t = 3; nothing is released"):
        server.unmask_request(masked)
    with pytest.raises(ValueError, match="2 survivors < t = 3"):
        clients[44].unmask_shares([44, 55], [11, 22, 33])
    with pytest.raises(ValueError, match="survivors < threshold"):
        server.unmask(masked, {})


def test_fewer_than_t_shares_for_a_secret_is_an_error():
    server, clients, masked = _until_masked(_vectors())
    alive, gone = server.unmask_request(masked)
    shares = {i: clients[i].unmask_shares(alive, gone) for i in (11, 22)}
    with pytest.raises(ValueError, match="2 b-shares for client 11 < threshold"):
        server.unmask(masked, shares)


def test_client_refuses_both_shares_of_one_id_even_across_calls():
    server, clients, masked = _until_masked(_vectors(), skip_mask={55})
    with pytest.raises(ValueError, match=r"refuses: asked for both .* \[44\]"):
        clients[11].unmask_shares([11, 22, 33, 44], [44, 55])
    clients[11].unmask_shares([11, 22, 33, 44], [55])
    with pytest.raises(ValueError, match=r"refuses: asked for both .* \[44\]"):
        clients[11].unmask_shares([11, 22, 33], [44, 55])
    with pytest.raises(ValueError, match="must be a survivor"):
        clients[22].unmask_shares([11, 33, 44], [22, 55])


def test_masked_vector_is_uncorrelated_with_the_input_and_uniform():
    length = 4000
    vectors = {i: np.linspace(-1, 1, length) for i in IDS}  # strong structure to hide
    _, _, masked = _until_masked(vectors)
    m = PARAMS.modulus
    plain = quantize_vector(PARAMS, vectors[11]).astype(np.float64)
    for y in masked.values():
        r = np.corrcoef(y.astype(np.float64), plain)[0, 1]
        assert abs(r) < 0.1
        counts = np.bincount((y * 16 // m).astype(np.int64), minlength=16)
        expected = length / 16
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
        assert abs(y.mean() / m - 0.5) < 0.03


def test_mask_prg_uses_the_whole_seed():
    # Flower's pseudo_rand_gen XOR-folds its seed to 32 bits: these two seeds collide there.
    a = bytes(range(32))
    b = a[4:8] + a[:4] + a[8:]
    assert a != b
    flwr_a, flwr_b = (pseudo_rand_gen(s, 2**16, [(50,)])[0] for s in (a, b))
    assert np.array_equal(flwr_a, flwr_b)
    assert not np.array_equal(mask_prg(a, b"self", 50, 2**16), mask_prg(b, b"self", 50, 2**16))


def test_state_round_trips_as_json_between_stages():
    vectors = _vectors(seed=3)
    server, clients, masked = _until_masked(vectors, reload=True, skip_mask={22})
    data = clients[11].to_bytes()
    state = json.loads(data)  # plain JSON, not pickle
    assert state["format"] == "fedlora-secagg-client/1" and state["stage"] == "masked"
    assert state["s_sk"] is None and state["b_seed"] is None  # spent secrets are dropped
    assert SecAggClient.from_bytes(data).to_bytes() == data
    clients = {i: SecAggClient.from_bytes(c.to_bytes()) for i, c in clients.items()}
    _check_sum(_finish(server, clients, masked), vectors, [11, 33, 44, 55])
    with pytest.raises(ValueError, match="invalid state"):
        SecAggClient.from_bytes(pickle.dumps({"format": "fedlora-secagg-client/1"}))


def test_stages_must_run_in_order():
    client = SecAggClient(PARAMS, 11)
    with pytest.raises(RuntimeError, match="expected 'shared'"):
        client.masked_input(np.zeros(3), {})


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_clients=5, threshold=6, clip_range=1.0), "2 <= t <= num_clients=5"),
    (dict(num_clients=5, threshold=1, clip_range=1.0), "2 <= t <= num_clients=5"),
    (dict(num_clients=1, threshold=2, clip_range=1.0), "num_clients must be >= 2"),
    (dict(num_clients=5, threshold=3, clip_range=0.0), "clip_range must be a finite number > 0"),
    (dict(num_clients=5, threshold=3, clip_range=-1.0), "clip_range must be a finite number > 0"),
    (dict(num_clients=5, threshold=3, clip_range=float("inf")), "clip_range must be"),
    (dict(num_clients=5, threshold=3, clip_range=1.0, bits=1), r"bits must be in \[2, 44\]"),
    (dict(num_clients=5, threshold=3, clip_range=1.0, bits=45), r"bits must be in \[2, 44\]"),
    (dict(num_clients=5, threshold=3.0, clip_range=1.0), "threshold must be an int"),
    (dict(num_clients=2**10 + 1, threshold=3, clip_range=1.0, bits=43), "over float64's 53"),
])
def test_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SecAggParams(**kwargs)


def test_params_modulus_and_bound():
    assert PARAMS.modulus == 2 ** (8 + 3)  # ceil(log2 5) = 3
    assert PARAMS.modulus > 2 * PARAMS.num_clients * PARAMS.half_levels  # [-nL, nL] fits
    assert PARAMS.sum_error_bound(3) == pytest.approx(3 * 1.0 / 127 * (1 + 2.0 ** -44))


@pytest.mark.parametrize("bits", [8, 24, 40])
def test_quantized_sum_is_within_the_bound_and_zero_stays_zero(bits: int) -> None:
    """Stochastic rounding into [-L, L]: a sum of n vectors is within n steps of the true
    sum at every precision (also 40 bits, past Flower's int32 quantizer), negative and
    extreme values survive the two's complement, and exact zeros sum to exactly zero (a
    method that takes sign(mean) must not see +-1 where every client sent 0)."""
    params = SecAggParams(num_clients=5, threshold=3, clip_range=0.5, bits=bits)
    rng = np.random.default_rng(bits)
    vectors = [np.concatenate([rng.uniform(-0.5, 0.5, 1000) * 10.0 ** -rng.integers(0, 7, 1000),
                               [0.5, -0.5, 0.0]]) for _ in range(5)]
    q_sum = sum(quantize_vector(params, v) for v in vectors) & np.uint64(params.modulus - 1)
    total = dequantize_sum(params, q_sum, 5)
    exact = np.sum(vectors, axis=0)
    assert np.abs(total - exact).max() <= params.sum_error_bound(5)
    assert total[-1] == 0.0 and total[-3] == pytest.approx(2.5) and total[-2] == pytest.approx(-2.5)
    if bits == 40:  # fine enough that the signs of 1e-6-sized entries agree
        clear = np.abs(exact) > params.sum_error_bound(5)
        assert clear.mean() > 0.99 and (np.sign(total[clear]) == np.sign(exact[clear])).all()
    with pytest.raises(ValueError, match="out of range"):  # 5 inputs' sum read as 1 input's
        dequantize_sum(params, q_sum, 1)


def test_misrouted_ciphertext_is_rejected():
    server = SecAggServer(PARAMS, IDS)
    clients = {i: SecAggClient(PARAMS, i) for i in IDS}
    keys = server.collect_public_keys({i: c.public_keys() for i, c in clients.items()})
    inbox = server.route({i: c.share_keys(keys) for i, c in clients.items()})
    wrong = {**inbox[22], 11: inbox[33][11]}  # 11's share for 33, delivered to 22
    with pytest.raises(ValueError, match="labelled from 11 could not be decrypted"):
        clients[22].masked_input(np.zeros(8), wrong)
    assert clients[22].stage == "shared"  # rejected before any state changed


def test_share_whose_plaintext_names_another_destination_is_rejected():
    # A (buggy) peer 55 encrypts for 22 under the right key but names 33 as destination.
    params = SecAggParams(num_clients=3, threshold=2, clip_range=1.0)
    client = SecAggClient(params, 22)
    c_sk, c_pk = generate_key_pairs()
    _, s_pk = generate_key_pairs()
    keys = {22: client.public_keys(), 55: (public_key_to_bytes(c_pk), public_key_to_bytes(s_pk))}
    client.share_keys(keys)
    key = generate_shared_key(c_sk, bytes_to_public_key(client.public_keys()[0]))
    forged = encrypt(key, share_keys_plaintext_concat(55, 33, b"x" * 52, b"y" * 68))
    with pytest.raises(ValueError, match="is really 55->33"):
        client.masked_input(np.zeros(8), {55: forged})


def test_server_rejects_vectors_of_different_lengths():
    server, clients, _ = _until_masked(_vectors(), skip_mask=IDS)
    masked = {i: np.zeros(8 if i != 44 else 9, dtype=np.uint64) for i in IDS}
    with pytest.raises(ValueError, match="differ in shape"):
        server.unmask(masked, {})


def test_route_requires_complete_addressing_and_drops_late_key_senders():
    server = SecAggServer(PARAMS, IDS)
    clients = {i: SecAggClient(PARAMS, i) for i in IDS}
    keys = server.collect_public_keys({i: c.public_keys() for i, c in clients.items()})
    cts = {i: clients[i].share_keys(keys) for i in (11, 22, 33, 44)}  # 55 never shares
    inbox = server.route(cts)
    assert sorted(inbox) == [11, 22, 33, 44] and sorted(inbox[11]) == [22, 33, 44]
    partial = {i: dict(c) for i, c in cts.items()}
    del partial[11][22]
    with pytest.raises(ValueError, match="client 11 did not address exactly"):
        server.route(partial)
