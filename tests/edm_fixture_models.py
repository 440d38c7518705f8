"""The EDM fixture models (tests/fixtures/edm, made with EDM's own code) and one compiled
program per model, shared by test_edm_networks.py and test_edm_convert.py.

XLA compile time is what these tests spend their time on, so each small model is compiled
once (with the cheaper CPU code generation) into one program: a preconditioner call on a
stacked batch that holds every fixture output with explicit inputs (``D``, ``D_augment``,
``D_no_labels`` as all-zero label rows, ``D_scalar_sigma`` as sigma 2.5 per row) and captures
the U-Net's output ``F``; for the model with class and augment labels (cifar10_cond_vp) also a
call with EDM's defaults (a 0-d sigma, ``None`` labels and augment labels) through
``apply_with_features``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
from tolerances import f32_net_rtol

from deis_jax.models.edm.params import params_from_state_dict
from deis_jax.models.edm.precond import edm_network_from_kwargs
from deis_jax.models.edm.unets import DhariwalUNet, SongUNet
from deis_jax.models.features import apply_with_features

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "edm"
SMALL_MODELS = ("cifar10_uncond_vp", "cifar10_uncond_ve", "cifar10_cond_vp", "imagenet64_cond_adm")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def nhwc(a: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC."""
    return np.transpose(a, (0, 2, 3, 1))


def max_rel(got: Any, want: np.ndarray) -> float:
    """max |got - want| / max |want|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@dataclasses.dataclass(frozen=True)
class SmallModel:
    name: str
    meta: dict
    state_dict: dict[str, np.ndarray]
    io: dict[str, np.ndarray]
    net: Any

    @property
    def rtol(self) -> float:
        """The max-abs-relative tolerance of this float32 U-Net's outputs against EDM's:
        ``f32_net_rtol`` of its depth, the blocks of the encoder and the decoder (16 to 20 for
        the fixtures, so about 3e-5)."""
        plan = self.net.model.plan
        return f32_net_rtol(len(plan.enc) + len(plan.dec))

    @staticmethod
    def files_of(name: str) -> tuple[pathlib.Path, pathlib.Path]:
        """A fixture's ``(params.npz, json)``: the converter's npz + JSON input."""
        return FIXTURES / f"{name}_small.params.npz", FIXTURES / f"{name}_small.json"


@functools.cache
def small_model(name: str) -> SmallModel:
    npz, meta_file = SmallModel.files_of(name)
    meta = json.loads(meta_file.read_text())
    with np.load(npz) as data:
        state_dict = {k: data[k] for k in data.files}
    with np.load(FIXTURES / f"{name}_small.io.npz") as data:
        io = {k: data[k] for k in data.files}
    net = edm_network_from_kwargs(meta["precond_class"], meta["constructor_kwargs"])
    return SmallModel(name, meta, state_dict, io, net)


@functools.cache
def small_params(name: str) -> dict:
    m = small_model(name)
    return params_from_state_dict(m.net, m.state_dict)


def stacked_inputs(m: SmallModel) -> tuple[tuple, dict[str, slice]]:
    """``(args, rows)``: the stacked batch ``(x, sigma, class_labels, augment_labels)`` and the
    rows of each block: the fixture outputs ``D``, ``D_augment``, ``D_no_labels`` and
    ``D_scalar_sigma`` with explicit inputs and, for a model with class and augment labels,
    ``defaults``: sigma 2.5 with all-zero labels and augment labels, what EDM's defaults must
    equal."""
    io, b = m.io, m.io["x"].shape[0]
    sigma, labels = io["sigma"], io.get("class_labels")
    scalar = np.full_like(sigma, io["sigma_scalar"])
    aug = np.zeros((b, 9), np.float32) if "augment_labels" in io else None
    blocks = {"D": (sigma, labels, aug)}
    if aug is not None:
        blocks["D_augment"] = (sigma, labels, io["augment_labels"])
    if labels is not None:
        blocks["D_no_labels"] = (sigma, np.zeros_like(labels), aug)
    blocks["D_scalar_sigma"] = (scalar, labels, aug)
    if labels is not None and aug is not None:  # a model with every default to check
        blocks["defaults"] = (scalar, np.zeros_like(labels), aug)
    rows = {key: slice(i * b, (i + 1) * b) for i, key in enumerate(blocks)}

    def cat(i):
        parts = [blk[i] for blk in blocks.values()]
        return None if parts[0] is None else np.concatenate(parts)

    return (np.concatenate([nhwc(io["x"])] * len(blocks)), cat(0), cat(1), cat(2)), rows


def _captured(last_encoder_block: str):
    """Capture the U-Net's output and the last encoder block's output (what is sown)."""

    def capture(module, method_name: str) -> bool:
        unet = isinstance(module, SongUNet | DhariwalUNet)
        return method_name == "__call__" and (unet or module.name == last_encoder_block)

    return capture


@functools.cache
def fixture_program(name: str):
    """``run(params) -> dict`` of NHWC arrays: the stacked blocks of :func:`stacked_inputs`;
    ``F``, the U-Net output inside the ``D`` rows' call (captured); ``bottleneck``, the sown
    bottleneck of the last block, and ``last_encoder_block``, that block's captured output;
    with a ``defaults`` block, ``D_defaults`` and ``features``:
    ``apply_with_features(net, params, x, sigma_0d)`` with labels and augment labels ``None``.
    """
    m = small_model(name)
    args, rows = stacked_inputs(m)
    last = list(rows.values())[-1]
    defaults = (nhwc(m.io["x"]), m.io["sigma_scalar"]) if "defaults" in rows else None
    last_encoder_block = m.net.model.plan.enc[-1].name

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def program(params, x_all, sigma, class_labels, augment_labels):
        d, state = m.net.apply(
            {"params": params},
            x_all,
            sigma,
            class_labels,
            augment_labels,
            capture_intermediates=_captured(last_encoder_block),
            mutable=["intermediates"],
        )
        sown = state["intermediates"]
        out = {"stacked": d, "F": sown["__call__"][0], "bottleneck": sown["bottleneck"][0]}
        out["last_encoder_block"] = sown["enc"][last_encoder_block]["__call__"][0]
        if defaults is not None:
            out["D_defaults"], out["features"] = apply_with_features(m.net, params, *defaults)
        return out

    def run(params):
        out = {key: np.asarray(v) for key, v in program(params, *args).items()}
        d = out.pop("stacked")
        out.update({key: d[r] for key, r in rows.items()})
        out["F"], out["bottleneck"] = out["F"][rows["D"]], out["bottleneck"][last]
        out["last_encoder_block"] = out["last_encoder_block"][last]
        return out

    return run
