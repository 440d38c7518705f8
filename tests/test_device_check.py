"""scripts/device_check.py (issue 23) at tiny size on the CPU: it writes its table with one
row per network, dtype and method, and the device it ran on."""

import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).parent.parent / "scripts" / "device_check.py"


def test_device_check_tiny_writes_its_table(tmp_path):
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    device_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(device_check)
    out = tmp_path / "device_check.md"
    methods = ("AMED-Plugin",)  # the learned-rule path on iPNDM (a multistep method)
    device_check.main(["--tiny", "--methods", ",".join(methods), "--out", str(out)])
    text = out.read_text()
    assert "Device: CPU" in text and "--tiny" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]
    assert {(c[0], c[2], c[3]) for c in cells} == {
        (net, dtype, method)
        for net in ("DDPM++ deep (score_sde)", "SongUNet (EDM VP)")
        for dtype in ("float32", "bfloat16")
        for method in methods
    }
    for c in cells:
        assert float(c[5]) > 0 and float(c[7]) > 0  # ratio, images/s
    assert "2-device check" in text
