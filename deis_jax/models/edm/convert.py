"""Converted EDM checkpoints: write one from an EDM state dict, load the network and params.

A converted checkpoint is the project's parameter format
(:func:`deis_jax.models.checkpoints.save_params`: an Orbax directory plus
``deis_jax_metadata.json``) holding the Flax params of an EDM port, with metadata

* ``source``: ``'edm'``; ``precond_class`` and ``constructor_kwargs`` (EDM's class name and
  ``net.init_kwargs``: enough to rebuild the network with
  :func:`~deis_jax.models.edm.precond.edm_network_from_kwargs`);
* ``precond_attrs``: the preconditioner's attributes (``sigma_min``, ``sigma_max``, ...),
  checked against those the pickle carried;
* ``source_file`` and ``source_sha256``: the converted file.

Use::

    convert_state_dict("VPPrecond", kwargs, attrs, state_dict, "checkpoints/converted/x")
    net, params = load_edm_checkpoint("checkpoints/converted/x")
    d = net.apply({"params": params}, x_nhwc, sigma, class_labels=None)

Reading a pickle into ``(kwargs, attrs, state_dict)`` needs torch and EDM's source; that part
lives in ``scripts/convert_edm_checkpoint.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from deis_jax.common.files import sha256_file
from deis_jax.models import checkpoints
from deis_jax.models.edm.params import params_from_state_dict
from deis_jax.models.edm.precond import (
    abstract_params,
    edm_network_from_kwargs,
    precond_attrs,
)

__all__ = [
    "SOURCE",
    "check_precond_attrs",
    "convert_state_dict",
    "load_edm_checkpoint",
    "load_params_of",
]

SOURCE = "edm"


def _as_number(value: Any) -> Any:
    """JSON's ``'inf'`` strings (EDMPrecond's ``sigma_max``) as floats; other values as is."""
    if isinstance(value, str) and value.lower() in ("inf", "infinity", "-inf", "-infinity"):
        return float(value)
    return value


def check_precond_attrs(net, attrs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if an attribute the checkpoint carried (``attrs``) differs from the
    value ``net`` computes from its constructor kwargs (relative tolerance 1e-6); attributes
    absent from ``attrs`` are not checked."""
    for name, ours in precond_attrs(net).items():
        if name not in attrs:
            continue
        theirs = _as_number(attrs[name])
        if isinstance(ours, bool) or isinstance(theirs, bool):
            same = bool(ours) == bool(theirs)
        else:
            same = math.isclose(float(ours), float(theirs), rel_tol=1e-6)
        if not same:
            raise ValueError(
                f"precond attribute {name}: the checkpoint has {attrs[name]!r}, the constructor "
                f"kwargs give {ours!r}"
            )


def convert_state_dict(
    precond_class: str,
    kwargs: Mapping[str, Any],
    attrs: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    out_dir: str | os.PathLike,
    source_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert an EDM state dict and write it as a converted checkpoint at ``out_dir``.

    Args:
      precond_class, kwargs: EDM's class name and constructor kwargs.
      attrs: the attributes the pickled preconditioner carried (checked; may be empty).
      state_dict: ``model.*`` name -> numpy array, torch layout, parameters and buffers.
      out_dir: the checkpoint directory to write.
      source_file: the converted file, recorded with its sha256.
      overwrite: replace an existing ``out_dir``.

    Returns:
      The stored metadata.

    Raises:
      ValueError: bad kwargs, attributes that disagree, or a state dict that does not match
        the network (naming the names and shapes).
    """
    net = edm_network_from_kwargs(precond_class, kwargs)
    check_precond_attrs(net, attrs)
    what = f"the state dict of '{source_file}'" if source_file else "the EDM state dict"
    params = params_from_state_dict(net, state_dict, what=what)
    metadata = {
        "source": SOURCE,
        "precond_class": precond_class,
        "constructor_kwargs": dict(kwargs),
        "precond_attrs": precond_attrs(net),
        # the parameters are stored in float32 whatever EDM's use_fp16; this is the compute
        # dtype EDM samples the network in (config.model.dtype's default for it)
        "compute_dtype": "float16" if kwargs.get("use_fp16") else "float32",
    }
    if source_file is not None:
        metadata["source_file"] = os.path.abspath(os.fspath(source_file))
        metadata["source_sha256"] = sha256_file(source_file)
    checkpoints.save_params(out_dir, params, metadata=metadata, overwrite=overwrite)
    return checkpoints.load_params_metadata(out_dir)


def load_edm_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray]]:
    """``(net, params)`` of a converted EDM checkpoint; the tree is checked against ``net``.

    Raises:
      FileNotFoundError: no checkpoint at ``path``.
      ValueError: ``path`` is not a converted EDM checkpoint, or its tree does not match.
    """
    meta = checkpoints.load_params_metadata(path)
    if meta.get("source") != SOURCE or "precond_class" not in meta:
        raise ValueError(
            f"'{path}' is not a converted EDM checkpoint (metadata source "
            f"{meta.get('source')!r}); convert one with scripts/convert_edm_checkpoint.py"
        )
    net = edm_network_from_kwargs(meta["precond_class"], meta["constructor_kwargs"])
    return net, load_params_of(net, path)


def load_params_of(net, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The parameters of the converted checkpoint ``path``, checked against ``net``'s tree
    (``ValueError`` naming the first leaf that differs)."""
    params = checkpoints.load_params(path)
    checkpoints.check_params_tree(params, abstract_params(net), f"'{path}'")
    return params
