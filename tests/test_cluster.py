"""Running on a cluster (issue 20): the example manifests run our own command on resources
that fit it; a joined cluster's GPUs decide the GPU share unless the flags do; a trial given a
GPU share fails saying so where CUDA is missing; ``--autoscale`` lets trials wait for nodes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from tuner import cli, flags
from tuner.errors import UsageError
from tuner.spec import AUTOSCALE_TRIALS, ExperimentSpec, cpu_trials, from_args
from zoo.victims import ZooSpec
from zoo.yamlsafe import strict_loader

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ADDRESS = "10.0.0.5:6379"  # a cluster address that is never reached (check_reachable is faked)


# -- helpers ---------------------------------------------------------------------------------
def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=strict_loader(path.name, max_depth=16))


def pinned(package: str) -> str:
    """The version constraints.txt pins for ``package``."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def search_spec(command: str) -> ExperimentSpec:
    """``python -m tuner ...`` read by the tool's own parser and spec (a renamed or removed flag,
    or a value the spec refuses, fails here), without reaching the cluster it names."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "tuner"], command
    args = cli.build_parser().parse_args(["search", *argv[3:]])
    return flags.build(ExperimentSpec, args, **cpu_trials(args))


def cores(quantity: Any) -> float:
    """A Kubernetes CPU quantity ("8", "500m") in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def trials_per_node(spec: ExperimentSpec, cpus: float, gpus: float) -> int:
    return min(int(cpus / spec.cpus_per_trial + 1e-9), int(gpus / spec.gpus + 1e-9))


def under(path: str, mounts: list[str]) -> bool:
    return any(Path(path).is_relative_to(m) for m in mounts)


# -- the manifests ---------------------------------------------------------------------------
def test_rayjob_runs_our_search_on_a_gpu_worker_group_that_fits_it() -> None:
    doc = load(EXAMPLES / "kuberay-rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = search_spec(doc["spec"]["entrypoint"])
    assert spec.address == "auto" and spec.gpus == 0.25 and spec.autoscale
    cluster = doc["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned("ray")
    assert cluster["enableInTreeAutoscaling"] is True  # --autoscale waits for its nodes
    head = cluster["headGroupSpec"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    assert "rayStartParams" in head and all("rayStartParams" in g for g in cluster["workerGroupSpecs"])
    # One image everywhere: the driver and the trials run the same versions.
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1, images
    capacity = 0
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if gpus:
            capacity += trials_per_node(spec, cores(limits["cpu"]), gpus) * group["maxReplicas"]
    assert capacity >= (spec.max_concurrent or 1), "the GPU workers cannot hold the trials asked"
    # Every pod reaches Tune's storage; the driver (head) also writes the run folder and victims.
    storage = str(spec.storage).removeprefix("file://")
    for pod in pods:
        (container,) = pod["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert under(storage, mounts), (storage, mounts)
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert {m["name"] for m in container["volumeMounts"]} <= claims
    head_mounts = [m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert under(str(spec.output), head_mounts) and under(str(spec.zoo.zoo_dir), head_mounts)


def test_rayjob_image_is_built_on_the_pinned_ray_with_the_constraints() -> None:
    text = (EXAMPLES / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", text, re.M)
    assert base is not None and base.group(1) == pinned("ray")
    assert re.search(r"^RUN pip install .*-c constraints\.txt \.$", text, re.M)


def test_cluster_launcher_config_is_valid_for_ray_and_fits_the_search() -> None:
    import jsonschema
    import ray

    doc = load(EXAMPLES / "ray-cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)  # what `ray up` checks first
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    spec = search_spec(doc["metadata"]["search"])
    assert spec.address == "auto" and spec.gpus == 0.25 and spec.autoscale
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    capacity = sum(trials_per_node(spec, t["resources"]["CPU"], t["resources"]["GPU"]) *
                   t["max_workers"] for t in gpu_types)
    assert capacity >= (spec.max_concurrent or 1), "the GPU workers cannot hold the trials asked"
    assert sum(t["max_workers"] for t in gpu_types) <= doc["max_workers"]
    assert doc["docker"]["image"].startswith(f"rayproject/ray:{pinned('ray')}-")
    # The repository is copied to every node and installed there with its pinned versions.
    (remote,) = [r for r, local in doc["file_mounts"].items() if Path(local) == Path(".")]
    assert f"pip install -q -c {remote}/constraints.txt -e {remote}" in doc["setup_commands"]


def test_readme_points_to_example_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"examples/[\w.\-]+", readme))
    assert {"examples/kuberay-rayjob.yaml", "examples/ray-cluster.yaml"} <= named
    assert all((ROOT / name).is_file() for name in named), named


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
