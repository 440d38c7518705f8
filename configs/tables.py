"""Config fields of ``--mode=table`` (paper tables: every method x NFE with FID / FD-digits).

Every image config gains them with one line, ``add_table_fields(config)`` (data-dependent
defaults: the Inception FID on 50k samples for tfds datasets, as the papers; FD-digits on 500
samples for the embedded digits). This file can also be used as the config, naming the
experiment config after the colon (``--config=configs/tables.py:vpsde_digits``). Examples:

    python main.py --config=configs/vpsde_digits.py --workdir=runs/digits \
        --mode=table --config.table=deis_cifar10
    python main.py --config=configs/vpsde_cifar10.py --workdir=runs/cifar10 \
        --mode=table --config.table=deis_cifar10 \
        --config.sampling.checkpoint=checkpoints/converted/vp_cifar10_ddpmpp_deep_continuous_8 \
        --config.eval.inception_weights=checkpoints/inception/pt_inception-2015-12-05.npz

Fields (``config.table`` names the table: ``deis_cifar10`` | ``ipndm_ersde_dpmpp`` |
``amed_cifar10`` | ``amed_imagenet64`` | ``ersde_imagenet64`` | ``epd_cifar10`` |
``epd_imagenet64``; see
``deis_jax.experiments.table.cells``), ``config.eval``:

* ``metric``             ``fid`` (Inception, needs ``inception_weights``) | ``fd_digits``
                         (the bundled digits classifier; digits only)
* ``num_samples``        images per cell (50_000 for FID, as the papers)
* ``batch_size``, ``seed`` sampling batch (results do not depend on it) and the seed of x_T
                         and of stochastic samplers' noise (every cell shares the x_T)
* ``inception_score``    also report IS (from the extractor's logits), ``is_splits`` splits
* ``kid``                also report KID (keeps all features in memory), ``kid_subsets``,
                         ``kid_subset_size``
* ``rmse``               also report the discretisation error against a reference solve on
                         the first ``rmse_num_samples`` x_T (RK4 with
                         ``rmse_reference_steps`` steps, validated by step doubling)
* ``inception_weights``, ``inception_sha256`` the local converted weights file (never
                         downloaded; see docs/evaluation.md) and optionally its file sha256
* ``reference_stats``    a statistics ``.npz`` (pytorch-fid ``mu``/``sigma`` or score_sde
                         ``pool_3``); None = computed from ``config.data`` split
                         ``reference_split`` (at most ``reference_max_images``), cached in
                         the workdir
* ``methods``, ``nfes``  run a subset (row labels of the table, or their ASCII names in any
                         case, e.g. ``rho2heun`` for ``ρ2Heun`` / NFE budgets); None = all
* ``params``             ``checkpoint`` (``config.sampling.checkpoint`` or the workdir's EMA
                         parameters, as ``--mode=sample``) | ``random`` (untrained network:
                         smoke tests only)
* ``export``             also write ``<export>.md/.csv/.png`` (e.g. ``results/digits_deis_table``)
* ``amed_predictors``    the directory of the trained AMED predictors the AMED rows sample
                         with (``amed_cifar10``), named as ``--mode=fit`` writes them:
                         ``<dir>/<label>_nfe<n>_amed.json`` (``<dir>`` =
                         ``<fit workdir>/grids/<problem>``, e.g. ``runs/digits/grids/digits``;
                         train with ``configs/amed_digits.py``). Every file must match its row
                         (method, options, NFE, AFS, interval, grid), checked before any
                         sampling; its sha256 is in the cells' cache keys. None: the AMED rows
                         are not run (the table's notes say so). ``config.sampler.
                         predictor_file`` is not used by the table.
"""

from __future__ import annotations

import importlib

import ml_collections
from ml_collections import FieldReference


def add_table_fields(config: ml_collections.ConfigDict, table: str = "deis_cifar10"):
    """Add ``config.table`` and ``config.eval`` (in place; returns ``config``)."""
    digits = config.data.name == "digits"
    config.table = table
    config.eval = ev = ml_collections.ConfigDict()
    ev.metric = "fd_digits" if digits else "fid"
    ev.num_samples = 500 if digits else 50_000
    ev.batch_size = 500
    ev.seed = 0
    ev.inception_score = True
    ev.is_splits = 10
    ev.kid = False
    ev.kid_subsets = 100
    ev.kid_subset_size = 1000
    ev.rmse = digits
    ev.rmse_num_samples = 32
    ev.rmse_reference_steps = 100
    ev.inception_weights = FieldReference(None, field_type=str)
    ev.inception_sha256 = FieldReference(None, field_type=str)
    ev.reference_stats = FieldReference(None, field_type=str)
    ev.reference_split = "train"
    ev.reference_max_images = FieldReference(None, field_type=int)
    ev.methods = FieldReference(None, field_type=tuple)
    ev.nfes = FieldReference(None, field_type=tuple)
    ev.params = "checkpoint"
    ev.export = FieldReference(None, field_type=str)
    ev.amed_predictors = FieldReference(None, field_type=str)  # AMED rows: predictor directory
    return config


def get_config(name: str = "vpsde_digits") -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s config plus the table fields.

    Used as ``--config=configs/tables.py:<name>``; a name without a config file is a
    ``FileNotFoundError`` naming the file (``main.py`` reports it in one line).
    """
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("configs." + name, "configs." + name.split(".")[0]):
            raise
        raise FileNotFoundError(
            f"there is no experiment config configs/{name}.py "
            f"(pass the name of one, e.g. configs/tables.py:vpsde_digits)"
        ) from None
    config = module.get_config()
    if "eval" not in config:
        add_table_fields(config)
    config.mode = "table"
    return config
