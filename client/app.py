"""The fedlora ClientApp (Flower Message API).

In a deployment Flower 1.39 starts a ClientApp process for every message, so this module
imports only what routing needs: secure aggregation's key, share and unmask stages
(client/secure.py) never load torch or the model; training and evaluation import the
model stack on first use (client/handlers.py).

``app`` is the ClientApp every deployment and simulation runs. :func:`make_client_app`
builds the same app wrapped in Flower mods (``Mod(msg, context, call_next) -> Message``),
for tools and tests that watch or perturb a node's messages in a simulation
(deploy/simulate.py's :func:`~fedlora.deploy.simulate.client_mods`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.task import messages as msgs

if TYPE_CHECKING:
    from flwr.clientapp.typing import Mod

_STAGES = (msgs.PHASE_SECAGG_KEYS, msgs.PHASE_SECAGG_SHARES, msgs.PHASE_SECAGG_UNMASK)


def train(msg: Message, context: Context) -> Message:
    phase = str(msg.content.config_records[msgs.CONFIG].get("phase", msgs.PHASE_TRAIN))
    if phase in _STAGES:
        from .secure import handle_stage

        return handle_stage(msg, context, phase, msg.content.config_records[msgs.CONFIG])
    from .handlers import train as train_round

    return train_round(msg, context)


def evaluate(msg: Message, context: Context) -> Message:
    from .handlers import evaluate_global

    return evaluate_global(msg, context)


def make_client_app(mods: Sequence[Mod] = ()) -> ClientApp:
    """fedlora's ClientApp; every message (each secure aggregation stage included) passes
    through ``mods``, the first outermost, as Flower's ``ClientApp(mods=...)`` does."""
    client_app = ClientApp(mods=list(mods))
    client_app.train()(train)
    client_app.evaluate()(evaluate)
    return client_app


app = make_client_app()
