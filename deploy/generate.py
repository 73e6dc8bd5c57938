"""``fedlora generate`` and ``fedlora export``: use a run's global adapter.

  fedlora generate RUN_DIR --prompt TEXT [--max-new-tokens N] [--raw]
                   [--node-factors FILE]        a personalized method's node model
  fedlora export RUN_DIR --out DIR [--merged]   the PEFT adapter, or full merged weights

The prompt goes through the same template as training (the tokenizer's chat template, or
the job's named one); ``--raw`` sends it as is. A personalized method (fedsa) has no
global model: the adapter in RUN_DIR is the base plus the averaged head, so generation
needs a node's own factors: the safetensors file each node writes to its own key
directory as it trains (``personal-factors-<run_name>.safetensors``, of ``<module>::B``
tensors; in a simulation ``RUN_DIR/node-keys/partition-K/``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


class UsageError(ValueError):
    """A run directory or option this command cannot use (exit status 2)."""


def _job(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UsageError(f"{config} not found: not a fedlora run directory")
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise UsageError(f"{run_dir / 'adapter'} holds no adapter: the run did not finish")
    job = OmegaConf.to_container(OmegaConf.load(str(config)), resolve=True)
    if job["model"].get("task") != "causal_lm":
        raise UsageError(f"model.task is {job['model'].get('task')!r}: generation and merged "
                         "export are for causal LMs (model.task=causal_lm)")
    return job


def _personal_model(job: dict[str, Any], run_dir: Path, factors_file: Path) -> nn.Module:
    """The base with a personalized method's node delta (s B_k, A) merged in."""
    from safetensors.torch import load_file

    from fedlora.aggregation import SEP, get_method
    from fedlora.server.checkpoint import latest_checkpoint, load_checkpoint
    from fedlora.task.adapters import merge_deltas
    from fedlora.task.models import build_model, target_module_names

    method = get_method(job["strategy"]["name"])
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UsageError(f"{run_dir} has no checkpoint holding the shared factors")
    state, _ = load_checkpoint(checkpoint)
    kept = load_file(str(factors_file))
    model = build_model(job["model"], 1)
    targets = target_module_names(model, list(job["model"]["target_modules"]))
    deltas = {}
    for name in targets:
        key = f"{name}{SEP}B"
        if key not in kept:
            raise UsageError(f"{factors_file} has no {key!r}: not this run's node factors")
        deltas[name] = method.personal_delta(state, kept[key].float(), name)
    linears = {n: model.get_submodule(n) for n in targets}
    merge_deltas(linears, {n: lin.weight.detach().clone() for n, lin in linears.items()}, deltas)
    return model


def load_for_generation(run_dir: Path, node_factors: Path | None = None
                        ) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model with the run's adapter, tokenizer, job config)."""
    from peft import PeftModel

    from fedlora.aggregation import get_method
    from fedlora.task.models import build_model, load_tokenizer

    job = _job(run_dir)
    method = get_method(job["strategy"]["name"])
    if method.personalized:
        if node_factors is None:
            raise UsageError(
                f"{method.name} is personalized: each node keeps its own "
                f"{'/'.join(method.node_keeps)}, so the run's adapter is the base model "
                f"without any node's training; pass --node-factors FILE, the safetensors of "
                f"the factors a node keeps")
        if not node_factors.is_file():
            raise UsageError(f"--node-factors {node_factors} does not exist")
        model = _personal_model(job, run_dir, node_factors)
    else:
        if node_factors is not None:
            raise UsageError(f"--node-factors is for personalized methods; {method.name} "
                             "has one global model")
        model = PeftModel.from_pretrained(build_model(job["model"], 1), str(run_dir / "adapter"))
    return model.eval(), load_tokenizer(job["model"]), job


def answer(run_dir: Path, prompt: str, *, max_new_tokens: int = 32, raw: bool = False,
           node_factors: Path | None = None) -> str:
    """The run's model's greedy answer to one prompt."""
    from fedlora.task.generation import generate
    from fedlora.task.templates import render_prompt, resolve_template

    model, tokenizer, job = load_for_generation(run_dir, node_factors)
    data, model_cfg = job["data"], job["model"]
    if raw:
        template, text = "plain", prompt
    else:
        name = str(data.get("template") or "auto") if data.get("kind") == "instruct" else "auto"
        template = resolve_template(name, tokenizer)
        text = render_prompt([{"role": "user", "content": prompt}], template, tokenizer)
    tiny = str(model_cfg["source"]).startswith("tiny")
    (out,) = generate(model, tokenizer, [text], template=template,
                      max_length=int(model_cfg["max_length"]) + max_new_tokens,
                      max_new_tokens=max_new_tokens,
                      vocab_cap=int(model_cfg["vocab_size"]) if tiny else None)
    return out


def export(run_dir: Path, out: Path, *, merged: bool = False) -> Path:
    """Copy the PEFT adapter to ``out``, or (merged) write full weights + tokenizer that
    ``AutoModelForCausalLM.from_pretrained(out)`` loads."""
    if not merged:
        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise UsageError(f"{run_dir / 'adapter'} holds no adapter")
        shutil.copytree(run_dir / "adapter", out, dirs_exist_ok=True)
        return out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.aggregation import get_method
    from fedlora.task.llm import torch_dtype
    from fedlora.task.models import build_model, load_tokenizer, model_directory

    job = _job(run_dir)
    if get_method(job["strategy"]["name"]).personalized:
        raise UsageError(f"{job['strategy']['name']} is personalized: there is no global "
                         "model to merge (each node keeps its own factors)")
    model_cfg = job["model"]
    directory = model_directory(model_cfg)
    if directory is not None and str(model_cfg.get("quantization") or "none") == "none":
        # The original architecture (GPT-2 keeps its Conv1D): PEFT merges into it.
        base = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch_dtype(str(model_cfg.get("dtype") or "auto"), "cpu"))
    elif directory is None:
        base = build_model(model_cfg, 1)
    else:
        raise UsageError("a quantized base cannot take merged weights exactly: export the "
                         "adapter, or merge onto the unquantized base (model.quantization=none)")
    merged_model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    merged_model.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged_model.save_pretrained(out)
    load_tokenizer(model_cfg).save_pretrained(out)
    return out


def main_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedlora generate",
                                     description="The global adapter's answer to a prompt.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--raw", action="store_true", help="no template: the prompt as is")
    parser.add_argument("--node-factors", type=Path, default=None,
                        help="personalized methods: a node's kept factors (safetensors)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        print(answer(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                     raw=args.raw, node_factors=args.node_factors))
    except UsageError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        return 2
    return 0


def main_export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedlora export",
                                     description="Write a run's adapter or merged weights.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--merged", action="store_true",
                        help="full weights with the adapter merged in (causal LMs)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, merged=args.merged)
    except UsageError as exc:
        print(f"fedlora: {exc}", file=sys.stderr)
        return 2
    print(f"{'merged model' if args.merged else 'adapter'} written to {out}")
    return 0
