"""Collect: a run folder's raw files, read and checked, as typed :class:`ReportData`.

Raw files (written by the search): ``spec.json`` (the spec and its provenance),
``space.json``, ``trials.json``, ``final.json`` (optional: a run stopped before the final
evaluation still renders, without test numbers) and ``timing.json`` (optional). Every field is
type-checked as it is read, so a damaged or foreign run folder is refused with one line naming
the file and the field (``tuner.errors.UsageError``), never a traceback.

Conventions: metrics are percent; a configuration's final evaluation is a set of *runs* (one
per victim seed and defense seed); "mean ± std" is over the runs, with the sample standard
deviation (ddof 1; 0 for one run), and the 95% confidence interval of a mean is Student's t
over the runs. The test score of a configuration is the objective computed per run over the
*search* attacks (so it compares with the val score), then averaged.

What the report concludes is computed here too (:class:`Verdict`, :func:`warnings`), so the
Markdown, the console and ``summary.json`` say the same thing.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution
from scipy import stats  # type: ignore[import-untyped]

from tuner import objective as O
from tuner._io import clip, clip_text, read_json
from tuner.errors import UsageError
from tuner.records import METRICS, TrialRecord, pick_best
from tuner.spaces import Space, space_from_json
from tuner.spec import ExperimentSpec
from tuner.study import param_importances, study_from_records

__all__ = ["AttackVerdict", "Budget", "ReportData", "Result", "Verdict", "collect", "mean_ci"]

SEQUELA = ("ra_acc", "ra_asr", "mia_before", "mia_after", "mia_change")


def mean_ci(values: list[float]) -> tuple[float, float, float | None]:
    """(mean, sample std, half-width of the 95% Student-t interval of the mean; None for n < 2)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0, None
    sd = statistics.stdev(values)
    return mean, sd, float(stats.t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))


@dataclass(frozen=True)
class Result:
    """A configuration's final evaluation on test: per-attack mean and std over its runs."""

    params: dict[str, Any]
    val_score: float | None
    trial: int | None  #: the trial number it came from (None when not from the search)
    runs: int
    score: float | None
    score_std: float | None
    score_ci: float | None  #: half-width of the 95% interval of the mean score
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    run_scores: list[float] = field(default_factory=list, repr=False)
    seeds: list[tuple[int, int]] = field(default_factory=list, repr=False)  #: (victim, defense)


@dataclass(frozen=True)
class AttackVerdict:
    attack: str
    status: str  #: removed | reduced | still there | removed, too costly | diverged
    asr_before: float
    asr_after: float
    acc_drop: float  #: undefended ACC - defended ACC, percentage points (negative: a gain)
    ra_asr: float | None  #: ASR after the re-tuning attack, when measured


@dataclass(frozen=True)
class Verdict:
    """Did the best configuration remove the backdoor, on test, at an acceptable ACC cost?"""

    headline: str
    attacks: list[AttackVerdict]
    asr_threshold: float
    acc_budget: float
    gain: float | None  #: best minus paper default, mean of the paired per-run score differences
    gain_ci: float | None  #: its 95% half-width (None for one run)


@dataclass(frozen=True)
class Budget:
    """The accuracy budget (``--max-acc-drop``) and how the search met it, on val."""

    max_acc_drop: float  #: percentage points of mean clean val ACC against no defense
    feasible: int  #: trials (complete or pruned) within the budget
    measured: int  #: trials (complete or pruned) with a measured ACC drop
    best_trial: int | None  #: the trial the report calls best
    best_acc_drop: float | None
    best_feasible: bool  #: False: no trial was feasible and the best is the least infeasible


def budget(trials: list[TrialRecord], best: Result | None, max_acc_drop: float | None
           ) -> Budget | None:
    if max_acc_drop is None:
        return None
    done = [t for t in trials if t.usable and t.acc_drop is not None]
    rec = next((t for t in trials if best is not None and t.number == best.trial), None)
    drop = rec.acc_drop if rec is not None else None
    return Budget(float(max_acc_drop), sum(t.feasible(max_acc_drop) for t in done), len(done),
                  None if best is None else best.trial, drop,
                  rec is not None and rec.feasible(max_acc_drop))


@dataclass(frozen=True)
class ReportData:
    run_dir: Path
    spec: ExperimentSpec
    provenance: dict[str, Any]
    space: Space | None
    trials: list[TrialRecord]
    best: Result | None
    default: Result | None
    no_defense: dict[str, dict[str, float]]
    no_defense_std: dict[str, dict[str, float]]
    no_defense_val: dict[str, dict[str, float]]
    poison_rates: dict[str, float | None]
    sizes: dict[str, Any]
    anchors: dict[str, dict[str, float]]
    timing: dict[str, float]
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""
    verdict: Verdict | None = None
    warnings: list[str] = field(default_factory=list)
    archs: dict[str, str] = field(default_factory=dict)  #: each victim's model, when recorded
    budget: Budget | None = None

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def attacks(self) -> list[str]:
        return list(self.spec.attacks)

    @property
    def holdout(self) -> list[str]:
        return list(self.spec.holdout_attacks)

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.trials)

    @property
    def has_sequela(self) -> bool:
        return any("ra_asr" in m for r in (self.best, self.default) if r for m in r.mean.values())


# -- reading -----------------------------------------------------------------------------------
def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{where} = {clip(value, 40)}: expected a finite number")
    return float(value)


def _metrics(raw: Any, where: str, keys: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected an object of metrics")
    return {k: _number(v, f"{where}.{k}") for k, v in raw.items() if k in keys}


def _runs(raw: Any, where: str) -> list[tuple[tuple[int, int], dict[str, dict[str, float]]]]:
    """((victim seed, defense seed), {attack: after metrics + sequela}) per run."""
    if not isinstance(raw, list):
        raise UsageError(f"{where}: expected a list of runs")
    out = []
    for i, run in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(run, dict) or not isinstance(run.get("per_attack"), dict):
            raise UsageError(f"{at}: expected an object with a 'per_attack' object")
        seeds = tuple(int(_number(run.get(k, 0), f"{at}.{k}")) for k in ("victim_seed",
                                                                          "defense_seed"))
        per: dict[str, dict[str, float]] = {}
        for a, m in run["per_attack"].items():
            if not isinstance(m, dict):
                raise UsageError(f"{at}.{clip(a, 30)}: expected an object")
            per[str(a)] = {**_metrics(m.get("after"), f"{at}.{clip(a, 30)}.after", METRICS),
                           **_metrics(m.get("sequela") or {}, f"{at}.{clip(a, 30)}.sequela",
                                      SEQUELA)}
        out.append(((seeds[0], seeds[1]), per))
    return out


def _stats_per_attack(runs: list[dict[str, dict[str, float]]]
                      ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for a in sorted({a for r in runs for a in r}):
        for k in sorted({k for r in runs if a in r for k in r[a]}):
            vals = [r[a][k] for r in runs if a in r and k in r[a]]
            m, sd, _ = mean_ci(vals)
            mean.setdefault(a, {})[k], std.setdefault(a, {})[k] = m, sd
    return mean, std


def _result(raw: Any, attacks: list[str], objective: str, where: str) -> Result | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected an object")
    runs = _runs(raw.get("runs", []), f"{where}.runs")
    per_run = [r for _, r in runs]
    mean, std = _stats_per_attack(per_run)
    scores = [O.score({a: r[a] for a in attacks if a in r} or r, objective) for r in per_run if r]
    score, sd, ci = mean_ci(scores) if scores else (None, None, None)
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise UsageError(f"{where}.params: expected an object")
    val = raw.get("val_score")
    trial = raw.get("trial")
    return Result(dict(params), None if val is None else _number(val, f"{where}.val_score"),
                  trial if isinstance(trial, int) and not isinstance(trial, bool) else None,
                  len(runs), score, sd, ci, mean, std, scores, [s for s, _ in runs])


def _best_from_trials(trials: list[TrialRecord], objective: str,
                      max_acc_drop: float | None) -> Result | None:
    """The best trial's val numbers, for a run stopped before its final evaluation."""
    t = pick_best([t for t in trials if t.usable], objective, max_acc_drop)
    if t is None:
        return None
    return Result(dict(t.params), t.score, t.number, 0, None, None, None, {}, {})


# -- conclusions -------------------------------------------------------------------------------
def verdict(best: Result | None, default: Result | None, no_defense: dict[str, dict[str, float]],
            attacks: list[str], *, asr_threshold: float, acc_budget: float) -> Verdict | None:
    """Per attack (search and held-out) and overall: removed (test ASR below the threshold at
    an ACC drop within the budget), reduced (ASR at most half the undefended one), or not."""
    if best is None or not best.runs:
        return None
    rows = []
    for a in [a for a in best.mean if a in no_defense]:
        m, nd = best.mean[a], no_defense[a]
        drop = nd["acc"] - m["acc"]
        if m["acc"] == 0.0 and m["asr"] == 100.0:
            status = "diverged"
        elif m["asr"] < asr_threshold:
            status = "removed" if drop <= acc_budget else "removed, too costly"
        elif m["asr"] <= nd["asr"] / 2:
            status = "reduced"
        else:
            status = "still there"
        rows.append(AttackVerdict(a, status, nd["asr"], m["asr"], drop, m.get("ra_asr")))
    searched = [r for r in rows if r.attack in attacks]
    removed = [r for r in searched if r.status == "removed"]
    if searched and len(removed) == len(searched):
        headline = f"Backdoor removed on all {len(searched)} search attacks"
    elif removed:
        headline = (f"Backdoor removed on {len(removed)} of {len(searched)} search attacks "
                    f"({', '.join(r.attack for r in removed)}); still there or too costly on "
                    f"the others")
    else:
        headline = f"Backdoor NOT removed: no search attack below {asr_threshold:g}% ASR within " \
                   f"{acc_budget:g} points of ACC"
    held = [r for r in rows if r.attack not in attacks]
    if held:
        headline += f"; held out: {sum(r.status == 'removed' for r in held)} of {len(held)} removed"
    gain = gain_ci = None
    if default is not None and default.seeds == best.seeds and best.run_scores:
        diffs = [b - d for b, d in zip(best.run_scores, default.run_scores, strict=True)]
        gain, _, gain_ci = mean_ci(diffs)
    return Verdict(headline, rows, asr_threshold, acc_budget, gain, gain_ci)


def _edge(value: float, low: float, high: float, log: bool) -> float:
    """Position of ``value`` in [low, high] on the distribution's scale, 0..1."""
    if log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    return (value - low) / (high - low) if high > low else 0.5


def warnings(best: Result | None, space: Space | None, trials: list[TrialRecord],
             importances: dict[str, float], no_defense_val: dict[str, dict[str, float]],
             sizes: dict[str, Any], spec: ExperimentSpec) -> list[str]:
    """What a reader should act on: a best value at the edge of its range, a search that ASHA
    stopped mostly early, a search none of whose trials beat no defense beyond noise."""
    out = []
    if best is not None and space is not None:
        where = f"--space FILE (a copy of {space.path})"
        for name, dist in space.distributions.items():
            value = best.params.get(name)
            if isinstance(dist, CategoricalDistribution) or not isinstance(value, (int, float)):
                continue
            low, high, log = dist.low, dist.high, dist.log  # type: ignore[attr-defined]
            pos = _edge(float(value), low, high, log) if low <= value <= high else None
            if pos is None or 0.05 < pos < 0.95:
                continue
            end = "upper" if pos >= 0.95 else "lower"
            imp = f", importance {importances[name]:.2f}" if name in importances else ""
            out.append(f"The best {name} = {value:.4g} lies at the {end} edge of its range "
                       f"[{low:g}, {high:g}]{imp}: the optimum may lie beyond it. Widen "
                       f"params.{name} in {where} and search again.")
    done = [t for t in trials if t.state in ("complete", "pruned")]
    pruned = sum(t.state == "pruned" for t in done)
    if done and pruned > len(done) / 2:
        out.append(f"ASHA stopped {pruned} of {len(done)} trials early: few configurations ran "
                   "their full epochs, and early scores rank below complete ones. For a fuller "
                   "search use --scheduler fifo, raise --num-samples, or narrow the epochs range.")
    nd = {a: m for a, m in no_defense_val.items() if a in spec.attacks}
    scored = [t.score for t in done if t.score is not None]
    if nd and scored and sizes:
        base = O.score({a: {**m, "der": 50.0} for a, m in nd.items()}, "mean")
        var = []
        for a, m in nd.items():
            n_clean, n_bd = sizes.get("val_clean", 0), sizes.get("val_triggered", {}).get(a, 0)
            if n_clean and n_bd:
                p, q = m["acc"] / 100, m["asr"] / 100
                var.append(1e4 * (p * (1 - p) / n_clean + q * (1 - q) / n_bd))
        noise = 2 * math.sqrt(sum(var) / len(var) ** 2) if var else 0.0
        if spec.objective in ("mean", "robust") and max(scored) - base < max(noise, 1.0):
            out.append(f"No trial scored more than {max(noise, 1.0):.1f} points (the noise of "
                       f"the val sets) above no defense ({base:.1f}) on val: in this space the "
                       "defense does not remove these backdoors. Try another defense "
                       "(python -m tuner compare) or a wider space.")
    return out


# -- collect -----------------------------------------------------------------------------------
def _no_defense(final: dict[str, Any], where: str
                ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    raw = (final.get("no_defense") or {}).get("runs") or []
    if not isinstance(raw, list):
        raise UsageError(f"{where}.no_defense.runs: expected a list")
    runs = []
    for i, run in enumerate(raw):
        per = run.get("per_attack") if isinstance(run, dict) else None
        if not isinstance(per, dict):
            raise UsageError(f"{where}.no_defense.runs[{i}]: expected a 'per_attack' object")
        runs.append({str(a): _metrics(m, f"{where}.no_defense.{clip(a, 30)}",
                                      ("acc", "asr", "ra", "mia")) for a, m in per.items()})
    return _stats_per_attack(runs)


def collect(run_dir: str | Path, **overrides: Any) -> ReportData:
    """Read a run directory's raw files into :class:`ReportData` (raises UsageError).
    ``overrides`` replace the stored spec's report settings (``verdict_asr``,
    ``verdict_acc_drop``) when not None."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory: expected a run directory written by "
                         "'python -m tuner'")

    def optional(name: str) -> Any:
        return read_json(root / name) if (root / name).exists() else None

    for name in ("spec.json", "trials.json"):
        if not (root / name).exists():
            raise UsageError(f"{root / name}: missing: expected a run directory written by "
                             "'python -m tuner' (holding spec.json and trials.json)")
    raw_spec = read_json(root / "spec.json")
    spec = ExperimentSpec.from_dict(raw_spec, where=str(root / "spec.json"))
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        spec = dataclasses.replace(spec, **given)
    prov = raw_spec.get("provenance") or {}
    if not isinstance(prov, dict):
        raise UsageError(f"{root / 'spec.json'}: provenance: expected an object")
    raw_trials = read_json(root / "trials.json")
    if not isinstance(raw_trials, list):
        raise UsageError(f"{root / 'trials.json'}: expected a list of trials")
    trials = [TrialRecord.from_json(t, str(root / "trials.json")) for t in raw_trials]
    raw_space = optional("space.json")
    try:
        space = space_from_json(raw_space) if raw_space is not None else None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UsageError(f"{root / 'space.json'}: not a search space ({clip_text(exc, 80)})") from None
    final = optional("final.json") or {}
    where = str(root / "final.json")
    if not isinstance(final, dict):
        raise UsageError(f"{where}: expected an object")
    attacks, objective = list(spec.attacks), spec.objective
    best = _result(final.get("best"), attacks, objective, f"{where}: best") or \
        _best_from_trials(trials, objective, spec.max_acc_drop)
    default = _result(final.get("default"), attacks, objective, f"{where}: default")
    nd, nd_std = _no_defense(final, where)
    rates, timing, sizes = (final.get("poison_rates") or {}, optional("timing.json") or {},
                            final.get("sizes") or {})
    anchors, archs = final.get("anchors") or {}, final.get("archs") or {}
    if not all(isinstance(x, dict) for x in (rates, timing, sizes, anchors, archs)):
        raise UsageError(f"{where}: poison_rates, sizes, anchors, archs and timing.json: expected objects")
    nd_val = {str(a): _metrics(m, f"{where}.no_defense.val", ("acc", "asr", "ra"))
              for a, m in ((final.get("no_defense") or {}).get("val") or {}).items()}
    importances: dict[str, float] = {}
    note = "not computed: no search space (space.json)"
    if space is not None:
        study = study_from_records(trials, space.distributions, objective,
                                   max_acc_drop=spec.max_acc_drop)
        importances, note = param_importances(study)
    return ReportData(
        root, spec, prov, space, trials, best, default, nd, nd_std, nd_val,
        {str(a): (r if isinstance(r, (int, float)) else None) for a, r in rates.items()},
        sizes, {str(a): _metrics(m, f"{where}.anchors", (
            "clean_ra_acc", "clean_ra_asr", "undefended_ra_acc", "undefended_ra_asr"))
            for a, m in anchors.items()},
        {k: float(v) for k, v in timing.items() if isinstance(v, (int, float))},
        importances, note,
        verdict(best, default, nd, attacks, asr_threshold=spec.verdict_asr,
                acc_budget=spec.verdict_acc_drop),
        warnings(best, space, trials, importances, nd_val, sizes, spec),
        {str(a): str(m) for a, m in archs.items()},
        budget(trials, best, spec.max_acc_drop))
