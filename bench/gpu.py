"""``python -m bench gpu``: the GPU path measured in one command (at most ~8 minutes on one GPU).

A PreAct-ResNet18 FST trial on 10 CIFAR-shaped victims, as a search trial runs one: every
victim interleaved epoch by epoch, each evaluated on a val set (5,000 clean + 4,500 triggered
images, CIFAR-10's val size) after each epoch. The victims are one short-trained BadNets victim
(``bench._setup.make_workload``) repeated: the cost does not depend on which backdoor a victim
carries. Measured:

- ``trial``: bf16 and fp32: wall seconds, training and evaluation images/s, and host
  synchronisations per epoch (``torch.cuda.set_sync_debug_mode("warn")`` counts every
  synchronising CUDA call: ``.item()``, blocking copies);
- ``packing``: 1, 2 and 4 such trials at once on the GPU, each in its own process with its
  memory capped at its share (as ``--gpus-per-trial`` 1, 0.5, 0.25 do): aggregate images/s
  against one trial (the throughput ratio) and each trial's peak memory;
- ``agreement``: one victim, a few epochs, on the GPU (bf16 and fp32) and on the CPU (fp32):
  ACC and ASR on 10,000 + 9,000 test images, and whether they agree within noise (3 binomial
  standard errors of the CPU figure, at least 1 point).

Parts that would pass the time budget are skipped and say so in the JSON. On a machine without
CUDA the command says so and measures nothing (exit 0).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench._setup import FULL, Sizes, Workload, make_workload
from defenses import get_defense, make_config
from zoo.data import DatasetInfo, Split
from zoo.metrics import evaluate
from zoo.models import build_model
from zoo.runtime import Precision

ARCH = "preact-resnet18"
VICTIMS = 10
EPOCHS = 10  # FST's paper default
VAL_CLEAN, VAL_TRIGGERED = 5_000, 4_500
PACKING = (1, 2, 4)
PACKING_EPOCHS = 3
AGREEMENT_EPOCHS = 2
BUDGET_S = 420.0  # stop starting parts after 7 minutes: the command stays under 8


@dataclass(frozen=True)
class GpuSizes:
    """The command's sizes; ``QUICK_GPU`` checks the plumbing in seconds (CPU tests)."""

    victims: int = VICTIMS
    epochs: int = EPOCHS
    val_clean: int = VAL_CLEAN
    val_triggered: int = VAL_TRIGGERED
    packing_epochs: int = PACKING_EPOCHS
    agreement_epochs: int = AGREEMENT_EPOCHS
    workload: Sizes = FULL


QUICK_GPU = GpuSizes(victims=2, epochs=1, val_clean=64, val_triggered=48, packing_epochs=1,
                     agreement_epochs=1, workload=Sizes(n_clean=128, n_test=64, n_triggered=48))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SyncCounter:
    """Counts synchronising CUDA calls inside the ``with`` block (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.count: int | None = None
        self._caught: Any = None

    def __enter__(self) -> SyncCounter:
        if self.device.type == "cuda":
            self._caught = warnings.catch_warnings(record=True)
            self._log = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
            self._caught.__exit__(*exc)


def val_sets(w: Workload, sizes: GpuSizes) -> tuple[Split, Split]:
    """The per-epoch val sets: the first images of the workload's clean and triggered sets."""
    return (w.test.subset(torch.arange(min(len(w.test), sizes.val_clean))),
            w.triggered.subset(torch.arange(min(len(w.triggered), sizes.val_triggered))))


def run_trial(w: Workload, arch: str, device: torch.device, *, precision: Precision, victims: int,
              epochs: int, val: tuple[Split, Split], seed: int = 0) -> dict[str, Any]:
    """FST on ``victims`` copies of the victim, interleaved per epoch, each evaluated on ``val``
    after each epoch: seconds, images/s, synchronisations per epoch."""
    cfg = make_config("fst", {"epochs": epochs})
    clean = w.clean.to(device)
    val_clean, val_trig = val[0].to(device), val[1].to(device)
    models, runs = [], []
    for i in range(victims):
        model = build_model(arch, w.info)
        model.load_state_dict(w.victim)
        models.append(model)
        runs.append(get_defense("fst").run(model, clean, w.info, cfg, seed=seed + i, device=device,
                                           precision=precision))
    train_s = eval_s = 0.0
    metrics = None
    _sync(device)
    with SyncCounter(device) as syncs:
        for _ in range(epochs):
            for model, run in zip(models, runs):
                t0 = time.perf_counter()
                next(run)
                _sync(device)
                t1 = time.perf_counter()
                metrics = evaluate(model, val_clean, val_trig, w.target, w.info, device=device,
                                   precision=precision)
                _sync(device)
                train_s += t1 - t0
                eval_s += time.perf_counter() - t1
    n = len(clean)
    trained = victims * epochs * max(1, n // cfg.batch_size) * min(cfg.batch_size, n)
    evaluated = victims * epochs * (len(val_clean) + len(val_trig))
    assert metrics is not None
    return {"precision": precision, "victims": victims, "epochs": epochs,
            "seconds": train_s + eval_s, "train_seconds": train_s, "eval_seconds": eval_s,
            "train_images_per_s": trained / train_s, "eval_images_per_s": evaluated / eval_s,
            "train_images": trained, "eval_images": evaluated,
            "syncs_per_epoch": None if syncs.count is None else syncs.count / epochs,
            "last_val_acc": metrics.acc, "last_val_asr": metrics.asr}


# -- packing: k trials at once, one process each -------------------------------------------------
def _save(path: str, w: Workload, val: tuple[Split, Split]) -> None:
    """The workload as tensors and plain values (read back with ``weights_only=True``)."""
    splits = {"clean": w.clean, "test": w.test, "triggered": w.triggered, "val_clean": val[0],
              "val_triggered": val[1]}
    torch.save({"info": list(dataclasses.astuple(w.info)), "target": w.target, "victim": w.victim,
                **{f"{k}_{p}": getattr(s, p) for k, s in splits.items() for p in ("x", "y")}}, path)


def _load(path: str) -> tuple[Workload, tuple[Split, Split]]:
    d = torch.load(path, weights_only=True)
    info = d["info"]
    split = {k: Split(d[f"{k}_x"], d[f"{k}_y"])
             for k in ("clean", "test", "triggered", "val_clean", "val_triggered")}
    name, channels, size, classes, mean, std, hflip, pad = info
    w = Workload(DatasetInfo(name, channels, size, classes, tuple(mean), tuple(std), hflip, pad),
                 split["clean"], split["test"], split["triggered"], d["target"], d["victim"], 0.0)
    return w, (split["val_clean"], split["val_triggered"])


def _packed_worker(path: str, share: float, barrier: Any, queue: Any, kw: dict[str, Any]) -> None:
    """One packed trial: its memory capped at ``share`` of the GPU, started with the others."""
    try:
        w, val = _load(path)
        device = torch.device(kw.pop("device"))
        arch = kw.pop("arch")
        torch.cuda.set_per_process_memory_fraction(share, device)
        torch.cuda.reset_peak_memory_stats(device)
        run_trial(w, arch, device, precision="bf16", victims=1, epochs=1, val=val)  # warm-up
        barrier.wait()
        t0 = time.perf_counter()
        r = run_trial(w, arch, device, val=val, **kw)
        queue.put({**r, "start": t0, "end": time.perf_counter(),
                   "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30})
    except Exception as exc:  # reported to the parent, which fails with it
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def run_packing(w: Workload, arch: str, device: torch.device, sizes: GpuSizes,
                val: tuple[Split, Split], *, deadline: float) -> list[dict[str, Any]]:
    """1, 2, 4 trials at once: aggregate images/s, its ratio to one trial, peak memory each."""
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "workload.pt")
        _save(path, w, val)
        for k in PACKING:
            if time.perf_counter() > deadline:
                rows.append({"trials": k, "skipped": "time budget"})
                continue
            barrier, queue = ctx.Barrier(k), ctx.Queue()
            kw = {"device": str(device), "arch": arch, "precision": "bf16", "victims": sizes.victims,
                  "epochs": sizes.packing_epochs}
            procs = [ctx.Process(target=_packed_worker, args=(path, 1.0 / k, barrier, queue, dict(kw)))
                     for _ in range(k)]
            for p in procs:
                p.start()
            results = [queue.get() for _ in procs]
            for p in procs:
                p.join()
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                raise RuntimeError(f"packed trial failed: {errors[0]}")
            wall = max(r["end"] for r in results) - min(r["start"] for r in results)
            images = sum(r["train_images"] + r["eval_images"] for r in results)
            rows.append({"trials": k, "wall_seconds": wall, "images_per_s": images / wall,
                         "peak_memory_gb_per_trial": max(r["peak_memory_gb"] for r in results),
                         "syncs_per_epoch": results[0]["syncs_per_epoch"]})
    base = next((r["images_per_s"] for r in rows if r["trials"] == 1 and "images_per_s" in r), None)
    for r in rows:
        if base and "images_per_s" in r:
            r["throughput_ratio"] = r["images_per_s"] / base
    return rows


# -- agreement with the CPU ----------------------------------------------------------------------
def noise_points(p: float, n: int) -> float:
    """3 binomial standard errors of a percentage ``p`` measured on ``n`` images, >= 1 point."""
    return max(1.0, 3.0 * 100.0 * math.sqrt(max(p, 1.0) / 100.0 * (1.0 - min(p, 99.0) / 100.0) / n))


def run_agreement(w: Workload, arch: str, device: torch.device, *, epochs: int,
                  seed: int = 0) -> dict[str, Any]:
    """One victim, ``epochs`` of FST, then ACC/ASR on the full test sets: the CPU in fp32
    against ``device`` in fp32 and bf16."""
    cfg = make_config("fst", {"epochs": epochs})
    rows: list[dict[str, Any]] = []
    runs: list[tuple[torch.device, Precision]] = [(torch.device("cpu"), "fp32"), (device, "fp32"),
                                                  (device, "bf16")]
    for dev, precision in runs:
        model = build_model(arch, w.info)
        model.load_state_dict(w.victim)
        for _ in get_defense("fst").run(model, w.clean, w.info, cfg, seed=seed, device=dev,
                                        precision=precision):
            pass
        m = evaluate(model, w.test, w.triggered, w.target, w.info, device=dev, precision=precision)
        rows.append({"device": str(dev), "precision": precision, "acc": m.acc, "asr": m.asr})
    cpu = rows[0]
    tol = {"acc": noise_points(cpu["acc"], len(w.test)), "asr": noise_points(cpu["asr"], len(w.triggered))}
    for r in rows[1:]:
        r["within_noise"] = all(abs(r[k] - cpu[k]) <= tol[k] for k in ("acc", "asr"))
    return {"epochs": epochs, "tolerance_points": tol, "runs": rows,
            "within_noise": all(r["within_noise"] for r in rows[1:])}


# -- the command ---------------------------------------------------------------------------------
def run_gpu(device: torch.device, *, sizes: GpuSizes = GpuSizes(), seed: int = 0,
            budget_s: float = BUDGET_S, packing: bool = True, arch: str = ARCH,
            victim_epochs: int | None = None) -> dict[str, Any]:
    """Every part on ``device`` (CUDA for the issue's figures; the CPU runs it for tests)."""
    start = time.perf_counter()
    deadline = start + budget_s
    w = make_workload(arch, device=device, seed=seed, sizes=sizes.workload,
                      victim_epochs=victim_epochs, progress=False)
    val = val_sets(w, sizes)
    out: dict[str, Any] = {"arch": arch, "device": str(device), "victim_seconds": w.victim_seconds,
                           "sizes": {**vars(sizes), "workload": vars(sizes.workload)}, "trial": []}
    for precision in ("bf16", "fp32"):
        if time.perf_counter() > deadline:
            out["trial"].append({"precision": precision, "skipped": "time budget"})
            continue
        run_trial(w, arch, device, precision=precision, victims=1, epochs=1, val=val)  # warm-up
        out["trial"].append(run_trial(w, arch, device, precision=precision, victims=sizes.victims,
                                      epochs=sizes.epochs, val=val, seed=seed))
    if packing and device.type == "cuda":
        out["packing"] = run_packing(w, arch, device, sizes, val, deadline=deadline)
    out["agreement"] = (run_agreement(w, arch, device, epochs=sizes.agreement_epochs, seed=seed)
                        if time.perf_counter() <= deadline else {"skipped": "time budget"})
    out["wall_seconds"] = time.perf_counter() - start
    return out
