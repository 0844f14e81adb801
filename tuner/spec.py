"""The experiment spec: every setting of one search, typed and validated before anything starts.

``ExperimentSpec.__post_init__`` checks each value on its own (ranges, formats, overlaps);
``validate()`` checks the world (the defense exists, the space file loads, the output folder is
writable, ``--resume`` finds a run). ``from_args`` does both, so a bad flag fails in
milliseconds with one line naming the flag, never after a zoo build or a Ray start.

>>> spec = ExperimentSpec(defense="ft", output=Path("runs"), name="demo")
>>> spec.run_dir.name, spec.num_samples
('demo', 16)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import UsageError

__all__ = ["DEFAULTS", "SMOKE_DEFAULTS", "ExperimentSpec", "default_name", "from_args"]

OBJECTIVES = ("mean", "worst", "der", "pareto")  # mirrors tuner.objective.OBJECTIVES
SCHEDULERS = ("asha", "fifo")
SEARCH_ATTACKS = ("badnets", "blended", "wanet", "sig")

# Sized so that the bare ``python -m tuner --defense ngf`` ends within about 5 minutes on a
# 2-core CPU machine, victims included; a GPU or a cluster warrants more --num-samples.
DEFAULTS: dict[str, Any] = {"num_samples": 16, "final_seeds": 3, "max_epochs": None,
                            "attacks": SEARCH_ATTACKS, "val_subsample": None}
# --smoke-test: the smallest run that still exercises every stage (CI).
SMOKE_DEFAULTS: dict[str, Any] = {"num_samples": 2, "final_seeds": 1, "max_epochs": 1,
                                  "attacks": ("badnets",), "val_subsample": None}

# Fields that define the search; ``--resume`` continues with the stored values of these.
# Resources (--cpus/--gpus-per-trial, --address, --device) may change between the two runs.
RUN_FIELDS = ("defense", "dataset", "data_root", "arch", "attacks", "holdout_attacks",
              "poison_rate", "clean_ratio", "blend_image", "zoo_dir", "objective", "num_samples",
              "scheduler", "max_epochs", "seed", "final_seeds", "space", "smoke_test",
              "val_subsample")


def default_name(defense: str, dataset: str, now: float | None = None) -> str:
    """``<defense>-<dataset>-<YYYYmmdd-HHMMSS>`` in local time."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{defense}-{dataset}-{stamp}"


@dataclass(frozen=True)
class ExperimentSpec:
    """All settings of one search. Paths are made absolute; lists become tuples."""

    defense: str
    dataset: str = "digits"
    data_root: Path | None = None
    download: bool = False  # fetch the dataset into data_root (torchvision) when missing
    arch: str = "cnn"
    attacks: tuple[str, ...] = SEARCH_ATTACKS
    holdout_attacks: tuple[str, ...] = ()
    poison_rate: float | None = None  # None: 0.1, or the zoo's per-attack default on the dataset
    clean_ratio: float | None = None
    blend_image: Path | None = None
    objective: str = "mean"
    num_samples: int = 16
    max_concurrent: int | None = None  # None: as many trials as the resources fit
    scheduler: str = "asha"
    max_epochs: int | None = None  # None: the defense's own epochs
    val_subsample: int | None = None  # images per val set before the last epoch; None: full val
    precision: str = "auto"  # zoo.runtime: auto | fp32 | bf16
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    address: str | None = None  # None: a local Ray that starts and stops with the run
    output: Path = Path("runs")
    name: str = ""
    resume: bool = False
    seed: int = 0
    final_seeds: int = 3
    space: Path | None = None  # None: search_spaces/<defense>.yaml
    zoo_dir: Path | None = None
    smoke_test: bool = False
    device: str = "cpu"  # for the final evaluation in the driver; trials pick theirs from resources

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "attacks", tuple(self.attacks))
        set_(self, "holdout_attacks", tuple(self.holdout_attacks))
        for name in ("data_root", "blend_image", "space", "zoo_dir"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, Path(value).expanduser().absolute())
        set_(self, "output", Path(self.output).expanduser().absolute())
        if not self.name:
            set_(self, "name", default_name(self.defense, self.dataset))
        self._check_values()

    # -- value checks (no I/O) -------------------------------------------------------------
    def _check_values(self) -> None:
        _check_int("--num-samples", self.num_samples, low=1)
        _check_int("--final-seeds", self.final_seeds, low=1)
        _check_int("--seed", self.seed, low=0)
        if self.max_concurrent is not None:
            _check_int("--max-concurrent", self.max_concurrent, low=1)
        if self.max_epochs is not None:
            _check_int("--max-epochs", self.max_epochs, low=1)
        if self.val_subsample is not None:
            _check_int("--val-subsample", self.val_subsample, low=1)
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective {self.objective!r}: expected one of "
                             f"{', '.join(OBJECTIVES)}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"--scheduler {self.scheduler!r}: expected one of "
                             f"{', '.join(SCHEDULERS)}")
        check_gpus_per_trial(self.gpus_per_trial)
        if not (self.cpus_per_trial > 0 and math.isfinite(self.cpus_per_trial)):
            raise UsageError(f"--cpus-per-trial {self.cpus_per_trial}: expected a finite "
                             "number > 0")
        if self.poison_rate is not None and not 0.0 < self.poison_rate < 1.0:
            raise UsageError(f"--poison-rate {self.poison_rate}: expected a number in (0, 1)")
        if self.clean_ratio is not None and not 0.0 < self.clean_ratio <= 1.0:
            raise UsageError(f"--clean-ratio {self.clean_ratio}: expected a number in (0, 1]")
        self._check_attacks()
        check_name(self.name)
        if self.address is not None:
            check_address(self.address)

    def _check_attacks(self) -> None:
        if not self.attacks:
            raise UsageError("--attacks is empty: expected at least one attack, e.g. badnets")
        lists = (("--attacks", self.attacks), ("--holdout-attacks", self.holdout_attacks))
        for flag, names in lists:
            dup = sorted({a for a in names if names.count(a) > 1})
            if dup:
                raise UsageError(f"{flag} names {', '.join(dup)} twice: expected each attack once")
        overlap = sorted(set(self.attacks) & set(self.holdout_attacks))
        if overlap:
            raise UsageError(f"--holdout-attacks {','.join(overlap)} also in --attacks: "
                             "held-out attacks must not be searched on")

    # -- world checks ----------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.output / self.name

    def validate(self) -> None:
        """Check what needs the disk or other modules; raises UsageError (or SpaceError)."""
        from defenses import REGISTRY

        if self.defense not in REGISTRY:
            raise UsageError(f"unknown defense {self.defense!r}: expected one of "
                             f"{', '.join(REGISTRY)}")
        check_writable(self.output)
        self._check_run_dir()
        self.load_space()
        if self.gpus_per_trial > 0 and self.address is None and self.device == "cpu":
            raise UsageError(f"--gpus-per-trial {self.gpus_per_trial}: no GPU on this machine "
                             "(expected 0, or --address of a cluster with GPUs)")
        if self.address == "auto":
            check_reachable(resolve_auto_address())
        elif self.address is not None:
            check_reachable(self.address)

    def _check_run_dir(self) -> None:
        run = self.run_dir
        if self.resume:
            if not (run / "spec.json").is_file():
                raise UsageError(f"--resume: no run to continue at {run} "
                                 "(expected the --output and --name of an earlier search)")
        elif run.exists() and any(run.iterdir()):
            raise UsageError(f"run folder {run} already exists: pass --resume to continue it "
                             "or choose another --name")

    def load_space(self) -> Any:
        from tuner.spaces import load_space

        return load_space(self.defense, self.space, dataset=self.dataset)

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else (
                list(value) if isinstance(value, tuple) else value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"spec has unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def resumed_from(self, stored: ExperimentSpec) -> ExperimentSpec:
        """This spec with the stored run's search-defining fields (what --resume continues)."""
        return dataclasses.replace(self, **{k: getattr(stored, k) for k in RUN_FIELDS})

    def differences(self, other: ExperimentSpec) -> list[str]:
        return [k for k in RUN_FIELDS if getattr(self, k) != getattr(other, k)]


# -- single-value checks --------------------------------------------------------------------
def _check_int(flag: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{flag} {value!r}: expected a whole number >= {low}")


def check_gpus_per_trial(value: float) -> None:
    """A share of one GPU (0..1] or a whole number of GPUs; 0 means CPU trials."""
    ok = value >= 0 and (value <= 1 or float(value).is_integer())
    if not ok:
        raise UsageError(f"--gpus-per-trial {value}: expected 0, a share of one GPU in (0, 1], "
                         "or a whole number of GPUs")


_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def check_address(address: str) -> None:
    if address != "auto" and not _ADDRESS.match(address):
        raise UsageError(f"--address {address!r}: expected 'auto' or HOST:PORT "
                         "(e.g. 10.0.0.5:6379)")


def check_name(name: str) -> None:
    if name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]*", name):
        raise UsageError(f"--name {name!r}: expected letters, digits, '.', '_' or '-' "
                         "(one folder name, no '/')")


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


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast (one line) when nothing listens at HOST:PORT, instead of a long Ray retry."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise UsageError(f"--address {address}: no Ray cluster answers ({reason}); "
                         "expected the head's HOST:PORT from `ray start --head`") from None


def check_writable(output: Path) -> None:
    """The output folder, or its nearest existing parent, must be a writable folder."""
    probe = output
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--output {str(output)!r}: {str(probe)!r} is not a folder")
    try:  # try for real: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"--output {str(output)!r}: cannot write in {str(probe)!r} "
                         f"({exc.strerror or exc})") from None


# -- from the command line ------------------------------------------------------------------
def _given(args: argparse.Namespace, name: str) -> Any:
    return getattr(args, name, None)


def _resolve(args: argparse.Namespace, name: str, smoke: bool) -> Any:
    value = _given(args, name)
    if value is not None:
        return value
    return (SMOKE_DEFAULTS if smoke else DEFAULTS)[name]


def _default_gpus(device: str, address: str | None) -> float:
    """0.25 (four trials per GPU) on a local machine with CUDA, else CPU trials."""
    return 0.25 if address is None and device.startswith("cuda") else 0.0


def from_args(args: argparse.Namespace) -> ExperimentSpec:
    """Build and fully validate the spec from parsed flags (see tuner.cmd_search)."""
    from tuner._flags import check_common, parse_list

    smoke = bool(getattr(args, "smoke_test", False))
    args.attacks = _resolve(args, "attacks", smoke)
    args.holdout_attacks = _given(args, "holdout_attacks") or ""
    for attr in ("attacks", "holdout_attacks"):
        value = getattr(args, attr)
        setattr(args, attr, parse_list(value) if isinstance(value, str) else list(value))
    check_common(args, ("attacks", "holdout_attacks"))
    device = str(args.device)
    gpus = _given(args, "gpus_per_trial")
    address, name = _given(args, "address"), _given(args, "name")
    spec = ExperimentSpec(
        defense=args.defense, dataset=args.dataset, data_root=args.data_root,
        download=args.download, arch=args.arch,
        attacks=tuple(args.attacks), holdout_attacks=tuple(args.holdout_attacks),
        poison_rate=args.poison_rate, clean_ratio=args.clean_ratio,
        blend_image=_given(args, "blend_image"), objective=args.objective,
        num_samples=_resolve(args, "num_samples", smoke),
        max_concurrent=_given(args, "max_concurrent"), scheduler=args.scheduler,
        max_epochs=_resolve(args, "max_epochs", smoke),
        val_subsample=_resolve(args, "val_subsample", smoke),
        gpus_per_trial=_default_gpus(device, address) if gpus is None else gpus,
        cpus_per_trial=args.cpus_per_trial, address=address, output=args.output,
        name=name or "", resume=args.resume, seed=args.seed,
        final_seeds=_resolve(args, "final_seeds", smoke), space=_given(args, "space"),
        zoo_dir=args.zoo_dir, smoke_test=smoke, device=device, precision=args.precision,
    )
    if spec.resume and not name:
        raise UsageError("--resume needs --name: the name of the run to continue")
    spec.validate()
    return with_stored_run(spec) if spec.resume else spec


def with_stored_run(spec: ExperimentSpec) -> ExperimentSpec:
    """For --resume: the run's stored search settings win; say which given flags are ignored."""
    import sys

    path = spec.run_dir / "spec.json"
    try:
        stored = ExperimentSpec.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--resume: cannot read {path}: {exc}") from None
    ignored = spec.differences(stored)
    if ignored:
        print(f"note: --resume keeps the run's own {', '.join(ignored)} "
              f"(see {path})", file=sys.stderr)
    return spec.resumed_from(stored)
