"""Render: the report's PNG plots from :class:`ReportData` (matplotlib, no pyplot)."""

from __future__ import annotations

import io
import math
import statistics
from typing import Any

from tuner import objective as O
from tuner.report.collect import ReportData, Result

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


def _test_point(r: Result, attacks: list[str]) -> tuple[float, float, float, float]:
    """(mean ASR, mean ACC, std ASR, std ACC) over a result's runs, search attacks only."""
    keys = [a for a in attacks if a in r.mean]
    mean = {k: statistics.fmean(r.mean[a][k] for a in keys) for k in ("acc", "asr")}
    std = {k: statistics.fmean(r.std.get(a, {}).get(k, 0.0) for a in keys) for k in ("acc", "asr")}
    return mean["asr"], mean["acc"], std["asr"], std["acc"]


def pareto_png(data: ReportData) -> bytes:
    """Left, val: mean ACC against mean ASR of the trials that ran all their epochs, their
    Pareto front, the paper default's trial and the undefended victims. Right, test: the
    undefended victims, the paper default and the best configuration (mean ± std over runs)."""
    fig = _figure(11.0, 4.4)
    val, test = fig.subplots(1, 2)
    pts = [(O.values(t.per_attack, "pareto"), t) for t in data.trials if t.finished]
    if pts:
        xy = [p for p, _ in pts]
        val.scatter([p[1] for p in xy], [p[0] for p in xy], color="tab:blue", alpha=0.7,
                    label="trial (all epochs)")
        front = sorted((xy[i] for i in O.pareto_front(xy)), key=lambda p: p[1])
        # A step: between two front points nothing better was found (no interpolation).
        val.plot([p[1] for p in front], [p[0] for p in front], "-", color="tab:blue", alpha=0.5,
                 drawstyle="steps-post", label="Pareto front (ACC up, ASR down)")
        default = [p for p, t in pts if data.default and t.params == data.default.params]
        if default:
            val.scatter([default[0][1]], [default[0][0]], marker="s", s=90, color="tab:orange",
                        edgecolor="k", zorder=4, label="paper default (trial 0)")
    nd_val = {a: m for a, m in data.no_defense_val.items() if a in data.attacks}
    if nd_val:
        acc, asr = O.values(nd_val, "pareto")
        val.scatter([asr], [acc], marker="X", s=110, color="tab:red", edgecolor="k", zorder=4,
                    label="no defense")
    val.set_title("val: the search's trials")
    refs = [("no defense", "tab:red", "X", _nd_result(data)),
            ("paper default", "tab:orange", "s", data.default),
            ("best found", "tab:green", "*", data.best)]
    shown = False
    for label, color, marker, r in refs:
        if r is None or not r.runs or not any(a in r.mean for a in data.attacks):
            continue
        x, y, sx, sy = _test_point(r, data.attacks)
        test.errorbar([x], [y], xerr=[sx], yerr=[sy], fmt=marker, ms=12, color=color,
                      mec="k", capsize=4, label=f"{label} ({r.runs} run(s))")
        shown = True
    test.set_title("test: final evaluation (mean ± std over runs)")
    for ax in (val, test):
        ax.set_xlabel("mean ASR over search attacks (%), lower is better")
        ax.set_ylabel("mean ACC (%), higher is better")
        ax.set_xlim(-3, 103)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    if not pts:
        val.text(0.5, 0.5, "no trial ran all its epochs", ha="center", va="center",
                 transform=val.transAxes)
    if not shown:
        test.text(0.5, 0.5, "no final evaluation", ha="center", va="center",
                  transform=test.transAxes)
    fig.suptitle(f"{data.spec.defense}: accuracy against attack success")
    return _png(fig)


def _nd_result(data: ReportData) -> Result | None:
    if not data.no_defense:
        return None
    victim_seeds = len({v for v, _ in data.best.seeds}) if data.best and data.best.seeds else 1
    return Result({}, None, None, victim_seeds, None, None, None, data.no_defense,
                  data.no_defense_std)


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
