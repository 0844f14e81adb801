"""Attack triggers, poisoning rules and state round trips, on small synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.attacks import ATTACKS, make_attack, restore_attack
from zoo.attacks.badnets import default_patch
from zoo.data import DatasetInfo, Split

GREY = DatasetInfo("toy", 1, 16, 10, (0.5,), (0.5,), hflip=False, pad=2)
RGB = DatasetInfo("toy3", 3, 32, 10, (0.5,) * 3, (0.5,) * 3, hflip=True, pad=4)


def _split(info: DatasetInfo, n: int = 200, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % info.num_classes
    return Split(x, y)


def test_make_attack_rejects_unknown_name_listing_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown attack 'nope'.*badnets.*sig"):
        make_attack("nope", GREY)


def test_make_attack_rejects_unknown_parameter() -> None:
    with pytest.raises(ValueError, match="badnets"):
        make_attack("badnets", GREY, radius=3)


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("info", [GREY, RGB], ids=["grey16", "rgb32"])
def test_restore_reproduces_apply_bit_for_bit(name: str, info: DatasetInfo) -> None:
    attack = make_attack(name, info, seed=3, target=2)
    x = _split(info, 40).x
    restored = restore_attack(info, attack.params(), attack.state())
    assert restored.params() == attack.params()
    assert torch.equal(restored.apply(x), attack.apply(x))
    assert attack.params()["seed"] == 3 and attack.params()["target"] == 2


@pytest.mark.parametrize("name", ["blended", "wanet"])
def test_seed_changes_the_trigger(name: str) -> None:
    x = _split(GREY, 20).x
    a, b = make_attack(name, GREY, seed=0), make_attack(name, GREY, seed=1)
    assert not torch.equal(a.apply(x), b.apply(x))
    assert a.params() != b.params()


def test_badnets_patch_is_white_bottom_right_and_replaces_pixels() -> None:
    x = _split(RGB, 10).x
    out = make_attack("badnets", RGB).apply(x)
    assert torch.all(out[:, :, -3:, -3:] == 255)
    assert torch.equal(out[:, :, :-3, :], x[:, :, :-3, :])
    assert torch.equal(out[:, :, :, :-3], x[:, :, :, :-3])


def test_badnets_patch_scales_with_image_size() -> None:
    assert [default_patch(s) for s in (16, 28, 32, 64)] == [2, 3, 3, 6]
    out = make_attack("badnets", GREY).apply(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    assert int((out > 0).sum()) == 4 and torch.all(out[0, 0, -2:, -2:] == 255)


def test_blended_formula_and_truncation() -> None:
    attack = make_attack("blended", GREY, seed=5)
    x = _split(GREY, 10).x
    p = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (1, 16, 16), dtype=np.uint8))
    assert torch.equal(attack.pattern, p)
    expected = torch.floor(0.8 * x.float() + 0.2 * p.float())
    assert (attack.apply(x).float() - expected).abs().max() <= 1  # float32 ties only
    assert torch.equal(attack.apply(x), (0.8 * x.float() + 0.2 * p.float()).to(torch.uint8))


def test_blended_image_pattern_survives_without_the_file(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "kitty.png"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(path)
    attack = make_attack("blended", RGB, image=path)
    assert attack.params()["pattern"] == "image"
    assert attack.pattern[:, 5, 5].tolist() == [200, 100, 50]
    path.unlink()
    restored = restore_attack(RGB, attack.params(), attack.state())
    x = _split(RGB, 5).x
    assert torch.equal(restored.apply(x), attack.apply(x))


def test_blended_restore_rejects_a_pattern_that_does_not_match_its_hash() -> None:
    attack = make_attack("blended", GREY)
    state = {"pattern": torch.zeros_like(attack.pattern)}
    with pytest.raises(ValueError, match="pattern hash"):
        restore_attack(GREY, attack.params(), state)


def test_sig_formula() -> None:
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    out = make_attack("sig", RGB).apply(x)
    for j in range(32):
        v = 100 + 40 * math.sin(2 * math.pi * j * 6 / 32)
        assert torch.all(out[:, :, :, j] == int(v)), j  # same in every row and channel, truncated
    assert make_attack("sig", RGB).apply(torch.full_like(x, 250)).max() == 255  # clipped


def test_sig_test_delta_strengthens_only_the_test_trigger() -> None:
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    attack = make_attack("sig", RGB, test_delta=80)
    assert torch.equal(attack.apply(x), make_attack("sig", RGB).apply(x))  # training signal: delta 40
    test = attack.triggered(Split(x, torch.tensor([1, 2]))).x
    j = 1
    assert int(test[0, 0, 0, j]) == int(100 + 80 * math.sin(2 * math.pi * j * 6 / 32))
    again = restore_attack(RGB, attack.params(), attack.state())
    assert again.test_delta == 80 and torch.equal(again.triggered(Split(x, torch.tensor([1, 2]))).x, test)
    assert make_attack("sig", RGB).test_delta == 40  # BackdoorBench: the same signal at test


def test_wanet_with_zero_strength_is_nearly_identity() -> None:
    x = _split(GREY, 20).x
    out = make_attack("wanet", GREY, s=0.0).apply(x)
    diff = (out.int() - x.int()).abs()
    # Identity up to float error at pixel centres, which truncation to uint8 turns into -1.
    assert diff.max() <= 1 and diff.float().mean() < 0.5


def test_wanet_warp_changes_images_but_keeps_them_close() -> None:
    x = _split(GREY, 20).x
    out = make_attack("wanet", GREY).apply(x)
    assert not torch.equal(out, x)
    assert out.float().mean().sub(x.float().mean()).abs() < 10


def _poisoned_rows(before: Split, after: Split) -> torch.Tensor:
    return (before.x != after.x).flatten(1).any(1)


def test_wanet_draws_a_fresh_subset_every_epoch_reproducibly() -> None:
    train = _split(GREY, 200)
    attack = make_attack("wanet", GREY)
    e0 = attack.training_set(train, poison_rate=0.1, epoch=0, seed=0)
    e0b = attack.training_set(train, poison_rate=0.1, epoch=0, seed=0)
    e1 = attack.training_set(train, poison_rate=0.1, epoch=1, seed=0)
    assert torch.equal(e0.x, e0b.x) and torch.equal(e0.y, e0b.y)
    relabelled0, relabelled1 = e0.y != train.y, e1.y != train.y
    assert not torch.equal(relabelled0, relabelled1)
    assert torch.all(e0.y[relabelled0] == 0)
    # 20 backdoor + 40 noise-warped images change; noise-warped ones keep their labels.
    changed = _poisoned_rows(train, e0)
    assert 50 <= int(changed.sum()) <= 60
    assert int((changed & (e0.y == train.y)).sum()) >= 40


def test_wanet_rejects_rates_that_leave_no_room_for_noise_images() -> None:
    with pytest.raises(ValueError, match="poison-rate <= 0.333"):
        make_attack("wanet", GREY).check(_split(GREY), 0.4)


@pytest.mark.parametrize("name", ["badnets", "blended"])
def test_dirty_label_poisons_round_rate_n_from_the_whole_set(name: str) -> None:
    train = _split(GREY, 200)
    out = make_attack(name, GREY).training_set(train, poison_rate=0.15, epoch=0, seed=1)
    changed = _poisoned_rows(train, out)
    assert int(changed.sum()) == 30
    assert torch.all(out.y[changed] == 0)
    assert torch.equal(out.y[~changed], train.y[~changed])
    assert len(set(train.y[changed].tolist())) > 3  # drawn across classes
    again = make_attack(name, GREY).training_set(train, poison_rate=0.15, epoch=5, seed=1)
    assert torch.equal(again.x, out.x)  # static: the same set every epoch


def test_clean_label_poisons_only_target_class_and_keeps_labels() -> None:
    train = _split(GREY, 400)  # 40 images per class
    attack = make_attack("sig", GREY, target=3)
    out = attack.training_set(train, poison_rate=0.05, epoch=0, seed=0)
    changed = _poisoned_rows(train, out)
    assert int(changed.sum()) == 20
    assert torch.all(train.y[changed] == 3)
    assert torch.equal(out.y, train.y)


def test_clean_label_rate_too_large_for_target_class_is_a_clear_error() -> None:
    train = _split(GREY, 400)
    with pytest.raises(ValueError,
                       match=r"needs 200 target-class images but class 0 has 40: expected --poison-rate <= 0.1"):
        make_attack("sig", GREY).check(train, 0.5)


def test_clean_label_rate_one_image_over_the_class_takes_the_whole_class() -> None:
    y = torch.tensor([0] * 107 + [1] * 971)  # digits: round(0.1 * 1078) = 108 > 107 in class 0
    train = Split(torch.zeros(1078, 1, 16, 16, dtype=torch.uint8), y)
    out = make_attack("sig", GREY).training_set(train, poison_rate=0.1, epoch=0, seed=0)
    assert int(_poisoned_rows(train, out).sum()) == 107


def test_rate_rounding_to_zero_is_an_error() -> None:
    with pytest.raises(ValueError, match="poisons 0 of 200"):
        make_attack("badnets", GREY).check(_split(GREY), 0.001)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_triggered_excludes_target_class_and_keeps_true_labels(name: str) -> None:
    split = _split(GREY, 100)
    attack = make_attack(name, GREY, target=4)
    bd = attack.triggered(split)
    keep = split.y != 4
    assert len(bd) == int(keep.sum())
    assert torch.equal(bd.y, split.y[keep])
    assert torch.equal(bd.x, attack.apply(split.x[keep]))


def test_none_attack_leaves_training_set_and_images_alone() -> None:
    train = _split(GREY)
    attack = make_attack("none", GREY)
    assert attack.training_set(train, poison_rate=0.1, epoch=0, seed=0) is train
    assert torch.equal(attack.apply(train.x), train.x)


def test_apply_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="expected uint8 N x 1 x 16 x 16"):
        make_attack("badnets", GREY).apply(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
