"""Hostile and careless input (issue 19): races on a run folder, late refusals, bounds, forged
zoo entries, symbolic links where a lock file should be. No Ray here: each case is refused (one
line, exit 2, nothing written) or repaired before a search would start.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tuner import cli, cmd_search
from tuner import search as search_mod
from tuner._io import LOCK_NAME, RunLock
from tuner.cli import USER_ERRORS
from tuner.errors import UsageError
from tuner.spec import from_args
from zoo.config import ConfigError
from zoo.store import Store
from zoo.train import Recipe
from zoo.victims import ZooSpec, get_victims


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a refused flag value, as the CLI reports it
        raise UsageError(message)


def _build(tmp_path: Path, *argv: str):
    p = _Parser()
    cmd_search.add_arguments(p)
    return from_args(p.parse_args(["--output", str(tmp_path / "runs"), "--device", "cpu",
                                   "--defense", "ngf", *argv]))


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``python -m tuner ARGV`` in this process: exit 2, one line, nothing written."""
    out, zoo = tmp_path / "runs", tmp_path / "zoo"
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        search = argv[0] not in cli.COMMANDS or argv[0] == "search"
        rc = cli.main([*argv, *(["--output", str(out)] if search else []), "--device", "cpu",
                       *([] if "--zoo-dir" in argv else ["--zoo-dir", str(zoo)])])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    return err


# -- §2 two searches on one run folder --------------------------------------------------------
def test_second_search_on_a_locked_run_folder_is_refused_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def past_the_lock(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second search went on past the run folder's lock")

    monkeypatch.setattr(search_mod, "prepare_attacks", past_the_lock)
    run = tmp_path / "runs" / "same"
    with RunLock(run):  # the first search holds its run folder (as run_search does)
        start = time.monotonic()
        rc = cli.main(["--defense", "ngf", "--output", str(tmp_path / "runs"), "--name", "same",
                       "--device", "cpu", "--zoo-dir", str(tmp_path / "zoo")])
        err = capsys.readouterr().err
        assert time.monotonic() - start < 10
    assert rc == 2 and err.count("\n") == 1, err
    assert f"error: run folder {run} is in use by another search (pid {os.getpid()})" in err


def test_run_lock_leaves_no_folder_when_nothing_was_written(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    with RunLock(run):
        assert (run / LOCK_NAME).is_file()
    assert not run.exists() and not run.parent.exists()  # a refusal before spec.json: the
    # same command can run again, and the --output folder it made is gone too
    with RunLock(run):
        (run / "spec.json").write_text("{}")
    assert sorted(p.name for p in run.iterdir()) == ["spec.json"]  # the lock leaves with it
    with RunLock(run):  # released: a --resume takes it again
        pass


def test_symlinked_run_lock_is_refused_not_followed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (run / LOCK_NAME).symlink_to(victim)
    with pytest.raises(UsageError, match="is a symbolic link"):
        with RunLock(run):
            pass
    assert victim.read_text() == "keep me"


def test_symlinked_store_lock_is_replaced_not_followed(tmp_path: Path) -> None:
    store = Store(tmp_path / "zoo")
    store.root.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (store.root / "abc.lock").symlink_to(victim)
    (store.root / "dangling.lock").symlink_to(tmp_path / "nowhere" / "x")
    for k in ("abc", "dangling"):
        with store.lock(k):
            pass
    assert victim.read_text() == "keep me" and not (tmp_path / "nowhere").exists()


# -- §2 refusals that came late, §4 bounds: before anything is written -------------------------
@pytest.mark.parametrize(("argv", "needle"), [
    (["--cpus-per-trial", "100"], f"--cpus-per-trial 100: this machine has {os.cpu_count()} "
                                  "CPU cores"),
    (["--cpus-per-trial", "1e-9"], "--cpus-per-trial 1e-09: expected a finite number of CPU "
                                   "cores >= 0.01"),
    (["--num-samples", "1000000000"], "--num-samples 1000000000: expected a whole number in "
                                      "1..10000"),
    (["--max-epochs", "1000000"], "--max-epochs 1000000: expected a whole number in 1..1000"),
    (["--final-seeds", "100000"], "--final-seeds 100000: expected a whole number in 1..100"),
    (["--seed", "18446744073709551616"], "--seed 18446744073709551616: expected a whole number "
                                         "in 0..2147483647"),
    (["--name", ""], "--name '': expected 1 to 100"),
    (["--name", "a" * 300], "expected 1 to 100 letters"),
])
def test_bad_values_are_refused_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    err = _refused(tmp_path, capsys, "--defense", "ngf", *argv)
    assert needle in err


def test_name_that_is_a_dangling_link_or_a_file_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "dangling").symlink_to(tmp_path / "nowhere")
    (runs / "file").write_text("x")
    err = _refused(tmp_path, capsys, "--defense", "ngf", "--name", "dangling")
    assert f"--name dangling: {runs / 'dangling'} is a symbolic link" in err
    err = _refused(tmp_path, capsys, "--defense", "ngf", "--name", "file")
    assert f"--name file: {runs / 'file'} exists and is not a folder" in err
    assert not (tmp_path / "nowhere").exists()


def test_zoo_dir_that_is_a_file_is_refused_by_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "zoofile").write_text("x")
    for command in ([], ["evaluate"], ["zoo"]):
        argv = [*command, *(["--defense", "ngf"] if command != ["zoo"] else [])]
        err = _refused(tmp_path, capsys, *argv, "--zoo-dir", str(tmp_path / "zoofile" / "z"))
        assert f"'{tmp_path / 'zoofile'}' is not a folder: expected a folder for the victim " \
               "store" in err


READ_ONLY = Path("/sys/fs")  # not writable even for root (os.access says it is)


def _writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not READ_ONLY.is_dir() or _writable(READ_ONLY),
                    reason="no read-only folder to try")
def test_read_only_zoo_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(tmp_path, capsys, "--defense", "ngf", "--zoo-dir", str(READ_ONLY / "zoo"))
    assert f"--zoo-dir '{READ_ONLY / 'zoo'}': cannot write in '{READ_ONLY}'" in err


@pytest.mark.parametrize(("params", "needle"), [
    ({"batch_size": 1_000_000_000}, "batch_size=1000000000: expected an integer in 1..8192"),
    ({"epochs": 1_000_000_000}, "epochs=1000000000: expected an integer in 1..1000"),
    ({"steps_per_epoch": 10**9}, "steps_per_epoch=1000000000: expected at most 100000"),
])
def test_config_sizes_are_bounded(params: dict[str, int], needle: str) -> None:
    from defenses import make_config

    with pytest.raises(ConfigError) as info:
        make_config("ngf", params, dataset="digits")
    assert needle in str(info.value)


def test_evaluate_with_a_huge_batch_is_refused_before_victims(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(tmp_path, capsys, "evaluate", "--defense", "ngf", "--params",
                   '{"batch_size": 1000000000}')
    assert "batch_size=1000000000" in err


def test_resources_and_names_are_checked_by_from_args(tmp_path: Path) -> None:
    with pytest.raises(USER_ERRORS, match="--cpus-per-trial"):
        _build(tmp_path, "--cpus-per-trial", str((os.cpu_count() or 1) + 1))


# -- §1 forged zoo entries -----------------------------------------------------------------------
@pytest.fixture
def tiny_victim(tmp_path: Path):
    spec = ZooSpec("digits", zoo_dir=tmp_path / "zoo", recipe=Recipe(epochs=1, batch_size=64,
                                                                        lr=0.05))
    (v,) = get_victims(spec, ["badnets"], device="cpu", progress=False)
    store = Store(tmp_path / "zoo")
    return spec, store, store.get(v.key)


def _forge(store: Store, entry, *, meta=None, groups=None) -> None:
    """Rewrite an entry as someone with write access would: checksums and digest recomputed."""
    store.put(entry.key, groups if groups is not None else entry.groups,
              meta if meta is not None else entry.meta)


FORGERIES = {
    "target edited": lambda e: {"meta": {**e.meta, "attack_params": {
        **e.meta["attack_params"], "target": 1}}},
    "metrics forged": lambda e: {"meta": {**e.meta, "metrics": {
        "val": {"acc": 99.0, "asr": 1e300, "ra": 0.0}, "test": e.meta["metrics"]["test"]}}},
    "metrics a string": lambda e: {"meta": {**e.meta, "metrics": {"val": "x", "test": "y"}}},
    "deep nesting": lambda e: {"meta": {**e.meta, "recipe": _deep(200)}},
    "model shapes": lambda e: {"groups": {**e.groups, "model": {
        k: torch.zeros(3, 3) for k in e.groups["model"]}}},
    "model group missing": lambda e: {"groups": {"attack": e.groups["attack"]}},
    "attack state wrong": lambda e: {"groups": {**e.groups, "attack": {"nonsense": torch.ones(2)}},
                                     "meta": {**e.meta, "attack": "sig"}},
}


def _deep(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"x": d}
    return d


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_zoo_entry_is_corrupt_and_rebuilt(tiny_victim, forgery: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    spec, store, entry = tiny_victim
    try:
        _forge(store, entry, **FORGERIES[forgery](entry))
    except RecursionError:  # the store cannot even write it: write the file by hand
        pytest.skip("json cannot serialize this depth")
    (v,) = get_victims(spec, ["badnets"], device="cpu", progress=False)
    err = capsys.readouterr().err
    assert v.built and f"zoo store: entry {entry.key} is corrupt" in err, err
    assert err.count("\n") == 1 and v.target == 0 and v.metrics["val"].asr <= 100.0


def test_deeply_nested_meta_json_is_corrupt_not_a_traceback(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    store = Store(tmp_path / "zoo")
    store.put("k1", {"g": {"t": torch.ones(1)}}, {"a": 1})
    (store.path("k1") / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    assert store.get("k1") is None
    err = capsys.readouterr().err
    assert "entry k1 is corrupt (meta.json does not parse" in err and err.count("\n") == 1


# -- §2 --resume with Ray's state deleted or damaged ----------------------------------------------
def _stored_run(tmp_path: Path) -> Path:
    """An interrupted run as the search leaves it: spec.json and Ray's state in ray/."""
    spec = _build(tmp_path, "--name", "r1", "--num-samples", "5")
    state = spec.run_dir / "ray"
    state.mkdir(parents=True)
    (spec.run_dir / "spec.json").write_text(spec.to_json())
    (state / "experiment_state-2026-01-01_00-00-00.json").write_text(
        '{"trial_data": [], "runner_data": {}, "stats": {}}')
    (state / "tuner.pkl").write_bytes(b"x")
    (state / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"garbage")
    return state


@pytest.mark.parametrize(("damage", "needle"), [
    ("deleted", "Ray's saved search state is missing from {state} (deleted?)"),
    ("truncated", "Ray's saved search state is corrupt ({state}/experiment_state-2026-01-01"
                  "_00-00-00.json: not valid JSON"),
    ("no tuner.pkl", "Ray's saved search state is incomplete ({state}/tuner.pkl is missing"),
])
def test_resume_with_ray_state_deleted_or_corrupt_is_one_line_not_a_restart(
        tmp_path: Path, damage: str, needle: str) -> None:
    import shutil

    state = _stored_run(tmp_path)
    if damage == "deleted":
        shutil.rmtree(state)
    elif damage == "truncated":
        (state / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')
    else:
        (state / "tuner.pkl").unlink()
    with pytest.raises(UsageError) as info:
        _build(tmp_path, "--name", "r1", "--resume")
    msg = str(info.value)
    assert needle.format(state=state) in msg and "\n" not in msg
    assert "start a new run with another --name" in msg


def test_resume_with_a_damaged_searcher_state_is_one_line_before_tune(tmp_path: Path) -> None:
    from tuner.trainable import _restore  # imports ray; starts nothing

    state = _stored_run(tmp_path)
    with pytest.raises(UsageError, match=r"corrupt \(searcher-state-2026-01-01_00-00-00.pkl: "):
        _restore(str(state), state, trainable=None)


# -- §2 SIGTERM is Ctrl-C ----------------------------------------------------------------------------
def test_sigterm_raises_keyboard_interrupt_like_ctrl_c() -> None:
    import subprocess
    import sys

    # A fresh process: in this one an earlier in-process Ray may hold SIGTERM blocked.
    code = ("import os, signal, time\n"
            "from tuner import cli\n"
            "cli.sigterm_as_ctrl_c()\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted')\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0 and out.stdout.strip() == "interrupted", out.stderr[-500:]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_mid_search_stops_cleanly_with_a_resume_hint(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(root)}
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "tuner", "--defense", "ft", "--smoke-test",
                                 "--num-samples", "8", "--max-concurrent", "1", "--output",
                                 str(tmp_path / "runs"), "--name", "t", "--zoo-dir",
                                 str(tmp_path / "zoo")], cwd=root, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while "done (  2/8)" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    text = log.read_text()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever this test's driver left, by its group
    except ProcessLookupError:
        pass
    assert rc == 130 and "continue it with:" in text and "--name t --resume" in text, text[-3000:]
    assert "SIGTERM received" not in text and "Traceback" not in text


# -- §3 the network ------------------------------------------------------------------------------------
def test_address_that_accepts_tcp_but_is_not_ray_fails_within_the_timeout() -> None:
    import socket
    import threading

    from tuner.spec import check_reachable

    with socket.socket() as srv:  # accepts connections, says nothing (not gRPC)
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        threading.Thread(target=lambda: [srv.accept() for _ in range(2)], daemon=True).start()
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(UsageError) as info:
            check_reachable(address, timeout=2.0)
    assert time.monotonic() - start < 5
    assert str(info.value) == (f"--address {address}: no Ray cluster answers (no answer within "
                               "2 s); expected the head's HOST:PORT from `ray start --head`")


def test_address_that_answers_but_not_grpc_is_refused() -> None:
    import socket
    import threading

    from tuner.spec import check_reachable

    def http(srv: socket.socket) -> None:
        conn, _ = srv.accept()
        conn.recv(100)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        threading.Thread(target=http, args=(srv,), daemon=True).start()
        with pytest.raises(UsageError, match="it is not a Ray cluster"):
            check_reachable(f"127.0.0.1:{srv.getsockname()[1]}", timeout=5.0)


def test_ray_token_file_is_made_private(tmp_path: Path) -> None:
    from tuner.trainable import private_token  # imports ray; starts nothing

    token = tmp_path / "auth_token"
    token.write_text("secret")
    token.chmod(0o644)  # as Ray writes it under the usual umask
    private_token(token)
    assert token.stat().st_mode & 0o777 == 0o600
    other = tmp_path / "other"
    other.write_text("x")
    other.chmod(0o644)
    (tmp_path / "link").symlink_to(other)
    private_token(tmp_path / "link")
    assert other.stat().st_mode & 0o777 == 0o644  # never through a link
