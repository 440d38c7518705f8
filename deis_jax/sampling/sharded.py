"""A sampler jitted once over a ``('data',)`` mesh: the sharded sampling of every mode.

* :func:`shard_sampler` -- a :class:`~deis_jax.sampling.sampler.Sampler` jitted once with the
  batch sharded ``P('data')`` and the network replicated (``deis_jax.common.parallel``'s
  shardings);
* :func:`make_generate_fn` -- the same, but ``x_T`` is drawn inside the jit from the global
  sample indices (:func:`prior_draws`, keys of :func:`sample_keys`), so nothing but int32
  indices crosses the host/device boundary.

Determinism: ``x_T`` of sample ``i`` is drawn from ``fold_in(prior_key, i)`` and the noise at
step ``k`` from ``fold_in(fold_in(noise_key, i), k)``; see ``deis_jax.common.parallel`` for
when sharded results equal the 1-device ones bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from deis_jax.common.parallel import batch_sharding, replicate, replicated_sharding
from deis_jax.sampling.sampler import Sampler, sample
from deis_jax.sampling.wrappers import model_argument


def shard_sampler(sampler: Sampler, mesh: jax.sharding.Mesh) -> Callable:
    """``sampler`` jitted once over ``mesh``: ``fn(x_T, key=None, index_offset=0) -> x_0``.

    ``x_T`` is sharded ``P('data')`` (its length a multiple of ``mesh.size``), the key and
    offset are replicated, and ``x_0`` comes back sharded ``P('data')``. ``index_offset`` is
    the global index of row 0 (stochastic methods key their noise by it). The sampler's
    ``eps_fn`` is a replicated argument of the compiled function (its parameters are not
    baked in; see ``deis_jax.sampling.wrappers.model_argument``).

    Rows concatenated over calls equal a 1-device run bit for bit only when each call has the
    same rows per device (``len(x_T) // mesh.size``) as that run: split the work into calls of
    a fixed per-device batch. One call of the same global batch on another number of devices
    is close (float32 rounding), not identical (``deis_jax.common.parallel``, "Determinism")."""
    b, r = batch_sharding(mesh), replicated_sharding(mesh)
    plan = sampler.plan
    # the network and the learned rule's parameters (e.g. an AMED predictor), replicated
    model = replicate((model_argument(sampler.eps_fn), sampler.rule_params), mesh)
    if sampler.stochastic:
        jitted = jax.jit(
            lambda m, x_T, key, offset: sample(
                plan, m[0], x_T, key, index_offset=offset, rule_params=m[1]
            ),
            in_shardings=(r, b, r, r),
            out_shardings=b,
        )

        def call(x_T, key=None, index_offset=0):
            if key is None:
                raise ValueError("this sampler is stochastic: pass a PRNG key")
            return jitted(model, x_T, jax.device_put(key, r), np.int32(index_offset))

        return call
    jitted = jax.jit(
        lambda m, x_T: sample(plan, m[0], x_T, rule_params=m[1]),
        in_shardings=(r, b),
        out_shardings=b,
    )
    return lambda x_T, key=None, index_offset=0: jitted(model, x_T)


def make_generate_fn(
    sampler: Sampler,
    mesh: jax.sharding.Mesh,
    sample_shape: tuple[int, ...],
    *,
    prior: Callable[[jax.Array], jax.Array] | None = None,
    bind: Callable[..., Callable] | None = None,
    labels: Callable[[jax.Array], jax.Array] | None = None,
    dtype=jnp.float32,
) -> Callable:
    """Jit once: ``fn(params, prior_key, noise_key, indices) -> (x_0, indices)``.

    ``indices`` (int32, sharded ``P('data')``; build it with ``parallel.shard_local_batch``
    or ``parallel.shard_batch``) are *global* sample indices. Inside the jit, ``x_T[j] =
    prior(fold_in(prior_key, indices[j]))`` (default: ``schedule.prior_sample(key,
    sample_shape, dtype)``) and the stochastic noise of row ``j`` is keyed by ``indices[j]``,
    so a sample depends only on its index. ``bind(params) -> eps_fn`` rebinds the network to
    ``params`` (passed as a replicated argument, not baked into the executable); without
    ``bind`` the sampler's own ``eps_fn`` is used and ``params`` is ignored (pass ``None``).
    ``labels(indices) -> classes`` (a class-conditional network,
    ``deis_jax.sampling.class_labels.ClassLabels``) draws the class of every row from its
    global index inside the jit, like ``x_T``, and passes them to the sampler with the rows
    (``sample(..., labels=classes)``: every network call gets its rows' classes, EPD's
    concatenated probe call included). ``indices`` is returned alongside ``x_0`` with the same
    sharding, so a caller can pair rows with indices without assuming a device order."""
    if labels is not None and bind is None:
        raise ValueError("labels need bind(params): the network to condition")
    shape = tuple(int(s) for s in sample_shape)
    if prior is None:

        def prior(key):
            return sampler.schedule.prior_sample(key, shape, dtype)

    b, r = batch_sharding(mesh), replicated_sharding(mesh)

    def generate(params, prior_key, noise_key, indices):
        x_T = prior_draws(prior, prior_key, indices)
        x_T = jax.lax.with_sharding_constraint(x_T, b)
        bound = sampler if bind is None else dataclasses.replace(sampler, eps_fn=bind(params))
        rows = {} if labels is None else {"labels": labels(indices)}
        if not bound.stochastic:
            return bound(x_T, **rows), indices
        return bound(x_T, noise_key, sample_index=indices, **rows), indices

    return jax.jit(generate, in_shardings=(r, r, r, b), out_shardings=(b, b))


def prior_draws(
    prior: Callable[[jax.Array], jax.Array], prior_key: jax.Array, indices: jax.Array
) -> jax.Array:
    """``x_T`` of the samples with global ``indices``: row ``j`` is ``prior(fold_in(prior_key,
    indices[j]))`` -- the one keying of ``x_T`` (:func:`make_generate_fn` draws with it)."""
    return jax.vmap(lambda i: prior(jax.random.fold_in(prior_key, i)))(indices)


def sample_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(prior_key, noise_key)`` of a run: ``split(PRNGKey(seed))``, as ``--mode=sample``."""
    prior_key, noise_key = jax.random.split(jax.random.PRNGKey(int(seed)))
    return prior_key, noise_key
