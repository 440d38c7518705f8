"""LD3: learn a sampler's time grid by backpropagating through the sampler (Tong et al., 2025).

**Grid.** Between the fixed ends of ``plan.ts`` the grid lives in half-log-SNR
``lambda = log(alpha / sigma)``. With ``N`` steps and ``N`` logits ``theta``,

    lambda_i = lambda_0 + (lambda_N - lambda_0) * sum_{m < i} softmax(theta)_m,  i = 0..N,

so the ends are exact, the grid is strictly monotone by construction (every softmax weight is
positive) and ``theta`` has ``N - 1`` effective degrees of freedom (adding a constant does
nothing). ``theta_init = log(diff(lambda(plan.ts)))`` reproduces ``plan.ts``: the fit starts
from the plan's own grid. ``t_i = schedule.t_from_log_snr(2 lambda_i)``.

**Table (optional).** With ``learn_table=True`` the method's output coefficients also get
bounded sum-zero corrections ``raw`` (``deis_jax.sampling.learned.corrected_table``), fitted
jointly with the grid; ``raw = 0`` is the base method.

**Loss.** For starting points ``x_T`` and teacher endpoints ``x0`` (an accurate ODE solve from
the same ``x_T``), each sample's RMS distance per dimension

    d_b(theta, raw) = |Psi_{theta, raw}(x_T^b) - x0^b| / sqrt(D),

where ``Psi`` is :func:`deis_jax.sampling.sampler.sample` run with ``plan.build_table(ts)`` --
the same builder and the same scan as ordinary sampling, differentiated by ``jax.grad`` --
is averaged over the samples by one of ``LOSSES``:

    mse          mean_b d_b^2          (= RMSE^2; the squares let the worst samples own it)
    rms          mean_b d_b            (LD3's per-sample L2 norm: every sample counts alike)
    trimmed_rms  mean of the (1 - trim) smallest d_b of the batch (the worst ``trim`` of the
                 samples -- e.g. ones a coarse sampler sends to another mixture component,
                 which no grid can bring back -- do not pull on the fit at all)

**Soft teacher (optional, ``ball > 0``).** LD3's relaxation: the student may start from a
moved latent ``x_T'`` in the ball ``|x_T' - x_T| <= r`` with ``r = ball * sqrt(D) / N^2``
(``N`` steps; in ``x_T`` units, so ``ball`` is the radius relative to ``|x_T| ~ sqrt(D)`` at
one step; LD3's CIFAR-10 setting ``0.001 D / N^2`` is ``ball = 0.001 sqrt(D)``). Per update,
each training latent takes one gradient step of size ``shift_lr`` (default ``12 / N``) on its
own loss, is projected onto its ball, and the move is kept only if that sample's loss with the
updated parameters is lower than before the update. If no latent of an update moved,
``shift_lr`` is halved. Validation always uses the original latents.

**Optimisation.** :func:`deis_jax.fitting.adam_loop.fit_adam` (the loop shared with the other
learned samplers; the soft teacher runs as its ``after_update`` hook): Adam (optax) on
``(theta, raw)`` jointly with global-norm gradient clipping, its rate decaying along a cosine
to ``final_lr_fraction`` of the initial one (so that late updates settle instead of
bouncing around the optimum); minibatches from ``PRNGKey(seed)``
(shuffled passes; full batch when ``batch_size`` is None); the validation loss is evaluated
first at the init and then every ``eval_every`` updates, training stops after ``patience``
evaluations without improvement (default: a quarter of ``steps``, at least 20), and the
parameters with the best validation loss are returned -- never worse than the init on the
validation set. A fit that does not improve on its init says so: ``LD3Result.improved`` is
False and a :class:`NoFitWarning` names the plan. An update whose loss or gradient is not
finite is skipped (and logged). With ``state_path`` the fit is resumable.

**Class labels** (a class-conditional network): ``labels_train`` / ``labels_val`` give each
starting point's class; every minibatch passes its rows' labels to the sampler
(``sample(..., labels=...)``), indexed with its ``x_T`` and ``x0``.

Precision: fit under ``jax_enable_x64`` with float64 ``x_T`` when the grid must be accurate;
the returned grid is recomputed on the host in float64 from the best logits either way.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.identity import arrays_digest, float64_digest, json_digest
from deis_jax.fitting.adam_loop import ExtraState, fit_adam
from deis_jax.sampling.learned import corrected_table, correction_mask
from deis_jax.sampling.sampler import SamplingPlan, sample
from deis_jax.sampling.sde import Array, array_namespace
from deis_jax.sampling.wrappers import EpsFn, model_argument

logger = logging.getLogger(__name__)

Params = dict[str, Array]  # {"theta": (N,)} plus {"raw": (N, S + H)} when learning a table


LOSSES = ("mse", "rms", "trimmed_rms")
# rms by measurement: on the outlier-prone 3072-D mixture (GaussianMixture.scattered) it is the
# one objective that lowered the mean, the median and the RMSE of iPNDM-3 + LD3 + table at
# NFE 5 (mse left the RMSE where it was, trimmed_rms raised it); README, "Fitted samplers".
DEFAULT_LOSS = "rms"
DEFAULT_TRIM = 0.1  # the fraction of the worst samples trimmed_rms leaves out
# The bound of the learned corrections, relative to a row's total coefficient. By measurement
# (results/benchmark_fit_max_delta.md): on the 64-D mixture iPNDM-3 + LD3 + table + AFS reached
# a held-out mean distance of 0.0039 / 0.0040 / 0.0034 at NFE 5 with 0.3 / 0.5 / 1.0, and 0.0090
# / 0.00080 / 0.00081 at NFE 10; equal at NFE 3.
DEFAULT_MAX_DELTA = 1.0


class LD3Result(NamedTuple):
    """What :func:`fit_ld3` found.

    ``ts``: the best grid (numpy float64, decreasing, the plan's end points); ``raw``: the best
    table corrections (``(N, S + H)`` numpy, for ``corrected_table``) or None when only the
    grid was fitted; ``theta``: the best logits. ``train_loss[i]``: the minibatch loss before
    update ``i`` (NaN for a skipped update); ``val_loss``: the validation loss at each
    evaluation after an update (one per update when ``eval_every = 1``); ``best_step``: the
    number of updates behind the best parameters (0 = the init); ``seconds``: wall time;
    ``loss``: the objective (``LOSSES``) the losses are in; ``improved``: the best validation
    loss is below the init's (a fit that is not returns the initial grid, with a warning).
    """

    ts: np.ndarray
    raw: np.ndarray | None
    theta: np.ndarray
    train_loss: list[float]
    val_loss: list[float]
    best_step: int
    init_val_loss: float
    best_val_loss: float
    seconds: float
    skipped_steps: int
    loss: str = DEFAULT_LOSS

    @property
    def improved(self) -> bool:
        return self.best_step > 0 and self.best_val_loss < self.init_val_loss


class NoFitWarning(UserWarning):
    """A fit returned its initial parameters: no update improved the validation loss."""


# --- grid parametrisation -----------------------------------------------------------------


def half_log_snr(plan: SamplingPlan) -> np.ndarray:
    """``lambda = log(alpha / sigma) = log_snr / 2`` at the plan's grid (float64, increasing)."""
    return 0.5 * np.asarray(plan.schedule.log_snr(np.asarray(plan.ts, np.float64)), np.float64)


def init_theta(plan: SamplingPlan) -> np.ndarray:
    """Logits reproducing ``plan.ts``: ``theta_i = log(lambda_{i+1} - lambda_i)``, shape (N,)."""
    return np.log(np.diff(half_log_snr(plan)))


def grid_from_params(plan: SamplingPlan, theta: Array) -> Array:
    """The grid ``ts`` (length N + 1, decreasing) of logits ``theta`` (shape (N,)).

    ``lambda_i = lambda_0 + (lambda_N - lambda_0) cumsum(softmax(theta))_{i-1}`` for the
    interior points; the ends are ``plan.ts[0]`` and ``plan.ts[-1]`` exactly. numpy ``theta``
    gives a numpy float64 grid, a JAX ``theta`` (possibly traced) a ``jax.numpy`` one.
    """
    xp = array_namespace(theta)
    n = plan.num_steps
    if tuple(theta.shape) != (n,):
        raise ValueError(f"theta must have shape ({n},) (one logit per step), got {theta.shape}")
    lam = half_log_snr(plan)
    e = xp.exp(theta - xp.max(theta))
    fractions = xp.cumsum(e / xp.sum(e))[:-1]
    interior = plan.schedule.t_from_log_snr(2.0 * (lam[0] + (lam[-1] - lam[0]) * fractions))
    ends = plan.ts[:1], plan.ts[-1:]
    if xp is np:
        return np.concatenate([ends[0], np.asarray(interior, np.float64), ends[1]])
    first, last = (jnp.asarray(end, interior.dtype) for end in ends)
    return jnp.concatenate([first, interior, last])


def fitted_table(plan: SamplingPlan, params: Params, max_delta: float):
    """The step table of ``params``: ``plan``'s method on ``grid_from_params``, with the learned
    corrections when ``params`` has ``raw``. Traceable."""
    table = plan.build_table(grid_from_params(plan, params["theta"]))
    if "raw" in params:
        table = corrected_table(table, params["raw"], max_delta)
    return table


# --- loss ---------------------------------------------------------------------------------


def per_sample_loss(
    plan: SamplingPlan,
    max_delta: float,
    params: Params,
    eps_fn: EpsFn,
    x_T: jax.Array,
    x0: jax.Array,
    labels: jax.Array | None = None,
) -> jax.Array:
    """``|Psi_params(x_T^b) - x0^b|^2 / D`` for every sample ``b`` (shape ``(B,)``; the rows
    of class ``labels``, a class-conditional network)."""
    table = fitted_table(plan, params, max_delta)
    out = sample(plan, eps_fn, x_T, table=table, labels=labels)
    err = (out - jnp.asarray(x0, out.dtype)).reshape(out.shape[0], -1)
    return jnp.mean(err**2, axis=1)


def reduce_losses(
    losses: jax.Array, loss: str = DEFAULT_LOSS, trim: float = DEFAULT_TRIM
) -> jax.Array:
    """The batch objective of per-sample squared distances ``losses = d_b^2`` (``LOSSES``,
    module docstring)."""
    if loss == "mse":
        return jnp.mean(losses)
    dist = jnp.sqrt(losses + jnp.finfo(losses.dtype).tiny)  # d_b; finite gradient at 0
    if loss == "rms":
        return jnp.mean(dist)
    if loss == "trimmed_rms":
        keep = max(1, int(round((1.0 - trim) * dist.shape[0])))
        return jnp.mean(jnp.sort(dist)[:keep])
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _objective(plan, max_delta, loss, trim, params, eps_fn, x_T, x0, labels=None):
    losses = per_sample_loss(plan, max_delta, params, eps_fn, x_T, x0, labels)
    return reduce_losses(losses, loss, trim), losses


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _loss_and_grads(plan, max_delta, loss, trim, latent_grad, params, eps_fn, x_T, x0,
                    labels=None):  # fmt: skip
    """``((objective, per-sample squared distances), (d/dparams, d/dx_T or None))``; the
    latent gradient (for the soft teacher) only when ``latent_grad``."""
    argnums = (4, 6) if latent_grad else 4
    value, grads = jax.value_and_grad(_objective, argnums=argnums, has_aux=True)(
        plan, max_delta, loss, trim, params, eps_fn, x_T, x0, labels
    )
    return value, (grads if latent_grad else (grads, None))


_per_sample_loss_jit = jax.jit(per_sample_loss, static_argnums=(0, 1))


# --- fitting ------------------------------------------------------------------------------


def _check_inputs(x_T, x0, name: str) -> tuple[np.ndarray, np.ndarray]:
    x_T, x0 = np.asarray(x_T), np.asarray(x0)
    if x_T.shape != x0.shape or x_T.ndim < 2 or len(x_T) == 0:
        raise ValueError(
            f"x_T_{name} and x0_{name} must be non-empty batches of the same shape (B, ...), "
            f"got {x_T.shape} and {x0.shape}"
        )
    return x_T, x0


def _check_labels(labels, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels_{name} must be one int class per row of x_T_{name}, shape "
                         f"({n},), got {labels.dtype}{list(labels.shape)}")  # fmt: skip
    return labels


def _project_to_ball(x: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Per sample, the point of the ball ``|x - center| <= radius`` nearest to ``x``."""
    d = (x - center).reshape(len(x), -1)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    factor = np.minimum(1.0, radius / np.maximum(norm, 1e-300))
    return center + (d * factor).reshape(x.shape)


class _SoftTeacher:
    """LD3's soft teacher: per-sample latents ``x_T'`` kept within ``|x_T' - x_T| <= radius``
    (on the host; see the module docstring)."""

    def __init__(self, x_T: np.ndarray, radius: float, lr: float):
        self.origin, self.moved = x_T, x_T.copy()
        self.radius, self.lr = radius, lr

    def move(self, idx: np.ndarray, losses, grad, updated_loss: Callable, x0) -> int:
        """One projected gradient step on the latents ``idx``, kept per sample only where
        ``updated_loss(x_T', x0)`` (per sample, with the updated parameters) is below
        ``losses`` (the loss before the update). ``grad`` is the gradient of the batch-*mean*
        loss, so ``B * grad`` is each sample's own. Halves the step size when nothing moved;
        returns the number of latents moved."""
        g = np.asarray(grad, np.float64) * len(idx)
        if not np.all(np.isfinite(g)):
            return 0
        trial = self.moved[idx] - self.lr * g
        trial = _project_to_ball(trial, self.origin[idx], self.radius).astype(self.moved.dtype)
        after = np.asarray(updated_loss(trial, x0))
        accept = np.isfinite(after) & (after < np.asarray(losses))
        self.moved[idx[accept]] = trial[accept]
        if not accept.any():
            self.lr *= 0.5
        return int(accept.sum())


def fit_ld3(
    plan: SamplingPlan,
    eps_fn: EpsFn,
    x_T_train,
    x0_train,
    x_T_val,
    x0_val,
    *,
    learn_table: bool = False,
    max_delta: float = DEFAULT_MAX_DELTA,
    loss: str = DEFAULT_LOSS,
    trim: float = DEFAULT_TRIM,
    steps: int = 200,
    learning_rate: float = 0.05,
    final_lr_fraction: float = 0.05,
    batch_size: int | None = None,
    patience: int | None = None,
    ball: float = 0.0,
    shift_lr: float | None = None,
    clip_norm: float = 1.0,
    eval_every: int = 1,
    seed: int = 0,
    callback: Callable[[int, float, float | None], None] | None = None,
    state_path: str | None = None,
    state_fingerprint: str = "",
    labels_train=None,
    labels_val=None,
) -> LD3Result:
    """Fit ``plan``'s grid (and with ``learn_table`` its coefficients) to teacher endpoints.

    ``x_T_*`` are starting points at ``plan.ts[0]`` and ``x0_*`` the teacher's endpoints at
    ``plan.ts[-1]`` from the same points (``*_train`` drive the updates, ``*_val`` the early
    stopping). ``max_delta`` bounds the table corrections (``corrected_table``). ``loss``:
    the objective over samples (``LOSSES``; ``trim`` for ``trimmed_rms``), the same on the
    training batches and the validation set. ``steps`` updates of Adam(``learning_rate``,
    decaying along a cosine to ``final_lr_fraction`` of it) after clipping the global gradient
    norm to ``clip_norm``; ``batch_size`` training samples per update (None: all);
    ``patience`` validation evaluations (every ``eval_every`` updates) without improvement
    stop the fit (None: ``max(20, steps // 4)``).
    ``ball > 0`` turns on the soft teacher (module docstring; ``shift_lr`` default ``12/N``).
    ``callback(step, train_loss, val_loss)`` is called after every update (``val_loss`` None
    when the update was not evaluated). See the module docstring for the math.

    ``labels_train`` / ``labels_val``: a class-conditional network's class of every training /
    validation starting point (int, one per row; None: unconditional).

    ``state_path``: make the fit resumable (:func:`deis_jax.fitting.adam_loop.fit_adam`): a
    rerun with the same arguments continues from the state saved there and returns what an
    uninterrupted fit would. The state is keyed by the plan, the settings and a hash of the
    data; ``eps_fn`` cannot be hashed, so name the model in ``state_fingerprint``.
    """
    if plan.stochastic:
        raise ValueError(
            f"LD3 fits deterministic samplers only: method {plan.method!r} adds noise at some "
            "step (use an ODE method such as ddim, tab, ipndm, dpmpp or unipc)"
        )
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1), got {trim!r}")
    patience = max(20, steps // 4) if patience is None else patience
    if steps < 0 or patience < 1 or eval_every < 1:
        raise ValueError(
            f"need steps >= 0, patience >= 1, eval_every >= 1; got {steps}, {patience}, "
            f"{eval_every}"
        )
    if ball < 0 or max_delta < 0:
        raise ValueError(f"ball and max_delta must be >= 0, got {ball} and {max_delta}")
    x_T_train, x0_train = _check_inputs(x_T_train, x0_train, "train")
    x_T_val, x0_val = _check_inputs(x_T_val, x0_val, "val")
    if (labels_train is None) != (labels_val is None):
        raise ValueError("give labels_train and labels_val together (or neither)")
    train_c = val_c = None
    if labels_train is not None:
        train_c = jnp.asarray(_check_labels(labels_train, len(x_T_train), "train"))
        val_c = jnp.asarray(_check_labels(labels_val, len(x_T_val), "val"))
    # on the device once (the soft-teacher latents stay on the host: they are moved per batch)
    train_x, train_x0 = jnp.asarray(x_T_train), jnp.asarray(x0_train)
    val_x, val_x0 = jnp.asarray(x_T_val), jnp.asarray(x0_val)
    start = time.perf_counter()
    f = model_argument(eps_fn)
    max_delta = float(max_delta)

    params: Params = {"theta": jnp.asarray(init_theta(plan))}
    if learn_table:
        params["raw"] = jnp.zeros(correction_mask(plan.table).shape)

    def val_loss_of(p: Params) -> float:
        losses = _per_sample_loss_jit(plan, max_delta, p, f, val_x, val_x0, val_c)
        return float(reduce_losses(losses, loss, trim))

    num_steps, num_train = plan.num_steps, len(x_T_train)
    radius = ball * np.sqrt(x_T_train[0].size) / num_steps**2
    lr_shift = 12.0 / num_steps if shift_lr is None else float(shift_lr)
    soft = _SoftTeacher(x_T_train, radius, lr_shift) if ball > 0 else None

    def loss_and_grads(p: Params, idx: np.ndarray):
        full = len(idx) == num_train  # the sampler's full batch is arange(num_train)
        if soft is not None:
            x_b = soft.moved[idx]
        else:
            x_b = train_x if full else train_x[idx]
        x0_b = train_x0 if full else train_x0[idx]
        c_b = train_c if full or train_c is None else train_c[idx]  # the rows' classes
        (value, losses), (g_params, g_x) = _loss_and_grads(
            plan, max_delta, loss, trim, soft is not None, p, f, x_b, x0_b, c_b
        )
        return value, (losses, g_x, x0_b, c_b), g_params

    def soft_teacher_step(step: int, idx: np.ndarray, aux, new_params: Params) -> None:
        losses, g_x, x0_b, c_b = aux

        def updated_loss(x, x0):
            return _per_sample_loss_jit(plan, max_delta, new_params, f, x, x0, c_b)

        soft.move(idx, losses, g_x, updated_loss, x0_b)

    extra = None
    if soft is not None:

        def set_soft(state) -> None:
            moved = np.array(state["moved"], dtype=soft.moved.dtype)
            if moved.shape != soft.moved.shape:
                raise ValueError(f"saved latents of shape {moved.shape}, not {soft.moved.shape}")
            soft.moved, soft.lr = moved, float(state["lr"])

        extra = ExtraState(get=lambda: {"moved": soft.moved, "lr": soft.lr}, set=set_soft)
    fingerprint = ""
    if state_path is not None:
        data = (x_T_train, x0_train, x_T_val, x0_val)
        if train_c is not None:  # (an unconditional fit's fingerprint is unchanged)
            data += (np.asarray(train_c), np.asarray(val_c))
        fingerprint = _fingerprint(
            state_fingerprint, plan, (learn_table, max_delta, loss, trim, ball, lr_shift), data
        )

    loop_start = time.perf_counter()
    result = fit_adam(
        loss_and_grads,
        val_loss_of,
        params,
        num_train,
        steps=steps,
        learning_rate=learning_rate,
        final_lr_fraction=final_lr_fraction,
        batch_size=batch_size,
        patience=patience,
        clip_norm=clip_norm,
        eval_every=eval_every,
        seed=seed,
        callback=callback,
        after_update=soft_teacher_step if soft is not None else None,
        state_path=state_path,
        state_fingerprint=fingerprint,
        extra_state=extra,
        name="LD3",
    )
    best_params = result.params
    theta = np.asarray(best_params["theta"], np.float64)
    raw = np.asarray(best_params["raw"], np.float64) if learn_table else None
    fitted = LD3Result(
        ts=grid_from_params(plan, theta),
        raw=raw,
        theta=theta,
        train_loss=result.train_loss,
        val_loss=result.val_loss,
        best_step=result.best_step,
        init_val_loss=result.init_val_loss,
        best_val_loss=result.best_val_loss,
        seconds=loop_start - start + result.seconds,
        skipped_steps=result.skipped_steps,
        loss=loss,
    )
    if not fitted.improved:
        what = "grid and table" if learn_table else "grid"
        warnings.warn(
            f"LD3 did not improve the validation loss of {plan.method} order {plan.order} at "
            f"NFE {plan.nfe} in {len(result.train_loss)} updates ({loss} "
            f"{result.init_val_loss:.4g} at the init): the initial {what} is returned",
            NoFitWarning,
            stacklevel=2,
        )
    return fitted


def _fingerprint(user: str, plan: SamplingPlan, settings: tuple, data: tuple) -> str:
    """What a resumable LD3 fit fits: the caller's string (naming the model, which cannot be
    hashed here), the plan's method, grid and initial logits, the LD3 ``settings`` and the
    digest of the ``data`` arrays (dtype and bytes)."""
    digest = json_digest({
        "settings": [repr(item) for item in settings],
        "data": arrays_digest((str(i), a) for i, a in enumerate(data)),
        "grid": float64_digest([plan.ts, init_theta(plan)]),
    })  # fmt: skip
    return f"ld3 {user} {plan.method} order={plan.order} nfe={plan.nfe} {digest[:16]}"
