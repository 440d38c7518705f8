"""Score networks and their published weights, as registered model families.

* ``score_sde/`` -- NCSN++, DDPM++ and DDPM, parameter-compatible with score_sde's checkpoints.
* ``edm/`` -- EDM's preconditioned U-Nets, converted from its pickles.
* :mod:`~deis_jax.models.registry` -- the :class:`ModelFamily` protocol both implement.
* :mod:`~deis_jax.models.loading` -- from an experiment config to a network and its
  parameters, through the family of ``config.model.name``.

Importing this package registers both families (score_sde's first: its names come first in
messages).
"""

from deis_jax.models.edm.family import EdmFamily
from deis_jax.models.registry import ModelFamily, family_of, model_names, register_family
from deis_jax.models.score_sde.family import ScoreSdeFamily

__all__ = ["ModelFamily", "family_of", "model_names", "register_family"]

register_family(ScoreSdeFamily())
register_family(EdmFamily())
