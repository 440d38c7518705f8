"""EDM PyTorch state dicts <-> the Flax parameter trees of the EDM ports.

Naming: the Flax path of a leaf is its PyTorch ``state_dict`` name split on ``'.'``, without
the ``model.`` prefix of a preconditioner's state dict (``model.enc.16x16_block0.conv0.weight``
<-> ``params['enc']['16x16_block0']['conv0']['weight']``). Layouts: conv ``weight`` OIHW ->
HWIO (``w.transpose(2, 3, 1, 0)``), linear ``weight`` ``(out, in)`` -> ``(in, out)``; biases,
GroupNorm leaves and NCSN++'s ``map_noise.freqs`` (a buffer in EDM that is random at
construction, a parameter leaf here) are copied. The ``resample_filter`` buffers are derived
from the filter taps, so they are checked against ``outer(f, f) / sum(f)^2`` and dropped.

* :func:`state_dict_to_params` -- the conversion, checking every name, shape and filter
  against what the module expects (any module: a layer, a U-Net, a preconditioner).
* :func:`params_from_state_dict` -- the same for a whole preconditioner (``model.`` names).
* :func:`torch_state_shapes` / :func:`check_published_tree` -- a network's state dict shapes
  in PyTorch naming and layout, and the exact comparison with a published tree
  (``tree_*.json``: parameter and buffer names and shapes, parameter count), without
  allocating any parameter (``jax.eval_shape``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deis_jax.models.edm.layers import resample_filter_2d
from deis_jax.models.edm.precond import abstract_params
from deis_jax.models.edm.topology import resample_buffer_names

__all__ = [
    "check_published_tree",
    "flatten_params",
    "net_resample_filters",
    "params_from_state_dict",
    "state_dict_to_params",
    "to_flax_layout",
    "torch_state_shapes",
    "unflatten_params",
]

PREFIX = "model."
BUFFER_LEAVES = ("freqs",)  # parameter leaves here that are buffers in EDM


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{'a.b.c': leaf}`` (PyTorch-style dotted names)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = value
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{'a.b.c': leaf}`` -> nested dict."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _torch_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The PyTorch shape of the Flax leaf ``name`` with Flax ``shape``."""
    shape = tuple(int(s) for s in shape)
    if name.rsplit(".", 1)[-1] == "weight":
        if len(shape) == 4:  # HWIO -> OIHW
            return (shape[3], shape[2], shape[0], shape[1])
        if len(shape) == 2:  # (in, out) -> (out, in)
            return (shape[1], shape[0])
    return shape


def to_flax_layout(name: str, value: Any) -> np.ndarray:
    """A PyTorch tensor (numpy) in the Flax layout of leaf ``name``, float32."""
    value = np.asarray(value, np.float32)
    if name.rsplit(".", 1)[-1] == "weight":
        if value.ndim == 4:
            return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)
    return value


def _listing(items: list[str], label: str) -> str:
    shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    return f"{len(items)} {label} ({shown})"


def state_dict_to_params(
    state_dict: Mapping[str, Any],
    expected_params: Mapping[str, Any],
    resample_filters: Mapping[str, Sequence[float]],
    prefix: str = "",
    what: str = "EDM state dict",
) -> dict[str, Any]:
    """Convert a PyTorch state dict (numpy arrays, torch layout) to a Flax ``params`` tree.

    Args:
      state_dict: name -> array; every name starts with ``prefix``.
      expected_params: the module's parameter tree (arrays or ``ShapeDtypeStruct``), e.g.
        from ``jax.eval_shape`` of its init.
      resample_filters: the ``resample_filter`` buffers the state dict must hold (names
        without ``prefix``) -> the 1-D taps they are built from.
      prefix: stripped from every name (``'model.'`` for a preconditioner's state dict).
      what: how the source is called in error messages.

    Returns:
      The nested params tree (float32 numpy, Flax layout).

    Raises:
      ValueError: listing the missing, unexpected and mis-shaped names (with both shapes)
        and the filter buffers that differ from the formula.
    """
    expected = {
        name: _torch_shape(name, leaf.shape)
        for name, leaf in flatten_params(expected_params).items()
    }
    flat, unexpected, wrong_shape, wrong_filter = {}, [], [], []
    for full_name, value in state_dict.items():
        shape = tuple(np.shape(value))
        name = full_name[len(prefix) :] if full_name.startswith(prefix) else None
        if name in resample_filters:
            want = resample_filter_2d(resample_filters[name])[None, None]
            if shape != want.shape:
                wrong_shape.append(f"{full_name}: {shape} vs the expected {want.shape}")
            elif not np.allclose(np.asarray(value, np.float32), want, rtol=0, atol=1e-7):
                taps = list(resample_filters[name])
                wrong_filter.append(f"{full_name} != outer(f, f) / sum(f)^2 for f = {taps}")
        elif name in expected:
            if shape != expected[name]:
                wrong_shape.append(f"{full_name}: {shape} vs the expected {expected[name]}")
            else:
                flat[name] = to_flax_layout(name, value)
        else:
            unexpected.append(f"{full_name} {shape}")
    present = {n[len(prefix) :] for n in state_dict if n.startswith(prefix)}
    missing = [f"{prefix}{n} {expected[n]}" for n in expected if n not in present]
    missing += [f"{prefix}{n}" for n in resample_filters if n not in present]
    problems = [
        _listing(items, label)
        for items, label in (
            (missing, "missing"),
            (unexpected, "unexpected"),
            (wrong_shape, "with the wrong shape"),
            (wrong_filter, "resample filters off the formula"),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"{what} does not match the network: {'; '.join(problems)}. Are the constructor "
            "kwargs those of the checkpoint (a pickle's net.init_kwargs)?"
        )
    return unflatten_params(flat)


def net_resample_filters(net) -> dict[str, tuple[float, ...]]:
    """``resample_filter`` buffer name (relative to the U-Net) -> taps, for a preconditioner
    or U-Net ``net``."""
    unet = getattr(net, "model", net)
    taps = unet.style.resample_filter
    return {name: taps for name in resample_buffer_names(unet.plan)}


def params_from_state_dict(net, state_dict: Mapping[str, Any], what: str = "EDM state dict"):
    """The Flax params of the preconditioner ``net`` from its EDM state dict (``model.*``
    names, parameters and buffers, numpy arrays in torch layout)."""
    return state_dict_to_params(
        state_dict, abstract_params(net), net_resample_filters(net), prefix=PREFIX, what=what
    )


def torch_state_shapes(net) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``(params, buffers)``: name -> shape of ``net``'s EDM state dict (``model.*`` names,
    PyTorch layout), from ``jax.eval_shape`` (nothing is allocated)."""
    params, buffers = {}, {}
    for name, leaf in flatten_params(abstract_params(net)).items():
        target = buffers if name.rsplit(".", 1)[-1] in BUFFER_LEAVES else params
        target[PREFIX + name] = _torch_shape(name, leaf.shape)
    for name, taps in net_resample_filters(net).items():
        buffers[PREFIX + name] = (1, 1, len(taps), len(taps))
    return params, buffers


def check_published_tree(net, tree: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``net`` has exactly the published tree ``tree`` (a
    ``tree_*.json``: ``params`` and ``buffers`` name -> shape, ``num_params``)."""
    params, buffers = torch_state_shapes(net)
    problems = []
    for kind, got, want in (
        ("parameter", params, tree["params"]),
        ("buffer", buffers, tree["buffers"]),
    ):
        want = {name: tuple(shape) for name, shape in want.items()}
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        shapes = sorted(n for n in set(got) & set(want) if got[n] != want[n])
        for items, label in ((missing, "missing"), (extra, "unexpected")):
            if items:
                problems.append(_listing(items, f"{label} {kind}s"))
        if shapes:
            wrong = [f"{n}: {got[n]} vs the published {want[n]}" for n in shapes]
            problems.append(_listing(wrong, f"{kind}s with the wrong shape"))
    count = sum(int(np.prod(s)) for s in params.values())
    if count != tree["num_params"]:
        problems.append(f"{count} parameters vs the published {tree['num_params']}")
    if problems:
        raise ValueError(f"the network does not match the published tree: {'; '.join(problems)}")
