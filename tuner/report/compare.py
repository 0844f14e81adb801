"""The comparison report of ``python -m tuner compare``: collect each defense's run folder
(:func:`tuner.report.collect`), then render ``compare.md``, ``compare.json`` and
``compare.png`` into the comparison's folder.

The ranking is by the tuned configuration's test score under the searches' objective (mean
over the final runs, search attacks only), so it compares with what each search maximized on
val; each row carries what the search cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner import objective as O
from tuner._io import read_json, write_bytes, write_text
from tuner.errors import UsageError
from tuner.records import METRICS
from tuner.report.collect import ReportData, Result, collect
from tuner.report.markdown import _pm, _pm_ci, fmt, table, text
from tuner.report.plots import _figure, _nd_result, _png, _test_point
from tuner.report.tables import cost

__all__ = ["CompareData", "collect_compare", "compare_json", "compare_png", "render_compare",
           "write_compare"]

SPEC_FILE = "compare_spec.json"


@dataclass(frozen=True)
class CompareData:
    root: Path
    runs: list[ReportData]  #: one per defense searched to its end, in --defenses order
    missing: list[str]  #: defenses without a finished search (no final.json yet)
    stored: dict[str, Any]  #: compare_spec.json

    @property
    def ranked(self) -> list[ReportData]:
        """By tuned test score, highest first; runs without a test score last."""
        return sorted(self.runs, key=lambda d: (d.best is None or d.best.score is None,
                                                -(d.best.score or 0.0) if d.best else 0.0))


def collect_compare(root: str | Path) -> CompareData:
    """Read a comparison folder: ``compare_spec.json`` and each defense's run folder."""
    root = Path(root)
    if not (root / SPEC_FILE).is_file():
        raise UsageError(f"{root}: no {SPEC_FILE}: expected a folder written by "
                         "'python -m tuner compare'")
    stored = read_json(root / SPEC_FILE)
    names = stored.get("defenses") if isinstance(stored, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{root / SPEC_FILE}: defenses: expected a list of names")
    runs, missing = [], []
    for name in names:
        run = root / Path(name).name
        if (run / "final.json").is_file():
            runs.append(collect(run))
        else:
            missing.append(name)
    return CompareData(root, runs, missing, stored)


# -- compare.json -----------------------------------------------------------------------------
def _test(r: Result | None, attacks: list[str]) -> dict[str, Any] | None:
    if r is None or not r.runs:
        return None
    asr, acc, _, _ = _test_point(r, attacks)
    return {"params": r.params, "trial": r.trial, "val_score": r.val_score, "score": r.score,
            "score_std": r.score_std, "score_ci95": r.score_ci, "runs": r.runs,
            "mean_acc": acc, "mean_asr": asr, "per_attack": r.mean, "per_attack_std": r.std}


def compare_json(c: CompareData) -> dict[str, Any]:
    return {
        "protocol": protocol(c),
        "ranking": [{"rank": i + 1, "defense": d.spec.defense, "run": d.spec.defense,
                     "tuned": _test(d.best, d.attacks), "default": _test(d.default, d.attacks),
                     "no_defense": {"per_attack": d.no_defense},
                     "budget": None if d.budget is None else {
                         "feasible": d.budget.feasible, "measured": d.budget.measured,
                         "best_feasible": d.budget.best_feasible},
                     "cost": cost(d)} for i, d in enumerate(c.ranked)],
        "missing": c.missing,
    }


def protocol(c: CompareData) -> dict[str, Any]:
    """The settings every search shared (the first run's spec stands for all)."""
    if not c.runs:
        return {}
    d = c.runs[0]
    s = d.spec
    return {"dataset": s.zoo.dataset, "arch": s.zoo.arch, "attacks": d.attacks,
            "holdout_attacks": d.holdout, "clean_ratio": s.zoo.clean_ratio,
            "seed": s.seed, "final_seeds": s.final_seeds, "victim_seeds": s.victim_seeds,
            "trial_seeds": s.trial_seeds, "objective": s.objective,
            "objective_text": O.describe(s.objective),
            "budget_trials": c.stored.get("budget_trials"),
            "budget_seconds": c.stored.get("budget_seconds"), "max_epochs": s.max_epochs,
            "scheduler": s.scheduler, "max_acc_drop": s.max_acc_drop, "sizes": d.sizes,
            "git_commit": d.provenance.get("git_commit")}


# -- compare.md -------------------------------------------------------------------------------
def _md_protocol(c: CompareData) -> list[str]:
    p = protocol(c)
    if not p:
        return ["## Protocol", "", "No defense has finished its search yet.", ""]
    sizes = p["sizes"] or {}
    budget = (f"{p['budget_seconds']:g} s of search wall time (at most {p['budget_trials']} "
              "trials)" if p["budget_seconds"] else f"{p['budget_trials']} trials")
    clean = (f"clean ratio {p['clean_ratio']:g}" if p["clean_ratio"] is not None
             else "the dataset's default clean ratio")
    acc = (f"; configurations losing more than {p['max_acc_drop']:g} points of mean val ACC "
           "are infeasible (an Optuna constraint)" if p["max_acc_drop"] is not None else "")
    return ["## Protocol", "",
            f"Each defense was searched with the same victims ({text(p['dataset'])}, "
            f"{text(p['arch'])}; search attacks {text(', '.join(p['attacks']))}; held out "
            f"{text(', '.join(p['holdout_attacks']) or 'none')}), the same defender data "
            f"({clean} of the training set, class-balanced), the same val/test split "
            f"({sizes.get('val_clean', 'n/a')} / {sizes.get('test_clean', 'n/a')} clean "
            f"images, disjoint halves of the test set; the search sees only val), the same "
            f"seeds (--seed {p['seed']}: split, victims and sampler; {p['trial_seeds']} "
            f"seed(s) per trial) and the same budget per defense: {budget}, "
            f"{text(p['scheduler'])} scheduling, "
            f"{p['max_epochs'] or 'each defense’s own'} epochs at most per trial{acc}. "
            f"Objective `{p['objective']}`: {text(p['objective_text'])}. Test numbers are "
            f"mean ± std over {p['final_seeds']} defense seed(s) x {p['victim_seeds']} "
            f"victim seed(s). Code: {text(p['git_commit'] or 'n/a')}.", ""]


def _md_ranking(c: CompareData) -> list[str]:
    rows = []
    for i, d in enumerate(c.ranked):
        b, df = d.best, d.default
        gain = (f"{b.score - df.score:+.2f}" if b and df and b.score is not None
                and df.score is not None else "n/a")
        acc_asr = (" / ".join(f"{v:.1f}" for v in _test_point(b, d.attacks)[1::-1])
                   if b and b.runs else "n/a")
        k = cost(d)
        feasible = "" if d.budget is None else (
            f" ({d.budget.feasible}/{d.budget.measured} feasible"
            + ("" if d.budget.best_feasible else ", NONE met the budget") + ")")
        rows.append([str(i + 1), text(d.spec.defense) + feasible,
                     _pm_ci(b.score, b.score_std, b.score_ci) if b and b.runs else "n/a",
                     _pm_ci(df.score, df.score_std, df.score_ci) if df and df.runs else "n/a",
                     gain, acc_asr, str(k["trials"]), str(k["epochs"]),
                     f"{k['trial_seconds']:.0f}", f"{k['device_seconds']:.0f}",
                     "n/a" if k["wall_seconds"] is None else f"{k['wall_seconds']:.0f}"])
    nd = _no_defense_line(c)
    missing = ([f"Not finished (run the same command with --resume): "
                f"{text(', '.join(c.missing))}.", ""] if c.missing else [])
    return ["## Ranking", "",
            "By the tuned configuration's test score (the objective over the search attacks, "
            "mean ± std over the final runs, 95% CI); cost is the search's: trials, epochs "
            "run by all trials, trial seconds (sum of trial wall times), device-seconds (CPU "
            "seconds of CPU trials, wall x GPU share of GPU trials), wall seconds (the whole "
            "run, final evaluations included).", "",
            *table(["rank", "defense", "tuned test score", "paper default test score", "gain",
                    "tuned ACC / ASR", "trials", "epochs", "trial s", "device s", "wall s"],
                   rows),
            "", *nd, *missing]


def _no_defense_line(c: CompareData) -> list[str]:
    """The undefended victims on test, the row every defense is measured against."""
    if not c.runs:
        return []
    d = c.runs[0]
    nd = {a: m for a, m in d.no_defense.items() if a in d.attacks}
    if not nd:
        return []
    acc, asr = O.values(nd, "pareto")
    score = O.score({a: {**m, "der": 50.0} for a, m in nd.items()}, d.objective)
    return [f"No defense (the undefended victims, test): mean ACC {acc:.1f}, mean ASR "
            f"{asr:.1f}, score {score:.2f}.", ""]


def _md_defense(d: ReportData) -> list[str]:
    attacks = list(dict.fromkeys([*d.attacks, *d.holdout]))
    rows = []
    for a in attacks:
        nd = d.no_defense.get(a, {})
        row = [text(a) + (" (held out)" if a in d.holdout else ""),
               " / ".join(fmt(nd.get(k), 1) for k in ("acc", "asr", "ra")) if nd else "n/a"]
        row += [" / ".join(_pm(r, a, k) for k in METRICS) for r in (d.default, d.best)]
        rows.append(row)
    params = ", ".join(f"{k}={fmt(v, 4)}" for k, v in (d.best.params if d.best else {}).items())
    return [f"### {text(d.spec.defense)}", "",
            f"Tuned (trial {d.best.trial if d.best else 'n/a'}): {text(params, 400)}. "
            f"Report: [{text(d.spec.defense)}/report.md]({text(d.spec.defense)}/report.md).", "",
            *table(["attack", "no defense ACC / ASR / RA", "paper default ACC / ASR / RA / DER",
                    "tuned ACC / ASR / RA / DER"], rows), ""]


def render_compare(c: CompareData) -> str:
    p = protocol(c)
    title = f" on {text(p['dataset'])} ({text(p['arch'])})" if p else ""
    lines = [f"# Defense comparison{title}", "", *_md_protocol(c), *_md_ranking(c),
             "## Per defense, on test", "",
             "Percent, mean ± std over the final runs; DER 50 = no change.", ""]
    for d in c.runs:
        lines += _md_defense(d)
    lines += ["## Plot", "", "![Mean ACC against mean ASR, paper default to tuned](compare.png)",
              ""]
    return "\n".join(lines)


# -- compare.png ------------------------------------------------------------------------------
def compare_png(c: CompareData) -> bytes:
    """Mean test ACC against mean test ASR (search attacks): per defense an arrow from the
    paper default to the tuned configuration; the undefended victims as a reference."""
    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    nd_done = False
    for i, d in enumerate(c.runs):
        color = colors[i % len(colors)]
        pts = [(_test_point(r, d.attacks)) for r in (d.default, d.best) if r and r.runs]
        if len(pts) == 2:
            (x0, y0, _, _), (x1, y1, sx, sy) = pts
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 1.8})
            ax.scatter([x0], [y0], marker="o", s=40, facecolor="white", edgecolor=color,
                       zorder=3)
            ax.errorbar([x1], [y1], xerr=[sx], yerr=[sy], fmt="o", color=color, ms=7,
                        capsize=3, zorder=4, label=f"{d.spec.defense}")
        nd = _nd_result(d)
        if not nd_done and nd is not None and any(a in nd.mean for a in d.attacks):
            x, y, _, _ = _test_point(nd, d.attacks)
            ax.scatter([x], [y], marker="X", s=110, color="k", zorder=5, label="no defense")
            nd_done = True
    ax.set_xlabel("mean ASR over search attacks (%), lower is better")
    ax.set_ylabel("mean clean ACC (%), higher is better")
    ax.set_xlim(-3, 103)
    ax.grid(alpha=0.3)
    ax.set_title("test: paper default (open circle) -> tuned (filled, ± std)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no finished search", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def write_compare(root: str | Path) -> Path:
    """Collect and render the comparison into ``root``; returns the path of ``compare.md``."""
    c = collect_compare(root)
    root = Path(root)
    write_text(root / "compare.json", json.dumps(compare_json(c), indent=2) + "\n")
    write_bytes(root / "compare.png", compare_png(c))
    write_text(root / "compare.md", render_compare(c))
    return root / "compare.md"
