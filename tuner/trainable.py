"""The thin Tune layer, and the only module of the project that imports ``ray``.

- :func:`trial`, the function trainable: one configuration on every search victim, epoch by
  epoch (``tuner.evaluation.trial_epochs``), a ``tune.report`` after each epoch
  (:func:`tuner.records.epoch_report`);
- :class:`OptunaSearcher`: Tune's public ``Searcher`` interface over :class:`tuner.study.AskTell`
  (Optuna's ask-and-tell), so ASHA-stopped trials reach Optuna as PRUNED;
- :func:`run_tune`: the ``tune.Tuner`` (fresh or restored), and the trials as records.

Only ``tuner.search`` imports this module (in a background thread that starts Ray), so
``python -m tuner --help`` and flag validation never pay for importing Ray. Public Ray and
Optuna APIs only.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from tuner.errors import UsageError
from tuner.evaluation import CostMeter, planned_epochs, seeded_epochs, trial_epochs
from tuner.records import SCORE, TrialRecord, epoch_report
from tuner.spec import RAY_STATE_HINT, ExperimentSpec, check_reachable
from tuner.study import AskTell
from tuner.tracking import local_store
from zoo.runtime import keep_freed_memory

__all__ = ["OptunaSearcher", "cluster_runtime_env", "max_concurrent", "run_tune", "start_ray",
           "stop_ray", "tracking_callbacks", "trial"]

NUMBER = "trial_number"  # config key carrying Optuna's trial number into the trial
OBJECT_STORE_CAP = 1 << 30  # bytes; victims and splits of one run are far smaller
JOIN_TIMEOUT_S = 10.0
EpochsFn = Callable[..., Iterator[dict[str, Any]]]


def trial(config: dict[str, Any], *, spec: ExperimentSpec, victims: list[Any], splits: Any,
          epochs_fn: EpochsFn | None = None) -> None:
    """One configuration on every victim; reports after each epoch. ``epochs_fn`` replaces
    ``tuner.evaluation.trial_epochs`` (tests install failing or slow ones)."""
    keep_freed_memory()  # once per worker process (a process setting)
    torch.set_num_threads(max(1, int(spec.cpus_per_trial)))
    cuda = spec.gpus > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and spec.gpus < 1:  # a GPU share caps the trial's memory to its share
        torch.cuda.set_per_process_memory_fraction(spec.gpus, device)
    params = {k: v for k, v in config.items() if k != NUMBER}
    planned = planned_epochs(spec.defense, params, spec.zoo.dataset, spec.max_epochs)
    extra = {"started_at": time.time(), "node": ray.get_runtime_context().get_node_id()}
    meter = CostMeter(device)
    # The undefended val ACC, what --max-acc-drop measures against (test stand-ins have none).
    reference = {v.attack: float(v.metrics["val"].acc) for v in victims
                 if getattr(v, "metrics", None)}
    seeds = list(range(spec.seed, spec.seed + spec.trial_seeds))  # --trial-seeds
    for item in seeded_epochs(
            epochs_fn or trial_epochs, spec.defense, params, victims, splits, seeds=seeds,
            clean_ratio=spec.zoo.clean_ratio, device=device, max_epochs=spec.max_epochs,
            val_subsample=spec.val_subsample, precision=spec.zoo.precision,
            retune=spec.objective == "robust"):
        tune.report({**epoch_report(item, spec.objective, planned, reference), **extra,
                     **meter.read(spec.gpus)})


def preload() -> None:
    """Ray's ``worker_process_setup_hook``: a local Ray's workers import what a trial needs
    when they start, while the driver loads the victims, not in the first trial."""
    import torch._dynamo  # noqa: F401  (the first torch.optim optimizer imports it)

    import defenses  # noqa: F401
    import tuner.evaluation  # noqa: F401


# -- Ray session ----------------------------------------------------------------------------
def start_ray(spec: ExperimentSpec) -> bool:
    """Join ``--address`` or start a local Ray; True if this call did (and ``stop_ray`` should
    stop it), False if Ray was already initialized (tests, notebooks: used as is)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read by ray.init: no telemetry
    if spec.address is None:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=OBJECT_STORE_CAP, log_to_driver=False,
                 logging_level=logging.ERROR,
                 runtime_env={"worker_process_setup_hook": "tuner.trainable.preload"})
        private_token()
        return True
    if spec.address != "auto":
        check_reachable(spec.address, JOIN_TIMEOUT_S)
    try:
        ray.init(address=spec.address, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env=cluster_runtime_env())
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--address {spec.address}: cannot join the Ray cluster: {first}") from None
    return True


def cluster_runtime_env() -> dict[str, Any]:
    """What a joined cluster's workers get: this driver's own ``tuner``, ``defenses`` and
    ``zoo`` packages, uploaded by Ray (``py_modules``) and put first on the workers' path, so
    trials run on nodes where the project is not installed, and never run another version of
    it. The workers still need the project's dependencies (torch, optuna, ray, numpy, PyYAML,
    safetensors: the same versions as the driver's)."""
    import defenses
    import tuner
    import zoo

    return {"py_modules": [tuner, defenses, zoo]}


def private_token(path: Path | None = None) -> None:
    """Ray's token authentication writes its cluster token to ``~/.ray/auth_token`` with the
    umask's mode (0644: readable by every local user, who could then join the cluster); make it
    the owner's only. A link is left alone (never chmod through it)."""
    path = path or Path.home() / ".ray" / "auth_token"
    try:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o600, follow_symlinks=False)
    except (OSError, NotImplementedError):
        pass  # not ours to fix (another user's file, a filesystem without modes)


def stop_ray() -> None:
    """Stop the local Ray (or leave the cluster) that ``start_ray`` started or joined."""
    ray.shutdown()


def max_concurrent(spec: ExperimentSpec) -> int:
    """How many trials run at once: as many as fit in the cluster, capped by --max-concurrent."""
    have = ray.cluster_resources()
    fit = int(have.get("CPU", 0) / spec.cpus_per_trial + 1e-9)
    if spec.gpus > 0:
        fit = min(fit, int(have.get("GPU", 0) / spec.gpus + 1e-9))
    if fit < 1:
        raise UsageError(f"--cpus-per-trial {spec.cpus_per_trial:g} / --gpus-per-trial "
                         f"{spec.gpus:g}: no trial fits in the cluster "
                         f"({have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU)")
    return min(fit, spec.max_concurrent) if spec.max_concurrent else fit


# -- search components ----------------------------------------------------------------------
class OptunaSearcher(Searcher):
    """Tune's ``Searcher`` over Optuna's ask-and-tell (:class:`tuner.study.AskTell`)."""

    def __init__(self, study: AskTell, metric: str) -> None:
        super().__init__(metric=metric, mode="max")
        self.study = study

    def suggest(self, trial_id: str) -> dict[str, Any]:
        number, params = self.study.ask(trial_id)
        return {**params, NUMBER: number}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.study.report(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        self.study.tell(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.study, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:  # Tune's own experiment state (see README)
            self.study = pickle.load(fh)


class ProgressCallback(tune.Callback):
    """One line per finished trial: its number, how many are done, its score, the best so far.

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
        print(f"  trial {trial.config.get(NUMBER, '?'):>3} done ({len(done):>3}/{self.num_samples})"
              f"  score {own}  best {best}  epochs {r.get('epoch', 0):>3}  "
              f"{r.get('time_total_s', 0):5.0f}s  {tag}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial,
                          **info: Any) -> None:
        r = trial.last_result or {}
        tag = "diverged" if r.get("diverged") else ("" if r.get("finished", True) else "pruned")
        self._line(trials, trial, tag)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._line(trials, trial, "error")


# -- tracking (--mlflow, --wandb) ---------------------------------------------------------------
def tracking_callbacks(spec: ExperimentSpec) -> list[tune.Callback]:
    """Ray Tune's own logger callbacks for ``--mlflow`` and ``--wandb``: each trial's config
    (its parameters and ``trial_number``, Optuna's number) and every epoch's report, at step =
    epoch. Tune calls them in the driver: an MLflow store or server must be reachable from the
    driver only. W&B runs offline, one run per trial under ``RUN/wandb``, grouped by NAME."""
    callbacks: list[tune.Callback] = []
    tags = {"defense": spec.defense, "objective": spec.objective, "dataset": spec.zoo.dataset,
            "attacks": ",".join(spec.attacks), "run_dir": str(spec.run_dir)}
    if spec.mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        if local_store(spec.mlflow) is not None and not spec.mlflow.startswith("sqlite:"):
            # MLflow 3 refuses a file store (in "maintenance mode") unless this opts in;
            # the user asked for one.
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        callbacks.append(MLflowLoggerCallback(tracking_uri=spec.mlflow,
                                              experiment_name=str(spec.name), tags=tags))
    if spec.wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        # Read by Tune before it asks for an API key (none is needed offline) and by wandb.
        os.environ["WANDB_MODE"] = "offline"
        callbacks.append(WandbLoggerCallback(
            project=spec.wandb, group=str(spec.name), mode="offline", dir=str(spec.run_dir),
            tags=[f"{k}:{v}" for k, v in tags.items() if k != "run_dir"]))
    return callbacks


# -- the run ----------------------------------------------------------------------------------
def _restore(path: str, local: Path | None, trainable: Any) -> tune.Tuner:
    """Tune's saved experiment, or one line saying it cannot be continued (a damaged searcher
    state otherwise makes Tune retry it for ever, a damaged tuner.pkl a traceback)."""
    def broken(what: str, exc: BaseException) -> UsageError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        return UsageError(f"--resume: Ray's saved search state in {path} is corrupt ({what}: "
                          f"{type(exc).__name__}: {first}); {RAY_STATE_HINT}")

    for state in sorted(local.glob("searcher-state-*.pkl"))[-1:] if local else []:
        try:  # what Tune itself would unpickle when it restores the searcher
            with open(state, "rb") as fh:
                pickle.load(fh)
        except Exception as exc:  # any unpickling failure means corrupt
            raise broken(state.name, exc) from None
    try:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    except Exception as exc:  # Tune raises many kinds on a damaged state
        raise broken("tuner.pkl", exc) from None


def run_tune(spec: ExperimentSpec, space: Any, victims: list[Any], splits: Any, *, max_t: int,
             sampler: dict[str, Any], epochs_fn: EpochsFn | None = None) -> list[TrialRecord]:
    """Run (or with ``spec.resume`` continue) the search in the running Ray session; return
    one record per trial, by trial number."""
    # Save the experiment state often: a killed driver then loses at most ~1 s of trials.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # The classic console output is silent at verbose=0; ProgressCallback prints our lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Only the JSON and CSV loggers given below (no TensorBoard writer on the driver).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    limit = max_concurrent(spec)
    fn = tune.with_parameters(trial, spec=spec, victims=victims, splits=splits,
                              epochs_fn=epochs_fn)
    trainable = tune.with_resources(fn, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus})
    path = spec.experiment_path  # --storage (a URI Tune's storage layer reaches) or run_dir/ray
    # Built (and their environment set) on --resume too, where Tune restores its saved copies.
    tracking = tracking_callbacks(spec)
    if spec.resume:  # tuner.spec.check_ray_state found a local state; can Tune read it?
        tuner = _restore(path, spec.local_experiment_dir, trainable)
        print(f"resuming {path}", flush=True)
    else:
        scheduler = FIFOScheduler() if spec.scheduler == "fifo" or max_t < 2 else ASHAScheduler(
            time_attr="training_iteration", metric=SCORE, mode="max", max_t=max_t,
            grace_period=1 if max_t < 6 else 2, reduction_factor=3)
        searcher = OptunaSearcher(AskTell(space.distributions, spec.objective, space.default,
                                          sampler, max_acc_drop=spec.max_acc_drop), metric=SCORE)
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            num_samples=spec.num_samples, max_concurrent_trials=limit, search_alg=searcher,
            time_budget_s=spec.budget_seconds,
            scheduler=scheduler, reuse_actors=True), run_config=tune.RunConfig(
            storage_path=path.rsplit("/", 1)[0], name=path.rsplit("/", 1)[1], verbose=0,
            failure_config=tune.FailureConfig(max_failures=2),
            callbacks=[ProgressCallback(spec.num_samples), JsonLoggerCallback(),
                       CSVLoggerCallback(), *tracking]))
    print(f"search: {spec.num_samples} trials of {spec.defense} on {len(victims)} victims, "
          f"up to {limit} at once, {spec.scheduler} (max {max_t} epochs)", flush=True)
    tuner.fit()
    # Read the states back from the experiment as saved: in a restored run the in-memory
    # result of a trial finished before the interruption can lack its "done" flag.
    analysis = tune.ExperimentAnalysis(path)
    frames = analysis.trial_dataframes
    records = []
    for t in analysis.trials:
        df = frames.get(t.trial_id)
        error = t.get_error() if t.status == Trial.ERROR else None
        records.append(TrialRecord.from_result(
            number=int(t.config.get(NUMBER, -1)), trial_id=t.trial_id,
            params={k: v for k, v in t.config.items() if k != NUMBER}, status=t.status,
            last=t.last_result or {}, objective=spec.objective,
            history=[] if df is None else df.to_dict("records"),
            error=(str(error).strip().splitlines() or ["trial failed"])[-1] if error else None))
    return sorted(records, key=lambda r: r.number)

