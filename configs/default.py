"""Shared defaults of the image configs (score_sde's CIFAR-10 defaults, DEIS tAB-3 sampling).

Not a runnable experiment by itself; every ``configs/{vpsde,vesde}_*.py`` starts from
``get_default_config()`` and overrides what differs, as score_sde's configs do. Fields:

* ``sde``       -- the forward process (``deis_jax.experiments.build.schedule_from_config``).
* ``sampler``   -- DEIS tAB order 3, NFE 10, quadratic time grid, ``t0``/``t1`` = the
  schedule's defaults (1e-3 / 1 for VP, 1e-5 / 1 for VE) when None.
* ``model``     -- score_sde's ``config.model`` fields (``image_size``, ``num_channels`` and
  ``centered`` are taken from ``config.data``); ``model.prediction`` may override what the
  network outputs (default: ``'score'`` if ``scale_by_sigma`` else ``'eps'``);
  ``model.dtype`` is its compute dtype (float32 | bfloat16 | float16; parameters, output and
  sampler state stay float32: docs/mixed_precision.md).
* ``data``      -- ``name`` (cifar10 | celeb_a | downsampled_imagenet/32x32 |
  imagenet_resized/32x32 | digits), ``data_dir`` (tfds data dir; None = $TFDS_DATA_DIR or
  ~/tensorflow_datasets), ``image_size``, ``num_channels``, ``centered`` ([-1, 1] inputs),
  ``random_flip``, ``uniform_dequantization``.
* ``training``  -- score_sde: Adam 2e-4, 5000 warm-up steps, clip 1, EMA 0.9999, batch 128,
  t ~ U(1e-5, 1), no likelihood weighting; ``checkpoint_every`` = score_sde's pre-emption
  snapshot frequency.
* ``sampling``  -- ``--mode=sample``: how many images, the batch size, and an optional
  converted ``checkpoint`` (None = the EMA weights of <workdir>/checkpoints); for a
  class-conditional network (EDM's ImageNet-64) the classes to sample, ``labels`` (random |
  fixed | cycle), ``class_label`` (with fixed) and classifier-free ``guidance_scale``
  (1 = the conditional model).
"""

import ml_collections
from ml_collections import FieldReference

from deis_jax.models.score_sde import DATA_FIELDS_OF_MODEL, get_model_config
from deis_jax.models.score_sde.family import INFO_FIELDS


def model_block(known_name: str, **overrides) -> ml_collections.ConfigDict:
    """A published score_sde model block (``deis_jax.models.score_sde.KNOWN_MODEL_CONFIGS``) without
    the fields that live in ``config.data`` / ``config.training``, plus ``overrides``."""
    values = get_model_config(known_name).to_dict()
    for key in DATA_FIELDS_OF_MODEL + INFO_FIELDS:
        values.pop(key, None)
    values["dtype"] = "float32"  # compute dtype: float32 | bfloat16 | float16 (params stay float32)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def get_default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.mode = "train"
    config.seed = 42

    config.sde = sde = ml_collections.ConfigDict()
    sde.name = "vpsde"
    sde.schedule = "linear"
    sde.beta_min = 0.1
    sde.beta_max = 20.0
    sde.num_scales = 1000
    sde.sigma_min = 0.01
    sde.sigma_max = 50.0

    config.sampler = sampler = ml_collections.ConfigDict()
    sampler.method = "tab"
    sampler.order = 3
    sampler.nfe = 10
    sampler.grid = "quadratic"
    sampler.grid_power = FieldReference(None, field_type=float)
    sampler.t0 = FieldReference(None, field_type=float)
    sampler.t1 = FieldReference(None, field_type=float)
    sampler.final_denoise = False
    # A budget the method cannot spend exactly (rhork3 at NFE 10): "exact" refuses it at
    # start-up, naming the budgets it can; "up" runs the fewest steps spending at least it.
    sampler.nfe_rounding = "exact"
    sampler.options = ml_collections.ConfigDict()
    sampler.grid_file = FieldReference(None, field_type=str)  # with grid='optimized'
    sampler.predictor_file = FieldReference(None, field_type=str)  # AMED: trained predictor
    sampler.fitted_file = FieldReference(None, field_type=str)  # deis_jax.fit_sampler's file

    config.model = model_block("vp_cifar10_ddpmpp_continuous")

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"
    data.data_dir = FieldReference(None, field_type=str)
    data.image_size = 32
    data.num_channels = 3
    data.centered = False
    data.random_flip = True
    data.uniform_dequantization = False

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128
    training.n_iters = 1_300_001
    training.log_every = 50
    training.checkpoint_every = 10_000
    training.lr = 2e-4
    training.warmup = 5000
    training.grad_clip = 1.0
    training.ema_rate = 0.9999
    training.ema_warmup = False  # True: decay min(ema_rate, (1 + k) / (10 + k)), short runs
    training.likelihood_weighting = False
    training.reduce_mean = False
    training.eps = 1e-5

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    sampling.batch_size = 64  # per call, over all devices (split evenly per device)
    sampling.shard_size = 1000  # samples per atomically written shard (resumable generation)
    sampling.checkpoint = FieldReference(None, field_type=str)
    sampling.labels = "random"  # class-conditional models only (deis_jax.sampling.class_labels)
    sampling.class_label = 0
    sampling.guidance_scale = 1.0
    return config
