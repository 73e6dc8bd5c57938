"""What one deployed training message costs a node beyond its training steps.

    python bench/node_startup.py [--shape qwen2.5-0.5b] [--privacy hooks] [--batch 8]
                                 [--seq 128] [--steps 10] [--data bbc_instruct]
                                 [--workdir DIR] [--json]

Flower 1.39 starts a fresh ClientApp process for every message (flwr-clientapp, one
process per message, nothing reused), so every training message pays the interpreter
start, the imports of the client app, the base model's load, the data's load and
tokenization, the adapter injection and (under DP) the DP setup and Opacus's wrapping,
before and around its local steps. This bench runs two training messages (rounds 1 and
2 of one job) in two fresh processes, as a node would, and splits each one's wall time:

- the interpreter start, ``import fedlora.client.app`` (what Flower loads first) and the
  handler's own imports (client/handlers.py and what it pulls in);
- data (read + tokenize, or the node-local token cache), the config checks, the base
  model's load, the W0 fingerprint and copy, the node's partition, DP setup (noise
  calibration, ledger), adapter injection, DP wrapping (Opacus's hooks, the ledger's
  record), the reply, the process exit;
- the training steps: from the first training forward to the last optimizer step (the
  first step's warm-up, and the first touch of the memory-mapped weights, count here).

The overhead is the message's wall time minus its training steps, printed as a fraction
of a round of 10 steps of ``--batch`` examples at the time per example measured (under
DP the batches are Poisson draws of mean ``--batch``). The second message may use what
the first left on the node (the token cache). ``--steps`` below 10 runs fewer steps and
scales the round (the overhead does not depend on the step count).

Under DP the job is dp_eps8 with ``privacy.max_physical_batch_size`` = ``--batch``.
The base is the shape's published configuration with random weights, saved once with
safetensors (and a byte-level BPE tokenizer trained on BBC News, vocabulary 32000, a
ChatML chat template as Qwen2.5's) under ``--workdir`` (default: a directory in the
system's temp folder, kept between runs). The node's ledger, keys and cache are cleared
at the start of every run, so the first message always starts cold.
"""

from __future__ import annotations

import time

_T0 = time.time()  # first thing: the child's interpreter start ends here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROUND_STEPS = 10
CACHE_ENV = "FEDLORA_CACHE_DIR"
PHASES = (
    ("interpreter start", "start"),
    ("import fedlora.client.app", "import_app"),
    ("import client handlers", "import_handlers"),
    ("data load + tokenize", "data"),
    ("config checks", "checks"),
    ("base model load", "model"),
    ("W0 fingerprint", "fingerprint"),
    ("adapter host (W0 copy)", "host"),
    ("node partition", "partition"),
    ("DP setup (calibration, ledger)", "dp_setup"),
    ("adapter injection", "inject"),
    ("DP wrapping + ledger record", "dp_wrap"),
    ("reply (encode, release)", "reply"),
    ("process exit", "exit"),
    ("other", "other"),
)


# -- setup (once per workdir) -----------------------------------------------------------
def _tokenizer(vocab: int):
    """A byte-level BPE tokenizer (vocabulary ``vocab``) trained on BBC News, with Qwen2.5's
    special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedlora.task.data import bbc_news

    texts, _, _ = bbc_news()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def prepare_model(directory: Path, shape: str) -> Path:
    """The shape's model (random weights) and tokenizer saved as a Hugging Face directory."""
    if (directory / "config.json").is_file():
        return directory
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llm_models import build  # bench/llm_models.py

    model, config, _ = build(shape)
    tokenizer = _tokenizer(min(32000, config.vocab_size))
    config.bos_token_id = None
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    """The model directory, the job, the downlinks of rounds 1 and 2, the node config."""
    import torch

    from fedlora.aggregation import AdapterSpec
    from fedlora.client.runtime import method_from_config
    from fedlora.protos import Envelope, encode
    from fedlora.task.config import compose_job
    from fedlora.task.models import build_model, fingerprint, target_module_names

    model_dir = prepare_model(workdir / f"model-{args.shape}", args.shape)
    overrides = [
        "model=hf_local", f"model.path={model_dir}", "model.task=causal_lm",
        f"model.max_length={args.seq}", "strategy=ffa", f"strategy.batch_size={args.batch}",
        "strategy.sample_rate=null", f"strategy.local_steps={args.steps}",
        "federation.num_clients=5", "federation.clients_per_round=5",
        "federation.min_clients=1", "federation.rounds=3",
    ]
    if args.data == "instruct":
        path = workdir / "bbc-instruct.jsonl"
        if not path.is_file():
            from fedlora.task.bbc_instruct import write_jsonl

            write_jsonl(path)
        overrides += ["data=instruct", f"data.path={path}", "data.group_column=section"]
    else:
        overrides += ["data=bbc_instruct"]
    if args.privacy == "none":
        overrides += ["privacy=none"]
    else:
        # Poisson batches above ``--batch`` run in two passes (Opacus's BatchMemoryManager),
        # so the job fits the memory check of a machine with some 16 GB free.
        overrides += ["privacy=dp_eps8", f"privacy.grad_sample_mode={args.privacy}",
                      f"privacy.max_physical_batch_size={args.batch}"]
    job = compose_job(overrides)
    # What the server sends: the method's first downlink, for the base's W0 fingerprint.
    model = build_model(job["model"], 1)
    targets = target_module_names(model, list(job["model"]["target_modules"]))
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features)
              for n in targets}
    strategy = job["strategy"]
    spec = AdapterSpec(shapes=shapes, rank=int(strategy["rank"]), alpha=float(strategy["alpha"]),
                       seed=int(job["federation"]["seed"]))
    method = method_from_config(strategy)
    print_ = fingerprint(model, targets)
    del model
    torch.manual_seed(0)
    state = method.init_state(spec)
    for number in (1, 2):
        envelope = Envelope(method=method.name, round=number, direction="down",
                            factors=method.downlink(state, first_contact=True, rank=spec.rank),
                            head={}, fingerprint=print_, rank=spec.rank, scaling=spec.scaling)
        (workdir / f"downlink-{number}.bin").write_bytes(encode(envelope, job["wire_dtype"]))
    (workdir / "job.json").write_text(json.dumps(job, sort_keys=True))
    return job


# -- one message (in a fresh process) ---------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.marks: dict[str, list[float]] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            self.marks.setdefault(label + ":start", []).append(started)
            try:
                result = inner(*args, **kwargs)
                self.marks.setdefault(label + ":result", []).append(result)
                return result
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)


def run_message(workdir: Path, number: int) -> dict:
    """Answer round ``number``'s training message as a fresh ClientApp process would."""
    clock = _Clock()
    started = time.perf_counter()
    import fedlora.client.app as client_app

    clock.spent["import_app"] = time.perf_counter() - started
    started = time.perf_counter()
    from fedlora.client import handlers

    clock.spent["import_handlers"] = time.perf_counter() - started
    import torch
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.client import runtime
    from fedlora.task import base_model
    from fedlora.task import messages as msgs

    # Built outside a Flower run: the identity a run would give this process.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, number
    for name, label in (("data_for", "data"), ("check_llm", "checks"),
                        ("check_memory", "checks"), ("build_model", "model"),
                        ("fingerprint", "fingerprint")):
        clock.wrap(base_model, name, label)
    clock.wrap(runtime.AdapterHost, "__init__", "host")
    clock.wrap(runtime.AdapterHost, "start", "inject")
    for name, label in (("_partition", "partition"), ("dp_setup", "dp_setup"),
                        ("train_plain", "train"), ("train_private", "train"),
                        ("encode", "reply")):
        clock.wrap(handlers, name, label)
    clock.wrap(handlers._Release, "reply", "reply")
    steps: list[float] = []  # when each optimizer step ended
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(
        lambda *_: steps.append(time.perf_counter()))
    loop: list[float] = []  # when the first training forward began

    def first_forward(*_):
        loop.append(time.perf_counter())
        handle.remove()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(first_forward)

    job = json.loads((workdir / "job.json").read_text())
    node = workdir / "node"
    context = Context(run_id=1, node_id=1, node_config={
        "partition-id": 0, "num-partitions": 5, "ledger-dir": str(node / "ledger"),
        "key-dir": str(node / "keys")}, state=RecordDict(), run_config={})
    record = msgs.config_record(job, phase=msgs.PHASE_TRAIN, **{"server-round": number})
    data = (workdir / f"downlink-{number}.bin").read_bytes()
    msg = Message(RecordDict({msgs.ENVELOPE: msgs.envelope_record(data), msgs.CONFIG: record}),
                  1, "train")
    reply = client_app.app(msg, context)
    metrics = dict(reply.content.metric_records[msgs.METRICS])
    if metrics.get("refused"):
        raise SystemExit(f"the node refused: {dict(reply.content.config_records[msgs.CONFIG])}")
    spent = clock.spent
    training = steps[-1] - loop[0]
    # The training call less its steps: Opacus's wrapping, the ledger's record, cleanup.
    spent["dp_wrap"] = spent.pop("train") - training
    examples = sum(r.examples_seen for r in clock.marks["train:result"])
    return {"round": number, "steps": len(steps), "examples": examples,
            "steps_s": training, "seconds_per_example": training / examples, "spent": spent,
            "t0": _T0, "t_end": time.time(), "threads": torch.get_num_threads()}


def measure(workdir: Path, number: int, batch: int) -> dict:
    env = dict(os.environ, **{CACHE_ENV: str(workdir / "node" / "cache")})
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, "--message", str(workdir),
                           "--round", str(number)], capture_output=True, text=True, env=env)
    ended = time.time()
    if proc.returncode:
        raise SystemExit(f"message {number} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    spent = row["spent"]
    spent["start"] = row["t0"] - launched
    spent["exit"] = ended - row["t_end"]
    total = ended - launched
    spent["other"] = total - row["steps_s"] - sum(v for k, v in spent.items())
    overhead = total - row["steps_s"]
    round_s = ROUND_STEPS * batch * row["seconds_per_example"]
    return dict(row, total_s=total, overhead_s=overhead, round_s=round_s,
                overhead_fraction=overhead / round_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--privacy", default="hooks", choices=("none", "hooks", "ghost"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=ROUND_STEPS)
    parser.add_argument("--data", default="bbc_instruct", choices=("bbc_instruct", "instruct"))
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "fedlora-node-startup")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--message", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.message:
        print(json.dumps(run_message(args.message, args.round)))
        return 0
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.setup:
        prepare(workdir, args)
        return 0
    given = sys.argv[1:] if argv is None else list(argv)
    setup = subprocess.run([sys.executable, __file__, "--setup", *given],
                           env=dict(os.environ, **{CACHE_ENV: str(workdir / "setup-cache")}))
    if setup.returncode:
        return setup.returncode
    shutil.rmtree(workdir / "node", ignore_errors=True)
    rows = [measure(workdir, number, args.batch) for number in (1, 2)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    first_row = rows[0]
    print(f"{args.shape}, privacy {args.privacy}, batch {args.batch}, seq {args.seq}, "
          f"{first_row['steps']} steps run ({first_row['examples']} / {rows[1]['examples']} "
          f"examples), data {args.data}, "
          f"{first_row['threads']} torch threads")
    print(f"{'seconds':<32} {'message 1':>10} {'message 2':>10}")
    for title, key in PHASES:
        print(f"{title:<32} " + " ".join(f"{r['spent'].get(key, 0.0):10.2f}" for r in rows))
    for title, key in (("training steps", "steps_s"), ("message total", "total_s"),
                       ("overhead (total - steps)", "overhead_s"),
                       (f"round of {ROUND_STEPS} x {args.batch} examples", "round_s")):
        print(f"{title:<32} " + " ".join(f"{r[key]:10.2f}" for r in rows))
    print(f"{'overhead / round':<32} " + " ".join(f"{r['overhead_fraction']:10.1%}"
                                                  for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
