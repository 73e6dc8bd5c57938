"""The job's typed schema: every config key with its type, default, bounds and meaning.

Hydra builds each job on these dataclasses (registered as ``job_schema``, the first entry
of conf/config.yaml's defaults), so a group file or a command-line override of the wrong
type fails, and ``fedlora simulate --cfg job`` prints every key. The groups (model/, data/,
strategy/, privacy/) are choices that set values on top; keys a choice does not use keep
their default (None for a key only some choices use).

Bounds and choices live here too (:func:`knob`); :func:`schema_problems` checks a job
against all of it and lists every problem, and task/config.py adds the rules that span
several keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any

from fedlora.privacy import ACCOUNTANTS, GRAD_SAMPLE_MODES
from fedlora.protos import WIRE_DTYPES

from .knobs import bound_problem, knob
from .training import LRSchedule, ServerOptimizerConfig

MODEL_SOURCES = ("package", "path", "tiny_bert", "tiny_llama")
MODEL_TASKS = ("classification", "causal_lm")
POOLINGS = ("pooler", "mean")
DATA_SOURCES = ("bbc_news", "csv", "jsonl", "disk", "synthetic")
CLIENT_OPTIMIZERS = ("adamw", "sgd")
WEIGHTINGS = ("examples", "uniform")
CLIENT_SAMPLINGS = ("poisson", "all")


@dataclass
class ModelConfig:
    name: str = knob("minilm", "name of the model choice (conf/model/<name>.yaml)")
    source: str = knob("package", "where the weights come from", choices=MODEL_SOURCES)
    package: str | None = knob(None, "source=package: the installed model package")
    path: str | None = knob(None, "source=path: a local Hugging Face model directory")
    task: str = knob("classification", "what the model is trained for", choices=MODEL_TASKS)
    target_modules: list[str] = knob(["query", "value"], "modules that get LoRA adapters "
                                     "([auto]: the model family's usual ones)")
    head_modules: list[str] = knob([], "modules trained in full beside the adapters "
                                   "(classification heads)")
    pooling: str = knob("pooler", "classification: pooler (the model's own head) or mean "
                        "(a linear head on the masked mean)", choices=POOLINGS)
    max_length: int = knob(64, "tokens per example (longer ones are truncated)", low=2)
    hidden_size: int | None = knob(None, "tiny models: hidden width", low=1)
    num_layers: int | None = knob(None, "tiny models: layers", low=1)
    num_heads: int | None = knob(None, "tiny models: attention heads", low=1)
    vocab_size: int | None = knob(None, "tiny models: vocabulary size", low=2)
    init_seed: int = knob(0, "tiny models: seed of the random weights")
    dtype: str | None = knob(None, "causal LMs: auto, float32, bfloat16 or float16")
    gradient_checkpointing: bool = knob(False, "causal LMs: recompute activations in the "
                                        "backward pass")
    quantization: str | None = knob(None, "causal LMs: none, nf4 or int8 frozen base (CUDA)")
    check_memory: bool = knob(True, "refuse before training when the memory estimate does "
                              "not fit the device")


@dataclass
class DataConfig:
    name: str = knob("bbc_news", "name of the data choice (conf/data/<name>.yaml)")
    source: str = knob("bbc_news", "where the examples come from", choices=DATA_SOURCES)
    path: str | None = knob(None, "csv, jsonl, disk: the file or directory to read")
    test_path: str | None = knob(None, "a separate test file (null: carve test_fraction out)")
    text_column: str = knob("text", "the field holding the text")
    label_column: str = knob("label", "the field holding the label")
    test_fraction: float = knob(0.2, "share of the examples held out for testing",
                                low=0, high=1, above=True, below=True)
    validation_fraction: float = knob(0.0, "share of the training examples carved out as a "
                                      "validation split (what `fedlora tune` ranks on)",
                                      low=0, high=1, below=True)
    split_seed: int = knob(0, "seed of the train/test (and validation) split")
    max_train_examples: int | None = knob(None, "keep at most this many training examples",
                                          low=1)
    max_test_examples: int | None = knob(None, "keep at most this many test examples", low=1)
    # synthetic
    num_train: int | None = knob(None, "synthetic: training examples", low=1)
    num_test: int | None = knob(None, "synthetic: test examples", low=1)
    num_classes: int | None = knob(None, "synthetic: classes", low=2)
    seq_len: int | None = knob(None, "synthetic: tokens per example", low=2)
    # instruction data
    kind: str | None = knob(None, "instruct: examples are prompts with responses")
    format: str | None = knob(None, "instruct: auto, alpaca, chat or prompt_completion")
    template: str | None = knob(None, "instruct: auto, chat, alpaca or plain")
    group_column: str | None = knob(None, "instruct: field that partitions clients (non-IID)")
    packing: bool = knob(False, "instruct: pack several examples into one sequence")
    generation_prompts: int = knob(0, "instruct: held-out prompts generated from per round",
                                   low=0)
    max_new_tokens: int | None = knob(None, "instruct: tokens generated per prompt", low=1)
    tasks: list[str] | None = knob(None, "bbc_instruct: headline and/or section")
    article_chars: int | None = knob(None, "bbc_instruct: characters of article in a prompt",
                                     low=1)


@dataclass
class StrategyConfig:
    name: str = knob("???", "the aggregation method, set by the strategy choice "
                     "(`fedlora methods` lists them)")
    rank: int = knob(8, "LoRA rank r", low=1)
    alpha: float = knob(16.0, "LoRA alpha (scaling alpha / r)", low=0, above=True)
    lr: float = knob(0.005, "client learning rate", low=0, above=True)
    local_steps: int = knob(10, "client optimizer steps per round", low=1)
    batch_size: int = knob(16, "client batch (under DP: the expected Poisson batch)", low=1)
    weight_decay: float = knob(0.0, "client weight decay", low=0)
    weighting: str = knob("examples", "client weights p_k in the aggregate",
                          choices=WEIGHTINGS)
    options: dict[str, Any] = knob({}, "the method's typed options (`fedlora methods`)")
    sample_rate: float | None = knob(
        None, "one sample rate q for every client: its (under DP: expected Poisson) batch is "
        "q x N_k; null: every client uses batch_size", low=0, high=1, above=True)
    optimizer: str = knob("adamw", "client optimizer", choices=CLIENT_OPTIMIZERS)
    momentum: float = knob(0.0, "sgd momentum", low=0, high=1, below=True)
    lr_schedule: LRSchedule = knob(LRSchedule(), "client learning rate across rounds: kind "
                                   "constant, cosine, linear or step")
    server_optimizer: ServerOptimizerConfig = knob(
        ServerOptimizerConfig(), "optimizer on the aggregated update: none, momentum "
        "(FedAvgM) or adam (FedAdam); post-processing, no privacy cost")


@dataclass
class ClientLevelConfig:
    enabled: bool = knob(False, "client-level DP (DP-FedAvg): protects each client's whole "
                         "data set")
    epsilon: float = knob(8.0, "client-level budget", low=0, above=True)
    delta: float = knob(1.0e-5, "client-level delta (must be < 1 / num_clients)", low=0,
                        high=1, above=True, below=True)
    clip: float = knob(0.5, "C: L2 bound of one client's update", low=0, above=True)
    sampling: str = knob("poisson", "poisson (each client with probability cohort / clients) "
                         "or all (a fixed cohort, no amplification)", choices=CLIENT_SAMPLINGS)
    accountant: str = knob("rdp", "rdp or prv", choices=ACCOUNTANTS)
    fixed_denominator: bool = knob(True, "divide the noised sum by the expected cohort "
                                   "(must stay true: anything else breaks the sensitivity)")
    adaptive: bool = knob(False, "adaptive clipping: C follows a quantile of update norms")
    target_quantile: float = knob(0.5, "adaptive clipping: the quantile", low=0, high=1)
    clip_lr: float = knob(0.2, "adaptive clipping: geometric step of C", low=0, above=True)
    count_noise: float | None = knob(None, "adaptive clipping: std of the noise on the "
                                     "unclipped count (null: cohort / 20)", low=0, above=True)
    max_colluding: int | None = knob(None, "distributed DP: clients of a round that may "
                                     "collude with the server (null: threshold // 3)", low=0)
    ledger_dir: str | None = knob(None, "the server's ledger (null: RUN_DIR/privacy)")


@dataclass
class PrivacyConfig:
    enabled: bool = knob(False, "sample-level DP-SGD at every client (Opacus)")
    epsilon: float | None = knob(None, "sample-level budget of the whole run", low=0,
                                 above=True)
    delta: float | None = knob(None, "sample-level delta", low=0, high=1, above=True,
                               below=True)
    max_grad_norm: float | None = knob(None, "per-example clipping bound", low=0, above=True)
    accountant: str | None = knob(None, "prv or rdp: the same accountant calibrates and "
                                  "reports", choices=ACCOUNTANTS)
    grad_sample_mode: str = knob("hooks", "hooks or ghost (Opacus fast gradient clipping)",
                                 choices=GRAD_SAMPLE_MODES)
    max_physical_batch_size: int | None = knob(
        None, "split each Poisson batch into passes of at most this many examples (same "
        "noise and epsilon)", low=1)
    secure_mode: bool = knob(False, "the four-draw Gaussian that resists floating-point "
                             "attacks")
    client_evaluation: bool = knob(False, "ask nodes to evaluate on their own data (outside "
                                   "the guarantee; only nodes that allow it answer)")
    ledger_dir: str | None = knob(None, "simulation: where nodes keep their ledgers (null: "
                                  "RUN_DIR/privacy)")
    client_level: ClientLevelConfig = knob(ClientLevelConfig(), "client-level DP")


@dataclass
class PartitionConfig:
    self_balancing: bool = knob(False, "dirichlet: stop giving a client data once above "
                                "average")
    num_classes_per_partition: int = knob(2, "pathological: classes per client", low=1)
    class_assignment_mode: str = knob("random", "pathological: random, deterministic or "
                                      "first-deterministic")
    num_shards_per_partition: int | None = knob(None, "shard: shards per client", low=1)
    shard_size: int | None = knob(None, "shard: examples per shard", low=1)
    sizes: list[int] | None = knob(None, "size, inner_dirichlet: examples per client")


@dataclass
class FederationConfig:
    num_clients: int = knob(10, "clients in the federation", low=1)
    clients_per_round: int = knob(10, "clients sampled each round", low=1)
    min_clients: int = knob(2, "valid updates a round needs (else it is skipped)", low=1)
    rounds: int = knob(5, "federated rounds", low=1)
    partitioner: str = knob("dirichlet_legacy", "how the training split is divided among "
                            "the clients (docs: Many clients)")
    dirichlet_alpha: float = knob(0.5, "label skew of the Dirichlet partitioners (smaller: "
                                  "more skewed)", low=0, above=True)
    seed: int = knob(0, "seed of the partition, client sampling and initial adapters")
    min_client_examples: int | None = knob(None, "the fewest examples a client may hold "
                                           "(null: what the job needs)", low=1)
    partition: PartitionConfig = knob(PartitionConfig(), "flwr-datasets partitioner options")
    round_timeout_s: float = knob(900.0, "seconds the server waits for a round's replies",
                                  low=0, above=True)
    max_update_norm: float | None = knob(None, "reject an update whose factors' Frobenius "
                                         "norm is above this", low=0, above=True)
    max_update_bytes: int | None = knob(None, "reject an update larger than this (null: 4x "
                                        "the largest legitimate one)", low=1)
    fraction_evaluate: float = knob(0.0, "share of a round's clients that also evaluate on "
                                    "their own data", low=0, high=1)


@dataclass
class SecAggConfig:
    threshold: int | None = knob(None, "minimum survivors t (null: ceil(2/3 cohort), >= 2)")
    clip_range: float = knob(1.0, "each coordinate is clipped to [-c, c] ...", low=0,
                             above=True)
    bits: int = knob(24, "... and rounded to 2^bits levels before masking")
    init_bits: int = knob(40, "bits of the init round's sum (Fed-SB)")


@dataclass
class SimulationConfig:
    num_cpus_per_client: float = knob(1.0, "Ray CPUs per virtual client", low=0, above=True)
    num_gpus_per_client: float = knob(0.0, "Ray GPUs per virtual client", low=0)
    num_cpus: int | None = knob(None, "CPUs Ray may use (null: all cores)", low=1)
    ray_address: str | None = knob(None, "an existing Ray cluster (auto or HEAD_IP:6379); "
                                   "null: a private Ray session")
    public_sizes: bool = knob(False, "simulated nodes declare their training-set size "
                              "public (released in the clear)")


@dataclass
class JobConfig:
    model: ModelConfig = knob(ModelConfig(), "the model")
    data: DataConfig = knob(DataConfig(), "the data")
    strategy: StrategyConfig = knob(StrategyConfig(), "the method and its training knobs")
    privacy: PrivacyConfig = knob(PrivacyConfig(), "privacy")
    federation: FederationConfig = knob(FederationConfig(), "the federation")
    secure_aggregation: bool = knob(False, "SecAgg: the server learns only the round's sum")
    secagg: SecAggConfig = knob(SecAggConfig(), "secure aggregation")
    recipe_name: str | None = knob(None, "the recipe applied (set by conf/recipe/*.yaml)")
    run_name: str = knob("${strategy.name}-${data.name}", "name of the federation; keys "
                         "the nodes' privacy ledgers with the node")
    device: str = knob("cpu", "compute device: cpu, cuda[:N] or auto")
    wire_dtype: str = knob("float32", "dtype adapters travel in", choices=WIRE_DTYPES)
    eval_every: int = knob(1, "evaluate the global model every N rounds (and the last)",
                           low=1)
    keep_checkpoints: int = knob(2, "round checkpoints kept", low=1)
    simulation: SimulationConfig = knob(SimulationConfig(), "the simulation engine")


SECTIONS = ("model", "data", "strategy", "privacy", "federation", "secagg", "simulation")


def register_schema() -> None:
    """Register :class:`JobConfig` with Hydra as ``job_schema`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def schema_fields(cls: type = JobConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, dataclass field) of every leaf key, in schema order."""
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        nested = _nested(f)
        if nested is not None:
            yield from schema_fields(nested, f"{key}.")
        else:
            yield key, f


def _nested(f: Any) -> type | None:
    if f.default_factory is not MISSING:
        made = f.default_factory()
        if is_dataclass(made):
            return type(made)
    return None


def schema_default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _leaves(value: Any, prefix: str, known: set[str]) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of a plain job, descending only into schema sections."""
    if isinstance(value, Mapping) and (not prefix or any(k.startswith(prefix + ".")
                                                         for k in known)):
        for key, sub in value.items():
            yield from _leaves(sub, f"{prefix}.{key}" if prefix else str(key), known)
    else:
        yield prefix, value


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
               "str": "a string", "list[str]": "a list of strings",
               "list[int]": "a list of integers", "dict[str, Any]": "a mapping"}


def type_words(f: Any) -> str:
    """The field's type in words: ``int | None`` is "an integer or null"."""
    parts = [p.strip() for p in str(f.type).split("|")]
    words = [_TYPE_WORDS.get(p, p) for p in parts if p != "None"]
    return " or ".join(words) + (" or null" if "None" in parts else "")


def type_problems(pairs: list[tuple[str, Any]], *, strict: bool = True) -> list[str]:
    """Type problems of ``(dotted key, value)`` pairs against the schema, every one listed.

    Each value is set on a fresh typed job, so the conversion is OmegaConf's (Hydra's own):
    ``"8"`` is a fine integer, ``"abc"`` is not. ``strict``: a key the schema lacks is a
    problem too (a typo); a key below ``strategy.options`` is the method's to check."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    spec = dict(schema_fields())
    base = OmegaConf.structured(JobConfig)
    problems = []
    for key, value in pairs:
        if key.startswith("strategy.options.") or key == "hydra" or key.startswith("hydra."):
            continue
        if key not in spec and not any(k.startswith(key + ".") for k in spec):
            if strict:
                problems.append(f"{key} is not a config key (a typo? `fedlora simulate "
                                f"--cfg job` lists every key)")
            continue
        try:
            OmegaConf.update(base, key, value, merge=True)
        except ConfigKeyError:
            if strict:
                problems.append(f"{key} is not a config key")
        except OmegaConfBaseException:
            want = type_words(spec[key]) if key in spec else "a section"
            problems.append(f"{key} must be {want}, got {value!r}")
    return problems


def bound_problems(job: Mapping[str, Any]) -> list[str]:
    """Every value of a plain job outside its knob's bounds or choices."""
    problems = []
    for key, f in schema_fields():
        value: Any = job
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        problem = bound_problem(key, f, value)
        if problem:
            problems.append(problem)
    return problems


def schema_problems(job: Mapping[str, Any]) -> list[str]:
    """Every type, bound and choice problem of a plain (resolved) job."""
    known = {k for k, _ in schema_fields()}
    pairs = list(_leaves(job, "", known))
    return type_problems(pairs, strict=False) + bound_problems(job)


GROUPS = ("model", "data", "strategy", "privacy", "recipe")


def bad_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """The command-line overrides of the wrong type (or of no schema key), each with its
    problems: what Hydra cannot compose (it would stop at the first). Group choices
    (``strategy=fedsb``), deletions and Hydra's own keys are left to Hydra; a sweep
    (``a=1,2``) checks each value. Bounds and the rest are validate's, on the job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    bad: dict[str, list[str]] = {}
    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:
            continue  # Hydra reports its own syntax errors
        key = override.key_or_group
        if key in GROUPS or override.is_delete() or override.package is not None:
            continue
        value = override.value()
        if override.is_sweep_override() and not isinstance(value, ChoiceSweep):
            continue  # a range or glob sweep: Hydra checks each job
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        problems = type_problems([(key, v) for v in values], strict=True)
        if problems:
            bad[text] = problems
    return bad
