"""FedSA-LoRA: A averaged exactly, B personal and kept by the node (through the real
client/kept.py glue), per-client models, the zero global delta, bytes, rejections."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict
from hypothesis import given, settings

from fedlora.aggregation import AdapterSpec, ClientUpdate, GlobalState, get_method, shared_a
from fedlora.client.kept import keep_trained, with_kept_factors
from fedlora.protos import WIRE_DTYPES, Envelope, encode, payload_bytes

from .contract.helpers import close, dense, scenarios, weights

FAST = settings(max_examples=20, deadline=None)
SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class Node:
    """One client node: a Flower context (its node state) and the glue of client/app.py's
    train handler (with_kept_factors -> client_start -> train -> keep_trained -> uplink)."""

    def __init__(self, method, node_id: int):
        self.method = method
        self.context = Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(),
                               run_config={})
        self.trained: dict = {}
        self.runtime = SimpleNamespace(method=method, host=SimpleNamespace(factors=self._factors))

    def _factors(self, roles):
        return {m: {r: f[r].clone() for r in roles} for m, f in self.trained.items()}

    def start(self, downlink, spec):
        factors = with_kept_factors(self.context, self.runtime, downlink)
        return self.method.client_start(factors, spec)

    def train(self, downlink, spec, gen, *, n: int) -> tuple[ClientUpdate, dict]:
        start = self.start(downlink, spec)
        self.trained = {m: {k: t + torch.randn(t.shape, generator=gen) for k, t in init.items()}
                        for m, init in start.init.items()}
        keep_trained(self.context, self.runtime, start.trainable)
        up = {m: {k: f[k] for k in self.method.uplink_roles} for m, f in self.trained.items()}
        return ClientUpdate(up, num_examples=n, scaling=start.scaling), start.init


def kept_b(node: Node, state: GlobalState, spec: AdapterSpec, module: str) -> torch.Tensor:
    """The B the node would start from now (an A-only downlink merged with its node state)."""
    return node.start(node.method.downlink(state), spec).init[module]["B"]


def test_declarations() -> None:
    method = get_method("fedsa")
    assert method.personalized and method.node_keeps == ("B",)
    assert method.client_trains == ("A", "B") and method.uplink_roles == ("A",)
    assert method.server_step_roles == ("A",) and not method.exact
    assert method.describe_options() == {}


# ------------------------------------------------------------------------------ rounds


@FAST
@given(sc=scenarios())
def test_a_is_exact_weighted_mean_and_b_stays_on_each_node(sc: dict) -> None:
    spec, gen = sc["spec"], torch.Generator().manual_seed(sc["seed"])
    method = get_method("fedsa", weighting=sc["weighting"])
    state = method.init_state(spec)
    for m, (_, d_in) in spec.shapes.items():
        assert torch.equal(state.factors[m]["A"], shared_a(spec.seed, m, spec.rank, d_in))
        assert not state.factors[m]["B"].any()
    nodes = [Node(method, k) for k in range(len(sc["examples"]))]
    contacted: set[int] = set()
    for _ in range(sc["rounds"]):
        updates, starts, bs = [], [], []
        for k, (node, n) in enumerate(zip(nodes, sc["examples"], strict=True)):
            first = k not in contacted
            contacted.add(k)
            down = method.downlink(state, first_contact=first)
            u, init = node.train(down, spec, gen, n=n)
            updates.append(u)
            starts.append(init)
            bs.append({m: f["B"] for m, f in node.trained.items()})
        new = method.aggregate(state, updates)
        assert new.round == state.round + 1
        assert method.aggregation_error(state, updates, new) is None
        p = weights(sc)
        for m in spec.shapes:
            # The shared factor: exactly the weighted mean of what clients sent.
            a_bar = sum(pk * u.factors[m]["A"].double() for pk, u in zip(p, updates, strict=True))
            assert close(new.factors[m]["A"].double(), a_bar)
            assert torch.equal(new.factors[m]["B"], state.factors[m]["B"])  # the zero start
            assert not dense(method.delta(new, m)).any()  # no global model
            for k, node in enumerate(nodes):
                # Every client started from the global A (bits) and its own last B.
                assert torch.equal(starts[k][m]["A"], state.factors[m]["A"])
                # Next round: global A with the node's own trained B (what it evaluates).
                assert torch.equal(kept_b(node, new, spec, m), bs[k][m])
                personal = dense(method.personal_delta(new, bs[k][m], m))
                assert close(personal, spec.scaling * bs[k][m].double() @ a_bar)
                # ... which differs from the client's trained model by s B_k (A - A_k).
                full = copy.deepcopy(updates[k])
                full.factors[m]["B"] = bs[k][m]
                trained = dense(method.client_delta(state, full, m))
                gap = spec.scaling * bs[k][m].double() @ (a_bar - updates[k].factors[m]["A"].double())
                assert close(personal - trained, gap, rtol=1e-4)
        state = new


def test_b_is_personal_across_rounds_and_skipped_rounds() -> None:
    """Two nodes' B diverge; a node that sat out keeps the B it trained, not a zero."""
    method = get_method("fedsa")
    spec = AdapterSpec({"q": (6, 5), "v": (4, 7)}, rank=2, alpha=4, seed=3)
    gen = torch.Generator().manual_seed(0)
    state = method.init_state(spec)
    a, b = Node(method, 1), Node(method, 2)
    ua, _ = a.train(method.downlink(state, first_contact=True), spec, gen, n=3)
    ub, init_b = b.train(method.downlink(state, first_contact=True), spec, gen, n=5)
    assert not init_b["q"]["B"].any()  # a new node starts from B = 0
    b_of_a = a.trained["q"]["B"].clone()
    state = method.aggregate(state, [ua, ub])
    for _ in range(2):  # node a sits out two rounds
        ub, init_b = b.train(method.downlink(state), spec, gen, n=5)
        state = method.aggregate(state, [ub])
    _, init_a = a.train(method.downlink(state), spec, gen, n=3)
    assert torch.equal(init_a["q"]["B"], b_of_a)
    assert torch.equal(init_a["q"]["A"], state.factors["q"]["A"])
    assert not torch.equal(init_a["q"]["B"], b.trained["q"]["B"])


def test_later_downlink_without_first_contact_fails_loudly() -> None:
    method = get_method("fedsa")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    node = Node(method, 1)
    with pytest.raises(RuntimeError, match="never received"):
        node.start(method.downlink(method.init_state(spec)), spec)
    with pytest.raises(ValueError, match="lacks roles"):  # client_start needs A and B
        method.client_start(method.downlink(method.init_state(spec)), spec)


def test_server_optimizer_steps_only_a() -> None:
    from fedlora.server.optimizer import ServerOptimizer
    from fedlora.task.training import ServerOptimizerConfig

    method = get_method("fedsa")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(1)
    up = [Node(method, k).train(method.downlink(state, first_contact=True), spec, gen, n=2)[0]
          for k in range(2)]
    opt = ServerOptimizer(ServerOptimizerConfig(name="momentum", lr=2.0), method.server_step_roles)
    new = method.aggregate(state, up)
    stepped = opt.step(state, new)
    a0, a1 = state.factors["q"]["A"], new.factors["q"]["A"]
    assert torch.allclose(stepped.factors["q"]["A"], a0 + 2.0 * (a1 - a0), atol=1e-6)
    assert not stepped.factors["q"]["B"].any()


# ------------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("wire", WIRE_DTYPES)
def test_bytes_match_formulas(wire: str) -> None:
    method = get_method("fedsa")
    spec = AdapterSpec({"q": (48, 32), "down": (32, 80)}, rank=4, alpha=8)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(2)
    nodes = [Node(method, k) for k in range(2)]
    for rnd in (1, 2):
        updates = [node.train(method.downlink(state, first_contact=rnd == 1), spec, gen, n=4)[0]
                   for node in nodes]
        for u in updates:
            for m, (d_out, d_in) in spec.shapes.items():
                assert set(u.factors[m]) == {"A"}
                assert u.factors[m]["A"].numel() == method.uplink_floats(d_out, d_in, 4) == 4 * d_in
            data = encode(Envelope("fedsa", rnd, "up", u.factors, num_examples=4,
                                   scaling=u.scaling, rank=4), wire)
            want = sum(method.uplink_floats(*s, 4, round=rnd) for s in spec.shapes.values())
            assert payload_bytes(data) == want * SIZE[wire]
        state = method.aggregate(state, updates)
        for first in (False, True):
            down = method.downlink(state, first_contact=first)
            for m, (d_out, d_in) in spec.shapes.items():
                assert set(down[m]) == ({"A", "B"} if first else {"A"})
                want = method.downlink_floats(d_out, d_in, 4, round=rnd, first_contact=first)
                assert want == 4 * d_in + (d_out * 4 if first else 0)
                assert sum(t.numel() for t in down[m].values()) == want
            data = encode(Envelope("fedsa", rnd, "down", down), wire)
            want = sum(method.downlink_floats(*s, 4, first_contact=first)
                       for s in spec.shapes.values())
            assert payload_bytes(data) == want * SIZE[wire]


# ------------------------------------------------------------------------------ rejections


def test_client_delta_needs_b_k() -> None:
    method = get_method("fedsa")
    spec = AdapterSpec({"q": (6, 5)}, rank=2, alpha=4)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(3)
    u, _ = Node(method, 1).train(method.downlink(state, first_contact=True), spec, gen, n=1)
    with pytest.raises(ValueError, match="never leaves the client"):
        method.client_delta(state, u, "q")


def test_bad_options_and_updates_rejected() -> None:
    with pytest.raises(ValueError, match="unknown option"):
        get_method("fedsa", ranks=[4])
    with pytest.raises(ValueError, match="weighting"):
        get_method("fedsa", weighting="median")
    method = get_method("fedsa")
    spec = AdapterSpec({"q": (6, 5), "v": (4, 4)}, rank=2, alpha=4)
    state = method.init_state(spec)
    gen = torch.Generator().manual_seed(4)
    good, _ = Node(method, 1).train(method.downlink(state, first_contact=True), spec, gen, n=3)
    with pytest.raises(ValueError, match="empty"):
        method.aggregate(state, [])
    leaky = copy.deepcopy(good)  # B_k must never be accepted at the server
    leaky.factors["q"]["B"] = torch.zeros(6, 2)
    with pytest.raises(ValueError, match="roles"):
        method.aggregate(state, [leaky])
    bad = copy.deepcopy(good)
    bad.factors["q"]["A"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="shape"):
        method.aggregate(state, [bad])
    bad = copy.deepcopy(good)
    del bad.factors["v"]
    with pytest.raises(ValueError, match="missing"):
        method.aggregate(state, [bad])
    bad = copy.deepcopy(good)
    bad.scaling = 3.0
    with pytest.raises(ValueError, match="scaling"):
        method.aggregate(state, [bad])
    with pytest.raises(ValueError, match="rank"):
        method.client_start(method.downlink(state, first_contact=True), spec, rank=3)
    with pytest.raises(ValueError, match="made by method"):
        get_method("fedavg").aggregate(state, [good])
