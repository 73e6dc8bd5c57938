"""The wire contract: round trips, every rejection, generated code (per method: tests/contract/)."""

from __future__ import annotations

import ast
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.protos import (
    SCHEMA_VERSION,
    WIRE_DTYPES,
    Envelope,
    Expectation,
    RejectReason,
    UpdateRejected,
    decode,
    encode,
    head_bytes,
    payload_bytes,
    to_message,
)

from .payloads import raw_envelope, raw_tensor

ROOT = Path(__file__).resolve().parents[1]
SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sample_env(gen: torch.Generator | None = None) -> Envelope:
    gen = gen or torch.Generator().manual_seed(0)
    return Envelope(
        method="ffa", round=3, direction="up",
        factors={"l0.q": {"B": torch.randn(4, 2, generator=gen)},
                 "l0.v": {"B": torch.randn(3, 2, generator=gen)}},
        head={"classifier.weight": torch.randn(5, 4, generator=gen),
              "classifier.bias": torch.randn(5, generator=gen)},
        num_examples=17, scaling=2.0, rank=2, fingerprint="sha256:abc", node="node-1",
        privacy={"epsilon": 1.25, "delta": 1e-5, "noise_multiplier": 0.9, "max_grad_norm": 1.0,
                 "sample_rate": 0.01, "steps": 40, "accountant": "prv"},
        extra={"lr": "0.005", "zeta": "1"},
    )


def expectation(**overrides: object) -> Expectation:
    kwargs: dict = {
        "method": "ffa", "round": 3, "shapes": {"l0.q": (4, 7), "l0.v": (3, 9)}, "roles": ("B",),
        "rank": 2, "head_shapes": {"classifier.weight": (5, 4), "classifier.bias": (5,)},
        "fingerprint": "sha256:abc",
    }
    kwargs.update(overrides)
    return Expectation(**kwargs)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_round_trip_every_dtype(wire: str) -> None:
    env = sample_env()
    data = encode(env, wire)
    assert data == encode(env, wire)  # deterministic bytes
    back = decode(data, expectation())
    for field in ("method", "round", "direction", "num_examples", "scaling", "rank",
                  "fingerprint", "node", "privacy", "extra"):
        assert getattr(back, field) == getattr(env, field), field
    pairs = [(back.factors[m][r], t) for m, roles in env.factors.items() for r, t in roles.items()]
    pairs += [(back.head[n], t) for n, t in env.head.items()]
    assert back.head.keys() == env.head.keys()
    for got, sent in pairs:
        assert got.dtype == torch.float32 and got.shape == sent.shape
        # Exactly torch's own rounding to the wire dtype: float32 is lossless, fp16 within
        # 2^-11 relative, bf16 within 2^-8 relative.
        assert torch.equal(got, sent.to(TORCH[wire]).float())
        rel = {"float32": 0.0, "float16": 2**-11, "bfloat16": 2**-8}[wire]
        assert torch.all((got - sent).abs() <= rel * sent.abs() + 1e-30)
    assert payload_bytes(data) == (8 + 6) * SIZE[wire] == payload_bytes(env, wire)
    assert head_bytes(data) == 25 * SIZE[wire] == head_bytes(env, wire)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    wire=st.sampled_from(WIRE_DTYPES),
    role=st.sampled_from(["A", "B", "R", "G"]),
    seed=st.integers(0, 2**31),
    privacy=st.booleans(),
)
def test_round_trip_property(shape: tuple[int, int], wire: str, role: str, seed: int,
                             privacy: bool) -> None:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100
    env = Envelope("m", 0, "down", {"x": {role: t}}, privacy={} if privacy else None)
    back = decode(encode(env, wire))
    assert torch.equal(back.factors["x"][role], t.to(TORCH[wire]).float())
    assert back.privacy == ({} if privacy else None) and back.direction == "down"


def test_special_values_and_empty_tensors_survive() -> None:
    t = torch.tensor([[float("inf"), -0.0, 1e-40, float("nan")]])
    back = decode(encode(Envelope("m", 1, "up", {"x": {"A": t}, "y": {"B": torch.zeros(7, 0)}})))
    got = back.factors["x"]["A"]
    assert torch.equal(got[:, :3], t[:, :3]) and torch.isnan(got[0, 3])
    assert torch.signbit(got[0, 1]) and back.factors["y"]["B"].shape == (7, 0)


def test_encode_rejects_bad_envelopes() -> None:
    env = sample_env()
    with pytest.raises(ValueError, match="wire_dtype"):
        encode(env, "int8")
    for change in ({"direction": "sideways"}, {"round": -1}, {"num_examples": 1.5},
                   {"factors": {"q": {"Q": torch.zeros(1, 1)}}}, {"privacy": {"eps": 1.0}}):
        bad = Envelope(**{**env.__dict__, **change})
        with pytest.raises(ValueError):
            encode(bad)


# Byte counts per method and dtype, the round trip of every method's uplink and downlink and
# the server's gate on them: tests/contract/test_wire.py, for every registered method.


# ----------------------------------------------------------------------------- rejections


def _env_bytes(**change: object) -> bytes:
    env = sample_env()
    return encode(Envelope(**{**env.__dict__, **change}))


def _tensors_of(env: Envelope) -> list:
    msg = to_message(env)
    return list(msg.tensors)


def _dup() -> bytes:
    tensors = _tensors_of(sample_env())
    return raw_envelope(method="ffa", round=3, fingerprint="sha256:abc", tensors=tensors + tensors[:1])


def _raw_with(tensor) -> bytes:
    tensors = _tensors_of(sample_env())
    return raw_envelope(method="ffa", round=3, fingerprint="sha256:abc", tensors=tensors + [tensor])


def _replace_first(**fields: object) -> bytes:
    msg = to_message(sample_env())
    for key, value in fields.items():
        setattr(msg.tensors[0], key, value)
    return msg.SerializeToString()


CASES: dict[str, tuple[Callable[[], bytes], dict]] = {
    "wrong_method": (lambda: _env_bytes(method="fedavg"), {}),
    "stale_round": (lambda: _env_bytes(round=2), {}),
    "future_round": (lambda: _env_bytes(round=4), {}),
    "unknown_module": (
        lambda: _env_bytes(factors={**sample_env().factors, "l9.k": {"B": torch.zeros(4, 2)}}), {}
    ),
    "missing_module": (lambda: _env_bytes(factors={"l0.q": sample_env().factors["l0.q"]}), {}),
    "wrong_role": (
        lambda: _env_bytes(factors={"l0.q": {"A": torch.zeros(2, 7)}, "l0.v": {"B": torch.zeros(3, 2)}}),
        {},
    ),
    "wrong_shape": (lambda: _env_bytes(factors={"l0.q": {"B": torch.zeros(5, 2)},
                                                  "l0.v": {"B": torch.zeros(3, 2)}}), {}),
    "wrong_rank": (lambda: _env_bytes(factors={"l0.q": {"B": torch.zeros(4, 3)},
                                                 "l0.v": {"B": torch.zeros(3, 3)}}), {}),
    "non_finite": (lambda: _env_bytes(factors={"l0.q": {"B": torch.full((4, 2), float("nan"))},
                                                 "l0.v": {"B": torch.zeros(3, 2)}}), {}),
    "unsupported_dtype": (lambda: _replace_first(dtype=0), {}),
    "truncated": (lambda: encode(sample_env())[:-9], {}),
    "oversized": (lambda: encode(sample_env()), {"max_bytes": 64}),
    "duplicate_module": (_dup, {}),
    "schema_version": (
        lambda: raw_envelope(schema_version=SCHEMA_VERSION + 1, method="ffa", round=3), {}
    ),
    "norm_bound": (lambda: encode(sample_env()), {"max_norm": 0.5}),
    "wrong_fingerprint": (lambda: _env_bytes(fingerprint="sha256:other"), {}),
    "malformed": (lambda: _env_bytes(direction="down"), {}),
}


def test_cases_cover_every_reason() -> None:
    assert set(CASES) == {r.value for r in RejectReason}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_every_reject_reason(reason: str) -> None:
    make, overrides = CASES[reason]
    data = make()
    with pytest.raises(UpdateRejected) as info:
        decode(data, expectation(**overrides))
    assert info.value.reason is RejectReason(reason), str(info.value)
    assert str(info.value).startswith(f"{reason}: ") and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "data, reason",
    [
        (lambda: _replace_first(role=0), RejectReason.WRONG_ROLE),
        (lambda: _replace_first(role=42), RejectReason.WRONG_ROLE),
        (lambda: _replace_first(dtype=9), RejectReason.UNSUPPORTED_DTYPE),
        (lambda: _replace_first(data=b"\x00" * 3), RejectReason.TRUNCATED),
        (lambda: _replace_first(data=b"\x00" * 64), RejectReason.MALFORMED),
        (lambda: _replace_first(module=""), RejectReason.MALFORMED),
        (lambda: _raw_with(raw_tensor("l0.q", "B", [4, 2], "float16", b"\x00" * 7)),
         RejectReason.TRUNCATED),
        (lambda: _raw_with(raw_tensor("l0.q", "HEAD", [2])), RejectReason.UNKNOWN_MODULE),
        (lambda: _raw_with(raw_tensor("l0.q", "A", [2, 7])), RejectReason.WRONG_ROLE),
        (lambda: raw_envelope(method="ffa", round=3, tensor_count=None), RejectReason.TRUNCATED),
        (lambda: raw_envelope(schema_version=2, tensor_count=None), RejectReason.SCHEMA_VERSION),
        (lambda: raw_envelope(schema_version=0, method="ffa", round=3), RejectReason.SCHEMA_VERSION),
        (lambda: raw_envelope(method="ffa", round=3, tensor_count=3), RejectReason.TRUNCATED),
        (lambda: raw_envelope(method="ffa", round=3, direction=0), RejectReason.MALFORMED),
        (lambda: b"\xff\xff\xff", RejectReason.TRUNCATED),
        (lambda: _env_bytes(head={"classifier.weight": torch.zeros(5, 4)}), RejectReason.MISSING_MODULE),
        (lambda: _env_bytes(head={**sample_env().head, "classifier.bias": torch.zeros(6)}),
         RejectReason.WRONG_SHAPE),
        (lambda: _env_bytes(head={**sample_env().head, "classifier.bias": torch.full((5,), float("inf"))}),
         RejectReason.NON_FINITE),
        (lambda: _env_bytes(scaling=float("nan")), RejectReason.NON_FINITE),
        (lambda: _env_bytes(scaling=-1.0), RejectReason.MALFORMED),
        (lambda: _env_bytes(rank=3), RejectReason.WRONG_RANK),
        (lambda: _env_bytes(factors={"l0.q": {"B": torch.zeros(4)}, "l0.v": {"B": torch.zeros(3, 2)}}),
         RejectReason.WRONG_SHAPE),
    ],
)
def test_more_crafted_faults(data: Callable[[], bytes], reason: RejectReason) -> None:
    with pytest.raises(UpdateRejected) as info:
        decode(data(), expectation())
    assert info.value.reason is reason, str(info.value)


def test_dtype_allow_list() -> None:
    data = encode(sample_env(), "bfloat16")
    with pytest.raises(UpdateRejected, match="unsupported_dtype"):
        decode(data, expectation(dtypes=("float32",)))


def test_flora_rank_rules() -> None:
    def env(r1: int, r2: int, rank: int = 0) -> bytes:
        return encode(Envelope("flora", 1, "up", {
            "q": {"A": torch.zeros(r1, 6), "B": torch.zeros(5, r1)},
            "v": {"A": torch.zeros(r2, 6), "B": torch.zeros(5, r2)},
        }, rank=rank))

    exp = Expectation(method="flora", round=1, shapes={"q": (5, 6), "v": (5, 6)},
                      roles=("A", "B"), max_rank=4)
    assert decode(env(3, 3, 3), exp).rank == 3
    for bad in (env(3, 2), env(5, 5), env(2, 2, rank=4)):
        with pytest.raises(UpdateRejected, match="wrong_rank"):
            decode(bad, exp)
    with pytest.raises(UpdateRejected, match="wrong_rank"):  # A and B disagree
        decode(encode(Envelope("flora", 1, "up", {
            "q": {"A": torch.zeros(2, 6), "B": torch.zeros(5, 3)},
            "v": {"A": torch.zeros(2, 6), "B": torch.zeros(5, 2)}})), exp)
    # A downlink before round 1 carries empty factors: admitted with min_rank=0.
    down = Expectation(method="flora", round=0, direction="down", shapes={"q": (5, 6), "v": (5, 6)},
                       roles=("A", "B"), max_rank=5, min_rank=0)
    decode(encode(Envelope("flora", 0, "down", {
        "q": {"A": torch.zeros(0, 6), "B": torch.zeros(5, 0)},
        "v": {"A": torch.zeros(0, 6), "B": torch.zeros(5, 0)}})), down)


def test_every_truncation_is_detected() -> None:
    data = encode(sample_env())
    for cut in range(len(data)):
        with pytest.raises(UpdateRejected) as info:
            decode(data[:cut])
        assert info.value.reason is RejectReason.TRUNCATED, cut


def test_update_rejected_pickles() -> None:
    e = UpdateRejected(RejectReason.NON_FINITE, "x")
    back = pickle.loads(pickle.dumps(e))
    assert back.reason is RejectReason.NON_FINITE and str(back) == "non_finite: x"


# ----------------------------------------------------------------------------- generated code


def test_generated_code_is_current(tmp_path: Path) -> None:
    # grpcio-tools is in the test extra: a missing one is a broken install, not a skip.
    from fedlora.protos import generate

    checked_in = Path(generate.__file__).parent
    for path in generate.generate(tmp_path):
        rel = path.relative_to(tmp_path)
        fresh, ours = path.read_bytes(), (checked_in / rel).read_bytes()
        if fresh == ours:
            continue
        # Same .proto but another protoc release only changes the version stamp lines.
        strip = lambda b: [ln for ln in b.splitlines() if b"Version" not in ln and not ln.strip().isdigit()]  # noqa: E731
        # Same content under another protoc release: current (only the stamp differs).
        if strip(fresh) == strip(ours):
            continue
        pytest.fail(f"{rel} is stale: run `python -m fedlora.protos.generate` and commit the result")


def test_generated_module_import_path() -> None:
    from fedlora.protos.fedlora.v1 import adapter_pb2

    assert adapter_pb2.DESCRIPTOR.package == "fedlora.v1"
    assert adapter_pb2.AdapterEnvelope.DESCRIPTOR.fields_by_name["tensor_count"].number == 15


def test_aggregation_and_protos_import_nothing_else_of_fedlora() -> None:
    for folder in ("aggregation", "protos"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name.endswith("_pb2.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in {"fedlora", "flwr"}, (path, name)
