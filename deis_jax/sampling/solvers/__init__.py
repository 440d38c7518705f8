"""Sampling methods. Importing this package registers every built-in method."""

from deis_jax.sampling.solvers import (
    deis,  # noqa: F401  (registers ddim, tab, rhoab, ipndm, rhork)
    dpm_solver,  # noqa: F401  (registers dpmpp, unipc, dpm2)
    stochastic,  # noqa: F401  (registers sddim, ersde)
)
from deis_jax.sampling.solvers.registry import (
    MethodArgumentError,
    MethodSpec,
    get_method,
    method_names,
    register_method,
)
from deis_jax.sampling.solvers.table import StepTable

__all__ = [
    "MethodArgumentError",
    "MethodSpec",
    "StepTable",
    "get_method",
    "method_names",
    "register_method",
]

# Registered last: the registry's order is the order messages list the methods in.
from deis_jax.sampling.solvers import (  # noqa: E402
    amed,  # noqa: F401  (amed, amed_ddim, amed_dpm, amed_ipndm)
    probe,  # noqa: F401  (epd, epd_ipndm, adasde)
)
