"""Running on a cluster (issue 20): a joined cluster's GPUs decide the GPU share unless the
flags do; a trial given a GPU share fails saying so where CUDA is missing; ``--autoscale`` lets
trials wait for nodes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tuner import cli
from tuner.errors import UsageError
from tuner.spec import AUTOSCALE_TRIALS, ExperimentSpec, from_args
from zoo.victims import ZooSpec

ADDRESS = "10.0.0.5:6379"  # a cluster address that is never reached (check_reachable is faked)


# -- the GPU share: flags first, then the cluster ---------------------------------------------
@pytest.fixture
def parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``from_args`` for search flags, with every cluster address answering."""
    monkeypatch.setattr("tuner.spec.check_reachable", lambda address, timeout=10.0: None)

    def parse(*argv: str) -> ExperimentSpec:
        args = cli.build_parser().parse_args(
            ["search", "--defense", "ngf", "--output", str(tmp_path / "runs"), "--zoo-dir",
             str(tmp_path / "zoo"), *argv])
        return from_args(args)

    return parse


def test_a_joined_cluster_decides_the_gpu_share_unless_the_flags_do(parse: Any) -> None:
    left = parse("--address", ADDRESS)
    assert left.gpus_per_trial is None  # not decided before the cluster is joined
    on_gpus, no_gpus = left.on_cluster(2.0), left.on_cluster(0.0)
    assert (on_gpus.gpus, on_gpus.trial_device) == (0.25, "cuda")
    assert (no_gpus.gpus, no_gpus.trial_device) == (0.0, "cpu")
    told = parse("--address", ADDRESS, "--gpus-per-trial", "0").on_cluster(2.0)
    assert told.gpus == 0.0
    cpu = parse("--address", ADDRESS, "--device", "cpu")  # an explicit --device cpu: CPU trials
    assert cpu.gpus_per_trial == 0.0 and cpu.on_cluster(2.0).trial_device == "cpu"
    assert parse("--address", ADDRESS, "--gpus-per-trial", "0.5").on_cluster(0.0).gpus == 0.5


@pytest.mark.parametrize(("argv", "needle"), [
    (["--address", ADDRESS, "--device", "cpu", "--gpus-per-trial", "0.5"],
     "--gpus-per-trial 0.5 with --device cpu"),
    (["--autoscale", "--gpus-per-trial", "0"], "--autoscale: a local Ray never grows"),
    (["--autoscale", "--address", ADDRESS], "--autoscale needs --gpus-per-trial"),
])
def test_contradictory_cluster_flags_are_one_line_before_ray(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    out = tmp_path / "runs"
    rc = cli.main(["--defense", "ngf", "--output", str(out), "--zoo-dir", str(tmp_path / "zoo"),
                   *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    assert not out.exists()


# -- real Ray --------------------------------------------------------------------------------
RAY_ARGS = {"include_dashboard": False, "log_to_driver": False,
            "object_store_memory": 100 * 1024 * 1024}


def spec_for(tmp_path: Path, **kw: Any) -> ExperimentSpec:
    base = dict(defense="ft", zoo=ZooSpec(attacks=("badnets",)), output=tmp_path, name="run",
                scheduler="fifo", max_epochs=1, cpus_per_trial=1.0, num_samples=1)
    return ExperimentSpec(**{**base, **kw})


def device_logger(log: str, seconds: float = 0.0) -> Any:
    """A picklable fake ``trial_epochs``: notes the device and node it ran on, then one epoch."""

    def epochs_fn(defense: str, params: dict, victims: list, splits: Any, **kw: Any
                  ) -> Iterator[dict]:
        import ray

        with open(log, "a") as f:
            f.write(f"{kw['device']} {ray.get_runtime_context().get_node_id()}\n")
        time.sleep(seconds)
        yield {"epoch": 1, "diverged": False, "per_attack": {
            v.attack: {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 90.0} for v in victims}}

    return epochs_fn


def run(spec: ExperimentSpec, epochs_fn: Any) -> list[Any]:
    from tuner import trainable
    from tuner.spaces import load_space
    from tuner.study import sampler_settings

    return trainable.run_tune(spec, load_space("ft", dataset="digits"),
                              [SimpleNamespace(attack="badnets")], None, max_t=1,
                              sampler=sampler_settings(0, spec.num_samples), epochs_fn=epochs_fn)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_cluster_with_a_gpu_gives_trials_a_share_that_runs_on_cuda_or_fails_saying_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    from tuner import trainable

    log = tmp_path / "log.txt"
    log.touch()
    ray.init(address="local", num_cpus=2, num_gpus=1, **RAY_ARGS)  # a declared (maybe fake) GPU
    try:
        spec = spec_for(tmp_path, address=ADDRESS)  # joined: ray is up, the address is not used
        resolved = trainable.on_cluster(spec)
        assert "the cluster has 1 GPU(s): each trial gets 0.25 GPU" in capsys.readouterr().out
        assert resolved.gpus == 0.25 and trainable.max_concurrent(resolved) == 2  # 2 cores
        (record,) = run(spec, device_logger(str(log)))
        ip = ray.util.get_node_ip_address()
    finally:
        ray.shutdown()
    if torch.cuda.is_available():  # a GPU machine: the trial ran on its share
        assert record.state == "complete" and log.read_text().startswith("cuda ")
        return
    assert record.state == "error" and log.read_text() == ""  # never silently on the CPU
    assert f"trial given 0.25 GPU on node {ip}" in record.error, record.error
    assert "cannot use CUDA" in record.error and "--gpus-per-trial 0" in record.error


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_autoscale_lets_trials_wait_for_a_node_that_joins_later(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tuner import trainable

    log = tmp_path / "log.txt"
    log.touch()
    mem = 80 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "num_gpus": 0, "object_store_memory": mem, "include_dashboard": False})
    joined: list[float] = []
    found: dict[str, Any] = {}

    def search(spec: ExperimentSpec) -> None:  # Tune in a thread: nodes join from the main one
        try:
            found["records"] = run(spec, device_logger(str(log), seconds=1.0))
        except BaseException as exc:  # re-raised below, in the test's thread
            found["error"] = exc

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        head = ray.get_runtime_context().get_node_id()
        gpu = spec_for(tmp_path, address=cluster.address, gpus_per_trial=0.25, num_samples=2)
        with pytest.raises(UsageError, match="no trial fits in the cluster .*--autoscale"):
            trainable.max_concurrent(gpu)  # nothing fits now, and nothing will join: refused
        waiting = dataclasses.replace(gpu, autoscale=True)  # no --max-concurrent: the default
        assert trainable.max_concurrent(waiting) == AUTOSCALE_TRIALS
        # Two-core trials on a one-core head: they wait until a four-core node joins.
        spec = spec_for(tmp_path, address=cluster.address, gpus_per_trial=0, cpus_per_trial=2,
                        autoscale=True, max_concurrent=2, num_samples=2)
        assert trainable.max_concurrent(spec) == 2
        tune_thread = threading.Thread(target=search, args=(spec,), daemon=True)
        tune_thread.start()
        time.sleep(3.0)
        assert tune_thread.is_alive() and not log.read_text(), "a trial ran before a node joined"
        joined.append(time.time())  # what an autoscaler does for waiting trials: a node joins
        cluster.add_node(num_cpus=4, object_store_memory=mem)
        tune_thread.join(timeout=90)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if "error" in found:
        raise found["error"]
    assert "records" in found, "the search did not end within 90 s of the node joining"
    records = found["records"]
    assert "--autoscale: 2 of them wait (PENDING)" in capsys.readouterr().out
    assert [r.state for r in records] == ["complete", "complete"]
    assert joined and all((r.started_at or 0) > joined[0] for r in records)
    nodes = {line.split()[1] for line in log.read_text().splitlines()}
    assert len(nodes) == 1 and head not in nodes  # both on the node that joined
