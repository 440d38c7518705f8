"""Convert a published score_sde checkpoint into deis_jax's parameter format (Orbax).

    python scripts/convert_score_sde_checkpoint.py \\
        --checkpoint checkpoints/vp/cifar10_ddpmpp_deep_continuous/checkpoint_8 \\
        --model_config vp_cifar10_ddpmpp_deep_continuous \\
        --out checkpoints/converted/vp_cifar10_ddpmpp_deep_continuous_8

``--model_config`` is one of the known names (``deis_jax.models.score_sde.KNOWN_MODEL_CONFIGS``)
or a JSON file holding a model config (either flat, or with ``model_config`` and ``data_config``
blocks as in ``tests/fixtures/score_sde/*.json``). The file is read as score_sde published it
(flax 0.3.1); its GroupNorm parameters, stored as ``(1, 1, 1, C)`` by that flax, are reshaped
to today's ``(C,)`` and counted in the metadata's ``converted_leaves``. The parameters
(``params_ema`` unless ``--use_target``) are checked against the model's parameter tree
before anything is written; load the result with
``deis_jax.models.score_sde.published.load_converted_params(out, model_config)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

from deis_jax.common.files import sha256_file  # noqa: E402
from deis_jax.models import checkpoints  # noqa: E402
from deis_jax.models.score_sde import (  # noqa: E402
    KNOWN_MODEL_CONFIGS,
    get_model_config,
    published,
)


def load_model_config(spec: str) -> tuple[str, ml_collections.ConfigDict]:
    """``(name, config)`` for a known config name or a JSON config file."""
    if spec in KNOWN_MODEL_CONFIGS:
        return spec, get_model_config(spec)
    if spec.endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"model config file not found: '{spec}'")
        with open(spec) as f:
            values = json.load(f)
        if "model_config" in values:
            data = values.get("data_config", {})
            merged = dict(values["model_config"])
            merged.update(
                {k: data[k] for k in ("image_size", "num_channels", "centered") if k in data}
            )
            values = merged
        name = os.path.splitext(os.path.basename(spec))[0]
        return name, ml_collections.ConfigDict(values)
    raise ValueError(
        f"--model_config must be one of {', '.join(KNOWN_MODEL_CONFIGS)} or a JSON file, "
        f"got {spec!r}"
    )


def convert(
    checkpoint: str,
    model_config: str,
    out: str,
    use_ema: bool = True,
    overwrite: bool = False,
) -> dict:
    """Convert ``checkpoint`` and write it to ``out``; returns the stored metadata.

    Besides the model config and the source file (path, sha256), the metadata holds what
    :func:`deis_jax.models.score_sde.published.import_score_sde_params` reports: ``source_params``,
    ``source_step``, ``source_ema_rate`` and ``converted_leaves`` (e.g.
    ``{"old_groupnorm_layout": 326}`` for the deep VP model as published, whose GroupNorm
    parameters flax 0.3 stored as ``(1, 1, 1, C)``; ``{}`` when nothing needed converting).
    """
    name, config = load_model_config(model_config)
    params, provenance = published.import_score_sde_params(checkpoint, config, use_ema=use_ema)
    metadata = {
        "model_config_name": name,
        "model_config": config.to_dict(),
        "source": "score_sde",
        "source_checkpoint": os.path.abspath(checkpoint),
        "source_sha256": sha256_file(checkpoint),
        **provenance,
    }
    checkpoints.save_params(out, params, metadata=metadata, overwrite=overwrite)
    return checkpoints.load_params_metadata(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Convert a score_sde checkpoint_<N> file into deis_jax's Orbax format."
    )
    parser.add_argument("--checkpoint", required=True, help="score_sde checkpoint_<N> file")
    parser.add_argument(
        "--model_config",
        required=True,
        help=f"one of {', '.join(KNOWN_MODEL_CONFIGS)}, or a JSON model config file",
    )
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    parser.add_argument(
        "--use_target",
        action="store_true",
        help="take optimizer.target instead of params_ema (score_sde samples with params_ema)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = convert(
        args.checkpoint,
        args.model_config,
        args.out,
        use_ema=not args.use_target,
        overwrite=args.overwrite,
    )
    converted = "".join(
        f"; converted {count} leaves ({kind})" for kind, count in meta["converted_leaves"].items()
    )
    print(
        f"wrote {meta['num_params']:,} parameters ({meta['source_params']}) of "
        f"{meta['model_config_name']} to {os.path.abspath(args.out)}{converted}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:  # a missing file or a config/tree mismatch
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
