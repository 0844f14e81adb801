"""The prepared attacks (LF, LC, TrojanNN, Input-aware, SSBA) and BPP: registration, state round
trips, poisoning rules, store keys, rebuilding the triggered test set in another process, and a
tiny PreAct-ResNet18 flow on CIFAR-10-format data. Auxiliary training is kept tiny via params."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from _formats import SMALL_ATTACK_PARAMS as SMALL

from zoo.attacks import ATTACKS, make_attack, restore_attack
from zoo.attacks.base import poison_count
from zoo.attacks.lc import corner_pattern
from zoo.data import load_splits
from zoo.models import build_model
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims, prepare_attacks, victim_description

NEW = ["lf", "lc", "bpp", "trojannn", "inputaware", "ssba"]
PREPARED = ["lf", "lc", "trojannn", "inputaware", "ssba"]
TINY = Recipe(epochs=1, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def splits():
    return load_splits("digits")


@pytest.fixture(scope="module")
def prepared(splits) -> dict:
    """Each attack prepared on digits against an untrained (seeded) clean CNN."""
    torch.manual_seed(0)
    clean = build_model("cnn", splits.info)
    out = {}
    for name in NEW:
        attack = make_attack(name, splits.info, seed=1, **SMALL[name])
        attack.prepare(splits, lambda: clean, torch.device("cpu"), False)
        out[name] = attack
    return out


def _sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name", NEW)
def test_registered_with_json_params(name: str, splits) -> None:
    assert name in ATTACKS
    attack = make_attack(name, splits.info)
    assert json.loads(json.dumps(attack.params())) == attack.params()
    assert attack.params()["name"] == name


@pytest.mark.parametrize("name", NEW)
def test_restore_from_params_and_state_reproduces_apply(name: str, prepared, splits) -> None:
    attack = prepared[name]
    x = splits.test.x[:64]
    restored = restore_attack(splits.info, json.loads(json.dumps(attack.params())), attack.state())
    assert restored.params() == attack.params()
    assert torch.equal(restored.apply(x), attack.apply(x))
    assert not torch.equal(attack.apply(x), x)


@pytest.mark.parametrize("name", ["lf", "lc", "trojannn", "ssba"])
def test_unprepared_attack_refuses_to_poison(name: str, splits) -> None:
    attack = make_attack(name, splits.info)
    with pytest.raises(ValueError, match="not built"):
        attack.training_set(splits.train, poison_rate=0.1, epoch=0, seed=0)


def test_preparation_changes_the_trigger(prepared, splits) -> None:
    for name in ["lf", "trojannn", "ssba", "inputaware"]:
        fresh = make_attack(name, splits.info, seed=1, **SMALL[name])
        x = splits.test.x[:32]
        assert not torch.equal(fresh.apply(x), prepared[name].apply(x)), name


@pytest.mark.parametrize("name", ["lf", "trojannn", "ssba"])
def test_dirty_label_poisoning(name: str, prepared, splits) -> None:
    attack, train = prepared[name], splits.train
    out = attack.training_set(train, poison_rate=0.1, epoch=0, seed=0)
    n = poison_count(len(train), 0.1)
    relabelled = out.y != train.y
    changed = (out.x != train.x).flatten(1).any(1)
    assert int((out.y == 0).sum() - (train.y == 0).sum()) == int(relabelled.sum()) > 0
    assert int(changed.sum()) <= n and torch.all(out.y[changed] == 0)
    assert torch.equal(out.x[changed], attack.apply(train.x[changed]))
    again = attack.training_set(train, poison_rate=0.1, epoch=5, seed=0)
    assert torch.equal(again.x, out.x) and not attack.dynamic


def test_lc_is_clean_label_with_hardened_images(prepared, splits) -> None:
    attack, train = prepared["lc"], splits.train
    out = attack.training_set(train, poison_rate=0.05, epoch=0, seed=0)
    assert torch.equal(out.y, train.y)
    changed = (out.x != train.x).flatten(1).any(1)
    assert changed.any() and torch.all(train.y[changed] == 0)
    # hardened: not just the corner trigger on the clean image; within eps (+1 for truncation) elsewhere
    assert not torch.equal(out.x[changed], attack.apply(train.x[changed]))
    inner = (corner_pattern(splits.info.size) == 0)
    diff = (out.x[changed].float() - train.x[changed].float()).abs()[:, :, inner]
    assert float(diff.max()) <= 8 + 1


def test_lc_robust_model_and_hardened_images_are_reproducible(splits) -> None:
    torch.manual_seed(0)
    clean = build_model("cnn", splits.info)
    dev = torch.device("cpu")

    def lc(**kw):
        return make_attack("lc", splits.info, seed=1, **{**SMALL["lc"], **kw})

    a, b = lc(), lc()
    torch.manual_seed(123)  # the global RNG plays no part
    a.prepare(splits, lambda: clean, dev, False)
    b.prepare(splits, lambda: clean, dev, False)
    assert torch.equal(a.adv_x, b.adv_x) and torch.equal(a.adv_idx, b.adv_idx) and torch.equal(a.stats, b.stats)
    assert len(a.adv_idx) == int((splits.train.y == 0).sum()) and float(a.stats[2]) == 1.0
    ra = lc().robust_model(splits, clean, dev)
    rb = lc().robust_model(splits, clean, dev)
    rc = lc(at_eps=16 / 255).robust_model(splits, clean, dev)
    sa, sb, sc = ra.state_dict(), rb.state_dict(), rc.state_dict()
    assert sa.keys() == clean.state_dict().keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.weight"], sc["head.weight"])
    assert not torch.equal(sa["head.weight"], clean.state_dict()["head.weight"])  # re-initialized, trained
    # other seed: another robust model; robust=False: hardened against the clean model itself
    other = make_attack("lc", splits.info, seed=2, **SMALL["lc"]).robust_model(splits, clean, dev)
    assert not torch.equal(other.state_dict()["head.weight"], sa["head.weight"])
    plain = lc(robust=False)
    plain.prepare(splits, lambda: clean, dev, False)
    assert float(plain.stats[2]) == 0.0 and not torch.equal(plain.adv_x, a.adv_x)


def test_lc_params_for_digits_and_bad_values(splits) -> None:
    a = make_attack("lc", splits.info, eps=0.3, at_eps=32 / 255, patch=4)
    assert a.params()["step"] == pytest.approx(0.3 * 1.5 / 8) and a.params()["at_eps"] == pytest.approx(32 / 255)
    assert make_attack("lc", splits.info).step == pytest.approx(1.5 / 255)
    assert int((a.corners != 0).sum()) == 4 * 16 and a.corners[4:-4].abs().sum() == 0  # 4 x 4 in each corner
    for bad in ({"at_steps": 0}, {"at_epochs": -1}, {"at_lr": 0}, {"at_eps": 2.0}, {"at_batch_size": 0}):
        with pytest.raises(ValueError, match="lc at_"):
            make_attack("lc", splits.info, **bad)


def test_lc_state_round_trips_through_the_store(tmp_path, splits) -> None:
    spec = ZooSpec("digits", zoo_dir=tmp_path, recipe=TINY, poison_rate=0.08,
                   attack_params={"lc": {**SMALL["lc"], "eps": 0.3, "at_eps": 32 / 255, "patch": 4}})
    (built,) = get_victims(spec, ["lc"], splits=splits, device="cpu", progress=False)
    (loaded,) = get_victims(spec, ["lc"], splits=splits, device="cpu", progress=False)
    assert built.built and not loaded.built
    a, b = built.attack_obj, loaded.attack_obj
    assert b.params() == a.params() and b.params()["patch"] == 4 and b.params()["robust"] is True
    for k in ("adv_x", "adv_idx", "stats"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert b.prepared and float(b.stats[2]) == 1.0 and len(b.adv_x) == int((splits.train.y == 0).sum())
    assert torch.equal(a.training_set(splits.train, poison_rate=0.08, epoch=0, seed=0).x,
                       b.training_set(splits.train, poison_rate=0.08, epoch=0, seed=0).x)
    assert torch.equal(loaded.bd_test.x, built.bd_test.x)
    assert b.describe() == a.describe()


def test_lc_corner_layout_at_32() -> None:
    a = corner_pattern(32)
    assert a[:3, :3].tolist() == [[1, -1, -1], [-1, 1, -1], [1, -1, 1]]
    assert a[-3:, -3:].tolist() == [[-1, -1, 1], [-1, 1, -1], [1, -1, 1]]
    assert int((a != 0).sum()) == 36


def test_bpp_is_dynamic_with_negative_samples(splits) -> None:
    attack, train = make_attack("bpp", splits.info), splits.train
    e0 = attack.training_set(train, poison_rate=0.1, epoch=0, seed=0)
    e1 = attack.training_set(train, poison_rate=0.1, epoch=1, seed=0)
    assert attack.dynamic and not torch.equal(e0.x, e1.x)
    assert torch.equal(e0.x, attack.training_set(train, poison_rate=0.1, epoch=0, seed=0).x)
    relabelled = e0.y != train.y
    changed = (e0.x != train.x).flatten(1).any(1)
    kept_changed = changed & (e0.y == train.y) & (train.y != 0)
    assert 0 < int(relabelled.sum()) <= poison_count(len(train), 0.1)
    assert int(kept_changed.sum()) > 0  # negative samples: changed images that keep their label
    q = attack.apply(train.x[:8]).float() / 255 * 7
    assert torch.allclose(q, q.round(), atol=0.05)  # 8 colour levels


def test_trojannn_trigger_is_in_the_mask_and_clips(prepared, splits) -> None:
    attack = prepared["trojannn"]
    outside = attack.mask == 0
    assert torch.all(attack.trigger[:, outside] == 0) and int(attack.trigger.max()) > 0
    x = torch.full((1, 1, 16, 16), 250, dtype=torch.uint8)
    y = attack.apply(x)
    assert torch.all(y[0, :, attack.mask > 0] == 255)  # clipped, no uint8 wraparound


def test_lf_pattern_is_bounded_and_smooth(prepared) -> None:
    p = prepared["lf"].pattern.float()
    assert 0 < float(p.max()) <= 51
    assert float((p[:, 1:] - p[:, :-1]).abs().max()) < 15  # low-pass: no pixel-level jumps


def test_inputaware_batch_labels(prepared, splits) -> None:
    attack = prepared["inputaware"]
    x = torch.randn(10, 1, 16, 16)
    y = torch.arange(10)
    inputs, labels, div = attack._batch(x, y, torch.randn(10, 1, 16, 16), 2, 2)
    assert torch.equal(labels[:2], torch.zeros(2, dtype=torch.long)) and torch.equal(labels[2:], y[2:])
    assert torch.equal(inputs[4:], x[4:]) and not torch.equal(inputs[:4], x[:4]) and float(div.detach()) > 0


def test_clean_model_and_params_enter_the_key(tmp_path, splits) -> None:
    spec = ZooSpec("digits", zoo_dir=tmp_path, recipe=TINY, attack_params={"lf": SMALL["lf"]})
    a = prepare_attacks(spec, ["lf"], splits)["lf"]
    assert isinstance(a.params()["clean_model"], str)
    other = ZooSpec("digits", zoo_dir=tmp_path, recipe=Recipe(2, 64, 0.05), attack_params={"lf": SMALL["lf"]})
    b = prepare_attacks(other, ["lf"], splits)["lf"]
    assert a.params()["clean_model"] != b.params()["clean_model"]
    c = prepare_attacks(ZooSpec("digits", recipe=TINY, attack_params={"lf": {"max_passes": 3}}), ["lf"], splits)["lf"]
    assert victim_description(spec, a)["attack_params"] != victim_description(spec, c)["attack_params"]


_CHILD = """
import hashlib, json, sys, torch
torch.set_num_threads(1)
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims
names, params = sys.argv[2].split(","), json.loads(sys.argv[3])
spec = ZooSpec("digits", zoo_dir=sys.argv[1], recipe=Recipe(epochs=1, batch_size=64, lr=0.05), attack_params=params)
vs = get_victims(spec, names, device="cpu", progress=False)
print(json.dumps({v.attack: [v.built, hashlib.sha256(v.bd_test.x.contiguous().numpy().tobytes()).hexdigest()]
                  for v in vs}))
"""


def test_triggered_test_set_is_rebuilt_identically_in_another_process(tmp_path, splits) -> None:
    spec = ZooSpec("digits", zoo_dir=tmp_path / "zoo", recipe=TINY, attack_params=SMALL)
    built = get_victims(spec, NEW, splits=splits, device="cpu", progress=False)
    assert all(v.built for v in built)
    assert all(len(v.bd_test) == int((splits.test.y != 0).sum()) for v in built)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "zoo"), ",".join(NEW), json.dumps(SMALL)],
                         capture_output=True, text=True, timeout=300, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    for v in built:
        assert child[v.attack] == [False, _sha(v.bd_test.x)], v.attack


def test_bpp_dithering_keeps_levels_and_local_brightness(splits) -> None:
    from zoo.attacks.bpp import floyd_steinberg, squeeze

    x = torch.full((2, 1, 16, 16), 100, dtype=torch.uint8)  # between the levels 72.9 and 109.3
    plain, dithered = squeeze(x, 8), floyd_steinberg(x, 8)
    levels = {round(k * 255 / 7, 3) for k in range(8)}
    assert {round(float(v), 3) for v in dithered.unique()} <= levels
    assert abs(float(plain.mean()) - 100) > 9 and abs(float(dithered.mean()) - 100) < 2
    attack = make_attack("bpp", splits.info, dithering=True)
    assert attack.params()["dithering"] is True
    again = restore_attack(splits.info, attack.params(), attack.state())
    assert torch.equal(again.apply(splits.test.x[:4]), attack.apply(splits.test.x[:4]))
    assert not torch.equal(attack.apply(splits.test.x[:4]), make_attack("bpp", splits.info).apply(splits.test.x[:4]))


def test_inputaware_victim_builds_are_identical_and_train_at_the_victims_precision(tmp_path, splits,
                                                                                    monkeypatch) -> None:
    import contextlib

    from zoo.attacks import inputaware

    seen = []

    @contextlib.contextmanager
    def recording_autocast(device, precision="auto"):
        seen.append(precision)
        yield

    monkeypatch.setattr(inputaware, "autocast", recording_autocast)
    params = {"inputaware": SMALL["inputaware"]}
    one, two = (get_victims(ZooSpec("digits", zoo_dir=tmp_path / d, recipe=TINY, attack_params=params),
                            ["inputaware"], splits=splits, device="cpu", progress=False)[0] for d in ("a", "b"))
    assert one.built and two.built and one.key == two.key
    assert one.state_dict.keys() == two.state_dict.keys()
    assert all(torch.equal(one.state_dict[k], two.state_dict[k]) for k in one.state_dict)
    assert torch.equal(one.bd_test.x, two.bd_test.x)
    # "auto" on a CPU trains victims in fp32 whatever the CPU's bf16 support (not bf16 on AMX)
    assert seen and set(seen) == {"fp32"}
