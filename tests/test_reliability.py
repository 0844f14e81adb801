"""Reliability (issue 6): faults survived, bad input refused, nothing lost.

Faults go through the production code path: a search driver (the CLI's own parser, spec and
``run_search``) whose trials run an epoch function that raises or sleeps (installed by the test,
``run_search(epochs_fn=...)``), a driver killed with SIGKILL, a worker node removed from a local
``ray.cluster_utils.Cluster``, files damaged in the zoo.
Already covered elsewhere (not repeated here): SIGINT of a driver and resume to exactly
--num-samples (test_search_ray), an unreachable --address at the Ray layer (test_search_ray),
store-level truncation/flip/pickle/lock (test_store), a truncated victim through get_victims
(test_victims), reader-level malformed files and the CIFAR restricted unpickler (test_readers),
per-flag messages of ExperimentSpec (test_spec), random space bounds (test_spaces).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _formats import write_cifar as _write_cifar
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_readers import _replace_batch, _write_mnist
from test_store import _Boom

from tuner import cli

ROOT = Path(__file__).resolve().parents[1]
FAULT_SPACE = ("defense: ft\nparams:\n  lr: {type: categorical, choices: [0.01, 1.0e+30]}\n"
               "default: {lr: 1.0e+30}\n")  # the first trial (the default) diverges


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("BACKDOOR_TUNER_FAULT", None)
    return {**env, **extra}


def _tuner(*argv: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=_env(**env))


# A search driver as `python -m tuner` runs it, with the trials' epoch function replaced:
# FAULT=raise makes trial 1 (the second created, every attempt) raise at its start;
# FAULT=slow makes every epoch 2 s longer (to interrupt a search mid-way).
DRIVER = textwrap.dedent("""
    import os, sys, time
    from tuner import cli
    from tuner.evaluation import trial_epochs
    from tuner.search import run_search
    from tuner.spec import from_args

    def faulty(*args, **kwargs):
        if os.environ["FAULT"] == "raise":
            from ray import tune
            ctx = tune.get_context()  # the trial folder: <fn>_<id>_<creation index, from 1>_...
            folder = os.path.basename(ctx.get_trial_dir().rstrip("/"))
            if folder.split(f"_{ctx.get_trial_id()}_", 1)[1].startswith("2_"):
                raise RuntimeError("injected fault in trial 1")
        for item in trial_epochs(*args, **kwargs):
            if os.environ["FAULT"] == "slow":
                time.sleep(2.0)
            yield item

    try:
        run_search(from_args(cli.build_parser().parse_args(["search", *sys.argv[1:]])),
                   epochs_fn=faulty)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
""")


def _driver_argv(*argv: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, *argv]


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --smoke-test badnets victim, built once for every CLI search of this module."""
    from tuner.spec import ExperimentSpec
    from zoo.victims import ZooSpec, get_victims

    zoo = tmp_path_factory.mktemp("smoke_zoo")
    spec = ExperimentSpec(defense="ft", smoke_test=True, name="x", output=zoo.parent / "unused",
                          zoo=ZooSpec(attacks=("badnets",), zoo_dir=zoo))
    get_victims(spec.victims, progress=False)
    return zoo


# -- 1. trial faults ---------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_diverged_and_raising_trials_are_recorded_and_the_search_completes(
        tmp_path: Path, smoke_zoo: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(FAULT_SPACE)
    r = subprocess.run(_driver_argv(
        "--defense", "ft", "--smoke-test", "--num-samples", "3", "--space", str(space),
        "--output", str(tmp_path / "runs"), "--name", "faults", "--zoo-dir", str(smoke_zoo)),
        capture_output=True, text=True, timeout=280, cwd=ROOT, env=_env(FAULT="raise"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "faults"
    trials = json.loads((run / "trials.json").read_text())
    assert [t["state"] for t in trials][:2] == ["diverged", "error"], trials
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[0]["params"]["lr"] == 1e30 and isinstance(trials[0]["score"], float)
    assert "injected fault in trial 1" in trials[1]["error"]
    assert len(trials) == 3 and trials[2]["state"] in ("complete", "diverged")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed_trials"] == 1 and summary["num_trials"] == 3
    rows = list(csv.DictReader((run / "trials.csv").open()))
    assert [row["state"] for row in rows].count("error") == 1
    assert any("injected fault" in row["error"] for row in rows)
    assert "injected fault in trial 1" in (run / "report.md").read_text()
    _assert_nothing_executable(run)


def _assert_nothing_executable(run: Path) -> None:
    """6. Security: what the tool itself writes is JSON, CSV, Markdown, PNG or SQLite."""
    magic = {".json": b"", ".csv": b"", ".md": b"", ".png": b"\x89PNG",
             ".db": b"SQLite format 3\x00"}
    for path in run.iterdir():
        if path.name == "ray":  # Ray Tune's own experiment state: see README, "When things go wrong"
            continue
        assert path.suffix in magic, path.name
        assert path.read_bytes().startswith(magic[path.suffix]), path.name
        if path.suffix == ".json":
            json.loads(path.read_text())


# -- 2. a worker node lost ---------------------------------------------------------------------
def _sleeper(log: str, seconds: float, epochs: int) -> Any:
    """A picklable fake ``trial_epochs`` that logs its starts (to see retries)."""

    def epochs_fn(defense: str, params: dict, victims: list, splits: Any, **kw: Any
                  ) -> Iterator[dict]:
        with open(log, "a") as f:
            f.write(f"start {json.dumps(params, sort_keys=True)}\n")
        for epoch in range(1, epochs + 1):
            time.sleep(seconds)
            yield {"epoch": epoch, "diverged": False, "per_attack": {
                v.attack: {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 90.0} for v in victims}}

    return epochs_fn


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_lost_worker_node_trials_are_retried_and_num_samples_kept(tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tuner import trainable
    from tuner.spaces import load_space
    from tuner.spec import ExperimentSpec
    from tuner.study import sampler_settings
    from zoo.victims import ZooSpec

    mem = 80 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": mem, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, object_store_memory=mem)
    log = tmp_path / "log.txt"
    log.touch()

    def remove_worker_once_both_run() -> None:
        deadline = time.time() + 60
        while log.read_text().count("start") < 2 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        cluster.remove_node(worker)

    killer = threading.Thread(target=remove_worker_once_both_run, daemon=True)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        head = ray.get_runtime_context().get_node_id()
        spec = ExperimentSpec(defense="ft", zoo=ZooSpec(attacks=("badnets",)), output=tmp_path,
                              name="run", scheduler="fifo", max_epochs=1, num_samples=3)
        killer.start()
        records = trainable.run_tune(spec, load_space("ft", dataset="digits"),
                                     [SimpleNamespace(attack="badnets")], None, max_t=1,
                                     sampler=sampler_settings(0, 3),
                                     epochs_fn=_sleeper(str(log), 3.0, 1))
    finally:
        killer.join(timeout=70)
        ray.shutdown()
        cluster.shutdown()
    assert len(records) == 3 and [r.state for r in records] == ["complete"] * 3, records
    assert len({r.trial_id for r in records}) == 3
    assert log.read_text().count("start") == 4, "the lost trial was not retried exactly once"
    assert {r.node for r in records} == {head}, "a trial ended on the removed node"


# -- 3. the driver killed, then --resume ---------------------------------------------------------
class _Driver:
    """``python -m tuner`` in its own process group; stdout lines collected by a thread."""

    def __init__(self, *argv: str, **env: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(_driver_argv(*argv), cwd=ROOT,
                                     env=_env(**env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not any(needle in x for x in self.lines) and time.time() < deadline:
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            time.sleep(0.1)
        assert any(needle in x for x in self.lines), "".join(self.lines)[-3000:]

    def end_group(self) -> None:
        """End what is left of this process group (the killed driver's Ray), by its id."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)


def _finished_before(experiment: Path, moment: float) -> dict[str, float]:
    """trial_id -> started_at for trials whose last saved result says finished before moment."""
    out = {}
    for result in experiment.glob("*/result.json"):
        rows = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        if rows and rows[-1].get("finished") and rows[-1]["timestamp"] < moment:
            out[rows[-1]["trial_id"]] = rows[-1]["started_at"]
    return out


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_sigint_then_sigkill_then_resume_on_a_two_node_cluster_from_storage(
        tmp_path: Path, smoke_zoo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drivers joined to a two-node cluster (``--address``) keep Tune's experiment in
    ``--storage file:///...``: Ctrl-C, then ``kill -9`` mid-search, then ``--resume`` from that
    storage runs each trial once."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("FAULT", "slow")  # the nodes' workers run the trials' epoch function
    out, store = tmp_path / "runs", tmp_path / "store"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
    try:
        cluster.wait_for_nodes()
        base = ("--defense", "ft", "--output", str(out), "--name", "kill", "--zoo-dir",
                str(smoke_zoo), "--address", cluster.address, "--max-concurrent", "1")
        # Ctrl-C: a clean stop that prints the command that resumes.
        first = _Driver(*base, "--smoke-test", "--num-samples", "5", "--storage",
                        f"file://{store}")
        first.wait_for("done (  1/5)", timeout=150)
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(timeout=60) == 130
        first.end_group()
        text = "".join(first.lines)
        assert "continue it with:" in text and "--name kill --resume" in text, text[-2000:]
        assert list((store / "kill").glob("experiment_state*.json")), "not in --storage"
        assert not (out / "kill" / "ray").exists()
        # SIGKILL of the driver after one more trial finished.
        second = _Driver(*base, "--resume")
        second.wait_for("resuming", timeout=300)  # after the default's evaluation
        second.wait_for(" done (", timeout=120)  # a trial finished in this driver
        time.sleep(3.0)  # the experiment state is saved every second
        killed_at = time.time()
        os.kill(second.proc.pid, signal.SIGKILL)
        second.end_group()
        done = _finished_before(store / "kill", killed_at - 2.0)
        assert 2 <= len(done) < 5, done
        # --resume: the rest run, the finished ones do not run again, each counted once.
        r = _tuner(*base, "--resume", timeout=240)
    finally:
        cluster.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    trials = json.loads((out / "kill" / "trials.json").read_text())
    assert len(trials) == 5 and len({t["trial_id"] for t in trials}) == 5
    assert all(t["state"] == "complete" for t in trials), trials
    started = {t["trial_id"]: t["started_at"] for t in trials}
    assert all(started[tid] == at for tid, at in done.items()), "a finished trial ran again"
    summary = json.loads((out / "kill" / "summary.json").read_text())
    assert summary["num_trials"] == 5 and summary["failed_trials"] == 0
    assert len(list(csv.DictReader((out / "kill" / "trials.csv").open()))) == 5


# -- 4. the store, through get_victims -------------------------------------------------------------
BUILD = textwrap.dedent("""
    import hashlib, json, sys
    from zoo.train import Recipe
    from zoo.victims import ZooSpec, get_victims
    spec = ZooSpec("digits", zoo_dir=sys.argv[1], recipe=Recipe(epochs=1, batch_size=64, lr=0.05))
    (v,) = get_victims(spec, ["badnets"], device="cpu", progress=False)
    sd = v.state_dict
    h = hashlib.sha256(b"".join(sd[k].contiguous().numpy().tobytes() for k in sorted(sd)))
    print(json.dumps({"built": v.built, "key": v.key, "hash": h.hexdigest()}))
""")


@pytest.mark.timeout(180)
def test_two_processes_get_the_same_victim_built_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", BUILD, str(tmp_path / "zoo")]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=170) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(g["built"] for g in got) == [False, True]
    assert got[0]["key"] == got[1]["key"] and got[0]["hash"] == got[1]["hash"]


@pytest.fixture(scope="module")
def digits_splits() -> Any:
    from zoo.data import load_splits

    return load_splits("digits")


def _tiny_victim(zoo: Path, splits: Any) -> Any:
    from zoo.train import Recipe
    from zoo.victims import ZooSpec, get_victims

    spec = ZooSpec("digits", zoo_dir=zoo, recipe=Recipe(epochs=1, batch_size=64, lr=0.05))
    return get_victims(spec, ["badnets"], splits=splits, device="cpu", progress=False)[0]


def test_flipped_byte_in_a_victim_is_detected_reported_and_rebuilt(
        tmp_path: Path, digits_splits: Any, capsys: pytest.CaptureFixture[str]) -> None:
    first = _tiny_victim(tmp_path / "zoo", digits_splits)
    path = tmp_path / "zoo" / first.key / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    again = _tiny_victim(tmp_path / "zoo", digits_splits)
    assert again.built and again.key == first.key
    assert "corrupt" in capsys.readouterr().err
    assert not _tiny_victim(tmp_path / "zoo", digits_splits).built


def test_victim_entry_holding_a_code_running_pickle_is_refused_not_run(
        tmp_path: Path, digits_splits: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from zoo import store as store_mod

    first = _tiny_victim(tmp_path / "zoo", digits_splits)
    folder = tmp_path / "zoo" / first.key
    marker = tmp_path / "MARKER"
    torch.save({"w": _Boom(marker)}, folder / "model.safetensors")
    doc = json.loads((folder / "meta.json").read_text())  # forge matching checksums
    checksums = {**doc["checksums"], "model.safetensors":
                 store_mod._sha256((folder / "model.safetensors").read_bytes())}
    forged = store_mod._meta_document(first.key, doc["meta"], checksums)
    (folder / "meta.json").write_text(json.dumps(forged))
    again = _tiny_victim(tmp_path / "zoo", digits_splits)
    assert not marker.exists(), "unpickling ran code"
    assert again.built and "not a safetensors file" in capsys.readouterr().err


# -- 5. bad input, refused before anything starts ----------------------------------------------------
SPACES = {
    "unknown key": "defense: ft\nparams:\n  nonsense: {type: float, low: 0.1, high: 1}\n",
    "empty range": "defense: ft\nparams:\n  lr: {type: float, low: 0.1, high: 0.1}\n",
    "wrong type": "defense: ft\nparams:\n  epochs: {type: float, low: 1, high: 9}\n",
    "bad yaml": "defense: ft\nparams: {lr: [\n",
}


def _bad_mnist(root: Path) -> Path:
    _write_mnist(root, gz=False)
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    return root


def _bad_cifar(root: Path) -> Path:
    import numpy as np

    _write_cifar(root)
    _replace_batch(root, "data_batch_2", {b"data": np.zeros((20, 3000), np.uint8),
                                          b"labels": [0] * 20})
    return root


def _bad_argv(case: str, tmp: Path) -> tuple[list[str], str]:
    """argv (beyond --output/--zoo-dir) and a fragment the one-line error must contain."""
    if case in SPACES:
        (tmp / "space.yaml").write_text(SPACES[case])
        return ["--defense", "ft", "--space", str(tmp / "space.yaml")], "space.yaml"
    blocker = tmp / "file"
    blocker.write_text("x")
    table: dict[str, tuple[list[str], str]] = {
        "defense": (["--defense", "nope"], "invalid choice: 'nope'"),
        "attack": (["--defense", "ft", "--attacks", "zzz"], "unknown attack 'zzz'"),
        "dataset": (["--defense", "ft", "--dataset", "nope"], "invalid choice: 'nope'"),
        "model": (["--defense", "ft", "--arch", "nosuchnet"], "invalid choice: 'nosuchnet'"),
        "objective": (["--defense", "ft", "--objective", "best"], "--objective"),
        "zero samples": (["--defense", "ft", "--num-samples", "0"], "--num-samples 0"),
        "negative samples": (["--defense", "ft", "--num-samples", "-3"], "--num-samples -3"),
        "text samples": (["--defense", "ft", "--num-samples", "many"], "--num-samples"),
        "gpus 1.5": (["--defense", "ft", "--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5"),
        "missing data root": (["--defense", "ft", "--dataset", "mnist", "--data-root",
                               str(tmp / "nowhere")], "is not a directory"),
        "truncated idx": (["--defense", "ft", "--dataset", "mnist", "--data-root",
                           str(_bad_mnist(tmp / "mnist"))], "t10k-images-idx3-ubyte"),
        "cifar wrong shape": (["--defense", "ft", "--dataset", "cifar10", "--data-root",
                               str(_bad_cifar(tmp / "cifar"))], "data_batch_2"),
        "resume no run": (["--defense", "ft", "--resume", "--name", "gone"], "no run to continue"),
        "no cluster": (["--defense", "ft", "--address", "127.0.0.1:1"], "no Ray cluster answers"),
    }
    return table[case]


BAD_CASES = [*SPACES, "defense", "attack", "dataset", "model", "objective", "zero samples",
             "negative samples", "text samples", "gpus 1.5", "missing data root",
             "truncated idx", "cifar wrong shape", "resume no run", "no cluster"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
        tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, fragment = _bad_argv(case, tmp_path)
    out, zoo = tmp_path / "runs", tmp_path / "zoo"
    try:
        rc = cli.main([*argv, "--output", str(out), "--zoo-dir", str(zoo), "--device", "cpu"])
    except SystemExit as exc:  # argparse's own refusals (type, choices)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err
    assert not out.exists() and not zoo.exists()


def test_unwritable_output_is_refused_writing_nothing(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    rc = cli.main(["--defense", "ft", "--output", str(tmp_path / "file" / "runs"),
                   "--zoo-dir", str(tmp_path / "zoo"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("argv", [["--defense", "nope"],
                                  ["--defense", "ft", "--address", "127.0.0.1:1"]])
def test_bad_input_as_a_user_types_it(tmp_path: Path, argv: list[str]) -> None:
    start = time.time()  # the promise: refused within about 10 s, not a hang
    r = _tuner(*argv, "--output", str(tmp_path / "runs"), "--zoo-dir", str(tmp_path / "zoo"),
               timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stdout == "" and not (tmp_path / "runs").exists() and not (tmp_path / "zoo").exists()
    assert time.time() - start < 30


def _flag_values() -> st.SearchStrategy[str]:
    numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True))
    return st.one_of(numbers.map(str), st.text(max_size=6),
                     st.sampled_from(["0", "1", "0.5", "-0", "1e9", "nan", "inf", "0x10"]))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--num-samples", "--gpus-per-trial", "--cpus-per-trial",
                             "--poison-rate", "--clean-ratio", "--max-epochs", "--seed"]),
       value=_flag_values())
def test_random_flag_values_are_accepted_or_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    from tuner.spec import from_args

    argv = ["search", "--defense", "ft", "--output", str(tmp_path / "runs"), "--device", "cpu",
            f"{flag}={value}"]
    try:
        spec = from_args(cli.build_parser().parse_args(argv))
    except SystemExit as exc:
        err = capsys.readouterr().err
        assert exc.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return
    except cli.USER_ERRORS as exc:
        assert "\n" not in str(exc) and flag in str(exc), str(exc)
        return
    rate = spec.zoo.poison_rate
    assert spec.num_samples >= 1 and spec.cpus_per_trial > 0 and (rate is None or 0 < rate < 1)
    assert not (tmp_path / "runs").exists()
