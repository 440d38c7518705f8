"""scripts/device_check.py (issue 23) at tiny size on the CPU: it writes its timing table
with one row per network, dtype and method, its fit-step memory table, and the device it
ran on."""

import os
import pathlib
import re
import subprocess
import sys

from deis_jax.common.parallel import simulated_device_flags

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "device_check.py"


def test_device_check_tiny_writes_its_table(tmp_path):
    """Run as a GPU session would, on two simulated CPU devices (so the 2-device check runs)."""
    out = tmp_path / "device_check.md"
    methods = ("AMED-Plugin",)  # the learned-rule path on iPNDM (a multistep method)
    # NFE 3: the fewest steps that still run every code path (the fit steps compile per step)
    # one network (the other family's bfloat16 path: tests/test_mixed_precision.py)
    argv = ["--tiny", "--nfe", "3", "--networks", "songunet", "--methods", ",".join(methods),
            "--out", str(out)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=simulated_device_flags(os.environ.get("XLA_FLAGS"), 2))  # fmt: skip
    run = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True,
                         text=True, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert "Device: CPU" in text and "--tiny" in text
    tables = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            if "---" not in line:  # not the separator row
                tables[-1].append([c.strip() for c in line.strip("|").split("|")])
        elif tables[-1]:
            tables.append([])
    timing, memory = (t[1:] for t in tables if t)  # without their header rows
    cells = timing
    assert {(c[0], c[2], c[3]) for c in cells} == {
        (net, dtype, method)
        for net in ("SongUNet (EDM VP)",)
        for dtype in ("float32", "bfloat16")
        for method in methods
    }
    for c in cells:
        assert float(c[5]) > 0 and float(c[7]) > 0  # ratio, images/s
    # one LD3 and one AMED gradient step per network, under jax.checkpoint, with their memory
    assert [(c[0], c[1].split()[0], c[3]) for c in memory] == [
        (net, step, "True") for net in ("SongUNet (EDM VP)",) for step in ("LD3", "AMED")
    ]
    assert all(float(c[4]) > 0 for c in memory)  # compiled MiB (CPU reports it)
    # the same tAB-3 samples from a batch split over two devices (same per-device program
    # shapes are not guaranteed, so float32 rounding through 10 steps of a U-Net: 1e-4)
    diff = re.search(r"2-device check: batch 8 sharded over 2 devices vs 1, max relative "
                     r"difference (\S+)", text)  # fmt: skip
    assert diff and float(diff.group(1)) < 1e-4, text[-500:]
