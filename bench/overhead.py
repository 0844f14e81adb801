"""``python -m bench overhead`` and ``python -m bench packing``: a real Ray Tune search.

overhead: the wall time of a search (``tuner.trainable.ray_session`` + ``run_tune``, the calls
``tuner.search`` makes; 16 trials, FIFO by default, digits cnn victims) against the compute its
trials report (``seconds`` of each ``trials.json`` record, Tune's ``time_total_s``). With
``slots`` trials running at once, ideal packing takes ``sum(seconds) / slots``; the overhead
share is ``1 - sum(seconds) / (slots * wall)``: Ray start-up, trial scheduling, actor reuse,
``tune.report`` and the experiment checkpoints, and idle slots at the end of the search (a
tail of 16 trials on 2 slots has none; on 16 slots the slowest trial sets the wall).
Target: at most 10% of the wall time of the default search.

packing (CUDA only): trials per hour with 1, 2 and 4 trials sharing one GPU
(``gpus_per_trial`` 1, 0.5, 0.25; the trainable caps each one's memory at its share).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._setup import DIGITS_ATTACKS, digits_victims


def search_timing(*, defense: str = "ngf", num_samples: int = 16, scheduler: str = "fifo",
                  attacks: tuple[str, ...] = DIGITS_ATTACKS, max_epochs: int | None = None,
                  cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, seed: int = 0,
                  victim_epochs: int | None = None, zoo_dir: str | None = None,
                  output: str | None = None) -> dict[str, Any]:
    """Run one search through the tuner's Ray layer; wall time, trial compute and overhead."""
    from tuner import trainable  # imports ray
    from tuner.spec import ExperimentSpec

    splits, victims = digits_victims(attacks, victim_epochs=victim_epochs, seed=seed,
                                     zoo_dir=zoo_dir)
    with tempfile.TemporaryDirectory() as tmp:
        spec = ExperimentSpec(defense=defense, attacks=attacks, num_samples=num_samples,
                              scheduler=scheduler, max_epochs=max_epochs, seed=seed,
                              cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                              output=Path(output or tmp), name="bench")
        space = spec.load_space()
        t0 = time.perf_counter()
        with trainable.ray_session(spec):
            t1 = time.perf_counter()
            slots = trainable._max_concurrent(spec)
            records = trainable.run_tune(spec, space, victims, splits)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
    return summarize(records, wall=t3 - t0, fit=t2 - t1, slots=slots,
                     extra={"defense": defense, "scheduler": scheduler, "attacks": len(attacks),
                            "cpus_per_trial": cpus_per_trial, "gpus_per_trial": gpus_per_trial,
                            "ray_start_stop_seconds": (t1 - t0) + (t3 - t2)})


def summarize(records: list[dict[str, Any]], *, wall: float, fit: float, slots: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures of one search from its trial records (``trials.json``) and its wall times."""
    compute = sum(float(r["seconds"]) for r in records)
    share = max(0.0, 1.0 - compute / (slots * wall)) if wall > 0 else 0.0
    fit_share = max(0.0, 1.0 - compute / (slots * fit)) if fit > 0 else 0.0
    return {**(extra or {}), "trials": len(records), "slots": slots, "wall_seconds": wall,
            "search_seconds": fit, "trial_seconds_sum": compute, "overhead_share": share,
            "overhead_share_in_search": fit_share,
            "trials_per_hour": 3600.0 * len(records) / wall if wall > 0 else 0.0,
            "states": {s: sum(r["state"] == s for r in records)
                       for s in sorted({r["state"] for r in records})}}


PACKING = (1, 2, 4)


def run_packing(*, num_samples: int = 8, **kw: Any) -> dict[str, Any]:
    """Trials per hour with 1, 2 and 4 trials per GPU; ``{"skipped": "no CUDA"}`` without one."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    rows = []
    for k in PACKING:
        r = search_timing(num_samples=max(num_samples, k), gpus_per_trial=1.0 / k,
                          cpus_per_trial=1.0, **kw)
        rows.append({"trials_per_gpu": k, **r})
    return {"runs": rows}
