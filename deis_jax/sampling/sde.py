"""Noise schedules: the forward process ``x_t = alpha(t) x_0 + sigma(t) z``.

Every schedule is a small immutable value object. Solvers never branch on the SDE type; they
ask the schedule for

* ``alpha(t)``  -- the mean coefficient (DEIS writes ``sqrt(alpha_t)`` for this; we use the
  DPM-Solver / EDM convention where ``alpha`` *is* the mean coefficient),
* ``sigma(t)``  -- the noise standard deviation,
* ``rho(t) = sigma / alpha`` -- the "rho" time of DEIS, equal to the EDM/Karras sigma,
* ``log_snr(t) = log(alpha^2 / sigma^2) = -2 log rho``,
* the inverse maps ``t_from_rho`` and ``t_from_log_snr``,
* ``interval``/``check_interval`` -- the sampling interval ``[t0, t1]``, checked against the
  schedule's valid domain ``[t_min, t_max]`` (where the closed forms are meaningful and
  finite, e.g. ``t_max < 1`` for the cosine schedule, whose alpha vanishes at ``t = 1``).

Each subclass implements three primitives -- ``log_alpha``, ``rho`` and ``t_from_rho`` -- in
closed forms that are stable near ``t = 0`` (``expm1``/``log1p``, never ``1 - exp(x)``).
Everything else is derived from them.

All methods accept numpy arrays (evaluated in float64 on the host, where coefficients are
built) or JAX arrays (traceable and differentiable, e.g. for optimising a time grid under
``jax_enable_x64``). The array namespace is chosen from the argument.

The probability-flow ODE depends only on ``(alpha, sigma)``: with ``v = x / alpha`` and
``eps = -sigma * score`` it reads ``dv/drho = eps(alpha v, t(rho))`` for every schedule here
(VP, sub-VP, VE, discrete), which is what makes the exponential integrators schedule-agnostic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # numpy or JAX array, or a Python float

SDE_NAMES = ("vpsde", "subvpsde", "vesde", "discrete_vpsde", "edm")
VP_BETA_SCHEDULES = ("linear", "cosine")
# The cosine schedule's valid end: where beta(t) reaches 999, i.e. where the per-step beta of
# iDDPM's 1000-step discretisation (~ beta(t) / 1000) reaches iDDPM's clip of 0.999.
COSINE_MAX_BETA = 999.0


def array_namespace(*xs: Array):
    """``jax.numpy`` if any argument is a JAX array (or tracer), else ``numpy``."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def _as_float(x: Array, xp):
    return xp.asarray(x, dtype=xp.float64) if xp is np else xp.asarray(x)


class NoiseSchedule:
    """Interface shared by all schedules. Subclasses implement the three primitives.

    Attributes every subclass defines: ``t_min``/``t_max`` (the valid domain of ``t``: every
    sampling interval lies inside it), ``default_t0``/``default_t1`` (the sampling interval
    score_sde/DEIS use) and ``prior_std`` (x_T ~ N(0, prior_std^2 I)). ``domain_note`` says
    why the domain ends where it does, when that is not obvious (it is quoted in errors).
    """

    t_min: float
    t_max: float
    default_t0: float
    default_t1: float
    prior_std: float = 1.0
    is_discrete: bool = False
    domain_note: str = ""

    @property
    def rho_limit(self) -> float:
        """The largest noise level ``rho`` a network may be asked for (a learned probe time
        ``a tau`` or AdaSDE's churn ``(1 + gamma) rho`` can exceed the grid's start): ``inf``
        where ``t(rho)`` goes on past ``t_max`` in closed form (the linear VP and sub-VP
        schedules, VE, EDM); ``rho(t_max)`` where it cannot (:class:`DiscreteVPSDE`'s table,
        the cosine schedule's end)."""
        return math.inf

    # --- primitives -------------------------------------------------------------------
    def log_alpha(self, t: Array) -> Array:
        """log of the mean coefficient."""
        raise NotImplementedError

    def rho(self, t: Array) -> Array:
        """sigma(t) / alpha(t)."""
        raise NotImplementedError

    def t_from_rho(self, rho: Array) -> Array:
        """Inverse of ``rho``."""
        raise NotImplementedError

    def model_time(self, t: Array) -> Array:
        """The conditioning value the network was trained with at SDE time ``t``."""
        raise NotImplementedError

    # --- derived quantities -------------------------------------------------------------
    def alpha(self, t: Array) -> Array:
        """The mean coefficient ``exp(log_alpha(t))``."""
        xp = array_namespace(t)
        return xp.exp(self.log_alpha(t))

    def sigma(self, t: Array) -> Array:
        """The noise std ``alpha(t) rho(t)``."""
        return self.alpha(t) * self.rho(t)

    def log_snr(self, t: Array) -> Array:
        """``log(alpha^2 / sigma^2) = -2 log rho``."""
        xp = array_namespace(t)
        return -2.0 * xp.log(self.rho(t))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        """Inverse of ``log_snr``."""
        xp = array_namespace(log_snr)
        return self.t_from_rho(xp.exp(-0.5 * _as_float(log_snr, xp)))

    def marginal(self, t: Array) -> tuple[Array, Array]:
        """``(alpha(t), sigma(t))``."""
        return self.alpha(t), self.sigma(t)

    def prior_sample(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32):
        """x_T ~ N(0, prior_std^2 I)."""
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def interval(self, t0: float | None = None, t1: float | None = None) -> tuple[float, float]:
        """The sampling interval ``(t0, t1)``: the given ends, the schedule's defaults where
        ``None`` (the one place the defaults are resolved), checked by
        :meth:`check_interval`."""
        t0 = float(self.default_t0 if t0 is None else t0)
        t1 = float(self.default_t1 if t1 is None else t1)
        self.check_interval(t0, t1)
        return t0, t1

    def check_interval(self, t0: float, t1: float) -> None:
        """Raise ``ValueError`` unless ``t_min <= t0 < t1 <= t_max`` (``t0 > 0`` in continuous
        time) and ``rho`` is finite and positive at both ends. The message starts with the
        name of the offending end, ``t0`` or ``t1``, and gives the valid domain."""
        domain = f"{self.label}'s valid interval is [{self.t_min:.6g}, {self.t_max:.6g}]"
        for name, value in (("t0", t0), ("t1", t1)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number ({domain}), got {value}")
        if not (t0 > 0 or (self.is_discrete and t0 >= 0)):
            raise ValueError(f"t0 must be > 0 for a continuous schedule, got t0={t0}")
        if t0 < self.t_min:
            raise ValueError(f"t0 must be >= {self.t_min} (the schedule's t_min), got {t0}: "
                             f"{domain}")  # fmt: skip
        if not t0 < t1:
            raise ValueError(f"t0 must be < t1, got t0={t0}, t1={t1}")
        if t1 > self.t_max:
            note = f"; {self.domain_note}" if self.domain_note else ""
            raise ValueError(
                f"t1 must be <= {self.t_max} (the schedule's t_max), got {t1}: {domain}{note}; "
                f"use e.g. t1 = {self.default_t1}, the schedule's default (t1 = None)"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # reported below instead
            rho0, rho1 = (float(self.rho(np.float64(t))) for t in (t0, t1))
        if not (rho0 > 0 and math.isfinite(rho1)):
            name, value, rho = ("t1", t1, rho1) if rho0 > 0 else ("t0", t0, rho0)
            raise ValueError(
                f"{name}={value} gives rho = sigma/alpha = {rho} on {self.label}: alpha or sigma "
                f"is not representable there; move {name} inside the interval"
            )

    @property
    def label(self) -> str:
        """A short name for messages, e.g. ``VPSDE``."""
        return type(self).__name__


def _linear_beta_integral(t: Array, beta_min: float, beta_max: float) -> Array:
    """``int_0^t beta(s) ds = (b1 - b0) t^2 / 2 + b0 t`` for ``beta`` linear from b0 to b1."""
    xp = array_namespace(t)
    t = _as_float(t, xp)
    return 0.5 * (beta_max - beta_min) * t**2 + beta_min * t


def _vp_time_from_neg_log_alpha_bar(neg_log_abar, beta_min: float, beta_max: float, xp):
    """Solve ``(b1 - b0) t^2 / 2 + b0 t = L`` for t >= 0 without cancellation."""
    d = beta_max - beta_min
    return 2.0 * neg_log_abar / (beta_min + xp.sqrt(beta_min**2 + 2.0 * d * neg_log_abar))


@dataclasses.dataclass(frozen=True)
class VPSDE(NoiseSchedule):
    """Variance-preserving SDE ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw`` on t in (0, 1].

    ``schedule='linear'`` (score_sde): ``beta(t) = beta_min + t (beta_max - beta_min)``,
    ``log alpha = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2``,
    ``rho^2 = expm1(-2 log alpha)``.

    ``schedule='cosine'`` (Nichol & Dhariwal, normalised so alpha(0) = 1; jax_deis does not
    normalise): with ``theta(t) = pi/2 (t + s)/(1 + s)``, ``alpha = cos(theta)/cos(theta_0)``,
    ``rho = sqrt(sin(theta - theta_0) sin(theta + theta_0)) / cos(theta)`` and the inverse
    ``theta = arctan(sqrt(sin^2 theta_0 + rho^2) / cos theta_0)`` (both written without
    cancellation in ``theta - theta_0``). alpha(1) = 0 exactly (cos(pi/2) in floating point
    is ~6e-17, rho(1) ~ 1e16: every sampler returns garbage), so the valid domain ends where
    ``beta(t) = pi/(1 + s) tan(theta) = COSINE_MAX_BETA = 999`` -- the t at which the
    per-step beta of iDDPM's 1000-step discretisation, ~beta(t)/1000, reaches iDDPM's clip
    0.999 -- which is ``t_max = (2/pi)(1 + s) arctan(999 (1 + s)/pi) - s = 0.99800`` for
    s = 0.008 (alpha ~ 3e-3, rho ~ 320; the linear schedule's rho(1) is 152). The default
    sampling end is T = 0.9946 (as DPM-Solver).

    ``num_scales`` is the number of discrete steps the network was trained with; score_sde
    feeds continuous VP models ``(num_scales - 1) * t`` (= 999 t), see ``model_time``.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    schedule: str = "linear"
    cosine_s: float = 0.008
    num_scales: int = 1000
    t_min: float = 0.0
    t_max: float = 1.0
    default_t0: float = 1e-3
    default_t1: float = 1.0

    def __post_init__(self):
        if self.schedule not in VP_BETA_SCHEDULES:
            raise ValueError(
                f"VPSDE.schedule must be one of {VP_BETA_SCHEDULES}, got {self.schedule!r}"
            )
        if self.schedule == "linear" and not 0 < self.beta_min <= self.beta_max:
            raise ValueError(
                f"VPSDE needs 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}"
            )
        if self.schedule == "cosine":
            end = self.cosine_t_end(self.cosine_s)
            if self.t_max == 1.0:  # the field's default: the cosine domain ends earlier
                object.__setattr__(self, "t_max", end)
            elif self.t_max > end:
                raise ValueError(f"VPSDE.t_max must be <= {end:g} for the cosine schedule "
                                 f"({self.domain_note}), got {self.t_max}")  # fmt: skip
            if self.default_t1 == 1.0:
                object.__setattr__(self, "default_t1", 0.9946)

    @property
    def rho_limit(self) -> float:
        if self.schedule == "cosine":  # the domain ends (alpha -> 0): t(rho) saturates
            return float(self.rho(np.float64(self.t_max)))
        return math.inf

    @staticmethod
    def cosine_t_end(s: float) -> float:
        """The end of the cosine schedule's valid domain: ``beta(t) = COSINE_MAX_BETA``."""
        return 2.0 / math.pi * (1.0 + s) * math.atan(COSINE_MAX_BETA * (1.0 + s) / math.pi) - s

    @property
    def domain_note(self) -> str:  # type: ignore[override]
        if self.schedule != "cosine":
            return ""
        return (f"beyond it beta(t) > {COSINE_MAX_BETA:g}, iDDPM's clip of the per-step beta "
                "at 0.999 over 1000 steps, and alpha(1) = 0")  # fmt: skip

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"VPSDE({self.schedule})"

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, **kw) -> VPSDE:
        """score_sde's linear beta schedule."""
        return cls(beta_min=beta_min, beta_max=beta_max, schedule="linear", **kw)

    @classmethod
    def cosine(cls, s: float = 0.008, **kw) -> VPSDE:
        """The cosine schedule of Nichol & Dhariwal (offset ``s``)."""
        return cls(schedule="cosine", cosine_s=s, **kw)

    # cosine helpers
    def _theta(self, t, xp):
        return 0.5 * math.pi * (_as_float(t, xp) + self.cosine_s) / (1.0 + self.cosine_s)

    @property
    def _theta0(self) -> float:
        return 0.5 * math.pi * self.cosine_s / (1.0 + self.cosine_s)

    def neg_log_alpha_bar(self, t: Array) -> Array:
        """``-log alpha(t)^2 = int_0^t beta(s) ds`` (linear schedule)."""
        return _linear_beta_integral(t, self.beta_min, self.beta_max)

    def beta(self, t: Array) -> Array:
        """``beta(t) = -d log alpha^2 / dt``."""
        xp = array_namespace(t)
        if self.schedule == "linear":
            return self.beta_min + _as_float(t, xp) * (self.beta_max - self.beta_min)
        theta = self._theta(t, xp)
        return math.pi / (1.0 + self.cosine_s) * xp.tan(theta)

    def log_alpha(self, t):
        xp = array_namespace(t)
        if self.schedule == "linear":
            return -0.5 * self.neg_log_alpha_bar(t)
        return xp.log(xp.cos(self._theta(t, xp))) - math.log(math.cos(self._theta0))

    def rho(self, t):
        xp = array_namespace(t)
        if self.schedule == "linear":
            return xp.sqrt(xp.expm1(self.neg_log_alpha_bar(t)))
        theta, theta0 = self._theta(t, xp), self._theta0
        dtheta = 0.5 * math.pi * _as_float(t, xp) / (1.0 + self.cosine_s)  # theta - theta0
        return xp.sqrt(xp.sin(dtheta) * xp.sin(theta + theta0)) / xp.cos(theta)

    def t_from_rho(self, rho):
        xp = array_namespace(rho)
        rho = _as_float(rho, xp)
        if self.schedule == "linear":
            return _vp_time_from_neg_log_alpha_bar(
                xp.log1p(rho**2), self.beta_min, self.beta_max, xp
            )
        # theta - theta0 = arctan(a) - arctan(b), a = sqrt(sin^2 th0 + rho^2)/cos th0,
        # b = tan th0, written as arctan((a - b) / (1 + a b)) without cancellation.
        sin0, cos0 = math.sin(self._theta0), math.cos(self._theta0)
        root = xp.sqrt(sin0**2 + rho**2)
        a_minus_b = rho**2 / ((root + sin0) * cos0)
        dtheta = xp.arctan(a_minus_b / (1.0 + root * sin0 / cos0**2))
        return dtheta * (1.0 + self.cosine_s) / (0.5 * math.pi)

    def model_time(self, t):
        return (self.num_scales - 1) * t


@dataclasses.dataclass(frozen=True)
class SubVPSDE(NoiseSchedule):
    """score_sde's sub-VP SDE: the VP mean with ``sigma(t) = 1 - alpha(t)^2``.

    ``alpha = exp(-L/2)`` with ``L = int_0^t beta``, ``sigma = -expm1(-L)``, hence
    ``rho = sigma / alpha`` and, inverting ``rho = 2 sinh(L/2)``, ``L = 2 asinh(rho / 2)``.
    The diffusion ``g^2 = beta (1 - exp(-2 L))`` keeps these marginals, so the same
    probability-flow ODE ``dv/drho = eps`` holds.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    num_scales: int = 1000
    t_min: float = 0.0
    t_max: float = 1.0
    default_t0: float = 1e-3
    default_t1: float = 1.0

    def __post_init__(self):
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(
                f"SubVPSDE needs 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}"
            )

    def neg_log_alpha_bar(self, t: Array) -> Array:
        """``L(t) = int_0^t beta(s) ds`` of the linear beta schedule."""
        return _linear_beta_integral(t, self.beta_min, self.beta_max)

    def log_alpha(self, t):
        return -0.5 * self.neg_log_alpha_bar(t)

    def rho(self, t):
        xp = array_namespace(t)
        return 2.0 * xp.sinh(0.5 * self.neg_log_alpha_bar(t))

    def t_from_rho(self, rho):
        xp = array_namespace(rho)
        big_l = 2.0 * xp.arcsinh(0.5 * _as_float(rho, xp))
        return _vp_time_from_neg_log_alpha_bar(big_l, self.beta_min, self.beta_max, xp)

    def model_time(self, t):
        return (self.num_scales - 1) * t


@dataclasses.dataclass(frozen=True)
class VESDE(NoiseSchedule):
    """Variance-exploding SDE: ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max/sigma_min)^t``.

    ``rho = sigma``, ``t(rho) = log(rho / sigma_min) / log(sigma_max / sigma_min)``; the prior is
    N(0, sigma_max^2 I) and score_sde conditions VE networks on sigma itself.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0
    default_t0: float = 1e-5
    default_t1: float = 1.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"VESDE needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}"
            )

    @property
    def prior_std(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def log_alpha(self, t):
        xp = array_namespace(t)
        return xp.zeros_like(_as_float(t, xp))

    def rho(self, t):
        xp = array_namespace(t)
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        return self.sigma_min * xp.exp(_as_float(t, xp) * log_ratio)

    def t_from_rho(self, rho):
        xp = array_namespace(rho)
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        return xp.log(_as_float(rho, xp) / self.sigma_min) / log_ratio

    def model_time(self, t):
        return self.sigma(t)


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteVPSDE(NoiseSchedule):
    """A discrete-time DDPM schedule ``alpha_bar[n], n = 0..N-1``, seen in continuous time.

    Time is measured in *index units*: ``t in [0, N - 1]`` and ``alpha(n)^2 = alpha_bar[n]``
    at the integers. Between integers ``log alpha`` is interpolated linearly (so rho, sigma
    and the inverse are exact and monotone; Runge-Kutta stages may use fractional t).

    The network input is ``model_time(t) = t + index_offset``: 0 for models trained with
    index n <-> alpha_bar[n] (DDPM/score_sde discrete), -1 for PNDM-style checkpoints whose
    index n means alpha_bar[n + 1] (the "tau - 1" shift of the DEIS CelebA demo). No factor
    of 1000 is hidden anywhere: ``N`` comes from the betas.
    """

    alphas_cumprod: np.ndarray = dataclasses.field(repr=False, default=None)
    index_offset: float = 0.0

    def __post_init__(self):
        abar = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if abar.ndim != 1 or abar.size < 2:
            raise ValueError("DiscreteVPSDE.alphas_cumprod must be a 1-D array of length >= 2")
        if not (np.all(abar > 0) and np.all(abar < 1) and np.all(np.diff(abar) < 0)):
            raise ValueError(
                "DiscreteVPSDE.alphas_cumprod must lie in (0, 1) and be strictly decreasing"
            )
        object.__setattr__(self, "alphas_cumprod", abar)
        object.__setattr__(self, "_log_alpha_table", 0.5 * np.log(abar))

    @classmethod
    def from_betas(cls, betas: Array, **kw) -> DiscreteVPSDE:
        """A discrete schedule from its betas (each in (0, 1))."""
        betas = np.asarray(betas, dtype=np.float64)
        if np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("DiscreteVPSDE betas must lie in (0, 1)")
        return cls(alphas_cumprod=np.exp(np.cumsum(np.log1p(-betas))), **kw)

    @classmethod
    def linear(
        cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000, **kw
    ) -> DiscreteVPSDE:
        """DDPM's schedule: ``num_steps`` betas linearly spaced in [beta_start, beta_end]."""
        return cls.from_betas(np.linspace(beta_start, beta_end, num_steps), **kw)

    is_discrete = True
    t_min = 0.0
    default_t0 = 0.0

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.size)

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.num_steps - 1)

    @property
    def default_t1(self) -> float:  # type: ignore[override]
        return float(self.num_steps - 1)

    @property
    def rho_limit(self) -> float:  # t(rho) clamps at the table's last index
        return float(self.rho(np.float64(self.t_max)))

    def log_alpha(self, t):
        xp = array_namespace(t)
        grid = xp.arange(self.num_steps, dtype=xp.float64 if xp is np else None)
        return xp.interp(_as_float(t, xp), grid, xp.asarray(self._log_alpha_table))

    def rho(self, t):
        xp = array_namespace(t)
        return xp.sqrt(xp.expm1(-2.0 * self.log_alpha(t)))

    def t_from_rho(self, rho):
        xp = array_namespace(rho)
        target = 0.5 * xp.log1p(_as_float(rho, xp) ** 2)  # = -log alpha, increasing in t
        grid = xp.arange(self.num_steps, dtype=xp.float64 if xp is np else None)
        return xp.interp(target, -xp.asarray(self._log_alpha_table), grid)

    def model_time(self, t):
        return t + self.index_offset


@dataclasses.dataclass(frozen=True)
class EDMSchedule(NoiseSchedule):
    """EDM's schedule (Karras et al. 2022): ``alpha = 1``, ``sigma(t) = t``, t in
    ``[sigma_min, sigma_max]``.

    Time *is* the noise level, so ``rho(t) = sigma(t) = t`` and ``t(rho) = rho``: the DEIS rho
    variable, EDM's sigma and t coincide, tAB-DEIS equals rhoAB-DEIS, and the ``rho`` grid
    with power 7 (``karras``) is EDM's sigma grid
    ``t_i = (sigma_max^(1/7) + i/N (sigma_min^(1/7) - sigma_max^(1/7)))^7``.
    ``model_time(t) = t``: EDM's preconditioners (VP, VE and EDM alike) take sigma. The prior
    is N(0, sigma_max^2 I). The defaults are EDM's sampler's, 0.002 and 80; the valid domain
    is ``[sigma_min, sigma_max]`` (below sigma_min use ``final_denoise``, EDM's last step to
    sigma = 0).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"EDMSchedule needs 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                f"{self.sigma_max}"
            )

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return float(self.sigma_min)

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.sigma_max)

    default_t0 = t_min
    default_t1 = t_max
    prior_std = t_max

    def log_alpha(self, t):
        xp = array_namespace(t)
        return xp.zeros_like(_as_float(t, xp))

    def rho(self, t):
        xp = array_namespace(t)
        return _as_float(t, xp) * 1.0

    def t_from_rho(self, rho):
        xp = array_namespace(rho)
        return _as_float(rho, xp) * 1.0

    def model_time(self, t):
        return t


def check_schedule(schedule, argument: str = "schedule") -> None:
    """``TypeError`` naming ``argument`` unless ``schedule`` is a :class:`NoiseSchedule`
    (a config name such as ``'vpsde'`` goes through :func:`get_sde` first)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(
            f"{argument} must be a NoiseSchedule such as VPSDE.linear() or get_sde('vpsde'), "
            f"got {type(schedule).__name__} {schedule!r}"
        )


def get_sde(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by config name (one of ``SDE_NAMES``: ``vpsde``, ``subvpsde``,
    ``vesde``, ``discrete_vpsde``, ``edm``)."""
    if name == "vpsde":
        return VPSDE(**kwargs)
    if name == "subvpsde":
        return SubVPSDE(**kwargs)
    if name == "vesde":
        return VESDE(**kwargs)
    if name == "discrete_vpsde":
        return DiscreteVPSDE.linear(**kwargs)
    if name == "edm":
        return EDMSchedule(**kwargs)
    raise ValueError(f"sde.name must be one of {SDE_NAMES}, got {name!r}")
