"""Render: the report's PNG plots from :class:`ReportData` (matplotlib, no pyplot)."""

from __future__ import annotations

import io
import math
from typing import Any

from tuner import objective as O
from tuner.report.collect import ReportData

__all__ = ["importance_png", "objective_png", "pareto_png"]


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend switch); imported
    here, as only the report draws (0.5 s less for every other command)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def objective_png(data: ReportData) -> bytes:
    """Score of every trial by trial number, diverged ones marked, with the running best."""
    fig = _figure()
    ax = fig.add_subplot()
    running, best = -math.inf, []
    for t in data.trials:
        if t.finished and t.score is not None:
            running = max(running, t.score)
        best.append((t.number, running if math.isfinite(running) else float("nan")))
    groups = {"complete": ("trial (all epochs)", "tab:blue", "o"),
              "pruned": ("stopped early by ASHA", "0.6", "o"),
              "diverged": ("diverged (sentinel score)", "tab:red", "x")}
    for state, (label, color, marker) in groups.items():
        pts = [(t.number, t.score) for t in data.trials if t.state == state and t.score is not None]
        if pts:
            ax.scatter(*zip(*pts), label=label, color=color, marker=marker, zorder=3)
    if best:
        ax.step(*zip(*best), where="post", color="tab:orange", label="running best (all epochs)")
    for i, t in enumerate(t for t in data.trials if t.failed):
        ax.axvline(t.number, color="0.7", linestyle=":", label="failed trial" if i == 0 else None)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"score ({data.objective}), percentage points")
    ax.set_title(f"{data.spec.defense}: objective '{data.objective}' on val")
    ax.grid(alpha=0.3)
    if data.trials:
        ax.legend(loc="best")
    return _png(fig)


def pareto_png(data: ReportData) -> bytes:
    """Mean ACC against mean ASR (val) of the trials that ran all their epochs; Pareto front."""
    fig = _figure()
    ax = fig.add_subplot()
    pts = [(O.values(t.per_attack, "pareto"), t) for t in data.trials if t.finished]
    if pts:
        xy = [p for p, _ in pts]
        ax.scatter([p[1] for p in xy], [p[0] for p in xy], color="tab:blue", label="trial")
        front = sorted((xy[i] for i in O.pareto_front(xy)), key=lambda p: p[1])
        ax.plot([p[1] for p in front], [p[0] for p in front], "o-", color="tab:red",
                label="Pareto front (ACC up, ASR down)")
    ax.set_xlabel("mean ASR over search attacks (%), lower is better")
    ax.set_ylabel("mean ACC (%), higher is better")
    ax.set_title(f"{data.spec.defense}: accuracy against attack success (val)")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no trial ran all its epochs", ha="center", va="center",
                transform=ax.transAxes)
    return _png(fig)


def importance_png(data: ReportData) -> bytes:
    """Horizontal bars of fANOVA importances (or the reason they are missing)."""
    fig = _figure(6.4, 0.5 + 0.45 * max(3, len(data.importances)))
    ax = fig.add_subplot()
    if data.importances:
        names = list(data.importances)[::-1]
        ax.barh(names, [data.importances[n] for n in names], color="tab:green")
        ax.set_xlim(0, 1)
    else:
        ax.text(0.5, 0.5, data.importance_note or "not computed", ha="center", va="center",
                wrap=True, transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlabel("importance (fANOVA share of score variance, sums to 1)")
    ax.set_title(f"{data.spec.defense}: parameter importances for the score")
    return _png(fig)
