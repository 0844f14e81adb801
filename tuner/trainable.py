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

import ipaddress
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
from tuner.spec import AUTOSCALE_TRIALS, RAY_STATE_HINT, ExperimentSpec, check_reachable
from tuner.study import AskTell
from tuner.tracking import local_store
from zoo.runtime import keep_freed_memory

__all__ = ["OptunaSearcher", "RayMap", "asha_grace", "check_cuda", "cluster_runtime_env", "fitting",
           "max_concurrent", "on_cluster", "run_tune", "scored_epochs", "start_ray", "stop_ray",
           "tracking_callbacks", "trial", "worker_device"]

NUMBER = "trial_number"  # config key carrying Optuna's trial number into the trial
OBJECT_STORE_CAP = 1 << 30  # bytes; victims and splits of one run are far smaller
JOIN_TIMEOUT_S = 10.0
REDUCTION_FACTOR = 3  # ASHA's: a third of a rung's trials go on to the next
EpochsFn = Callable[..., Iterator[dict[str, Any]]]


def trial(config: dict[str, Any], *, spec: ExperimentSpec, victims: list[Any], splits: Any,
          max_t: int | None = None, epochs_fn: EpochsFn | None = None) -> None:
    """One configuration on every victim; reports after each scored epoch (:func:`scored_epochs`
    of the search's ``max_t``). ``epochs_fn`` replaces ``tuner.evaluation.trial_epochs`` (tests
    install failing or slow ones)."""
    device = worker_device(spec)
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
            scored=scored_epochs(spec, planned, max_t or planned),
            retune=spec.objective == "robust"):
        tune.report({**epoch_report(item, spec.objective, planned, reference), **extra,
                     **meter.read(spec.gpus)})


def asha_grace(spec: ExperimentSpec, max_t: int) -> int | None:
    """ASHA's first rung (grace period) for a search of ``max_t`` epochs; None where the
    search runs FIFO (``--scheduler fifo``, or a single epoch)."""
    if spec.scheduler == "fifo" or max_t < 2:
        return None
    return 1 if max_t < 6 else 2


def scored_epochs(spec: ExperimentSpec, planned: int, max_t: int) -> frozenset[int] | None:
    """The epochs a trial of ``planned`` epochs is scored on val at (``--val-epochs``): None
    (every epoch), or each ASHA rung below ``planned`` (grace period times a power of the
    reduction factor: a superset of the rungs Tune's scheduler keeps) and ``planned`` itself.
    ASHA decides at its rungs and Optuna reads the last result, so both see what they would
    with every epoch scored."""
    if spec.val_epochs == "every":
        return None
    grace = asha_grace(spec, max_t)
    rungs = set()
    while grace is not None and grace < planned:
        rungs.add(grace)
        grace *= REDUCTION_FACTOR
    return frozenset({*rungs, planned})


def check_cuda(gpus: float) -> None:
    """A trial given a GPU share runs on it or fails saying why, never silently on the node's
    CPU (a worker whose torch is a CPU build, or that sees no GPU driver)."""
    if torch.cuda.is_available():
        return
    node = ray.get_runtime_context().get_node_id()
    raise RuntimeError(
        f"trial given {gpus:g} GPU on node {ray.util.get_node_ip_address()} ({node[:12]}), but "
        f"torch {torch.__version__} there cannot use CUDA (torch.cuda.is_available() is False, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): expected a "
        "CUDA build of torch and a GPU driver on that node, or --gpus-per-trial 0")


def worker_device(spec: ExperimentSpec) -> torch.device:
    """Set up this Ray worker for a trial's or a job's resources: its torch threads, and on a
    GPU share its CUDA device (``spec.trial_device``), its memory capped to the share."""
    keep_freed_memory()  # once per worker process (a process setting)
    torch.set_num_threads(max(1, int(spec.cpus_per_trial)))
    device = torch.device(spec.trial_device)
    if device.type == "cuda":
        check_cuda(spec.gpus)  # a GPU share runs on its GPU or fails saying why, never on the CPU
        if spec.gpus < 1:
            torch.cuda.set_per_process_memory_fraction(spec.gpus, device)
    return device


def _job(fn: Callable[..., Any], spec: ExperimentSpec, *args: Any, **kwargs: Any
         ) -> tuple[Any, float]:
    """One job of :class:`RayMap`, in a Ray worker: ``fn``'s result and its CPU seconds."""
    device = worker_device(spec)
    start = time.process_time()
    out = fn(*args, device=device, **kwargs)
    return out, time.process_time() - start


class RayMap:
    """``zoo.runtime.JobMap`` over Ray tasks: victim builds and final evaluations run in
    parallel with a trial's resources (``--cpus-per-trial``, ``--gpus-per-trial``) on every
    node, the driver only sending them out and collecting their results. What the jobs share
    (the splits) and each distinct object in them (a victim evaluated with several seeds) is put
    in Ray's object store once. A job whose worker dies is retried by Ray; one that raises
    re-raises here."""

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec = spec
        self.cpu_seconds = 0.0

    def __call__(self, fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], **shared: Any
                 ) -> Iterator[tuple[int, Any]]:
        task = ray.remote(num_cpus=self.spec.cpus_per_trial, num_gpus=self.spec.gpus)(_job)
        refs: dict[int, Any] = {}

        def ref(obj: Any) -> Any:  # Ray resolves object refs given as top-level arguments
            if obj is None or isinstance(obj, (bool, int, float, str)):
                return obj
            if id(obj) not in refs:
                refs[id(obj)] = ray.put(obj)
            return refs[id(obj)]

        kwargs = {k: ref(v) for k, v in shared.items()}
        spec = ref(self.spec)
        pending = {task.remote(fn, spec, *map(ref, job), **kwargs): i
                   for i, job in enumerate(jobs)}
        try:
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                out, cpu = ray.get(done)
                self.cpu_seconds += cpu
                yield pending.pop(done), out
        finally:  # an error or Ctrl-C: the others are not wanted any more
            for left in pending:
                ray.cancel(left, force=True)


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
        context = ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                           object_store_memory=OBJECT_STORE_CAP, log_to_driver=False,
                           logging_level=logging.ERROR,
                           runtime_env={"worker_process_setup_hook": "tuner.trainable.preload"})
        private_token()
        info = getattr(context, "address_info", {})  # a RayContext (typed as its base class)
        if info.get("session_dir"):
            start_reaper(info["session_dir"])
        ip = info.get("node_ip_address") or "127.0.0.1"
        if not ipaddress.ip_address(ip).is_loopback:  # tuner._ray_compat came after import ray
            print(f"warning: the local Ray listens on all interfaces (node IP {ip}): ray was "
                  "imported before the search could keep it on loopback", file=sys.stderr)
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


def start_reaper(session_dir: str) -> None:
    """Start ``tuner/_reaper.py``, which stops this local Ray's processes if the driver dies
    without stopping them (``kill -9``: Ray's agents otherwise outlive it by a minute). It
    detaches itself (this waits ~30 ms for that) and leaves once Ray has stopped; nothing to
    start without /proc (not Linux)."""
    if not Path("/proc/self/stat").exists():
        return
    try:
        subprocess.run([sys.executable, "-I", "-S", str(Path(__file__).with_name("_reaper.py")),
                        str(os.getpid()), session_dir], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"warning: no reaper for the local Ray ({type(exc).__name__}): if this driver is "
              "killed, Ray's agents outlive it by a minute", file=sys.stderr)


def stop_ray() -> None:
    """Stop the local Ray (or leave the cluster) that ``start_ray`` started or joined."""
    ray.shutdown()


def on_cluster(spec: ExperimentSpec) -> ExperimentSpec:
    """``spec`` with ``--gpus-per-trial`` resolved from the joined cluster's GPUs where it was
    left to the cluster (``--address`` without it), saying which; else ``spec`` itself."""
    if spec.gpus_per_trial is not None:
        return spec
    gpus = float(ray.cluster_resources().get("GPU", 0))
    resolved = spec.on_cluster(gpus)
    if resolved.gpus:
        print(f"the cluster has {gpus:g} GPU(s): each trial gets {resolved.gpus:g} GPU "
              "(--gpus-per-trial 0 or --device cpu for CPU trials)", flush=True)
    else:
        print("the cluster has no GPU: CPU trials (--gpus-per-trial to ask for GPUs, with "
              "--autoscale if the autoscaler adds them)", flush=True)
    return resolved


def fitting(spec: ExperimentSpec, have: dict[str, float]) -> int:
    """How many trials of ``spec`` fit in the resources ``have`` (Ray's resource dict)."""
    fit = int(have.get("CPU", 0) / spec.cpus_per_trial + 1e-9)
    if spec.gpus > 0:
        fit = min(fit, int(have.get("GPU", 0) / spec.gpus + 1e-9))
    return fit


def max_concurrent(spec: ExperimentSpec) -> int:
    """How many trials run at once: as many as fit in the cluster now, capped by
    --max-concurrent. With --autoscale, --max-concurrent (else what fits now, at least
    ``AUTOSCALE_TRIALS``): trials beyond what fits wait for the nodes the autoscaler adds.
    ``spec``'s GPU share is resolved (:func:`on_cluster`)."""
    have = ray.cluster_resources()
    fit = fitting(spec, have)
    if spec.autoscale:
        return spec.max_concurrent or max(fit, AUTOSCALE_TRIALS)
    if fit < 1:
        raise UsageError(f"--cpus-per-trial {spec.cpus_per_trial:g} / --gpus-per-trial "
                         f"{spec.gpus:g}: no trial fits in the cluster "
                         f"({have.get('CPU', 0):g} CPU, {have.get('GPU', 0):g} GPU); if its "
                         "autoscaler adds nodes, --autoscale lets the trials wait for them")
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
    (its parameters and ``trial_number``, Optuna's number) and every scored epoch's report, at
    step = epoch. Tune calls them in the driver: an MLflow store or server must be reachable from the
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
    spec = on_cluster(spec)
    limit = max_concurrent(spec)
    fn = tune.with_parameters(trial, spec=spec, victims=victims, splits=splits, max_t=max_t,
                              epochs_fn=epochs_fn)
    trainable = tune.with_resources(fn, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus})
    path = spec.experiment_path  # --storage (a URI Tune's storage layer reaches) or run_dir/ray
    # Built (and their environment set) on --resume too, where Tune restores its saved copies.
    tracking = tracking_callbacks(spec)
    if spec.resume:  # tuner.spec.check_ray_state found a local state; can Tune read it?
        tuner = _restore(path, spec.local_experiment_dir, trainable)
        print(f"resuming {path}", flush=True)
    else:
        grace = asha_grace(spec, max_t)  # time_attr "epoch": a trial reports its scored epochs
        scheduler = FIFOScheduler() if grace is None else ASHAScheduler(
            time_attr="epoch", metric=SCORE, mode="max", max_t=max_t, grace_period=grace,
            reduction_factor=REDUCTION_FACTOR)
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
    waiting = min(limit, spec.num_samples) - fitting(spec, ray.cluster_resources()) \
        if spec.autoscale else 0
    if waiting > 0:
        print(f"  --autoscale: {waiting} of them wait (PENDING) for the nodes the autoscaler adds",
              flush=True)
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

