"""Every method instruction-tunes a real causal-LM directory for 2 rounds through Flower's
simulation runtime, on the BBC instruction set split by section; then generation and
export on the run directories.

Three families share the nine methods (taken from the registry): each family's Hydra
multirun runs its three. Llama runs them with and without DP (per-sample hooks), Qwen2
under DP with ghost clipping, GPT-2 without DP.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fedlora.aggregation import available_methods, get_method

from .conftest import read_metrics, run_fedlora
from .llm_models import model_dir

pytestmark = pytest.mark.integration
METHODS = available_methods()
FAMILIES = {"llama": (METHODS[0::3], "none,dp", ["++privacy.grad_sample_mode=hooks"]),
            "qwen2": (METHODS[1::3], "dp", ["++privacy.grad_sample_mode=ghost"]),
            "gpt2": (METHODS[2::3], "none", [])}
COMMON = ["model=hf_local", "model.task=causal_lm", "model.max_length=96", "data=bbc_instruct",
          "data.max_train_examples=160", "data.max_test_examples=16", "data.article_chars=400",
          "data.generation_prompts=2", "data.max_new_tokens=4", "federation.rounds=2",
          "federation.num_clients=2", "federation.clients_per_round=2",
          "federation.min_client_examples=16", "federation.dirichlet_alpha=0.3",
          "strategy.local_steps=2", "strategy.batch_size=8", "strategy.sample_rate=null",
          "++privacy.accountant=rdp"]


def test_every_method_is_covered():
    assert sorted(m for methods, _, _ in FAMILIES.values() for m in methods) == sorted(METHODS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[tuple[str, str, bool], Path]:
    """(family, method, private) -> run directory."""
    models = tmp_path_factory.getbasetemp() / "llm-models"
    out: dict[tuple[str, str, bool], Path] = {}
    for family, (methods, privacy, extra) in FAMILIES.items():
        sweep = tmp_path_factory.mktemp(f"sweep-{family}")
        run_fedlora(["simulate", "-m", *COMMON, f"model.path={model_dir(family, models)}",
                     f"strategy={','.join(methods)}", f"privacy={privacy}", *extra,
                     f"hydra.sweep.dir={sweep}"])
        for run in sweep.iterdir():
            if (run / "config.yaml").is_file():
                cfg = yaml.safe_load((run / "config.yaml").read_text())
                out[(family, cfg["strategy"]["name"], bool(cfg["privacy"]["enabled"]))] = run
    return out


def test_runs_report_perplexity_generation_and_privacy(runs):
    expected = {(f, m, p) for f, (methods, privacy, _) in FAMILIES.items() for m in methods
                for p in ([False, True] if privacy == "none,dp" else [privacy == "dp"])}
    assert set(runs) == expected
    for (family, method, private), run in runs.items():
        rows = read_metrics(run)
        assert [r["round"] for r in rows] == [1, 2], (family, method)
        assert all(r["perplexity"] > 1.0 and 0 <= r["accuracy"] <= 1 for r in rows)
        generation = [json.loads(line) for line in (run / "generation.jsonl").read_text()
                      .splitlines()]
        assert [g["round"] for g in generation] == [1, 2]
        assert all(0 <= g["exact_match"] <= 1 and 0 <= g["rougeL"] <= 1 for g in generation)
        for client in rows[-1]["clients"]:
            assert ("delta" in client) == private, (family, method, client)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_perplexity"] == rows[-1]["perplexity"]


def test_exported_adapters_load_with_peft(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    for (family, method, _), run in runs.items():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        # The original architecture: for GPT-2 its Conv1D layers, not fedlora's swap.
        base = AutoModelForCausalLM.from_pretrained(cfg["model"]["path"]).eval()
        plain = base(ids).logits
        model = PeftModel.from_pretrained(base, run / "adapter").eval()
        tuned = model(ids).logits
        assert torch.isfinite(tuned).all()
        if not get_method(method).personalized:
            assert not torch.allclose(plain, tuned), (family, method)


def test_generate_prints_an_answer_and_refuses_fedsa(runs):
    run = runs[("llama", "fedavg", False)]
    proc = run_fedlora(["generate", str(run), "--prompt", "Write a headline: rain in Leeds",
                        "--max-new-tokens", "6"])
    assert proc.stdout.strip()  # some text (a 2-round tiny model's words, not a headline)
    from fedlora.deploy.generate import UsageError, answer

    personalized = runs[("gpt2", "fedsa", False)]
    with pytest.raises(UsageError, match="fedsa is personalized"):
        answer(personalized, "hi")
    # Each simulated node wrote its own B to its own directory; generate reads one.
    files = sorted((personalized / "node-keys").glob("partition-*/personal-factors-*"))
    assert len(files) == 2, files
    assert isinstance(answer(personalized, "Write a headline: rain in Leeds",
                             max_new_tokens=4, node_factors=files[0]), str)
    # Each node's model is the base with that node's own delta merged in.
    from transformers import AutoModelForCausalLM

    from fedlora.deploy.generate import load_for_generation

    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    cfg = yaml.safe_load((personalized / "config.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["model"]["path"]).eval()(ids).logits
    nodes = [load_for_generation(personalized, f)[0](ids).logits for f in files]
    assert not torch.allclose(nodes[0], base) and not torch.allclose(nodes[0], nodes[1])


def test_merged_export_loads_with_auto_model(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.deploy.generate import export

    run = runs[("gpt2", "ffa", False)]
    out = export(run, tmp_path / "merged", merged=True)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["model"]["path"]), run / "adapter").eval()
    ids = torch.randint(5, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-4)
    assert (out / "tokenizer_config.json").is_file()


def test_bad_instruction_file_exits_2_naming_line_and_field(tmp_path, tmp_path_factory):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    models = tmp_path_factory.getbasetemp() / "llm-models"
    proc = run_fedlora(["simulate", "model=hf_local", "model.task=causal_lm",
                        f"model.path={model_dir('gpt2', models)}", "data=instruct",
                        f"data.path={bad}", f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}:2: missing field 'output'" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
