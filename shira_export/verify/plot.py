"""Histogram of |candidate - reference| per adapter (matplotlib optional: skipped without it)."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from shira_export._io import atomic_path
from shira_export.verify.report import VerifyReport

__all__ = ["write_histograms", "have_matplotlib"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_histograms(report: VerifyReport, folder: Union[str, Path]) -> list[Path]:
    """One PNG per adapter, `parity_hist_<adapter>.png`; [] when matplotlib is missing."""
    if not have_matplotlib() or not report.samples:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display in CI
    import matplotlib.pyplot as plt

    folder = Path(folder)
    written = []
    adapters = dict.fromkeys(adapter for adapter, _ in report.samples)
    for adapter in adapters:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (name, output), diffs in report.samples.items():
            if name != adapter or diffs.size == 0:
                continue
            # log10 of the difference; exact zeros shown at the floor
            ax.hist(np.log10(np.maximum(diffs, 1e-12)), bins=60, alpha=0.6, label=output)
        atol = report.profile.get("atol")
        if atol:
            ax.axvline(np.log10(atol), color="red", linestyle="--", label=f"atol {atol:g}")
        ax.set_xlabel("log10 |candidate - reference|")
        ax.set_ylabel("count")
        ax.set_title(f"{adapter}: {report.verdict}")
        ax.legend()
        fig.tight_layout()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in adapter)
        path = folder / f"parity_hist_{safe}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        written.append(path)
    return written
