"""The :class:`Method` interface: what one federated LoRA aggregation method declares and does.

Notation (DESIGN.md section 4), for one adapted linear module with frozen weight W0
(d_out x d_in): B is d_out x r, A is r x d_in, R is r x r, s = alpha / r is the LoRA
scaling; K clients take part in a round, client k holds n_k examples and gets the weight
p_k = n_k / sum_j n_j ("examples") or 1 / K ("uniform").

The data types live in state.py and the shared math in linalg.py; both are re-exported
here so a method file imports everything it needs from ``.base``. Pure torch: tensors in,
tensors out, no I/O, nothing else of fedlora.
"""

from __future__ import annotations

import copy
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from .linalg import (  # noqa: F401 - re-exported for method files
    as_factor,
    average_heads,
    client_weights,
    compute_dtype,
    generator,
    orthonormal_rows,
    qr_svd,
    shared_a,
    sketch,
    sketch_low_rank,
    sketch_recover,
    sketch_test_matrices,
    stable_seed,
    weighted_sum,
)
from .state import (  # noqa: F401 - re-exported for method files
    HEAD_PREFIX,
    ROLES,
    SEP,
    WEIGHTINGS,
    AdapterSpec,
    ClientStart,
    ClientUpdate,
    Factors,
    GlobalState,
    Stacked,
    check_module_name,
    dense,
    is_int,
    one_intra_op_thread,
)

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
    # Whether clients merge a server-held delta into their frozen base weights
    # (ClientStart.base_delta): impossible on a quantized base, whose weights are packed.
    merges_into_base: ClassVar[bool] = False
    # Roles whose new global value is the weighted average of what clients sent, in a basis
    # that does not move between rounds: a server optimizer may step on (average - previous).
    server_step_roles: ClassVar[tuple[str, ...]] = ()
    # Whether the new state depends on a round's updates only through the weighted mean of
    # each uplink tensor and of the head. Then a sum formed without seeing the individual
    # updates (secure aggregation) or with noise added (client-level DP) aggregates through
    # aggregate_mean. Methods that need each update (stacking, residuals) leave it False.
    sum_aggregated: ClassVar[bool] = False
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

    def client_init_payload(self, grads: Mapping[str, torch.Tensor], spec: AdapterSpec
                            ) -> Factors:
        """What a client sends up in the init round from its gradient estimates (module ->
        d_out x d_in, DP when privacy is on): by default each estimate itself, role "G".

        It runs on the client after the DP estimate, so it is post-processing (no privacy
        cost). It must be linear in the estimate: the server sums these (secure
        aggregation releases only the sum) and ``init_from_updates`` reads the mean.
        """
        del spec
        return {m: {"G": g} for m, g in grads.items()}

    def init_round_shapes(self, spec: AdapterSpec) -> dict[str, dict[str, tuple[int, int]]]:
        """module -> role -> shape of what clients send in the init round (the layout a
        sum of init payloads has, e.g. under secure aggregation)."""
        return {m: {role: (d_out, d_in) for role in self.init_round_roles}
                for m, (d_out, d_in) in spec.shapes.items()}

    def init_uplink_floats(self, d_out: int, d_in: int, rank: int) -> int:
        """Floats one client sends up per module in the init round (0: no init round)."""
        del rank
        return len(self.init_round_roles) * d_out * d_in

    def init_from_updates(
        self, spec: AdapterSpec, updates: Sequence[ClientUpdate],
        head: dict[str, torch.Tensor] | None = None,
    ) -> GlobalState:
        """The first state from the init round's updates (methods with init_round_roles)."""
        raise NotImplementedError(f"{self.name} has no init round")

    def uplink_reference(self, state: GlobalState, round: int) -> Factors:
        """What every client starts training from, for the roles it sends in ``round``.

        A client's contribution is its update minus this (client-level DP clips it; secure
        aggregation sums it). Tensors are shared with ``state``.
        """
        down = self.downlink(state, first_contact=True)
        roles = self.uplink_in_round(round)
        return {m: {r: down[m][r] for r in roles} for m in down}

    def aggregate_mean(self, state: GlobalState, factors: Factors,
                       head: dict[str, torch.Tensor]) -> GlobalState:
        """The new state from the mean of the uplink tensors (and of the head) alone.

        For sum_aggregated methods this equals ``aggregate(state, updates)`` when
        ``factors`` and ``head`` are the updates' weighted means (a test checks it).
        """
        if not self.sum_aggregated:
            raise TypeError(f"{self.name} needs the individual updates, not their mean")
        spec = spec_from_meta(state.meta)
        mean = ClientUpdate(factors=factors, num_examples=1, scaling=spec.scaling, head=head,
                            node="mean of the round")
        return self.aggregate(state, [mean])

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

    def _check_unit_interval(self, key: str) -> None:
        """An option that must be a number in [0, 1) (e.g. a relative SVD cut-off)."""
        value = getattr(self.opts, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{self.name}: {key} must be a number in [0, 1), got {value!r}")

    def _first_state(self, spec: AdapterSpec, factors: Factors,
                     head: dict[str, torch.Tensor] | None, **meta: Any) -> GlobalState:
        """The state before round 1: ``factors``, a copy of the initial head, the meta."""
        head = {k: v.detach().clone() for k, v in (head or {}).items()}
        return GlobalState(round=0, factors=factors, head=head, meta=self._meta(spec, **meta))

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
