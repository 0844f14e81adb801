"""Backdoor sequela: is the backdoor really gone after a defense, and what did removing it cost?

A low ASR after fine-tuning can be superficial. Two measurements of a model before and after a
defense, per attack, both pure PyTorch and both deterministic from a seed:

1. **Re-tuning attack (RA)**, Min, Qin, Zhang, Shen, Cheng, "Uncovering, Explaining, and
   Mitigating the Superficial Safety of Backdoor Defense", NeurIPS 2024 (arXiv 2410.09838),
   code AISafety-HKUST/stable_backdoor_purification ``fine_tune/ft_poison.py`` and its README
   ("Launch Retuning Attacks"). The attacker fine-tunes the purified model briefly on a small
   set of clean images in which a handful are replaced by poisoned ones; a model whose backdoor
   was only hidden re-learns it at once, a model that never had it (the clean ``none`` victim)
   does not. Post-RA ASR is the number to read, beside two anchors: RA on the clean model (how
   fast a model that never had the backdoor learns it from so few images) and on the
   undefended victim (the backdoor at full strength).
2. **Membership-inference exposure** (Sha, He, Berrang, Humbert, Zhang, "Fine-Tuning Is All You
   Need to Mitigate Backdoor Attacks", arXiv 2212.09067, which coins *backdoor sequela*: how a
   defense changes the model's vulnerability to other attacks, measured there as
   membership-inference exposure and re-injection risk). Here the loss-threshold attack of
   Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the
   Connection to Overfitting" (CSF 2018): a sample is called a member when its cross-entropy
   loss is low. Reported as the exact ROC AUC (Mann-Whitney rank statistic, ties counted half)
   of the score ``-loss`` on the defender's clean images (members: the defense fine-tuned on
   them, and the victim was trained on them) against as many held-out test images of the
   same classes (non-members), drawn with the seed. Why this attack: it needs one forward pass
   and no shadow models, so it costs far less than the RA; its AUC sweeps every threshold, so
   there is no threshold to tune; it uses the true label, which makes it at least as strong as
   the label-free max-softmax confidence attack (Salem et al., NDSS 2019) on the images a model
   gets wrong; and ``-loss = log p_y`` ranks images exactly as the true-class confidence does,
   so its AUC is that of the confidence attack among the metric-based attacks (Song and
   Mittal, USENIX Security 2021) that ML-Doctor (Liu et al., USENIX Security 2022; co-authored
   by two of Sha et al.) runs. A defense that fine-tunes many epochs on ~100 images can
   memorize them: AUC 0.5 is no exposure, 1.0 total.

RA protocol as released [code: ``fine_tune/ft_poison.py``, README command]
--------------------------------------------------------------------------

- RA set: ``split_ratio`` = 2% of the clean training set drawn at random (``choose_index_v2``;
  1,000 CIFAR-10 images), whose first ``poison_num`` = 5 entries are *replaced* by poisoned
  training images drawn at random (``random.shuffle``) from the attack's saved poisoned
  training set (``bd_train_dataset``), labelled with the target class: the set keeps its size,
  0.5% of it poisoned.
- Clean images go through the training transform (random crop, flip); poisoned ones through
  the test transform (no augmentation).
- All parameters, train mode, SGD lr 0.01, momentum 0.9, no weight decay, no schedule; batch
  128, shuffled, the last partial batch kept (``drop_last=False``); 5 epochs (the README
  command; the script has no default). Then clean test ACC and ASR on the triggered test set.

:class:`RetuneConfig` holds these defaults; :data:`OVERRIDES` the per-dataset diffs.

Departures
----------

- digits (1,078 training images): 2% would be 21 images, 5 of them poisoned (24%). The override
  keeps what the protocol fixes on CIFAR-10 instead: about 100 clean images per class and 0.5%
  poisoned. The whole training set (1,078 images, 5 poisoned: 0.46%) at batch 128 gives 9 steps
  per epoch, 45 in all (paper: 8 and 40).
- Dirty-label attacks: the poisoned images are drawn among the *relabelled* ones (the attacker's
  poisoned training images whose label changed to the target). BackdoorBench also poisons
  target-class images (``utils/backdoor_generate_poison_index.py``), so about 1 draw in 10 in
  the released code is a triggered image that keeps its own label, whose content already
  says "target": it carries little of the trigger's lesson. Clean-label attacks (SIG, LC): the
  triggered target-class images. WaNet's noise images and BPP's negatives (labels kept) are
  never drawn.
- Clean images are drawn from the training split without the images whose poisoned version
  was drawn (the released code can draw both versions of one image).
- A last batch of one image is dropped (BatchNorm cannot train on it); never at the defaults.
- Sha et al.'s own membership-inference attack and re-injection protocol could not be read
  (only the abstract and third-party summaries were retrievable); the RA above stands for
  re-injection, and the loss attack for membership inference.

Wiring (tuner)
--------------

Per victim, after the defense has run (``model`` is the purified model)::

    from zoo.sequela import ra_anchors, retune_config, sequela

    cfg = retune_config(splits.info.name)
    s = sequela(model, victim, splits, cfg=cfg, seed=seed, device=device)
    row["after"].update(s.as_dict())          # ra_acc, ra_asr, ra_ra, mia_before, mia_after, ...
    # once per victim (independent of the defense), e.g. beside ``final.json``'s no_defense:
    a = ra_anchors(victim, clean_victim.model(device), splits, cfg=cfg, seed=seed, device=device)

``mia_before`` (the undefended victim's AUC) depends only on the victim: pass it to
:func:`sequela` to measure it once per victim. ``clean_victim`` is the ``none`` victim
(``get_victims(spec, ["none"], splits=splits)``).

Cost (digits, cnn, one CPU thread): one RA is 45 SGD steps of 128 images plus a test
evaluation, about 2.2 s of CPU (FT at its digits defaults: 5 s); both AUCs together 0.05 s.
:func:`sequela` runs one RA per victim, :func:`ra_anchors` two.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from zoo.attacks.base import Attack
from zoo.config import ConfigError, build_config
from zoo.data import DatasetInfo, Split, Splits
from zoo.loader import augment, normalize
from zoo.metrics import Metrics, evaluate
from zoo.runtime import Precision, autocast, eval_batch_size, eval_mode, to_device_layout
from zoo.victims import Victim

__all__ = [
    "OVERRIDES",
    "Anchors",
    "RetuneConfig",
    "Sequela",
    "loss_scores",
    "mia_auc",
    "ra_anchors",
    "retune_config",
    "retuning_attack",
    "roc_auc",
    "sequela",
]


# ---------------------------------------------------------------------------------------------
# Configuration: the released RA defaults, per-dataset diffs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetuneConfig:
    """The re-tuning attack's settings; defaults are ``fine_tune/ft_poison.py``'s (CIFAR-10)."""

    data_ratio: float = 0.02  #: RA set size, as a share of the training split (``split_ratio``)
    poison_count: int = 5  #: poisoned images replacing clean ones in the RA set (``poison_num``)
    epochs: int = 5  #: passes over the RA set (README command)
    lr: float = 0.01  #: SGD learning rate per batch of ``batch_size``, constant
    momentum: float = 0.9  #: SGD momentum (dimensionless)
    weight_decay: float = 0.0  #: L2 coefficient added to the gradient (none in the code)
    batch_size: int = 128  #: images per step; the last partial batch is kept
    augment_clean: bool = True  #: random crop (and flip where allowed) on the clean images
    augment_poison: bool = False  #: the same on the poisoned ones (code: test transform, no)

    def __post_init__(self) -> None:
        if not 0.0 < self.data_ratio <= 1.0:
            raise ConfigError(f"RetuneConfig data_ratio {self.data_ratio}: "
                             "expected a number in (0, 1]")
        if self.poison_count < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"RetuneConfig poison_count {self.poison_count}, epochs "
                             f"{self.epochs}, batch_size {self.batch_size}: expected each >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0.0):
            raise ConfigError(f"RetuneConfig lr {self.lr}: expected a finite number > 0")
        if not 0.0 <= self.momentum < 1.0 or not self.weight_decay >= 0.0:
            raise ConfigError(f"RetuneConfig momentum {self.momentum}, weight_decay "
                             f"{self.weight_decay}: expected momentum in [0, 1) and "
                             "weight_decay >= 0")

    def set_size(self, n_train: int) -> int:
        """Images in the RA set for a training split of ``n_train`` (poisoned ones included)."""
        return max(int(n_train * self.data_ratio), self.poison_count + 1)


# Per-dataset diffs over the released defaults; one line of why each.
OVERRIDES: dict[str, dict[str, Any]] = {
    # 1,078 training images: all of them keeps ~100 clean images per class and 0.46% poisoned
    # (CIFAR-10 at 2%: 100 per class, 0.5%); 9 steps per epoch at batch 128 (CIFAR-10: 8).
    "digits": {"data_ratio": 1.0},
}


def retune_config(dataset: str | None = None,
                  params: Mapping[str, Any] | None = None) -> RetuneConfig:
    """Released defaults, then ``OVERRIDES[dataset]``, then ``params``; unknown keys and wrong
    types raise :class:`zoo.config.ConfigError` naming them (the rules of every config).

    >>> retune_config("digits").data_ratio, retune_config(params={"epochs": 3}).epochs
    (1.0, 3)
    """
    return build_config(RetuneConfig, "retune", OVERRIDES, params, dataset=dataset)


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: the re-tuning attack
# ---------------------------------------------------------------------------------------------


def _poison_mask(attack: Attack, train: Split, poisoned: Split) -> torch.Tensor:
    """Which images of ``poisoned = attack.training_set(train, ...)`` teach trigger -> target:
    relabelled ones (dirty-label), triggered target-class ones (clean-label)."""
    if attack.clean_label:
        changed = (poisoned.x != train.x).flatten(1).any(1)
        return changed & (poisoned.y == attack.target)
    return poisoned.y != train.y


def _ra_set(attack: Attack, train: Split, cfg: RetuneConfig, *, poison_rate: float, seed: int,
            generator: torch.Generator) -> tuple[Split, torch.Tensor]:
    """The RA set (``poison_count`` poisoned images first, then clean ones) and its is-poisoned
    mask. The poisoned images come from the attack's own poisoned training set."""
    poisoned = attack.training_set(train, poison_rate=poison_rate, epoch=0, seed=seed)
    pool = torch.nonzero(_poison_mask(attack, train, poisoned).cpu()).flatten()
    k, size = cfg.poison_count, cfg.set_size(len(train))
    if len(pool) < k:
        raise ValueError(f"attack {attack.name!r} poisons {len(pool)} training images at rate "
                         f"{poison_rate}: expected at least poison_count={k}")
    if size > len(train):
        raise ValueError(f"RA set of {size} images from {len(train)} training images: "
                         f"expected at most {len(train)} (poison_count {k})")
    pick = pool[torch.randperm(len(pool), generator=generator)[:k]]
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[pick] = False
    others = torch.nonzero(rest).flatten()
    clean = others[torch.randperm(len(others), generator=generator)[: size - k]]
    dev_pick, dev_clean = pick.to(train.x.device), clean.to(train.x.device)
    data = Split(torch.cat([poisoned.x[dev_pick], train.x[dev_clean]]),
                 torch.cat([poisoned.y[dev_pick], train.y[dev_clean]]))
    is_poison = torch.arange(size) < k
    return data, is_poison


def _retune(model: nn.Module, data: Split, is_poison: torch.Tensor, info: DatasetInfo,
            cfg: RetuneConfig, *, generator: torch.Generator, device: torch.device,
            precision: Precision) -> float:
    """Fine-tune ``model`` in place on ``data`` as ft_poison.py does: plain SGD with momentum,
    constant lr, shuffled batches with the last partial one kept; returns the last batch loss."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    augmented = (is_poison & cfg.augment_poison) | (~is_poison & cfg.augment_clean)
    augmented = augmented.to(device)
    model.train()
    loss = torch.zeros((), device=device)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data), generator=generator, device=device)
        for idx in order.split(cfg.batch_size):
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            x, aug = data.x[idx], augmented[idx]
            if bool(aug.any()):
                x = torch.where(aug.view(-1, 1, 1, 1), augment(x, info, generator), x)
            with autocast(device, precision):
                loss = F.cross_entropy(model(to_device_layout(normalize(x, info))), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return float(loss.detach())


def retuning_attack(
    model: nn.Module,
    attack: Attack,
    splits: Splits,
    *,
    poison_rate: float,
    seed: int,
    device: torch.device | str,
    cfg: RetuneConfig | None = None,
    triggered: Split | None = None,
    clean: Split | None = None,
    precision: Precision = "auto",
) -> Metrics:
    """Re-tune a copy of ``model`` on clean training images with ``cfg.poison_count`` of
    ``attack``'s poisoned ones mixed in; return its ACC / ASR / RA on the test split (or on
    ``clean`` and ``triggered`` where given: a search measures on val).

    ``model`` is never modified (a deep copy is trained). ``attack`` may be any trigger of the
    zoo, also one the model never saw (RA on the clean ``none`` model uses the victim's attack).
    ``poison_rate`` is the rate the attack's poisoned training set is built at (the victim's):
    the RA draws its few poisoned images from that set. ``triggered`` defaults to
    ``attack.triggered(splits.test)`` (pass ``victim.bd_test`` to reuse it). ``cfg`` None:
    :func:`retune_config` for the dataset. Deterministic given ``seed`` (and torch's threads).

    >>> m = retuning_attack(victim.model("cpu"), victim.attack_obj, splits,   # doctest: +SKIP
    ...                     poison_rate=victim.poison_rate, seed=0, device="cpu")
    >>> m.asr                                                                 # doctest: +SKIP
    99.1
    """
    dev = torch.device(device)
    cfg = cfg if cfg is not None else retune_config(splits.info.name)
    cpu_gen = torch.Generator().manual_seed(seed)
    data, is_poison = _ra_set(attack, splits.train, cfg, poison_rate=poison_rate, seed=seed,
                              generator=cpu_gen)
    tuned = copy.deepcopy(model).to(dev)
    for p in tuned.parameters():  # the RA tunes every parameter, whatever a defense froze
        p.requires_grad_(True)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    _retune(tuned, data.to(dev), is_poison, splits.info, cfg, generator=gen, device=dev,
            precision=precision)
    clean = splits.test if clean is None else clean
    bd = triggered if triggered is not None else attack.triggered(clean)
    return evaluate(tuned, clean, bd, attack.target, splits.info, device=dev, precision=precision)


# ---------------------------------------------------------------------------------------------
# ALGO LOGIC: membership inference (Yeom et al. loss attack), exact ROC AUC
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def loss_scores(model: nn.Module, split: Split, info: DatasetInfo, *, device: torch.device | str,
                batch_size: int | None = None, precision: Precision = "auto") -> torch.Tensor:
    """Membership score of each image: minus its cross-entropy loss under its true label
    (higher = more member-like), float64 on the CPU. Eval mode; ``model``'s mode is restored.

    The loss is taken in float64 from the logits: in float32, ``log(1 + e^-20)`` rounds to 0,
    which would tie every confidently right image and blunt the AUC.
    """
    dev = torch.device(device)
    batch_size = batch_size or eval_batch_size(dev)
    out = []
    with eval_mode(model):
        for i in range(0, len(split), batch_size):
            x = to_device_layout(normalize(split.x[i : i + batch_size].to(dev), info))
            with autocast(dev, precision):
                logits = model(x)
            y = split.y[i : i + batch_size].to(dev)
            out.append(-F.cross_entropy(logits.double(), y, reduction="none").cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Exact ROC AUC of scores (higher = positive): P(s+ > s-) + P(s+ = s-) / 2, computed as the
    Mann-Whitney U statistic from average ranks (ties share their mean rank), in float64."""
    n_pos, n_neg = len(positive), len(negative)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc got {n_pos} positive and {n_neg} negative scores: "
                         "expected both >= 1")
    scores = torch.cat([positive.flatten(), negative.flatten()]).double().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("roc_auc got a non-finite score: expected finite scores")
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first copy
    mean_rank = first.double() + (counts.double() + 1.0) / 2.0  # 1-based average rank
    rank_sum = mean_rank[inverse[:n_pos]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _class_matched(members: Split, pool: Split, generator: torch.Generator) -> tuple[Split, Split]:
    """Members and as many images of ``pool``, class by class (``min`` of the two counts per
    class), each drawn without replacement from ``generator``."""
    keep_m, keep_p = [], []
    m_y, p_y = members.y.cpu(), pool.y.cpu()
    for c in torch.unique(m_y).tolist():
        mi, pi = torch.nonzero(m_y == c).flatten(), torch.nonzero(p_y == c).flatten()
        k = min(len(mi), len(pi))
        keep_m.append(mi[torch.randperm(len(mi), generator=generator)[:k]])
        keep_p.append(pi[torch.randperm(len(pi), generator=generator)[:k]])
    m_idx, p_idx = torch.cat(keep_m), torch.cat(keep_p)
    return members.subset(m_idx.to(members.y.device)), pool.subset(p_idx.to(pool.y.device))


def mia_auc(model: nn.Module, splits: Splits, *, seed: int, device: torch.device | str,
            precision: Precision = "auto") -> float:
    """AUC in [0, 1] of the loss attack: members ``splits.clean``, non-members drawn from
    ``splits.test`` with ``seed``, class by class as many as the members have (where a class has
    fewer test images, that many members of it are drawn too). 0.5 = no exposure.

    Class-matched because the loss depends on the class: against an unmatched draw of 40 digits
    an untrained cnn scored AUC 0.60 from the class mix alone.
    """
    gen = torch.Generator().manual_seed(seed)
    members, outsiders = _class_matched(splits.clean, splits.test, gen)
    info = splits.info
    return roc_auc(loss_scores(model, members, info, device=device, precision=precision),
                   loss_scores(model, outsiders, info, device=device, precision=precision))


# ---------------------------------------------------------------------------------------------
# What a report needs, per attack
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sequela:
    """One defended model's sequela against one victim (ACC/ASR/RA in percent, AUC in [0, 1])."""

    attack: str
    retuned: Metrics  #: the defended model after the RA (``retuned.asr``: post-RA ASR)
    mia_before: float  #: loss-attack AUC of the undefended victim
    mia_after: float  #: loss-attack AUC of the defended model
    seconds: float  #: wall time of this measurement (RA + both AUCs)

    @property
    def mia_change(self) -> float:
        """``mia_after - mia_before``; positive: the defense exposes its clean data more."""
        return self.mia_after - self.mia_before

    def as_dict(self) -> dict[str, float]:
        """Flat, JSON-able: ra_acc, ra_asr, ra_ra, mia_before, mia_after, mia_change,
        sequela_seconds."""
        r = self.retuned
        return {"ra_acc": r.acc, "ra_asr": r.asr, "ra_ra": r.ra, "mia_before": self.mia_before,
                "mia_after": self.mia_after, "mia_change": self.mia_change,
                "sequela_seconds": self.seconds}


@dataclass(frozen=True)
class Anchors:
    """RA on the two reference models of one attack (independent of any defense)."""

    attack: str
    clean: Metrics  #: RA on the clean (``none``) model: learning the backdoor from scratch
    undefended: Metrics  #: RA on the undefended victim
    seconds: float

    def as_dict(self) -> dict[str, float]:
        return {"clean_ra_acc": self.clean.acc, "clean_ra_asr": self.clean.asr,
                "undefended_ra_acc": self.undefended.acc, "undefended_ra_asr": self.undefended.asr,
                "anchor_seconds": self.seconds}


def _poison_rate(victim: Victim) -> float:
    if victim.poison_rate is None:
        raise ValueError(f"victim {victim.attack!r} has no poison rate: "
                         "expected a backdoored victim, not 'none'")
    return float(victim.poison_rate)


def _attack(victim: Victim) -> Attack:
    if victim.attack_obj is None:
        raise ValueError(f"victim {victim.attack!r} has no trigger to re-tune with: "
                         "expected a victim of a built-in attack")
    return victim.attack_obj


def sequela(model: nn.Module, victim: Victim, splits: Splits, *, seed: int,
            device: torch.device | str, cfg: RetuneConfig | None = None,
            mia_before: float | None = None, precision: Precision = "auto") -> Sequela:
    """Sequela of a defense on ``victim``: RA on the defended ``model`` (a copy is tuned), and the
    loss-attack AUC of ``model`` and of the undefended victim (``mia_before``, measured here
    when None). ``model`` is not modified; test split throughout.

    >>> s = sequela(purified, victim, splits, seed=0, device="cpu")   # doctest: +SKIP
    >>> s.retuned.asr, s.mia_change                                 # doctest: +SKIP
    (97.2, 0.12)
    """
    start = time.perf_counter()
    dev = torch.device(device)
    rate = _poison_rate(victim)  # before _attack: 'none' and external victims fail on this one
    retuned = retuning_attack(model, _attack(victim), splits, poison_rate=rate,
                              seed=seed, device=dev, cfg=cfg, triggered=victim.bd_test,
                              precision=precision)
    if mia_before is None:
        mia_before = mia_auc(victim.model(dev), splits, seed=seed, device=dev, precision=precision)
    after = mia_auc(model, splits, seed=seed, device=dev, precision=precision)
    return Sequela(victim.attack, retuned, float(mia_before), after, time.perf_counter() - start)


def ra_anchors(victim: Victim, clean_model: nn.Module, splits: Splits, *, seed: int,
               device: torch.device | str, cfg: RetuneConfig | None = None,
               precision: Precision = "auto") -> Anchors:
    """RA with ``victim``'s attack on the clean reference model (the ``none`` victim's model,
    never backdoored) and on the undefended victim. Neither model is modified."""
    start = time.perf_counter()
    dev = torch.device(device)
    kw: dict[str, Any] = {"poison_rate": _poison_rate(victim), "seed": seed, "device": dev,
                          "cfg": cfg, "triggered": victim.bd_test, "precision": precision}
    attack = _attack(victim)
    clean = retuning_attack(clean_model, attack, splits, **kw)
    undefended = retuning_attack(victim.model(dev), attack, splits, **kw)
    return Anchors(victim.attack, clean, undefended, time.perf_counter() - start)
