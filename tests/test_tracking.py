"""--mlflow and --wandb: Ray Tune's own logger callbacks record every trial's config and
per-epoch metrics; bad values are one line before Ray starts.

The Ray test runs a two-trial, two-epoch search with a fake ``epochs_fn`` (as in
``test_search_ray.py``) into a local MLflow file store and reads the runs back with MLflow's
own client.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from tuner import cli, tracking
from tuner.errors import UsageError
from tuner.spec import ExperimentSpec

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The search CLI in this process: exit 2, one line, nothing written."""
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = cli.main(["--defense", "ft", "--output", str(tmp_path / "runs"), "--device", "cpu",
                   "--zoo-dir", str(tmp_path / "zoo"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    return err


# -- flag values (no Ray) ----------------------------------------------------------------------
def test_mlflow_uri_forms_are_normalized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.check_mlflow_uri("mlruns") == str(tmp_path / "mlruns")  # driver-independent
    assert tracking.check_mlflow_uri("/abs/mlruns") == "/abs/mlruns"
    assert tracking.check_mlflow_uri("file:///abs/mlruns") == "file:///abs/mlruns"
    assert tracking.check_mlflow_uri("sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert tracking.check_mlflow_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert tracking.check_mlflow_uri("https://mlflow.lab:5000/x") == "https://mlflow.lab:5000/x"
    spec = ExperimentSpec(defense="ft", name="n", mlflow="mlruns", wandb="proj")
    assert spec.mlflow == str(tmp_path / "mlruns") and spec.wandb == "proj"
    assert ExperimentSpec.from_dict(spec.to_dict()).mlflow == spec.mlflow


@pytest.mark.parametrize(("value", "says"), [
    ("ftp://host/x", "unsupported scheme ftp"), ("s3://bucket", "unsupported scheme s3"),
    ("file://rel/mlruns", "a file URI needs an absolute path"), ("file:///", "absolute path"),
    ("sqlite://m.db", "expected sqlite:///path"), ("http://", "expected http://HOST"),
    ("http://host:port", "expected http://HOST"), ("", "expected a tracking URI"),
    ("://x", "expected a tracking URI")])
def test_bad_mlflow_uri_is_one_line_naming_it(value: str, says: str) -> None:
    with pytest.raises(UsageError, match=f"^--mlflow {value!r}: .*{says}"):
        ExperimentSpec(defense="ft", name="n", mlflow=value)


@pytest.mark.parametrize("value", ["", "a/b", "has space", "x" * 129, "-lead"])
def test_bad_wandb_project_is_one_line(value: str) -> None:
    with pytest.raises(UsageError, match="^--wandb .*expected a W&B project name"):
        ExperimentSpec(defense="ft", name="n", wandb=value)


def test_tracking_refusals_come_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "unsupported scheme ftp" in _refused(tmp_path, capsys, "--mlflow", "ftp://h/x")
    (tmp_path / "afile").write_text("")
    err = _refused(tmp_path, capsys, "--mlflow", str(tmp_path / "afile"))
    assert "is not a folder (MLflow's file store)" in err
    err = _refused(tmp_path, capsys, "--mlflow", f"sqlite:///{tmp_path / 'afile' / 'm.db'}")
    assert "--mlflow" in err and "is not a folder" in err
    err = _refused(tmp_path, capsys, "--mlflow", "http://127.0.0.1:1")
    assert "no MLflow server answers at 127.0.0.1:1" in err
    monkeypatch.setattr(tracking, "installed", lambda module: False)
    err = _refused(tmp_path, capsys, "--mlflow", str(tmp_path / "mlruns"))
    assert "MLflow is not installed" in err and "mlflow-skinny" in err
    assert "wandb is not installed" in _refused(tmp_path, capsys, "--wandb", "proj")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_unwritable_mlflow_store_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        err = _refused(tmp_path, capsys, "--mlflow", f"file://{ro}/mlruns")
    finally:
        ro.chmod(0o700)
    assert f"--mlflow '{ro}/mlruns': cannot write in '{ro}'" in err


def test_resume_keeps_the_runs_own_tracking(tmp_path: Path) -> None:
    stored = ExperimentSpec(defense="ft", name="n", output=tmp_path, mlflow="/a/mlruns")
    given = ExperimentSpec(defense="ft", name="n", output=tmp_path, resume=True)
    assert given.resumed_from(stored).mlflow == "/a/mlruns"  # Tune restores its callbacks too
    assert "mlflow" in given.differences(stored)


def two_trial_search(spec: Any) -> list[Any]:
    """``spec``'s search (2 trials of 2 fake epochs) in a local Ray; both must complete."""
    import ray
    from test_search_ray import RAY_ARGS, run, sleeper

    ray.init(address="local", num_cpus=2, num_gpus=0, **RAY_ARGS)
    try:
        records = run(spec, sleeper(0.05, epochs=2))
    finally:
        ray.shutdown()
    assert [r.state for r in records] == ["complete", "complete"]
    return records


# -- a search logged to MLflow (real Ray) ------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(120)
def test_search_logs_every_trial_to_an_mlflow_file_store(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from test_search_ray import make_spec

    from tuner import trainable

    store = tmp_path / "mlruns"
    spec = make_spec(tmp_path, num_samples=2, max_epochs=2, mlflow=f"file://{store}")
    records = two_trial_search(spec)

    client = MlflowClient(tracking_uri=f"file://{store}")
    experiment = client.get_experiment_by_name("run")  # the run's --name
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    by_number = {int(r.data.params[trainable.NUMBER]): r for r in runs}
    assert sorted(by_number) == [0, 1]
    for record in records:
        logged = by_number[record.number]
        want = {**{k: str(v) for k, v in record.params.items()},
                trainable.NUMBER: str(record.number)}
        assert logged.data.params == want  # the trial's whole config, nothing else
        assert {k: logged.data.tags[k] for k in ("defense", "objective", "dataset")} == {
            "defense": "ft", "objective": "mean", "dataset": "digits"}
        score = client.get_metric_history(logged.info.run_id, "score")
        assert [m.step for m in sorted(score, key=lambda m: m.step)] == [1, 2]  # one per epoch
        assert [m.value for m in sorted(score, key=lambda m: m.step)] == [
            h["score"] for h in record.history]
        asr = client.get_metric_history(logged.info.run_id, "badnets/asr")
        assert sorted(m.value for m in asr) == [5.0, 10.0]  # the fake's 10/epoch
    assert {r.data.params["lr"] for r in runs} == {str(r.params["lr"]) for r in records}



# -- a search logged to W&B, offline (real Ray) -------------------------------------------------
def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's ``run-ID.wandb``: W&B's protobuf ``Record`` messages in
    LevelDB's log format (a 7-byte file header ``:W&B``, magic, version; then 32 KiB blocks of
    chunks, each ``crc32 u32, length u16, type u8`` + payload; type 1 a whole record, 2/3/4 its
    first/middle/last part, 0 padding)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_search_logs_every_trial_to_offline_wandb_runs(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    from test_search_ray import make_spec

    from tuner import trainable

    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline needs no account
    monkeypatch.setenv("WANDB_MODE", "online")  # overridden: --wandb is always offline
    spec = make_spec(tmp_path, num_samples=2, max_epochs=2, wandb="proj")
    records = two_trial_search(spec)

    files = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one offline run per trial, under the run folder
    seen = {}
    for path in files:
        recs = wandb_records(path)
        (head,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
        assert (head.project, head.run_group) == ("proj", "run")
        assert {"defense:ft", "objective:mean", "dataset:digits"} <= set(head.tags)
        config = {i.key: json.loads(i.value_json) for r in recs
                  if r.WhichOneof("record_type") == "config" for i in r.config.update}
        steps = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                  for i in r.history.item} for r in recs if r.WhichOneof("record_type") == "history"]
        seen[config[trainable.NUMBER]] = (config, steps)
    assert sorted(seen) == [0, 1]
    for record in records:
        config, steps = seen[record.number]
        assert {k: config[k] for k in record.params} == record.params
        assert [s["_step"] for s in steps] == [1, 2]  # one per epoch
        assert [s["score"] for s in steps] == [h["score"] for h in record.history]
