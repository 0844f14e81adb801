"""Render: ``report.md`` and the console summary from :class:`ReportData`.

Every string that comes from the run's files passes through :func:`text` (one line, Markdown's
special characters escaped), so a hand-edited ``spec.json`` cannot inject lines or markup.
"""

from __future__ import annotations

import json
from typing import Any

from optuna.distributions import CategoricalDistribution, distribution_to_json

from tuner import objective as O
from tuner.records import METRICS
from tuner.report.collect import ReportData, Result
from tuner.report.tables import cost

__all__ = ["PLOTS", "budget_line", "cost_line", "render_console", "render_markdown", "text"]

PLOTS = {"objective.png": "Objective over trials", "pareto.png": "Mean ACC against mean ASR",
         "importance.png": "Parameter importances"}
_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#"})


def text(value: Any, limit: int = 200) -> str:
    """``value`` as one escaped line of at most ``limit`` characters."""
    s = " ".join(str(value).split())
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    return s.translate(_SPECIAL)


def code(value: Any, limit: int = 200) -> str:
    """``value`` as the inside of a Markdown code span: one line, no backticks."""
    s = " ".join(str(value).split()).replace("`", "'")
    return s if len(s) <= limit else s[: limit - 3] + "..."


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return text(v, 60)
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.3g}"


def _pm(r: Result | None, attack: str, k: str) -> str:
    if r is None or attack not in r.mean or k not in r.mean[attack]:
        return "n/a"
    return f"{r.mean[attack][k]:.1f} ± {r.std[attack][k]:.1f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _rates(d: ReportData) -> str:
    """The poison rate: the user's, or the default with the attacks whose rate differs from it."""
    if d.spec.zoo.poison_rate is not None:
        return fmt(d.spec.zoo.poison_rate)
    rates = {a: r for a, r in d.poison_rates.items() if r is not None}
    common = max(set(rates.values()), key=list(rates.values()).count, default=None)
    if common is None:
        return "n/a"
    other = ", ".join(f"{text(a)} {r:g}" for a, r in rates.items() if r != common)
    return f"{common:g}" + (f" ({other})" if other else "")


def _pm_ci(mean: float | None, sd: float | None, ci: float | None) -> str:
    if mean is None:
        return "n/a"
    out = f"{mean:.2f} ± {sd or 0.0:.2f}"
    return out + (f" (95% CI ± {ci:.2f})" if ci is not None else "")


def _md_verdict(d: ReportData) -> list[str]:
    v = d.verdict
    if v is None:
        return ["## Verdict", "", "No final evaluation on test: no verdict.", ""]
    out = ["## Verdict", "", f"**{text(v.headline)}.**", ""]
    if v.gain is not None:
        ci = f" (95% CI ± {v.gain_ci:.2f})" if v.gain_ci is not None else " (one run: no interval)"
        out.append(f"The best configuration scores {v.gain:+.2f} points over the paper default "
                   f"on test{ci}, paired over the same {d.best.runs if d.best else 0} run(s).")
    out += [f"Removed means mean test ASR below {v.asr_threshold:g}% with at most "
            f"{v.acc_budget:g} points of clean ACC lost against the undefended victim "
            "(`--verdict-asr`, `--verdict-acc-drop`); reduced, at most half the undefended ASR.",
            ""]
    rows = [[text(r.attack) + (" (held out)" if r.attack in d.holdout else ""), r.status,
             f"{r.asr_before:.1f} -> {r.asr_after:.1f}", f"{-r.acc_drop:+.1f}",
             "n/a" if r.ra_asr is None else f"{r.ra_asr:.1f}"] for r in v.attacks]
    return out + table(["attack", "backdoor", "ASR no defense -> best", "ACC change",
                        "ASR after re-tuning"], rows) + [""]


def budget_line(d: ReportData) -> str | None:
    """One sentence on the accuracy budget, or None without one."""
    b = d.budget
    if b is None:
        return None
    head = (f"Accuracy budget: at most {b.max_acc_drop:g} points of mean clean val ACC lost "
            f"against the undefended victims (--max-acc-drop); {b.feasible} of {b.measured} "
            "trials were feasible.")
    if b.best_trial is None:
        return head + " No trial could be chosen."
    drop = "n/a" if b.best_acc_drop is None else f"{b.best_acc_drop:.2f}"
    if b.best_feasible:
        return head + f" The best is the best feasible trial, {b.best_trial} (ACC drop {drop})."
    return (head + f" NO TRIAL MET THE BUDGET: shown as best is the least infeasible, trial "
            f"{b.best_trial}, which loses {drop} points of mean val ACC.")


def _md_budget(d: ReportData) -> list[str]:
    line = budget_line(d)
    if line is None:
        return []
    return ["## Accuracy budget", "", f"**{line}**" if d.budget and not d.budget.best_feasible
            else line, "",
            "The budget is an Optuna constraint (`Trial.set_constraint`, feasible when the "
            "drop minus the budget is <= 0): the sampler models the feasible region. ASHA sees "
            "one scalar, the objective's score, and stops trials on it alone: a feasible trial "
            "can be stopped early and an infeasible one kept. A trial ASHA stopped carries the "
            "ACC drop of the epoch it stopped at, usually larger than where it would have "
            "ended, so the sampler sees it as less feasible than it may be.", ""]


def _md_warnings(d: ReportData) -> list[str]:
    if not d.warnings:
        return []
    return ["## Warnings", "", *[f"- {text(w, 400)}" for w in d.warnings], ""]


def models(d: ReportData) -> str:
    """The victims' model: the spec's, or per victim where some came from elsewhere."""
    by_arch: dict[str, list[str]] = {}
    for attack, arch in d.archs.items():
        by_arch.setdefault(arch, []).append(attack)
    if set(by_arch) <= {d.spec.zoo.arch}:
        return text(d.spec.zoo.arch)
    return text("; ".join(f"{arch} ({', '.join(attacks)})" for arch, attacks in by_arch.items()))


def _md_search(d: ReportData) -> list[str]:
    s, p = d.spec, d.provenance
    sampler = p.get("sampler") or {}
    versions = p.get("versions") or {}
    commit = p.get("git_commit")
    rows = [
        ["defense", text(s.defense)], ["dataset", text(s.zoo.dataset)],
        ["model", models(d)], ["search attacks", text(", ".join(d.attacks))],
        ["held-out attacks", text(", ".join(d.holdout) or "none")],
        ["poison rate", _rates(d)],
        ["sampler", text(", ".join(f"{k}={v}" for k, v in sampler.items()) or "n/a")],
        ["seed", str(s.seed)], ["scheduler", text(s.scheduler)],
        ["max epochs per trial", str(s.max_epochs or "the defense's own")],
        ["seeds per trial", f"{s.trial_seeds} (clean-subset draw and training order; val "
                            "metrics averaged)" if s.trial_seeds > 1 else "1"],
        ["trials", str(len(d.trials))], ["failed trials", str(d.failed)],
        ["diverged trials", str(sum(t.diverged for t in d.trials))],
        ["final runs", f"{d.best.runs} ({d.spec.victim_seeds} victim seed(s) x "
                       f"{d.spec.final_seeds} defense seed(s))" if d.best and d.best.runs
         else "n/a"],
        ["wall time", f"{d.timing['wall_seconds']:.1f} s" if "wall_seconds" in d.timing else "n/a"],
        ["cost", cost_line(d)],
        ["git commit", text(f"{commit}{' (uncommitted changes)' if p.get('git_dirty') else ''}")
         if commit else "n/a"],
        ["versions", text(", ".join(f"{k} {v}" for k, v in versions.items()) or "n/a")],
    ]
    return ["## Search", "", *table(["setting", "value"], rows), ""]


def cost_line(d: ReportData) -> str:
    """What the run spent, in one line (``summary.json`` ``cost``)."""
    k = cost(d)
    gpu = f", GPU peak {k['gpu_peak_mb']:.0f} MiB" if k["gpu_peak_mb"] else ""
    final = (f"; final evaluations {k['final_seconds']:.1f} s wall, "
             f"{k['final_cpu_seconds'] or 0.0:.1f} CPU-s" if k["final_seconds"] is not None else "")
    built = (f"; {k['victims_built']} victim(s) built" if k["victims_built"] is not None else "")
    return (f"search: {k['trials']} trials, {k['epochs']} epochs, {k['trial_seconds']:.1f} s "
            f"trial wall, {k['trial_cpu_seconds']:.1f} CPU-s, {k['device_seconds']:.1f} "
            f"device-s{gpu}{final}{built}")


def _md_objective(d: ReportData) -> list[str]:
    return ["## Objective", "", f"`{d.objective}`: {O.describe(d.objective)}.",
            f"A diverged trial scores {O.DIVERGED_SCORE} (pareto: ACC {O.DIVERGED_VALUES[0]}, "
            f"ASR {O.DIVERGED_VALUES[1]}).", ""]


def _describe(dist: Any) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "categorical " + ", ".join(text(c) for c in dist.choices)
    kind = "int" if type(dist).__name__ == "IntDistribution" else "float"
    return f"{kind} [{fmt(dist.low, 4)}, {fmt(dist.high, 4)}]" + (" log" if dist.log else "")


def _md_space(d: ReportData) -> list[str]:
    if d.space is None:
        return ["## Search space", "", "n/a", ""]
    rows = [[text(n), _describe(dist), fmt(d.space.default.get(n), 4)]
            for n, dist in d.space.distributions.items()]
    out = ["## Search space", "", f"From `{code(d.space.path)}`.", ""]
    out += table(["param", "distribution", "default point"], rows)
    if d.space.constraints:
        out += ["", "Constraints (held by disjoint ranges): " +
                ", ".join(f"{text(a)} < {text(b)}" for a, b in d.space.constraints)]
    body = ",\n".join(f"  {json.dumps(k)}: {distribution_to_json(v)}"
                      for k, v in d.space.distributions.items())
    return out + ["", "Serialized (Optuna `distribution_to_json`):", "", "```json",
                  "{\n" + body.replace("`", "'") + "\n}", "```", ""]


def _md_best(d: ReportData) -> list[str]:
    if d.best is None:
        return ["## Best configuration", "", "No trial finished without failing or diverging.", ""]
    default = d.default.params if d.default else {}
    names = list(dict.fromkeys([*d.best.params, *default]))
    rows = [[text(n), fmt(d.best.params.get(n), 4), fmt(default.get(n), 4)] for n in names]
    origin = f" (trial {d.best.trial})" if d.best.trial is not None else ""
    out = [f"## Best configuration{origin}", "",
           *table(["param", "best", "paper default"], rows), ""]
    by_number = {t.number: t for t in d.trials}
    default_trial = next((t for t in d.trials if d.default and t.params == d.default.params), None)

    def val(r: Result | None, t: Any) -> str:
        if r is None:
            return "n/a"
        return _score(t) if t is not None and t.score == r.val_score else fmt(r.val_score)

    rows = [[label, val(r, t), _pm_ci(r.score, r.score_std, r.score_ci) if r else "n/a"]
            for label, r, t in (("best", d.best, by_number.get(-1 if d.best.trial is None else d.best.trial)),
                                ("paper default", d.default, default_trial))]
    return out + table(["config", "val score", "test score (mean ± std)"], rows) + [""]


def _md_test(d: ReportData) -> list[str]:
    attacks = list(dict.fromkeys([*d.attacks, *d.holdout, *d.no_defense,
                                  *(d.best.mean if d.best else {})]))
    header = ["attack", "no defense ACC/ASR/RA"]
    header += [f"{lab} {k.upper()}" for lab in ("default", "best") for k in METRICS]
    rows = []
    for a in attacks:
        nd = d.no_defense.get(a, {})
        row = [text(a) + (" (held out)" if a in d.holdout else ""),
               " / ".join(fmt(nd.get(k), 1) for k in ("acc", "asr", "ra")) if nd else "n/a"]
        row += [_pm(r, a, k) for r in (d.default, d.best) for k in METRICS]
        rows.append(row)
    runs = d.best.runs if d.best else 0
    sizes = d.sizes
    size = ""
    if sizes:
        trig = sizes.get("test_triggered", {})
        size = (f" The test split has {sizes.get('test_clean', 'n/a')} clean images and, per "
                "attack, " + ", ".join(f"{text(a)} {n}" for a, n in trig.items()) +
                " triggered non-target images: one image is "
                f"{100 / max(1, sizes.get('test_clean', 1)):.2f} points of ACC.")
    return ["## Test results per attack", "",
            f"Percent, mean ± std over {runs} run(s), on the test split (never used by the "
            f"search). DER 50 = no change.{size}", "", *table(header, rows), ""]


def _md_sequela(d: ReportData) -> list[str]:
    if not d.has_sequela:
        return []
    out = ["## Does the purification hold?", "",
           "**ASR after re-tuning**: the defended model fine-tuned briefly on clean images with "
           "5 poisoned ones mixed in (Min et al., NeurIPS 2024); a backdoor that was only hidden "
           "comes back, so lower is better, and the clean model (never backdoored) and the "
           "undefended victim give its two ends. **Membership exposure**: the ROC AUC of a "
           "loss-threshold membership-inference attack (Yeom et al. 2018) on the defender's "
           "clean images against held-out ones (0.5 = none; Sha et al. call a rise backdoor "
           "sequela), so a change near 0 is better.", ""]
    rows = []
    for a in (d.best.mean if d.best else {}):
        anchor = d.anchors.get(a, {})
        row = [text(a) + (" (held out)" if a in d.holdout else "")]
        row += [fmt(anchor.get("clean_ra_asr"), 1), fmt(anchor.get("undefended_ra_asr"), 1)]
        row += [_pm(r, a, "ra_asr") for r in (d.default, d.best)]
        row += [_pm3(r, a, "mia_change") for r in (d.default, d.best)]
        rows.append(row)
    return out + table(["attack", "re-tuned clean model ASR", "re-tuned victim ASR",
                        "default: ASR after re-tuning", "best: ASR after re-tuning",
                        "default: membership AUC change", "best: membership AUC change"],
                       rows) + [""]


def _pm3(r: Result | None, attack: str, k: str) -> str:
    if r is None or attack not in r.mean or k not in r.mean[attack]:
        return "n/a"
    return f"{r.mean[attack][k]:+.3f} ± {r.std[attack][k]:.3f}"


def _md_trials(d: ReportData) -> list[str]:
    ranked = sorted((t for t in d.trials if t.score is not None and not t.failed),
                    key=lambda t: (not t.finished, -(t.score or 0.0)))[:10]
    names = list(dict.fromkeys(k for t in ranked for k in t.params))
    rows = [[str(t.number), t.state, _score(t), fmt(t.acc_drop), str(t.epochs),
             *[fmt(t.params.get(n), 4) for n in names]] for t in ranked]
    out = ["## Top-10 trials (val)", "",
           "Trials that ran all their epochs first, then those ASHA stopped early (their "
           "scores are from fewer epochs). ACC drop: mean clean val ACC lost against no "
           "defense, percentage points." + (
               f" Each trial ran {d.spec.trial_seeds} seeds (--trial-seeds): score is the "
               "objective of the mean metrics ± the std of the per-seed scores."
               if d.spec.trial_seeds > 1 else ""), "",
           *table(["trial", "state", "score", "ACC drop", "epochs run", *map(text, names)], rows),
           ""]
    failed = [t for t in d.trials if t.failed]
    if failed:
        out += ["Failed trials:", ""] + [f"- trial {t.number}: {text(t.error or t.state)}"
                                         for t in failed]
        out.append("")
    return out


def _score(t: Any) -> str:
    """A trial's val score, with the spread over its seeds (--trial-seeds)."""
    sd = t.score_std
    return fmt(t.score) if sd is None or t.score is None else f"{t.score:.2f} ± {sd:.2f}"


def _md_importance(d: ReportData) -> list[str]:
    if not d.importances:
        return ["## Parameter importances", "", text(d.importance_note or "not computed"), ""]
    rows = [[text(k), f"{v:.3f}"] for k, v in d.importances.items()]
    return ["## Parameter importances", "",
            "PED-ANOVA, as optuna-dashboard computes them on `study.db` (Optuna's "
            "`get_param_importances`), over the trials that ran all their epochs.", "",
            *table(["param", "importance"], rows), ""]


def render_markdown(data: ReportData) -> str:
    s = data.spec
    lines = [f"# Best-config report: {text(s.defense)} on {text(s.zoo.dataset)} ({models(data)})", ""]
    for part in (_md_verdict, _md_budget, _md_warnings, _md_search, _md_objective, _md_space, _md_best,
                 _md_test, _md_sequela, _md_trials, _md_importance):
        lines += part(data)
    lines += ["## Plots", ""] + [f"![{title}]({name})" for name, title in PLOTS.items()]
    return "\n".join(lines) + "\n"


def _means(r: Result, attacks: list[str]) -> tuple[float, float]:
    pa = {a: m for a, m in r.mean.items() if a in attacks}
    acc, asr = O.values(pa, "pareto") if pa else (float("nan"), float("nan"))
    return acc, asr


def render_console(d: ReportData) -> str:
    """The verdict, then best vs default vs no defense on test: mean ACC, mean ASR, score."""
    lines = []
    if d.verdict is not None:
        lines.append(f"  verdict: {d.verdict.headline}")
        lines += [f"    {r.attack:<12} {r.status:<20} ASR {r.asr_before:5.1f} -> "
                  f"{r.asr_after:5.1f}, ACC {-r.acc_drop:+.1f}" for r in d.verdict.attacks]
        if d.verdict.gain is not None:
            ci = f" ± {d.verdict.gain_ci:.2f} (95% CI)" if d.verdict.gain_ci is not None else ""
            lines.append(f"    best vs paper default: {d.verdict.gain:+.2f}{ci} points of score")
    lines.append(f"  {'on test, ' + str(len(d.attacks)) + ' attacks':<24}{'ACC':>8}{'ASR':>8}"
                 f"{d.objective + ' score':>14}")
    nd = {a: d.no_defense[a] for a in d.attacks if a in d.no_defense}
    if nd:
        acc, asr = O.values(nd, "pareto")
        base = O.score({a: {**m, "der": 50.0} for a, m in nd.items()}, "mean")
        lines.append(f"  {'no defense':<24}{acc:8.2f}{asr:8.2f}{base:14.2f}")
    for label, r in (("paper default", d.default), ("best found", d.best)):
        if r is not None and r.runs:
            acc, asr = _means(r, d.attacks)
            lines.append(f"  {label:<24}{acc:8.2f}{asr:8.2f}{r.score or 0.0:14.2f}")
    if d.best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(d.best.params.items()))
        origin = f" (trial {d.best.trial})" if d.best.trial is not None else ""
        lines.append(f"  best configuration{origin}: {params}")
    line = budget_line(d)
    if line is not None:
        lines.append(f"  {line}")
    lines += [f"  warning: {w}" for w in d.warnings]
    return "\n".join(lines)
