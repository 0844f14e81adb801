"""The search, end to end: ``run_search(spec) -> run directory``.

1. check the spec, the data and the attacks (before anything is built or started);
2. load the victims (search attacks + held-out attacks) from the store while Ray is imported
   and started in a background thread; the missing ones are built as Ray tasks, in parallel,
   and stored;
3. final evaluation, on the test split, of the paper-default configuration (before the search:
   it does not depend on it), seeds ``seed .. seed+final_seeds-1``, search and held-out victims,
   one Ray task per victim and seed, next to the no-defense victims;
4. run the Ray Tune + Optuna search on the validation split (``tuner.trainable``, the only
   module that imports Ray); write ``spec.json`` (with the run's provenance), ``space.json``,
   ``trials.json``, ``study.db``;
5. the best configuration's final evaluation as in 3; write ``final.json``, ``timing.json``
   and the report.

Victim builds and final evaluations go through a ``zoo.runtime.JobMap``: Ray tasks with a
trial's resources here (``tuner.trainable.RayMap``), one after another in the driver for the
commands without Ray (``zoo``, ``evaluate``).

>>> from tuner.spec import ExperimentSpec                                 # doctest: +SKIP
>>> run_search(ExperimentSpec(defense="ft", smoke_test=True))             # doctest: +SKIP
PosixPath('.../runs/ft-digits-20250101-120000')
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from tuner import study as S
from tuner._io import RunLock, write_json
from tuner._ray_compat import keep_local_ray_on_loopback
from tuner.cli import sigterm_as_ctrl_c
from tuner.evaluation import anchors, final_job, mia_before, resolve_config, trial_payload
from tuner.records import TrialRecord, least_infeasible, pick_best
from tuner.report import console_summary, write_report
from tuner.spaces import Space, space_to_json
from tuner.spec import ExperimentSpec
from zoo.data import Splits
from zoo.runtime import JobMap, SerialMap, in_order
from zoo.victims import Victim, get_victims, prepare_attacks

__all__ = ["final_evaluation", "least_infeasible", "pick_best", "provenance", "run_search"]

ROOT = Path(__file__).resolve().parents[1]
FINAL_FORMAT = 2  # final.json: runs with victim and defense seeds; references; anchors
LIBRARIES = ("torch", "torchvision", "ray", "optuna", "numpy", "pandas")


def provenance(sampler: dict[str, Any]) -> dict[str, Any]:
    """What produced a run, recorded when it starts: the code's git commit (and whether it had
    uncommitted changes), library versions, the sampler built, the machine."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                 timeout=5, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if commit else None,
            "versions": versions, "sampler": sampler, "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _load_victims(spec: ExperimentSpec, splits: Splits, jobs: JobMap
                  ) -> tuple[list[Victim], list[Victim], float]:
    """Search victims, held-out victims, seconds (built once by ``jobs``, then from the store)."""
    start = time.perf_counter()
    zoo = spec.victims
    print(f"victims: {', '.join(zoo.attacks)} ({zoo.dataset}, {zoo.arch})", flush=True)
    by_name = {v.attack: v for v in get_victims(zoo, splits=splits, progress=True, jobs=jobs)}
    return ([by_name[a] for a in spec.attacks], [by_name[a] for a in spec.holdout_attacks],
            time.perf_counter() - start)


def searched_params(spec: ExperimentSpec, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``epochs`` capped as in the search (``--max-epochs``), so the final
    evaluation measures the configuration the search scored."""
    if spec.max_epochs is None:
        return dict(params)
    cfg = resolve_config(spec.defense, params, spec.zoo.dataset, spec.max_epochs)
    return {**params, "epochs": int(cfg.epochs)}


@dataclass(frozen=True)
class VictimSet:
    """The victims of one victim seed (search and held-out attacks) and what the final
    evaluation measures against them once: their membership-inference AUC (sequela)."""

    seed: int
    victims: list[Victim]
    mia: dict[str, float] | None


def victim_sets(spec: ExperimentSpec, first: list[Victim], splits: Splits, jobs: JobMap | None = None
                ) -> list[VictimSet]:
    """One set per ``--victim-seeds`` (the first is the search's victims; the others built once
    and stored); with ``--sequela``, each victim's membership-inference AUC. ``jobs`` runs the
    builds and measurements (None: here, one after another)."""
    device = torch.device(spec.zoo.device)
    sets = []
    for i in range(spec.victim_seeds):
        victims = first if i == 0 else get_victims(
            dataclasses.replace(spec.victims, victim_seed=spec.seed + i), splits=splits, jobs=jobs)
        mia = mia_before(victims, splits, seed=spec.seed, device=device,
                         precision=spec.zoo.precision, jobs=jobs) if spec.sequela else None
        sets.append(VictimSet(spec.seed + i, victims, mia))
    return sets


def final_evaluation(spec: ExperimentSpec, params: dict[str, Any], sets: list[VictimSet],
                     splits: Splits, jobs: JobMap | None = None) -> list[dict[str, Any]]:
    """``run_config`` on test for each victim seed and each defense seed: one run each,
    ``{"victim_seed", "defense_seed", "per_attack": {attack: {before, after, ...}}}``. Each
    victim and seed is one job of ``jobs`` (None: here, one after another)."""
    params = searched_params(spec, params)
    seeds = range(spec.seed, spec.seed + spec.final_seeds)
    cells = [(vs, seed) for vs in sets for seed in seeds]
    results = iter(in_order(jobs or SerialMap(spec.zoo.device), final_job,
                            [(spec.defense, params, v, seed, vs.mia, spec.zoo.precision)
                             for vs, seed in cells for v in vs.victims], splits=splits))
    return [{"victim_seed": vs.seed, "defense_seed": seed,
             "per_attack": {v.attack: next(results) for v in vs.victims}} for vs, seed in cells]


def references(spec: ExperimentSpec, sets: list[VictimSet], splits: Splits,
               jobs: JobMap | None = None) -> dict[str, Any]:
    """final.json's reference part: the undefended victims (test, per victim seed; val), the
    split sizes, and with ``--sequela`` the re-tuning attack's anchors (the clean model and
    the undefended victim, first victim seed)."""
    first = sets[0].victims
    out: dict[str, Any] = {
        "no_defense": {
            "runs": [{"victim_seed": vs.seed,
                      "per_attack": {v.attack: {**v.metrics["test"].as_dict(),
                                                **({"mia": vs.mia[v.attack]} if vs.mia else {})}
                                     for v in vs.victims}} for vs in sets],
            "val": {v.attack: v.metrics["val"].as_dict() for v in first}},
        "sizes": {"test_clean": len(splits.test), "val_clean": len(splits.val),
                  "test_triggered": {v.attack: len(v.bd_test) for v in first},
                  "val_triggered": {v.attack: len(v.bd_val) for v in first}},
        "poison_rates": {v.attack: v.poison_rate for v in first},
        "archs": {v.attack: v.arch for v in first},  # victims from elsewhere bring their own
        "anchors": None,
    }
    if spec.sequela and any(v.retunable for v in first):
        device = torch.device(spec.zoo.device)
        (clean,) = get_victims(dataclasses.replace(spec.victims, attacks=("none",)),
                               splits=splits, jobs=jobs)
        out["anchors"] = anchors(first, clean, splits, seed=spec.seed, device=device,
                                 precision=spec.zoo.precision, jobs=jobs)
    return out


def max_epochs_of_space(spec: ExperimentSpec, space: Space) -> int:
    """The ASHA horizon: the most epochs any configuration of the space (or its default) runs."""
    dist = space.distributions.get("epochs")
    high = 0 if dist is None else int(max(dist.choices) if hasattr(dist, "choices")
                                        else dist.high)  # type: ignore[attr-defined]
    cfg = resolve_config(spec.defense, space.default, spec.zoo.dataset, spec.max_epochs)
    high = max(high, int(cfg.epochs))
    return min(high, spec.max_epochs) if spec.max_epochs else high


def _resume_hint(spec: ExperimentSpec) -> str:
    return (f"python -m tuner --defense {spec.defense} --output {spec.output} "
            f"--name {spec.name} --resume")


class _RayInBackground:
    """Ray imported and started in a thread while the driver loads the victims, and stopped in
    one while it writes the results, so that neither costs the run wall time when there is
    other work to hide it behind. ``waited`` is the time the driver still waited for them.

    It is also the run's ``zoo.runtime.JobMap``: jobs run as Ray tasks
    (``tuner.trainable.RayMap``), waiting for Ray only when there is a job to run (victims all
    in the store need none).

    One worker thread runs the start, then the stop, in that order. Leaving the ``with`` block
    (normally or by an exception, Ctrl-C included) stops Ray if it is not stopping yet and
    waits until it has.
    """

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec, self.waited = spec, 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ray")
        self._start: Future | None = None
        self._stop: Future | None = None
        self._map: JobMap | None = None

    def __enter__(self) -> _RayInBackground:
        self._start = self._pool.submit(self._start_ray)
        return self

    def _start_ray(self) -> tuple[Any, bool]:
        if self.spec.address is None:  # read by Ray when it is imported, just below
            keep_local_ray_on_loopback()
        from tuner import trainable  # imports ray: ~0.7 s, hidden here too

        return trainable, trainable.start_ray(self.spec)

    def ready(self) -> Any:
        """Wait until Ray is up; the ``tuner.trainable`` module (start errors re-raise here)."""
        assert self._start is not None
        t = time.perf_counter()
        try:
            trainable = self._start.result()[0]
        finally:
            self.waited += time.perf_counter() - t
        sigterm_as_ctrl_c()  # again: ray.init replaced it with Ray's fatal-signal handler
        if self.spec.address is not None and self.spec.gpus_per_trial is None:
            self.spec = trainable.on_cluster(self.spec)  # the joined cluster's GPUs decide
        return trainable

    def __call__(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], **shared: Any
                 ) -> Iterator[tuple[int, Any]]:
        if self._map is None:
            self._map = self.ready().RayMap(self.spec)
        return self._map(fn, jobs, **shared)

    @property
    def cpu_seconds(self) -> float:
        return self._map.cpu_seconds if self._map is not None else 0.0

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


def _final(spec: ExperimentSpec, best: TrialRecord | None, default: dict[str, Any],
           default_runs: list[dict[str, Any]], sets: list[VictimSet], splits: Splits,
           refs: dict[str, Any], val_default: float | None, jobs: JobMap) -> dict[str, Any]:
    """final.json: the default's runs (measured before the search), the best's, the
    references (no defense, sizes, anchors)."""
    out: dict[str, Any] = {
        "format": FINAL_FORMAT,
        "default": {"params": searched_params(spec, default), "val_score": val_default,
                    "runs": default_runs},
        "best": None, **refs,
    }
    if best is not None:
        same = best.params == default
        if not same:
            print(f"final evaluation of the best configuration (trial {best.number}) on test: "
                  f"{_runs_text(spec, sets)}", flush=True)
        runs = default_runs if same else final_evaluation(spec, best.params, sets, splits, jobs)
        out["best"] = {"params": searched_params(spec, best.params), "val_score": best.score,
                       "trial": best.number, "runs": runs}
    return out


def _runs_text(spec: ExperimentSpec, sets: list[VictimSet]) -> str:
    seeds = f"{spec.final_seeds} seed(s)" + (f" x {len(sets)} victim seeds" if len(sets) > 1
                                             else "")
    return f"{seeds} x {len(sets[0].victims)} victims" + (", with sequela" if spec.sequela
                                                            else "")


def run_search(spec: ExperimentSpec, *, epochs_fn: Callable[..., Iterator[dict]] | None = None
               ) -> Path:
    """Run (or continue, with ``spec.resume``) the search; return the run directory.

    ``epochs_fn`` replaces each trial's ``tuner.evaluation.trial_epochs`` (tests use it to
    make trials fail, diverge or take longer).
    """
    t0 = time.perf_counter()
    spec.check_world()
    # One search per run folder for the search's whole life; checked again under the lock, as
    # another search may have started in it since check_world. A refusal before the search
    # writes spec.json leaves no folder behind (RunLock).
    with RunLock(spec.run_dir):
        spec.check_run_dir()
        return _run(spec, t0, epochs_fn)


def _run(spec: ExperimentSpec, t0: float, epochs_fn: Callable[..., Iterator[dict]] | None
         ) -> Path:
    space = spec.load_space()
    splits = spec.zoo.load_splits()
    prepare_attacks(spec.victims, None, splits)  # bad data or attacks fail here, before Ray
    sampler = S.sampler_settings(spec.seed, spec.num_samples)
    started = provenance(sampler)
    run = spec.run_dir
    with _RayInBackground(spec) as ray_bg:
        victims, holdout, victim_s = _load_victims(spec, splits, ray_bg)

        # The paper default's test evaluation does not depend on the search: it runs first,
        # as Ray tasks (one per victim and seed) in every slot the search will use.
        default = dict(space.default)
        t2, cpu2 = time.perf_counter(), ray_bg.cpu_seconds
        sets = victim_sets(spec, [*victims, *holdout], splits, ray_bg)
        print(f"final evaluation of the paper default on test: {_runs_text(spec, sets)}",
              flush=True)
        default_runs = final_evaluation(spec, default, sets, splits, ray_bg)
        refs = references(spec, sets, splits, ray_bg)
        final_s, final_cpu = time.perf_counter() - t2, ray_bg.cpu_seconds - cpu2

        trainable = ray_bg.ready()
        t1 = time.perf_counter()
        spec = ray_bg.spec  # --address without --gpus-per-trial: resolved from its GPUs
        slots = trainable.max_concurrent(spec)  # a cluster that fits no trial: refused here
        # Written once the search can start: a refusal or Ctrl-C before leaves nothing.
        if not spec.resume:
            write_json(run / "spec.json", {**spec.to_dict(), "provenance": started})
        write_json(run / "space.json", space_to_json(space))
        # Trials get only what they use (no train/test split, no triggered test sets).
        trial_victims, trial_splits = trial_payload(victims, splits, retune=spec.objective == "robust")
        records = trainable.run_tune(spec, space, trial_victims, trial_splits, sampler=sampler,
                                     max_t=max_epochs_of_space(spec, space), epochs_fn=epochs_fn)
        search_s = time.perf_counter() - t1
        write_json(run / "trials.json", [r.to_json() for r in records])
        finished = sum(r.state != "incomplete" for r in records)
        # A time budget (--budget-seconds) that ran out ends the search with fewer trials.
        out_of_time = spec.budget_seconds is not None and search_s >= spec.budget_seconds
        if finished < spec.num_samples and not out_of_time:
            print(f"search stopped after {finished}/{spec.num_samples} trials; continue it with:\n"
                  f"  {_resume_hint(spec)}", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        S.export(run / "study.db", records, space.distributions, spec.objective, str(spec.name),
                 max_acc_drop=spec.max_acc_drop)

        best = pick_best(records, spec.objective, spec.max_acc_drop)
        val_default = next((r.score for r in records if r.params == default), None)
        if best is None:
            print("no trial finished without error or divergence: only the default is evaluated",
                  file=sys.stderr)
        t2, cpu2 = time.perf_counter(), ray_bg.cpu_seconds
        final = _final(spec, best, default, default_runs, sets, splits, refs, val_default, ray_bg)
        final_s += time.perf_counter() - t2
        final_cpu += ray_bg.cpu_seconds - cpu2
    write_json(run / "final.json", final)
    write_json(run / "timing.json", timing(
        wall=time.perf_counter() - t0, victims=victim_s, search=search_s, final=final_s,
        ray_waited=ray_bg.waited, records=records, slots=slots, final_cpu=final_cpu,
        victims_built=sum(bool(v.built) for vs in sets for v in vs.victims)))
    report = write_report(run)
    _print_end(spec, report, final, time.perf_counter() - t0)
    return run


def timing(*, wall: float, victims: float, search: float, final: float, ray_waited: float,
           records: Sequence[TrialRecord], slots: int, final_cpu: float = 0.0,
           victims_built: int = 0) -> dict[str, Any]:
    """``timing.json``. The Ray overhead share is the part of the search's wall time (the
    search, plus what the driver waited for Ray to start or stop) that its ``slots`` did not
    spend computing trials: ``1 - sum(trial seconds) / (slots * wall)``. Cost: the trials'
    CPU seconds and device-seconds (``TrialRecord``), their peak GPU memory, the final
    evaluations' CPU seconds (their Ray tasks') and the victims built by this run."""
    compute = sum(r.seconds for r in records)
    search_wall = search + ray_waited
    share = max(0.0, 1.0 - compute / (slots * search_wall)) if search_wall > 0 and slots else 0.0
    return {"wall_seconds": wall, "victims_seconds": victims, "search_seconds": search,
            "final_seconds": final, "ray_wait_seconds": ray_waited, "trials": len(records),
            "trial_seconds": compute, "slots": slots, "ray_overhead_share": share,
            "trial_cpu_seconds": sum(r.cpu_seconds or 0.0 for r in records),
            "device_seconds": sum(r.device_seconds or 0.0 for r in records),
            "gpu_peak_mb": max((r.gpu_peak_mb for r in records if r.gpu_peak_mb), default=0.0),
            "final_cpu_seconds": final_cpu, "victims_built": victims_built}


def _print_end(spec: ExperimentSpec, report: Path, final: dict[str, Any], wall: float) -> None:
    print(f"\ndone in {wall:.0f}s. report: {report}")
    print(console_summary(report.parent))
    print(f"  (config file: {report.parent / 'best_config.json'})", flush=True)

