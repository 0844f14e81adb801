"""Run one defense configuration on every victim and measure it (no Ray, no Optuna).

- :func:`trial_epochs` drives a search trial: one model and one defense generator per victim,
  advanced one epoch at a time in turn (victims interleaved), each model evaluated on the
  validation split after every scored epoch (in a search, ASHA's rungs and the last).
- :func:`seeded_epochs` runs a trial's configuration with several seeds (``--trial-seeds``):
  each seed draws its own clean subset and orders training with its own seed; each epoch
  yields the metrics averaged over the seeds, with each seed's under ``"seeds"``.
- :func:`run_config` runs a configuration to the end and measures it once, on test (the final
  evaluation and ``python -m tuner evaluate``) or val.

A victim whose defense reports divergence keeps the worst-case metrics from then on:
ACC 0, ASR 100, RA 0 and DER 0 (the lowest DER, rather than the formula's value for those
numbers, so that every objective ranks the divergence last). The other victims continue.

Each victim is fine-tuned and measured with its own ``info``: the dataset's facts, with the
model's own input normalization for a victim trained elsewhere (``zoo.external``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any

import torch

from defenses import get_defense, make_config
from tuner.records import CPU_SECONDS, DEVICE_SECONDS, GPU_PEAK_MB
from zoo.data import Split, Splits, redraw_clean
from zoo.metrics import der, evaluate
from zoo.runtime import JobMap, Precision, SerialMap, in_order
from zoo.sequela import mia_auc, ra_anchors, retuning_attack
from zoo.sequela import sequela as measure_sequela
from zoo.victims import Victim

__all__ = ["DIVERGED_METRICS", "CostMeter", "anchors", "final_job", "mia_before", "planned_epochs",
           "resolve_config", "run_config", "seeded_epochs", "subsample_index", "trial_epochs", "trial_payload"]

DIVERGED_METRICS = {"acc": 0.0, "asr": 100.0, "ra": 0.0, "der": 0.0}


class CostMeter:
    """What a trial spent since it started: CPU seconds of its process (``time.process_time``,
    every thread), and on CUDA the peak GPU memory (``torch.cuda.max_memory_allocated``).

    ``device_seconds`` is what the trial held of its device: CPU seconds on a CPU trial, wall
    seconds times its GPU share on a GPU trial.
    """

    def __init__(self, device: Any) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def read(self, gpus: float = 0.0) -> dict[str, float]:
        cpu, wall = time.process_time() - self.cpu0, time.perf_counter() - self.wall0
        out = {CPU_SECONDS: cpu, DEVICE_SECONDS: wall * gpus if self.cuda and gpus else cpu}
        if self.cuda:
            out[GPU_PEAK_MB] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def resolve_config(defense: str, params: Mapping[str, Any] | None, dataset: str | None,
                   max_epochs: int | None = None) -> Any:
    """``make_config(defense, params, dataset=...)``, with ``epochs`` capped at ``max_epochs``."""
    cfg = make_config(defense, dict(params or {}), dataset=dataset)
    if max_epochs is not None and cfg.epochs > max_epochs:
        cfg = dataclasses.replace(cfg, epochs=int(max_epochs))
    return cfg


def planned_epochs(defense: str, params: Mapping[str, Any] | None, dataset: str,
                   max_epochs: int | None) -> int:
    """The epochs a configuration runs: its ``epochs``, capped at ``max_epochs``."""
    return int(resolve_config(defense, params, dataset, max_epochs).epochs)


def _measure(model: torch.nn.Module, victim: Any, clean: Any, triggered: Any, info: Any,
             split: str, device: torch.device, precision: Precision) -> dict[str, float]:
    after = evaluate(model, clean, triggered, victim.target, info, device=device, precision=precision)
    out = after.as_dict()
    out["der"] = der(victim.metrics[split], after)
    return out


def _start(defense: str, cfg: Any, victim: Victim, splits: Splits, seed: int,
           device: torch.device, precision: Precision) -> tuple[torch.nn.Module, Iterator[Any]]:
    model = victim.model(device)
    run = get_defense(defense).run(model, splits.clean, victim.info, cfg, seed=seed, device=device,
                                   precision=precision)
    return model, iter(run)


def subsample_index(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """``k`` of ``range(n)`` drawn without replacement from ``seed``, sorted; None if ``k`` is
    None or covers the split."""
    if k is None or k >= n:
        return None
    if k < 1:
        raise ValueError(f"val_subsample {k}: expected an integer >= 1 or None")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def _val_sets(victims: Sequence[Victim], splits: Splits, device: torch.device, k: int | None,
              seed: int) -> tuple[dict[str, tuple[Split, Split]], dict[str, tuple[Split, Split]]]:
    """Per attack: (clean val, triggered val) on ``device``, full and subsampled."""
    clean = splits.val.to(device)
    idx = subsample_index(len(clean), k, seed)
    clean_sub = clean if idx is None else clean.subset(idx.to(device))
    full, sub = {}, {}
    for v in victims:
        bd = v.bd_val.to(device)
        bd_idx = subsample_index(len(bd), k, seed + 1)
        full[v.attack] = (clean, bd)
        sub[v.attack] = (clean_sub, bd if bd_idx is None else bd.subset(bd_idx.to(device)))
    return full, sub


def trial_epochs(defense: str, params: Mapping[str, Any] | None, victims: Sequence[Victim],
                 splits: Splits, *, seed: int, device: torch.device | str,
                 max_epochs: int | None = None,
                 val_subsample: int | None = None, scored: Container[int] | None = None,
                 precision: Precision = "auto", retune: bool = False
                 ) -> Iterator[dict[str, Any]]:
    """Yield the per-attack metrics on val after every scored epoch.

    Each item: ``{"epoch": int (1-based), "per_attack": {attack: {acc, asr, ra, der}},
    "diverged": bool (any victim diverged so far), "diverged_attacks": [...], "loss": mean
    training loss of the last epoch over the victims still running (None if none),
    "val_images": clean + triggered val images measured per victim this epoch}``.
    Stops when every generator has finished, or when every victim has diverged.
    ``scored``: the epochs measured on val (``None``: every epoch), ASHA's rungs in a search
    (``--val-epochs rungs``); the others are trained and not yielded. The last epoch a victim
    trains is always measured.
    ``val_subsample=n``: epochs before the last planned one use a fixed, seeded subset of ``n``
    clean and ``n`` triggered val images (see the module docstring); the last uses all of val.
    ``retune``: at a victim's last planned epoch, also its ASR on val after a re-tuning attack
    (``ra_asr``, :func:`zoo.sequela.retuning_attack`), for ``--objective robust``.
    """
    device = torch.device(device)
    cfg = resolve_config(defense, params, splits.info.name, max_epochs)
    runs = {v.attack: _start(defense, cfg, v, splits, seed, device, precision) for v in victims}
    by_attack = {v.attack: v for v in victims}
    full, sub = _val_sets(victims, splits, device, val_subsample, seed)
    state: dict[str, str] = {a: "running" for a in runs}  # running | done | diverged
    last: dict[str, dict[str, float]] = {}
    unscored: set[str] = set()  # trained since their last measurement

    def measure(attack: str, epoch: int) -> None:
        model, v = runs[attack][0], by_attack[attack]
        clean, triggered = (full if epoch >= cfg.epochs else sub)[attack]
        last[attack] = _measure(model, v, clean, triggered, v.info, "val", device, precision)
        if retune and epoch >= cfg.epochs and v.attack_obj is not None and v.poison_rate is not None:
            last[attack]["ra_asr"] = retuning_attack(
                model, v.attack_obj, splits, poison_rate=v.poison_rate, seed=seed,
                device=device, clean=clean, triggered=triggered, precision=precision).asr
        unscored.discard(attack)

    def item(epoch: int, losses: Sequence[float]) -> dict[str, Any]:
        out = _item(epoch, runs, last, state, losses)
        val = full if epoch >= cfg.epochs else sub
        out["val_images"] = sum(len(c) + len(t) for c, t in val.values()) // max(1, len(val))
        return out

    epoch = 0
    losses: list[float] = []  # of the last epoch trained
    while True:
        epoch += 1
        advanced, losses_now = False, []
        for attack, (_, gen) in runs.items():
            if state[attack] != "running":
                continue
            result = next(gen, None)
            if result is None:
                state[attack] = "done"
                continue
            advanced = True
            if result.diverged:
                state[attack], last[attack] = "diverged", dict(DIVERGED_METRICS)
                unscored.discard(attack)
                continue
            losses_now.append(float(result.loss))
            unscored.add(attack)
        if not advanced:  # a run that ended before its planned last epoch is measured as it is
            if unscored:
                for attack in sorted(unscored):
                    measure(attack, epoch - 1)
                yield item(epoch - 1, losses)
            return
        losses = losses_now
        ended = all(s == "diverged" for s in state.values())
        if scored is None or epoch >= cfg.epochs or epoch in scored or ended:
            for attack in sorted(unscored):
                measure(attack, epoch)
            yield item(epoch, losses)
        if ended:
            return


def trial_payload(victims: Sequence[Any], splits: Splits, *, retune: bool = False
                  ) -> tuple[list[Any], Splits]:
    """What a search trial uses of the victims and splits, and nothing more: every trial
    unpickles its payload, and the train and test splits and the victims' triggered test sets
    are most of it (CIFAR-10: 50,000 training images). Kept: the clean and val splits, each
    victim's weights, triggered val set and metrics. The re-tuning attack (``retune``, the
    robust objective) poisons the training split with the victim's attack: then all is kept."""
    if retune:
        return list(victims), splits
    none = torch.arange(0)
    slim = dataclasses.replace(splits, train=splits.train.subset(none), test=splits.test.subset(none))
    return [dataclasses.replace(v, bd_test=v.bd_test.subset(none), attack_obj=None)
            for v in victims], slim


def _item(epoch: int, runs: Mapping[str, Any], last: Mapping[str, dict[str, float]],
          state: Mapping[str, str], losses: Sequence[float]) -> dict[str, Any]:
    diverged = sorted(a for a, s in state.items() if s == "diverged")
    return {
        "epoch": epoch,
        "per_attack": {a: dict(last[a]) for a in runs if a in last},
        "diverged": bool(diverged),
        "diverged_attacks": diverged,
        "loss": sum(losses) / len(losses) if losses else None,
    }


def seeded_epochs(epochs_fn: Any, defense: str, params: Mapping[str, Any] | None,
                  victims: Sequence[Any], splits: Any, *, seeds: Sequence[int],
                  clean_ratio: float | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """``epochs_fn`` (:func:`trial_epochs`) once per seed, advanced together.

    Seed ``s`` fine-tunes on the clean subset that ``--seed s`` draws (the first seed keeps
    ``splits``' own, so one seed is exactly :func:`trial_epochs`) with the defense seeded by
    ``s`` (the training order). Each item: ``per_attack`` the mean over the seeds of each
    metric, ``diverged`` if any seed diverged, and ``seeds`` the per-seed ``per_attack``.
    A seed whose run ended early (every victim diverged) keeps its last metrics.
    """
    first, *rest = seeds
    if not rest:
        yield from epochs_fn(defense, params, victims, splits, seed=first, **kwargs)
        return
    streams = [epochs_fn(defense, params, victims, splits, seed=first, **kwargs)]
    streams += [epochs_fn(defense, params, victims,
                          redraw_clean(splits, seed=s, dataset=splits.info.name,
                                       clean_ratio=clean_ratio), seed=s, **kwargs)
                for s in rest]
    last: list[dict[str, Any] | None] = [None] * len(streams)
    live = [True] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            if live[i]:
                item = next(stream, None)
                if item is None:
                    live[i] = False
                else:
                    last[i] = item
        if not any(live) or any(item is None for item in last):
            return
        yield _mean_item([item for item in last if item is not None])


def _mean_item(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    per_seed = [item["per_attack"] for item in items]
    attacks = [a for a in per_seed[0] if all(a in p for p in per_seed)]
    mean = {a: {k: sum(p[a][k] for p in per_seed) / len(per_seed) for k in per_seed[0][a]
                if all(k in p[a] for p in per_seed)} for a in attacks}
    losses = [item["loss"] for item in items if item.get("loss") is not None]
    return {**items[0], "epoch": max(int(item["epoch"]) for item in items), "per_attack": mean,
            "diverged": any(item["diverged"] for item in items),
            "diverged_attacks": sorted({a for item in items
                                        for a in item.get("diverged_attacks", [])}),
            "loss": sum(losses) / len(losses) if losses else None, "seeds": per_seed}


def run_config(defense: str, params: Mapping[str, Any] | None, victims: Sequence[Victim],
               splits: Splits, *, seed: int, device: torch.device | str,
               split: str = "test", precision: Precision = "auto",
               sequela: Mapping[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Run the configuration to the end on every victim; measure on ``split`` ("test"/"val").

    Returns ``{attack: {"before": {acc, asr, ra}, "after": {acc, asr, ra, der},
    "seconds": defense wall time, "diverged": bool, "epochs": epochs run}}``. ``sequela``
    (the undefended victims' membership-inference AUC per attack, :func:`mia_before`): also
    the backdoor sequela of the defended model on test (:func:`zoo.sequela.sequela`: ASR after a
    re-tuning attack, membership-inference AUC and its change) under ``"sequela"``.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split {split!r}: expected 'test' or 'val'")
    device = torch.device(device)
    cfg = resolve_config(defense, params, splits.info.name)
    clean = splits.test if split == "test" else splits.val
    out: dict[str, dict[str, Any]] = {}
    for v in victims:
        start = time.perf_counter()
        model, gen = _start(defense, cfg, v, splits, seed, device, precision)
        diverged, epochs = False, 0
        for result in gen:
            epochs = int(result.epoch)
            if result.diverged:
                diverged = True
                break
        seconds = time.perf_counter() - start
        triggered = v.bd_test if split == "test" else v.bd_val
        after = (dict(DIVERGED_METRICS) if diverged
                 else _measure(model, v, clean, triggered, v.info, split, device, precision))
        out[v.attack] = {"before": v.metrics[split].as_dict(), "after": after,
                         "seconds": seconds, "diverged": diverged, "epochs": epochs}
        if sequela is not None and not diverged and v.retunable:
            s = measure_sequela(model, v, splits, seed=seed, device=device,
                                mia_before=sequela.get(v.attack), precision=precision)
            out[v.attack]["sequela"] = s.as_dict()
    return out


def final_job(defense: str, params: Mapping[str, Any] | None, victim: Victim, seed: int,
              mia: Mapping[str, float] | None, precision: Precision, *, splits: Splits,
              device: torch.device) -> dict[str, Any]:
    """One victim's :func:`run_config` on test: a job of ``tuner.search.final_evaluation``
    (run here or in a Ray task, ``zoo.runtime.JobMap``)."""
    return run_config(defense, params, [victim], splits, seed=seed, device=device, split="test",
                      precision=precision, sequela=mia)[victim.attack]


def mia_before(victims: Sequence[Victim], splits: Splits, *, seed: int, device: torch.device | str,
               precision: Precision = "auto", jobs: JobMap | None = None) -> dict[str, float]:
    """Membership-inference AUC of each undefended victim (what a defense's change is against);
    one job per victim (``jobs``, else here on ``device``)."""
    aucs = in_order(jobs or SerialMap(device), _mia_job, [(v, seed, precision) for v in victims],
                    splits=splits)
    return {v.attack: auc for v, auc in zip(victims, aucs)}


def _mia_job(victim: Victim, seed: int, precision: Precision, *, splits: Splits,
             device: torch.device) -> float:
    return mia_auc(victim.model(device), splits, seed=seed, device=device, precision=precision)


def anchors(victims: Sequence[Victim], clean: Victim, splits: Splits, *, seed: int,
            device: torch.device | str, precision: Precision = "auto", jobs: JobMap | None = None
            ) -> dict[str, dict]:
    """Per attack: the re-tuning attack on the clean reference model (``clean``, the "none"
    victim) and on the undefended victim (:func:`zoo.sequela.ra_anchors`), the two ends a
    defended model's post-RA ASR lies between; one job per victim (``jobs``, else here on
    ``device``). Victims trained elsewhere (not ``retunable``) have none."""
    some = [v for v in victims if v.retunable]
    ends = in_order(jobs or SerialMap(device), _anchor_job,
                    [(v, clean, seed, precision) for v in some], splits=splits)
    return {v.attack: e for v, e in zip(some, ends)}


def _anchor_job(victim: Victim, clean: Victim, seed: int, precision: Precision, *, splits: Splits,
                device: torch.device) -> dict[str, Any]:
    return ra_anchors(victim, clean.model(device), splits, seed=seed, device=device,
                      precision=precision).as_dict()
