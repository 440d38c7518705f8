"""Published FID tables, transcribed from the project's specs (``/work/shared/specs``).

Each ``PaperTable`` records where its numbers come from, the model and protocol they were
measured with, and ``rows[method][nfe] = PaperValue(fid, extra_nfe, bold)``: ``extra_nfe`` is
the DEIS table's "+k" superscript (the run spent k more NFE than the column label, because a
Runge-Kutta step spends several evaluations; this reading matches s * ceil(NFE / s) for every
entry). Only numbers that the specs mark as confirmed are here; what the specs could not
retrieve (the DEIS CelebA / ImageNet-32 / VE tables, ER-SDE's NFE-10 cells, the SD/LDM AMED
tables) is absent rather than guessed.

Sources
-------
``deis_cifar10``
    DEIS (Zhang & Chen, ICLR 2023), "Variants of DEIS on pre-trained CIFAR10 diffusion
    models": the project page's ``images/table_deis.jpg`` (specs/deis.md section 5.1). Model:
    score_sde VP DDPM++ continuous (beta 0.1..20, t0 = 1e-3); FID on 50k samples.
``amed_cifar10``
    AMED-Solver (Zhou et al., CVPR 2024) main table, CIFAR-10 32x32 panel:
    ``amed-solver-main/assets/fid.jpg`` (specs/amed_ersde.md section 2 (a)). Model: EDM's
    unconditional CIFAR-10 network (not score_sde's): compare shapes, not values. Heun is
    EDM's; "AMED-Plugin" is on iPNDM; its "dagger" marks are not explained in the source.
    Settings (section 3.3): DPM-Solver++ and UniPC on a log-SNR grid with lower-order final
    steps and dynamic thresholding, Euler/Heun/DPM-2/iPNDM on the EDM rho=7 grid.
``deis_tab3_cifar10_diffsolvers``
    DEIS-tAB3 baseline of the diff-solvers suite (``diff-solvers-main/README.md``, same
    models and settings as ``amed_cifar10``; time-uniform rho=2 grid, 3 history points).
``ersde_cifar10``
    ER-SDE-Solvers (Cui et al., arXiv 2309.06169), ar5iv Figure 1 caption: ER-SDE-Solver-3 at
    20 NFE on CIFAR-10 (EDM model). Its other CIFAR-10 cells could not be retrieved.
``amed_imagenet64``
    The AMED main table's ImageNet 64x64 (conditional) panel (specs/amed_ersde.md section 2
    (b)); model EDM's ``edm-imagenet-64x64-cond-adm``, settings as ``amed_cifar10``.
``deis_tab3_imagenet64_diffsolvers``
    DEIS-tAB3 of the diff-solvers suite on the same ImageNet-64 model (as the CIFAR-10 row).
``ersde_imagenet64``
    ER-SDE-Solvers' headline (arXiv abstract): ER-SDE-Solver-3 on ``edm-imagenet-64x64-cond-adm``,
    3.45 FID at 20 NFE and 2.24 at 50 (VE form, x0 prediction, EDM rho=7 grid on [0.002, 80]
    plus a final 0, phi_7 noise scale; specs/amed_ersde.md section 4.4). The other cells of the
    paper's ImageNet-64 table could not be retrieved.
``epd_cifar10``, ``epd_imagenet64``
    EPD-Solver / EPD-Plugin (Zhu et al., ICCV 2025), the README's ``assets/fid.png``
    (specs/epd_adasde.md section 1.7), with that figure's AMED / iPNDM rows. The NFE is the
    *parallel* NFE (sequential rounds: K = 2 probes are one round), 2(N-1) - 1 with AFS; the
    real evaluations are 5 / 8 / 11 / 14. Model: EDM's networks, as ``amed_cifar10``.
``adasde_cifar10``, ``adasde_imagenet64``
    AdaSDE (Wang et al., NeurIPS 2025), the README's ``assets/fid.png`` and table
    (specs/epd_adasde.md section 2.6); K = 1, so its NFE is the real count. Its baselines
    differ from the EPD paper's (e.g. DPM-Solver-2): only its own AMED-Solver row is kept.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def with_extra_nfe(text: str, extra: int) -> str:
    """``"108"``, 1 -> ``"108⁺¹"`` (the DEIS table's notation for NFE spent beyond the column)."""
    return f"{text}⁺{str(extra).translate(_SUPERSCRIPT)}" if extra > 0 else text


class PaperValue(NamedTuple):
    value: float
    extra_nfe: int = 0
    bold: bool = False

    def text(self) -> str:
        return with_extra_nfe(f"{self.value:g}", self.extra_nfe)


@dataclasses.dataclass(frozen=True)
class PaperTable:
    key: str
    title: str
    source: str
    model: str
    metric: str
    rows: dict[str, dict[int, PaperValue]]

    def get(self, method: str, nfe: int) -> PaperValue | None:
        return self.rows.get(method, {}).get(nfe)

    @property
    def nfes(self) -> list[int]:
        return sorted({n for row in self.rows.values() for n in row})


def _row(nfes, values) -> dict[int, PaperValue]:
    """``values``: numbers, ``(value, extra_nfe)`` or ``(value, extra_nfe, bold)`` per NFE."""
    out = {}
    for nfe, v in zip(nfes, values, strict=True):
        if v is None:
            continue
        out[nfe] = PaperValue(*v) if isinstance(v, tuple) else PaperValue(float(v))
    return out


_DEIS_NFES = (5, 10, 15, 20, 50)
B = True  # bold in the source

DEIS_CIFAR10 = PaperTable(
    key="deis_cifar10",
    title="DEIS variants on CIFAR-10 (FID, 50k samples)",
    source="DEIS (Zhang & Chen, ICLR 2023), project page images/table_deis.jpg; specs/deis.md §5.1",
    model="score_sde VP DDPM++ continuous (β 0.1..20), t0 = 1e-3",
    metric="FID",
    rows={
        "DDIM": _row(_DEIS_NFES, (26.91, 11.14, 7.06, 5.47, 3.27)),
        "ρ2Heun": _row(_DEIS_NFES, ((108, 1), 14.72, (4.89, 1), 3.50, 2.60)),
        "ρ3Kutta": _row(_DEIS_NFES, ((185, 1), (13.19, 2), 5.88, (2.97, 1), (2.55, 1, B))),
        "ρ4RK": _row(_DEIS_NFES, ((193, 3), (28.65, 2), (6.88, 1), 3.92, (2.57, 2))),
        "ρAB1": _row(_DEIS_NFES, (22.28, 7.56, 4.69, 3.70, 2.70)),
        "ρAB2": _row(_DEIS_NFES, (21.53, 6.72, 4.16, 3.32, 2.62)),
        "ρAB3": _row(_DEIS_NFES, (21.43, 6.50, 3.99, 3.17, 2.59)),
        "tAB1": _row(_DEIS_NFES, (19.72, 6.09, 4.29, 3.54, 2.67)),
        "tAB2": _row(_DEIS_NFES, (16.31, 4.57, 3.57, 3.05, 2.59)),
        "tAB3": _row(_DEIS_NFES, ((15.37, 0, B), (4.17, 0, B), (3.37, 0, B), (2.86, 0, B), 2.57)),
    },
)

_AMED_NFES = (3, 5, 7, 9)

AMED_CIFAR10 = PaperTable(
    key="amed_cifar10",
    title="AMED-Solver main table, CIFAR-10 32x32 (FID)",
    source="AMED-Solver (Zhou et al., CVPR 2024), amed-solver-main/assets/fid.jpg; "
    "specs/amed_ersde.md §2(a)",
    model="EDM unconditional CIFAR-10 (not score_sde)",
    metric="FID",
    rows={
        "DPM-Solver++(3M)": _row(_AMED_NFES, (110.0, 24.97, 6.74, 3.42)),
        "UniPC": _row(_AMED_NFES, (109.6, 23.98, 5.83, 3.21)),
        "iPNDM": _row(_AMED_NFES, (47.98, 13.59, 5.08, 3.17)),
        "DDIM": _row(_AMED_NFES, (93.36, 49.66, 27.93, 18.43)),
        "EDM (Heun)": _row(_AMED_NFES, (306.2, 97.67, 37.28, 15.76)),
        "DPM-Solver-2": _row(_AMED_NFES, (155.7, 57.30, 10.20, 4.98)),
        "AMED-Solver": _row(_AMED_NFES, (18.49, 7.59, 4.36, 3.67)),
        "AMED-Plugin (iPNDM)": _row(_AMED_NFES, (10.81, 6.61, 3.65, 2.63)),
    },
)

DEIS_TAB3_CIFAR10_DIFFSOLVERS = PaperTable(
    key="deis_tab3_cifar10_diffsolvers",
    title="DEIS-tAB3 in the diff-solvers suite, CIFAR-10 (FID)",
    source="diff-solvers-main/README.md; specs/amed_ersde.md §2 (DEIS baseline)",
    model="EDM unconditional CIFAR-10 (as amed_cifar10)",
    metric="FID",
    rows={
        "DEIS-tAB3": _row(
            (3, 4, 5, 6, 7, 8, 9, 10), (56.01, 25.66, 14.39, 9.40, 6.94, 5.55, 4.68, 4.09)
        )
    },
)

ERSDE_CIFAR10 = PaperTable(
    key="ersde_cifar10",
    title="ER-SDE-Solver-3, CIFAR-10 (FID)",
    source="ER-SDE-Solvers (Cui et al., arXiv 2309.06169), ar5iv Figure 1 caption; "
    "specs/amed_ersde.md §4.4",
    model="EDM CIFAR-10",
    metric="FID",
    rows={"ER-SDE-Solver-3": _row((20,), (3.15,))},
)

AMED_IMAGENET64 = PaperTable(
    key="amed_imagenet64",
    title="AMED-Solver main table, ImageNet 64x64 conditional (FID)",
    source="AMED-Solver (Zhou et al., CVPR 2024), amed-solver-main/assets/fid.jpg; "
    "specs/amed_ersde.md §2(b)",
    model="EDM edm-imagenet-64x64-cond-adm",
    metric="FID",
    rows={
        "DPM-Solver++(3M)": _row(_AMED_NFES, (91.52, 25.49, 10.14, 6.48)),
        "UniPC": _row(_AMED_NFES, (91.38, 24.36, 9.57, 6.34)),
        "iPNDM": _row(_AMED_NFES, (58.53, 18.99, 9.17, 5.91)),
        "DDIM": _row(_AMED_NFES, (82.96, 43.81, 27.46, 19.27)),
        "EDM (Heun)": _row(_AMED_NFES, (249.4, 89.63, 37.65, 16.76)),
        "DPM-Solver-2": _row(_AMED_NFES, (140.2, 42.41, 12.03, 6.64)),
        "AMED-Solver": _row(_AMED_NFES, (38.10, (10.74, 0, B), 6.66, 5.44)),
        "AMED-Plugin (iPNDM)": _row(_AMED_NFES, (28.06, 13.83, 7.81, 5.60)),
    },
)

DEIS_TAB3_IMAGENET64_DIFFSOLVERS = PaperTable(
    key="deis_tab3_imagenet64_diffsolvers",
    title="DEIS-tAB3 in the diff-solvers suite, ImageNet-64 (FID)",
    source="diff-solvers-main/README.md; specs/amed_ersde.md §2 (DEIS baseline)",
    model="EDM edm-imagenet-64x64-cond-adm (as amed_imagenet64)",
    metric="FID",
    rows={
        "DEIS-tAB3": _row(
            (3, 4, 5, 6, 7, 8, 9, 10), (44.51, 23.53, 14.75, 12.57, 8.20, 6.84, 5.97, 5.34)
        )
    },
)

ERSDE_IMAGENET64 = PaperTable(
    key="ersde_imagenet64",
    title="ER-SDE-Solver-3, ImageNet 64x64 conditional (FID)",
    source="ER-SDE-Solvers (Cui et al., arXiv 2309.06169), abstract; specs/amed_ersde.md §4.4",
    model="EDM edm-imagenet-64x64-cond-adm",
    metric="FID",
    rows={"ER-SDE-Solver-3": _row((20, 50), (3.45, 2.24))},
)

EPD_CIFAR10 = PaperTable(
    key="epd_cifar10",
    title="EPD-Solver main figure, CIFAR-10 32x32 (FID, parallel NFE)",
    source="EPD (Zhu et al., ICCV 2025), BeierZhu/EPD assets/fid.png; specs/epd_adasde.md §1.7",
    model="EDM unconditional CIFAR-10 (not score_sde)",
    metric="FID",
    rows={
        "EPD-Solver": _row(_AMED_NFES, (10.40, 4.33, 2.82, 2.49)),
        "EPD-Plugin (iPNDM)": _row(_AMED_NFES, (10.54, 4.47, 3.27, 2.42)),
        "AMED-Solver": _row(_AMED_NFES, (18.49, 7.59, 4.36, 3.67)),
        "AMED-Plugin (iPNDM)": _row(_AMED_NFES, (10.81, 6.61, 3.65, 2.63)),
        "iPNDM": _row(_AMED_NFES, (47.98, 13.59, 5.08, 3.17)),
    },
)

EPD_IMAGENET64 = PaperTable(
    key="epd_imagenet64",
    title="EPD-Solver main figure, ImageNet 64x64 conditional (FID, parallel NFE)",
    source="EPD (Zhu et al., ICCV 2025), BeierZhu/EPD assets/fid.png; specs/epd_adasde.md §1.7",
    model="EDM edm-imagenet-64x64-cond-adm",
    metric="FID",
    rows={
        "EPD-Solver": _row(_AMED_NFES, (18.28, 6.35, 5.26, 4.27)),
        "EPD-Plugin (iPNDM)": _row(_AMED_NFES, (19.89, 8.17, 4.81, 4.02)),
        "AMED-Solver": _row(_AMED_NFES, (38.10, 10.74, 6.66, 5.44)),
        "AMED-Plugin (iPNDM)": _row(_AMED_NFES, (28.06, 13.83, 7.81, 5.60)),
    },
)

ADASDE_CIFAR10 = PaperTable(
    key="adasde_cifar10",
    title="AdaSDE main figure, CIFAR-10 32x32 (FID)",
    source="AdaSDE (Wang et al., NeurIPS 2025), Westlake-AGI-Lab/AdaSDE assets/fid.png; "
    "specs/epd_adasde.md §2.6",
    model="EDM unconditional CIFAR-10 (not score_sde)",
    metric="FID",
    rows={
        "AdaSDE": _row(_AMED_NFES, (12.62, 4.18, 2.88, 2.56)),
        "AMED-Solver": _row(_AMED_NFES, (18.49, 7.59, 4.36, 3.67)),
    },
)

ADASDE_IMAGENET64 = PaperTable(
    key="adasde_imagenet64",
    title="AdaSDE main figure, ImageNet 64x64 conditional (FID)",
    source="AdaSDE (Wang et al., NeurIPS 2025), Westlake-AGI-Lab/AdaSDE assets/fid.png; "
    "specs/epd_adasde.md §2.6",
    model="EDM edm-imagenet-64x64-cond-adm",
    metric="FID",
    rows={
        "AdaSDE": _row(_AMED_NFES, (18.51, 6.90, 5.26, 4.59)),
        "AMED-Solver": _row(_AMED_NFES, (38.10, 10.74, 6.66, 5.44)),
    },
)

PAPER_TABLES: dict[str, PaperTable] = {
    t.key: t
    for t in (
        DEIS_CIFAR10,
        AMED_CIFAR10,
        DEIS_TAB3_CIFAR10_DIFFSOLVERS,
        ERSDE_CIFAR10,
        AMED_IMAGENET64,
        DEIS_TAB3_IMAGENET64_DIFFSOLVERS,
        ERSDE_IMAGENET64,
        EPD_CIFAR10,
        EPD_IMAGENET64,
        ADASDE_CIFAR10,
        ADASDE_IMAGENET64,
    )
}
