"""Fitting samplers to a frozen model: teachers, searched and learned grids, learned tables.

``fit_sampler`` (:mod:`deis_jax.fitting.recipes`) is the common case: it tries the recipes that
win, keeps the best on a validation split and returns a ``FittedSampler`` (one file;
``sampler.fitted_file`` in configs). The rest is the expert layer:

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
from deis_jax.fitting.recipes import RECIPES, FittedSampler, fit_sampler
from deis_jax.fitting.teacher import Teacher, load_or_solve_teacher, solve_teacher

__all__ = [
    "AmedPredictorFile",
    "FittedSampler",
    "OptimizedGrid",
    "RECIPES",
    "Teacher",
    "amed_teacher",
    "fit_amed",
    "fit_sampler",
    "load_or_solve_teacher",
    "optimize_grid",
    "solve_teacher",
]
