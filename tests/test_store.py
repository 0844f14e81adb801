"""The victim store: round trip, atomic writes, corruption detection, no unpickling, locking."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from zoo import store as store_mod
from zoo.store import FORMAT_VERSION, Entry, Store, StoreError, key


def _groups(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g)
    return {
        "model": {"fc.weight": w.t(), "fc.bias": torch.arange(4, dtype=torch.float32)},
        "attack": {"mask": torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8)},
    }


def _assert_same(
    a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
) -> None:
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert a[group][name].dtype == b[group][name].dtype
            assert torch.equal(a[group][name], b[group][name])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "zoo")


def test_round_trip_keeps_tensors_meta_and_layout(store: Store) -> None:
    k = key({"dataset": "digits", "attack": "badnets"})
    meta = {"metrics": {"acc": 97.5, "asr": 100.0}, "params": {"size": 3}, "seconds": 1.25}
    put = store.put(k, _groups(), meta)
    got = store.get(k)
    assert isinstance(got, Entry) and got.key == k
    assert got.meta == meta == put.meta
    _assert_same(got.groups, _groups())
    _assert_same(put.groups, _groups())
    assert sorted(os.listdir(store.root / k)) == [
        "attack.safetensors",
        "meta.json",
        "model.safetensors",
    ]
    doc = json.loads((store.root / k / "meta.json").read_text())
    assert doc["meta"] == meta and set(doc["checksums"]) == {
        "attack.safetensors",
        "model.safetensors",
    }
    assert store.entries() == [k]


def test_put_replaces_an_existing_entry(store: Store) -> None:
    store.put("k1", _groups(0), {"v": 1})
    store.put("k1", _groups(1), {"v": 2})
    got = store.get("k1")
    assert got is not None and got.meta == {"v": 2}
    _assert_same(got.groups, _groups(1))
    assert os.listdir(store.root) == ["k1"]  # no temp or old folders left


def test_get_missing_returns_none_and_remove(store: Store) -> None:
    assert store.get("absent") is None
    store.put("k1", _groups(), {})
    store.remove("k1")
    store.remove("k1")  # idempotent
    assert store.get("k1") is None and store.entries() == []


def test_key_is_canonical_versioned_and_validated() -> None:
    a = key({"b": [1, 2], "a": {"y": 1.5, "x": "s"}})
    assert a == key({"a": {"x": "s", "y": 1.5}, "b": [1, 2]})
    assert a != key({"b": [1, 2], "a": {"y": 1.5, "x": "t"}})
    assert len(a) == 24 and set(a) <= set("0123456789abcdef")
    assert Store.key is key
    with pytest.raises(StoreError, match="not plain JSON"):
        key({"path": Path("/x")})


def test_key_depends_on_format_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = key({"a": 1})
    monkeypatch.setattr(store_mod, "FORMAT_VERSION", FORMAT_VERSION + 1)
    assert store_mod.key({"a": 1}) != before


def test_default_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Store.default_root() == tmp_path / "backdoor-ft-tuner" / "zoo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert Store.default_root() == Path.home() / ".cache" / "backdoor-ft-tuner" / "zoo"


@pytest.mark.parametrize("bad", ["../evil", "a/b", ".hidden", "", "x" * 200])
def test_unsafe_keys_and_group_names_are_refused(store: Store, bad: str) -> None:
    with pytest.raises(StoreError, match="not a safe name"):
        store.get(bad)
    with pytest.raises(StoreError, match="not a safe name"):
        store.put("ok", {bad: {}}, {})
    assert not store.root.exists() or store.entries() == []


def test_interrupted_put_leaves_nothing_visible(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        store.put("k1", _groups(), {"v": 1})
    monkeypatch.undo()
    assert store.get("k1") is None
    assert os.listdir(store.root) == []  # the temp folder was removed too


def test_interrupted_replace_keeps_the_old_entry(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("k1", _groups(0), {"v": 1})
    real = os.replace

    def crash_on_install(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".tmp-"):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_install)
    with pytest.raises(OSError):
        store.put("k1", _groups(1), {"v": 2})
    monkeypatch.undo()
    got = store.get("k1")
    assert got is not None and got.meta == {"v": 1}
    assert os.listdir(store.root) == ["k1"]


def _corrupt_then_get(store: Store, capsys: pytest.CaptureFixture[str], damage) -> str:  # type: ignore[no-untyped-def]
    store.put("k1", _groups(), {"acc": 90.0})
    damage(store.root / "k1")
    assert store.get("k1") is None
    assert not (store.root / "k1").exists()
    assert os.listdir(store.root) == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo store: entry k1 is corrupt (")
    assert err.rstrip().endswith("; rebuilding")
    return err


def test_truncated_group_file_is_detected(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    def truncate(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-7])

    assert "model.safetensors checksum mismatch" in _corrupt_then_get(store, capsys, truncate)


def test_flipped_byte_is_detected(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    def flip(folder: Path) -> None:
        path = folder / "attack.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))

    assert "attack.safetensors checksum mismatch" in _corrupt_then_get(store, capsys, flip)


def test_edited_meta_is_detected(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(folder: Path) -> None:
        path = folder / "meta.json"
        path.write_text(path.read_text().replace("90.0", "99.0"))

    assert "meta.json digest mismatch" in _corrupt_then_get(store, capsys, edit)


def test_unparsable_or_missing_meta_is_detected(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _corrupt_then_get(store, capsys, lambda f: (f / "meta.json").write_text('{"key": '))
    assert "does not parse" in err
    err = _corrupt_then_get(store, capsys, lambda f: (f / "meta.json").unlink())
    assert "meta.json is missing" in err


def test_missing_group_file_is_detected(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    err = _corrupt_then_get(store, capsys, lambda f: (f / "model.safetensors").unlink())
    assert "model.safetensors is missing" in err


class _Boom:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_pickled_group_file_is_refused_even_with_a_valid_checksum(
    store: Store, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    store.put("k1", _groups(), {"acc": 1.0})
    folder = store.root / "k1"
    torch.save({"w": _Boom(marker)}, folder / "model.safetensors")
    # Forge a meta.json whose checksums and digest match the pickle, so only parsing stands guard.
    doc = json.loads((folder / "meta.json").read_text())
    checksums = {
        **doc["checksums"],
        "model.safetensors": store_mod._sha256((folder / "model.safetensors").read_bytes()),
    }
    forged = store_mod._meta_document("k1", doc["meta"], checksums)
    (folder / "meta.json").write_text(json.dumps(forged))
    assert store.get("k1") is None
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "model.safetensors is not a safetensors file" in err
    assert not folder.exists()


def test_lock_is_exclusive_and_has_a_long_timeout(store: Store) -> None:
    lock = store.lock("k1")
    assert lock.timeout >= 3600
    assert Path(lock.lock_file) == store.root / "k1.lock"
    with lock:
        other = store.lock("k1", timeout=0.05)
        import filelock

        with pytest.raises(filelock.Timeout):
            other.acquire()
    assert store.entries() == []  # the lock file is not an entry


def _build_once(root: str, k: str, counter: str) -> None:
    """Run in a spawned process: build the entry unless another process already did."""
    store = Store(root)
    with store.lock(k):
        if store.get(k) is None:
            with open(counter, "a") as f:
                f.write("built\n")
            time.sleep(0.3)  # widen the window in which a second builder would slip in
            store.put(k, _groups(), {"by": os.getpid()})


@pytest.mark.timeout(120)
def test_two_processes_build_an_entry_exactly_once(tmp_path: Path) -> None:
    root, counter = tmp_path / "zoo", tmp_path / "count.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_build_once, args=(str(root), "k1", str(counter))) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(100)
        assert p.exitcode == 0
    assert counter.read_text().splitlines() == ["built"]
    got = Store(root).get("k1")
    assert got is not None
    _assert_same(got.groups, _groups())
