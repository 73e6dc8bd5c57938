"""FFA's shared A must not depend on the process (Python's str hash is salted per process)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from fedlora.aggregation import shared_a


def test_ffa_shared_a_is_identical_in_another_process() -> None:
    code = (
        "import hashlib; from fedlora.aggregation import shared_a; "
        "print(hashlib.sha256(shared_a(7, 'model.layers.0.q_proj', 8, 64).numpy().tobytes())"
        ".hexdigest())"
    )
    # A different str-hash salt than this process: a seed from hash() would differ.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    here = hashlib.sha256(shared_a(7, "model.layers.0.q_proj", 8, 64).numpy().tobytes())
    assert out.stdout.strip() == here.hexdigest()
