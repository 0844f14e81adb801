"""Every attack end to end on CIFAR-10-format files with PreAct-ResNet18 (issue 5): the victim
builds (auxiliary models included), its triggered test set has CIFAR's shape, and a second call
loads it from the store with the same triggered images. Flow, not accuracy: tiny batch files,
one epoch, auxiliary training cut to a few steps."""

from __future__ import annotations

import pytest
import torch
from _formats import SMALL_ATTACK_PARAMS, write_cifar

from zoo.attacks import ATTACKS
from zoo.data import load_splits
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "data", n=20, cycle_labels=True)
    spec = ZooSpec("cifar10", arch="preact-resnet18", data_root=root / "data", zoo_dir=root / "zoo",
                   recipe=Recipe(epochs=1, batch_size=32, lr=0.01), attack_params=SMALL_ATTACK_PARAMS)
    return spec, load_splits("cifar10", data_root=root / "data", seed=0, clean_ratio=0.5)


@pytest.mark.parametrize("name", [a for a in ATTACKS if a != "none"])
def test_attack_builds_and_reloads_on_cifar_format_with_preact(cifar, name: str) -> None:
    spec, splits = cifar
    (victim,) = get_victims(spec, [name], splits=splits, device="cpu", progress=False)
    assert victim.built and victim.arch == "preact-resnet18" and victim.dataset == "cifar10"
    bd = victim.bd_test
    assert bd.x.dtype == torch.uint8 and tuple(bd.x.shape[1:]) == (3, 32, 32)
    assert len(bd) == int((splits.test.y != victim.target).sum())  # every non-target test image
    assert not torch.equal(bd.x, splits.test.x[splits.test.y != victim.target])  # triggered
    for split in ("val", "test"):
        m = victim.metrics[split]
        assert all(0.0 <= v <= 100.0 for v in (m.acc, m.asr, m.ra))
    model = victim.model("cpu")
    assert model(splits.test.x[:2].float()).shape == (2, 10)
    if victim.attack_obj.needs_clean_model:  # built from the clean model kept in the same store
        assert victim.attack_obj.params()["clean_model"] in {p.name for p in spec.zoo_dir.iterdir()}
    (again,) = get_victims(spec, [name], splits=splits, device="cpu", progress=False)
    assert not again.built and torch.equal(again.bd_test.x, bd.x)
