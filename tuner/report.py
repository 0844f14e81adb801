"""The best-config report of a run directory: collect the raw files, then render.

Raw files (written by the search, docs/CONTRACTS.md): ``spec.json``, ``space.json``,
``trials.json``, ``final.json`` (optional: a run stopped before the final evaluation still
renders, without test numbers), ``timing.json`` (``wall_seconds``).

:func:`collect` reads them into :class:`ReportData`; :func:`render_markdown` and
:func:`to_json` render it; :func:`write_report` writes ``report.md``, ``summary.json``,
``best_config.json`` (accepted by ``python -m tuner evaluate --params``), ``trials.csv`` and the
plots ``objective.png``, ``pareto.png`` and ``importance.png``. Rendering twice gives the same
files.

Conventions: metrics are percent; "mean ± std" is over the final seeds with the sample standard
deviation (ddof 1; 0 for a single seed); the test score of a configuration is the objective
computed per seed over the *search* attacks (so it compares with the val score), then
averaged. Held-out attacks appear in every per-attack table, marked.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuner import objective as O
from tuner.errors import UsageError

__all__ = ["ReportData", "Result", "TrialRow", "collect", "render_markdown", "to_json", "write_report"]

RAW_FILES = ("spec.json", "space.json", "trials.json", "final.json", "timing.json")
REQUIRED = ("spec.json", "trials.json")
METRICS = ("acc", "asr", "ra", "der")
FAILED_STATES = ("ERROR", "FAIL", "FAILED")


@dataclass(frozen=True)
class TrialRow:
    """One trial, as the search recorded it."""

    trial_id: str
    params: dict[str, Any]
    state: str
    epochs: int
    score: float | None
    per_attack: dict[str, dict[str, float]]
    diverged: bool
    error: str | None
    seconds: float | None

    @property
    def failed(self) -> bool:
        return self.state.upper() in FAILED_STATES or bool(self.error)

    @property
    def unfinished(self) -> bool:
        return self.state.upper() in ("INCOMPLETE", "RUNNING", "PENDING")

    @property
    def usable(self) -> bool:
        return (not self.failed and not self.unfinished and not self.diverged
                and bool(self.per_attack))


@dataclass(frozen=True)
class Result:
    """A configuration's final evaluation: per-attack mean and std over seeds, on test."""

    params: dict[str, Any]
    val_score: float | None
    seeds: int
    score: float | None
    score_std: float | None
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]


@dataclass(frozen=True)
class ReportData:
    run_dir: str
    spec: dict[str, Any]
    space: dict[str, Any]
    trials: list[TrialRow]
    best: Result | None
    default: Result | None
    no_defense: dict[str, dict[str, float]]
    wall_seconds: float | None
    git_commit: str | None
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""

    @property
    def objective(self) -> str:
        return str(self.spec.get("objective", "mean"))

    @property
    def attacks(self) -> list[str]:
        return list(self.spec.get("attacks", []))

    @property
    def holdout(self) -> list[str]:
        return list(self.spec.get("holdout_attacks", []))

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.trials)


# ---------------------------------------------------------------------------------------------
# Collect
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise UsageError(f"{path}: missing: expected a run directory written by "
                             f"'python -m tuner' (holding {', '.join(REQUIRED)})")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable JSON ({exc}): expected the file the search wrote") from None


def _trial(raw: Any, where: Path) -> TrialRow:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: trial entry {raw!r}: expected an object")
    score = raw.get("score")
    return TrialRow(
        trial_id=str(raw.get("trial_id", "")),
        params=dict(raw.get("params") or {}),
        state=str(raw.get("state") or ""),
        epochs=int(raw.get("epochs") or 0),
        score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
        per_attack={a: dict(m) for a, m in (raw.get("per_attack") or {}).items()},
        diverged=bool(raw.get("diverged")),
        error=str(raw["error"]) if raw.get("error") else None,
        seconds=float(raw["seconds"]) if isinstance(raw.get("seconds"), (int, float)) else None,
    )


def _after(per_attack: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Accept either {attack: metrics} or run_config's {attack: {"after": metrics, ...}}."""
    return {a: dict(m["after"] if "after" in m else m) for a, m in per_attack.items()}


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _result(raw: dict[str, Any] | None, attacks: list[str], objective: str) -> Result | None:
    if not raw:
        return None
    seeds = [_after(s) for s in raw.get("seeds") or []]
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for a in sorted({a for s in seeds for a in s}):
        for k in METRICS:
            vals = [float(s[a][k]) for s in seeds if a in s and k in s[a]]
            if vals:
                mean.setdefault(a, {})[k], std.setdefault(a, {})[k] = _stats(vals)
    scores = [O.score({a: s[a] for a in attacks if a in s} or s, objective) for s in seeds if s]
    score, score_std = _stats(scores) if scores else (None, None)
    val = raw.get("val_score")
    return Result(dict(raw.get("params") or {}), float(val) if val is not None else None,
                  len(seeds), score, score_std, mean, std)


def _no_defense(final: dict[str, Any]) -> dict[str, dict[str, float]]:
    raw = final.get("no_defense") or {}
    raw = raw.get("per_attack", raw)
    if not raw:  # fall back on the "before" numbers run_config records
        for part in ("best", "default"):
            for seed in (final.get(part) or {}).get("seeds") or []:
                raw = {a: m["before"] for a, m in seed.items() if isinstance(m, dict) and "before" in m}
                if raw:
                    break
            if raw:
                break
    return {a: {k: float(m[k]) for k in ("acc", "asr", "ra") if k in m} for a, m in raw.items()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def collect(run_dir: str | Path) -> ReportData:
    """Read a run directory's raw files into :class:`ReportData` (raises UsageError)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory: expected a run directory written by 'python -m tuner'")
    raw = {name: _read_json(root / name, name in REQUIRED) for name in RAW_FILES}
    spec, trials_raw = raw["spec.json"], raw["trials.json"]
    if not isinstance(spec, dict) or "defense" not in spec:
        raise UsageError(f"{root / 'spec.json'}: expected an object with a 'defense' key")
    if not isinstance(trials_raw, list):
        raise UsageError(f"{root / 'trials.json'}: expected a list of trials")
    trials = [_trial(t, root / "trials.json") for t in trials_raw]
    final = raw["final.json"] or {}
    if isinstance(final.get("poison_rates"), dict):
        spec = {**spec, "poison_rates": final["poison_rates"]}
    objective = str(spec.get("objective", "mean"))
    attacks = list(spec.get("attacks", []))
    best = _result(final.get("best"), attacks, objective) or _best_from_trials(trials, objective)
    timing = raw["timing.json"] or {}
    space = raw["space.json"] or {}
    imps, note = _importances(trials, space)
    return ReportData(str(root), spec, space, trials, best,
                      _result(final.get("default"), attacks, objective), _no_defense(final),
                      _float(timing.get("wall_seconds")), _git_commit(), imps, note)


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def _best_from_trials(trials: list[TrialRow], objective: str) -> Result | None:
    rows = [t.__dict__ for t in trials if t.usable]
    best = O.select_best(rows, objective)
    if best is None:
        return None
    return Result(dict(best["params"]), O.score(best["per_attack"], objective), 0, None, None, {}, {})


def _importances(trials: list[TrialRow], space: dict[str, Any]) -> tuple[dict[str, float], str]:
    """fANOVA importances of the params for the score, on a study rebuilt in memory."""
    import optuna

    from tuner.spaces import space_from_json

    dists = space_from_json(space).distributions if space.get("params") else {}
    done = [t for t in trials if not t.failed and not t.unfinished and t.score is not None]
    if not dists or len(done) < 2:
        return {}, "not computed: needs the search space and at least 2 finished trials"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in done:
        params = {k: v for k, v in t.params.items() if k in dists}
        try:
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, value=t.score))
        except ValueError:
            continue  # e.g. a default point outside a narrowed range
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        imps = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {}, f"not computed: {exc}"
    clean = {k: float(v) for k, v in imps.items() if math.isfinite(v)}
    return clean, "" if clean else "not computed: no parameter varied"


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def _result_json(r: Result | None) -> dict[str, Any] | None:
    if r is None:
        return None
    test = None
    if r.seeds:
        test = {"score": r.score, "score_std": r.score_std, "per_attack": r.mean}
    return {"params": r.params, "val_score": r.val_score, "test": test}


def to_json(data: ReportData) -> dict[str, Any]:
    """``summary.json``: the keys the issue names, means in percent."""
    s = data.spec
    return {
        "defense": s.get("defense"),
        "dataset": s.get("dataset"),
        "arch": s.get("arch"),
        "attacks": data.attacks,
        "holdout_attacks": data.holdout,
        "objective": data.objective,
        "num_trials": len(data.trials),
        "failed_trials": data.failed,
        "wall_seconds": data.wall_seconds,
        "best": _result_json(data.best),
        "default": _result_json(data.default),
        "no_defense": {"per_attack": data.no_defense},
    }


def best_config(data: ReportData) -> dict[str, Any]:
    """``best_config.json``: ``{"params": {...}, ...}``, accepted by ``evaluate --params``."""
    s = data.spec
    best = data.best
    return {
        "defense": s.get("defense"), "dataset": s.get("dataset"), "arch": s.get("arch"),
        "objective": data.objective,
        "params": best.params if best else {},
        "val_score": best.val_score if best else None,
        "test_score": best.score if best else None,
    }


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3g}"


def _pm(r: Result | None, attack: str, k: str) -> str:
    if r is None or attack not in r.mean or k not in r.mean[attack]:
        return "n/a"
    return f"{r.mean[attack][k]:.1f} ± {r.std[attack][k]:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _rates(s: dict[str, Any]) -> str:
    """The poison rate: the user's, or the default with the attacks whose rate differs from it."""
    if s.get("poison_rate") is not None:
        return _fmt(s["poison_rate"])
    rates = {a: r for a, r in (s.get("poison_rates") or {}).items() if r is not None}
    common = max(set(rates.values()), key=list(rates.values()).count, default=None)
    if common is None:
        return "n/a"
    other = ", ".join(f"{a} {r:g}" for a, r in rates.items() if r != common)
    return f"{common:g}" + (f" ({other})" if other else "")


def _md_search(d: ReportData) -> list[str]:
    s = d.spec
    sampler = s.get("sampler") or "TPE (Optuna, through Ray Tune's OptunaSearch)"
    rows = [
        ["defense", str(s.get("defense"))], ["dataset", str(s.get("dataset"))],
        ["model", str(s.get("arch"))], ["search attacks", ", ".join(d.attacks) or "n/a"],
        ["held-out attacks", ", ".join(d.holdout) or "none"],
        ["poison rate", _rates(s)], ["sampler", str(sampler)],
        ["seed", str(s.get("seed", "n/a"))], ["scheduler", str(s.get("scheduler", "n/a"))],
        ["max epochs per trial", str(s.get("max_epochs") or "the defense's own")],
        ["trials", str(len(d.trials))], ["failed trials", str(d.failed)],
        ["diverged trials", str(sum(t.diverged for t in d.trials))],
        ["final seeds", str(d.best.seeds if d.best else "n/a")],
        ["wall time", f"{d.wall_seconds:.1f} s" if d.wall_seconds is not None else "n/a"],
        ["git commit", d.git_commit or "n/a"],
    ]
    return ["## Search", "", *_table(["setting", "value"], rows), ""]


def _md_objective(d: ReportData) -> list[str]:
    return ["## Objective", "", f"`{d.objective}`: {O.describe(d.objective)}.",
            f"A diverged trial scores {O.DIVERGED_SCORE} (pareto: ACC {O.DIVERGED_VALUES[0]}, "
            f"ASR {O.DIVERGED_VALUES[1]}).", ""]


def _md_space(d: ReportData) -> list[str]:
    params = d.space.get("params") or {}
    rows = []
    for name, dist in params.items():
        a = dist.get("attributes", {})
        if "choices" in a:
            desc = "categorical " + ", ".join(str(c) for c in a["choices"])
        else:
            kind = "int" if dist.get("name") == "IntDistribution" else "float"
            desc = f"{kind} [{_fmt(a.get('low'), 4)}, {_fmt(a.get('high'), 4)}]" + (
                " log" if a.get("log") else "")
        rows.append([name, desc, _fmt(d.space.get("default", {}).get(name), 4)])
    out = ["## Search space", "", f"From `{d.space.get('path', 'n/a')}`.", ""]
    out += _table(["param", "distribution", "default point"], rows) if rows else ["n/a"]
    cons = d.space.get("constraints") or []
    if cons:
        out += ["", "Constraints (held by disjoint ranges): " + ", ".join(cons)]
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in params.items())
    return out + ["", "Serialized (Optuna `distribution_to_json`):", "", "```json",
                  "{\n" + body + "\n}", "```", ""]


def _md_best(d: ReportData) -> list[str]:
    if d.best is None:
        return ["## Best configuration", "", "No trial finished without failing or diverging.", ""]
    default = d.default.params if d.default else {}
    names = list(dict.fromkeys([*d.best.params, *default]))
    rows = [[n, _fmt(d.best.params.get(n), 4), _fmt(default.get(n), 4)] for n in names]
    out = ["## Best configuration", "", *_table(["param", "best", "paper default"], rows), ""]
    rows = [[label, _fmt(r.val_score if r else None),
             (f"{r.score:.2f} ± {r.score_std:.2f}" if r and r.score is not None else "n/a")]
            for label, r in (("best", d.best), ("paper default", d.default))]
    return out + _table(["config", "val score", "test score (mean ± std)"], rows) + [""]


def _md_test(d: ReportData) -> list[str]:
    attacks = list(dict.fromkeys([*d.attacks, *d.holdout, *d.no_defense,
                                  *(d.best.mean if d.best else {})]))
    header = ["attack", "no defense ACC/ASR/RA"]
    header += [f"{lab} {k.upper()}" for lab in ("default", "best") for k in METRICS]
    rows = []
    for a in attacks:
        nd = d.no_defense.get(a, {})
        row = [a + (" (held out)" if a in d.holdout else ""),
               " / ".join(_fmt(nd.get(k), 1) for k in ("acc", "asr", "ra")) if nd else "n/a"]
        row += [_pm(r, a, k) for r in (d.default, d.best) for k in METRICS]
        rows.append(row)
    seeds = d.best.seeds if d.best else 0
    return ["## Test results per attack", "",
            f"Percent, mean ± std over {seeds} seed(s), on the test split (never used by the "
            "search). DER 50 = no change.", "", *_table(header, rows), ""]


def _md_trials(d: ReportData) -> list[str]:
    ranked = sorted((t for t in d.trials if t.score is not None and not t.failed),
                    key=lambda t: -t.score)[:10]  # type: ignore[operator]
    names = list(dict.fromkeys(k for t in ranked for k in t.params))
    rows = [[t.trial_id, _fmt(t.score), str(t.epochs), "yes" if t.diverged else "no",
             *[_fmt(t.params.get(n), 4) for n in names]] for t in ranked]
    out = ["## Top-10 trials (val)", "",
           *_table(["trial", "score", "epochs run", "diverged", *names], rows), ""]
    failed = [t for t in d.trials if t.failed]
    if failed:
        out += ["Failed trials:", ""] + [f"- `{t.trial_id}`: {t.error or t.state}" for t in failed]
        out.append("")
    return out


def _md_importance(d: ReportData) -> list[str]:
    if not d.importances:
        return ["## Parameter importances", "", d.importance_note or "not computed", ""]
    rows = [[k, f"{v:.3f}"] for k, v in d.importances.items()]
    return ["## Parameter importances", "", "fANOVA (Optuna) on the trials' val scores.", "",
            *_table(["param", "importance"], rows), ""]


PLOTS = {"objective.png": "Objective over trials", "pareto.png": "Mean ACC against mean ASR",
         "importance.png": "Parameter importances"}


def render_markdown(data: ReportData) -> str:
    s = data.spec
    lines = [f"# Best-config report: {s.get('defense')} on {s.get('dataset')} ({s.get('arch')})", ""]
    for part in (_md_search, _md_objective, _md_space, _md_best, _md_test, _md_trials,
                 _md_importance):
        lines += part(data)
    lines += ["## Plots", ""] + [f"![{title}]({name})" for name, title in PLOTS.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CSV and plots
# ---------------------------------------------------------------------------------------------


def write_csv(data: ReportData, path: Path) -> None:
    names = list(dict.fromkeys(k for t in data.trials for k in t.params))
    attacks = list(dict.fromkeys(a for t in data.trials for a in t.per_attack))
    header = ["trial_id", "state", "epochs", "score", "diverged", "error", "seconds"]
    header += [f"param_{n}" for n in names] + [f"{a}_{k}" for a in attacks for k in METRICS]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for t in data.trials:
            row = [t.trial_id, t.state, t.epochs, "" if t.score is None else t.score, t.diverged,
                   t.error or "", "" if t.seconds is None else t.seconds]
            row += [t.params.get(n, "") for n in names]
            row += [t.per_attack.get(a, {}).get(k, "") for a in attacks for k in METRICS]
            w.writerow(row)


def _figure(width: float = 6.4, height: float = 4.2) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_objective(data: ReportData, path: Path) -> None:
    """Score of every trial in run order, diverged ones marked, with the running best."""
    fig = _figure()
    ax = fig.add_subplot()
    xs, ys, best, running = [], [], [], -math.inf
    for i, t in enumerate(data.trials, 1):
        if t.score is None or t.failed:
            continue
        xs.append(i)
        ys.append(t.score)
        running = max(running, t.score) if not t.diverged else running
        best.append(running if math.isfinite(running) else float("nan"))
    ok = [(x, y) for x, y, t in zip(xs, ys, _scored(data)) if not t.diverged]
    bad = [(x, y) for x, y, t in zip(xs, ys, _scored(data)) if t.diverged]
    if ok:
        ax.scatter(*zip(*ok), label="trial", color="tab:blue", zorder=3)
    if bad:
        ax.scatter(*zip(*bad), label="diverged (sentinel score)", color="tab:red", marker="x",
                   zorder=3)
    if xs:
        ax.step(xs, best, where="post", color="tab:orange", label="running best")
    for i, t in enumerate(data.trials, 1):
        if t.failed:
            ax.axvline(i, color="0.7", linestyle=":", label="failed trial" if i == _first_failed(data) else None)
    ax.set_xlabel("trial (run order)")
    ax.set_ylabel(f"score ({data.objective}), percentage points")
    ax.set_title(f"{data.spec.get('defense')}: objective '{data.objective}' on val")
    ax.grid(alpha=0.3)
    if xs or data.failed:
        ax.legend(loc="best")
    _save(fig, path)


def _scored(data: ReportData) -> list[TrialRow]:
    return [t for t in data.trials if t.score is not None and not t.failed]


def _first_failed(data: ReportData) -> int:
    return next(i for i, t in enumerate(data.trials, 1) if t.failed)


def _mean_acc_asr(t: TrialRow) -> tuple[float, float]:
    acc, asr = O.values(t.per_attack, "pareto")
    return acc, asr


def plot_pareto(data: ReportData, path: Path) -> None:
    """Mean ACC against mean ASR for every finished trial; the Pareto front highlighted."""
    fig = _figure()
    ax = fig.add_subplot()
    pts = [(_mean_acc_asr(t), t) for t in data.trials if t.usable]
    if pts:
        xy = [p for p, _ in pts]
        ax.scatter([p[1] for p in xy], [p[0] for p in xy], color="tab:blue", label="trial")
        front = sorted((xy[i] for i in O.pareto_front(xy)), key=lambda p: p[1])
        ax.plot([p[1] for p in front], [p[0] for p in front], "o-", color="tab:red",
                label="Pareto front (ACC up, ASR down)")
    if data.best and data.best.mean:
        pa = {a: m for a, m in data.best.mean.items() if a in data.attacks} or data.best.mean
        acc, asr = O.values(pa, "pareto")
        ax.scatter([asr], [acc], marker="*", s=250, color="gold", edgecolor="k", zorder=4,
                   label="best config (test)")
    ax.set_xlabel("mean ASR over search attacks (%), lower is better")
    ax.set_ylabel("mean ACC (%), higher is better")
    ax.set_title(f"{data.spec.get('defense')}: accuracy against attack success (val)")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(loc="best")
    else:
        ax.text(0.5, 0.5, "no finished trial", ha="center", va="center", transform=ax.transAxes)
    _save(fig, path)


def plot_importance(data: ReportData, path: Path) -> None:
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
    ax.set_title(f"{data.spec.get('defense')}: parameter importances for the score")
    _save(fig, path)


def write_report(run_dir: str | Path) -> Path:
    """Collect and render everything into ``run_dir``; returns the path of ``report.md``."""
    data = collect(run_dir)
    root = Path(run_dir)
    (root / "summary.json").write_text(json.dumps(to_json(data), indent=2) + "\n", encoding="utf-8")
    (root / "best_config.json").write_text(json.dumps(best_config(data), indent=2) + "\n",
                                           encoding="utf-8")
    write_csv(data, root / "trials.csv")
    plot_objective(data, root / "objective.png")
    plot_pareto(data, root / "pareto.png")
    plot_importance(data, root / "importance.png")
    out = root / "report.md"
    out.write_text(render_markdown(data), encoding="utf-8")
    return out
