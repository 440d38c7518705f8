"""The bottleneck feature every network of deis_jax.models sows (what AMED's predictor reads)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def apply_with_features(
    model: nn.Module, params: Any, x: jax.Array, labels: jax.Array, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """``(out, features)`` of ``model`` (in eval mode, ``train=False``).

    ``out`` is exactly ``model.apply({'params': params}, x, labels, train=False, **kwargs)``
    (``kwargs``: e.g. the ``class_labels`` of an EDM network, whose ``labels`` is sigma);
    ``features`` has shape ``(B, H_low * W_low)``: the channel mean of the activation the
    network sows as ``intermediates['bottleneck']`` (score_sde's networks: after the middle
    block; EDM's: the last encoder block; both at the lowest resolution), flattened
    row-major, float32, wrapped in ``jax.lax.stop_gradient``.

    Raises:
      ValueError: if ``model`` sows no ``bottleneck`` (not a network of deis_jax.models).
    """
    out, state = model.apply(
        {"params": params}, x, labels, train=False, mutable=["intermediates"], **kwargs
    )
    sown = state.get("intermediates", {}).get("bottleneck")
    if not sown:
        raise ValueError(
            f"{type(model).__name__} sows no 'bottleneck' intermediate; features are "
            "available for the networks of deis_jax.models (NCSNpp, DDPM, EDM's U-Nets)"
        )
    h = sown[-1]
    features = jnp.mean(h.astype(jnp.float32), axis=-1).reshape(h.shape[0], -1)
    return out, jax.lax.stop_gradient(features)
