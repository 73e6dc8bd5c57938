"""Under DP a client releases only public, accounted or declared-public fields."""

from __future__ import annotations

import dataclasses

import pytest

from fedlora.protos import Envelope
from fedlora.protos.codec import PRIVACY_FIELDS as WIRE_PRIVACY_FIELDS
from fedlora.task.release import (
    DECLARED_METRICS,
    ENVELOPE_FIELDS,
    PRIVACY_FIELDS,
    PUBLIC_METRICS,
    UnclassifiedRelease,
    check_release,
    round_up,
)


def test_every_envelope_field_is_classified() -> None:
    # A field added to the wire contract later fails here until it is classified.
    assert {f.name for f in dataclasses.fields(Envelope)} - {"extra"} == set(ENVELOPE_FIELDS)
    assert set(PRIVACY_FIELDS) <= set(WIRE_PRIVACY_FIELDS)
    assert not {"noise_multiplier", "sample_rate"} & set(PRIVACY_FIELDS)  # functions of N_k


def test_check_release_rejects_what_nobody_classified() -> None:
    ok = dict.fromkeys(PUBLIC_METRICS, 1.0)
    check_release(ok, {"factors": 1, "round": 2}, {"delta": 1e-5, "steps": 3},
                  declared_size=False)
    # epsilon is a function of q = b / N_k: it leaves only with a declared size.
    with pytest.raises(UnclassifiedRelease, match="epsilon"):
        check_release({**ok, "epsilon": 1.0}, None, None, declared_size=False)
    with pytest.raises(UnclassifiedRelease, match="envelope.privacy.epsilon"):
        check_release(ok, {"privacy": 1}, {"epsilon": 1.0}, declared_size=False)
    check_release(ok, {"privacy": 1}, {"epsilon": 1.0}, declared_size=True)
    # Strings: a fixed refusal code only.
    check_release(ok, None, None, declared_size=False, notes={"reason": "budget-exhausted"})
    with pytest.raises(UnclassifiedRelease, match="refusal code"):
        check_release(ok, None, None, declared_size=False, notes={"reason": "1/N_k = 1/463"})
    for leak in ("train-loss", "train-seconds", "sample-rate", "noise-multiplier",
                 "eval-accuracy"):
        with pytest.raises(UnclassifiedRelease, match=leak):
            check_release({**ok, leak: 0.5}, None, None, declared_size=False)
    with pytest.raises(UnclassifiedRelease, match="num-examples"):
        check_release({**ok, "num-examples": 120.0}, None, None, declared_size=False)
    check_release({**ok, **dict.fromkeys(DECLARED_METRICS, 100.0)}, None, None,
                  declared_size=True)
    with pytest.raises(UnclassifiedRelease, match="envelope.extra"):
        check_release(ok, {"extra": {"loss": "0.3"}}, None, declared_size=False)
    with pytest.raises(UnclassifiedRelease, match="envelope.privacy.sample_rate"):
        check_release(ok, {"privacy": 1}, {"sample_rate": 0.1}, declared_size=False)


def test_epsilon_is_rounded_up_never_down() -> None:
    assert round_up(7.9911) == 8.0 and round_up(2.0) == 2.0 and round_up(4.079) == 4.08
    assert round_up(0.0001) == 0.01
