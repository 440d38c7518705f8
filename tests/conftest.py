"""Test-session setup: float64 everywhere (x64 is process-global in JAX, and several test
modules need it for precision; enabling it here makes the session independent of the order in
which modules are imported). Tests that check float32 behaviour pass explicit dtypes."""

import jax

jax.config.update("jax_enable_x64", True)
