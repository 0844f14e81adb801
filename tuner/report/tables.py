"""Render: ``summary.json``, ``best_config.json`` and ``trials.csv`` from :class:`ReportData`."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

from tuner.records import METRICS
from tuner.report.collect import ReportData, Result

__all__ = ["best_config", "cost", "summary", "trials_csv"]


def _result(r: Result | None) -> dict[str, Any] | None:
    if r is None:
        return None
    test = None
    if r.runs:
        test = {"score": r.score, "score_std": r.score_std, "score_ci95": r.score_ci,
                "runs": r.runs, "per_attack": r.mean, "per_attack_std": r.std}
    return {"params": r.params, "trial": r.trial, "val_score": r.val_score, "test": test}


def cost(d: ReportData) -> dict[str, Any]:
    """What the run spent: its trials (count, epochs, wall, CPU and device seconds, peak GPU
    memory), the final evaluations, the victims it built, the whole run's wall time."""
    t = d.timing
    return {"trials": len(d.trials), "epochs": sum(x.epochs for x in d.trials),
            "trial_seconds": sum(x.seconds for x in d.trials),
            "trial_cpu_seconds": sum(x.cpu_seconds or 0.0 for x in d.trials),
            "device_seconds": sum(x.device_seconds or 0.0 for x in d.trials),
            "gpu_peak_mb": max((x.gpu_peak_mb for x in d.trials if x.gpu_peak_mb), default=None),
            "search_seconds": t.get("search_seconds"), "final_seconds": t.get("final_seconds"),
            "final_cpu_seconds": t.get("final_cpu_seconds"),
            "victims_built": None if t.get("victims_built") is None else int(t["victims_built"]),
            "victims_seconds": t.get("victims_seconds"),
            "wall_seconds": t.get("wall_seconds")}


def summary(d: ReportData) -> dict[str, Any]:
    """``summary.json``: the run's settings and results, means in percent."""
    s = d.spec
    return {
        "defense": s.defense, "dataset": s.zoo.dataset, "arch": s.zoo.arch,
        "attacks": d.attacks, "holdout_attacks": d.holdout, "objective": d.objective,
        "num_trials": len(d.trials), "failed_trials": d.failed, "trial_seeds": s.trial_seeds,
        "trial_states": {st: sum(t.state == st for t in d.trials)
                         for st in dict.fromkeys(t.state for t in d.trials)},
        "wall_seconds": d.timing.get("wall_seconds"), "cost": cost(d),
        "provenance": d.provenance,
        "verdict": None if d.verdict is None else {
            **dataclasses.asdict(d.verdict),
            "attacks": {r.attack: dataclasses.asdict(r) for r in d.verdict.attacks}},
        "warnings": d.warnings,
        "budget": None if d.budget is None else dataclasses.asdict(d.budget),
        "best": _result(d.best), "default": _result(d.default),
        "no_defense": {"per_attack": d.no_defense, "per_attack_std": d.no_defense_std},
        "sequela_anchors": d.anchors, "test_sizes": d.sizes,
        "importances": d.importances,
    }


def best_config(d: ReportData) -> dict[str, Any]:
    """``best_config.json``: names the defense, holds ``params``; ``evaluate --params`` and
    ``purify --params`` take it as is."""
    best = d.best
    return {
        "defense": d.spec.defense, "dataset": d.spec.zoo.dataset, "arch": d.spec.zoo.arch,
        "objective": d.objective, "params": best.params if best else {},
        "trial": best.trial if best else None,
        "val_score": best.val_score if best else None,
        "test_score": best.score if best else None,
        "run": str(d.spec.name), "git_commit": d.provenance.get("git_commit"),
    }


def trials_csv(d: ReportData) -> str:
    """One row per trial, numbered as Optuna numbers them; params and last val metrics."""
    names = list(dict.fromkeys(k for t in d.trials for k in t.params))
    attacks = list(dict.fromkeys(a for t in d.trials for a in t.per_attack))
    header = ["trial", "state", "epochs", "score", "score_std", "seed_scores", "acc_drop",
              "diverged", "error", "seconds", "cpu_seconds", "device_seconds", "gpu_peak_mb",
              "trial_id"]
    header += [f"param_{n}" for n in names] + [f"{a}_{k}" for a in attacks for k in METRICS]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for t in d.trials:
        row = [t.number, t.state, t.epochs, "" if t.score is None else t.score,
               "" if t.score_std is None else t.score_std,
               ";".join(f"{v:.4g}" for v in t.seed_scores),
               "" if t.acc_drop is None else t.acc_drop, t.diverged,
               t.error or "", t.seconds, *["" if v is None else v for v in (
                   t.cpu_seconds, t.device_seconds, t.gpu_peak_mb)], t.trial_id]
        row += [t.params.get(n, "") for n in names]
        row += [t.per_attack.get(a, {}).get(k, "") for a in attacks for k in METRICS]
        w.writerow(row)
    return out.getvalue()
