"""Fault injection is test-only: the test plug-in's ClientApp mod (tests/plugin,
fedlora_test_plugin/faults.py) and its command line; fedlora itself has no way to turn it
on. The fault suite that uses it runs in test_reliability.py and test_secure_aggregation.py."""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fedlora_test_plugin.faults import EXPECTED_REJECTION, FaultInjection
from fedlora_test_plugin.faulty_cli import parse_faults, split_faults
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedlora.client.app import make_client_app
from fedlora.deploy import simulate
from fedlora.protos import Envelope, decode, encode
from fedlora.task import messages as msgs

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("aggregation", "client", "deploy", "privacy", "protos", "server", "task")


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are built outside a Flower run: the identity a run would give, for this
    test only."""
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _request(phase: str = msgs.PHASE_TRAIN, kind: str = MessageType.TRAIN) -> Message:
    config = msgs.config_record({"wire_dtype": "float32"}, phase=phase, **{"server-round": 1})
    return Message(RecordDict({msgs.CONFIG: config}), dst_node_id=1, message_type=kind)


def _context(partition: int) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


def _update() -> bytes:
    factors = {"q": {"A": torch.ones(2, 3), "B": torch.ones(4, 2)}}
    return encode(Envelope(method="fedavg", round=1, direction="up", factors=factors,
                           num_examples=5, scaling=1.0, rank=2), "float32")


def _answer(msg: Message, context: Context) -> Message:
    """A node's plain reply: its envelope and bytes-up."""
    data = _update()
    content = RecordDict({msgs.METRICS: MetricRecord({"bytes-up": float(len(data))}),
                          msgs.ENVELOPE: msgs.envelope_record(data)})
    return Message(content=content, reply_to=msg)


def _masked_answer(msg: Message, context: Context) -> Message:
    """A node's reply under secure aggregation: a masked vector, no envelope."""
    vector = ArrayRecord({"masked": Array(np.arange(4, dtype=np.uint64))})
    content = RecordDict({msgs.METRICS: MetricRecord({"bytes-up": 32.0}), msgs.SECAGG: vector})
    return Message(content=content, reply_to=msg)


def test_a_faulty_partition_sends_the_malformed_update() -> None:
    mod = FaultInjection({1: "nan", 2: "truncated"})
    good = _update()
    nan = mod(_request(), _context(1), _answer)
    tensors = decode(msgs.envelope_bytes(nan.content)).factors["q"]
    assert math.isnan(float(tensors["A"].view(-1)[0]))
    truncated = mod(_request(), _context(2), _answer)
    data = msgs.envelope_bytes(truncated.content)
    assert data == good[: len(good) // 2]
    assert truncated.content.metric_records[msgs.METRICS]["bytes-up"] == float(len(data))
    healthy = mod(_request(), _context(0), _answer)
    assert msgs.envelope_bytes(healthy.content) == good


@pytest.mark.parametrize("phase", [msgs.PHASE_DESCRIBE, msgs.PHASE_INIT,
                                   msgs.PHASE_SECAGG_KEYS, msgs.PHASE_SECAGG_UNMASK])
def test_only_a_training_round_reply_is_touched(phase: str) -> None:
    mod = FaultInjection({0: "crash"})
    reply = mod(_request(phase), _context(0), _answer)  # no crash
    assert msgs.envelope_bytes(reply.content) == _update()
    evaluation = mod(_request(kind=MessageType.EVALUATE), _context(0), _answer)
    assert msgs.envelope_bytes(evaluation.content) == _update()


def test_crash_comes_after_the_node_answered_also_when_masked() -> None:
    answered = []

    def masked(msg: Message, context: Context) -> Message:
        answered.append(True)
        return _masked_answer(msg, context)

    with pytest.raises(RuntimeError, match="fault injection"):
        FaultInjection({0: "crash"})(_request(), _context(0), masked)
    assert answered  # the shares were dealt and the node trained before it crashed
    # A masked contribution carries no envelope: a malformed kind leaves it as it is.
    reply = FaultInjection({0: "nan"})(_request(), _context(0), _masked_answer)
    assert reply.content.array_records[msgs.SECAGG]["masked"].numpy().tolist() == [0, 1, 2, 3]


def test_kinds_are_checked_and_the_mod_pickles_for_ray() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        FaultInjection({0: "gremlins"})
    mod = FaultInjection({k: kind for k, kind in enumerate([*EXPECTED_REJECTION, "slow"])})
    assert pickle.loads(pickle.dumps(mod)) == mod


def test_the_command_line_takes_the_faults_map_out() -> None:
    assert parse_faults("{0:nan,3:truncated}") == {0: "nan", 3: "truncated"}
    assert parse_faults("{}") == {}
    with pytest.raises(ValueError, match="PARTITION:KIND"):
        parse_faults("{nan}")
    faults, rest = split_faults(["simulate", "faults={2:crash}", "-m", "strategy=ffa"])
    assert faults == {2: "crash"} and rest == ["simulate", "-m", "strategy=ffa"]


def test_client_mods_wrap_the_client_app_within_their_scope() -> None:
    seen: list[str] = []

    def outer(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        seen.append("outer")
        return call_next(msg, context)

    def inner(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        seen.append("inner")
        return Message(content=RecordDict({msgs.CONFIG: ConfigRecord({"short": 1})}),
                       reply_to=msg)

    msg = _request(kind=MessageType.EVALUATE)
    reply = make_client_app([outer, inner])(msg, _context(0))
    assert seen == ["outer", "inner"] and reply.content.config_records[msgs.CONFIG]["short"] == 1
    with simulate.client_mods(outer):
        with simulate.client_mods(inner):
            assert simulate._client_mods == (outer, inner)
        assert simulate._client_mods == (outer,)
    assert simulate._client_mods == ()


def test_production_code_has_no_fault_injection() -> None:
    """No production module reads a ``faults`` key or imports a faults module."""
    assert not (ROOT / "client" / "faults.py").exists()
    for package in PRODUCTION:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"""["']faults["']""", text), path
            assert not re.search(r"^\s*(from|import)\s+\S*faults\b", text, re.M), path
