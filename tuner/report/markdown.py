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

__all__ = ["PLOTS", "render_console", "render_markdown", "text"]

PLOTS = {"objective.png": "Objective over trials", "pareto.png": "Mean ACC against mean ASR",
         "importance.png": "Parameter importances"}
_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|#"})


def text(value: Any, limit: int = 200) -> str:
    """``value`` as one escaped line of at most ``limit`` characters."""
    s = " ".join(str(value).split())
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    return s.translate(_SPECIAL)


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


def _md_search(d: ReportData) -> list[str]:
    s, p = d.spec, d.provenance
    sampler = p.get("sampler") or {}
    versions = p.get("versions") or {}
    commit = p.get("git_commit")
    rows = [
        ["defense", text(s.defense)], ["dataset", text(s.zoo.dataset)],
        ["model", text(s.zoo.arch)], ["search attacks", text(", ".join(d.attacks))],
        ["held-out attacks", text(", ".join(d.holdout) or "none")],
        ["poison rate", _rates(d)],
        ["sampler", text(", ".join(f"{k}={v}" for k, v in sampler.items()) or "n/a")],
        ["seed", str(s.seed)], ["scheduler", text(s.scheduler)],
        ["max epochs per trial", str(s.max_epochs or "the defense's own")],
        ["trials", str(len(d.trials))], ["failed trials", str(d.failed)],
        ["diverged trials", str(sum(t.diverged for t in d.trials))],
        ["final seeds", str(d.best.seeds if d.best else "n/a")],
        ["wall time", f"{d.timing['wall_seconds']:.1f} s" if "wall_seconds" in d.timing else "n/a"],
        ["git commit", text(f"{commit}{' (uncommitted changes)' if p.get('git_dirty') else ''}")
         if commit else "n/a"],
        ["versions", text(", ".join(f"{k} {v}" for k, v in versions.items()) or "n/a")],
    ]
    return ["## Search", "", *table(["setting", "value"], rows), ""]


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
    out = ["## Search space", "", f"From `{text(d.space.path)}`.", ""]
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
    rows = [[label, fmt(r.val_score if r else None),
             (f"{r.score:.2f} ± {r.score_std:.2f}" if r and r.score is not None else "n/a")]
            for label, r in (("best", d.best), ("paper default", d.default))]
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
    seeds = d.best.seeds if d.best else 0
    return ["## Test results per attack", "",
            f"Percent, mean ± std over {seeds} seed(s), on the test split (never used by the "
            "search). DER 50 = no change.", "", *table(header, rows), ""]


def _md_trials(d: ReportData) -> list[str]:
    ranked = sorted((t for t in d.trials if t.score is not None and not t.failed),
                    key=lambda t: (not t.finished, -(t.score or 0.0)))[:10]
    names = list(dict.fromkeys(k for t in ranked for k in t.params))
    rows = [[str(t.number), t.state, fmt(t.score), str(t.epochs),
             *[fmt(t.params.get(n), 4) for n in names]] for t in ranked]
    out = ["## Top-10 trials (val)", "",
           "Trials that ran all their epochs first, then those ASHA stopped early (their "
           "scores are from fewer epochs).", "",
           *table(["trial", "state", "score", "epochs run", *map(text, names)], rows), ""]
    failed = [t for t in d.trials if t.failed]
    if failed:
        out += ["Failed trials:", ""] + [f"- trial {t.number}: {text(t.error or t.state)}"
                                         for t in failed]
        out.append("")
    return out


def _md_importance(d: ReportData) -> list[str]:
    if not d.importances:
        return ["## Parameter importances", "", text(d.importance_note or "not computed"), ""]
    rows = [[text(k), f"{v:.3f}"] for k, v in d.importances.items()]
    return ["## Parameter importances", "",
            "fANOVA (Optuna, seed 0) over the trials that ran all their epochs, on the same "
            "study as `study.db`.", "", *table(["param", "importance"], rows), ""]


def render_markdown(data: ReportData) -> str:
    s = data.spec
    lines = [f"# Best-config report: {text(s.defense)} on {text(s.zoo.dataset)} "
             f"({text(s.zoo.arch)})", ""]
    for part in (_md_search, _md_objective, _md_space, _md_best, _md_test, _md_trials,
                 _md_importance):
        lines += part(data)
    lines += ["## Plots", ""] + [f"![{title}]({name})" for name, title in PLOTS.items()]
    return "\n".join(lines) + "\n"


def _means(r: Result, attacks: list[str]) -> tuple[float, float]:
    pa = {a: m for a, m in r.mean.items() if a in attacks}
    acc, asr = O.values(pa, "pareto") if pa else (float("nan"), float("nan"))
    return acc, asr


def render_console(d: ReportData) -> str:
    """Best vs default vs no defense on test: mean ACC, mean ASR, score (search attacks)."""
    head = f"  {'on test, ' + str(len(d.attacks)) + ' attacks':<24}{'ACC':>8}{'ASR':>8}" \
           f"{d.objective + ' score':>14}"
    lines = [head]
    nd = {a: d.no_defense[a] for a in d.attacks if a in d.no_defense}
    if nd:
        acc, asr = O.values(nd, "pareto")
        lines.append(f"  {'no defense':<24}{acc:8.2f}{asr:8.2f}"
                     f"{O.score({a: {**m, 'der': 50.0} for a, m in nd.items()}, d.objective):14.2f}")
    for label, r in (("paper default", d.default), ("best found", d.best)):
        if r is not None and r.seeds:
            acc, asr = _means(r, d.attacks)
            lines.append(f"  {label:<24}{acc:8.2f}{asr:8.2f}{r.score or 0.0:14.2f}")
    if d.best is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(d.best.params.items()))
        lines.append(f"  best configuration: {params}")
    return "\n".join(lines)
