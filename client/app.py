"""The fedlora ClientApp (Flower Message API).

In a deployment Flower 1.39 starts a ClientApp process for every message, so this module
imports only what routing needs: secure aggregation's key, share and unmask stages
(client/secure.py) never load torch or the model; training and evaluation import the
model stack on first use (client/handlers.py).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.task import messages as msgs

app = ClientApp()
_STAGES = (msgs.PHASE_SECAGG_KEYS, msgs.PHASE_SECAGG_SHARES, msgs.PHASE_SECAGG_UNMASK)


@app.train()
def train(msg: Message, context: Context) -> Message:
    phase = str(msg.content.config_records[msgs.CONFIG].get("phase", msgs.PHASE_TRAIN))
    if phase in _STAGES:
        from .secure import handle_stage

        return handle_stage(msg, context, phase, msg.content.config_records[msgs.CONFIG])
    from .handlers import train as train_round

    return train_round(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from .handlers import evaluate_global

    return evaluate_global(msg, context)
