"""Integrity-checked Orbax checkpoints of any state pytree (training states, and the EMA
parameters sampling reads from a training workdir).

Orbax restores a bit-flipped checkpoint without complaint, so a checkpoint is trusted only
after a check: :func:`save_checkpoint` records the sha256 of every file of a step folder and
the run's identity in ``<step>/deis_integrity.json``; :func:`restore_state` restores the newest
checkpoint whose files match, moving damaged newer ones aside with a warning, and refuses one
written by another run; :func:`restorable_metadata` judges the same without building anything.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from deis_jax.common import parallel
from deis_jax.common.checks import first_line
from deis_jax.common.files import atomic_write_text, move_aside, sha256_file
from deis_jax.common.identity import describe_differences

INTEGRITY_FILE = "deis_integrity.json"  # in each step folder: file digests, run identity


def _not_orbax_info(record) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logs() -> None:
    """Orbax logs each save/restore in detail at INFO; keep only its warnings and errors."""
    handler = logging.get_absl_handler()
    if _not_orbax_info not in handler.filters:
        handler.addFilter(_not_orbax_info)


def checkpoint_manager(directory: str, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    quiet_orbax_logs()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class CheckpointError(RuntimeError):
    """No checkpoint of a directory can be restored, or the one found belongs to another run."""


def step_folder(mngr: ocp.CheckpointManager, step: int) -> str:
    """The folder of checkpoint ``step``."""
    return os.path.join(str(mngr.directory), str(step))


def save_checkpoint(
    mngr: ocp.CheckpointManager, step: int, state: Any, identity: dict | None = None
) -> None:
    """Save ``state`` as checkpoint ``step``, wait until it is written, then record the sha256
    of every file of its folder and the run's ``identity`` (JSON-able) in
    ``<step>/deis_integrity.json`` (process 0). The wait makes saving synchronous: the
    digests are of the files as orbax finished them."""
    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    if jax.process_index() == 0:
        folder = step_folder(mngr, step)
        record = {"files": folder_digests(folder), "identity": identity}
        atomic_write_text(os.path.join(folder, INTEGRITY_FILE), json.dumps(record, indent=1))


def folder_digests(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` but the integrity record."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != INTEGRITY_FILE:
                digests[rel] = sha256_file(os.path.join(root, name))
    return dict(sorted(digests.items()))


def _integrity(folder: str) -> tuple[str | None, dict | None]:
    """``(problem, record)`` of a checkpoint folder: ``problem`` says why it is damaged (None:
    every file matches its recorded digest, or there is no record to check against)."""
    path = os.path.join(folder, INTEGRITY_FILE)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            record = json.load(f)
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {INTEGRITY_FILE} is unreadable ({type(err).__name__})", None
    found = folder_digests(folder)
    for rel in sorted(set(files) | set(found)):
        if rel not in found:
            return f"file {rel} is missing", record
        if rel not in files:
            return f"unexpected file {rel}", record
        if found[rel] != files[rel]:
            return f"file {rel} does not match its recorded sha256", record
    return None, record


def restore_state(
    mngr: ocp.CheckpointManager,
    target: Any,
    step: int | None = None,
    identity: dict | None = None,
) -> Any | None:
    """Restore into the structure/shardings of ``target``: checkpoint ``step``, by default the
    newest intact one (None when there is no checkpoint).

    A checkpoint is intact when every file matches the sha256 recorded when it was saved
    (:func:`save_checkpoint`; one saved without a record is trusted if orbax restores it).
    Damaged checkpoints newer than the one restored are moved aside
    (``<step>.damaged-<time>``) with a warning naming them, so that training resumes from
    the newest intact step and saves over none of them.
    ``CheckpointError`` (naming the directory and each step's problem) when no checkpoint can
    be restored -- nothing is moved then -- when ``step`` is damaged, when an intact
    checkpoint does not fit ``target`` (another model), or when its recorded identity differs
    from ``identity`` (another run: the message lists the differing fields)."""
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    damaged: list[tuple[int, str, str]] = []
    for s in steps:
        folder = step_folder(mngr, s)
        problem, record = _integrity(folder)
        if problem is None and record is not None and identity is not None:
            diffs = describe_differences(record.get("identity") or {}, identity)
            if diffs:
                raise CheckpointError(
                    f"checkpoint {folder} was written by another run ({'; '.join(diffs)}); "
                    f"use another --workdir, or move {mngr.directory} away to start over"
                )
        if problem is None:
            try:
                state = mngr.restore(s, args=ocp.args.StandardRestore(abstract))
            except Exception as err:  # orbax/tensorstore raise many kinds on a damaged folder
                reason = first_line(err)
                if record is not None:
                    raise CheckpointError(
                        f"checkpoint {folder} is intact but cannot be restored into this model "
                        f"({reason}); check config.model, or use another --workdir"
                    ) from err
                problem = f"no {INTEGRITY_FILE} and restoring it failed ({reason})"
            else:
                _set_aside(mngr, damaged, s)
                return state
        damaged.append((s, folder, problem))
    if not damaged:
        return None
    raise _none_restorable(mngr.directory, damaged)


def _none_restorable(directory, damaged: list) -> CheckpointError:
    """The error when every checkpoint is ``damaged`` (``(step, folder, problem)`` each)."""
    listing = "; ".join(f"step {s}: {p}" for s, _, p in damaged)
    return CheckpointError(
        f"no checkpoint in {directory} can be restored ({listing}); restore them from a "
        f"backup, or move the folder away to start training from scratch"
    )


def restorable_metadata(
    directory: str, check: Callable[[str, Any], None] | None = None
) -> tuple[str, Any] | None:
    """What :func:`restore_state` would restore from ``directory``, judged before any network
    is built: ``(folder, Orbax metadata tree of its state)`` of the newest checkpoint whose
    files match their recorded sha256 (read once here and again when restored) or, without
    a record, whose metadata reads; ``check(folder, tree)`` raises ``ValueError`` when the
    state does not fit the model. None: no checkpoint. ``CheckpointError`` as
    :func:`restore_state` raises it: an intact checkpoint that does not fit, or every
    checkpoint damaged (each step's problem listed). Nothing is moved."""
    quiet_orbax_logs()
    mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers=ocp.StandardCheckpointHandler(),  # to read the metadata of a save
    )
    try:
        damaged: list[tuple[int, str, str]] = []
        for s in sorted(mngr.all_steps(), reverse=True):
            folder = step_folder(mngr, s)
            problem, record = _integrity(folder)
            if problem is None:
                try:
                    tree = mngr.item_metadata(s).tree
                    if check is not None:
                        check(folder, tree)
                    return folder, tree
                except Exception as err:  # orbax raises many kinds on a damaged folder
                    if record is not None:
                        raise CheckpointError(
                            f"checkpoint {folder} is intact but cannot be restored into this "
                            f"model ({first_line(err)}); check config.model, or use another "
                            f"--workdir"
                        ) from err
                    problem = f"no {INTEGRITY_FILE} and its metadata is unreadable or does not "
                    problem += f"fit the model ({first_line(err)})"
            damaged.append((s, folder, problem))
        if damaged:
            raise _none_restorable(mngr.directory, damaged)
        return None
    finally:
        mngr.close()


def _set_aside(mngr: ocp.CheckpointManager, damaged: list, restored: int) -> None:
    """Move the ``damaged`` ``(step, folder, problem)`` aside (process 0), warning for each."""
    if not damaged:
        return
    for s, folder, problem in damaged if jax.process_index() == 0 else ():
        logging.warning(
            "checkpoint step %d (%s) is damaged: %s; moved aside to %s; restored step %d",
            s, folder, problem, move_aside(folder, "damaged"), restored,
        )  # fmt: skip
    parallel.barrier("deis_jax.restore_state")
    mngr.reload()
