"""What a simulation round costs must follow the cohort, not the registered nodes: Flower's
message delivery replaced by one walk per pass (deploy/vce_delivery.py) hands out the
same messages in the same order, and the per-round epsilon figure (server/report.py)
re-reads only the ledgers that changed."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedlora.deploy.vce_delivery import cohort_delivery
from fedlora.privacy.ledger_file import lifetime_key, write_durably
from fedlora.server.client_dp import LEDGER_NODE
from fedlora.server.report import simulated_node_ledgers, simulated_spend

# Partitions the messages go to, in push order: partition 2 gets two (one per pass).
PUSHED = [5, 2, 7, 2, 9, 0]


def _deliveries(add_messages_to_queue, nodes: int = 12) -> list[tuple[int, int]]:
    """(partition, tag) of each message the function queues, in queue order."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)  # as flwr.simulation registers its run
    state.task_store[1] = Task(task_id=1, run_id=run.run_id)
    mapping = vce_api._register_nodes(nodes, factory)
    node_of = {partition: node_id for node_id, partition in mapping.items()}
    grid = InMemoryGrid(factory)
    grid._run = run  # noqa: SLF001 - set_run() asks for the primary task's record too
    for tag, partition in enumerate(PUSHED):
        content = RecordDict({"c": ConfigRecord({"tag": tag})})
        assert grid.push_messages([Message(content, node_of[partition], "train")])
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=add_messages_to_queue, args=(state, queue, mapping, stop))
    thread.start()
    deadline = time.monotonic() + 10
    while queue.qsize() < len(PUSHED) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    thread.join()
    out = []
    while not queue.empty():
        message = queue.get()
        assert message.metadata.delivered_at != ""
        out.append((mapping[message.metadata.dst_node_id],
                    int(message.content.config_records["c"]["tag"])))
    return out


@pytest.fixture
def task_identity(monkeypatch):
    """What flwr.simulation sets for its run before any Message is built."""
    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.usefixtures("task_identity")
def test_cohort_delivery_queues_what_flower_queues_in_the_same_order():
    flower = _deliveries(vce_api.add_messages_to_queue)
    original = vce_api.add_messages_to_queue
    with cohort_delivery():
        assert vce_api.add_messages_to_queue is not original
        ours = _deliveries(vce_api.add_messages_to_queue)
    assert vce_api.add_messages_to_queue is original
    # One message per node per pass, in the nodes' order; partition 2's second one next pass.
    assert flower == [(0, 5), (2, 1), (5, 0), (7, 2), (9, 4), (2, 3)]
    assert ours == flower


def _ledger(path: Path, node: str, epsilon: float, *, federation: str | None = None) -> None:
    payload = {"federation": federation or lifetime_key(node), "node": node,
               "epsilon_spent": epsilon}
    write_durably(path, json.dumps(payload))


def test_simulated_spend_rereads_changed_ledgers_only_and_matches_a_full_read(tmp_path,
                                                                              monkeypatch):
    cfg = {"privacy": {"enabled": True}, "ledger_dir": str(tmp_path)}

    def full_read() -> float | None:
        spent = [float(ledger["epsilon_spent"]) for _, ledger in simulated_node_ledgers(cfg)]
        return max(spent, default=None)

    for k in range(5):
        _ledger(tmp_path / f"n{k}.privacy.json", f"client-{k}", 0.1 * k)
    _ledger(tmp_path / "server.privacy.json", LEDGER_NODE, 9.0)  # the server's own: left out
    _ledger(tmp_path / "job.privacy.json", "client-9", 8.0, federation="a-job")  # not lifetime
    (tmp_path / "torn.privacy.json").write_text("{")
    assert simulated_spend(cfg) == full_read() == 0.4

    reads: list[Path] = []
    original = Path.read_text

    def counting(self: Path, *args, **kwargs) -> str:
        reads.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    assert simulated_spend(cfg) == 0.4
    assert reads == [tmp_path / "torn.privacy.json"]  # only what could not be read before
    reads.clear()
    _ledger(tmp_path / "n1.privacy.json", "client-1", 1.5)  # a node of this round's cohort
    assert simulated_spend(cfg) == 1.5
    assert sorted(p.name for p in reads) == ["n1.privacy.json", "torn.privacy.json"]
    assert full_read() == 1.5
    (tmp_path / "n1.privacy.json").unlink()
    assert simulated_spend(cfg) == full_read() == 0.4
    assert simulated_spend({"privacy": {"enabled": False}, "ledger_dir": str(tmp_path)}) is None
