"""Basic layers shared by the score_sde-compatible networks (NCSN++, DDPM++ and DDPM).

Everything here is written so that the Flax parameter names match the published score_sde
checkpoints: Flax names an unnamed submodule ``<ClassName>_<k>``, where ``k`` counts the
submodules of that class created so far in the parent. The class names below (``NIN``,
``AttnBlockpp``, ``GaussianFourierProjection``, ...) and the order in which the parents create
them are therefore part of the checkpoint format and must not change.

Initialisers follow DDPM (Ho et al., 2020): weights are drawn from a variance-scaling
"fan_avg, uniform" distribution with a per-layer ``scale``; a scale of 0 (used for the last
layer of residual branches) is replaced by 1e-10 so that the branch starts out (almost) as the
identity. Biases start at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deis_jax.common.precision import at_least_float32

Initializer = Callable[..., jax.Array]


def default_init(scale: float = 1.0) -> Initializer:
    """DDPM initialiser: variance scaling with ``fan_avg`` and a uniform distribution.

    ``scale = 0`` means "as close to zero as possible" and becomes 1e-10.
    """
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


NONLINEARITIES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "silu": nn.swish,
    "relu": nn.relu,
    "elu": nn.elu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
}


def get_act(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` in score_sde's ``model.nonlinearity``."""
    try:
        return NONLINEARITIES[name.lower()]
    except KeyError:
        raise ValueError(
            f"model.nonlinearity must be one of {sorted(NONLINEARITIES)}, got {name!r}"
        ) from None


def group_norm(x: jax.Array) -> jax.Array:
    """GroupNorm with ``min(C // 4, 32)`` groups (the score_sde rule), as a ``GroupNorm_k``.

    Computed in float32 and returned in ``x``'s dtype (a no-op pair of casts unless ``x`` is
    bfloat16 / float16). Must be called from inside a compact ``__call__``: the module is
    created in the caller.
    """
    out = nn.GroupNorm(num_groups=min(x.shape[-1] // 4, 32))(at_least_float32(x))
    return out.astype(x.dtype)


def conv(
    x: jax.Array,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    bias: bool = True,
    init_scale: float = 1.0,
) -> jax.Array:
    """k x k 'SAME' convolution with the DDPM initialiser (a ``Conv_k`` in the caller)."""
    return nn.Conv(
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=bias,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
    )(x)


def conv3x3(x: jax.Array, out_ch: int, **kwargs) -> jax.Array:
    return conv(x, out_ch, 3, **kwargs)


def conv1x1(x: jax.Array, out_ch: int, **kwargs) -> jax.Array:
    return conv(x, out_ch, 1, **kwargs)


def dense(x: jax.Array, features: int, init_scale: float = 1.0) -> jax.Array:
    """Fully connected layer with the DDPM initialiser (a ``Dense_k`` in the caller)."""
    return nn.Dense(features, kernel_init=default_init(init_scale))(x)


class NIN(nn.Module):
    """A "network in network" layer: a per-pixel linear map over the channel axis.

    Equivalent to a 1x1 convolution, but its parameters are called ``W`` (shape
    ``(C_in, num_units)``) and ``b`` as in score_sde.
    """

    num_units: int
    init_scale: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_dim = x.shape[-1]
        # float32 parameters whatever jax_enable_x64 says (as nn.Dense / nn.Conv keep them)
        w = self.param("W", default_init(self.init_scale), (in_dim, self.num_units), jnp.float32)
        b = self.param("b", nn.initializers.zeros, (self.num_units,), jnp.float32)
        return jnp.einsum("...c,cd->...d", x, w) + b


def _self_attention(h: jax.Array, q_k_v_out: tuple[NIN, NIN, NIN, NIN]) -> jax.Array:
    """Single-head softmax attention over all H*W positions with NIN projections (the softmax
    in float32 whatever the compute dtype)."""
    b, height, width, c = h.shape
    nin_q, nin_k, nin_v, nin_out = q_k_v_out
    q, k, v = nin_q(h), nin_k(h), nin_v(h)
    q = q.reshape(b, height * width, c)
    k = k.reshape(b, height * width, c)
    v = v.reshape(b, height * width, c)
    logits = jnp.einsum("bic,bjc->bij", q, k) * (c**-0.5)
    weights = jax.nn.softmax(at_least_float32(logits), axis=-1).astype(v.dtype)
    out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, c)
    return nin_out(out)


class AttnBlockpp(nn.Module):
    """NCSN++/DDPM++ self-attention block.

    ``GroupNorm -> q, k, v = NIN(h) -> softmax(q k^T / sqrt(C)) v -> NIN`` added to the input;
    with ``skip_rescale`` the sum is divided by sqrt(2). Parameters: ``GroupNorm_0`` and
    ``NIN_0..3`` (q, k, v, output).
    """

    skip_rescale: bool = False
    init_scale: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = group_norm(x)
        nins = (NIN(c), NIN(c), NIN(c), NIN(c, init_scale=self.init_scale))
        h = _self_attention(h, nins)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class AttnBlock(nn.Module):
    """Self-attention block of the original DDPM network (no skip rescaling)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = group_norm(x)
        nins = (NIN(c), NIN(c), NIN(c), NIN(c, init_scale=0.0))
        return x + _self_attention(h, nins)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (log-)noise level, for VE models.

    ``emb(s) = [sin(2 pi s W), cos(2 pi s W)]`` with fixed ``W ~ N(0, scale^2)`` of size
    ``embedding_size`` (the parameter ``W`` is not trained: gradients are stopped). Output size
    is ``2 * embedding_size``. NCSN++ feeds it ``log(sigma)``.
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,),
                       jnp.float32)  # fmt: skip
        w = jax.lax.stop_gradient(w)
        proj = s[:, None] * w[None, :] * (2.0 * jnp.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def timestep_embedding(
    timesteps: jax.Array, embedding_dim: int, max_positions: int = 10000
) -> jax.Array:
    """Transformer-style sinusoidal embedding of (possibly fractional) time steps.

    ``emb_i = sin(t * f_i)`` for the first half and ``cos(t * f_i)`` for the second, with
    ``f_i = max_positions^(-i / (half - 1))``, ``i = 0..half-1``. Shape ``(B, embedding_dim)``
    (zero-padded by one column when ``embedding_dim`` is odd).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape (batch,), got {timesteps.shape}")
    half = embedding_dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Combine(nn.Module):
    """Merge a progressive-input pyramid image ``x`` into features ``y``.

    ``x`` is projected to ``y``'s channel count by a 1x1 conv (``Conv_0``) and then either
    concatenated (``method='cat'``) or added (``method='sum'``).
    """

    method: str = "cat"

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        h = conv1x1(x, y.shape[-1])
        if self.method == "cat":
            return jnp.concatenate([h, y], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"progressive_combine must be 'cat' or 'sum', got {self.method!r}")
