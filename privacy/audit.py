"""Empirical privacy audit of fedlora's DP-SGD release with white-box gradient canaries.

Model. One trainable parameter w in R^N (an embedding of dimension 1), N >= m slots of
which the first m hold canaries. Canary i is an example whose per-example gradient is a Dirac at coordinate i,

    g_i = G e_i,   G = 10 C  (so clipping to C always binds: clipped g_i = C e_i),

made exact by a straight-through logit: the loss sees constant logits (0, 0) and label 1,
so d loss / d logit_0 = 1/2 whatever w is, and logit_0 = 2G w_i in gradient (value 0), so
d loss / d w_i = G. An "out" canary keeps its slot with gradient 0; under Poisson sampling
with the noise averaged over the fixed expected batch b = q N, a zero-gradient example
releases exactly what its absence would, so the slot layout leaks nothing and q = b / N
stays the job's rate.

Mechanism. Each canary is in with probability 1/2. The client's own DP-SGD release
(:func:`~.dpsgd.run_private_round`: Opacus clipping, Gaussian noise sigma C, Poisson
sampling at q, the ledger) runs ``rounds`` rounds of ``steps`` steps with SGD at lr 1, so
after T = rounds x steps steps

    b (w_0 - w_T)_i / C = sum_t ( 1[i in batch_t] 1[i in] + sigma z_ti ),  z_ti ~ N(0, 1).

That is the score of canary i: the released model delta in canary i's gradient direction,
what a server that planted gradient canaries could compute. SGD is the audit's choice of
post-processing: any optimizer is post-processing of the noisy clipped sums, and this one
keeps the sum a sufficient statistic. DP-SGD's guarantee depends on the model only through
(sigma, C, q, T), so auditing this release audits every private node's release at the
job's calibrated parameters.

The scores become a lower bound on epsilon with :mod:`.audit_bound` (Steinke, Nasr and
Jagielski 2023). Deliberately broken mechanisms show the audit has power:

- ``no_noise``: the noise source returns zeros, the ledger still claims the job's sigma;
- ``reused_noise``: the run is trained twice from the same seed (a seed that is a function
  of the round), canaries in only the first; the difference of the two releases is
  noise-free. The claim is the accountant's charge for both releases;
- ``no_clipping``: clipping at 20 C (canaries pass unclipped at 10 C) with noise still
  sigma C, claimed at C.

Pure: torch, Opacus and the privacy package only.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .audit_bound import epsilon_ceiling, epsilon_lower_bound
from .csprng import Csprng, Randomness, SeededRandomness
from .dpsgd import run_private_round
from .ledger import PrivacyLedger
from .settings import DPSettings

MECHANISMS: tuple[str, ...] = ("correct", "no_noise", "reused_noise", "no_clipping")
BROKEN: tuple[str, ...] = MECHANISMS[1:]

CANARY_GRADIENT = 10.0  # a canary's gradient norm, in units of C
_UNCLIPPED = 20.0  # no_clipping's clip norm, in units of C: above every canary's gradient
_MAX_SLOTS = 2_000_000  # slots (examples) in the canary dataset


@dataclass(frozen=True)
class AuditResult:
    mechanism: str
    claimed_epsilon: float  # what the ledger's accountant charges for the audited release
    epsilon_lower_bound: float  # holds with probability >= confidence
    epsilon_ceiling: float  # the largest bound this many canaries could ever show
    delta: float
    confidence: float
    canaries: int
    canaries_in: int
    guesses: int
    correct_guesses: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int  # DP-SGD steps of the audited run (both runs for reused_noise)
    seconds: float

    @property
    def caught(self) -> bool:
        """The audit refutes the claim (at the stated confidence)."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "caught": self.caught}


class _CanaryModel(nn.Module):
    """w in R^(slots): one trainable scalar per canary (plus spare blank slots)."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.w = nn.Embedding(slots, 1)
        nn.init.zeros_(self.w.weight)

    def forward(self, index: Tensor) -> Tensor:
        return self.w(index).reshape(-1)


def _canary_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    index, scale = batch
    out = model(index) * scale
    # Straight-through: the value is 0 (constant logits), the gradient w.r.t. ``out`` is
    # softmax(0, 0)[0] - 0 = 1/2 for label 1, so d loss / d w_i = scale / 2 exactly.
    first = out - out.detach()
    logits = torch.stack([first, torch.zeros_like(first)], dim=1)
    return logits, torch.ones_like(index)


class _NoNoise:
    """Broken noise source: Poisson sampling as usual, zero noise."""

    def __init__(self, inner: Randomness) -> None:
        self._inner = inner

    def uniform(self, n: int) -> Tensor:
        return self._inner.uniform(n)

    def normal(self, shape: Any, std: float, *, device: Any = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(tuple(shape), device=device, dtype=dtype)


class _ScaledNoise(_NoNoise):
    """Noise at ``factor`` times the std the optimizer asks for."""

    def __init__(self, inner: Randomness, factor: float) -> None:
        super().__init__(inner)
        self._factor = factor

    def normal(self, shape: Any, std: float, *, device: Any = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
        return self._inner.normal(shape, std * self._factor, device=device, dtype=dtype)


def canary_layout(sample_rate: float, canaries: int) -> tuple[int, int]:
    """(slots N, expected batch b) with b / N == sample_rate exactly and N >= canaries.

    q = b_k / N_k is a ratio of integers; N is the smallest multiple of N_k that holds the
    canaries (the spare slots are blank: zero gradient).
    """
    ratio = Fraction(sample_rate).limit_denominator(1_000_000)
    if not math.isclose(ratio.numerator / ratio.denominator, sample_rate, rel_tol=1e-12):
        raise ValueError(f"sample_rate {sample_rate!r} is not a ratio b / N with N <= 1e6")
    copies = -(-canaries // ratio.denominator)
    slots, batch = ratio.denominator * copies, ratio.numerator * copies
    if slots > _MAX_SLOTS:
        raise ValueError(f"sample_rate {sample_rate!r} needs {slots} canary slots; too many")
    return slots, batch


def _loader(included: np.ndarray, slots: int, batch: int, grad_norm: float) -> DataLoader:
    scale = np.zeros(slots, dtype=np.float32)
    scale[: included.size][included] = 2.0 * grad_norm  # |d loss / d w_i| = scale / 2
    data = TensorDataset(torch.arange(slots), torch.from_numpy(scale))
    return DataLoader(data, batch_size=batch)


def _train(settings: DPSettings, ledger: PrivacyLedger, loader: DataLoader, slots: int,
           rounds: int, randomness: Callable[[int], Randomness | None],
           progress: Callable[[str], None], label: str) -> Tensor:
    """Run the client's release ``rounds`` times; return w_0 - w_T (the summed deltas)."""
    model = _CanaryModel(slots).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    start = model.w.weight.detach().clone()
    for r in range(1, rounds + 1):
        run_private_round(model, optimizer, loader, _canary_forward, settings, ledger,
                          round=r, randomness=randomness(r))
        progress(f"{label}: round {r}/{rounds}")
    return (start - model.w.weight.detach()).reshape(-1)


def run_audit(
    settings: DPSettings,
    *,
    rounds: int,
    delta: float,
    budget: float,
    canaries: int = 1000,
    confidence: float = 0.95,
    mechanism: str = "correct",
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> AuditResult:
    """Audit ``rounds`` rounds of the client's DP-SGD release under ``settings``.

    ``settings`` are the client's per-round DP settings (sigma calibrated for the job, C,
    q, steps per round); ``budget`` the client's epsilon budget (its ledger refuses a
    release beyond it, as on a node). ``seed`` fixes which canaries are in (the release's
    own noise and sampling still come from a fresh CSPRNG unless ``mechanism`` says
    otherwise); None draws membership from the OS. ``progress`` receives one line per round.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise ValueError(f"canaries must be an integer >= 2, got {canaries!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    say = progress or (lambda _line: None)
    began = time.perf_counter()
    clip = settings.max_grad_norm
    slots, batch = canary_layout(settings.sample_rate, canaries)
    membership = Csprng() if seed is None else SeededRandomness(seed)
    included = (membership.uniform(canaries) < 0.5).numpy()
    grad_norm = CANARY_GRADIENT * clip
    loader = _loader(included, slots, batch, grad_norm)
    run_settings = settings
    if mechanism == "no_clipping":
        run_settings = replace(settings, max_grad_norm=_UNCLIPPED * clip)

    with tempfile.TemporaryDirectory(prefix="fedlora-audit-") as scratch:
        # The correct release runs against the node's budget; a broken one may spend more
        # (reused_noise releases twice), and its claim is whatever the ledger charged.
        target = budget if mechanism == "correct" else max(budget, 1.0) * 1e3
        ledger = PrivacyLedger.open(scratch, federation="audit", node=mechanism,
                                    mechanism=settings.accountant, target_epsilon=target,
                                    delta=delta)
        label = f"audit {mechanism}"
        if mechanism == "correct":
            delta_w = _train(run_settings, ledger, loader, slots, rounds, lambda r: None,
                             say, label)
        elif mechanism == "no_noise":
            delta_w = _train(run_settings, ledger, loader, slots, rounds,
                             lambda r: _NoNoise(Csprng()), say, label)
        elif mechanism == "no_clipping":
            delta_w = _train(run_settings, ledger, loader, slots, rounds,
                             lambda r: _ScaledNoise(Csprng(), 1.0 / _UNCLIPPED), say, label)
        else:  # reused_noise: the same per-round seeds twice; canaries only the first time
            base = int.from_bytes(Csprng().uniform(1).numpy().tobytes()[:7], "little")
            blank = _loader(np.zeros(canaries, dtype=bool), slots, batch, grad_norm)
            with_canaries = _train(run_settings, ledger, loader, slots, rounds,
                                   lambda r: SeededRandomness(base + r), say, label + " (1/2)")
            without = _train(run_settings, ledger, blank, slots, rounds,
                             lambda r: SeededRandomness(base + r), say, label + " (2/2)")
            delta_w = with_canaries - without
        claimed = ledger.epsilon_spent
        steps = ledger.steps

    scores = (delta_w[:canaries].double() * batch / clip).numpy()
    bound = epsilon_lower_bound(scores, included, delta=delta, confidence=confidence)
    return AuditResult(
        mechanism=mechanism, claimed_epsilon=float(claimed),
        epsilon_lower_bound=float(bound.epsilon),
        epsilon_ceiling=float(epsilon_ceiling(canaries, delta=delta, confidence=confidence)),
        delta=float(delta), confidence=float(confidence), canaries=canaries,
        canaries_in=int(included.sum()), guesses=bound.guesses, correct_guesses=bound.correct,
        noise_multiplier=settings.noise_multiplier, max_grad_norm=clip,
        sample_rate=settings.sample_rate, steps=int(steps),
        seconds=time.perf_counter() - began,
    )
