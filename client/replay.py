"""The update a DP client already released for a round, kept beside its ledger.

After a server crash the resumed round arrives again with the same downlink and job;
sending the same bytes again reveals nothing new and spends no budget, so the ledger never
counts a round twice. A different downlink or job (or no cached file) means training
anew, which is recorded anew.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedlora.privacy import PrivacyLedger
from fedlora.task.files import atomic_write


class ReplayCache:
    def __init__(self, ledger: PrivacyLedger, round_: int, downlink: bytes, job: dict[str, Any]):
        # Same downlink and same job (seeds, learning rate, ...) = the same training.
        digest = hashlib.sha256(downlink + json.dumps(job, sort_keys=True).encode())
        digest = digest.hexdigest()[:16]
        self.path = ledger.path.with_suffix(f".round-{round_}.{digest}.update")
        self.meta = self.path.with_suffix(".json")

    def load(self) -> tuple[bytes, dict[str, float]] | None:
        if self.path.is_file() and self.meta.is_file():
            return self.path.read_bytes(), json.loads(self.meta.read_text())
        return None

    def store(self, data: bytes, metrics: dict[str, float]) -> None:
        atomic_write(self.path, data, mode=0o600)
        atomic_write(self.meta, json.dumps(metrics).encode(), mode=0o600)
