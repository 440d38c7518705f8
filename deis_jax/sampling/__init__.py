"""The sampling core: noise schedules, time grids, float64 coefficients, step tables (one per
method, ``solvers/``), the one generic ``lax.scan`` (``sampler.py``) and the one model
interface (``wrappers.py``). Nothing here knows about networks, training or experiments."""
