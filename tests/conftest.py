"""Test-session setup.

* float64 everywhere: x64 is process-global in JAX, and several test modules need it for
  precision; enabling it here makes the session independent of the order in which modules are
  imported. Tests that check float32 behaviour pass explicit dtypes.
* Most XLA optimisations off (``jax_disable_most_optimizations``): the suite is dominated by
  compile time, not run time, and it checks results, not speed (speed is the benchmark
  scripts' job). This cut the sequential suite from about 15.7 to 12.6 minutes on the 2-core
  CI machine with the same results (the README command also runs it on two processes, about
  9.7 minutes); the multi-device workers of ``test_parallel.py`` run in
  subprocesses with the default (optimised) compilation, so the bit-identity claims are
  checked on optimised code.
"""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_disable_most_optimizations", True)
