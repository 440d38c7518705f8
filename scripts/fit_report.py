"""The ``--mode=fit`` report of the cells a run has finished so far (a run stopped by a limit).

    python scripts/fit_report.py runs/epd_gmm3072 --out results/epd_gmm/dim3072

``--mode=fit`` writes ``results.{md,csv}`` and its plots when every cell is done; a run cut
short keeps its finished cells in ``<workdir>/results.jsonl`` (sealed, and reused by the next
run). This writes the same report from those cells alone: the lines of the run's last
fingerprint whose seal (``engine.seal``) checks, failed cells left out; the missing cells are
simply absent. It only reads the cache, so it may run while the run goes on.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deis_jax.common.files import read_jsonl  # noqa: E402
from deis_jax.experiments.engine import FAILED, seal  # noqa: E402
from deis_jax.experiments.fit import cells as fitting  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--out", required=True, help="directory of the report")
    parser.add_argument("--plot-nfe", type=int, default=5)
    args = parser.parse_args()
    lines = list(read_jsonl(os.path.join(args.workdir, "results.jsonl")))
    fingerprint = [line["fingerprint"] for line in lines if "fingerprint" in line][-1]
    records = [
        line["record"]["result"]
        for line in lines
        if line.get("fingerprint") == fingerprint
        and line["record"].get("sha256") == seal(line["key"], fingerprint, line["record"]["result"])
        and not line["record"]["result"].get(FAILED)
    ]
    variants = list(dict.fromkeys(r["variant"] for r in records))
    nfes = sorted({int(r["nfe_budget"]) for r in records})
    os.makedirs(args.out, exist_ok=True)
    fitting.write_report(args.out, records, variants, nfes, args.plot_nfe)
    print(f"{len(records)} cells of fingerprint {fingerprint} -> {args.out}/results.md")


if __name__ == "__main__":
    main()
