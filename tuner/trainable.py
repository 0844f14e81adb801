"""The thin Tune layer, and the only module of the project that imports ``ray``.

- ``trial``: the function trainable. One configuration, every search victim, epoch by epoch
  (``tuner.evaluation.trial_epochs``); after each epoch it calls ``tune.report`` with the
  objective value(s), ``score``, per-attack ``<attack>/acc|asr|ra|der``, ``diverged``,
  ``finished`` (ran its planned epochs or diverged), ``epoch``, ``started_at`` and ``node``.
- ``run_tune``: OptunaSearch (seeded TPE, paper default enqueued first, in-memory study) +
  ASHA or FIFO + ``tune.Tuner``, fresh or restored, and the trial records of ``trials.json``.

Pruning. ASHA-stopped trials would reach Optuna as COMPLETE with an early, lower value.
``PruneAwareOptunaSearch`` tells Optuna they were PRUNED instead (Optuna then ranks them by
their last intermediate value), so TPE does not learn "short trials are bad configurations".
In multi-objective (pareto) runs Optuna keeps no intermediate values: pruned trials carry no
values there and TPE ignores them.

Only ``tuner.search`` imports this module, inside ``run_search`` (in the background thread
that starts Ray), and a local Ray's workers preload it: ``python -m tuner --help`` and flag
validation never pay for importing Ray.

Test hook. ``BACKDOOR_TUNER_FAULT`` (read by ``trial`` in the worker, inherited from the driver's
environment) injects faults into the production code path, for the reliability tests:
``raise:trial=N`` makes the N-th created trial (1-based) raise at its first epoch, every attempt;
``slow:seconds=S`` sleeps S seconds after each epoch of every trial (to interrupt a search
mid-way). Several faults join with ``;``. Unset (the normal case), nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from tuner.errors import UsageError
from tuner.spec import check_reachable

if TYPE_CHECKING:
    from tuner.spec import ExperimentSpec

__all__ = ["gpu_memory_fraction", "max_concurrent", "ray_session", "run_tune", "start_ray", "stop_ray",
           "torch_threads", "trial"]

SCORE = "score"  # what ASHA ranks by, and the progress line shows (pareto: the mean rule)
OBJECT_STORE_CAP = 1 << 30  # bytes; victims and splits of one run are far smaller
JOIN_TIMEOUT_S = 10.0
FAULT_ENV = "BACKDOOR_TUNER_FAULT"  # test hook, see the module docstring
RAY_KEYS = ("epoch", SCORE, "diverged", "finished", "started_at", "node", "time_total_s")


# -- pure helpers (tested without Ray) ------------------------------------------------------
def torch_threads(cpus_per_trial: float) -> int:
    """One torch thread per whole CPU the trial holds, at least one."""
    return max(1, int(cpus_per_trial))


def gpu_memory_fraction(gpus_per_trial: float) -> float | None:
    """The share of one GPU's memory a trial may use: its GPU share; None for whole GPUs/CPU."""
    if gpus_per_trial <= 0 or gpus_per_trial >= 1:
        return None
    return float(gpus_per_trial)


def value_names(objective: str) -> list[str]:
    """Metric names of what Optuna optimizes (1 value, 2 for pareto)."""
    return ["value_0", "value_1"] if objective == "pareto" else ["value_0"]


def concurrency(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """How many trials of (cpus, gpus) fit in ``resources`` at once."""
    fit = int(resources.get("CPU", 0) / cpus + 1e-9)
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0) / gpus + 1e-9))
    return fit


def flatten(per_attack: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{a}/{k}": float(v) for a, m in per_attack.items() for k, v in m.items()}


def unflatten(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        attack, sep, name = str(key).partition("/")
        if sep and name in ("acc", "asr", "ra", "der") and value == value:  # skip NaN
            out.setdefault(attack, {})[name] = float(value)
    return out


def epoch_metrics(item: dict[str, Any], objective: str, planned: int) -> dict[str, Any]:
    """What one ``tune.report`` carries for one epoch of ``trial_epochs``.

    A diverged victim already carries worst-case metrics (tuner.evaluation), so the values
    stay finite; anything non-finite becomes the objective's sentinel (Optuna refuses NaN).
    """
    from tuner import objective as obj

    diverged = bool(item["diverged"])
    per_attack = item["per_attack"]
    values = [float(v) for v in obj.values(per_attack, objective)]
    score = float(obj.score(per_attack, objective))
    if not all(math.isfinite(v) for v in [*values, score]):
        values, score, diverged = obj.diverged_values(objective), float(obj.DIVERGED_SCORE), True
    epoch = int(item["epoch"])
    return {"epoch": epoch, SCORE: score, **dict(zip(value_names(objective), values)),
            **flatten(per_attack), "diverged": diverged,
            "finished": diverged or epoch >= planned}


def planned_epochs(spec: dict[str, Any], params: dict[str, Any]) -> int:
    """The epochs this configuration runs (its ``epochs``, capped by ``--max-epochs``)."""
    from tuner.evaluation import resolve_config

    return int(resolve_config(spec["defense"], params, spec["dataset"], spec["max_epochs"]).epochs)


def max_epochs_of_space(spec: ExperimentSpec, space: Any) -> int:
    """The ASHA horizon: the most epochs any configuration of the space (or its default) runs."""
    from tuner.evaluation import resolve_config

    dist = space.distributions.get("epochs")
    high = 0 if dist is None else int(max(dist.choices) if hasattr(dist, "choices") else dist.high)
    cfg = resolve_config(spec.defense, space.default, spec.dataset, spec.max_epochs)
    high = max(high, int(cfg.epochs))
    return min(high, spec.max_epochs) if spec.max_epochs else high


def parse_fault(text: str) -> dict[str, float]:
    """``"raise:trial=2;slow:seconds=0.5"`` -> ``{"raise": 2.0, "slow": 0.5}``; "" -> {}."""
    faults: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kind, _, arg = part.partition(":")
        key, _, value = arg.partition("=")
        expected = {"raise": "trial", "slow": "seconds"}.get(kind)
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if expected is None or key != expected or not number >= 0:
            raise UsageError(f"{FAULT_ENV}={text!r}: expected raise:trial=N or slow:seconds=S, "
                             "joined by ';'")
        faults[kind] = number
    return faults


def trial_number(trial_dir: str, trial_id: str) -> int | None:
    """The 1-based creation index of a trial, from its folder name ``<fn>_<id>_<N>_<params>``."""
    tail = os.path.basename(trial_dir.rstrip("/")).partition(f"_{trial_id}_")[2]
    head = tail.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _inject(faults: dict[str, float], epoch: int) -> None:
    """Apply the test hook's faults for this epoch of this trial (no-op when unset)."""
    if "raise" in faults and epoch == 1:
        ctx = tune.get_context()
        number = trial_number(ctx.get_trial_dir(), ctx.get_trial_id())
        if number == int(faults["raise"]):
            raise RuntimeError(f"injected fault in trial {number} ({FAULT_ENV})")
    if "slow" in faults:
        time.sleep(faults["slow"])


# -- the trainable --------------------------------------------------------------------------
def trial(config: dict[str, Any], *, victims: list[Any], splits: Any, spec_dict: dict[str, Any],
          epochs_fn: Callable[..., Iterator[dict[str, Any]]] | None = None) -> None:
    """One configuration on every victim; reports after each epoch (see module docstring)."""
    import torch

    from zoo.runtime import keep_freed_memory

    keep_freed_memory()  # once per worker process; a reused worker's later trials skip it
    torch.set_num_threads(torch_threads(spec_dict["cpus_per_trial"]))
    device = torch.device("cuda" if spec_dict["gpus_per_trial"] > 0
                          and torch.cuda.is_available() else "cpu")
    fraction = gpu_memory_fraction(spec_dict["gpus_per_trial"])
    if device.type == "cuda" and fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    if epochs_fn is None:
        from tuner.evaluation import trial_epochs as epochs_fn
    params = dict(config)
    planned = planned_epochs(spec_dict, params)
    extra = {"started_at": time.time(), "node": ray.get_runtime_context().get_node_id()}
    faults = parse_fault(os.environ.get(FAULT_ENV, ""))
    # Only passed when set, so a test's epochs_fn need not know the keyword.
    subsample = spec_dict.get("val_subsample")
    extra_kw: dict[str, Any] = {"val_subsample": subsample} if subsample else {}
    if spec_dict.get("precision", "auto") != "auto":
        extra_kw["precision"] = spec_dict["precision"]
    for item in epochs_fn(spec_dict["defense"], params, victims, splits, seed=spec_dict["seed"],
                          device=device, max_epochs=spec_dict["max_epochs"], **extra_kw):
        _inject(faults, int(item["epoch"]))
        tune.report({**epoch_metrics(item, spec_dict["objective"], planned), **extra})


# -- Ray session ----------------------------------------------------------------------------
# What a trial's worker imports. A local Ray's prestarted workers import it while the driver
# loads the victims (Ray's ``preload_python_modules``), so a trial actor does not spend its first
# seconds importing torch, Tune and the defense: on 2 cores that was ~2.9 s of every search.
# torch._dynamo (0.8 s, sympy included) is imported by the first torch.optim optimizer built.
PRELOAD_MODULES = ("tuner.trainable", "tuner.evaluation", "zoo.victims", "torch._dynamo")


def local_init_kwargs(num_cpus: int, preload: tuple[str, ...] = ()) -> dict[str, Any]:
    """``ray.init`` arguments for the local Ray the tool starts: no dashboard (so nothing
    listens beyond Ray's own ports), no log forwarding, a capped object store, and the
    modules its workers import at start-up."""
    kwargs: dict[str, Any] = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False,
                              "log_to_driver": False, "logging_level": logging.ERROR,
                              "object_store_memory": OBJECT_STORE_CAP}
    if preload:
        kwargs["_system_config"] = {"preload_python_modules": list(preload)}
    return kwargs


def start_ray(spec: ExperimentSpec) -> bool:
    """Join ``--address`` or start a local Ray; True if this call did (and ``stop_ray`` should
    stop it), False if Ray was already initialized (tests, notebooks: used as is)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read by ray.init: no telemetry
    if spec.address is None:
        preload = (*PRELOAD_MODULES, f"defenses.{spec.defense}")
        ray.init(**local_init_kwargs(os.cpu_count() or 1, preload))
        return True
    if spec.address != "auto":
        check_reachable(spec.address, JOIN_TIMEOUT_S)
    try:
        ray.init(address=spec.address, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--address {spec.address}: cannot join the Ray cluster: {first}") from None
    return True


def stop_ray() -> None:
    """Stop the local Ray (or leave the cluster) that ``start_ray`` started or joined."""
    ray.shutdown()


@contextlib.contextmanager
def actors_on_prestarted_workers(enabled: bool = True) -> Iterator[bool]:
    """Let Tune create its trial actors without its per-actor ``runtime_env``; yields whether
    it does.

    Tune registers every trainable with ``runtime_env={"env_vars": {"PL_DISABLE_FORK": "1"}}``
    (PyTorch Lightning's fork switch, plus cloud keys and Ray Train flags when they are set).
    An actor with a ``runtime_env`` cannot use the workers Ray prestarted at ``ray.init`` (which
    imported ``PRELOAD_MODULES`` while the driver loaded the victims), so each trial slot started
    a fresh process and spent ~2 s of the search importing torch and Tune. Our trainable uses
    neither Lightning nor those variables: when none of them is set, Tune's actor-class cache
    registers trial actors plainly for the duration of the block. This relies on Ray 2.60's
    ``ray.tune.execution.class_cache``; where that differs, nothing changes (the slow start).
    """
    try:
        from ray.tune.execution import class_cache

        cache_cls, propagate = class_cache._ActorClassCache, class_cache.ENV_VARS_TO_PROPAGATE
        original = cache_cls.get
    except (ImportError, AttributeError):
        enabled = False
    if not enabled or any(name in os.environ for name in propagate):
        yield False
        return

    def get(self: Any, trainable_cls: type) -> Any:
        cache = self.__dict__.setdefault("_cache", {})
        if trainable_cls not in cache:
            cache[trainable_cls] = ray.remote(trainable_cls)
        return cache[trainable_cls]

    cache_cls.get = get
    try:
        yield True
    finally:
        cache_cls.get = original


@contextlib.contextmanager
def ray_session(spec: ExperimentSpec) -> Iterator[None]:
    """``start_ray`` ... ``stop_ray`` around the block (an already running Ray stays up)."""
    started = start_ray(spec)
    try:
        yield
    finally:
        if started:
            stop_ray()


# -- search components ----------------------------------------------------------------------
class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that records scheduler-stopped trials as PRUNED, not COMPLETE."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if error or not result or result.get("finished", True) or \
                trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        import optuna

        try:  # single objective: Optuna takes the last intermediate value as the trial's
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # bookkeeping must never kill the search
            logging.getLogger(__name__).warning("optuna tell failed: %s", exc)
        self._completed_trials.add(trial_id)


def build_searcher(spec: ExperimentSpec, space: Any) -> Any:
    import optuna

    from tuner import objective as obj

    directions = obj.directions(spec.objective)
    modes = ["max" if d == "maximize" else "min" for d in directions]
    names = value_names(spec.objective)
    multi = len(names) > 1
    sampler = optuna.samplers.TPESampler(seed=spec.seed, multivariate=True,
                                         n_startup_trials=max(2, min(10, spec.num_samples // 3)))
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created" line
    try:
        return PruneAwareOptunaSearch(
            space=dict(space.distributions), metric=names if multi else names[0],
            mode=modes if multi else modes[0], points_to_evaluate=[dict(space.default)],
            sampler=sampler)
    finally:
        optuna.logging.set_verbosity(old)


def build_scheduler(spec: ExperimentSpec, max_t: int) -> Any:
    if spec.scheduler == "fifo" or max_t < 2:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", metric=SCORE, mode="max",
                         max_t=max_t, grace_period=1 if max_t < 6 else 2, reduction_factor=3)


class ProgressCallback(tune.Callback):
    """One compact line per finished trial: k/N, its score, the best so far.

    Stateless apart from settings, so the copy Tune restores with ``--resume`` counts right.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples

    def _line(self, trials: list[Trial], trial: Trial, tag: str) -> None:
        done = [t for t in trials if t is trial or t.status in (Trial.TERMINATED, Trial.ERROR)]
        scores = [t.last_result[SCORE] for t in done if t.last_result.get(SCORE) is not None]
        r = trial.last_result or {}
        own = f"{r[SCORE]:7.2f}" if r.get(SCORE) is not None else "      -"
        best = f"{max(scores):7.2f}" if scores else "      -"
        print(f"  trial {len(done):>3}/{self.num_samples}  score {own}  best {best}  "
              f"epochs {r.get('epoch', 0):>3}  {r.get('time_total_s', 0):5.0f}s  {tag}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        r = trial.last_result or {}
        tag = "diverged" if r.get("diverged") else ("" if r.get("finished", True) else "pruned")
        self._line(trials, trial, tag)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._line(trials, trial, "error")


# -- the run ----------------------------------------------------------------------------------
def _trainable(spec: ExperimentSpec, victims: list[Any], splits: Any,
               epochs_fn: Callable[..., Iterator[dict]] | None) -> Any:
    spec_dict = {k: getattr(spec, k) for k in ("defense", "dataset", "objective", "seed",
                                               "max_epochs", "cpus_per_trial", "gpus_per_trial",
                                               "val_subsample", "precision")}
    kwargs: dict[str, Any] = {"victims": victims, "splits": splits, "spec_dict": spec_dict}
    if epochs_fn is not None:
        kwargs["epochs_fn"] = epochs_fn
    fn = tune.with_parameters(trial, **kwargs)
    return tune.with_resources(fn, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})


def max_concurrent(spec: ExperimentSpec) -> int:
    """How many trials run at once: as many as fit in the cluster, capped by --max-concurrent."""
    resources = ray.cluster_resources()
    fit = concurrency(resources, spec.cpus_per_trial, spec.gpus_per_trial)
    if fit < 1:
        have = f"{resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
        raise UsageError(f"--cpus-per-trial {spec.cpus_per_trial:g} / --gpus-per-trial "
                         f"{spec.gpus_per_trial:g}: no trial fits in the cluster ({have})")
    return min(fit, spec.max_concurrent) if spec.max_concurrent else fit


def _new_tuner(spec: ExperimentSpec, space: Any, trainable: Any, max_t: int, limit: int) -> Any:
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(num_samples=spec.num_samples, max_concurrent_trials=limit,
                                    search_alg=build_searcher(spec, space),
                                    scheduler=build_scheduler(spec, max_t), reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(spec.run_dir), name="ray", verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2),
                                  callbacks=[ProgressCallback(spec.num_samples),
                                             JsonLoggerCallback(), CSVLoggerCallback()]),
    )


def run_tune(spec: ExperimentSpec, space: Any, victims: list[Any], splits: Any, *,
             max_t: int | None = None,
             epochs_fn: Callable[..., Iterator[dict]] | None = None) -> list[dict[str, Any]]:
    """Run (or with ``spec.resume`` continue) the search; return the trial records.

    Needs a Ray session (``ray_session``). ``epochs_fn`` replaces ``trial_epochs`` (tests).
    A record's ``state`` is ``complete``, ``pruned``, ``diverged``, ``error`` or
    ``incomplete`` (interrupted before it ended).
    """
    # Save the experiment state often: a killed driver then loses at most ~1 s of trials.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Tune's new console output prints a header table even at verbose=0; the classic one is
    # silent there, and ProgressCallback prints our one line per trial instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own loggers: JSON (what ExperimentAnalysis reads back) and CSV, passed in
    # ``_new_tuner``; not its TensorBoard one, which imported tensorboardX and wrote an event per
    # metric on the driver (~0.3 s of a 2-core machine's CPU per default search, taken from the
    # trials). The report's plots and ``study.db`` take its place.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    max_t = max_t or max_epochs_of_space(spec, space)
    limit = max_concurrent(spec)
    trainable = _trainable(spec, victims, splits, epochs_fn)
    path = spec.run_dir / "ray"
    if spec.resume and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        print(f"resuming {path}", flush=True)
    else:
        tuner = _new_tuner(spec, space, trainable, max_t, limit)
    print(f"search: {spec.num_samples} trials of {spec.defense} on {len(victims)} victims, "
          f"up to {limit} at once, {spec.scheduler} (max {max_t} epochs)", flush=True)
    with actors_on_prestarted_workers(spec.address is None):
        tuner.fit()
    # Read the states back from the experiment as saved: in a restored run the in-memory
    # result of a trial finished before the interruption can lack its "done" flag.
    analysis = tune.ExperimentAnalysis(str(path))
    frames = analysis.trial_dataframes
    trials = sorted(analysis.trials, key=_creation_index)
    return [_record(t, frames.get(t.trial_id), spec.objective) for t in trials]


def _creation_index(t: Trial) -> int:
    """Tune's experiment tag starts with the trial's 1-based creation index ("3_lr=...")."""
    head = str(t.experiment_tag).split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def _record(t: Trial, df: Any, objective: str) -> dict[str, Any]:
    m = dict(t.last_result or {})
    history = []
    if df is not None and len(df):
        keep = [c for c in df.columns if c in RAY_KEYS or c.startswith("value_")
                or ("/" in c and not c.startswith("config/"))]
        history = [{k: _plain(v) for k, v in row.items()} for row in df[keep].to_dict("records")]
    if t.status == Trial.ERROR:
        state = "error"
    elif t.status != Trial.TERMINATED:
        state = "incomplete"
    elif m.get("diverged"):
        state = "diverged"
    else:
        state = "complete" if m.get("finished", True) else "pruned"
    err = t.get_error() if state == "error" else None
    error = None if state != "error" else (
        (str(err).strip().splitlines() or ["error"])[-1] if err else "trial failed")
    return {
        "trial_id": t.trial_id,
        "params": {k: _plain(v) for k, v in (t.config or {}).items()},
        "state": state, "epochs": int(m.get("epoch", 0) or 0),
        "score": _plain(m.get(SCORE)),
        "values": [_plain(m[k]) for k in value_names(objective) if k in m],
        "per_attack": unflatten(m), "diverged": bool(m.get("diverged", False)), "error": error,
        "seconds": float(m.get("time_total_s", 0.0) or 0.0), "node": m.get("node"),
        "started_at": _plain(m.get("started_at")), "history": history,
    }


def _plain(value: Any) -> Any:
    """numpy scalars -> Python; NaN -> None (JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
