"""Contract suite for every registered defense: tiny CNN, random 8x8 images, seconds on CPU."""

from __future__ import annotations

import copy
import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import defenses
from defenses import REGISTRY, ConfigError, EpochResult, get_defense, make_config
from zoo.data import DatasetInfo, Split
from zoo.metrics import evaluate
from zoo.models import SmallCNN

INFO = DatasetInfo("tiny", 1, 8, 4, (0.5,), (0.5,), hflip=True, pad=1)
CPU = torch.device("cpu")
NAMES = sorted(REGISTRY)
EXPECTED_NAMES = {"ft", "ftsam", "fst", "ft_init", "lp", "fe_tuning", "ngf", "sft"}

# Small, fast settings per defense (2 epochs of 3 steps of 16 images).
FAST: dict[str, dict] = {name: {"epochs": 2, "batch_size": 16} for name in EXPECTED_NAMES}
FAST["ngf"].update(steps_per_epoch=3, t_cov=1, t_inv=2)
FAST["sft"].update(lr_base=0.01, lr_max2=0.02, lr_max1=0.05, half_cycle=2)

# Settings that overflow within a couple of epochs.
HUGE = {name: {"lr": 1e30} for name in EXPECTED_NAMES}
HUGE["ngf"] = {"lr": 1e30, "kl_clip": 1e30}
HUGE["sft"] = {"lr_base": 1e28, "lr_max2": 1e29, "lr_max1": 1e30}
# LP: the head-norm projection alone bounds a linear head, so add decay that overflows it.
HUGE["lp"] = {"lr": 1e30, "weight_decay": 1.0, "project_head_norm": False}

TRAINS_HEAD = EXPECTED_NAMES - {"fe_tuning"}
TRAINS_BACKBONE = EXPECTED_NAMES - {"lp", "ngf"}


@pytest.fixture
def clean() -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 1, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(48) % 4
    return Split(x, y)


@pytest.fixture
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(1, 4, width=8)


def _run(name: str, model, clean, params=None, seed=0) -> list[EpochResult]:
    cfg = make_config(name, {**FAST[name], **(params or {})})
    return list(get_defense(name).run(model, clean, INFO, cfg, seed=seed, device=CPU))


def _head_and_backbone(model) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    return head, body


def _changed(a: dict, b: dict, *, params_only: bool = True) -> bool:
    keys = [k for k in a if not params_only or ("running" not in k and "num_batches" not in k)]
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_registry_holds_exactly_the_documented_defenses():
    assert set(REGISTRY) == EXPECTED_NAMES
    for name, d in REGISTRY.items():
        assert d.name == name and d.doc and callable(d.run)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="'ft' registered twice"):
        defenses._registry([defenses._module(defenses.ft)] * 2)


def test_unknown_defense_lists_the_known_names():
    with pytest.raises(ConfigError, match="unknown defense 'nope'.*ngf"):
        get_defense("nope")


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_is_finite(name, model, clean):
    (res,) = _run(name, model, clean, {"epochs": 1})
    assert isinstance(res, EpochResult) and res.epoch == 1 and not res.diverged
    assert torch.isfinite(torch.tensor([res.loss, res.lr])).all() and res.loss > 0


@pytest.mark.parametrize("name", NAMES)
def test_yields_exactly_epochs_results_numbered_from_one(name, model, clean):
    res = _run(name, model, clean, {"epochs": 3})
    assert [r.epoch for r in res] == [1, 2, 3]


@pytest.mark.parametrize("name", NAMES)
def test_only_the_intended_parameters_change(name, model, clean):
    head0, body0 = _head_and_backbone(model)
    cfg = make_config(name, FAST[name])
    snaps = []
    for _ in get_defense(name).run(model, clean, INFO, cfg, seed=0, device=torch.device("cpu")):
        snaps.append(_head_and_backbone(model))
    (head1, _), (head2, body2) = snaps
    if name in TRAINS_HEAD:
        assert _changed(head0, head2)
    else:  # fe_tuning: re-initialized once, then frozen
        assert not _changed(head1, head2) and not model.head.weight.requires_grad
    if name in TRAINS_BACKBONE:
        assert _changed(body0, body2)
    else:  # weights AND BatchNorm statistics of the backbone untouched
        assert not _changed(body0, body2, params_only=False)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_identical_weights(name, model, clean):
    twin = copy.deepcopy(model)
    r1, r2 = _run(name, model, clean, seed=3), _run(name, twin, clean, seed=3)
    assert r1 == r2
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", NAMES)
def test_injected_nan_is_reported_as_diverged_not_raised(name, model, clean):
    with torch.no_grad():
        model.body[0][0].weight[0, 0, 0, 0] = float("nan")
    res = _run(name, model, clean, {"epochs": 3})
    assert len(res) == 1 and res[0].diverged


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES - {"ngf"}))
def test_huge_lr_is_reported_as_diverged_and_model_still_evaluates(name, model, clean):
    res = _run(name, model, clean, {**HUGE[name], "epochs": 4})
    assert res[-1].diverged and not any(r.diverged for r in res[:-1])
    m = evaluate(model, clean, clean, 0, INFO, device=torch.device("cpu"))  # no exception
    assert 0.0 <= m.acc <= 100.0


@pytest.mark.parametrize("name", NAMES)
def test_bf16_can_be_forced_on_cpu_and_bad_precision_is_refused(name, model, clean):
    cfg = make_config(name, {**FAST[name], "epochs": 1})
    (res,) = get_defense(name).run(model, clean, INFO, cfg, seed=0, device=CPU, precision="bf16")
    assert not res.diverged and torch.isfinite(torch.tensor(res.loss))
    with pytest.raises(ConfigError, match="precision='fp8'"):
        next(get_defense(name).run(model, clean, INFO, cfg, seed=0, device=CPU, precision="fp8"))


# ------------------------------------------------------------------------------------------
# Batches as the authors' loops: the last partial batch is kept (ceil(n / batch) steps)
# ------------------------------------------------------------------------------------------

KEEPS_PARTIAL_BATCH = sorted(EXPECTED_NAMES - {"ngf"})  # every loop but NGF's sampler


def _steps_and_batch_sizes(name: str, model, split: Split, params: dict) -> tuple[int, set]:
    """Optimizer steps and batch sizes seen during one epoch of ``name``."""
    steps, sizes = [0], set()

    def count(*_):
        steps[0] += 1

    hooks = [register_optimizer_step_post_hook(count),
             model.body.register_forward_pre_hook(lambda _m, args: sizes.add(len(args[0])))]
    try:
        _run(name, model, split, {**params, "epochs": 1})
    finally:
        for h in hooks:
            h.remove()
    return steps[0], sizes


@pytest.mark.parametrize("name", KEEPS_PARTIAL_BATCH)
def test_authors_loops_keep_the_last_partial_batch(name, model, clean):
    odd = Split(clean.x[:42], clean.y[:42])  # batch 16: two full batches and one of 10
    assert make_config(name).drop_last is False  # the authors' default
    steps, sizes = _steps_and_batch_sizes(name, model, odd, {})
    assert steps == math.ceil(42 / 16) == 3 and sizes == {16, 10}
    steps, sizes = _steps_and_batch_sizes(name, model, odd, {"drop_last": True})
    assert steps == 42 // 16 == 2 and sizes == {16}


def test_ngf_draws_full_batches_with_replacement(model, clean):
    odd = Split(clean.x[:42], clean.y[:42])
    steps, sizes = _steps_and_batch_sizes("ngf", model, odd, {})
    assert steps == FAST["ngf"]["steps_per_epoch"] and sizes == {16}


# ------------------------------------------------------------------------------------------
# NGF: each choice of updated parameters moves exactly those (and their BN statistics)
# ------------------------------------------------------------------------------------------


def _module_prefix(model, module) -> str:
    return next(f"{n}." for n, m in model.named_modules() if m is module)


@pytest.mark.parametrize("reinit_head", [False, True])
@pytest.mark.parametrize("trainable", ["head", "last_block", "all"])
def test_ngf_updates_exactly_the_parameters_it_names(trainable, reinit_head, model, clean):
    prefixes = {"head": ("head.",), "all": ("",),
                "last_block": ("head.", _module_prefix(model, model.last_block))}[trainable]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {"trainable": trainable, "reinit_head": reinit_head, "epochs": 1}
    (res,) = _run("ngf", model, clean, params)
    assert not res.diverged
    after = model.state_dict()
    named = {k for k in before if k.startswith(prefixes)}
    assert (len(named) < len(before)) == (trainable != "all")
    for k, v in before.items():
        if k in named:  # weights, biases and, in a tuned block, BN running statistics move
            assert not torch.equal(v, after[k]), k
        else:  # everything else bit-identical, BN statistics of frozen parts included
            assert torch.equal(v, after[k]), k


def test_ngf_kl_clipping_keeps_a_huge_lr_finite(model, clean):
    res = _run("ngf", model, clean, {"lr": 1e30, "epochs": 3})
    assert not any(r.diverged for r in res)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_is_frozen_typed_and_has_epochs(name):
    cfg = make_config(name)
    assert isinstance(cfg.epochs, int) and cfg.epochs >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]
    fields = defenses.config_fields(type(cfg))
    assert set(fields) == set(defenses.config_asdict(cfg))
    for f in dataclasses.fields(cfg):
        assert isinstance(getattr(cfg, f.name), (int, float, bool, str))


@pytest.mark.parametrize("name", NAMES)
def test_make_config_rejects_unknown_keys_and_wrong_types(name):
    with pytest.raises(ConfigError, match=r"unknown config key 'nope' \(value 1\)"):
        make_config(name, {"nope": 1})
    with pytest.raises(ConfigError, match=r"epochs='3' \(str\).*expected int"):
        make_config(name, {"epochs": "3"})
    with pytest.raises(ConfigError, match=r"epochs=2.5 .*expected int"):
        make_config(name, {"epochs": 2.5})
    with pytest.raises(ConfigError, match=r"batch_size=True .*expected int"):
        make_config(name, {"batch_size": True})
    with pytest.raises(ConfigError, match="epochs=0"):
        make_config(name, {"epochs": 0})


@pytest.mark.parametrize("name", NAMES)
def test_every_dataset_override_builds_a_valid_config(name):
    d = get_defense(name)
    assert "digits" in d.overrides
    for dataset, diff in d.overrides.items():
        cfg = make_config(name, dataset=dataset)
        assert all(getattr(cfg, k) == v for k, v in diff.items())


def test_params_override_dataset_overrides_and_int_is_accepted_for_float():
    cfg = make_config("ftsam", {"rho": 1, "epochs": 7}, dataset="gtsrb")
    assert cfg.rho == 1.0 and isinstance(cfg.rho, float) and cfg.epochs == 7
    assert cfg.label_smoothing == 0.0  # from the gtsrb diff
    assert make_config("ft", dataset="no-such-dataset") == make_config("ft")


def test_bool_and_choice_fields_are_validated():
    with pytest.raises(ConfigError, match=r"adaptive=1 \(int\).*expected bool"):
        make_config("ftsam", {"adaptive": 1})
    with pytest.raises(ConfigError, match="scheduler_granularity='hourly'.*'per_epoch'"):
        make_config("ftsam", {"scheduler_granularity": "hourly"})
    assert make_config("ftsam", {"scheduler_granularity": "per_iter_bb_quirk"}).adaptive is True
    with pytest.raises(ConfigError, match=r"project_head_norm=0.5 \(float\).*expected bool"):
        make_config("fst", {"project_head_norm": 0.5})


def test_sft_requires_ordered_learning_rates():
    with pytest.raises(ConfigError, match="lr_base < lr_max2 < lr_max1"):
        make_config("sft", {"lr_max2": 3.0})


def test_defense_modules_import_neither_ray_nor_optuna_nor_torchvision():
    code = (
        "import sys, defenses\n"
        "bad = [m for m in ('ray', 'optuna', 'torchvision') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
