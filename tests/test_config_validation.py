"""Bad config values fail at start-up with the field name and the allowed values."""

import os
import subprocess
import sys

import pytest

from deis_jax.common.checks import ConfigError
from deis_jax.experiments.modes import get_mode
from deis_jax.experiments.validation import validate_sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import gmm_vpsde  # noqa: E402


def config_with(**overrides):
    config = gmm_vpsde.get_config()
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_default_config_is_valid():
    get_mode("compare").validate(gmm_vpsde.get_config())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sampler__method": "euler"}, r"config\.sampler\.method must be one of \('ddim', 'tab'"),
        ({"sampler__order": 7}, r"config\.sampler\.order must be one of \(0, 1, 2, 3\)"),
        ({"sampler__nfe": 0}, r"config\.sampler\.nfe must be an integer >= 1"),
        ({"sampler__options": {"tableau": "rk4"}}, r"config\.sampler\.options has unknown key"),
        ({"sampler__t0": 0.0}, r"config\.sampler\.t0 must be > 0"),
        ({"sampler__t0": -1e-3}, r"config\.sampler\.t0 must be > 0"),
        ({"sampler__t0": 0.5, "sampler__t1": 0.5}, r"config\.sampler\.t0 must be < t1"),
        ({"sampler__t1": 2.0}, r"config\.sampler\.t1 must be <= 1\.0"),
        ({"sampler__grid": "cubic"}, r"config\.sampler\.grid must be one of \('time'"),
        ({"sampler__grid_power": 3.0}, r"config\.sampler\.grid_power applies to .* 'quadratic'"),
        (
            {"sampler__grid": "time", "sampler__grid_power": -1.0},
            r"config\.sampler\.grid_power must be > 0",
        ),
        (
            {
                "sampler__method": "ersde",
                "sampler__order": 3,
                "sampler__final_denoise": True,
                "sampler__options": {"denoise_to_zero": True},
            },
            r"config\.sampler\.options\.denoise_to_zero and final_denoise both add",
        ),  # fmt: skip
        ({"sde__name": "karras"}, r"config\.sde\.name must be one of \('vpsde'.*'edm'\)"),
        ({"sde__schedule": "cosine"}, r"config\.sampler\.t1 must be <= 0\.9979.*VPSDE\(cosine\)"),
        (
            {"sde__name": "edm", "sampler__t0": None, "sampler__t1": 100.0},
            r"config\.sampler\.t1 must be <= 80\.0 .*EDMSchedule.s valid interval is \[0\.002, 80",
        ),
        (
            {
                "sde__name": "edm",
                "sampler__t0": None,
                "sampler__t1": None,
                "sde__sigma_min": 90.0,
                "sde__sigma_max": 80.0,
            },
            r"config\.sde\.sigma_min must be < config\.sde\.sigma_max",
        ),
        ({"sde__name": "edm", "sde__sigma_max": -1.0}, r"config\.sde\.sigma_max must be > 0"),
        ({"sampler__nfe": 1_000_000}, r"config\.sampler\.nfe must be <= 10000, got 1000000"),
        ({"sampler__order": True}, r"config\.sampler\.order must be one of .* got True \(a bool\)"),
        ({"sde__schedule": "quad"}, r"config\.sde\.schedule must be one of \('linear', 'cosine'"),
        ({"sde__beta_max": -3.0}, r"config\.sde\.beta_max must be > 0"),
        ({"compare__methods": ("tab3", "heun")}, r"config\.compare\.methods: method must be one"),
        ({"compare__methods": ("tab9",)}, r"config\.compare\.methods: order .* \(0, 1, 2, 3\)"),
        ({"compare__nfes": (5, 0)}, r"config\.compare\.nfes entries must be >= 1"),
        ({"data__dims": ()}, r"config\.data\.dims must be a non-empty list"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_mode("compare").validate(config_with(**overrides))


def test_unknown_mode():
    with pytest.raises(ConfigError, match=r"mode .* must be one of \(.*'compare'"):
        get_mode("evaluate")


def test_main_rejects_a_bad_value_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/gmm_vpsde.py", f"--workdir={tmp_path}",
         "--config.sampler.order=5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "config.sampler.order must be one of (0, 1, 2, 3)" in result.stderr
    assert not os.listdir(tmp_path)  # nothing was written


def test_method_options_from_the_command_line(tmp_path):
    """``--config.sampler.options.<key>=<value>`` adds a method option the config does not
    list (ml_collections' flags cannot); it is then validated like any option."""
    import ml_collections

    sys.path.insert(0, ROOT)
    import main

    argv = ["main.py", "--config=configs/gmm_vpsde.py", "--config.sampler.options.afs=true",
            "--config.sampler.options.lam=0.5", "--config.sampler.nfe=5"]  # fmt: skip
    rest, options = main.split_option_flags(argv)
    assert rest == ["main.py", "--config=configs/gmm_vpsde.py", "--config.sampler.nfe=5"]
    config = gmm_vpsde.get_config()
    ml_collections.config_dict.ConfigDict.lock(config)
    main.apply_option_flags(config, options[:1])
    assert config.sampler.options.afs is True
    assert validate_sampler(config).plan.afs
    main.apply_option_flags(config, options[1:])  # lam is not a tab option
    with pytest.raises(ConfigError, match=r"options has unknown key\(s\) \['lam'\]"):
        validate_sampler(config)
    with pytest.raises(ConfigError, match="config has no field 'solver.options'"):
        main.apply_option_flags(config, [("solver.options", "afs", "true")])
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/gmm_vpsde.py", f"--workdir={tmp_path}",
         "--config.sampler.options.afs=maybe"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "config.sampler.options.afs must be True or False, got 'maybe'" in result.stderr
    assert not os.listdir(tmp_path)


def test_edm_schedule_config_uses_its_sigma_fields():
    """``config.sde.name='edm'``: sigma_min/sigma_max are its interval (and the defaults of
    ``t0``/``t1``). Needs ``deis_jax.experiments.build.SDE_FIELDS['edm'] = ('sigma_min',
    'sigma_max')``."""
    config = config_with(sde__name="edm", sampler__t0=None, sampler__t1=None)
    with config.sde.unlocked():
        config.sde.sigma_min, config.sde.sigma_max = 0.02, 60.0
    sampler = validate_sampler(config)
    assert (sampler.ts[0], sampler.ts[-1]) == (60.0, 0.02)


def test_cosine_schedule_runs_with_its_default_end():
    cosine = config_with(sde__schedule="cosine", sampler__t1=None)
    assert validate_sampler(cosine).ts[0] == 0.9946


@pytest.mark.parametrize(
    "field, value, message",
    [("order", 2.5, r"config\.sampler\.order must be one of \(0, 1, 2, 3\) .* 2\.5 \(a float\)"),
     ("nfe", 10.5, r"config\.sampler\.nfe must be an integer >= 1, got 10\.5"),
     ("final_denoise", "no", r"config\.sampler\.final_denoise must be True or False, got 'no'")],
)  # fmt: skip
def test_ill_typed_sampler_fields_of_a_config_file(field, value, message):
    # A config file may hold any type (the command line is type-checked by ml_collections).
    import ml_collections

    config = gmm_vpsde.get_config()
    config.sampler = ml_collections.ConfigDict({**config.sampler.to_dict(), field: value})
    with pytest.raises(ConfigError, match=message):
        validate_sampler(config)
