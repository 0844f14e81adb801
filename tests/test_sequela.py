"""Backdoor sequela: the re-tuning attack (RA), the loss-attack membership AUC, the report entry."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.nn import functional as F

from zoo.attacks import make_attack
from zoo.data import Splits, load_splits
from zoo.loader import normalize
from zoo.metrics import Metrics
from zoo.models import build_model
from zoo.runtime import prepare_model, to_device_layout
from zoo.sequela import (
    RetuneConfig,
    _ra_set,
    mia_auc,
    ra_anchors,
    retune_config,
    retuning_attack,
    roc_auc,
    sequela,
)
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims

# A short RA for the tests that check plumbing rather than the protocol's strength.
QUICK = RetuneConfig(data_ratio=0.3, epochs=1)
# Victims for the tests: 8 epochs instead of the digits recipe's 50 (a sixth of the time) give
# the clean model 99.7% ACC and the BadNets victim 99% ASR at 98.9% ACC (seed 0).
SHORT = Recipe(epochs=8, batch_size=64, lr=0.1)


@pytest.fixture(scope="module")
def splits() -> Splits:
    return load_splits("digits")


@pytest.fixture(scope="module")
def zoo(splits, tmp_path_factory):
    spec = ZooSpec(attacks=("none", "badnets"), zoo_dir=tmp_path_factory.mktemp("zoo"),
                   recipe=SHORT)
    clean, badnets = get_victims(spec, splits=splits, device="cpu", progress=False)
    return clean, badnets


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ra(model: torch.nn.Module, victim, splits: Splits, **kw) -> Metrics:
    """RA with ``victim``'s attack at its poison rate, on the CPU (``kw``: seed, cfg)."""
    kw.setdefault("seed", 0)
    return retuning_attack(model, victim.attack_obj, splits, poison_rate=victim.poison_rate,
                           device="cpu", triggered=victim.bd_test, **kw)


@pytest.fixture(scope="module")
def ra_victim(zoo, splits):
    """RA (digits protocol) on the undefended BadNets victim; whether its model was left alone."""
    _, victim = zoo
    model = victim.model("cpu")
    before, mode = _snapshot(model), model.training
    metrics = _ra(model, victim, splits)
    after = model.state_dict()
    unchanged = mode == model.training and all(torch.equal(before[k], after[k]) for k in before)
    return metrics, unchanged


# ---------------------------------------------------------------------------------------------
# Exact AUC
# ---------------------------------------------------------------------------------------------


def _brute_auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    pairs = itertools.product(pos.tolist(), neg.tolist())
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_brute_force_pair_count_with_ties(seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 6, (37,), generator=gen).double()  # few levels: many ties
    neg = torch.randint(0, 5, (23,), generator=gen).double() - 0.5 * (seed % 2)
    assert roc_auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)


def test_roc_auc_extremes_and_refusals() -> None:
    assert roc_auc(torch.ones(4), torch.ones(7)) == 0.5
    assert roc_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert roc_auc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    with pytest.raises(ValueError, match="0 positive"):
        roc_auc(torch.empty(0), torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc(torch.tensor([float("nan")]), torch.ones(3))


# ---------------------------------------------------------------------------------------------
# Membership inference
# ---------------------------------------------------------------------------------------------


def test_mia_auc_of_a_memorizing_model_is_high_and_of_an_untrained_one_near_half(splits) -> None:
    torch.manual_seed(0)
    tiny = splits.train.subset(torch.arange(40))
    small = dataclasses.replace(splits, clean=tiny)
    model = prepare_model(build_model("cnn", splits.info), torch.device("cpu"))
    untrained = mia_auc(model, small, seed=0, device="cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = to_device_layout(normalize(tiny.x, splits.info))
    model.train()
    for _ in range(40):  # full-batch steps on 40 images: memorized
        loss = F.cross_entropy(model(x), tiny.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    memorized = mia_auc(model, small, seed=0, device="cpu")
    assert abs(untrained - 0.5) < 0.1, untrained
    assert memorized > 0.7, memorized  # 0.83 measured
    assert mia_auc(model, small, seed=0, device="cpu") == memorized  # deterministic


# ---------------------------------------------------------------------------------------------
# Re-tuning attack
# ---------------------------------------------------------------------------------------------


def test_ra_keeps_the_undefended_victims_backdoor_and_leaves_the_model_alone(ra_victim) -> None:
    metrics, unchanged = ra_victim
    assert metrics.asr > 90.0 and metrics.acc > 90.0, metrics
    assert unchanged


def test_ra_on_the_clean_model_raises_asr_far_less_than_on_the_victim(zoo, splits,
                                                                      ra_victim) -> None:
    clean, victim = zoo
    model = clean.model("cpu")
    before = _snapshot(model)
    on_clean = _ra(model, victim, splits)
    assert on_clean.asr + 50.0 < ra_victim[0].asr, (on_clean, ra_victim[0])
    assert on_clean.acc > 90.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ra_with_more_poison_teaches_the_clean_model_the_trigger(zoo, splits) -> None:
    """The poisoned images carry trigger -> target: 30 of them (not the protocol's 5) implant it."""
    clean, victim = zoo
    teach = RetuneConfig(data_ratio=0.3, poison_count=30, epochs=10, batch_size=32)
    taught = _ra(clean.model("cpu"), victim, splits, cfg=teach)
    assert taught.asr > 30.0 and taught.acc > 90.0, taught


def test_ra_is_deterministic_and_tunes_parameters_a_defense_froze(zoo, splits) -> None:
    _, victim = zoo
    first = _ra(victim.model("cpu"), victim, splits, seed=3, cfg=QUICK)
    frozen = victim.model("cpu").eval()  # as a linear-probing defense may leave it
    for p in frozen.parameters():
        p.requires_grad_(False)
    assert _ra(frozen, victim, splits, seed=3, cfg=QUICK) == first
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_ra_set_holds_the_attacks_own_poisoned_images(splits) -> None:
    cfg = RetuneConfig(data_ratio=0.5, poison_count=7)
    gen = torch.Generator().manual_seed(0)
    train = splits.train
    for name in ("badnets", "wanet", "sig"):
        attack = make_attack(name, splits.info)
        data, is_poison = _ra_set(attack, train, cfg, poison_rate=0.08, seed=0, generator=gen)
        assert len(data) == len(train) // 2 and int(is_poison.sum()) == 7
        assert torch.all(data.y[is_poison] == 0)
        # poisoned images carry the trigger; the rest are untouched training images
        flat = train.x.flatten(1)
        for x in data.x[is_poison]:
            assert not torch.any(torch.all(flat == x.flatten(), dim=1)), name
        for x in data.x[~is_poison][:20]:
            assert torch.any(torch.all(flat == x.flatten(), dim=1)), name


def test_ra_refuses_an_attack_without_poison(zoo, splits) -> None:
    clean, _ = zoo
    with pytest.raises(ValueError, match="'none' poisons 0"):
        retuning_attack(clean.model("cpu"), clean.attack_obj, splits, poison_rate=0.1, seed=0,
                        device="cpu", cfg=QUICK)


def test_retune_config_defaults_overrides_and_errors() -> None:
    assert retune_config() == RetuneConfig()
    paper = RetuneConfig()
    assert (paper.data_ratio, paper.poison_count, paper.epochs, paper.lr) == (0.02, 5, 5, 0.01)
    assert retune_config("digits").data_ratio == 1.0 and retune_config("cifar10") == RetuneConfig()
    assert retune_config("digits", {"lr": 1}).lr == 1.0
    with pytest.raises(ValueError, match="unknown config key 'lrate'"):
        retune_config(params={"lrate": 0.1})
    with pytest.raises(ValueError, match="epochs=2.5"):
        retune_config(params={"epochs": 2.5})
    with pytest.raises(ValueError, match="data_ratio 0"):
        RetuneConfig(data_ratio=0.0)


# ---------------------------------------------------------------------------------------------
# The report entry
# ---------------------------------------------------------------------------------------------


def test_sequela_and_anchors_agree_with_their_parts(zoo, splits) -> None:
    clean, victim = zoo
    model = victim.model("cpu")  # "defended" by nothing: the AUC cannot change
    s = sequela(model, victim, splits, seed=1, device="cpu", cfg=QUICK)
    assert s.attack == "badnets" and s.mia_after == s.mia_before and s.mia_change == 0.0
    assert s.retuned == _ra(model, victim, splits, seed=1, cfg=QUICK)
    assert set(s.as_dict()) == {"ra_acc", "ra_asr", "ra_ra", "mia_before", "mia_after",
                                "mia_change", "sequela_seconds"}
    given = sequela(model, victim, splits, seed=1, device="cpu", cfg=QUICK, mia_before=0.25)
    assert given.mia_change == pytest.approx(s.mia_after - 0.25)
    a = ra_anchors(victim, clean.model("cpu"), splits, seed=1, device="cpu", cfg=QUICK)
    assert a.undefended == s.retuned and a.clean.asr < a.undefended.asr
    with pytest.raises(ValueError, match="no poison rate"):
        sequela(model, clean, splits, seed=1, device="cpu", cfg=QUICK)


def test_victims_trained_elsewhere_skip_the_retuning_attack_instead_of_failing(zoo, splits) -> None:
    import dataclasses

    from tuner.evaluation import anchors, run_config

    clean, victim = zoo
    theirs = dataclasses.replace(victim, attack="bb:theirs", attack_obj=None, poison_rate=None,
                                 source="backdoorbench")
    assert victim.retunable and not theirs.retunable and not clean.retunable
    out = run_config("lp", {"epochs": 1}, [victim, theirs], splits, seed=0, device="cpu",
                     sequela={"badnets": 0.5, "bb:theirs": 0.5})
    assert "sequela" in out["badnets"] and "sequela" not in out["bb:theirs"]
    assert out["bb:theirs"]["after"]["acc"] > 50.0
    assert set(anchors([victim, theirs], clean, splits, seed=0, device="cpu")) == {"badnets"}
