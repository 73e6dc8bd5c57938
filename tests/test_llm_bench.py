"""The causal-LM benches (bench/llm.py, bench/node_startup.py) run end to end on a toy
shape, and fedlora's training loss is the one the bare PEFT baseline uses (the model's
own ``labels=`` loss), without copying the logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedlora.task.evaluate import forward, loss_of

from .conftest import ROOT


def test_causal_loss_is_the_models_own_loss_on_uncopied_logits():
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.randint(0, 96, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 8:] = -100  # padding
    logits, targets = forward(model, (ids, torch.ones_like(ids), labels), "causal_lm")
    assert logits.is_contiguous() and logits.shape[:2] == targets.shape
    assert (targets[:, -1] == -100).all()  # the last position predicts nothing
    own = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    assert torch.allclose(loss_of(logits, targets), own, atol=1e-6)


def _bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.integration
def test_llm_bench_reports_ratios_to_bare_peft():
    proc = _bench("bench/llm.py", "--json", "--shapes", "tiny-qwen2", "--methods", "ffa",
                  "--modes", "peft,plain,ghost", "--batch", "2", "--seq", "32", "--steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = {row["mode"]: row for row in json.loads(proc.stdout)["summary"]}
    assert set(summary) == {"peft", "plain", "ghost"}
    assert summary["plain"]["speed_vs_peft"] > 0 and summary["ghost"]["memory_vs_plain"] > 0
    paired = _bench("bench/llm.py", "--json", "--paired", "--shapes", "tiny-qwen2",
                    "--methods", "fedsb", "--modes", "peft,plain,hooks", "--batch", "2",
                    "--seq", "32", "--steps", "2")
    assert paired.returncode == 0, paired.stderr[-2000:]
    (result,) = json.loads(paired.stdout)
    assert len(result["modes"]["hooks"]["speed_vs_plain_cycles"]) == 2


@pytest.mark.integration
def test_node_startup_bench_splits_a_message(tmp_path):
    # Batch 16: an empty Poisson batch (e^-16 per step) would stop a Qwen2 forward.
    proc = _bench("bench/node_startup.py", "--json", "--shape", "tiny-qwen2", "--batch", "16",
                  "--seq", "32", "--steps", "2", "--privacy", "ghost", "--workdir",
                  str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = json.loads(proc.stdout)
    assert first["steps"] == second["steps"] == 2
    assert first["overhead_fraction"] > 0 and first["round_s"] > 0
    # The second message reads the node's token cache the first one wrote.
    assert second["spent"]["data"] < first["spent"]["data"]
    assert list((tmp_path / "node" / "cache" / "tokens").glob("*.safetensors"))


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_step_a_causal_lm_with_noise_only(tmp_path, mode):
    """Expected batch 1 (q = 1/500 of 500 rows): each Poisson batch is empty with
    probability e^-1, so 20 steps meet one but with probability 1e-4. A causal LM (whose
    attention cannot run zero rows) still takes every DP-SGD step, the noise moving the
    adapters, and the ledger charges them all."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import TensorDataset
    from transformers import AutoModelForCausalLM

    from fedlora.client.train import train_private
    from fedlora.privacy import DPSettings, PrivacyLedger

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 96, (500, 8))
    data = TensorDataset(ids, torch.ones_like(ids), ids.clone())
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / 500,
                          steps=20, accountant="rdp", grad_sample_mode=mode)
    ledger = PrivacyLedger.open(tmp_path, node="n", federation="f", mechanism="rdp",
                                target_epsilon=1e9, delta=1e-5)
    result = train_private(model, data, {"lr": 0.1, "local_steps": 20, "batch_size": 1,
                                         "optimizer": "sgd"}, "causal_lm",
                           torch.device("cpu"), settings, ledger, 1, 1e9)
    assert result.steps == 20 and result.examples_seen < 60
    assert all(not torch.equal(p, q) for p, q in zip(trained, before, strict=True))
    assert sum(steps for _, _, steps in ledger.history) == 20
