"""Fault injection for the long-running modes but sampling: train, compare, sweep, table, fit.

Each mode is killed mid-run and restarted; the artifacts it writes (cell caches, reports,
statistics and teacher caches, grid files, checkpoints, the metrics log) are truncated,
bit-flipped, deleted or swapped for another run's. Checked: the damage is named in the log (or
the error), the damaged work is recomputed (or refused), nothing damaged or foreign is used,
and the final results equal those of an uninterrupted run (timings aside). Cells whose samples
are not finite are reported as failed, never as numbers, and are not reused.

Tiny setups of the modes' own tests (tests/test_train.py, test_main_compare.py,
test_sweep.py, test_table.py, test_fit_mode.py), with most XLA optimisations off.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "configs")):
    if path not in sys.path:
        sys.path.insert(0, path)

import gmm_vpsde  # noqa: E402
from test_table import digits_mixture_model  # noqa: E402
from test_table import tiny_config as table_config  # noqa: E402
from test_train import TinyNet  # noqa: E402
from test_train import tiny_config as train_config  # noqa: E402

from configs import fit_gmm  # noqa: E402
from deis_jax.common import checkpoint_store  # noqa: E402
from deis_jax.evaluation import fid  # noqa: E402
from deis_jax.experiments import compare as compare_mode  # noqa: E402
from deis_jax.experiments import fit as fit_mode  # noqa: E402
from deis_jax.experiments import gmm  # noqa: E402
from deis_jax.experiments import sweep as sweep_mode  # noqa: E402
from deis_jax.experiments import table as table_mode  # noqa: E402
from deis_jax.experiments import train as train_mode  # noqa: E402
from deis_jax.experiments.engine import (  # noqa: E402
    FAILED,
    Cell,  # noqa: E402
    run_cells,
)
from deis_jax.experiments.fit import cells as fitting  # noqa: E402
from deis_jax.experiments.scoring import SampleScorer  # noqa: E402
from deis_jax.experiments.sweep import cells as sweep  # noqa: E402
from deis_jax.fitting.grid_file import OptimizedGrid  # noqa: E402
from deis_jax.models.loading import LoadedModel  # noqa: E402
from deis_jax.training import loop as training  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def fast_compiles(tmp_path_factory):
    """These tests are about files, not speed: most XLA optimisations off, and a persistent
    compilation cache for this module, so that a mode's reruns load the programs its first run
    compiled (the same programs: no result changes)."""
    flags = ("jax_disable_most_optimizations", "jax_persistent_cache_min_compile_time_secs",
             "jax_compilation_cache_dir")  # fmt: skip
    previous = {k: jax.config.values[k] for k in flags}
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("compilation_cache")))
    yield
    compilation_cache.reset_cache()
    for key, value in previous.items():
        jax.config.update(key, value)


class Killed(Exception):
    """A kill between two cells / steps."""


# --- damage ---------------------------------------------------------------------------------


def truncate(path) -> None:
    """Cut a file to half its size (a torn write)."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_bit(path, offset: int | None = None, bit: int = 0x04) -> None:
    """Flip one bit of a file (its middle byte by default)."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if offset is None else offset] ^= bit
    open(path, "wb").write(bytes(data))


def flip_digit(path, field: str, line: int = 0) -> None:
    """Flip the lowest bit of the first non-zero digit of ``"field": <number>`` on JSON line
    ``line``: one bit, and the line is still valid JSON with another value."""
    lines = open(path, "rb").read().split(b"\n")
    match = re.search(rb'"' + field.encode() + rb'": -?[0.]*([1-9])', lines[line])
    assert match, (field, lines[line][:200])
    offset = sum(len(x) + 1 for x in lines[:line]) + match.start(1)
    flip_bit(path, offset, bit=0x01)  # a digit stays a digit
    assert json.loads(open(path, "rb").read().split(b"\n")[line])  # still valid JSON


def largest_file(folder) -> str:
    return max(glob.glob(os.path.join(folder, "**", "*"), recursive=True), key=os.path.getsize)


def without(records, *fields):
    """Records without timing fields (which differ between runs)."""
    return [{k: v for k, v in r.items() if k not in fields} for r in records]


def csv_rows(path, *drop):
    with open(path) as f:
        return without(list(csv.DictReader(f)), *drop)


def damaged_copies(path) -> list[str]:
    return sorted(glob.glob(f"{path}.damaged-*"))


# --- the sealed cell cache (every cached mode: compare, sweep, table, fit) -------------------

CELLS = [Cell(f"c{i}", payload=i) for i in range(4)]
EXPECTED = {f"c{i}": {"value": i / 7, "label": f"cell {i}"} for i in range(4)}


def cell_run(path, calls, kill_at=None, fingerprint="f", **kwargs):
    def compute(cell, advance):
        if cell.payload == kill_at:
            raise Killed
        calls.append(cell.key)
        return {"value": cell.payload / 7, "label": f"cell {cell.payload}"}

    return run_cells(CELLS, compute, cache_path=path, fingerprint=fingerprint,
                            desc="t", progress=False, **kwargs)  # fmt: skip


def _torn(path):  # a kill while the third line was written
    data = open(path, "rb").read()
    start = sum(len(x) + 1 for x in data.split(b"\n")[:2])
    open(path, "wb").write(data[: start + 30])


def _unsealed(path):  # a line written before records were sealed
    lines = open(path).read().splitlines()
    line = json.loads(lines[2])
    line["record"] = line["record"]["result"]
    lines[2] = json.dumps(line, sort_keys=True)
    open(path, "w").write("\n".join(lines) + "\n")


def _foreign(path):  # the cache of another experiment (another fingerprint)
    os.remove(path)
    cell_run(path, [], fingerprint="another experiment")


CACHE_DAMAGE = {
    # name: (damage, cells computed again, log names line 3)
    "torn": (_torn, ["c2", "c3"], True),
    "value_bit": (lambda p: flip_digit(p, "value", line=2), ["c2"], True),
    "key_bit": (lambda p: flip_bit(p, open(p, "rb").read().index(b'"c2"') + 2), ["c2"], True),
    "unsealed": (_unsealed, ["c2"], True),
    "deleted": (os.remove, ["c0", "c1", "c2", "c3"], False),
    "foreign": (_foreign, ["c0", "c1", "c2", "c3"], False),
}


@pytest.mark.parametrize("name", list(CACHE_DAMAGE))
def test_cell_cache_kill_and_damage(tmp_path, caplog, name):
    path = str(tmp_path / "cells.jsonl")
    calls = []
    with pytest.raises(Killed):
        cell_run(path, calls, kill_at=3)
    assert calls == ["c0", "c1", "c2"]
    damage, recomputed, named = CACHE_DAMAGE[name]
    damage(path)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        records = cell_run(path, calls)
    assert records == EXPECTED  # as an uninterrupted run
    assert calls == recomputed + (["c3"] if "c3" not in recomputed else [])
    if named:
        assert f"{path} line 3" in caplog.text and damaged_copies(path)
    calls.clear()
    assert cell_run(path, calls) == EXPECTED and calls == []  # the repaired cache is complete


def test_failed_cells_are_reported_but_never_reused(tmp_path):
    path = str(tmp_path / "cells.jsonl")

    def compute(cell, advance):
        calls.append(cell.key)
        if cell.key == "c1" and first_run:
            return {"value": None, FAILED: "3 of 8 samples non-finite (e.g. #0, #2, #5)"}
        return {"value": cell.payload}

    calls, first_run = [], True
    first = run_cells(CELLS, compute, cache_path=path, fingerprint="f", desc="t",
                             progress=False)  # fmt: skip
    assert first["c1"][FAILED].startswith("3 of 8 samples non-finite")
    calls.clear()
    first_run = False
    second = run_cells(CELLS, compute, cache_path=path, fingerprint="f", desc="t",
                              progress=False)  # fmt: skip
    assert calls == ["c1"] and second["c1"] == {"value": 1}  # retried, not reused


def test_cached_cells_whose_artifact_fails_verification_are_recomputed(tmp_path, caplog):
    path, calls = str(tmp_path / "cells.jsonl"), []
    cell_run(path, calls)
    calls.clear()
    with caplog.at_level(logging.WARNING):
        records = cell_run(
            path, calls, verify=lambda r: "its file is gone" * (r["value"] > 0.4) or None
        )
    assert calls == ["c3"] and records == EXPECTED
    assert "line 4 (cell c3): its file is gone" in caplog.text


# --- train ------------------------------------------------------------------------------------


def tiny_train_config():
    config = train_config(n_iters=4)
    config.training.checkpoint_every = 2  # checkpoints 2 and 4, a record every step
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted 4-step run: (workdir, final state, metrics records)."""
    workdir = str(tmp_path_factory.mktemp("train") / "uninterrupted")
    state, history = train_mode.run(tiny_train_config(), workdir, model=TinyNet())
    return workdir, state, history


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def test_train_killed_mid_run_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """Killed in step 4, after the record of step 3 and the checkpoint at step 2: the restart
    drops that record, redoes steps 3 and 4, and ends where the uninterrupted run ended."""
    reference, ref_state, _ = trained
    workdir = str(tmp_path / "killed")

    def kill(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_mode.run(tiny_train_config(), workdir, model=TinyNet(), callback=kill)
    assert [s for s, _, _ in losses(workdir)] == [1, 2, 3]
    state, _ = train_mode.run(tiny_train_config(), workdir, model=TinyNet())
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses(workdir) == losses(reference)


def test_train_resumes_from_the_newest_intact_checkpoint(trained, tmp_path, caplog):
    """A bit flip in the newest checkpoint (orbax would restore it silently): it is moved
    aside, training resumes from step 2, logs steps 3 and 4 once, and ends bit for bit where
    the uninterrupted run ended."""
    reference, ref_state, _ = trained
    workdir = str(tmp_path / "damaged")
    shutil.copytree(reference, workdir)
    newest = os.path.join(workdir, "checkpoints", "4")
    flip_bit(largest_file(os.path.join(newest, "default")))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')  # and a record torn by the kill
    with caplog.at_level(logging.WARNING):
        state, history = train_mode.run(tiny_train_config(), workdir, model=TinyNet())
    assert f"checkpoint step 4 ({newest}) is damaged" in caplog.text
    assert "does not match its recorded sha256" in caplog.text
    assert [h["step"] for h in history] == [3, 4] and damaged_copies(newest)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses(workdir) == losses(reference)  # one record per step, the same values


def test_training_stops_at_a_nonfinite_loss_before_logging_or_checkpointing_it(tmp_path):
    def step_fn(state, batch):  # the loss turns NaN at the third step
        return state, {"loss": jnp.where(batch >= 2, jnp.nan, 1.0), "grad_norm": jnp.ones(())}

    state = training.TrainState(jnp.zeros((), jnp.int32), None, None, None)
    metrics = str(tmp_path / "metrics.jsonl")
    with pytest.raises(
        training.TrainingDivergedError, match="training diverged: mean .*'loss': nan.* step 4"
    ):
        training.train_loop(state, step_fn, iter(jnp.arange(6)), num_steps=6, log_every=2,
                            metrics_path=metrics)  # fmt: skip
    assert [json.loads(x)["step"] for x in open(metrics)] == [2]  # no NaN record


def _abstract_state(config):
    tx = training.optimizer_from_config(config.training)
    return jax.eval_shape(lambda: training.init_state(TinyNet(), tx, jax.random.PRNGKey(0),
                                                      (8, 8, 1)))  # fmt: skip


def _data_file(step_dir):
    return largest_file(os.path.join(step_dir, "default"))


CHECKPOINT_DAMAGE = {
    "truncated": (lambda d: truncate(_data_file(d)), "does not match its recorded sha256"),
    "deleted": (lambda d: os.remove(_data_file(d)), "is missing"),
    "torn_record": (
        lambda d: truncate(os.path.join(d, checkpoint_store.INTEGRITY_FILE)),
        "unreadable",
    ),
    "no_record": (  # no digests to check against: orbax's own error decides (a truncated
        # data file may go unnoticed by orbax: it can hold superseded blocks)
        lambda d: (
            os.remove(os.path.join(d, checkpoint_store.INTEGRITY_FILE)),
            truncate(os.path.join(d, "default", "_METADATA")),
        ),
        "restoring it failed (JSONDecodeError",
    ),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_falls_back_with_a_warning(trained, tmp_path, caplog, name):
    reference = os.path.join(trained[0], "checkpoints")
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(reference, directory)
    damage, message = CHECKPOINT_DAMAGE[name]
    damage(os.path.join(directory, "4"))
    target = _abstract_state(tiny_train_config())
    with caplog.at_level(logging.WARNING):
        mngr = checkpoint_store.checkpoint_manager(directory)
        try:
            state = checkpoint_store.restore_state(mngr, target)
            assert mngr.all_steps() == [2]
        finally:
            mngr.close()
    assert int(state.step) == 2
    assert f"checkpoint step 4 ({os.path.join(directory, '4')}) is damaged" in caplog.text
    assert message in caplog.text
    pristine = checkpoint_store.checkpoint_manager(reference)
    try:
        expected = checkpoint_store.restore_state(pristine, target, step=2)
    finally:
        pristine.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_intact_checkpoint_or_another_runs_checkpoint_is_refused(trained, tmp_path):
    config = tiny_train_config()
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(trained[0], "checkpoints"), directory)
    target = _abstract_state(config)
    other = tiny_train_config()
    other.seed = 1  # the checkpoints of another run
    mngr = checkpoint_store.checkpoint_manager(directory)
    try:
        with pytest.raises(
            checkpoint_store.CheckpointError, match=r"another run \(seed: 0 \(on disk\) vs 1"
        ):
            checkpoint_store.restore_state(mngr, target, identity=train_mode.identity(other))
        for step in ("2", "4"):
            flip_bit(_data_file(os.path.join(directory, step)))
        with pytest.raises(checkpoint_store.CheckpointError) as info:
            checkpoint_store.restore_state(mngr, target, identity=train_mode.identity(config))
    finally:
        mngr.close()
    message = str(info.value)
    assert f"no checkpoint in {directory} can be restored" in message
    assert "step 4: file" in message and "step 2: file" in message
    assert sorted(os.listdir(directory)) == ["2", "4"]  # nothing moved: nothing to fall back to


# --- compare ----------------------------------------------------------------------------------


def compare_config():
    config = gmm_vpsde.get_config()
    config.data.dims = (3,)  # no 2-D scatter plot (it recomputes cached cells)
    config.compare.update(nfes=(3,), methods=("ddim",), num_samples=16, reference_steps=10,
                          scatter_nfe=3)  # fmt: skip
    return config


def test_compare_kill_nan_damage_and_restart(tmp_path, monkeypatch, caplog):
    workdir, calls = str(tmp_path), []
    run_cell = gmm.run_cell

    def patched(mode):
        def cell(problem, sampler, mesh):
            if mode == "kill":
                raise Killed
            calls.append(sampler.method)
            if mode == "nan":  # the network's output is NaN: the samples too
                eps = sampler.eps_fn
                sampler = dataclasses.replace(sampler, eps_fn=lambda x, t: eps(x, t) * jnp.nan)
            return run_cell(problem, sampler, mesh)

        monkeypatch.setattr(gmm, "run_cell", cell)

    patched("kill")
    with pytest.raises(Killed):  # after the reference cell, before the ddim cell
        compare_mode.run(compare_config(), workdir)
    patched("nan")
    records = compare_mode.run(compare_config(), workdir)
    ddim = records[1]
    assert ddim[FAILED] == "16 of 16 samples non-finite (e.g. #0, #1, #2, #3, #4)"
    assert ddim["rmse"] is None and ddim["nll_gap"] is None
    patched("ok")
    resumed = compare_mode.run(compare_config(), workdir)
    assert calls == ["ddim", "ddim"]  # the failed cell computed again, the reference not
    assert FAILED not in resumed[1] and resumed[1]["rmse"] > 0

    cache = os.path.join(workdir, "results.jsonl")
    flip_digit(cache, "rmse", line=1)
    truncate(os.path.join(workdir, "results.md"))
    os.remove(os.path.join(workdir, "results.csv"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        repaired = compare_mode.run(compare_config(), workdir)
    assert f"{cache} line 2 (cell 3|ddim|3): its content does not match its checksum" in caplog.text
    assert calls == ["ddim"] and without(repaired, "seconds") == without(resumed, "seconds")
    assert "## dim 3: RMSE vs reference" in open(os.path.join(workdir, "results.md")).read()

    os.remove(cache)  # the cache deleted: everything computed again, as an uninterrupted run
    calls.clear()
    fresh = compare_mode.run(compare_config(), workdir)
    assert calls == ["ddim"] and without(fresh, "seconds") == without(resumed, "seconds")


# --- sweep ------------------------------------------------------------------------------------


def sweep_config(evaluator):
    config = sweep.load_config_file(os.path.join(ROOT, "configs", "sweeps", "gmm_methods.py"))
    config.data.dims = (2,)
    config.sweep.axes = (("sampler.spec", ("ddim", "tab2")), ("sampler.nfe", (3, 4)))
    config.sweep.evaluator = evaluator
    return config


@pytest.fixture
def evaluator():
    """A registered sweep evaluator ``"fake"`` (no sampling: the sweep's files are the point)
    whose records list their fields out of order; ``calls`` records the points evaluated,
    ``mode["nan"]`` makes tAB2 at NFE 4 non-finite, ``mode["kill_at"]`` kills a point."""
    calls, mode = [], {"nan": False, "kill_at": None}

    def evaluate(config, context):
        point = (config.sampler.method, config.sampler.nfe)
        if point == mode["kill_at"]:
            raise Killed
        calls.append(point)
        rmse = 1.0 / (config.sampler.nfe + config.sampler.order)
        if mode["nan"] and point == ("tab", 4):
            rmse = float("nan")
        return [{"seconds": 0.5, "rmse": rmse, "nfe": config.sampler.nfe, "dim": 2,
                 "zeta": "z", "nll_gap": 2 * rmse}]  # fmt: skip

    sweep.register_evaluator("fake", gmm.validate_problem, evaluate)
    yield calls, mode
    sweep.EVALUATORS.pop("fake", None)


def test_sweep_kill_nan_damage_swap_and_csv_columns(tmp_path, evaluator, caplog):
    calls, mode = evaluator
    workdir, config = str(tmp_path), sweep_config("fake")
    mode.update(kill_at=("tab", 3))
    with pytest.raises(Killed):
        sweep_mode.run(config, workdir, progress=False)
    mode.update(kill_at=None, nan=True)
    rows = sweep_mode.run(config, workdir, progress=False)
    assert calls == [("ddim", 3), ("ddim", 4), ("tab", 3), ("tab", 4)]
    assert rows[3][FAILED] == "dim 2: non-finite rmse, nll_gap" and rows[3]["rmse"] is None
    assert "| tab2 | 0.2 | failed |" in open(os.path.join(workdir, "sweep.md")).read()
    header = open(os.path.join(workdir, "sweep.csv")).readline().strip()
    assert header == "sampler.spec,sampler.nfe,dim,nfe,rmse,nll_gap,failed,seconds,zeta"

    mode.update(nan=False)
    calls.clear()
    rows = sweep_mode.run(config, workdir, progress=False)
    assert calls == [("tab", 4)]  # the failed point, nothing else
    resumed_csv = csv_rows(os.path.join(workdir, "sweep.csv"))
    # cached records read back with sorted keys: the columns must not follow them
    assert open(os.path.join(workdir, "sweep.csv")).readline().strip() == (
        "sampler.spec,sampler.nfe,dim,nfe,rmse,nll_gap,seconds,zeta"
    )

    cache = os.path.join(workdir, sweep.RESULTS_FILE)
    flip_digit(cache, "rmse", line=0)
    os.remove(os.path.join(workdir, "sweep.csv"))
    truncate(os.path.join(workdir, "sweep.md"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        sweep_mode.run(config, workdir, progress=False)
    assert calls == [("ddim", 3)] and f"{cache} line 1" in caplog.text
    assert csv_rows(os.path.join(workdir, "sweep.csv")) == resumed_csv
    assert (
        "| rmse (dim 2) \\ sampler.nfe | 3 | 4 |" in open(os.path.join(workdir, "sweep.md")).read()
    )

    other = str(tmp_path / "other")  # another sweep's finished cache swapped in
    config_b = sweep_config("fake")
    config_b.seed = 7
    sweep_mode.run(config_b, other, progress=False)
    shutil.copy(os.path.join(other, sweep.RESULTS_FILE), cache)
    calls.clear()
    sweep_mode.run(config, workdir, progress=False)
    assert len(calls) == 4  # nothing of the other sweep used
    assert csv_rows(os.path.join(workdir, "sweep.csv")) == resumed_csv


# --- table ------------------------------------------------------------------------------------


def tiny_table_config():
    config = table_config()
    ev = config.eval
    ev.update(num_samples=8, batch_size=8, inception_score=False, rmse=False,
              methods=("tAB1",), nfes=(3, 4), reference_max_images=16)  # fmt: skip
    return config


def test_table_kill_damage_swap_and_restart(tmp_path, monkeypatch, caplog):
    config, workdir = tiny_table_config(), str(tmp_path)
    model = digits_mixture_model(config)
    plan = table_mode.validate(config)
    calls, score = [], SampleScorer.score

    def counted(scorer, sampler, advance=None):
        if len(calls) == 1 and kill[0]:
            raise Killed  # between the two cells
        calls.append(sampler.nfe)
        return score(scorer, sampler, advance)

    kill = [True]
    monkeypatch.setattr(SampleScorer, "score", counted)
    with pytest.raises(Killed):
        table_mode.run(config, workdir, plan, model=model)
    kill[0] = False
    resumed = table_mode.run(config, workdir, plan, model=model)
    assert calls == [3, 4]
    out = os.path.join(workdir, "tables", "deis_cifar10")
    resumed_csv = csv_rows(os.path.join(out, "table.csv"), "seconds")

    cache = os.path.join(out, "cells.jsonl")
    (reference,) = glob.glob(os.path.join(workdir, "tables", "reference_*.npz"))
    flip_digit(cache, "value", line=0)
    flip_bit(reference)  # the zip's CRC-32 catches it
    os.remove(os.path.join(out, "table.md"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        repaired = table_mode.run(config, workdir, plan, model=model)
    assert f"{cache} line 1 (cell tAB1|tab1|{{}}|3)" in caplog.text
    assert f"statistics file {reference!r} is damaged" in caplog.text
    assert damaged_copies(reference) and damaged_copies(cache)
    assert calls == [3] and without(repaired, "seconds") == without(resumed, "seconds")
    assert csv_rows(os.path.join(out, "table.csv"), "seconds") == resumed_csv
    assert "| tAB1 |" in open(os.path.join(out, "table.md")).read()

    # statistics of another dataset swapped into the cache: not used, computed again
    other = fid.FeatureStats.from_features(np.random.default_rng(0).normal(size=(8, 64)))
    fid.save_stats(reference, other, extractor="digits_classifier", dataset="other")
    os.remove(cache)  # and the cells deleted: everything computed again, uninterrupted
    calls.clear()
    fresh = table_mode.run(config, workdir, plan, model=model)
    assert calls == [3, 4] and without(fresh, "seconds") == without(resumed, "seconds")


def test_table_cell_with_nonfinite_samples_is_failed_not_a_number(tmp_path):
    config = tiny_table_config()
    config.eval.nfes = (3,)
    mixture = digits_mixture_model(config)
    model = LoadedModel(lambda p: (lambda x, t: jnp.nan * mixture.bind(p)(x, t)), None,
                        {"model": "NaN"})  # fmt: skip
    (record,) = table_mode.run(config, str(tmp_path), model=model)
    assert record["value"] is None
    assert record[FAILED] == "8 of 8 samples non-finite (e.g. #0, #1, #2, #3, #4)"
    out = os.path.join(str(tmp_path), "tables", "deis_cifar10")
    md = open(os.path.join(out, "table.md")).read()
    assert "| tAB1 | failed |" in md and "## Failed cells" in md
    (row,) = csv_rows(os.path.join(out, "table.csv"))
    assert row["value"] == "" and "samples non-finite" in row[FAILED]


def test_a_damaged_user_statistics_file_is_refused_by_name(tmp_path):
    path = str(tmp_path / "cifar10_stats.npz")
    fid.save_stats(path, fid.FeatureStats.from_features(np.eye(4)))
    truncate(path)
    with pytest.raises(fid.StatsFileError, match=re.escape(f"statistics file {path!r} is damaged")):
        fid.load_stats(path)


# --- fit --------------------------------------------------------------------------------------


def tiny_fit_config():
    config = fit_gmm.get_config()
    config.data.dims = (4,)
    config.data.scattered.dims = ()
    config.fit.update(methods=("ipndm3",), nfes=(4,), fixed_grids=(), variants=("gits",),
                      recipes=(),
                      num_fit=16, num_heldout=16, teacher_points=9, teacher_substeps=1,
                      heldout_substeps=1, plot_nfe=4)  # fmt: skip
    return config


def test_fit_kill_damage_swap_and_restart(tmp_path, monkeypatch, caplog):
    workdir, calls = str(tmp_path), []
    compute_cell = fitting.compute_cell

    def counted(config, schedule, problem, teach, choice, nfe, variant, *args, **kwargs):
        if variant == "gits" and kill[0]:
            raise Killed
        calls.append(variant)
        return compute_cell(config, schedule, problem, teach, choice, nfe, variant, *args, **kwargs)

    kill = [True]
    monkeypatch.setattr(fitting, "compute_cell", counted)
    with pytest.raises(Killed):
        fit_mode.run(tiny_fit_config(), workdir)
    kill[0] = False
    resumed = fit_mode.run(tiny_fit_config(), workdir)
    assert calls == ["default", "gits"]
    grid_path = os.path.join(workdir, resumed[1]["grid_file"])
    grid_text = open(grid_path).read()

    flip_bit(os.path.join(workdir, "teachers", "dim4_heldout.npz"))
    os.remove(grid_path)
    os.remove(os.path.join(workdir, "results.csv"))
    calls.clear()
    with caplog.at_level(logging.WARNING):
        repaired = fit_mode.run(tiny_fit_config(), workdir)
    assert (
        f"teacher cache {os.path.join(workdir, 'teachers', 'dim4_heldout.npz')} is unreadable"
        in caplog.text
    )
    assert f"(cell dim4|ipndm3|4|gits): its file {grid_path} is missing" in caplog.text
    timing = ("fit_seconds", "grid_sha256")  # the grid file's provenance holds the fit time
    assert calls == ["gits"] and without(repaired, *timing) == without(resumed, *timing)

    # a grid file of another fit swapped in: its cell is computed again, the file rewritten
    foreign = OptimizedGrid.load(grid_path)
    OptimizedGrid(foreign.ts * np.r_[1.0, 0.9, 0.9, 0.9, 1.0], "ipndm", 3, 4, {}, foreign.schedule,
                  "gits").save(grid_path)  # fmt: skip
    calls.clear()
    with caplog.at_level(logging.WARNING):
        fit_mode.run(tiny_fit_config(), workdir)
    assert calls == ["gits"] and "is not the one the cell wrote" in caplog.text
    assert np.array_equal(OptimizedGrid.load(grid_path).ts, json.loads(grid_text)["ts"])


def test_fit_report_shows_failed_cells(tmp_path):
    records = [
        {"problem": "dim4", "method": "ipndm3", "variant": v, "nfe_budget": 4, "nfe": 4,
         "heldout_rmse": r, "reference_error": 1e-6, "ts": [1.0, 0.5, 0.1, 0.01, 0.001],
         **({} if r else {FAILED: "held-out samples non-finite (their RMSE is not finite)"})}
        for v, r in (("default", 0.3), ("gits", None))
    ]  # fmt: skip
    fitting.write_report(str(tmp_path), records, ["default", "gits"], [4], 4)
    md = (tmp_path / "results.md").read_text()
    assert "| ipndm3 | gits | failed |" in md and "| ipndm3 | default | 0.3 |" in md
    (_, gits) = csv_rows(tmp_path / "results.csv")
    assert gits["heldout_rmse"] == "" and "non-finite" in gits[FAILED]
