"""Types, the :class:`Method` interface and helpers shared by every aggregation method.

Notation (DESIGN.md section 4), for one adapted linear module with frozen weight W0
(d_out x d_in): B is d_out x r, A is r x d_in, R is r x r, s = alpha / r is the LoRA
scaling; K clients take part in a round, client k holds n_k examples and gets the weight
p_k = n_k / sum_j n_j ("examples") or 1 / K ("uniform").

Everything here is pure torch: tensors in, tensors out, no I/O, nothing else of fedlora.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

Factors = dict[str, dict[str, torch.Tensor]]
"""module name -> role -> tensor. Roles: "A" (r x d_in), "B" (d_out x r), "R" (r x r) and
"G" (d_out x d_in full-weight gradient estimate, only in Fed-SB's init round), and "U"
(d_out x m), "V" (m x d_in): a low-rank term U V folded into the frozen weight."""

ROLES: tuple[str, ...] = ("A", "B", "R", "G", "U", "V")
WEIGHTINGS: tuple[str, ...] = ("examples", "uniform")
HEAD_PREFIX = "head"
SEP = "::"


@dataclass(frozen=True)
class AdapterSpec:
    """The adapted modules of a base model and the global LoRA hyper-parameters."""

    shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in)
    rank: int
    alpha: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise ValueError(f"AdapterSpec.rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"AdapterSpec.alpha must be a number > 0, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"AdapterSpec.alpha must be finite and > 0, got {self.alpha!r}")
        if not is_int(self.seed):
            raise ValueError(f"AdapterSpec.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.shapes, Mapping) or not self.shapes:
            raise ValueError("AdapterSpec.shapes must name at least one module: {name: (d_out, d_in)}")
        shapes: dict[str, tuple[int, int]] = {}
        for name, shape in self.shapes.items():
            check_module_name(name)
            dims = tuple(shape)
            if len(dims) != 2 or any(not is_int(d) or d < 1 for d in dims):
                raise ValueError(
                    f"AdapterSpec.shapes[{name!r}] must be (d_out, d_in) with integers >= 1, "
                    f"got {shape!r}"
                )
            shapes[name] = (int(dims[0]), int(dims[1]))
        # Normalize to plain tuples (lists from JSON/Hydra would otherwise leak through).
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def is_int(x: object) -> bool:
    """An integer (Python, numpy or torch), but not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_module_name(name: object) -> None:
    """Module names become flat checkpoint keys "module::role": keep them unambiguous."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"module names must be non-empty strings, got {name!r}")
    if SEP in name:
        raise ValueError(f"module name {name!r} must not contain {SEP!r}")
    if name == HEAD_PREFIX:
        raise ValueError(f"module name {HEAD_PREFIX!r} is reserved for head parameters")


@dataclass
class ClientUpdate:
    """What one client sends up after its local round."""

    factors: Factors  # exactly the method's uplink roles for every module
    num_examples: int
    scaling: float  # alpha_k / r_k the client used
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    node: str = ""


@dataclass
class GlobalState:
    """The server's global adapter after ``round`` completed aggregation rounds."""

    round: int
    factors: Factors
    head: dict[str, torch.Tensor]
    meta: dict[str, Any]  # JSON-able: method, rank, alpha, seed, shapes, weighting, options

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat names for safetensors: "module::role" and "head::name"."""
        out: dict[str, torch.Tensor] = {}
        for module, roles in self.factors.items():
            check_module_name(module)
            for role, tensor in roles.items():
                out[f"{module}{SEP}{role}"] = tensor.contiguous()
        for name, tensor in self.head.items():
            out[f"{HEAD_PREFIX}{SEP}{name}"] = tensor.contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, round: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> GlobalState:
        """Inverse of :meth:`tensors` (exact round trip)."""
        factors: Factors = {}
        head: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            prefix, sep, rest = key.partition(SEP)
            if not sep or not rest:
                raise ValueError(f"tensor name {key!r} is not 'module::role' or 'head::name'")
            if prefix == HEAD_PREFIX:
                head[rest] = tensor
            else:
                if rest not in ROLES:
                    raise ValueError(f"tensor name {key!r}: unknown role {rest!r}")
                factors.setdefault(prefix, {})[rest] = tensor
        return cls(round=int(round), factors=factors, head=head, meta=copy.deepcopy(dict(meta)))


@dataclass
class ClientStart:
    """What a client loads at the start of its local round."""

    init: Factors  # initial factor values per module (fedsb without first contact: only R)
    trainable: tuple[str, ...]  # roles the client trains this round
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]]  # flora: W = W0 + U @ V
    rank: int
    scaling: float


# --------------------------------------------------------------------------- helpers


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a stable hash (sha256) of ``parts``.

    Python's hash() is salted per process, so it cannot make clients agree on a tensor.
    """
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (CPU draws are identical on every machine)."""
    return torch.Generator(device="cpu").manual_seed(stable_seed(*parts))


def shared_a(seed: int, module: str, rank: int, d_in: int) -> torch.Tensor:
    """A (rank x d_in) LoRA A, Kaiming-uniform like PEFT, bit-identical wherever it is made.

    PEFT initializes lora_A with kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(d_in),
    1/sqrt(d_in)). Drawn from a CPU generator seeded by (seed, module), so every client,
    every round and every process regenerates the same bits: FFA-LoRA sends zero bytes of A.
    """
    bound = 1.0 / math.sqrt(d_in)
    out = torch.empty(rank, d_in, dtype=torch.float32)
    return out.uniform_(-bound, bound, generator=generator("fedlora.lora_a", seed, module))


def orthonormal_rows(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A random rows x cols matrix with orthonormal rows (zero rows beyond ``cols``)."""
    k = min(rows, cols)
    g = torch.randn(cols, k, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    # Fix the sign ambiguity of QR so that the result is a deterministic function of gen.
    d = torch.diagonal(r)
    q = q * torch.where(d != 0, torch.sign(d), torch.ones_like(d))
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out[:k] = q.T
    return out.float().contiguous()


def client_weights(updates: Sequence[ClientUpdate], weighting: str) -> list[float]:
    """p_k = n_k / sum_j n_j ("examples") or 1 / K ("uniform"); they sum to 1."""
    if not updates:
        raise ValueError("cannot aggregate an empty list of client updates")
    for u in updates:
        n = u.num_examples
        if not is_int(n) or n < 0:
            raise ValueError(f"num_examples must be an integer >= 0, got {n!r} (node {u.node!r})")
    if weighting == "uniform":
        return [1.0 / len(updates)] * len(updates)
    if weighting != "examples":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    total = sum(int(u.num_examples) for u in updates)
    if total == 0:
        raise ValueError("weighting='examples' needs at least one update with num_examples > 0")
    return [int(u.num_examples) / total for u in updates]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Aggregate in at least float32 (bf16/fp16 wire tensors are upcast)."""
    return torch.promote_types(t.dtype, torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k t_k into a fresh tensor (never writes into an input)."""
    out = tensors[0].to(compute_dtype(tensors[0])) * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(t.to(out.dtype), alpha=w)
    return out


def average_heads(
    base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Head parameters: sum_k p_k head_k; names nobody sent keep their previous value."""
    head = {k: v.detach().clone() for k, v in base.items()}
    names = set(updates[0].head)
    for u in updates[1:]:
        if set(u.head) != names:
            raise ValueError(
                f"clients sent different head parameters: {sorted(names)} vs {sorted(u.head)} "
                f"(node {u.node!r})"
            )
    for name in sorted(names):
        parts = [u.head[name] for u in updates]
        shape = parts[0].shape
        if any(p.shape != shape for p in parts) or (name in base and base[name].shape != shape):
            raise ValueError(f"head parameter {name!r}: shapes differ across clients/state")
        head[name] = weighted_sum(parts, weights)
    return head


def qr_svd(
    u: torch.Tensor, v: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product M = u @ v (u: d_out x m, v: m x d_in) without forming M.

    u = Q1 R1 and v^T = Q2 R2 (thin QR), so M = Q1 (R1 R2^T) Q2^T; the small core
    R1 R2^T = Uc S Vc^T is SVD'd and rotated back: M = (Q1 Uc) S (Q2 Vc)^T. Cost
    O((d_out + d_in) m^2 + m^3) instead of O(d_out d_in min(d_out, d_in)).
    The QRs and rotations run in ``dtype``, the small core SVD always in float64.
    Returns (Ul, S, Vt) in ``dtype``, Ul: d_out x k, S: k, Vt: k x d_in,
    k = min(m, d_out, d_in), singular values descending.
    """
    q1, r1 = torch.linalg.qr(u.to(dtype))
    q2, r2 = torch.linalg.qr(v.to(dtype).T)
    uc, s, vct = torch.linalg.svd(r1.double() @ r2.double().T, full_matrices=False)
    return q1 @ uc.to(dtype), s.to(dtype), vct.to(dtype) @ q2.T


def as_factor(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- Method

ADAPTER_LAYERS: tuple[str, ...] = ("lora", "lora_sb")


def option(default: Any, help: str) -> Any:
    """A method option with its default and help text (shown by `fedlora methods`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class NoOptions:
    """A method without options."""


def option_help(options_type: type) -> dict[str, tuple[Any, str]]:
    """name -> (default, help) of a method's options dataclass."""
    out = {}
    for f in fields(options_type):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (default, f.metadata.get("help", ""))
    return out


class Method(ABC):
    """One federated LoRA aggregation method (client side and server side of the math).

    A method describes itself in class attributes, so the Flower glue (client/, server/,
    task/) never needs its name: the adapter layer it trains, which roles travel, whether
    ranks differ per client, whether an init round precedes training, what a node keeps
    between rounds, and its typed options.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    client_trains: ClassVar[tuple[str, ...]]
    uplink_roles: ClassVar[tuple[str, ...]]
    downlink_roles: ClassVar[tuple[str, ...]]
    exact: ClassVar[bool]
    # The adapted layer: "lora" (W0 + s B A) or "lora_sb" (W0 + s B R A, LoRA-SB).
    adapter_layer: ClassVar[str] = "lora"
    # Whether each client may train at its own rank r_k (its memory budget).
    per_client_rank: ClassVar[bool] = False
    # Roles clients send in an init round before round 1 (empty: no init round); the
    # server turns them into the first state with init_from_updates.
    init_round_roles: ClassVar[tuple[str, ...]] = ()
    # Roles a node keeps between rounds: sent once at first contact (or never sent, for
    # personalized factors) and merged into every later downlink on the node.
    node_keeps: ClassVar[tuple[str, ...]] = ()
    # Some factors never leave the client: no single global model.
    personalized: ClassVar[bool] = False
    # Roles whose new global value is the weighted average of what clients sent, in a basis
    # that does not move between rounds: a server optimizer may step on (average - previous).
    server_step_roles: ClassVar[tuple[str, ...]] = ()
    # The typed options: a dataclass whose fields use option(default, help).
    Options: ClassVar[type] = NoOptions

    def __init__(self, weighting: str = "examples", **options: Any) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"{self.name}: weighting must be one of {WEIGHTINGS}, got {weighting!r}"
            )
        known = option_help(self.Options)
        unknown = sorted(set(options) - set(known))
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            raise ValueError(f"{self.name}: unknown option(s) {unknown}; known options: {names}")
        self.weighting = weighting
        self.opts = self.Options(**options)
        self.options: dict[str, Any] = asdict(self.opts)
        self._check_options()

    @classmethod
    def describe_options(cls) -> dict[str, tuple[Any, str]]:
        """name -> (default, help) for every option of this method."""
        return option_help(cls.Options)

    # -- what a node is -----------------------------------------------------------------
    def client_rank(self, spec: AdapterSpec, partition: int, declared: int | None = None) -> int:
        """The rank client ``partition`` trains at (``declared``: its node config)."""
        del partition, declared  # one shared rank: the server expects it from everyone
        return spec.rank

    def uplink_in_round(self, round: int) -> tuple[str, ...]:
        """The roles clients send up in training round ``round`` (1-based).

        ``uplink_roles`` lists every role that may travel; a method that alternates what it
        trains (e.g. one factor per round) narrows it here.
        """
        del round
        return self.uplink_roles

    def init_round_steps(self) -> int:
        """Optimizer-free DP steps a client spends in the init round (0: no init round)."""
        return 0

    def init_from_updates(
        self, spec: AdapterSpec, updates: Sequence[ClientUpdate],
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        """The first state from the init round's updates (methods with init_round_roles)."""
        raise NotImplementedError(f"{self.name} has no init round")

    def _check_options(self) -> None:
        """Raise ValueError on a bad option value. Subclasses extend this."""
        # Options are recorded in GlobalState.meta, which must stay JSON-able.
        try:
            json.dumps(self.options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{self.name}: options must be JSON-able: {e}") from None

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(weighting={self.weighting!r}{opts})"

    # -- server side -------------------------------------------------------------------
    @abstractmethod
    def init_state(
        self, spec: AdapterSpec, head: dict[str, torch.Tensor] | None = None
    ) -> GlobalState:
        """The global state before round 1."""

    @abstractmethod
    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate]) -> GlobalState:
        """A new state (round + 1) from the clients' updates; inputs are never mutated."""

    @abstractmethod
    def downlink(self, state: GlobalState, *, first_contact: bool = False,
                 rank: int | None = None) -> Factors:
        """What the server sends one client this round (tensors shared with ``state``).

        ``first_contact``: the client has not been sent anything yet (it lacks node_keeps);
        ``rank``: the client's own rank (per_client_rank methods may tailor the factors).
        """

    # -- client side -------------------------------------------------------------------
    @abstractmethod
    def client_start(
        self, downlink: Factors, spec: AdapterSpec, *, rank: int | None = None, seed: int = 0,
        round: int = 1,
    ) -> ClientStart:
        """How a client turns the downlink into its starting point (fresh tensors) for
        training round ``round`` (1-based)."""

    # -- math for tests, metrics and export ----------------------------------------------
    @abstractmethod
    def delta(self, state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with the global W - W0 = U @ V (scaling folded into U)."""

    @abstractmethod
    def client_delta(
        self, state: GlobalState, update: ClientUpdate, module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with client k's W_k - W0 = U @ V after training from ``state``."""

    def aggregation_error(
        self, state: GlobalState, updates: Sequence[ClientUpdate], new_state: GlobalState
    ) -> dict[str, float] | None:
        """Per module ||sum_k p_k delta_k - delta||_F; None for exact methods."""
        return None

    @abstractmethod
    def uplink_floats(self, d_out: int, d_in: int, rank: int, *, round: int = 1) -> int:
        """Floats one client sends up per module in round ``round`` (heads not included)."""

    @abstractmethod
    def downlink_floats(
        self,
        d_out: int,
        d_in: int,
        rank: int,
        *,
        num_clients: int = 1,
        round: int = 1,
        first_contact: bool = False,
    ) -> int:
        """Floats the server sends one client per module per round (heads not included)."""

    # -- shared plumbing -------------------------------------------------------------------
    def weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return client_weights(updates, self.weighting)

    def _meta(self, spec: AdapterSpec, **extra: Any) -> dict[str, Any]:
        return {
            "method": self.name,
            "rank": spec.rank,
            "alpha": spec.alpha,
            "seed": spec.seed,
            "shapes": {m: [d_out, d_in] for m, (d_out, d_in) in spec.shapes.items()},
            "weighting": self.weighting,
            "options": copy.deepcopy(self.options),
            **extra,
        }

    def _check_state(self, state: GlobalState) -> None:
        got = state.meta.get("method")
        if got != self.name:
            raise ValueError(f"state was made by method {got!r}, not {self.name!r}")

    def _check_updates(
        self, state: GlobalState, updates: Sequence[ClientUpdate], *, fixed_rank: bool = True
    ) -> list[float]:
        """Shape/role checks shared by all methods; returns the client weights p_k."""
        self._check_state(state)
        weights = self.weights(updates)
        spec = spec_from_meta(state.meta)
        expected_roles = self.uplink_in_round(state.round + 1)
        for u in updates:
            who = f"update from node {u.node!r}" if u.node else "update"
            if not isinstance(u.scaling, (int, float)) or not math.isfinite(u.scaling):
                raise ValueError(f"{who}: scaling must be a finite number, got {u.scaling!r}")
            if fixed_rank and not math.isclose(u.scaling, spec.scaling, rel_tol=1e-6):
                raise ValueError(
                    f"{who}: scaling {u.scaling} differs from alpha/rank = {spec.scaling}"
                )
            extra = sorted(set(u.factors) - set(spec.shapes))
            missing = sorted(set(spec.shapes) - set(u.factors))
            if extra or missing:
                raise ValueError(f"{who}: unknown modules {extra}, missing modules {missing}")
            for module, (d_out, d_in) in spec.shapes.items():
                roles = u.factors[module]
                if set(roles) != set(expected_roles):
                    raise ValueError(
                        f"{who}, module {module!r}: roles {sorted(roles)}, "
                        f"expected {list(expected_roles)}"
                    )
                r = spec.rank
                if not fixed_rank:  # FLoRA: the client's own rank r_k, read off its A_k
                    r = roles["A"].shape[0] if roles["A"].dim() == 2 else 0
                    if r < 1:
                        raise ValueError(f"{who}, module {module!r}: A must be r_k x d_in, r_k >= 1")
                want = {"A": (r, d_in), "B": (d_out, r), "R": (r, r), "G": (d_out, d_in)}
                for role in expected_roles:
                    if tuple(roles[role].shape) != want[role]:
                        raise ValueError(
                            f"{who}, module {module!r}, role {role}: shape "
                            f"{tuple(roles[role].shape)}, expected {want[role]}"
                        )
        return weights

    def _next(
        self, state: GlobalState, factors: Factors, updates: Sequence[ClientUpdate],
        weights: Sequence[float],
    ) -> GlobalState:
        return GlobalState(
            round=state.round + 1,
            factors=factors,
            head=average_heads(state.head, updates, weights),
            meta=copy.deepcopy(state.meta),
        )

    def _fixed_rank(self, spec: AdapterSpec, rank: int | None) -> int:
        if rank is not None and rank != spec.rank:
            raise ValueError(f"{self.name} uses one rank for every client ({spec.rank}), got {rank}")
        return spec.rank


def spec_from_meta(meta: Mapping[str, Any]) -> AdapterSpec:
    """Rebuild the :class:`AdapterSpec` recorded in a state's meta (e.g. after resume)."""
    try:
        shapes = {m: (int(s[0]), int(s[1])) for m, s in meta["shapes"].items()}
        return AdapterSpec(
            shapes=shapes, rank=int(meta["rank"]), alpha=float(meta["alpha"]),
            seed=int(meta.get("seed", 0)),
        )
    except KeyError as e:
        raise ValueError(f"state meta lacks {e.args[0]!r}; was it made by init_state?") from None


def require_downlink(downlink: Factors, spec: AdapterSpec, roles: Sequence[str]) -> None:
    """A client checks that the downlink covers its modules with the expected roles."""
    missing = sorted(set(spec.shapes) - set(downlink))
    if missing:
        raise ValueError(f"downlink lacks modules {missing}")
    for module in spec.shapes:
        lacking = [r for r in roles if r not in downlink[module]]
        if lacking:
            raise ValueError(f"downlink for module {module!r} lacks roles {lacking}")


def clone_factors(factors: Factors) -> Factors:
    return {m: {r: t.detach().clone() for r, t in roles.items()} for m, roles in factors.items()}
