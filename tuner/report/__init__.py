"""The best-config report of a run directory: collect the raw files, then render.

:func:`collect` reads and checks them into :class:`ReportData` (``collect.py``); renderers
turn it into ``report.md`` and the console summary (``markdown.py``), ``summary.json``,
``best_config.json`` and ``trials.csv`` (``tables.py``) and the PNG plots (``plots.py``).
:func:`write_report` writes them all, atomically and never through a link. Rendering twice
gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner._io import write_bytes, write_text
from tuner.report import plots, tables
from tuner.report.collect import ReportData, Result, collect
from tuner.report.markdown import render_console, render_markdown

__all__ = ["OUTPUTS", "ReportData", "Result", "collect", "render_console", "render_markdown",
           "write_report"]

OUTPUTS = ("summary.json", "best_config.json", "trials.csv", "objective.png", "pareto.png",
           "importance.png", "report.md")


def write_report(run_dir: str | Path, **overrides: Any) -> Path:
    """Collect and render everything into ``run_dir``; returns the path of ``report.md``.
    ``overrides``: report settings replacing the run's own (see :func:`collect`)."""
    data = collect(run_dir, **overrides)
    root = Path(run_dir)
    write_text(root / "summary.json", json.dumps(tables.summary(data), indent=2) + "\n")
    write_text(root / "best_config.json", json.dumps(tables.best_config(data), indent=2) + "\n")
    write_text(root / "trials.csv", tables.trials_csv(data))
    write_bytes(root / "objective.png", plots.objective_png(data))
    write_bytes(root / "pareto.png", plots.pareto_png(data))
    write_bytes(root / "importance.png", plots.importance_png(data))
    write_text(root / "report.md", render_markdown(data))
    return root / "report.md"


def console_summary(run_dir: str | Path) -> str:
    """The console's end-of-run summary of a run directory."""
    return render_console(collect(run_dir))
