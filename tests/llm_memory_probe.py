"""Measure one client's peak RSS growth over a few training steps, in a fresh process.

python -m tests.llm_memory_probe CONFIG.json -> prints {"estimate": bytes, "measured": bytes}

The baseline is the RSS after every import and after the data are tokenized (the estimate
counts the data separately: it is subtracted); the peak is ru_maxrss after the base model
loads, the adapters are injected and ``steps`` optimizer steps (plain or DP) run.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path


def measure(cfg: dict, steps: int = 3) -> dict[str, int]:
    import psutil
    import torch

    # Imports are not the client's peak: what loading the base imports lazily (the model
    # family's modeling code) is imported before the baseline too. Without it the window
    # counted transformers whenever the data came from the token cache (no tokenizer load).
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import fedlora.client.train as train  # noqa: F401
    from fedlora.aggregation import get_method
    from fedlora.privacy import DPSettings, PrivacyLedger
    from fedlora.task.adapters import AdapterHost
    from fedlora.task.base_model import load_base
    from fedlora.task.data import data_for
    from fedlora.task.memory import estimate

    torch.set_num_threads(1)
    data = data_for(cfg)
    before = psutil.Process().memory_info().rss
    # The peak from here on: building the data (a fresh checkout makes the BBC instruction
    # set in this process) may have peaked higher before the baseline.
    _reset_peak()
    base = load_base(cfg, "cpu")
    method = get_method(cfg["strategy"]["name"])
    host = AdapterHost(base.model, base.targets, base.head_names, method.adapter_layer)
    spec = base.spec(cfg)
    start = method.client_start(method.downlink(method.init_state(spec), first_contact=True), spec)
    model = host.start(start, {})
    strategy = dict(cfg["strategy"], local_steps=steps)
    if cfg["privacy"]["enabled"]:
        settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0,
                              sample_rate=strategy["batch_size"] / len(data.train), steps=steps,
                              accountant="rdp", grad_sample_mode=cfg["privacy"]["grad_sample_mode"])
        ledger = PrivacyLedger.open(tempfile.mkdtemp(), node="probe", federation="probe",
                                    mechanism="rdp", target_epsilon=1e6, delta=1e-5)
        train.train_private(model, data.train, strategy, "causal_lm", base.device, settings,
                            ledger, 1, 1e6)
    else:
        train.train_plain(model, data.train, strategy, "causal_lm", base.device,
                          torch.Generator().manual_seed(0))
    peak = _peak()
    need = estimate(cfg)  # examples=0: the data were loaded before the baseline
    return {"estimate": need.total, "measured": peak - before}


def _reset_peak() -> None:
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(Path(sys.argv[1]).read_text()))))
