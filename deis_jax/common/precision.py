"""Compute dtypes of the networks (mixed precision).

A network runs in its *compute dtype* ``config.model.dtype`` (one of :data:`COMPUTE_DTYPES`,
default ``float32``): its parameters are stored in float32 (checkpoints, training's master
weights, the optimiser state) and cast to the compute dtype for the forward pass
(:func:`cast_params`); its activations and matmuls run in the compute dtype; normalisation
statistics, attention softmaxes and the network's output are float32
(:func:`at_least_float32`), as in EDM's ``use_fp16`` path. The sampler's state stays float32
or wider (:func:`check_state_dtype`): the network's output is cast to the state's dtype, and
the solver's coefficients are float64 on the host, so that a low-precision eps only adds its
own rounding error (relative ~2^-8 for bfloat16) to each step, instead of rounding the state
(whose last steps change it by less than a bfloat16 ulp).

``float32`` is the identity everywhere here: every helper returns its argument unchanged, so
float32 networks compute exactly what they computed before mixed precision existed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

#: the values of ``config.model.dtype``
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_DTYPE = "float32"
#: dtypes narrower than float32 (a network may compute in them; a sampler state may not)
LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_compute_dtype(dtype: str) -> str:
    """``dtype`` if it is one of :data:`COMPUTE_DTYPES` (``ValueError`` naming them)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}")
    return dtype


def is_low_precision(dtype: Any) -> bool:
    """Whether ``dtype`` is bfloat16 or float16."""
    return jnp.dtype(dtype) in LOW_PRECISION


def cast_params(params: Any, dtype: str) -> Any:
    """The compute copy of float32 ``params``: floating leaves cast to ``dtype`` (others, e.g.
    integer buffers, kept); ``params`` itself for float32."""
    if check_compute_dtype(dtype) == DEFAULT_DTYPE:
        return params

    def cast(leaf):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return jnp.asarray(leaf, dtype)
        return leaf

    return jax.tree.map(cast, params)


def to_compute(x: jax.Array, dtype: str) -> jax.Array:
    """``x`` in the compute ``dtype``; ``x`` itself for float32 (whatever its dtype)."""
    return x if dtype == DEFAULT_DTYPE else x.astype(dtype)


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` promoted to float32 when it is bfloat16 / float16 (a normalisation's input, a
    softmax's logits, a network's output); unchanged otherwise."""
    return x.astype(jnp.float32) if is_low_precision(x.dtype) else x


def float32_unless_low(x: Any) -> jax.Array:
    """``x`` as float32, unless it is bfloat16 / float16 already (then unchanged): the input
    cast of a layer that computes in float32 in a float32 network and keeps a low-precision
    network's activations in their dtype."""
    x = jnp.asarray(x)
    return x if is_low_precision(x.dtype) else x.astype(jnp.float32)


def check_state_dtype(dtype: Any) -> None:
    """A sampler state must be float32 or wider: ``TypeError`` for bfloat16 / float16."""
    if is_low_precision(dtype):
        raise TypeError(
            f"the sampler state (x_T) must be float32 or float64, got {jnp.dtype(dtype)}: a "
            "low-precision state loses the last steps' updates, which are smaller than its "
            "ulp; keep x_T in float32 and set config.model.dtype to run the network in "
            f"{jnp.dtype(dtype)}"
        )


def model_identity(model: dict) -> dict:
    """``config.model`` (a plain dict) as run identities record it: without ``dtype`` when it
    is float32, so that identities (checkpoints, cached cells) made before the field existed
    still match; a low-precision dtype is part of the identity (it changes every result)."""
    model = dict(model)
    if model.get("dtype") == DEFAULT_DTYPE:
        del model["dtype"]
    return model
