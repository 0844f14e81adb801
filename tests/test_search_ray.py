"""The Tune layer: fractional GPUs, a two-node cluster, resume, pruning bookkeeping, export.

Trials run a fake ``epochs_fn`` (sleep, then fixed metrics) so the tests check scheduling and
bookkeeping in seconds; the real defenses are covered by the CLI test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import ray

from tuner import trainable
from tuner.records import TrialRecord, epoch_report, unflatten
from tuner.spaces import load_space
from tuner.spec import ExperimentSpec
from tuner.study import AskTell, export, sampler_settings
from zoo.victims import ZooSpec

ROOT = Path(__file__).resolve().parents[1]
RAY_ARGS = {"include_dashboard": False, "log_to_driver": False,
            "object_store_memory": 100 * 1024 * 1024}


def sleeper(seconds: float, log: str | None = None, epochs: int = 1) -> Any:
    """A picklable fake ``trial_epochs``: ``epochs`` epochs of ``seconds``, score from ``lr``."""

    def epochs_fn(defense: str, params: dict, victims: list, splits: Any, **kw: Any
                  ) -> Iterator[dict]:
        key = json.dumps(params, sort_keys=True)
        if log:
            with open(log, "a") as f:
                f.write(f"start {key}\n")
        acc = 90.0 + 100 * float(params.get("lr", 0.0))
        for epoch in range(1, epochs + 1):
            time.sleep(seconds)
            yield {"epoch": epoch, "diverged": False,
                   "per_attack": {v.attack: {"acc": acc, "asr": 10.0 / epoch, "ra": 80.0,
                                             "der": 70.0} for v in victims}}
        if log:
            with open(log, "a") as f:
                f.write(f"end {key}\n")

    return epochs_fn


def make_spec(tmp_path: Path, **kw: Any) -> ExperimentSpec:
    base = dict(defense="ft", zoo=ZooSpec(attacks=("badnets",)), output=tmp_path, name="run",
                scheduler="fifo", max_epochs=1, cpus_per_trial=1.0, num_samples=2)
    return ExperimentSpec(**{**base, **kw})


def run(spec: ExperimentSpec, epochs_fn: Any, max_t: int | None = None) -> list[TrialRecord]:
    space = load_space(spec.defense, dataset="digits")
    return trainable.run_tune(spec, space, VICTIMS, None, epochs_fn=epochs_fn,
                              max_t=max_t or spec.max_epochs or 1,
                              sampler=sampler_settings(0, spec.num_samples))


VICTIMS = [SimpleNamespace(attack="badnets")]


@pytest.fixture
def ray_local() -> Iterator[None]:
    ray.init(address="local", num_cpus=4, num_gpus=1, **RAY_ARGS)
    yield
    ray.shutdown()


# -- pure helpers ----------------------------------------------------------------------------
def test_epoch_report_flattens_and_marks_finished() -> None:
    item = {"epoch": 2, "diverged": False,
            "per_attack": {"sig": {"acc": 90.0, "asr": 20.0, "ra": 70.0, "der": 80.0}}}
    m = epoch_report(item, "mean", planned=3)
    assert m["score"] == m["value_0"] == 70.0 and m["sig/asr"] == 20.0
    assert not m["finished"] and epoch_report(item, "mean", planned=2)["finished"]
    pareto = epoch_report(item, "pareto", planned=2)
    assert (pareto["value_0"], pareto["value_1"]) == (90.0, 20.0)
    assert unflatten(m) == item["per_attack"]


def test_asha_stopped_trial_reaches_optuna_as_pruned() -> None:
    import optuna

    space = load_space("ft", dataset="digits")
    study = AskTell(space.distributions, "mean", space.default)
    number, first = study.ask("a")
    assert (number, first) == (0, space.default)  # the paper default goes first, as trial 0
    assert study.ask("b")[0] == 1
    for tid, finished in (("a", True), ("b", False)):
        result = {"value_0": 50.0, "score": 50.0, "epoch": 1, "finished": finished}
        study.report(tid, result)
        study.tell(tid, result, error=False)
    states = [t.state for t in study.study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert study.study.trials[1].intermediate_values == {1: 50.0}


def _record(number: int, params: dict, state: str, score: float | None, per_attack: dict,
            **kw: Any) -> TrialRecord:
    history = ({"epoch": 1, "value_0": score},) if score is not None else ()
    return TrialRecord(number=number, trial_id=f"t{number}", params=params, state=state,
                       epochs=1, score=score, values=(score,) if score is not None else (),
                       per_attack=per_attack, diverged=False, error=kw.get("error"),
                       seconds=1.0, history=history)


def test_study_export_and_best_prefers_complete_trials(tmp_path: Path) -> None:
    import optuna

    from tuner.search import pick_best

    space = load_space("ft", dataset="digits")
    pa = {"badnets": {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 90.0}}
    hi = {"badnets": {"acc": 99.0, "asr": 1.0, "ra": 90.0, "der": 95.0}}
    records = [
        _record(0, dict(space.default), "complete", 85.0, pa),
        _record(1, {**space.default, "lr": 0.02}, "pruned", 98.0, hi),
        _record(2, {**space.default, "lr": 0.03}, "error", None, {}, error="boom"),
    ]
    best = pick_best(records, "mean")
    assert best is not None and best.number == 0
    assert export(tmp_path / "study.db", records, space.distributions, "mean", "s") == 3
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "FAIL"]
    assert [t.number for t in study.trials] == [0, 1, 2] and study.best_value == 85.0


# -- real Ray ----------------------------------------------------------------------------------
def fake_cuda() -> Any:
    """Ray's ``worker_process_setup_hook`` (a closure: Ray pickles it by value): on a machine
    without CUDA, the workers pretend to have it (the fake epochs never compute), so GPU-share
    trials get past the trial's CUDA check and their scheduling is tested here. A machine with
    CUDA is left as it is."""

    def hook() -> None:
        import torch

        if not torch.cuda.is_available():
            torch.cuda.is_available = lambda: True
            torch.cuda.set_per_process_memory_fraction = lambda fraction, device=None: None
            torch.cuda.reset_peak_memory_stats = lambda device=None: None
            torch.cuda.max_memory_allocated = lambda device=None: 0

    return hook


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_four_quarter_gpu_trials_run_at_once(tmp_path: Path) -> None:
    ray.init(address="local", num_cpus=4, num_gpus=1, **RAY_ARGS,
             runtime_env={"worker_process_setup_hook": fake_cuda()})
    spec = make_spec(tmp_path, num_samples=4, gpus_per_trial=0.25)
    try:
        assert trainable.max_concurrent(spec) == 4
        records = run(spec, sleeper(6.0))  # long enough to overlap on a loaded machine
    finally:
        ray.shutdown()
    assert len(records) == 4 and all(r.state == "complete" for r in records)
    starts = [r.started_at or 0.0 for r in records]
    ends = [s + r.seconds for s, r in zip(starts, records)]
    assert max(starts) < min(ends), "the four 0.25-GPU trials did not overlap"
    assert records[0].per_attack["badnets"]["asr"] == 10.0
    assert [r.number for r in records] == [0, 1, 2, 3]
    assert records[0].params == load_space("ft", dataset="digits").default  # trial 0
    assert (tmp_path / "run" / "ray").is_dir()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_pareto_search_with_asha_reports_two_values(tmp_path: Path, ray_local: None) -> None:
    import optuna

    space = load_space("ft", dataset="digits")
    spec = make_spec(tmp_path, num_samples=4, objective="pareto", scheduler="asha",
                     max_epochs=3)
    records = run(spec, sleeper(0.2, epochs=3))
    assert len(records) == 4 and {r.state for r in records} <= {"complete", "pruned"}
    assert all(len(r.values) == 2 and r.history for r in records)
    done = [r for r in records if r.state == "complete"]
    assert done and all(r.epochs == 3 and r.values[1] == pytest.approx(10 / 3) for r in done)
    export(tmp_path / "study.db", records, space.distributions, "pareto", "p")
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.directions[1] == optuna.study.StudyDirection.MINIMIZE and study.best_trials


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_trials_spread_over_two_nodes(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        records = run(make_spec(tmp_path, num_samples=2), sleeper(4.0))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert all(r.state == "complete" for r in records)
    assert len({r.node for r in records}) == 2


DRIVER = textwrap.dedent("""
    import sys, json
    from pathlib import Path
    from types import SimpleNamespace
    sys.path.insert(0, {tests!r})
    from test_search_ray import sleeper
    from tuner import trainable
    from tuner.spaces import load_space
    from tuner.spec import ExperimentSpec
    from tuner.study import sampler_settings
    spec = ExperimentSpec.from_dict(json.loads(sys.argv[1]))
    trainable.start_ray(spec)
    try:
        records = trainable.run_tune(spec, load_space("ft", dataset="digits"),
                                     [SimpleNamespace(attack="badnets")], None, max_t=1,
                                     sampler=sampler_settings(0, spec.num_samples),
                                     epochs_fn=sleeper(1.5, sys.argv[2]))
    finally:
        trainable.stop_ray()
    print("RECORDS", json.dumps([r.state for r in records]))
""")


@pytest.mark.ray
@pytest.mark.timeout(170)
def test_interrupted_search_resumes_to_exactly_num_samples(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.touch()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(ROOT / "tests")))
    spec = make_spec(tmp_path, num_samples=4, max_concurrent=1)
    args = {k: v for k, v in spec.to_dict().items()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(args), str(log)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while log.read_text().count("end ") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert log.read_text().count("end ") >= 2, proc.communicate()[0][-2000:]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    first = json.loads(out.split("RECORDS", 1)[1]) if "RECORDS" in out else []
    assert 2 <= sum(s != "incomplete" for s in first) < 4, out[-2000:]

    resumed = json.dumps({**args, "resume": True})
    out = subprocess.run([sys.executable, str(script), resumed, str(log)], env=env,
                         capture_output=True, text=True, timeout=90).stdout
    states = json.loads(out.split("RECORDS", 1)[1])
    assert states == ["complete"] * 4
    ends = [line for line in log.read_text().splitlines() if line.startswith("end ")]
    assert len(ends) == 4 and len(set(ends)) == 4, "a finished trial ran twice"


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_unreachable_address_fails_fast_with_one_line(tmp_path: Path) -> None:
    from tuner.errors import UsageError

    spec = make_spec(tmp_path, address="127.0.0.1:1")
    start = time.time()
    with pytest.raises(UsageError, match="no Ray cluster answers"):
        trainable.start_ray(spec)
    assert time.time() - start < 30 and not ray.is_initialized()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_local_ray_workers_import_what_a_trial_needs_at_start(tmp_path: Path) -> None:
    @ray.remote
    def preloaded() -> bool:
        import sys

        return "tuner.evaluation" in sys.modules and "defenses" in sys.modules

    assert trainable.start_ray(make_spec(tmp_path))
    try:
        assert ray.get(preloaded.remote(), timeout=90)
    finally:
        trainable.stop_ray()


def test_ray_start_error_surfaces_at_ready_and_exit_is_clean(tmp_path: Path) -> None:
    from tuner.errors import UsageError
    from tuner.search import _RayInBackground

    spec = make_spec(tmp_path, address="127.0.0.1:1")
    with pytest.raises(UsageError, match="no Ray cluster answers"):
        with _RayInBackground(spec) as bg:
            bg.ready()
    assert not ray.is_initialized() and bg.waited > 0


def test_search_timing_counts_ray_waits_in_the_search_wall() -> None:
    from tuner.search import timing

    records = [SimpleNamespace(seconds=s, cpu_seconds=s, device_seconds=s, gpu_peak_mb=None)
               for s in (6.0, 12.0)]
    t = timing(wall=30.0, victims=1.0, search=9.0, final=5.0, ray_waited=1.0, records=records, slots=2)
    assert t["trial_seconds"] == 18.0 and t["ray_overhead_share"] == pytest.approx(1 - 18 / 20)
    assert timing(wall=1.0, victims=0, search=0.0, final=0, ray_waited=0.0, records=[],
                  slots=2)["ray_overhead_share"] == 0.0


class Reversed:
    """A JobMap that finishes its jobs in reverse order (as parallel jobs may)."""

    cpu_seconds = 0.0

    def __call__(self, fn: Any, jobs: list, **shared: Any) -> Iterator[tuple[int, Any]]:
        for i in reversed(range(len(jobs))):
            yield i, fn(*jobs[i], device="cpu", **shared)


def test_final_evaluation_is_one_job_per_victim_and_seed_reassembled_in_order(
        monkeypatch: Any) -> None:
    from tuner import search

    def fake_job(defense: str, params: dict, victim: Any, seed: int, mia: Any, precision: str,
                 *, splits: Any, device: Any) -> dict[str, Any]:
        assert splits == "SPLITS" and defense == "ngf"
        return {"victim": victim.attack, "seed": seed, "mia": mia}

    monkeypatch.setattr(search, "final_job", fake_job)
    spec = ExperimentSpec(defense="ngf", final_seeds=2)
    a, b, c = (SimpleNamespace(attack=n) for n in ("badnets", "wanet", "sig"))
    sets = [search.VictimSet(seed=0, victims=[a, b], mia=None),
            search.VictimSet(seed=1, victims=[c], mia={"sig": 0.6})]
    runs = search.final_evaluation(spec, {}, sets, "SPLITS", Reversed())
    assert [(r["victim_seed"], r["defense_seed"], list(r["per_attack"])) for r in runs] == [
        (0, 0, ["badnets", "wanet"]), (0, 1, ["badnets", "wanet"]), (1, 0, ["sig"]), (1, 1, ["sig"])]
    assert all(cell["seed"] == r["defense_seed"] and cell["victim"] == name
               for r in runs for name, cell in r["per_attack"].items())
    assert runs[2]["per_attack"]["sig"]["mia"] == {"sig": 0.6}


def job_probe() -> Any:
    """A picklable RayMap job: where and how it ran."""

    def probe(tag: str, meet: str, *, shared: dict, device: Any) -> dict[str, Any]:
        """Waits (up to 60 s) until the other job of ``meet`` has started too."""
        import torch

        if tag == "boom":
            raise ValueError("job boom failed")
        Path(meet, tag).touch()
        deadline = time.time() + 60
        while len(os.listdir(meet)) < 2 and time.time() < deadline:
            time.sleep(0.05)
        return {"tag": tag, "pid": os.getpid(), "threads": torch.get_num_threads(),
                "device": str(device), "shared": shared["n"], "met": len(os.listdir(meet)) == 2}

    return probe


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_ray_map_runs_jobs_as_parallel_tasks_with_a_trials_resources(tmp_path: Path,
                                                                      ray_local: None) -> None:
    jobs = trainable.RayMap(make_spec(tmp_path, cpus_per_trial=2.0))
    meet = str(tmp_path / "meet")
    os.mkdir(meet)
    out = dict(jobs(job_probe(), [("a", meet), ("b", meet)], shared={"n": 7}))
    assert [out[i]["tag"] for i in (0, 1)] == ["a", "b"]
    assert {o["pid"] for o in out.values()}.isdisjoint({os.getpid()})  # Ray workers, not here
    assert all(o["threads"] == 2 and o["device"] == "cpu" and o["shared"] == 7
               for o in out.values())
    assert out[0]["met"] and out[1]["met"]  # both ran at once (4 CPUs, 2 per job)
    assert jobs.cpu_seconds >= 0.0
    with pytest.raises(ValueError, match="job boom failed"):
        dict(jobs(job_probe(), [("boom", meet), ("c", meet)], shared={"n": 1}))


SHIPPED_DRIVER = textwrap.dedent("""
    import json, sys, time
    from types import SimpleNamespace
    import zoo
    from tuner import trainable
    from tuner.spaces import load_space
    from tuner.spec import ExperimentSpec
    from tuner.study import sampler_settings

    def epochs_fn(defense, params, victims, splits, **kw):
        import zoo._shipped_marker  # only in the driver's copy of the project
        time.sleep(4.0)  # both trials at once: one on each node
        yield {"epoch": 1, "diverged": False,
               "per_attack": {"badnets": {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 70.0}}}

    assert zoo.__file__.startswith(sys.argv[2]), zoo.__file__  # the driver runs the copy
    spec = ExperimentSpec.from_dict(json.loads(sys.argv[1]))
    if sys.argv[3] == "no-shipping":  # what a join without py_modules did before
        trainable.cluster_runtime_env = dict
    trainable.start_ray(spec)
    try:
        records = trainable.run_tune(spec, load_space("ft", dataset="digits"),
                                     [SimpleNamespace(attack="badnets")], None, max_t=1,
                                     sampler=sampler_settings(0, spec.num_samples),
                                     epochs_fn=epochs_fn)
    finally:
        trainable.stop_ray()
    print("RECORDS", json.dumps([[r.state, r.node, r.error] for r in records]))
""")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("shipping", ["shipping", "no-shipping"])
def test_cluster_workers_run_the_drivers_shipped_code(tmp_path: Path, shipping: str) -> None:
    """A driver joins a two-node cluster (``--address``) with a copy of the project that no
    node has on its path (the copy holds a module the nodes' own project lacks); its trials,
    one per node, import that module: the code reached the workers through Ray (py_modules).
    Without shipping (the join as it was) every trial fails: the test sees the problem."""
    import shutil

    from ray.cluster_utils import Cluster

    copy = tmp_path / "driver_copy"
    for pkg in ("tuner", "defenses", "zoo", "search_spaces"):
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "zoo" / "_shipped_marker.py").write_text("SHIPPED = True\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    script = elsewhere / "driver.py"
    script.write_text(SHIPPED_DRIVER)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
    try:
        cluster.wait_for_nodes()
        spec = make_spec(tmp_path, num_samples=2, address=cluster.address)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        out = subprocess.run([sys.executable, str(script), json.dumps(spec.to_dict()), str(copy),
                              shipping], env=env, cwd=elsewhere, capture_output=True, text=True,
                             timeout=180)
    finally:
        cluster.shutdown()
    assert "RECORDS" in out.stdout, (out.stdout + out.stderr)[-3000:]
    rows = json.loads(out.stdout.split("RECORDS", 1)[1])
    if shipping == "no-shipping":
        assert [r[0] for r in rows] == ["error", "error"], rows
        assert all("_shipped_marker" in str(r[2]) for r in rows), rows
        return
    assert [r[0] for r in rows] == ["complete", "complete"], rows
    assert len({r[1] for r in rows}) == 2  # one trial on each node


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_storage_uri_holds_the_experiment_and_resume_reads_it(tmp_path: Path,
                                                               ray_local: None) -> None:
    """--storage file:///...: Tune's experiment lands there (not in the run folder), and a
    resumed search restores from it: finished trials are kept, none runs again."""
    store = tmp_path / "store"
    log = tmp_path / "log.txt"
    log.touch()
    spec = make_spec(tmp_path, num_samples=2, storage=f"file://{store}")
    first = run(spec, sleeper(0.2, str(log)))
    assert [r.state for r in first] == ["complete", "complete"]
    assert (store / "run").is_dir() and list((store / "run").glob("experiment_state*.json"))
    assert not (tmp_path / "run" / "ray").exists()
    again = run(make_spec(tmp_path, num_samples=2, storage=f"file://{store}", resume=True),
                sleeper(0.2, str(log)))
    assert [(r.number, r.state, r.params) for r in again] == [
        (r.number, r.state, r.params) for r in first]
    assert log.read_text().count("end ") == 2  # restored, not rerun
