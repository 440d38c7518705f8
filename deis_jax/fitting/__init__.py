"""Fitting samplers to a frozen model: teachers, searched and learned grids, learned tables.

``optimize_grid`` (:mod:`deis_jax.fitting.optimize`) is the entry point; its result, an
``OptimizedGrid`` (:mod:`deis_jax.fitting.grid_file`), is one JSON file usable from configs
(``sampler.grid='optimized'``, ``sampler.grid_file``). The teacher (:mod:`.teacher`) is shared
by the objectives: GITS (:mod:`.gits`) and LD3 with optional learned tables (:mod:`.ld3`),
and by AMED's predictors trained by distillation (:mod:`.amed`: ``fit_amed`` and the
``AmedPredictorFile``, ``sampler.predictor_file`` in configs). Every learned sampler trains
with the one loop of :mod:`.adam_loop`.
"""

from deis_jax.fitting.amed import AmedPredictorFile, amed_teacher, fit_amed
from deis_jax.fitting.grid_file import OptimizedGrid
from deis_jax.fitting.optimize import optimize_grid
from deis_jax.fitting.teacher import Teacher, load_or_solve_teacher, solve_teacher

__all__ = [
    "AmedPredictorFile",
    "OptimizedGrid",
    "Teacher",
    "amed_teacher",
    "fit_amed",
    "load_or_solve_teacher",
    "optimize_grid",
    "solve_teacher",
]
