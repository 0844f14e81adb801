"""bench/: each benchmark's core on tiny sizes, its JSON keys; speed-related contracts.

Everything but the overhead search runs without Ray. The CUDA-only paths (GPU memory cap, device
choice, packing) are checked on CPU with CUDA faked or absent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import defenses
from bench.__main__ import main
from bench._setup import Sizes, make_workload
from bench.overhead import summarize
from bench.reference import compare
from bench.scaling import repeat_victims, run_scaling
from bench.trial import run_ours
from tuner import evaluation
from tuner.evaluation import subsample_index, trial_epochs
from tuner.spec import ExperimentSpec
from zoo.data import Split, load_splits
from zoo.metrics import Metrics
from zoo.models import build_model

CPU = torch.device("cpu")
TINY = Sizes(n_clean=128, n_test=64, n_triggered=48, epochs=1)


@pytest.fixture(scope="module")
def workload() -> Any:
    torch.set_num_threads(1)
    return make_workload("cnn", device=CPU, sizes=TINY, victim_epochs=1, progress=False)


# -- trial and reference -----------------------------------------------------------------------
def test_trial_reports_seconds_and_throughputs(workload: Any) -> None:
    r = run_ours(workload, "cnn", CPU, precision="fp32", epochs=1)
    assert r["seconds"] > 0 and r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
    assert 0.0 <= r["acc"] <= 100.0 and 0.0 <= r["asr"] <= 100.0
    assert len(workload.test) == 64 and len(workload.triggered) == 48


@pytest.mark.slow
def test_compiled_trial_gives_the_eager_result(workload: Any) -> None:
    from bench.trial import run_compiled

    eager = run_ours(workload, "cnn", CPU, precision="fp32", epochs=1)
    first, second = run_compiled(workload, "cnn", CPU, precision="fp32", epochs=1)
    assert first["precision"] == "fp32 + compile" and first["run"] != second["run"]
    for r in (first, second):
        assert r["acc"] == pytest.approx(eager["acc"], abs=2.0) and r["seconds"] > 0


def test_reference_json_has_the_issue_keys(workload: Any) -> None:
    out = compare(workload, "cnn", epochs=1, workers=0)
    json.dumps(out)
    assert {"ours_seconds", "reference_seconds", "ratio", "ours", "reference"} <= set(out)
    assert set(out["ours"]) == set(out["reference"]) == {"acc", "asr"}
    assert out["ratio"] == pytest.approx(out["reference_seconds"] / out["ours_seconds"])


def test_reference_over_seeds_sums_times_and_averages_results() -> None:
    from bench.reference import over_seeds

    def seed(s: int, ours: float, ref: float, acc: tuple[float, float]) -> dict[str, Any]:
        return {"seed": s, "ours_seconds": ours, "reference_seconds": ref,
                "ours": {"acc": acc[0], "asr": 0.0}, "reference": {"acc": acc[1], "asr": 1.0},
                "runs": [{"loop": "reference"}, {"loop": "ours"}]}

    out = over_seeds([seed(0, 1.0, 9.0, (97.0, 98.3)), seed(1, 3.0, 27.0, (97.7, 96.4))])
    assert out["ratio"] == pytest.approx(9.0) and out["ours_seconds"] == 4.0
    assert out["ours"]["acc"] == pytest.approx(97.35) and out["reference"]["acc"] == pytest.approx(97.35)
    assert out["acc_gap"] == pytest.approx(0.0) and out["asr_gap"] == pytest.approx(1.0)
    assert [(r["seed"], r["loop"]) for r in out["runs"]] == [
        (0, "reference"), (0, "ours"), (1, "reference"), (1, "ours")]
    json.dumps(out)


def test_reference_command_runs_each_seed(tmp_path: Path) -> None:
    path = tmp_path / "reference.json"
    assert main(["reference", "--quick", "--workers", "0", "--seeds", "2", "--seed", "3",
                 "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert [s["seed"] for s in out["seeds"]] == [3, 4] and len(out["runs"]) == 4
    assert out["ratio"] == pytest.approx(out["reference_seconds"] / out["ours_seconds"])


def test_packing_without_cuda_says_so_and_exits_0(tmp_path: Path, capsys: Any) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: packing would run")
    path = tmp_path / "packing.json"
    assert main(["packing", "--json", str(path)]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["skipped"] == "no CUDA" and "machine" in data


# -- scaling -----------------------------------------------------------------------------------
def test_scaling_reports_per_unit_costs(tmp_path: Path) -> None:
    out = run_scaling("ft", device=CPU, epochs=1, victim_epochs=1, zoo_dir=str(tmp_path),
                      ratios=(0.01, 0.02), counts=(1, 3), attacks=("badnets", "blended"))
    sizes = [r["clean_images"] for r in out["clean_size"]]
    assert sizes == [10, 20]  # balanced: 1 and 2 images per class
    assert all(r["ms_per_clean_image"] > 0 for r in out["clean_size"])
    assert [r["attacks"] for r in out["attacks"]] == [1, 3]
    assert all(r["seconds_per_attack"] > 0 and r["epochs"] == 1 for r in out["attacks"])


@dataclasses.dataclass
class NamedVictim:
    attack: str


def test_repeated_victims_get_distinct_names() -> None:
    names = [v.attack for v in repeat_victims([NamedVictim("badnets"), NamedVictim("sig")], 5)]
    assert names == ["badnets", "sig", "badnets#2", "sig#2", "badnets#3"]


# -- overhead ----------------------------------------------------------------------------------
def test_overhead_figures_come_from_the_runs_timing() -> None:
    from tuner.search import timing

    cost = {"cpu_seconds": 8.0, "device_seconds": 8.0, "gpu_peak_mb": None}
    records = [{"seconds": 9.0, "state": "complete", **cost}] * 3 + [{"seconds": 9.0, "state": "pruned", **cost}]
    t = timing(wall=40.0, victims=2.0, search=19.0, final=10.0, ray_waited=1.0,
               records=[SimpleNamespace(**r) for r in records], slots=2)
    r = summarize(t, records)
    assert r["trial_seconds_sum"] == 36.0 and r["search_wall_seconds"] == 20.0
    assert (r["victims_seconds"], r["final_seconds"]) == (2.0, 10.0)
    assert r["overhead_share"] == pytest.approx(0.1)
    assert r["trials_per_hour"] == pytest.approx(720.0)
    assert r["states"] == {"complete": 3, "pruned": 1}
    assert t["trial_cpu_seconds"] == t["device_seconds"] == 32.0 and t["gpu_peak_mb"] == 0.0


@pytest.mark.ray
def test_overhead_runs_a_real_tiny_search(tmp_path: Path) -> None:
    from bench.overhead import search_timing

    r = search_timing(defense="ft", num_samples=2, attacks=("badnets",), max_epochs=1,
                      final_seeds=1, smoke_test=True, zoo_dir=str(tmp_path / "zoo"),
                      output=str(tmp_path))
    assert r["trials"] == 2 and r["trial_seconds_sum"] > 0 and r["slots"] >= 1
    assert r["wall_seconds"] >= r["search_wall_seconds"] > 0 and 0.0 <= r["overhead_share"] <= 1.0
    assert r["victims_seconds"] > 0 and r["trials_per_hour"] > 0


# -- val subsample in trial_epochs -------------------------------------------------------------
class FakeVictim:
    """What trial_epochs uses of a Victim: a random cnn; 'triggered' = the val images."""

    def __init__(self, attack: str, info: Any, bd: Split) -> None:
        self.attack, self.info, self.bd_val, self.target = attack, info, bd, 0
        self.metrics = {"val": Metrics(90.0, 95.0, 3.0)}

    def model(self, device: torch.device) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("cnn", self.info).to(device)


def test_val_subsample_is_fixed_and_the_last_epoch_uses_full_val() -> None:
    splits = load_splits("digits", seed=0)
    v = FakeVictim("badnets", splits.info, splits.val)
    kw = dict(seed=3, device=CPU, val_subsample=50)
    items = list(trial_epochs("ft", {"epochs": 3}, [v], splits, **kw))
    assert [i["val_images"] for i in items] == [100, 100, 2 * len(splits.val)]
    again = list(trial_epochs("ft", {"epochs": 3}, [v], splits, **kw))
    assert items[0]["per_attack"] == again[0]["per_attack"]  # same subset, same seed
    full = list(trial_epochs("ft", {"epochs": 3}, [v], splits, seed=3, device=CPU))
    assert [i["val_images"] for i in full] == [2 * len(splits.val)] * 3
    assert full[-1]["per_attack"] == items[-1]["per_attack"]


@pytest.mark.parametrize("defense, params", [
    ("ft", {"epochs": 4}),  # the whole model in train mode
    ("ngf", {"epochs": 4, "trainable": "last_block"}),  # the last block trains, the rest is frozen
])
def test_scored_epochs_are_the_only_ones_measured_and_training_is_unchanged(
        monkeypatch: Any, defense: str, params: dict) -> None:
    splits = load_splits("digits", seed=0)
    v = FakeVictim("badnets", splits.info, splits.val)
    every = list(trial_epochs(defense, params, [v], splits, seed=3, device=CPU))
    measured: list[int] = []
    real = evaluation._measure
    monkeypatch.setattr(evaluation, "_measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    rungs = list(trial_epochs(defense, params, [v], splits, seed=3, device=CPU, scored={2}))
    assert [i["epoch"] for i in rungs] == [2, 4] and len(measured) == 2  # the last always
    for i in rungs:  # the same model at each scored epoch as when every epoch is measured
        assert i["per_attack"] == every[i["epoch"] - 1]["per_attack"]
        assert i["loss"] == pytest.approx(every[i["epoch"] - 1]["loss"])


@pytest.mark.parametrize("max_t, planned, scheduler, want", [
    (10, 10, "asha", {2, 6, 10}), (10, 5, "asha", {2, 5}), (20, 20, "asha", {2, 6, 18, 20}),
    (4, 4, "asha", {1, 3, 4}), (10, 10, "fifo", {10}), (1, 1, "asha", {1})])
def test_scored_epochs_hold_every_asha_rung_below_the_last_epoch(max_t: int, planned: int,
                                                                 scheduler: str, want: set) -> None:
    from ray.tune.schedulers import ASHAScheduler

    from tuner import trainable  # imports ray, starts nothing
    spec = ExperimentSpec(defense="ft", name="n", scheduler=scheduler)
    assert trainable.scored_epochs(spec, planned, max_t) == want
    assert trainable.scored_epochs(dataclasses.replace(spec, val_epochs="every"), planned,
                                   max_t) is None
    grace = trainable.asha_grace(spec, max_t)
    if scheduler == "asha" and grace is not None:
        # Tune's scheduler fed every epoch, and fed the scored epochs only, records the same
        # epoch's value (value = epoch) at each rung, and stops the trial at the same epoch.
        def asha_run(epochs: Any) -> tuple[str, list[str]]:
            sched = ASHAScheduler(time_attr="epoch", metric="s", mode="max", max_t=max_t,
                                  grace_period=grace, reduction_factor=trainable.REDUCTION_FACTOR)
            trial = SimpleNamespace(trial_id="t", status="RUNNING", config={})
            sched.on_trial_add(None, trial)
            actions = [sched.on_trial_result(None, trial, {"epoch": e, "s": float(e)})
                       for e in epochs]
            return sched.debug_string(), [a for a in actions if a != "CONTINUE"]
        assert asha_run(sorted(want)) == asha_run(range(1, planned + 1))


def test_subsample_index() -> None:
    idx = subsample_index(100, 10, seed=1)
    assert idx is not None and len(idx) == 10 and len(set(idx.tolist())) == 10
    assert torch.equal(idx, subsample_index(100, 10, seed=1))
    assert subsample_index(100, None, seed=1) is None and subsample_index(10, 10, seed=1) is None
    with pytest.raises(ValueError):
        subsample_index(100, 0, seed=1)


# -- no host sync per step -----------------------------------------------------------------------
SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__")


def count_syncs(monkeypatch: Any, run: Any) -> int:
    """Calls of Tensor methods that read a value on the host while ``run()`` runs."""
    calls = [0]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapped(self: torch.Tensor, *a: Any, _f: Any = original, **k: Any) -> Any:
            calls[0] += 1
            return _f(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    run()
    monkeypatch.undo()
    return calls[0]



def _short_run(name: str, splits: Any, n_images: int) -> tuple[Any, Any]:
    """A fresh cnn and ``name``'s 2-epoch run (batch 16) on the first ``n_images`` of train."""
    clean = splits.train.subset(torch.arange(n_images))
    cfg = defenses.make_config(name, {"epochs": 2, "batch_size": 16}, dataset="digits")
    model = build_model("cnn", splits.info)
    return model, defenses.get_defense(name).run(model, clean, splits.info, cfg, seed=0, device=CPU)

@pytest.mark.parametrize("name", sorted(defenses.REGISTRY))
def test_no_host_sync_per_step(name: str, monkeypatch: Any) -> None:
    """Host reads per epoch do not grow with the number of steps (the engine's one per epoch)."""
    splits = load_splits("digits", seed=0)

    def syncs(n_images: int) -> int:
        model, gen = _short_run(name, splits, n_images)
        return count_syncs(monkeypatch, lambda: list(gen))

    assert syncs(32) == syncs(128)  # 2 vs 8 steps per epoch


FROM_PYTHON = ("tensor", "as_tensor", "from_numpy", "scalar_tensor")


def count_tensors_from_python(monkeypatch: Any, run: Any) -> int:
    """Tensors built from Python or numpy data while ``run()`` runs: on CUDA each one placed on
    the device is a blocking host-to-device copy (a synchronisation)."""
    calls = [0]
    for name in FROM_PYTHON:
        original = getattr(torch, name)

        def wrapped(*a: Any, _f: Any = original, **k: Any) -> Any:
            calls[0] += 1
            return _f(*a, **k)

        monkeypatch.setattr(torch, name, wrapped)
    run()
    monkeypatch.undo()
    return calls[0]


@pytest.mark.parametrize("name", sorted(defenses.REGISTRY))
def test_no_tensor_from_python_data_per_step(name: str, monkeypatch: Any) -> None:
    """A step builds no tensor from Python data (normalize's mean/std are cached per device):
    the count per epoch does not grow with the steps, for training and for evaluation."""
    from zoo.metrics import evaluate

    splits = load_splits("digits", seed=0)
    info = splits.info

    def built(n_images: int) -> int:
        model, gen = _short_run(name, splits, n_images)
        clean = splits.train.subset(torch.arange(n_images))
        return count_tensors_from_python(monkeypatch, lambda: (
            list(gen), evaluate(model, clean, clean, 0, info, device=CPU, batch_size=16)))

    assert built(32) == built(128)  # 2 vs 8 steps per epoch, 2 vs 8 evaluation batches


def test_normalize_stats_are_cached_per_device_and_dtype() -> None:
    from zoo.loader import channel_stats, normalize

    info = load_splits("digits", seed=0).info
    a = channel_stats(info.mean, info.std, CPU)
    assert channel_stats(info.mean, info.std, CPU) is a
    assert channel_stats(info.mean, info.std, CPU, torch.float64)[0].dtype == torch.float64
    with torch.inference_mode():  # first built under inference_mode: still a normal tensor
        b = channel_stats((0.25,), (0.5,), CPU)
    assert not b[0].is_inference()
    x = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    want = (1.0 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(normalize(x, info), torch.full((1, 1, 2, 2), want))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_cuda_batches() -> None:
    """Where CUDA exists: ``set_sync_debug_mode("error")`` turns any synchronising call while
    batches are drawn (a blocking host-to-device copy, an ``.item()``) into an error."""
    from zoo.loader import DeviceLoader

    splits = load_splits("digits", seed=0)
    dev = torch.device("cuda", torch.cuda.current_device())
    loader = DeviceLoader(splits.train.subset(torch.arange(64)), splits.info, batch_size=16,
                          device=dev, seed=0)
    next(iter(loader))  # the first batch builds normalize's mean/std on the device (one copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 4


# -- bench packing (CUDA faked) ----------------------------------------------------------------
def test_packing_sets_the_cuda_device_and_honours_arch(monkeypatch: Any, tmp_path: Path) -> None:
    """Each packed search gets a spec on the CUDA device, for --arch (preact-resnet18: the
    CIFAR-shaped data read as cifar10, short victims in a store of the bench's own), and
    that spec passes the search's own checks (check_world), which refuse GPU shares on 'cpu'."""
    import bench.__main__ as bench_main
    from bench import overhead

    specs = []

    def timing(**kw: Any) -> dict[str, Any]:
        spec = overhead.search_spec(output=tmp_path / "runs", **kw)
        spec.check_world()
        specs.append(spec)
        splits = spec.zoo.load_splits()
        assert (splits.info.name, splits.info.size, splits.info.channels) == ("cifar10", 32, 3)
        return {"trials": 4, "search_wall_seconds": 1.0, "trials_per_hour": 1.0,
                "overhead_share": 0.0}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(overhead, "search_timing", timing)
    monkeypatch.setattr(bench_main, "machine", lambda: {})  # asks the (absent) GPU its name
    assert main(["packing", "--arch", "preact-resnet18", "--quick", "--json",
                 str(tmp_path / "p.json")]) == 0
    assert [s.gpus for s in specs] == [1.0, 0.5, 0.25]
    for s in specs:
        assert (s.zoo.device, s.zoo.arch, s.zoo.dataset) == ("cuda", "preact-resnet18", "cifar10")
        assert s.zoo.recipe is not None and s.zoo.recipe.epochs == overhead.PACKING_VICTIM_EPOCHS
        assert s.zoo.zoo_dir is not None and "zoo" in s.zoo.zoo_dir.name and not s.sequela
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["arch"] == "preact-resnet18" and len(out["runs"]) == 3


def test_packing_without_cuda_says_so(capsys: Any) -> None:
    assert main(["packing", "--device", "cpu", "--quick"]) == 0
    assert "packing needs CUDA" in capsys.readouterr().out


# -- bench gpu ---------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["gpu", "--device", "cpu"], ["gpu"]])
def test_bench_gpu_on_a_cpu_machine_says_so_and_exits_0(argv: list[str], monkeypatch: Any,
                                                         tmp_path: Path, capsys: Any) -> None:
    import bench.gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench.gpu, "run_gpu", lambda *a, **k: pytest.fail("measured on a CPU"))
    assert main([*argv, "--json", str(tmp_path / "g.json")]) == 0
    assert "gpu: needs a CUDA GPU (no CUDA GPU on this machine); nothing measured" in capsys.readouterr().out
    assert json.loads((tmp_path / "g.json").read_text())["skipped"].startswith("no CUDA")


def test_bench_gpu_parts_run_on_the_cpu_with_tiny_sizes() -> None:
    """The GPU command's measurements, on the CPU at QUICK_GPU sizes with the cnn: keys and
    sanity (syncs are counted on CUDA only); the packed workload survives its file."""
    from bench.gpu import QUICK_GPU, run_gpu

    torch.set_num_threads(1)
    out = run_gpu(CPU, sizes=QUICK_GPU, arch="cnn", victim_epochs=1, packing=False)
    assert [r["precision"] for r in out["trial"]] == ["bf16", "fp32"]
    for r in out["trial"]:
        assert r["victims"] == 2 and r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0
        assert r["syncs_per_epoch"] is None
    ag = out["agreement"]
    assert [(r["device"], r["precision"]) for r in ag["runs"]] == [
        ("cpu", "fp32"), ("cpu", "fp32"), ("cpu", "bf16")]
    assert ag["runs"][1]["within_noise"] and ag["runs"][1]["acc"] == ag["runs"][0]["acc"]
    assert 0 < out["wall_seconds"]


def test_bench_gpu_workload_file_round_trip(tmp_path: Path, workload: Any) -> None:
    from bench.gpu import _load, _save

    val = (workload.test, workload.triggered)
    _save(str(tmp_path / "w.pt"), workload, val)
    w, (vc, vt) = _load(str(tmp_path / "w.pt"))
    assert w.info == workload.info and w.target == workload.target
    assert torch.equal(w.clean.x, workload.clean.x) and torch.equal(vt.y, workload.triggered.y)
    assert all(torch.equal(w.victim[k], workload.victim[k]) for k in workload.victim)


# -- trial payload -----------------------------------------------------------------------------
def _victim(splits: Any, name: str = "badnets") -> Any:
    from zoo.attacks import make_attack
    from zoo.victims import Victim

    torch.manual_seed(0)
    attack = make_attack("badnets", splits.info, seed=0)
    m = Metrics(90.0, 95.0, 3.0)
    return Victim(name, "digits", "cnn", splits.info, 0, build_model("cnn", splits.info).state_dict(),
                  attack, attack.triggered(splits.val), attack.triggered(splits.test),
                  {"val": m, "test": m}, key="k", seconds=0.0, built=True, poison_rate=0.1)


def test_trial_payload_drops_what_trials_do_not_use_and_scores_the_same() -> None:
    from tuner.evaluation import trial_payload

    splits = load_splits("digits", seed=0)
    victims = [_victim(splits)]
    slim_v, slim_s = trial_payload(victims, splits)
    assert len(slim_s.train) == 0 and len(slim_s.test) == 0 and len(slim_v[0].bd_test) == 0
    assert slim_v[0].attack_obj is None and slim_v[0].state_dict is victims[0].state_dict
    assert len(victims[0].bd_test) > 0 and len(splits.train) > 0  # the driver's copies intact
    kw = dict(seed=1, device=CPU)
    full = list(trial_epochs("ft", {"epochs": 2}, victims, splits, **kw))
    slim = list(trial_epochs("ft", {"epochs": 2}, slim_v, slim_s, **kw))
    assert [i["per_attack"] for i in full] == [i["per_attack"] for i in slim]
    same_v, same_s = trial_payload(victims, splits, retune=True)  # the robust objective
    assert same_s is splits and same_v[0] is victims[0]


def test_payload_bench_counts_bytes_before_and_after(tmp_path: Path) -> None:
    assert main(["payload", "--quick", "--arch", "cnn", "--json", str(tmp_path / "p.json")]) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["victims"] == 2 and 0 < out["after_bytes"] < out["before_bytes"]


# -- GPU memory cap and device choice (CUDA faked) -------------------------------------------
def test_trial_caps_gpu_memory_at_its_share_and_picks_cuda(monkeypatch: Any) -> None:
    from tuner import trainable  # imports ray, starts nothing

    capped, seen = [], {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=None: capped.append((f, torch.device(d).type)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 3 * 2**20)
    reports: list[dict] = []
    monkeypatch.setattr(trainable.tune, "report", reports.append)
    monkeypatch.setattr(trainable.ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_node_id=lambda: "n"))

    def epochs_fn(defense: str, params: dict, victims: list, splits: Any, *,
                  device: torch.device, **kw: Any) -> Any:
        seen["device"] = device
        yield {"epoch": 1, "diverged": False,
               "per_attack": {"badnets": {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 90.0}}}

    before = torch.get_num_threads()
    try:
        for gpus, want_cap, want_dev in ((0.25, [(0.25, "cuda")], "cuda"), (1.0, [], "cuda"),
                                         (0.0, [], "cpu")):
            capped.clear()
            spec = ExperimentSpec(defense="ft", name="n", max_epochs=1, gpus_per_trial=gpus)
            trainable.trial({}, spec=spec, victims=[], splits=None, epochs_fn=epochs_fn)
            assert capped == want_cap and seen["device"].type == want_dev
            # the cost a CUDA trial reports carries its peak memory; a CPU trial's does not
            assert (reports[-1].get("gpu_peak_mb") == 3.0) == (want_dev == "cuda")
    finally:
        torch.set_num_threads(before)


def test_trial_passes_val_subsample_to_the_epoch_loop(monkeypatch: Any) -> None:
    from tuner import trainable  # imports ray, starts nothing

    seen: dict[str, Any] = {}
    monkeypatch.setattr(trainable.tune, "report", lambda m: None)
    monkeypatch.setattr(trainable.ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_node_id=lambda: "n"))

    def epochs_fn(defense: str, params: dict, victims: list, splits: Any, **kw: Any) -> Any:
        seen.update(kw)
        yield {"epoch": 1, "diverged": False,
               "per_attack": {"badnets": {"acc": 90.0, "asr": 5.0, "ra": 80.0, "der": 90.0}}}

    spec = ExperimentSpec(defense="ft", name="n", max_epochs=1, val_subsample=64)
    before = torch.get_num_threads()
    try:
        trainable.trial({}, spec=spec, victims=[], splits=None, epochs_fn=epochs_fn)
        assert seen["val_subsample"] == 64 and seen["max_epochs"] == 1
        seen.clear()
        trainable.trial({}, spec=dataclasses.replace(spec, val_subsample=None), victims=[],
                        splits=None, epochs_fn=epochs_fn)
        assert seen["val_subsample"] is None
    finally:
        torch.set_num_threads(before)
