"""scripts/device_check.py (issue 23) at tiny size on the CPU: it writes its timing table
with one row per network, dtype and method, its fit-step memory table, and the device it
ran on."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "device_check.py"


def test_device_check_tiny_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    out = tmp_path / "device_check.md"
    methods = ("AMED-Plugin",)  # the learned-rule path on iPNDM (a multistep method)
    # NFE 3: the fewest steps that still run every code path (the fit steps compile per step)
    # one network (the other family's bfloat16 path: tests/test_mixed_precision.py)
    argv = ["--tiny", "--nfe", "3", "--networks", "songunet", "--methods", ",".join(methods),
            "--out", str(out)]  # fmt: skip
    device_check.main(argv)
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
    assert "2-device check" in text
