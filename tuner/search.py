"""The search, end to end: ``run_search(spec) -> run directory``.

1. validate the spec, the data and the attacks (before anything is built or started);
2. load the victims (search attacks + held-out attacks; built once, then stored) while Ray
   is imported and started in a background thread;
3. run the Ray Tune + Optuna search on the validation split (``tuner.trainable``, the only
   module that imports Ray); write ``spec.json``, ``space.json``, ``trials.json``, ``study.db``;
4. final evaluation in this process, on the test split, of the paper-default configuration
   (before the search, while Ray starts: it does not depend on the search) and of the best
   one (after it, while Ray stops), seeds ``seed .. seed+final_seeds-1``, search and held-out
   victims, next to the no-defense victims; write ``final.json``, ``timing.json`` and the
   report.

The final evaluation runs in the driver: it is a handful of configurations on a few victims.

>>> from tuner.spec import ExperimentSpec                   # doctest: +SKIP
>>> run_search(ExperimentSpec(defense="ft", smoke_test=True, num_samples=2, max_epochs=1,
...                           attacks=("badnets",), final_seeds=1))   # doctest: +SKIP
PosixPath('.../runs/ft-digits-20250101-120000')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tuner.spec import ExperimentSpec

__all__ = ["export_study", "final_evaluation", "pick_best", "run_search"]

SMOKE_VICTIM_EPOCHS = 5


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _smoke_recipe(spec: ExperimentSpec) -> Any:
    """--smoke-test trains its victims for a few epochs only (stored under their own key):
    enough to plant a backdoor on digits, and the build no longer dominates a CI run."""
    if not spec.smoke_test:
        return None
    from zoo.train import default_recipe

    recipe = default_recipe(spec.dataset, spec.arch)
    return dataclasses.replace(recipe, epochs=min(recipe.epochs, SMOKE_VICTIM_EPOCHS))


def _zoo_spec(spec: ExperimentSpec) -> Any:
    from zoo.victims import ZooSpec

    return ZooSpec(dataset=spec.dataset, arch=spec.arch, poison_rate=spec.poison_rate,
                   seed=spec.seed, data_root=spec.data_root, zoo_dir=spec.zoo_dir,
                   blend_image=spec.blend_image, recipe=_smoke_recipe(spec), precision=spec.precision)


def _check_victims(spec: ExperimentSpec) -> tuple[Any, Any]:
    """The zoo spec and the splits, with the data and every attack checked (ValueError)."""
    from zoo.data import load_splits
    from zoo.victims import prepare_attacks

    splits = load_splits(spec.dataset, data_root=spec.data_root, seed=spec.seed,
                         clean_ratio=spec.clean_ratio, download=spec.download)
    zoo = _zoo_spec(spec)
    prepare_attacks(zoo, [*spec.attacks, *spec.holdout_attacks], splits)
    return zoo, splits


def _load_victims(spec: ExperimentSpec, zoo: Any, splits: Any) -> tuple[list[Any], list[Any], float]:
    """Search victims, held-out victims, seconds (built once, then from the store)."""
    from zoo.victims import get_victims

    start = time.perf_counter()
    names = [*spec.attacks, *spec.holdout_attacks]
    print(f"victims: {', '.join(names)} ({spec.dataset}, {spec.arch})", flush=True)
    victims = get_victims(zoo, names, splits=splits, device=spec.device, progress=True)
    by_name = {v.attack: v for v in victims}
    return ([by_name[a] for a in spec.attacks], [by_name[a] for a in spec.holdout_attacks],
            time.perf_counter() - start)


def pick_best(records: Sequence[dict[str, Any]], objective: str) -> dict[str, Any] | None:
    """The best trial; trials that ran all their epochs beat ASHA-stopped ones (whose early
    values are not comparable), which only count when no trial completed."""
    from tuner.objective import select_best

    complete = [r for r in records if r["state"] == "complete"]
    best = select_best(complete, objective) if complete else None
    return dict(best) if best is not None else (
        dict(b) if (b := select_best(list(records), objective)) is not None else None)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def searched_params(spec: ExperimentSpec, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``epochs`` capped as in the search (``--max-epochs``), so the final
    evaluation measures the configuration the search scored."""
    from tuner.evaluation import resolve_config

    if spec.max_epochs is None:
        return dict(params)
    cfg = resolve_config(spec.defense, params, spec.dataset, spec.max_epochs)
    return {**params, "epochs": int(cfg.epochs)}


def final_threads(cores: int | None) -> int:
    """Torch threads of the final evaluations: one core fewer than the machine has (at least
    one), because Ray starts (before the search) or stops (after it) beside them.

    On 2 cores, two torch threads beside Ray's start-up (its workers import torch and Tune)
    waited on each other at every operation: the first trials started ~2.5 s late (Ray's share of
    the default search 13-29% instead of 6%). Default and best use the same count, so their
    test numbers are comparable for the defenses whose results depend on it (README)."""
    return max(1, (cores or 1) - 1)


def final_evaluation(spec: ExperimentSpec, params: dict[str, Any], victims: list[Any],
                     splits: Any) -> list[dict[str, Any]]:
    """``run_config`` on test for each final seed: one ``{attack: {before, after, ...}}`` each."""
    import torch

    from tuner.evaluation import run_config

    device = torch.device(spec.device)
    params = searched_params(spec, params)
    seeds = range(spec.seed, spec.seed + spec.final_seeds)
    with _torch_threads(final_threads(os.cpu_count())):
        return [run_config(spec.defense, params, victims, splits, seed=s, device=device,
                           split="test", precision=spec.precision) for s in seeds]


def _distribution_for(dist: Any, value: Any) -> Any | None:
    """``dist`` widened to hold ``value`` (the paper default may lie outside a narrowed range)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return dist if value in dist.choices else None
    if dist._contains(dist.to_internal_repr(value)):
        return dist
    if getattr(dist, "step", None) not in (None, 1):
        return None
    return type(dist)(low=min(dist.low, value), high=max(dist.high, value), log=dist.log)


def export_study(path: Path, records: Sequence[dict[str, Any]], space: Any, objective: str,
                 name: str) -> int:
    """Write the trials as an Optuna study in SQLite (for optuna-dashboard); returns its size.

    The search itself used an in-memory study (an SQLite one breaks ``Tuner.restore`` after a
    killed driver); this rebuilds the same trials from ``trials.json`` at the end.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    from tuner.objective import directions

    path.unlink(missing_ok=True)
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=f"sqlite:///{path}", study_name=name,
                                    directions=directions(objective))
        multi = objective == "pareto"
        added = 0
        for r in records:
            dists = {k: _distribution_for(space.distributions[k], v)
                     for k, v in r["params"].items() if k in space.distributions}
            if r["state"] == "incomplete" or any(d is None for d in dists.values()):
                continue
            params = {k: r["params"][k] for k in dists}
            history = {int(h["epoch"]): float(h["value_0"]) for h in r["history"]
                       if h.get("value_0") is not None and h.get("epoch") is not None}
            state = {"error": TrialState.FAIL, "pruned": TrialState.PRUNED}.get(
                r["state"], TrialState.COMPLETE)
            values = r.get("values") or None
            if state == TrialState.FAIL or (state == TrialState.PRUNED and multi) or \
                    (state == TrialState.COMPLETE and not values):
                values = None
                state = TrialState.FAIL if state == TrialState.COMPLETE else state
            study.add_trial(create_trial(
                state=state, params=params, distributions=dists, values=values,
                intermediate_values=None if multi else history,
                user_attrs={"trial_id": r["trial_id"], "state": r["state"],
                            "diverged": r["diverged"], "epochs": r["epochs"]}))
            added += 1
        return added
    finally:
        optuna.logging.set_verbosity(old)


def _per_attack_after(seed_result: dict[str, Any], attacks: Sequence[str]) -> dict[str, dict]:
    return {a: dict(seed_result[a]["after"]) for a in attacks if a in seed_result}


def _means(runs: list[dict[str, dict]], objective: str) -> tuple[float, float, float]:
    """Mean ACC, mean ASR and the objective score, averaged over seeds."""
    from tuner.objective import score

    accs = [m["acc"] for run in runs for m in run.values()]
    asrs = [m["asr"] for run in runs for m in run.values()]
    scores = [score(run, objective) for run in runs]
    return (sum(accs) / len(accs), sum(asrs) / len(asrs), sum(scores) / len(scores))


def summary_table(spec: ExperimentSpec, final: dict[str, Any]) -> str:
    """best vs default vs no defense on test: mean ACC, mean ASR, score (search attacks)."""
    nd = final["no_defense"]["per_attack"]
    rows = [("no defense", [{a: {**nd[a], "der": 50.0} for a in spec.attacks}])]
    for key, label in (("default", "paper default"), ("best", "best found")):
        if final.get(key):
            rows.append((label, [_per_attack_after(s, spec.attacks) for s in final[key]["seeds"]]))
    head = f"  {'on test, ' + str(len(spec.attacks)) + ' attacks':<24}{'ACC':>8}{'ASR':>8}" \
           f"{spec.objective + ' score':>14}"
    lines = [head]
    for label, runs in rows:
        acc, asr, sc = _means(runs, spec.objective)
        lines.append(f"  {label:<24}{acc:8.2f}{asr:8.2f}{sc:14.2f}")
    if spec.holdout_attacks and final.get("best"):
        runs = [_per_attack_after(s, spec.holdout_attacks) for s in final["best"]["seeds"]]
        acc, asr, sc = _means(runs, spec.objective)
        lines.append(f"  {'best, held-out attacks':<24}{acc:8.2f}{asr:8.2f}{sc:14.2f}")
    return "\n".join(lines)


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(params.items()))


def _resume_hint(spec: ExperimentSpec) -> str:
    return (f"python -m tuner --defense {spec.defense} --output {spec.output} "
            f"--name {spec.name} --resume")


class _RayInBackground:
    """Ray imported and started in a thread while the driver loads the victims, and stopped in
    one while it runs the final evaluation, so that neither costs the run wall time when there
    is other work to hide it behind. ``waited`` is the time the driver still waited for them.

    One worker thread runs the start, then the stop, in that order. Leaving the ``with`` block
    (normally or by an exception, Ctrl-C included) stops Ray if it is not stopping yet and
    waits until it has.
    """

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec, self.waited = spec, 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ray")
        self._start: Future | None = None
        self._stop: Future | None = None

    def __enter__(self) -> _RayInBackground:
        self._start = self._pool.submit(self._start_ray)
        return self

    def _start_ray(self) -> tuple[Any, bool]:
        from tuner import trainable  # imports ray: ~0.7 s, hidden here too

        return trainable, trainable.start_ray(self.spec)

    def ready(self) -> Any:
        """Wait until Ray is up; the ``tuner.trainable`` module (start errors re-raise here)."""
        assert self._start is not None
        t = time.perf_counter()
        try:
            return self._start.result()[0]
        finally:
            self.waited += time.perf_counter() - t

    def stop(self) -> None:
        """Start stopping Ray (returns at once)."""
        if self._stop is None:
            self._stop = self._pool.submit(self._stop_ray)

    def _stop_ray(self) -> None:
        assert self._start is not None
        if self._start.exception() is None:  # runs after the start: this is one thread
            trainable, started = self._start.result()
            if started:
                trainable.stop_ray()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        assert self._stop is not None
        t = time.perf_counter()
        try:
            self._stop.result()
        finally:
            self.waited += time.perf_counter() - t
            self._pool.shutdown()


def _final(spec: ExperimentSpec, best: dict[str, Any] | None, default: dict[str, Any],
           default_runs: list[dict[str, Any]], victims: list[Any], splits: Any,
           val_default: float | None) -> dict[str, Any]:
    """final.json: the default's runs (measured before the search), the best's, no defense."""
    out: dict[str, Any] = {
        "default": {"params": searched_params(spec, default), "val_score": val_default,
                    "seeds": default_runs},
        "no_defense": {"per_attack": {v.attack: v.metrics["test"].as_dict() for v in victims}},
        "poison_rates": {v.attack: v.poison_rate for v in victims},
        "best": None,
    }
    if best is not None:
        same = best["params"] == default
        if not same:
            print(f"final evaluation of the best configuration on test: {spec.final_seeds} "
                  f"seed(s) x {len(victims)} victims", flush=True)
        runs = default_runs if same else final_evaluation(spec, best["params"], victims, splits)
        out["best"] = {"params": searched_params(spec, best["params"]), "val_score": best["score"],
                       "trial_id": best["trial_id"], "seeds": runs}
    return out


def run_search(spec: ExperimentSpec) -> Path:
    """Run (or continue, with ``spec.resume``) the search; return the run directory."""
    from tuner.report import write_report
    from tuner.spaces import space_to_json

    t0 = time.perf_counter()
    spec.validate()
    space = spec.load_space()
    zoo, splits = _check_victims(spec)  # bad data or attacks fail here, before Ray starts
    with _RayInBackground(spec) as ray_bg:
        victims, holdout, victim_s = _load_victims(spec, zoo, splits)
        run = spec.run_dir
        run.mkdir(parents=True, exist_ok=True)
        if not spec.resume:
            _write_json(run / "spec.json", spec.to_dict())
        _write_json(run / "space.json", space_to_json(space))

        # The paper default's test evaluation does not depend on the search: it runs while
        # Ray starts (and its workers import torch), which it would otherwise wait for.
        default = dict(space.default)
        everyone = [*victims, *holdout]
        print(f"final evaluation of the paper default on test (while Ray starts): "
              f"{spec.final_seeds} seed(s) x {len(everyone)} victims", flush=True)
        t2 = time.perf_counter()
        default_runs = final_evaluation(spec, default, everyone, splits)
        final_s = time.perf_counter() - t2

        trainable = ray_bg.ready()
        t1 = time.perf_counter()
        slots = trainable.max_concurrent(spec)
        records = trainable.run_tune(spec, space, victims, splits)
        ray_bg.stop()  # Ray stops while the final evaluation runs
        search_s = time.perf_counter() - t1
        _write_json(run / "trials.json", records)
        finished = sum(r["state"] != "incomplete" for r in records)
        if finished < spec.num_samples:
            print(f"search stopped after {finished}/{spec.num_samples} trials; continue it with:\n"
                  f"  {_resume_hint(spec)}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        export_study(run / "study.db", records, space, spec.objective, spec.name)

        best = pick_best(records, spec.objective)
        val_default = next((r["score"] for r in records if r["params"] == default), None)
        if best is None:
            print("no trial finished without error or divergence: only the default is evaluated",
                  file=sys.stderr)
        t2 = time.perf_counter()
        final = _final(spec, best, default, default_runs, everyone, splits, val_default)
        final_s += time.perf_counter() - t2
    _write_json(run / "final.json", final)
    _write_json(run / "timing.json", timing(
        wall=time.perf_counter() - t0, victims=victim_s, search=search_s, final=final_s,
        ray_waited=ray_bg.waited, records=records, slots=slots))
    report = write_report(run)
    _print_end(spec, report, final, time.perf_counter() - t0)
    return run


def timing(*, wall: float, victims: float, search: float, final: float, ray_waited: float,
           records: Sequence[dict[str, Any]], slots: int) -> dict[str, Any]:
    """``timing.json``. The Ray overhead share is the part of the search's wall time (the
    search, plus what the driver waited for Ray to start or stop) that its ``slots`` did not
    spend computing trials: ``1 - sum(trial seconds) / (slots * wall)``."""
    compute = sum(float(r["seconds"]) for r in records)
    search_wall = search + ray_waited
    share = max(0.0, 1.0 - compute / (slots * search_wall)) if search_wall > 0 and slots else 0.0
    return {"wall_seconds": wall, "victims_seconds": victims, "search_seconds": search,
            "final_seconds": final, "ray_wait_seconds": ray_waited, "trials": len(records),
            "trial_seconds": compute, "slots": slots, "ray_overhead_share": share}


def _print_end(spec: ExperimentSpec, report: Path, final: dict[str, Any], wall: float) -> None:
    print(f"\ndone in {wall:.0f}s. report: {report}")
    print(summary_table(spec, final))
    if final.get("best"):
        print(f"  best configuration: {_format_params(final['best']['params'])}")
    print(f"  (config file: {report.parent / 'best_config.json'})", flush=True)

