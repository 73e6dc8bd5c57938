"""A curious server against one private node, through the real client handlers.

One test per way a server could try to get more than the guarantee covers: reused noise,
refusal text with sizes, a loosened policy (DP off, a larger epsilon, a fresh budget under
a new run name, a ledger directory of its choosing, no secure aggregation, a lost ledger),
an epsilon that identifies N_k, evaluation results, and a seedable noise source."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlora.privacy.csprng import Csprng
from fedlora.privacy.policy import REFUSAL_CODES
from fedlora.task.config import ConfigError, validate

from .curious_server import (
    downlink,
    evaluate,
    flat,
    has_numbers,
    job,
    node_context,
    owner,
    refused,
    send,
    strings,
    update,
)

pytestmark = pytest.mark.integration


def _ledgers(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "ledger").glob("*.privacy.json"))]


# -- finding 1: a round trained again draws fresh noise and is charged again ----------------

def test_retrained_round_draws_fresh_noise_and_is_charged_again(tmp_path: Path) -> None:
    # Large noise (epsilon 0.3) so the released update is mostly noise; plain SGD.
    cfg = job("privacy.epsilon=0.3", "strategy.lr=1.0", "run_name=r")
    context = node_context(owner(tmp_path))
    first = send(cfg, context, 1)
    # The same round again with another downlink (a head nudged by 1e-6): a new request.
    nudged = downlink(cfg, 1, head_shift=1e-6)
    again = send(cfg, context, 1, data=nudged)
    assert refused(first) is None and refused(again) is None
    one, two = flat(update(first)), flat(update(again))
    # A repeat with reused noise would give nearly the same vector (correlation ~1).
    corr = torch.corrcoef(torch.stack([one - one.mean(), two - two.mean()]))[0, 1]
    assert abs(float(corr)) < 0.3, f"two releases of round 1 correlate: {float(corr):.3f}"
    (ledger,) = _ledgers(tmp_path)
    assert [r["round"] for r in ledger["rounds"]] == [1, 1]  # charged twice
    assert sum(s for _, _, s in ledger["history"]) == 2 * cfg["strategy"]["local_steps"]
    # The very same request again gets the very same bytes: nothing new, nothing charged.
    same = send(cfg, context, 1, data=nudged)
    assert torch.equal(flat(update(same)), two)
    assert len(_ledgers(tmp_path)[0]["rounds"]) == 2


def test_two_releases_carry_independent_noise_statistically() -> None:
    # The keystream itself: two generators, many draws, no correlation, unit variance.
    a, b = Csprng().normal((200_000,), 1.0), Csprng().normal((200_000,), 1.0)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02  # ~4.5 sigma
    assert abs(float(a.var()) - 1.0) < 0.02 and abs(float(a.mean())) < 0.01


# -- finding 3: nothing data-dependent in text ----------------------------------------------

@pytest.mark.parametrize("override, code", [
    ("privacy.delta=0.5", "invalid-delta"),
    ("strategy.batch_size=100000", "invalid-partition"),  # the split's size floor says so
])
def test_refusal_text_carries_no_sizes(tmp_path: Path, override: str, code: str) -> None:
    cfg = job(override, "strategy.sample_rate=null", "run_name=t")
    reply = send(cfg, node_context(owner(tmp_path, **{"max-delta": 0.9})), 1)
    assert refused(reply) == code
    assert all(s in REFUSAL_CODES or not has_numbers(s) for s in strings(reply))
    assert "fedlora-config" not in str(reply.content.config_records)


def test_a_failing_private_node_sends_a_code_not_its_exception(tmp_path: Path) -> None:
    cfg = job("run_name=t")
    reply = send(cfg, node_context(owner(tmp_path)), 1, data=b"\x00garbage-downlink")
    assert not reply.has_error() and refused(reply) == "client-error"
    assert strings(reply) == ["client-error"]


def test_budget_refusal_has_no_epsilon_in_it(tmp_path: Path) -> None:
    cfg = job("run_name=t", "federation.rounds=1")
    context = node_context(owner(tmp_path))
    assert refused(send(cfg, context, 1)) is None
    reply = send(cfg, context, 2)  # beyond the planned steps
    assert refused(reply) == "budget-exhausted"
    metrics = reply.content.metric_records["metrics"]
    assert "epsilon" not in metrics and strings(reply) == ["budget-exhausted"]


# -- finding 4: the server cannot loosen the node's policy ------------------------------------

def test_server_cannot_turn_dp_off_raise_epsilon_or_skip_secure_aggregation(tmp_path) -> None:
    context = node_context(owner(tmp_path, **{"max-epsilon": 3}))
    off = send(job("privacy=none", "run_name=t"), context, 1)
    assert refused(off) == "policy-requires-dp"
    assert "envelope" not in off.content.array_records
    assert set(off.content.metric_records["metrics"]) == {"partition-id", "rank", "refused"}
    assert refused(send(job("privacy.epsilon=8", "run_name=t"), context, 1)) == "policy-epsilon"
    strict = node_context(owner(tmp_path / "s", **{"require-secure-aggregation": True}))
    assert refused(send(job("run_name=t"), strict, 1)) == "policy-requires-secure-aggregation"


def test_first_job_pins_the_policy_a_later_job_cannot_loosen(tmp_path: Path) -> None:
    context = node_context(owner(tmp_path))  # the owner set nothing: the first job pins it
    assert refused(send(job("privacy.epsilon=2", "run_name=a"), context, 1)) is None
    assert refused(send(job("privacy=none", "run_name=b"), context, 1)) == "policy-requires-dp"
    assert refused(send(job("privacy.epsilon=4", "run_name=b"), context, 1)) == "policy-epsilon"


def test_new_run_name_is_not_a_new_budget(tmp_path: Path) -> None:
    context = node_context(owner(tmp_path, **{"max-epsilon": 3}))
    assert refused(send(job("privacy.epsilon=2", "run_name=first"), context, 1)) is None
    # 2 of 3 reserved: a run asking for 2 more is refused, whatever it is called.
    assert refused(send(job("privacy.epsilon=2", "run_name=second"), context, 1)) == \
        "budget-exhausted"
    assert refused(send(job("privacy.epsilon=1", "run_name=third"), context, 1)) is None
    (ledger,) = _ledgers(tmp_path)  # one lifetime ledger, keyed by the data, not the run
    assert ledger["reservations"] == {"first": 2.0, "third": 1.0}


def test_server_cannot_choose_the_ledger_directory(tmp_path: Path) -> None:
    node_config = {"partition-id": 0, "num-partitions": 1}  # the owner set no ledger-dir
    reply = send(job("run_name=t"), node_context(node_config), 1,
                 **{"ledger-dir": str(tmp_path / "chosen-by-server")})
    assert refused(reply) == "node-config"
    assert not (tmp_path / "chosen-by-server").exists()


def test_lost_ledger_with_existing_keys_refuses(tmp_path: Path) -> None:
    context = node_context(owner(tmp_path))
    assert refused(send(job("run_name=t"), context, 1)) is None
    for path in (tmp_path / "ledger").glob("*"):
        path.unlink()
    assert refused(send(job("run_name=t"), node_context(owner(tmp_path)), 2)) == \
        "ledger-missing"


# -- finding 5: the released epsilon does not identify N_k ------------------------------------

def test_released_figures_do_not_depend_on_dataset_size(tmp_path: Path) -> None:
    replies = []
    for n in (170, 171):
        cfg = job(f"data.num_train={n}", "data.num_test=40", "strategy.sample_rate=0.36",
                  "run_name=t")
        replies.append(send(cfg, node_context(owner(tmp_path / str(n))), 1))
    metrics = [dict(r.content.metric_records["metrics"]) for r in replies]
    privacy = [update(r).privacy for r in replies]
    assert metrics[0] == metrics[1] and "epsilon" not in metrics[0]
    assert privacy[0] == privacy[1] and "epsilon" not in privacy[0]
    assert update(replies[0]).num_examples == 0  # no size released either


def test_declared_size_releases_epsilon_rounded_up(tmp_path: Path) -> None:
    cfg = job("run_name=t")
    reply = send(cfg, node_context(owner(tmp_path, **{"public-num-examples": 1000})), 1)
    released = reply.content.metric_records["metrics"]["epsilon"]
    (ledger,) = _ledgers(tmp_path)
    assert released >= ledger["epsilon_spent"] and math.isclose(released * 100,
                                                                round(released * 100))


# -- finding 6: client evaluation under DP ----------------------------------------------------

def test_client_evaluation_under_dp_is_refused_unless_the_policy_allows(tmp_path) -> None:
    cfg = job("run_name=t")
    reply = evaluate(cfg, node_context(owner(tmp_path)))
    assert refused(reply) == "policy-forbids-evaluation"
    assert "eval-accuracy" not in reply.content.metric_records["metrics"]
    allowed = evaluate(cfg, node_context(owner(tmp_path / "a", **{"allow-evaluation": True})))
    assert "eval-accuracy" in allowed.content.metric_records["metrics"]
    cfg["federation"]["fraction_evaluate"] = 0.5
    with pytest.raises(ConfigError, match="privacy.client_evaluation"):
        validate(cfg)


# -- finding 9: noise from a CSPRNG, not a seedable generator ---------------------------------

def test_noise_does_not_follow_torch_seed(tmp_path: Path) -> None:
    cfg = job("privacy.epsilon=0.3", "strategy.lr=1.0", "run_name=t")
    releases = []
    for k in range(2):
        torch.manual_seed(0)  # whatever torch's global generator holds
        releases.append(flat(update(send(cfg, node_context(owner(tmp_path / str(k))), 1))))
    assert not torch.allclose(releases[0], releases[1])


# -- finding 1, secure path: a round's masks never cover two different vectors -------------

def test_secure_round_masks_cover_one_vector_only() -> None:
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedlora.client.replay import remember_masked, secure_again
    from fedlora.privacy.policy import PolicyRefusal
    from fedlora.task import messages as msgs

    context = node_context({})
    request = Message(RecordDict({msgs.CONFIG: ConfigRecord({"server-round": 3})}), 7, "train")
    masked = np.arange(6, dtype=np.uint32)
    reply = Message(RecordDict({msgs.METRICS: MetricRecord({"steps": 2.0})}), reply_to=request)
    reply.content.array_records[msgs.SECAGG] = ArrayRecord({"masked": Array(masked)})
    assert secure_again(request, context, 3, "request-a") is None  # not masked yet
    remember_masked(context, 3, "request-a", reply)
    again = secure_again(request, context, 3, "request-a")  # the same request: same bytes
    assert np.array_equal(again.content.array_records[msgs.SECAGG]["masked"].numpy(), masked)
    with pytest.raises(PolicyRefusal) as info:  # another request under the same masks
        secure_again(request, context, 3, "request-b")
    assert info.value.code == "secure-round-already-masked"
    assert secure_again(request, context, 4, "request-b") is None  # a new round: new masks


def test_released_epsilon_is_paired_with_the_delta_it_was_computed_at(tmp_path: Path) -> None:
    # The owner's lifetime delta is looser than the job's: the ledger accounts at the
    # owner's, so the released pair must name that delta (a smaller one would understate).
    cfg = job("run_name=t", "privacy.delta=1e-5")
    owner_cfg = owner(tmp_path, **{"public-num-examples": 1000, "max-delta": 1e-4,
                                   "max-epsilon": 8})
    reply = send(cfg, node_context(owner_cfg), 1)
    metrics = reply.content.metric_records["metrics"]
    (ledger,) = _ledgers(tmp_path)
    assert ledger["delta"] == metrics["delta"] == update(reply).privacy["delta"] == 1e-4
    assert metrics["epsilon"] >= ledger["epsilon_spent"]
