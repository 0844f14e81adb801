"""The lead's core: digits splits, the device-resident loader, models and metrics."""

import numpy as np
import pytest
import torch

from zoo.data import DataError, DatasetInfo, Split, load_splits
from zoo.loader import DeviceLoader, augment, normalize
from zoo.metrics import Metrics, der, evaluate
from zoo.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_splits("digits", seed=0)


def test_digits_splits_have_documented_sizes_and_types(digits):
    assert digits.info.size == 16 and digits.info.channels == 1
    assert digits.train.x.dtype == torch.uint8 and digits.train.x.shape[1:] == (1, 16, 16)
    assert len(digits.train) == 1078 and len(digits.val) + len(digits.test) == 719


def test_clean_split_is_class_balanced_and_from_train(digits):
    counts = torch.bincount(digits.clean.y, minlength=10)
    assert (counts == counts[0]).all() and counts[0] == int(1078 * 0.1) // 10
    train_rows = {bytes(r) for r in digits.train.x.flatten(1).numpy()}
    assert all(bytes(r) in train_rows for r in digits.clean.x.flatten(1).numpy())


def test_val_and_test_are_disjoint_halves_of_the_test_set(digits):
    v = {bytes(r) for r in digits.val.x.flatten(1).numpy()}
    t = {bytes(r) for r in digits.test.x.flatten(1).numpy()}
    # digits has a handful of exact duplicate images; allow those, nothing more
    assert len(v & t) <= 3
    assert abs(len(digits.val) - len(digits.test)) <= 10


def test_splits_depend_on_seed_only(digits):
    again = load_splits("digits", seed=0)
    other = load_splits("digits", seed=1)
    assert torch.equal(again.clean.x, digits.clean.x)
    assert not torch.equal(other.clean.x, digits.clean.x)


def test_unbalanced_clean_split_has_requested_size():
    s = load_splits("digits", clean_ratio=0.2, balanced=False)
    assert len(s.clean) == round(1078 * 0.2)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_bad_clean_ratio_is_refused(ratio):
    with pytest.raises(DataError, match="clean ratio"):
        load_splits("digits", clean_ratio=ratio)


def test_unknown_dataset_is_refused():
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_splits("nope")


INFO = DatasetInfo("toy", 3, 8, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=True, pad=2)


def test_augment_crops_are_shifted_windows_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 255, (16, 3, 8, 8), dtype=torch.uint8)
    info = DatasetInfo("toy", 3, 8, 4, (0.5,) * 3, (0.25,) * 3, hflip=False, pad=2)
    out = augment(x, info, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(5) for b in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not all(torch.equal(out[i], x[i]) for i in range(16))


def test_flip_only_where_the_dataset_allows_it():
    x = torch.arange(8, dtype=torch.uint8).repeat(64, 3, 8, 1)  # columns 0..7
    noflip = DatasetInfo("toy", 3, 8, 4, (0.5,) * 3, (0.25,) * 3, hflip=False, pad=0)
    flip = DatasetInfo("toy", 3, 8, 4, (0.5,) * 3, (0.25,) * 3, hflip=True, pad=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, noflip, g), x)
    out = augment(x, flip, g)
    flipped = (out[:, 0, 0, 0] == 7).sum().item()
    assert 10 < flipped < 54 and torch.equal(out[out[:, 0, 0, 0] == 7], x.flip(3)[: flipped])


def test_normalize_maps_uint8_to_standardized_floats():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, INFO), torch.full((1, 3, 2, 2), 2.0))


def test_loader_batches_have_fixed_shape_and_are_seeded():
    split = Split(torch.randint(0, 255, (70, 3, 8, 8), dtype=torch.uint8), torch.arange(70) % 4)
    loader = DeviceLoader(split, INFO, batch_size=32, device=CPU, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert all(x.shape == (32, 3, 8, 8) and x.dtype == torch.float32 for x, _ in batches)
    again = list(DeviceLoader(split, INFO, batch_size=32, device=CPU, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_loader_keeps_the_last_partial_batch_without_drop_last():
    split = Split(torch.zeros(70, 3, 8, 8, dtype=torch.uint8), torch.arange(70))
    loader = DeviceLoader(split, INFO, batch_size=32, device=CPU, seed=3, drop_last=False)
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # ceil(70 / 32)
    assert [len(y) for _, y in batches] == [32, 32, 6]
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(ys.sort().values, torch.arange(70))  # every image once, shuffled
    assert not torch.equal(ys, torch.arange(70))


def test_loader_drops_the_last_partial_batch_by_default():
    split = Split(torch.zeros(70, 3, 8, 8, dtype=torch.uint8), torch.arange(70))
    default = DeviceLoader(split, INFO, batch_size=32, device=CPU)  # victim training
    assert default.drop_last and len(default) == 2
    assert [len(y) for _, y in default] == [32, 32]


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_smaller_than_a_batch_yields_the_whole_split(drop_last):
    split = Split(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.zeros(5, dtype=torch.long))
    (x, _), = list(DeviceLoader(split, INFO, batch_size=32, device=CPU, drop_last=drop_last))
    assert x.shape[0] == 5


def test_eval_loader_keeps_order_and_every_image():
    split = Split(torch.zeros(70, 3, 8, 8, dtype=torch.uint8), torch.arange(70))
    ys = torch.cat([y for _, y in DeviceLoader(split, INFO, batch_size=32, device=CPU, train=False)])
    assert torch.equal(ys, torch.arange(70))


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", INFO)


class _Fixed(torch.nn.Module):
    """Predicts class = first pixel value // 64, so the test knows every prediction."""

    def forward(self, x):
        v = ((x[:, 0, 0, 0] * 0.25 + 0.5) * 255).round().long() // 64
        return torch.nn.functional.one_hot(v, 4).float()


def test_evaluate_counts_acc_asr_ra_in_percent():
    clean = Split(torch.tensor([0, 64, 128, 192], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous(),
                  torch.tensor([0, 1, 2, 0]))
    # triggered non-target images: predictions 0, 0, 2, 3 against true labels 1, 2, 2, 3
    trig = Split(torch.tensor([0, 0, 128, 192], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous(),
                 torch.tensor([1, 2, 2, 3]))
    m = evaluate(_Fixed(), clean, trig, 0, INFO, device=CPU, batch_size=3)
    assert m == Metrics(acc=75.0, asr=50.0, ra=50.0)


def test_der_matches_backdoorbench_formula():
    before = Metrics(acc=90.0, asr=100.0, ra=0.0)
    assert der(before, Metrics(90.0, 100.0, 0.0)) == 50.0
    assert der(before, Metrics(88.0, 0.0, 90.0)) == pytest.approx((100 - 2 + 100) / 2)
    assert der(before, Metrics(95.0, 100.0, 0.0)) == 50.0  # accuracy gains are not rewarded
    assert np.isclose(der(before, Metrics(0.0, 0.0, 0.0)), (100 - 90 + 100) / 2)
