"""The experiment spec: every setting of one search, typed and checked on construction.

``ExperimentSpec`` is the one source of the search's settings: its fields (and the nested
:class:`zoo.victims.ZooSpec`) generate the command line (:mod:`tuner.flags`), their defaults
and choices live only here, and ``__post_init__`` checks each value. ``check_world()`` checks
what needs the disk or the network (the output folder, ``--resume``, the space file, the
cluster address). ``from_args`` does both, so a bad flag fails in milliseconds with one line
naming the flag, never after a zoo build or a Ray start.

>>> spec = ExperimentSpec(defense="ft", output=Path("runs"), name="demo")
>>> spec.run_dir.name, spec.num_samples, spec.zoo.dataset
('demo', 16, 'digits')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from defenses import REGISTRY
from tuner import flags, tracking
from tuner._io import LOCK_NAME, read_json
from tuner.errors import UsageError
from tuner.objective import SHORT, Objective
from tuner.spaces import Space, load_space
from zoo.attacks import ATTACKS
from zoo.manifest import load_manifest
from zoo.train import Recipe, default_recipe
from zoo.victims import ZooSpec, check_victim_names, check_zoo_dir

__all__ = ["ExperimentSpec", "check_storage", "check_writable", "cpu_trials", "default_gpus_per_trial",
           "default_name", "from_args", "victims_default"]

Scheduler = Literal["asha", "fifo"]
ValEpochs = Literal["rungs", "every"]
# The smoke-test victims train this many epochs (stored apart from the real ones): enough to
# plant a backdoor on digits, and the build no longer dominates a CI run.
SMOKE_VICTIM_EPOCHS = 5
MAX_NAME = 100  # characters of a run folder name
# Upper bounds that keep a typo from planning years of work (each far above any real run).
MAX_SAMPLES = 10_000  # trials of one search
MAX_EPOCHS = 1_000  # --max-epochs (a defense's own epochs are bounded by zoo.config)
MAX_SEEDS = 100  # --final-seeds, --victim-seeds
MIN_CPUS = 0.01  # cores per trial; Ray counts resources in units of 1e-4
GPU_SHARE = 0.25  # the default GPU share of a trial where there are GPUs: four trials per GPU
# --autoscale without --max-concurrent: at least this many trials in flight (one GPU's worth at
# GPU_SHARE), so the autoscaler sees demand beyond an empty cluster and adds a node.
AUTOSCALE_TRIALS = 4


def _opt(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


def default_name(defense: str, dataset: str, now: float | None = None) -> str:
    """``<defense>-<dataset>-<YYYYmmdd-HHMMSS>`` in local time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{defense}-{dataset}-{stamp}"


@dataclass(frozen=True)
class ExperimentSpec:
    """All settings of one search. Paths are made absolute; lists become tuples.

    Fields whose metadata says ``resource`` may change when a run is resumed; the others
    define the search and ``--resume`` keeps the stored ones.
    """

    defense: str = field(metadata=_opt("defense to tune (see defenses/)", choices=tuple(REGISTRY)))
    zoo: ZooSpec = field(default_factory=ZooSpec, metadata={"title": "data and victims"})
    holdout_attacks: tuple[str, ...] = field(default=(), metadata=_opt(
        "comma-separated attacks never seen by the search, only in the final test evaluation",
        group="search"))
    objective: Objective = field(default="mean", metadata=_opt(
        "what the search maximizes: " + "; ".join(f"{k}: {v}" for k, v in SHORT.items()),
        group="search"))
    num_samples: int = field(default=16, metadata=_opt(
        "number of configurations to try, the paper default first", smoke=2, group="search"))
    budget_seconds: float | None = field(default=None, metadata=_opt(
        "time budget of the search, seconds of wall time (Tune's time_budget_s): no trial "
        "starts after it and running ones stop (recorded as stopped early); the search then "
        "has at most --num-samples trials", default_text="none: --num-samples trials",
        metavar="S", group="search"))
    max_concurrent: int | None = field(default=None, metadata=_opt(
        "most trials at once", default_text="as many as the CPUs/GPUs fit; with --autoscale "
        f"that many but at least {AUTOSCALE_TRIALS}", group="search", resource=True))
    scheduler: Scheduler = field(default="asha", metadata=_opt(
        "asha stops poor trials early (recorded in Optuna as pruned); fifo runs every trial to "
        "its end", group="search"))
    max_epochs: int | None = field(default=None, metadata=_opt(
        "cap on each trial's fine-tuning epochs", default_text="the defense's own epochs",
        smoke=1, group="search"))
    val_subsample: int | None = field(default=None, metadata=_opt(
        "score a trial's epochs before its last on a fixed, seeded subset of N clean and N "
        "triggered val images per attack (cheaper early ASHA rungs); the last epoch always "
        "uses all of val", default_text="all of val every epoch", metavar="N", group="search"))
    val_epochs: ValEpochs = field(default="rungs", metadata=_opt(
        "when a trial is scored on val: rungs = at ASHA's rungs and its last epoch (all the "
        "scheduler and Optuna read; with fifo the last epoch only), every = after every epoch "
        "(a learning curve in trials.json and --mlflow/--wandb, for more inference)",
        group="search"))
    trial_seeds: int = field(default=1, metadata=_opt(
        "seeds per trial: each configuration runs with seeds seed..seed+K-1 (each draws its own "
        "clean subset, as --seed would, and orders training with it) and reports the mean "
        "metrics; the spread is in the trial's record and the report", metavar="K",
        group="search"))
    max_acc_drop: float | None = field(default=None, metadata=_opt(
        "accuracy budget: a configuration losing more than D points of mean clean val ACC "
        "against the undefended victims is infeasible (an Optuna constraint: the sampler learns "
        "the feasible region; the best configuration is the best feasible one). ASHA still "
        "stops trials on the score alone", default_text="no budget", metavar="D",
        group="search"))
    space: Path | None = field(default=None, metadata=_opt(
        "search-space YAML file", default_text="search_spaces/<defense>.yaml", group="search"))
    final_seeds: int = field(default=3, metadata=_opt(
        "defense seeds of the final test evaluation of the best and default configurations: "
        "seed..seed+N-1", smoke=1, group="final evaluation and report"))
    victim_seeds: int = field(default=1, metadata=_opt(
        "victims trained with seeds seed..seed+K-1 for the final test evaluation (each built "
        "once and stored; the search uses the first): the spread then includes the victims'",
        group="final evaluation and report"))
    sequela: bool = field(default=True, metadata=_opt(
        "measure in the final evaluation whether the purification holds: ASR after a "
        "re-tuning attack and membership-inference exposure (zoo/sequela.py); needs the clean "
        "model (the 'none' victim)", smoke=False, group="final evaluation and report"))
    verdict_asr: float = field(default=10.0, metadata=_opt(
        "the report calls a backdoor removed when its mean test ASR is below this (percent)",
        group="final evaluation and report", resource=True))
    verdict_acc_drop: float = field(default=3.0, metadata=_opt(
        "... and the mean clean test ACC lost against the undefended victim is at most this "
        "(percentage points)", group="final evaluation and report", resource=True))
    gpus_per_trial: float | None = field(default=None, metadata=_opt(
        f"GPU share per trial; {GPU_SHARE:g} packs four trials per GPU, whole numbers for several "
        "GPUs; 0: CPU trials", default_text=f"{GPU_SHARE:g} if this machine, or with --address the "
        "joined cluster, has a GPU; else 0, and 0 with --device cpu",
        group="resources and cluster", resource=True))
    cpus_per_trial: float = field(default=1.0, metadata=_opt(
        "CPU cores per trial; also its torch thread count", group="resources and cluster",
        resource=True))
    address: str | None = field(default=None, metadata=_opt(
        "join a running Ray cluster: 'auto' or HOST:PORT",
        default_text="a local Ray that starts and stops with the run",
        group="resources and cluster", resource=True))
    autoscale: bool = field(default=False, metadata=_opt(
        "the --address cluster autoscales: trials that do not fit yet wait (PENDING) for the "
        "nodes the autoscaler adds for them, instead of a refusal when none fits now; needs "
        "--gpus-per-trial (the GPUs may not be there yet to count)",
        group="resources and cluster", resource=True))
    output: Path = field(default=Path("runs"), metadata=_opt(
        "parent folder of run folders", group="output", resource=True))
    storage: str | None = field(default=None, metadata=_opt(
        "where Ray Tune keeps the experiment (its state, trial results, checkpoints): a URI "
        "every node reaches on a multi-node cluster (s3://..., gs://..., file:///shared/nfs) "
        "or an absolute path; the experiment is STORAGE/NAME, and --resume continues from it. "
        "spec.json, trials.json, study.db and the report stay in OUTPUT/NAME on the driver",
        default_text="OUTPUT/NAME/ray", metavar="URI", group="output"))
    mlflow: str | None = field(default=None, metadata=_opt(
        "log every trial's config and scored epochs' metrics to MLflow (Ray Tune's "
        "MLflowLoggerCallback; experiment NAME, one MLflow run per trial): a folder (a file "
        "store), file:///abs/path, sqlite:///path/mlflow.db or http(s)://HOST:PORT; Tune logs "
        "from the driver, so only the driver needs to reach it (needs mlflow-skinny)",
        default_text="off", metavar="TRACKING_URI", group="output"))
    wandb: str | None = field(default=None, metadata=_opt(
        "log the same to Weights & Biases project PROJECT, offline (WANDB_MODE=offline: no "
        "account, no network), the runs under OUTPUT/NAME/wandb; `wandb sync` uploads them "
        "later (Ray Tune's WandbLoggerCallback; needs wandb)", default_text="off",
        metavar="PROJECT", group="output"))
    name: str | None = field(default=None, metadata=_opt(
        f"run folder name: letters, digits, '.', '_', '-', at most {MAX_NAME} characters",
        default_text="<defense>-<dataset>-<YYYYmmdd-HHMMSS>", group="output", resource=True))
    resume: bool = field(default=False, metadata=_opt(
        "continue the interrupted run OUTPUT/NAME (needs --name); finished trials are kept, "
        "the total stays --num-samples", group="output", resource=True))
    smoke_test: bool = field(default=False, metadata=_opt(
        "tiny, fast run for CI: 2 trials of 1 epoch, badnets only, 1 final seed, victims "
        f"trained for {SMOKE_VICTIM_EPOCHS} epochs (stored apart from the real ones)",
        group="output"))

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "holdout_attacks", tuple(self.holdout_attacks))
        for name in ("space",):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, Path(value).expanduser().absolute())
        set_(self, "output", Path(self.output).expanduser().absolute())
        if self.defense not in REGISTRY:
            raise UsageError(f"unknown defense {self.defense!r}: expected one of "
                             f"{', '.join(REGISTRY)}")
        if self.name is None:
            set_(self, "name", default_name(self.defense, self.zoo.dataset))
        if self.gpus_per_trial is None and self.address is None:  # a cluster: once joined
            local_gpus = 1.0 if self.zoo.device.startswith("cuda") else 0.0
            set_(self, "gpus_per_trial", default_gpus_per_trial(local_gpus))
        self._check_values()

    # -- value checks (no I/O) -------------------------------------------------------------
    def _check_values(self) -> None:
        _check_int("--num-samples", self.num_samples, low=1, high=MAX_SAMPLES)
        _check_int("--final-seeds", self.final_seeds, low=1, high=MAX_SEEDS)
        _check_int("--trial-seeds", self.trial_seeds, low=1, high=MAX_SEEDS)
        _check_int("--victim-seeds", self.victim_seeds, low=1, high=MAX_SEEDS)
        for flag, value, high in (("--verdict-asr", self.verdict_asr, 100.0),
                                  ("--verdict-acc-drop", self.verdict_acc_drop, 100.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value <= high:
                raise UsageError(f"{flag} {value!r}: expected a number in [0, {high:g}]")
        drop = self.max_acc_drop
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float))
                                 or not 0.0 <= drop <= 100.0):
            raise UsageError(f"--max-acc-drop {drop!r}: expected a number of percentage points "
                             "in [0, 100]")
        if self.budget_seconds is not None and (
                isinstance(self.budget_seconds, bool)
                or not isinstance(self.budget_seconds, (int, float))
                or not (0 < self.budget_seconds < math.inf)):
            raise UsageError(f"--budget-seconds {self.budget_seconds!r}: expected a finite "
                             "number of seconds > 0")
        limits: tuple[tuple[str, int | None, int | None], ...] = (
            ("--max-concurrent", self.max_concurrent, None),
            ("--max-epochs", self.max_epochs, MAX_EPOCHS),
            ("--val-subsample", self.val_subsample, None))
        for flag, count, cap in limits:
            if count is not None:
                _check_int(flag, count, low=1, high=cap)
        check_gpus_per_trial(self.gpus)
        if not (self.cpus_per_trial >= MIN_CPUS and math.isfinite(self.cpus_per_trial)):
            raise UsageError(f"--cpus-per-trial {self.cpus_per_trial:g}: expected a finite "
                             f"number of CPU cores >= {MIN_CPUS:g}")
        if self.holdout_attacks:
            check_victim_names(self.holdout_attacks, "--holdout-attacks",
                               manifest=self.zoo.manifest is not None)
        overlap = sorted(set(self.zoo.attacks) & set(self.holdout_attacks))
        if overlap:
            raise UsageError(f"--holdout-attacks {','.join(overlap)} also in --attacks: "
                             "held-out attacks must not be searched on")
        foreign = [a for a in self.zoo.attacks if a not in ATTACKS]
        if self.objective == "robust" and foreign:
            raise UsageError(f"--objective robust runs the re-tuning attack, which needs the "
                             f"attacker's trigger on training images; {', '.join(foreign)} (trained "
                             "elsewhere) has only a triggered test set: expected built-in attacks "
                             "or another --objective")
        check_name(str(self.name))
        if self.storage is not None:
            object.__setattr__(self, "storage", check_storage(self.storage))
        if self.address is not None:
            check_address(self.address)
        if self.autoscale and self.address is None:
            raise UsageError("--autoscale: a local Ray never grows: expected --address of a "
                             "cluster whose autoscaler adds nodes (KubeRay, `ray up`)")
        if self.autoscale and self.gpus_per_trial is None:
            raise UsageError("--autoscale needs --gpus-per-trial: an autoscaling cluster may have "
                             f"no GPU yet to count when the search starts (expected {GPU_SHARE:g} "
                             "for GPU trials, 0 for CPU trials)")
        if self.mlflow is not None:
            object.__setattr__(self, "mlflow", tracking.check_mlflow_uri(self.mlflow))
        if self.wandb is not None:
            object.__setattr__(self, "wandb", tracking.check_wandb_project(self.wandb))

    # -- derived ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.output / str(self.name)

    @property
    def experiment_path(self) -> str:
        """Where Tune keeps this search's experiment: ``STORAGE/NAME``, else ``run_dir/ray``."""
        if self.storage is None:
            return str(self.run_dir / "ray")
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def local_experiment_dir(self) -> Path | None:
        """``experiment_path`` as a local folder; None where it is a remote URI (s3://, gs://)."""
        path = self.experiment_path
        if path.startswith("file://"):
            return Path(path[len("file://"):])
        return None if "://" in path else Path(path)

    @property
    def gpus(self) -> float:
        """The GPU share of a trial (``gpus_per_trial`` once its default is resolved; with
        ``--address`` that is after joining, :meth:`on_cluster`)."""
        return float(self.gpus_per_trial or 0.0)

    @property
    def trial_device(self) -> str:
        """Where a trial computes: ``cuda`` (the GPU Ray assigned it) with a GPU share, else
        ``cpu``. The driver's own ``--device`` (victims, final evaluation) is ``zoo.device``."""
        return "cuda" if self.gpus > 0 else "cpu"

    def on_cluster(self, gpus: float) -> ExperimentSpec:
        """This spec on a joined cluster with ``gpus`` GPUs: ``--gpus-per-trial`` resolved
        (:func:`default_gpus_per_trial`) where it was left to the cluster, else unchanged."""
        if self.gpus_per_trial is not None:
            return self
        return dataclasses.replace(self, gpus_per_trial=default_gpus_per_trial(gpus))

    @property
    def attacks(self) -> tuple[str, ...]:
        """The attacks the search optimizes over."""
        return self.zoo.attacks

    @property
    def seed(self) -> int:
        """One seed for the split, the victims, the sampler and the first final evaluation."""
        return self.zoo.seed

    @property
    def victims(self) -> ZooSpec:
        """The zoo every victim (search and held-out) comes from: ``--smoke-test`` trains
        them for a few epochs only, under their own store key."""
        zoo = dataclasses.replace(self.zoo, attacks=self.zoo.attacks + self.holdout_attacks)
        if not self.smoke_test:
            return zoo
        recipe = default_recipe(zoo.dataset, zoo.arch)
        short = dataclasses.replace(recipe, epochs=min(recipe.epochs, SMOKE_VICTIM_EPOCHS))
        return dataclasses.replace(zoo, recipe=short)

    # -- world checks ----------------------------------------------------------------------
    def check_world(self) -> None:
        """Check what needs the disk, other modules or the network; raises UsageError."""
        check_writable(self.output)
        self._check_run_dir()
        local = self.local_experiment_dir
        if self.resume and local is not None:  # remote storage: Tune says what it cannot read
            check_ray_state(local)
        check_zoo_dir(self.zoo)
        self.load_space()
        if self.gpus and self.address is None and self.zoo.device == "cpu":
            why = "--device cpu asks for CPU trials" if torch.cuda.is_available() else \
                "no GPU on this machine"
            raise UsageError(f"--gpus-per-trial {self.gpus_per_trial}: {why} (expected 0, or "
                             "--address of a cluster with GPUs)")
        if self.address is None:  # the local Ray gets every core and GPU of this machine
            self._check_local_resources()
        if self.address == "auto":
            check_reachable(resolve_auto_address())
        elif self.address is not None:
            check_reachable(self.address)
        if self.mlflow is not None:
            store = tracking.check_mlflow_world(self.mlflow)
            if store is not None:
                check_writable(store, flag="--mlflow")
        if self.wandb is not None:
            tracking.check_wandb_world(self.wandb)

    def _check_local_resources(self) -> None:
        cores = os.cpu_count() or 1
        if self.cpus_per_trial > cores:
            raise UsageError(f"--cpus-per-trial {self.cpus_per_trial:g}: this machine has "
                             f"{cores} CPU cores: expected at most {cores} (or --address of a "
                             "larger cluster)")
        gpus = torch.cuda.device_count() if self.gpus else 0
        if self.gpus > gpus:
            raise UsageError(f"--gpus-per-trial {self.gpus:g}: this machine has {gpus} GPU(s): "
                             f"expected at most {gpus} (or --address of a larger cluster)")

    def check_run_dir(self) -> None:
        """The run folder is new (or empty) for a fresh run, an earlier run for --resume; never
        a link or a file. Checked again under the run's lock (``tuner.search``)."""
        run = self.run_dir
        if run.is_symlink():
            raise UsageError(f"--name {self.name}: {run} is a symbolic link: expected a run "
                             "folder (nothing is written through a link); choose another --name")
        if run.exists() and not run.is_dir():
            raise UsageError(f"--name {self.name}: {run} exists and is not a folder: choose "
                             "another --name")
        if self.resume:
            if not (run / "spec.json").is_file():
                raise UsageError(f"--resume: no run to continue at {run} "
                                 "(expected the --output and --name of an earlier search)")
        elif run.exists() and any(p.name != LOCK_NAME for p in run.iterdir()):
            raise UsageError(f"run folder {run} already exists: pass --resume to continue it "
                             "or choose another --name")

    _check_run_dir = check_run_dir

    def load_space(self) -> Space:
        return load_space(self.defense, self.space, dataset=self.zoo.dataset)

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "spec") -> ExperimentSpec:
        """The spec a run stored (``spec.json``); its ``provenance`` block is not part of it."""
        if not isinstance(data, dict) or not isinstance(data.get("zoo"), dict):
            raise UsageError(f"{where}: expected an object with a 'zoo' object")
        body = {k: v for k, v in data.items() if k != "provenance"}
        body.setdefault("val_epochs", "every")  # what runs stored before --val-epochs did
        _check_keys(where, body, cls)
        zoo = dict(body.pop("zoo"))
        _check_keys(f"{where}: zoo", zoo, ZooSpec)
        if isinstance(zoo.get("recipe"), dict):
            zoo["recipe"] = Recipe(**zoo["recipe"])
        try:
            return cls(zoo=ZooSpec(**zoo), **body)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{where}: {exc}") from None

    def resumed_from(self, stored: ExperimentSpec) -> ExperimentSpec:
        """The stored run's search-defining settings with this spec's resources."""
        zoo = dataclasses.replace(stored.zoo, **_resources(self.zoo))
        return dataclasses.replace(stored, zoo=zoo, **_resources(self))

    def differences(self, other: ExperimentSpec) -> list[str]:
        """The search-defining settings in which ``other`` differs from this spec."""
        def settings(spec: ExperimentSpec) -> dict[str, Any]:
            d = spec.to_dict()
            return {**{k: d[k] for k in d if k not in _resources(spec) and k != "zoo"},
                    **{k: v for k, v in d["zoo"].items() if k not in _resources(spec.zoo)}}

        mine, theirs = settings(self), settings(other)
        return [k for k in mine if mine[k] != theirs[k]]


def _resources(spec: Any) -> dict[str, Any]:
    """The fields of a spec that may change when its run resumes (``resource`` metadata)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
            if f.metadata.get("resource")}


def _check_keys(where: str, data: dict[str, Any], cls: type) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"{where} has unknown field(s) {', '.join(unknown)}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def default_gpus_per_trial(gpus: float) -> float:
    """``--gpus-per-trial`` when not given: ``GPU_SHARE`` where trials can have a GPU (``gpus``
    GPUs: the local machine's, or a joined cluster's), else 0, CPU trials."""
    return GPU_SHARE if gpus > 0 else 0.0


# -- single-value checks --------------------------------------------------------------------
def _check_int(flag: str, value: Any, *, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        within = f">= {low}" if high is None else f"in {low}..{high}"
        raise UsageError(f"{flag} {value!r}: expected a whole number {within}")


def check_gpus_per_trial(value: float) -> None:
    """A share of one GPU (0..1] or a whole number of GPUs; 0 means CPU trials."""
    ok = value >= 0 and (value <= 1 or float(value).is_integer())
    if not ok:
        raise UsageError(f"--gpus-per-trial {value}: expected 0, a share of one GPU in (0, 1], "
                         "or a whole number of GPUs")


_SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*)://(.*)$")


def check_storage(value: str) -> str:
    """``--storage``: a URI ``scheme://...`` (``file://`` with an absolute path) or an
    absolute local path; returned as given (a path made absolute)."""
    text = str(value).strip()
    match = _SCHEME.match(text)
    if match is None:
        if "://" in text or not text:
            raise UsageError(f"--storage {value!r}: expected a URI such as s3://bucket/prefix or "
                             "file:///abs/path, or an absolute path")
        path = Path(text).expanduser()
        if not path.is_absolute():
            raise UsageError(f"--storage {value!r}: a local path must be absolute (Ray Tune's "
                             "storage_path is), e.g. file:///abs/path")
        return str(path)
    scheme, rest = match.groups()
    if scheme == "file" and not rest.startswith("/"):
        raise UsageError(f"--storage {value!r}: a file:// URI needs an absolute path "
                         "(file:///abs/path)")
    if not rest.strip("/"):
        raise UsageError(f"--storage {value!r}: expected a bucket or path after {scheme}://")
    return text


_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def check_address(address: str) -> None:
    if address != "auto" and not _ADDRESS.match(address):
        raise UsageError(f"--address {address!r}: expected 'auto' or HOST:PORT "
                         "(e.g. 10.0.0.5:6379)")


def check_name(name: str) -> None:
    if name in (".", "..") or len(name) > MAX_NAME or \
            not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]*", name):
        raise UsageError(f"--name {name[:MAX_NAME + 20]!r}: expected 1 to {MAX_NAME} letters, "
                         "digits, '.', '_' or '-', starting with a letter or digit (one folder "
                         "name, no '/')")


RAY_STATE_HINT = ("start a new run with another --name (the trials that finished are listed "
                  "in the old run's trials.json)")


def check_ray_state(state: Path) -> None:
    """``--resume`` needs Ray Tune's saved search state (spec.json is written only once the
    search starts, so a run with spec.json has one): missing or unreadable, it is one line,
    never a silent restart that runs finished trials again, nor a resume that fails every time.
    The pickles are only checked for presence here; ``tuner.trainable`` loads them."""
    found = sorted(state.glob("experiment_state-*.json")) if state.is_dir() else []
    if not found:
        raise UsageError(f"--resume: Ray's saved search state is missing from {state} "
                         f"(deleted?): the search cannot continue without it; {RAY_STATE_HINT}")
    try:
        data = read_json(found[-1])
    except UsageError as exc:
        raise UsageError(f"--resume: Ray's saved search state is corrupt ({exc}); "
                         f"{RAY_STATE_HINT}") from None
    if not isinstance(data, dict) or not isinstance(data.get("trial_data"), list):
        raise UsageError(f"--resume: Ray's saved search state is corrupt ({found[-1]}: no "
                         f"trial_data list); {RAY_STATE_HINT}")
    for pattern in ("tuner.pkl", "searcher-state-*.pkl"):
        files = sorted(state.glob(pattern))
        if not files or not files[-1].is_file() or files[-1].stat().st_size == 0:
            raise UsageError(f"--resume: Ray's saved search state is incomplete ({state}/"
                             f"{pattern} is missing or empty); {RAY_STATE_HINT}")


def resolve_auto_address() -> str:
    """What Ray's ``address="auto"`` would join: ``RAY_ADDRESS``, else the address that
    ``ray start`` records in ``$RAY_TMPDIR/ray/ray_current_cluster`` (``/tmp`` by default)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        address = ""
    if not address:
        raise UsageError("--address auto: no running Ray cluster found on this machine (no "
                         f"RAY_ADDRESS, no {record}); expected `ray start --head` first, or "
                         "--address HOST:PORT")
    return address


# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS and its
# client server are gRPC) answers with a SETTINGS frame (type 4) of its own.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast (one line) when nothing listens at HOST:PORT, or something that does not speak
    gRPC as Ray's head does (a port that accepts TCP would otherwise make ``ray.init`` wait
    for ever), instead of a long Ray retry."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
            conn.sendall(_H2_PREFACE)
            reply = conn.recv(9)
    except (OSError, ValueError, OverflowError) as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else \
            getattr(exc, "strerror", None) or exc
        raise UsageError(f"--address {address}: no Ray cluster answers ({reason}); "
                         "expected the head's HOST:PORT from `ray start --head`") from None
    if len(reply) < 4 or reply[3] != 4:
        raise UsageError(f"--address {address}: something listens there but it is not a Ray "
                         "cluster (no gRPC reply); expected the head's HOST:PORT from "
                         "`ray start --head`")


def check_writable(output: Path, *, flag: str = "--output") -> None:
    """The output folder, or its nearest existing parent, must be a writable folder."""
    probe = output
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {str(output)!r}: {str(probe)!r} is not a folder")
    try:  # try for real: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {str(output)!r}: cannot write in {str(probe)!r} "
                         f"({exc.strerror or exc})") from None


# -- from the command line ------------------------------------------------------------------
def from_args(args: argparse.Namespace) -> ExperimentSpec:
    """Build and fully check the spec from parsed flags (see tuner.cmd_search)."""
    spec = flags.build(ExperimentSpec, args, smoke=bool(getattr(args, "smoke_test", False)),
                       **cpu_trials(args))
    spec = dataclasses.replace(spec, zoo=victims_default(spec.zoo, args))
    if spec.resume and not hasattr(args, "name"):
        raise UsageError("--resume needs --name: the name of the run to continue")
    if spec.resume:  # checked as it will run: the stored --storage holds Tune's state
        spec.check_run_dir()
        spec = with_stored_run(spec)
    spec.check_world()
    return spec


def cpu_trials(args: argparse.Namespace) -> dict[str, Any]:
    """An explicit ``--device cpu`` means CPU trials, on a cluster too (whose GPUs would
    otherwise set the default GPU share): ``{"gpus_per_trial": 0.0}``. A GPU share asked beside
    it on a cluster is a contradiction, refused (locally ``check_world`` refuses it)."""
    if str(getattr(args, "device", "")).partition(":")[0] != "cpu":
        return {}
    gpus = getattr(args, "gpus_per_trial", None)
    if gpus and getattr(args, "address", None) is not None:
        raise UsageError(f"--gpus-per-trial {gpus:g} with --device cpu: --device cpu asks for "
                         "CPU trials; expected --gpus-per-trial 0, or --device auto to let the "
                         "trials use the cluster's GPUs")
    return {} if gpus is not None else {"gpus_per_trial": 0.0}


def victims_default(zoo: ZooSpec, args: argparse.Namespace) -> ZooSpec:
    """With ``--victims FILE`` and no ``--attacks``, the victims are the file's (the default
    attacks are not built); otherwise ``zoo`` as it is."""
    if zoo.manifest is None or hasattr(args, "attacks"):
        return zoo
    names = tuple(v.name for v in load_manifest(zoo.manifest))
    holdout = set(getattr(args, "holdout_attacks", ()))
    return dataclasses.replace(zoo, attacks=tuple(n for n in names if n not in holdout))


def with_stored_run(spec: ExperimentSpec) -> ExperimentSpec:
    """For --resume: the run's stored search settings win; say which given flags are ignored."""
    path = spec.run_dir / "spec.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: cannot read {path}: {exc}") from None
    stored = ExperimentSpec.from_dict(data, where=str(path))
    ignored = spec.differences(stored)
    if ignored:
        print(f"note: --resume keeps the run's own {', '.join(ignored)} "
              f"(see {path})", file=sys.stderr)
    return spec.resumed_from(stored)
