"""Convert a published EDM network pickle into deis_jax's parameter format (Orbax).

    python scripts/convert_edm_checkpoint.py \\
        --pickle checkpoints/edm/edm-cifar10-32x32-uncond-vp.pkl --edm-source ~/src/edm \\
        --out checkpoints/converted/edm-cifar10-32x32-uncond-vp

Reading a pickle needs PyTorch (the CPU build is enough) and EDM's source code
(``git clone https://github.com/NVlabs/edm``; its ``torch_utils`` and ``dnnlib`` packages, and
``requests``, which ``dnnlib`` imports): EDM pickles carry their classes' source and execute
it on load, so convert only trusted files. The preconditioner is the pickle's ``'ema'`` entry;
its class name, ``init_kwargs``, attributes and state dict are converted with
:func:`deis_jax.models.edm.convert.convert_state_dict`, which checks every parameter name
and shape against the Flax port before anything is written.

Without torch, a state dict exported as ``.npz`` (torch names and layout, buffers included)
with a JSON holding ``precond_class``, ``constructor_kwargs`` and ``precond_attrs`` (the format
of ``tests/fixtures/edm/*_small.{params.npz,json}``) converts the same way::

    python scripts/convert_edm_checkpoint.py --state-dict net.params.npz --kwargs net.json \\
        --out checkpoints/converted/net

Load the result with ``net, params = deis_jax.models.edm.convert.load_edm_checkpoint(out)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import sys
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from deis_jax.models.edm.convert import convert_state_dict  # noqa: E402
from deis_jax.models.edm.precond import PRECOND_ATTR_NAMES, PRECOND_CLASSES  # noqa: E402

EDM_URL = "https://github.com/NVlabs/edm"
NO_TORCH = (
    "reading an EDM pickle needs PyTorch: install it (pip install torch; the CPU build is "
    f"enough) together with EDM's source code (git clone {EDM_URL}; pass its path with "
    "--edm-source). Without torch, convert a state dict exported as .npz with --state-dict "
    "and --kwargs."
)


def require_torch_and_edm(edm_source: str | None):
    """Import torch and make EDM's ``torch_utils`` / ``dnnlib`` importable; returns torch.

    Raises:
      ImportError: torch or EDM's source is missing (the message says what to install and
        which path to pass).
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(NO_TORCH) from e
    if edm_source is not None:
        if not os.path.isdir(os.path.join(edm_source, "torch_utils")):
            raise ImportError(
                f"--edm-source '{edm_source}' is not a clone of {EDM_URL} (no torch_utils/ "
                "folder in it)"
            )
        sys.path.insert(0, os.path.abspath(edm_source))
    missing = [m for m in ("torch_utils", "dnnlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"reading an EDM pickle needs EDM's source code ({', '.join(missing)} not "
            f"importable): git clone {EDM_URL} and pass its path with --edm-source PATH"
        )
    return torch


def read_edm_pickle(path: str, edm_source: str | None = None):
    """``(precond_class, kwargs, attrs, state_dict)`` of the ``'ema'`` network of an EDM
    pickle (state dict as float32 numpy, torch layout)."""
    require_torch_and_edm(edm_source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"EDM pickle not found: '{path}' (download it from {EDM_URL})")
    with open(path, "rb") as f:
        data = pickle.load(f)
    if not isinstance(data, dict) or "ema" not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"'{path}' holds no 'ema' network (found {keys}); is it an EDM pickle?")
    net = data["ema"]
    attrs = {name: _plain(getattr(net, name)) for name in PRECOND_ATTR_NAMES if hasattr(net, name)}
    state_dict = {k: v.detach().float().cpu().numpy() for k, v in net.state_dict().items()}
    return type(net).__name__, dict(net.init_kwargs), attrs, state_dict


def _plain(value: Any) -> Any:
    """A pickled attribute as a plain Python value (0-d tensors and numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def read_npz_state_dict(npz_path: str, json_path: str):
    """``(precond_class, kwargs, attrs, state_dict)`` from an ``.npz`` state dict and a JSON
    with ``precond_class``, ``constructor_kwargs`` and (optionally) ``precond_attrs``."""
    for p in (npz_path, json_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"file not found: '{p}'")
    with open(json_path) as f:
        meta = json.load(f)
    missing = [k for k in ("precond_class", "constructor_kwargs") if k not in meta]
    if missing:
        raise ValueError(
            f"'{json_path}' lacks {missing} (needs precond_class, one of "
            f"{list(PRECOND_CLASSES)}, and constructor_kwargs)"
        )
    with np.load(npz_path) as data:
        state_dict = {k: data[k] for k in data.files}
    return (
        meta["precond_class"],
        meta["constructor_kwargs"],
        meta.get("precond_attrs", {}),
        state_dict,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--pickle", help="an EDM network pickle (needs torch and --edm-source)")
    src.add_argument("--state-dict", help="an .npz state dict (torch names/layout)")
    parser.add_argument(
        "--kwargs", help="JSON with precond_class/constructor_kwargs (with --state-dict)"
    )
    parser.add_argument("--edm-source", help=f"path to a clone of {EDM_URL} (with --pickle)")
    parser.add_argument("--out", required=True, help="the converted checkpoint directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if args.pickle:
        source = args.pickle
        precond_class, kwargs, attrs, state_dict = read_edm_pickle(args.pickle, args.edm_source)
    else:
        if not args.kwargs:
            parser.error("--state-dict needs --kwargs (the JSON with the constructor kwargs)")
        source = args.state_dict
        precond_class, kwargs, attrs, state_dict = read_npz_state_dict(args.state_dict, args.kwargs)
    meta = convert_state_dict(
        precond_class,
        kwargs,
        attrs,
        state_dict,
        args.out,
        source_file=source,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.out}: {meta['precond_class']}, {meta['num_params']} float32 parameters, "
        f"compute dtype {meta['compute_dtype']} (EDM's use_fp16; config.model.dtype)"
    )
    return meta


if __name__ == "__main__":
    try:
        main()
    except ImportError as e:
        sys.exit(f"error: {e}")
