"""``python -m bench overhead`` and ``python -m bench packing``: the real search, timed.

overhead: the default search, run as ``python -m tuner --defense ngf`` runs it
(``tuner.search.run_search``: 16 trials, ASHA, the four default digits attacks, 3 final
seeds), twice: first with an empty zoo (the victims are built in the run, and Ray starts behind
them), then again with the victims stored (Ray starts behind the paper default's test
evaluation only). Each run's ``timing.json`` gives the figures: the search's wall time (the
Tune run, plus any time the driver waited for Ray to start or stop) against the compute its
trials report (``seconds`` of each ``trials.json`` record, Tune's ``time_total_s``). With
``slots`` trials at once, the Ray overhead share is ``1 - sum(seconds) / (slots * wall)``:
Ray start-up not hidden, trial actors' start (process start and imports), scheduling,
``tune.report``, experiment checkpoints, and idle slots at the end of the search.
Target: at most 10% of the wall time of the default search.

packing (CUDA only): trials per hour with 1, 2 and 4 trials sharing one GPU
(``gpus_per_trial`` 1, 0.5, 0.25; the trainable caps each one's memory at its share), on the
given CUDA device, for ``--arch``: the digits zoo for the cnn, CIFAR-shaped data (digits at
32x32 RGB in CIFAR-10's own files) for preact-resnet18.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._setup import CIFAR_TRAIN, DIGITS_ATTACKS, write_cifar_shaped
from tuner.search import run_search
from tuner.spec import ExperimentSpec, Scheduler
from zoo.train import default_recipe
from zoo.victims import ZooSpec


def search_spec(*, defense: str = "ngf", num_samples: int = 16, scheduler: Scheduler = "asha",
                attacks: tuple[str, ...] = DIGITS_ATTACKS, max_epochs: int | None = None,
                cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, seed: int = 0,
                final_seeds: int = 3, smoke_test: bool = False, zoo_dir: str | None = None,
                output: str | Path, zoo: ZooSpec | None = None,
                sequela: bool = True) -> ExperimentSpec:
    """The spec of one timed search: the digits zoo of ``attacks`` unless ``zoo`` is given."""
    if zoo is None:
        zoo = ZooSpec(attacks=attacks, seed=seed, zoo_dir=Path(zoo_dir) if zoo_dir else None)
    return ExperimentSpec(defense=defense, zoo=zoo, num_samples=num_samples,
                          scheduler=scheduler, max_epochs=max_epochs,
                          cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                          final_seeds=final_seeds, smoke_test=smoke_test,
                          output=Path(output), name=f"bench-{time.time_ns()}", sequela=sequela)


def search_timing(*, output: str | None = None, **kw: Any) -> dict[str, Any]:
    """One search through ``run_search`` (``search_spec``'s arguments); its ``timing.json``
    plus the derived figures."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = search_spec(output=output or tmp, **kw)
        run = run_search(spec)
        timing = json.loads((run / "timing.json").read_text())
        records = json.loads((run / "trials.json").read_text())
    return summarize(timing, records, extra={
        "defense": spec.defense, "scheduler": spec.scheduler, "attacks": len(spec.attacks),
        "dataset": spec.zoo.dataset, "arch": spec.zoo.arch, "device": spec.zoo.device,
        "cpus_per_trial": spec.cpus_per_trial, "gpus_per_trial": spec.gpus})


def summarize(timing: dict[str, Any], records: list[dict[str, Any]],
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of one run from its ``timing.json`` and ``trials.json``."""
    search_wall = timing["search_seconds"] + timing["ray_wait_seconds"]
    return {**(extra or {}), "trials": len(records), "slots": timing["slots"],
            "wall_seconds": timing["wall_seconds"], "victims_seconds": timing["victims_seconds"],
            "search_wall_seconds": search_wall, "ray_wait_seconds": timing["ray_wait_seconds"],
            "final_seconds": timing["final_seconds"],
            "trial_seconds_sum": timing["trial_seconds"],
            "overhead_share": timing["ray_overhead_share"],
            "trials_per_hour": 3600.0 * len(records) / search_wall if search_wall > 0 else 0.0,
            "states": {s: sum(r["state"] == s for r in records)
                       for s in sorted({r["state"] for r in records})}}


def run_overhead(*, zoo_dir: str | None = None, **kw: Any) -> dict[str, Any]:
    """The search with the victims built in the run, then again with them stored; with
    ``zoo_dir`` given, that zoo is used as it is, for one run."""
    if zoo_dir is not None:
        return {"runs": [{"victims": "as in --zoo-dir", **search_timing(zoo_dir=zoo_dir, **kw)}]}
    with tempfile.TemporaryDirectory() as zoo:
        first = search_timing(zoo_dir=zoo, **kw)
        again = search_timing(zoo_dir=zoo, **kw)
    return {"runs": [{"victims": "built in the run", **first}, {"victims": "stored", **again}]}


PACKING = (1, 2, 4)
PACKING_VICTIM_EPOCHS = 2  # PreAct victims: the packing figures do not depend on their quality


def packing_zoo(arch: str, device: torch.device, workdir: Path, *, attacks: tuple[str, ...],
                seed: int = 0, zoo_dir: str | None = None, victim_epochs: int | None = None,
                n_train: int = CIFAR_TRAIN, n_test: int = 10_000) -> ZooSpec:
    """The victims of the packing search, on ``device``: the digits zoo for the cnn; for
    preact-resnet18, CIFAR-shaped data (``bench._setup.write_cifar_shaped`` under ``workdir``,
    read as cifar10) and victims trained for ``victim_epochs`` epochs (default 2) into a store
    under ``workdir`` unless ``zoo_dir`` is given."""
    if arch == "cnn":
        return ZooSpec(attacks=attacks, seed=seed, zoo_dir=Path(zoo_dir) if zoo_dir else None,
                       device=str(device))
    root = write_cifar_shaped(workdir / "data", n_train=n_train, n_test=n_test, seed=seed)
    recipe = dataclasses.replace(default_recipe("cifar10", arch),
                                 epochs=victim_epochs or PACKING_VICTIM_EPOCHS)
    return ZooSpec("cifar10", data_root=root, arch=arch, attacks=attacks, seed=seed,
                   zoo_dir=Path(zoo_dir) if zoo_dir else workdir / "zoo", recipe=recipe,
                   device=str(device))


def run_packing(*, arch: str = "cnn", device: torch.device | None = None, num_samples: int = 8,
                attacks: tuple[str, ...] = DIGITS_ATTACKS, seed: int = 0,
                zoo_dir: str | None = None, victim_epochs: int | None = None,
                n_train: int = CIFAR_TRAIN, n_test: int = 10_000, **kw: Any) -> dict[str, Any]:
    """Trials per hour with 1, 2 and 4 trials per GPU on ``device`` (default: the first CUDA
    device); ``{"skipped": "no CUDA"}`` without one."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    device = device or torch.device("cuda")
    if device.type != "cuda":
        raise ValueError(f"packing: device {device} is not a CUDA device")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        zoo = packing_zoo(arch, device, Path(tmp), attacks=attacks, seed=seed, zoo_dir=zoo_dir,
                          victim_epochs=victim_epochs, n_train=n_train, n_test=n_test)
        for k in PACKING:
            r = search_timing(num_samples=max(num_samples, k), gpus_per_trial=1.0 / k,
                              cpus_per_trial=1.0, final_seeds=1, sequela=False, zoo=zoo,
                              seed=seed, **kw)
            rows.append({"trials_per_gpu": k, **r})
    return {"arch": arch, "dataset": zoo.dataset, "runs": rows}
