"""Message delivery in Flower's simulation runtime at a cost that follows the messages, not
the registered nodes.

Flower 1.39's simulation runtime (``flwr.server.superlink.fleet.vce.vce_api``) hands
messages to its workers from one thread, ``add_messages_to_queue``, which every 0.1 s
asks the in-memory LinkState for each registered node's next message:
``get_message_ins(node_id, limit=1)`` walks every stored message (checking each one's
expiry) to find that node's. With N registered nodes and M messages in flight a pass
costs N x M checks: with 1,000 nodes and a cohort of 100 a pass holds the GIL for most
of a second, the pass never sleeps, and the server loop and the Ray actors' result
handling in the same process wait for it (the fixed cost per client doubled from 100 to
1,000 registered nodes); the discovery message to every node costs N x N checks a pass
(most of start-up's growth).

:func:`cohort_delivery` swaps that thread's function, for the scope of a run, for one
that walks the stored messages once per pass: the same expiry checks, the same
at-most-one message per node per pass, the same order (the nodes' registration order)
and the same ``delivered_at`` mark. Any other LinkState keeps Flower's own function.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message

_PASS_INTERVAL_S = 0.1  # Flower's own pause between two passes


def undelivered(state: Any, position: dict[int, int]) -> list[Message]:
    """One pass: the first undelivered message of every node in ``position`` (node id ->
    its place in the nodes' registration order) that has one, in that order, marked
    delivered: what ``get_message_ins(node_id, limit=1)`` for every node in turn returns,
    in one walk over the stored messages."""
    from flwr.supercore.date import now

    chosen: dict[int, Message] = {}
    with state.lock:
        if not state.message_ins_store:
            return []
        # Expired or stale messages are deleted first, as get_message_ins does.
        state._check_stored_messages(set(state.message_ins_store))  # noqa: SLF001
        for message in state.message_ins_store.values():
            metadata = message.metadata
            node_id = metadata.dst_node_id
            if metadata.delivered_at == "" and node_id in position \
                    and node_id not in chosen:
                chosen[node_id] = message
    delivered_at = now().isoformat()
    for message in chosen.values():
        message.metadata.delivered_at = delivered_at
    return sorted(chosen.values(), key=lambda m: position[m.metadata.dst_node_id])


def _add_messages_to_queue(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int],
                           f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (same arguments), one walk per pass."""
    position = {node_id: k for k, node_id in enumerate(nodes_mapping)}  # Flower's pass order
    while not f_stop.is_set():
        for message in undelivered(state, position):
            queue.put(message)
        f_stop.wait(_PASS_INTERVAL_S)


@contextmanager
def cohort_delivery() -> Iterator[None]:
    """Simulations started in this scope deliver messages with one walk per pass (their
    LinkState is Flower's in-memory one; any other keeps Flower's own delivery)."""
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    original = vce_api.add_messages_to_queue

    def deliver(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int],
                f_stop: threading.Event) -> None:
        if isinstance(state, InMemoryLinkState):
            _add_messages_to_queue(state, queue, nodes_mapping, f_stop)
        else:
            original(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = deliver
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
