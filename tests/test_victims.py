"""Victim zoo: build, store hit, corrupt entry rebuilt, validation before training."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zoo.attacks import make_attack
from zoo.data import load_splits
from zoo.progress import Progress
from zoo.train import Recipe, default_recipe
from zoo.victims import ZooSpec, get_victims, victim_description

TINY = Recipe(epochs=1, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits")


def _spec(tmp_path, **kw) -> ZooSpec:
    return ZooSpec("digits", zoo_dir=tmp_path / "zoo", recipe=TINY, **kw)


def test_build_then_load_from_store(tmp_path, splits) -> None:
    spec = _spec(tmp_path)
    first = get_victims(spec, ["none", "badnets"], splits=splits, device="cpu", progress=False)
    assert [v.attack for v in first] == ["none", "badnets"] and all(v.built for v in first)
    bad = first[1]
    assert len(bad.bd_test) == int((splits.test.y != 0).sum())
    assert torch.all(bad.bd_test.x[:, :, -2:, -2:] == 255)
    assert set(bad.metrics) == {"val", "test"} and 0 <= bad.metrics["test"].acc <= 100
    second = get_victims(spec, ["badnets"], splits=splits, device="cpu", progress=False)
    assert not second[0].built and second[0].key == bad.key
    assert second[0].metrics == bad.metrics
    x = splits.test.x[:16].float()
    m1, m2 = bad.model("cpu").eval(), second[0].model("cpu").eval()
    assert torch.equal(m1(x), m2(x))
    assert torch.equal(second[0].bd_test.x, bad.bd_test.x)


def test_one_key_one_set_of_weights_whatever_the_callers_thread_count(tmp_path, splits) -> None:
    """A Ray task builds with --cpus-per-trial threads, ``zoo`` with the machine's: the stored
    weights must not depend on it (a CPU sum's order does), and the caller's count is kept."""
    spec = dataclasses.replace(_spec(tmp_path), recipe=Recipe(epochs=2, batch_size=64, lr=0.05))
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            store = dataclasses.replace(spec, zoo_dir=tmp_path / f"zoo{threads}")
            (v,) = get_victims(store, ["badnets"], splits=splits, device="cpu", progress=False)
            assert v.built and torch.get_num_threads() == threads
            states.append(v.state_dict)
    finally:
        torch.set_num_threads(before)
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_key_depends_on_recipe_rate_and_seed(tmp_path, splits) -> None:
    attack = make_attack("badnets", splits.info)
    base = victim_description(_spec(tmp_path), attack)
    assert victim_description(_spec(tmp_path, poison_rate=0.05), attack) != base
    assert victim_description(ZooSpec("digits", recipe=Recipe(2, 64, 0.05)), attack) != base
    assert victim_description(_spec(tmp_path, seed=1), make_attack("badnets", splits.info, seed=1)) != base
    none = make_attack("none", splits.info)
    assert victim_description(_spec(tmp_path), none) == victim_description(_spec(tmp_path, poison_rate=0.05), none)


def test_corrupt_entry_is_rebuilt(tmp_path, splits, capsys) -> None:
    spec = _spec(tmp_path)
    (victim,) = get_victims(spec, ["blended"], splits=splits, device="cpu", progress=False)
    model_file = tmp_path / "zoo" / victim.key / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    (again,) = get_victims(spec, ["blended"], splits=splits, device="cpu", progress=False)
    assert again.built and "corrupt" in capsys.readouterr().err
    (third,) = get_victims(spec, ["blended"], splits=splits, device="cpu", progress=False)
    assert not third.built


@pytest.mark.parametrize(
    ("attacks", "kw", "match"),
    [
        (["nope"], {}, "unknown attack 'nope'"),
        (["badnets"], {"poison_rate": 1.5}, "--poison-rate 1.5"),
        (["badnets", "sig"], {"poison_rate": 0.5},
         "sig: poison rate 0.5 needs 539 target-class images but class 0 has 107"),
        (["badnets"], {"arch": "vit"}, "unknown model 'vit'"),
    ],
)
def test_bad_input_fails_before_anything_is_built(tmp_path, splits, attacks, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_victims(_spec(tmp_path, **kw), attacks, splits=splits, device="cpu", progress=False)
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())


def test_dataset_defaults_give_sig_its_digits_rate_unless_the_user_sets_one() -> None:
    spec = ZooSpec("digits")
    assert spec.rate_for("badnets") == 0.1 and spec.rate_for("sig") == 0.08
    assert spec.attack_params_for("sig") == {"test_delta": 80.0}
    cifar = ZooSpec("cifar10", data_root=".")
    assert cifar.rate_for("sig") == 0.1 and cifar.attack_params_for("sig") == {}
    mine = ZooSpec("digits", poison_rate=0.05, attack_params={"sig": {"test_delta": 60.0}})
    assert mine.rate_for("sig") == 0.05 and mine.attack_params_for("sig") == {"test_delta": 60.0}


def test_default_recipes_are_documented_backdoorbench_values() -> None:
    r = default_recipe("cifar10", "preact-resnet18")
    assert (r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay) == (100, 128, 0.01, 0.9, 5e-4)
    g = default_recipe("gtsrb", "preact-resnet18")
    assert g.epochs == 50 and g.lr_at(49) > 0.005  # cosine over 100 epochs, cut at 50
    assert default_recipe("digits", "cnn").lr_at(0) == default_recipe("digits", "cnn").lr


def test_wanet_trains_longer_on_digits_and_its_key_says_so(splits) -> None:
    base, wanet = default_recipe("digits", "cnn"), default_recipe("digits", "cnn", "wanet")
    assert (base.epochs, wanet.epochs) == (50, 80)
    assert dataclasses.replace(wanet, epochs=base.epochs) == base  # only the length differs
    assert default_recipe("cifar10", "preact-resnet18", "wanet") == default_recipe("cifar10", "preact-resnet18")
    spec = ZooSpec("digits")
    desc = {a: victim_description(spec, make_attack(a, splits.info)) for a in ("badnets", "wanet")}
    assert desc["wanet"]["recipe"]["epochs"] == 80 and desc["badnets"]["recipe"]["epochs"] == 50
    mine = Recipe(epochs=3, batch_size=8, lr=0.1)  # a user's recipe applies to every attack
    assert ZooSpec("digits", recipe=mine).training_recipe("wanet") == mine


def test_inputaware_on_digits_trains_longer_with_fewer_cross_samples(splits) -> None:
    spec = ZooSpec("digits")
    assert spec.training_recipe("inputaware").epochs == 120
    assert spec.attack_params_for("inputaware") == {"cross_ratio": 0.5}
    attack = make_attack("inputaware", splits.info, **spec.attack_params_for("inputaware"))
    desc = victim_description(spec, attack)
    assert desc["recipe"]["epochs"] == 120 and desc["attack_params"]["cross_ratio"] == 0.5
    cifar = ZooSpec("cifar10", data_root=".")
    assert cifar.attack_params_for("inputaware") == {}
    assert cifar.training_recipe("inputaware") == cifar.training_recipe("badnets")


def test_progress_prints_a_line_every_few_epochs_when_not_a_tty(capsys) -> None:
    import sys

    bar = Progress("badnets victim (cnn on digits)", 10, True, stream=sys.stderr)
    for e in range(1, 11):
        bar.update(e, 0.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "training badnets victim (cnn on digits): epoch 10/10 loss 0.500"
    assert len(lines) == 5


def test_backdoorbench_spelling_of_an_arch_is_the_same_victim_and_recipe() -> None:
    from zoo.train import default_recipe

    ours, theirs = ZooSpec(arch="preact-resnet18"), ZooSpec(arch="preactresnet18")
    assert theirs.arch == "preact-resnet18" and theirs == ours
    assert default_recipe("cifar10", "preactresnet18") == default_recipe("cifar10", "preact-resnet18")
    assert default_recipe("digits", "preactresnet18") == default_recipe("digits", "preact-resnet18")
