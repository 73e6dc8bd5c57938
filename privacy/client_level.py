"""Client-level (user-level) DP for federated averaging: DP-FedAvg (McMahan et al. 2018)
with optional adaptive clipping (Andrew et al. 2021), and its distributed form.

Guarantee: whatever ONE client contributes in every round it takes part in (all of its
data at once) changes the distribution of the released global models by at most
(epsilon, delta). It protects a client's whole dataset from everyone who sees the global
models (other clients, users of the final model); the server that adds the noise is
trusted to see individual updates, unless secure aggregation hides them (distributed DP).

Per round t, with clip C, noise multiplier z, expected cohort m = q N:

    Delta_k = (what client k sends) - (what it started from)       uplink roles and head
    Delta_k <- Delta_k * min(1, C / ||Delta_k||_2)                 one norm over all tensors
    mean    = (sum_k Delta_k + N(0, z_u^2 C^2 I)) / m

The denominator is fixed: weighting by example counts (or dividing by the number that
arrived) would let one client move the mean by more than C / m and leak its count.
Accounting: one step of the Poisson-subsampled Gaussian mechanism per round at (z, q),
with q = m / N when clients are Poisson-sampled (amplification), else q = 1 (every client
may take part in every round), in the same Opacus accountants as the sample-level ledger.

Init round (a method that builds its first state from the clients' data, e.g. Fed-SB's
gradient sketches): released through the same mechanism before round 1. A Poisson cohort
at q sends its init vectors v_k; the server scales each to unit L2 norm (what such an init
uses is a direction: sign or normalized step; normalizing also gives every client the
same vote) and releases (sum_k v_k / ||v_k|| + N(0, z^2 I)) / m: one more step of (z, q),
so z is calibrated for rounds + init releases (``extra_releases``) and the ledger charges
it like a round (round 0).

Adaptive clipping (Andrew et al., Alg. 1): client k also contributes the CENTRED indicator
b_k - 1/2, b_k = [||Delta_k|| <= C]; the server releases s = sum_k (b_k - 1/2) + N(0, sigma_b^2),
estimates the unclipped fraction bbar = s / m + 1/2 and sets C <- C exp(-eta (bbar - gamma)).
Adding or removing one client moves s by 1/2 (a 0/1 count would move by 1), so the pair
(sum of clipped updates, s) is one Gaussian mechanism with sensitivity sqrt(C^2 + 1/4)
and noise stds (z_u C, sigma_b); whitening the count gives the multiplier
(z_u^-2 + (2 sigma_b)^-2)^(-1/2), which equals z when
z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2) (their Theorem 1; TF-Privacy's quantile estimator
centres the same way). The update noise grows a little.

Distributed DP (secure aggregation, see :func:`distributed_dp_threat_model`): the server
never sees an individual vector, and may collude with up to c clients (it learns their
noise). Each client of the cohort maps its contribution x_k = [Delta_k / m, kappa (b_k - 1/2) / m]
(kappa = z_u C / sigma_b makes the count's noise isotropic with the update's) to the
ring's grid of step g, rounds it by conditional randomized rounding to L2 norm at most R
(:func:`rounded_norm_bound`, Kairouz, Liu, Steinke 2021, Sec. 4), and adds discrete
Gaussian noise N_Z(0, (z R)^2 / (t - c)) (Canonne, Kamath, Steinke 2020) in grid units.
At least t survivors of which at most c collude leave >= t - c honest shares: total
variance >= (z R)^2 around a sum of sensitivity R. The sum of discrete Gaussians is
accounted with Kairouz et al.'s bound: RDP alpha R^2 / (2 H sigma^2) + tau d,
tau = 10 sum_{k<H} exp(-2 pi^2 sigma^2 k / (k + 1)); :func:`check_discrete_noise` demands
sigma >= 8 grid steps, which puts tau d below 1e-200, absorbed by inflating R by a
relative 1e-12. The ledger charges the Gaussian mechanism at z with sensitivity R: an
RDP bound with sampling=all (q = 1); with Poisson client sampling it applies Opacus's
subsampled-Gaussian analysis to this discrete mechanism, which is not a separately proven
bound (Kairouz et al. use a generic subsampled-RDP bound instead).

Nothing here knows about Flower or the rest of fedlora.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .accounting import calibrate_noise_multiplier, check_accountant, check_delta, check_epsilon
from .csprng import Csprng

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ClientLevelConfig:
    """What a client-level DP federation promises and how it is run."""

    epsilon: float
    delta: float
    clip: float  # C (the initial C with adaptive clipping)
    rounds: int  # planned rounds: z is calibrated once for all of them
    num_clients: int  # N
    cohort: int  # m: expected clients per round (the fixed denominator)
    poisson: bool = True  # Poisson client sampling at q = m / N (amplification)
    accountant: str = "rdp"
    adaptive: bool = False
    target_quantile: float = 0.5  # gamma
    clip_lr: float = 0.2  # eta
    count_noise: float | None = None  # sigma_b; None: m / 20 as in Andrew et al.
    min_survivors: int | None = None  # distributed DP: t (None: the server adds the noise)
    max_colluding: int | None = None  # distributed DP: c (None: t // 3)
    extra_releases: int = 0  # releases before round 1 (an init round), each one step of (z, q)

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        check_accountant(self.accountant)
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"client-level clip must be a positive number, got {self.clip!r}")
        for name in ("rounds", "num_clients", "cohort"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"client-level DP: {name} must be a positive integer, "
                                 f"got {value!r}")
        if isinstance(self.extra_releases, bool) or not isinstance(self.extra_releases, int) \
                or self.extra_releases < 0:
            raise ValueError(f"client-level DP: extra_releases must be an integer >= 0, "
                             f"got {self.extra_releases!r}")
        if self.cohort > self.num_clients:
            raise ValueError(f"client-level DP: cohort {self.cohort} exceeds the "
                             f"{self.num_clients} clients")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not self.clip_lr > 0:
            raise ValueError(f"clip_lr must be > 0, got {self.clip_lr}")
        if self.count_noise is not None and not self.count_noise > 0:
            raise ValueError(f"count_noise must be > 0, got {self.count_noise}")
        if self.min_survivors is not None and not 1 <= self.min_survivors <= self.cohort:
            raise ValueError(f"min_survivors must be in [1, cohort={self.cohort}], "
                             f"got {self.min_survivors}")
        c = self.max_colluding
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ValueError(f"privacy.client_level.max_colluding must be an integer >= 0 or "
                             f"null, got {c!r}")
        if c is not None and self.min_survivors is not None and c >= self.min_survivors:
            raise ValueError(f"privacy.client_level.max_colluding ({c}) must be below the "
                             f"secure aggregation threshold t = {self.min_survivors}: with c >= t "
                             f"no honest client's noise is guaranteed in the sum")

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.num_clients if self.poisson else 1.0

    @property
    def colluding(self) -> int:
        """c: clients that may collude with the server (distributed DP; 0 without it)."""
        if self.min_survivors is None:
            return 0
        return self.max_colluding if self.max_colluding is not None else self.min_survivors // 3


@dataclass(frozen=True)
class ClientLevelPlan:
    """The noise of a client-level DP federation, fixed before round 1."""

    noise_multiplier: float  # z: what the accountant is charged per round
    update_noise_multiplier: float  # z_u >= z: the noise on the sum (z with fixed clipping)
    count_noise: float | None  # sigma_b (adaptive clipping), else None
    sample_rate: float  # q
    cohort: int  # m

    def sum_noise_std(self, clip: float) -> float:
        """Std of the Gaussian noise on the sum of clipped updates (per coordinate)."""
        return self.update_noise_multiplier * clip

    def client_noise_std(self, sensitivity: float, min_survivors: int, colluding: int) -> float:
        """Distributed DP: z Delta / sqrt(t - c), the std of each client's share, so that the
        honest ones among any t survivors (at most c collude) carry noise >= z Delta, Delta the
        L2 sensitivity of one client's (rounded) vector."""
        if not 0 <= colluding < min_survivors:
            raise ValueError(f"need 0 <= c < t, got c={colluding}, t={min_survivors}")
        return self.noise_multiplier * sensitivity / math.sqrt(min_survivors - colluding)

    def count_scale(self, clip: float) -> float:
        """kappa = z_u C / sigma_b: the count coordinate scaled so that, with isotropic noise
        z_u C on the sum, its own noise is sigma_b (distributed DP with adaptive clipping)."""
        if self.count_noise is None:
            raise ValueError("count_scale needs adaptive clipping")
        return self.update_noise_multiplier * clip / self.count_noise


def plan(cfg: ClientLevelConfig) -> ClientLevelPlan:
    """Calibrate z once for ``cfg.rounds`` rounds plus the init releases (and split it for
    adaptive clipping)."""
    z = calibrate_noise_multiplier(cfg.epsilon, cfg.delta, cfg.sample_rate,
                                   cfg.rounds + cfg.extra_releases, cfg.accountant)
    if not cfg.adaptive:
        return ClientLevelPlan(z, z, None, cfg.sample_rate, cfg.cohort)
    sigma_b = cfg.count_noise if cfg.count_noise is not None else cfg.cohort / 20.0
    rest = z ** -2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: the count noise sigma_b={sigma_b:g} alone needs more than "
            f"the whole budget (z={z:.3f}); raise count_noise or the cohort")
    return ClientLevelPlan(z, rest ** -0.5, sigma_b, cfg.sample_rate, cfg.cohort)


def difference(trained: Tensors, start: Tensors) -> dict[str, torch.Tensor]:
    """Delta_k, tensor by tensor (same names and shapes required)."""
    if set(trained) != set(start):
        raise ValueError(f"update names {sorted(trained)} differ from the reference "
                         f"{sorted(start)}")
    out = {}
    for name, tensor in trained.items():
        if tensor.shape != start[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the reference "
                             f"{tuple(start[name].shape)}")
        out[name] = tensor.detach().double() - start[name].detach().double()
    return out


def global_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_to_norm(delta: Tensors, clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """(Delta * min(1, C / ||Delta||), ||Delta||): one L2 norm across every tensor."""
    norm = global_norm(delta)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


def to_unit_norm(vector: Tensors) -> dict[str, torch.Tensor]:
    """v / ||v||_2 over every tensor at once (all zeros stay zeros): sensitivity 1 whatever
    the client sent."""
    norm = global_norm(vector)
    factor = 1.0 / norm if norm > 0 else 0.0
    return {k: v.detach().double() * factor for k, v in vector.items()}


def add_gaussian(tensors: Tensors, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each coordinate plus N(0, std^2), in float64 (names in sorted order: reproducible)."""
    out = {}
    for name in sorted(tensors):
        t = tensors[name].double()
        out[name] = t + std * torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return out


def next_clip(clip: float, noised_centred: float, cfg: ClientLevelConfig) -> float:
    """C exp(-eta (bbar - gamma)), bbar = s / m + 1/2 from the noised centred count
    s = sum_k (b_k - 1/2) + N(0, sigma_b^2) (de-centred with the expected cohort m)."""
    fraction = unclipped_fraction(noised_centred, cfg.cohort)
    return clip * math.exp(-cfg.clip_lr * (fraction - cfg.target_quantile))


def unclipped_fraction(noised_centred: float, cohort: int) -> float:
    """bbar = s / m + 1/2: the estimate of the unclipped fraction from the centred count."""
    return noised_centred / cohort + 0.5


def centred_indicator(norm: float, clip: float) -> float:
    """b - 1/2 with b = [norm <= C]: +-1/2, so one client moves the count by 1/2."""
    return 0.5 if norm <= clip else -0.5


# -- distributed DP: rounding to the ring and discrete Gaussian shares ---------------------

ROUNDING_BETA = math.exp(-0.5)  # conditional rounding retries with probability <= beta
MIN_DISCRETE_SIGMA = 8.0  # grid steps: keeps tau d of the discrete sum below 1e-200
SENSITIVITY_SLACK = 1e-12  # relative: absorbs tau d into the sensitivity (see module doc)


def rounded_norm_bound(norm: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """R = sqrt(N^2 + d/4 + sqrt(2 ln(1/beta)) (N + sqrt(d)/2)) (1 + 1e-12), in grid steps.

    Kairouz, Liu, Steinke 2021 (Sec. 4.1): randomized rounding of a vector of L2 norm
    <= N in d coordinates stays within the first term with probability >= 1 - beta;
    conditional rounding redraws until it does, so R bounds every released vector."""
    if dim < 1 or norm < 0 or not 0 < beta < 1:
        raise ValueError(f"rounded_norm_bound: need dim >= 1, norm >= 0, beta in (0, 1); got "
                         f"{dim}, {norm}, {beta}")
    squared = norm ** 2 + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (
        norm + math.sqrt(dim) / 2.0)
    return math.sqrt(squared) * (1.0 + SENSITIVITY_SLACK)


def conditional_round(grid: torch.Tensor, bound: float, randomness: Csprng | None = None,
                      max_tries: int = 1000) -> torch.Tensor:
    """floor(x + u), u ~ U(0, 1) per coordinate, redrawn until ||result||_2 <= bound (int64).

    Unbiased up to the conditioning; each try succeeds with probability >= 1 - beta when
    ``bound`` is :func:`rounded_norm_bound` of ||x||."""
    x = grid.detach().to(torch.float64).reshape(-1)
    rng = randomness or Csprng()
    floor = torch.floor(x)
    frac = x - floor
    for _ in range(max_tries):
        up = rng.uniform(x.numel()) < frac
        rounded = floor + up.to(torch.float64)
        if float(rounded.pow(2).sum()) <= bound * bound:
            return rounded.to(torch.int64).reshape(grid.shape)
    raise RuntimeError(f"conditional rounding: no draw within the norm bound {bound:g} in "
                       f"{max_tries} tries (the input exceeds the bound it was sized for)")


def check_discrete_noise(sigma: float) -> None:
    """Discrete Gaussian shares must be wide on the grid, else the sum of the shares is not
    close enough to a discrete Gaussian for the accounting (tau d term)."""
    if not sigma >= MIN_DISCRETE_SIGMA:
        raise ValueError(f"distributed DP: each client's noise share has std {sigma:.3g} grid "
                         f"steps, below {MIN_DISCRETE_SIGMA:g}: raise secagg.bits or lower "
                         f"secagg.clip_range")


def discrete_gaussian(n: int, sigma: float, randomness: Csprng | None = None) -> torch.Tensor:
    """n iid draws of N_Z(0, sigma^2): P(y) proportional to exp(-y^2 / (2 sigma^2)), y integer.

    Canonne, Kamath, Steinke 2020, Alg. 3, vectorized in float64: propose a discrete Laplace
    of scale s = floor(sigma) + 1 (difference of two geometrics), accept with probability
    exp(-(|y| - sigma^2 / s)^2 / (2 sigma^2)). Uniforms from a fresh ChaCha20 keystream."""
    if not sigma > 0:
        raise ValueError(f"discrete_gaussian: sigma must be > 0, got {sigma}")
    rng = randomness or Csprng()
    s = math.floor(sigma) + 1.0
    out = torch.empty(0, dtype=torch.int64)
    while out.numel() < n:
        k = max(64, int(1.5 * (n - out.numel())) + 16)
        u = rng.uniform(3 * k)
        # floor(-s ln U) ~ Geometric(1 - exp(-1/s)); the difference is discrete Laplace(s).
        g1, g2 = torch.floor(-s * torch.log(u[:k])), torch.floor(-s * torch.log(u[k:2 * k]))
        y = g1 - g2
        accept = u[2 * k:] < torch.exp(-(y.abs() - sigma * sigma / s) ** 2 / (2 * sigma * sigma))
        out = torch.cat([out, y[accept].to(torch.int64)])
    return out[:n]


def distributed_dp_threat_model(min_survivors: int, max_colluding: int, cohort: int
                                ) -> dict[str, object]:
    """What distributed DP assumes, to be stated beside its guarantee."""
    if not 0 <= max_colluding < min_survivors <= cohort:
        raise ValueError(f"need 0 <= c < t <= cohort, got c={max_colluding}, "
                         f"t={min_survivors}, cohort={cohort}")
    honest = min_survivors - max_colluding
    return {
        "server": ("honest-but-curious: it follows the protocol and may collude with clients; "
                   "key advertisements are not signed with the nodes' authentication keys, so "
                   "a server that substitutes keys is NOT covered"),
        "min_survivors": min_survivors,
        "max_colluding": max_colluding,
        "honest_fraction": honest / min_survivors,
        "noise": (f"each client adds discrete Gaussian noise of variance (z R)^2 / {honest} "
                  f"(t - c = {min_survivors} - {max_colluding}); any released sum has at least "
                  f"{min_survivors} survivors, of which at most {max_colluding} collude with the "
                  f"server, so the honest shares alone carry the accounted noise"),
        "not_released": f"nothing is released with fewer than t = {min_survivors} survivors",
        "assumption": (f"the guarantee holds if at most {max_colluding} client(s) of a round "
                       f"share their noise with the server "
                       f"(privacy.client_level.max_colluding); more colluders void it"),
    }
