"""ExperimentSpec: every bad flag fails early with one line naming it (no Ray, no zoo build)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tuner import cmd_search
from tuner.cli import USER_ERRORS
from tuner.errors import UsageError
from tuner.spec import ExperimentSpec, check_writable, default_name, from_args
from zoo.victims import ZooSpec


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a refused flag value, as the CLI reports it
        raise UsageError(message)


def parse(*argv: str) -> argparse.Namespace:
    p = _Parser()
    cmd_search.add_arguments(p)
    return p.parse_args(list(argv))


def build(tmp_path: Path, *argv: str) -> ExperimentSpec:
    return from_args(parse("--output", str(tmp_path / "runs"), "--device", "cpu", *argv))


def test_defaults_are_the_cpu_budget_run(tmp_path: Path) -> None:
    spec = build(tmp_path, "--defense", "ngf")
    assert spec.attacks == ("badnets", "blended", "wanet", "sig")
    assert (spec.num_samples, spec.final_seeds, spec.max_epochs) == (16, 3, None)
    assert spec.gpus_per_trial == 0.0 and spec.cpus_per_trial == 1.0
    assert spec.output.is_absolute() and spec.run_dir.parent == tmp_path / "runs"
    assert spec.name.startswith("ngf-digits-")


def test_smoke_test_shrinks_but_explicit_flags_win(tmp_path: Path) -> None:
    spec = build(tmp_path, "--defense", "ft", "--smoke-test")
    assert (spec.num_samples, spec.final_seeds, spec.max_epochs, spec.attacks) == (
        2, 1, 1, ("badnets",))
    spec = build(tmp_path, "--defense", "ft", "--smoke-test", "--num-samples", "3",
                 "--attacks", "sig,wanet")
    assert spec.num_samples == 3 and spec.attacks == ("sig", "wanet")


@pytest.mark.parametrize(("argv", "needle"), [
    (["--defense", "nope"], "invalid choice: 'nope'"),
    (["--defense", "ft", "--num-samples", "0"], "--num-samples 0"),
    (["--defense", "ft", "--final-seeds", "0"], "--final-seeds 0"),
    (["--defense", "ft", "--max-concurrent", "0"], "--max-concurrent 0"),
    (["--defense", "ft", "--max-epochs", "0"], "--max-epochs 0"),
    (["--defense", "ft", "--gpus-per-trial", "1.5"], "--gpus-per-trial 1.5"),
    (["--defense", "ft", "--gpus-per-trial", "-0.1"], "--gpus-per-trial -0.1"),
    (["--defense", "ft", "--gpus-per-trial", "0.25"], "no GPU on this machine"),
    (["--defense", "ft", "--cpus-per-trial", "0"], "--cpus-per-trial 0"),
    (["--defense", "ft", "--attacks", "badnets", "--holdout-attacks", "badnets,sig"],
     "--holdout-attacks badnets also in --attacks"),
    (["--defense", "ft", "--attacks", "badnets,badnets"], "names badnets twice"),
    (["--defense", "ft", "--attacks", "zzz"], "unknown attack 'zzz'"),
    (["--defense", "ft", "--attacks", ","], "--attacks is empty"),
    (["--defense", "ft", "--address", "nohost"], "--address 'nohost'"),
    (["--defense", "ft", "--name", "a/b"], "--name 'a/b'"),
    (["--defense", "ft", "--resume"], "--resume needs --name"),
    (["--defense", "ft", "--resume", "--name", "gone"], "--resume: no run to continue"),
    (["--defense", "ft", "--poison-rate", "1.5"], "--poison-rate 1.5"),
    (["--defense", "ft", "--dataset", "mnist"], "--data-root is required"),
    (["--defense", "ft", "--attacks", "badnets,bb:theirs", "--objective", "robust"],
     "bb:theirs (trained elsewhere) has only a triggered test set"),
])
def test_bad_flags_fail_with_one_line_naming_the_flag(tmp_path: Path, argv: list[str],
                                                      needle: str) -> None:
    with pytest.raises(USER_ERRORS) as info:
        build(tmp_path, *argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_space_file_is_checked_before_anything_runs(tmp_path: Path) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text("defense: ft\nparams:\n  nonsense: {type: float, low: 0.1, high: 1}\n")
    with pytest.raises(UsageError, match="nonsense"):
        build(tmp_path, "--defense", "ft", "--space", str(bad))


def test_existing_run_needs_resume_or_another_name(tmp_path: Path) -> None:
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r1" / "spec.json").write_text("{}")
    with pytest.raises(UsageError, match="already exists: pass --resume"):
        build(tmp_path, "--defense", "ft", "--name", "r1")


def test_resume_keeps_the_stored_search_settings(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    first = build(tmp_path, "--defense", "ft", "--name", "r1", "--num-samples", "5",
                  "--objective", "worst")
    first.run_dir.mkdir(parents=True)
    (first.run_dir / "spec.json").write_text(first.to_json())
    state = first.run_dir / "ray"  # Ray's saved state, as an interrupted search leaves it
    state.mkdir()
    (state / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    (state / "tuner.pkl").write_bytes(b"x")
    (state / "searcher-state-2026-01-01_00-00-00.pkl").write_bytes(b"x")
    again = build(tmp_path, "--defense", "ft", "--name", "r1", "--resume")
    assert again.resume and (again.num_samples, again.objective) == (5, "worst")
    assert "num_samples" in capsys.readouterr().err


def test_output_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        check_writable(blocker / "runs")
    check_writable(tmp_path / "new" / "deeper")  # a missing folder under a writable one is fine


def test_json_round_trip_and_paths_made_absolute(tmp_path: Path) -> None:
    spec = ExperimentSpec(defense="ft", output=Path("rel"), name="n", holdout_attacks=["sig"],
                          zoo=ZooSpec(attacks=["badnets"], zoo_dir=Path("zoo")))
    data = json.loads(spec.to_json())
    assert data["zoo"]["attacks"] == ["badnets"] and Path(data["output"]).is_absolute()
    assert Path(data["zoo"]["zoo_dir"]).is_absolute()
    assert ExperimentSpec.from_dict(data) == spec
    with pytest.raises(UsageError, match="unknown field"):
        ExperimentSpec.from_dict({**data, "bogus": 1})
    # a run stored before --val-epochs scored every epoch, and resumes doing so
    assert spec.val_epochs == "rungs"
    old = {k: v for k, v in data.items() if k != "val_epochs"}
    assert ExperimentSpec.from_dict(old).val_epochs == "every"


def test_frozen_and_whole_gpus_accepted() -> None:
    spec = ExperimentSpec(defense="ft", name="n", gpus_per_trial=2)
    with pytest.raises(AttributeError):
        spec.seed = 3  # type: ignore[misc]
    assert ExperimentSpec(defense="ft", name="n", gpus_per_trial=0.25).gpus_per_trial == 0.25


def test_default_name_has_defense_dataset_and_time() -> None:
    assert default_name("ngf", "digits", now=0).startswith("ngf-digits-19")


def test_address_auto_without_a_cluster_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    from tuner.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    out = tmp_path / "runs"
    assert main(["--defense", "ngf", "--address", "auto", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --address auto: no running Ray cluster found") and "\n" not in err
    assert not out.exists()


def test_address_auto_follows_rays_cluster_record(tmp_path, monkeypatch):
    from tuner.errors import UsageError
    from tuner.spec import check_reachable, resolve_auto_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    assert resolve_auto_address() == "127.0.0.1:1"
    with pytest.raises(UsageError, match="no Ray cluster answers"):
        check_reachable(resolve_auto_address(), timeout=2.0)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_auto_address() == "10.1.2.3:6379"


def test_val_subsample_flag_is_validated_before_anything_starts(tmp_path, capsys):
    from tuner.cli import main

    out = tmp_path / "runs"
    assert main(["--defense", "ngf", "--val-subsample", "0", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--val-subsample" in err and "\n" not in err and not out.exists()


# -- --storage ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "want"), [
    ("file:///shared/tune", "file:///shared/tune"), ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("gs://b", "gs://b"), ("/abs/dir", "/abs/dir")])
def test_storage_accepts_uris_and_absolute_paths(value: str, want: str) -> None:
    spec = ExperimentSpec(defense="ft", name="n", storage=value)
    assert spec.storage == want and spec.experiment_path == f"{want}/n"


@pytest.mark.parametrize(("value", "says"), [
    ("relative/dir", "a local path must be absolute"), ("file://rel/dir", "needs an absolute path"),
    ("s3://", "expected a bucket or path"), ("::/x://", "expected a URI")])
def test_storage_refuses_what_tune_cannot_use_in_one_line(value: str, says: str) -> None:
    with pytest.raises(UsageError, match=says):
        ExperimentSpec(defense="ft", name="n", storage=value)


def test_without_storage_the_experiment_stays_in_the_run_folder(tmp_path: Path) -> None:
    spec = ExperimentSpec(defense="ft", name="n", output=tmp_path)
    assert spec.experiment_path == str(tmp_path / "n" / "ray")


def test_storage_flag_reaches_the_spec_and_resume_keeps_the_stored_one(tmp_path: Path) -> None:
    stored = ExperimentSpec(defense="ft", name="n", output=tmp_path, storage="file:///a")
    given = ExperimentSpec(defense="ft", name="n", output=tmp_path, resume=True)
    assert given.resumed_from(stored).storage == "file:///a"
    assert ExperimentSpec.from_dict(stored.to_dict()).storage == "file:///a"


def test_storage_flag_from_the_command_line(tmp_path: Path) -> None:
    spec = from_args(parse("--defense", "ft", "--output", str(tmp_path), "--device", "cpu",
                           "--storage", f"file://{tmp_path}/tune"))
    assert spec.storage == f"file://{tmp_path}/tune"
