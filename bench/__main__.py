"""``python -m bench NAME [--arch cnn|preact-resnet18] [--json FILE] [--quick]``.

Benchmarks:

- ``trial``: our trial loop (FST defaults, 2,500 clean 32x32 images, 10 epochs, then 10,000
  clean + 9,000 triggered images evaluated once): seconds, training and evaluation images/s;
  fp32 and bf16 on CPU, bf16 + channels_last and fp32 on CUDA.
- ``reference``: the published-code-style loop against ours, same work, over ``--seeds`` seeds
  (3): the ratio of their summed times, and the mean ACC/ASR of both.
- ``overhead``: the default search (``python -m tuner --defense ngf``), with the victims built
  in the run and again with them stored: the search's wall time against its trials' compute.
- ``packing``: trials per hour with 1, 2, 4 trials per GPU (needs CUDA; skipped otherwise), on
  ``--device`` for ``--arch`` (preact-resnet18: CIFAR-shaped data, 2-epoch victims).
- ``scaling``: seconds per trial against clean-set size and number of attacks.
- ``allocator``: page faults and time of training steps with and without
  ``zoo.runtime.keep_freed_memory``.
- ``gpu``: on one CUDA GPU, in at most ~8 minutes: a PreAct-ResNet18 FST trial on 10
  CIFAR-shaped victims in bf16 and fp32 (images/s, wall, synchronisations per epoch), 1/2/4
  trials packed on the GPU (throughput ratio, peak memory per trial), ACC/ASR against the CPU.
  Without CUDA it says so and exits 0.
- ``payload``: bytes each search trial unpickles (victims and splits) before and after
  ``tuner.evaluation.trial_payload``, for 10 CIFAR-shaped victims of ``--arch``.
- ``archs``: per architecture (``--archs``, default every model), the parameter count and the
  seconds of one FST epoch on 2,500 CIFAR-shaped images on the CPU, fp32 and default precision.

``--quick`` shrinks every workload to check the plumbing in seconds; its figures are not the
issue's. ``--json FILE`` writes the figures and the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from bench._setup import FULL, QUICK, Sizes, make_workload
from zoo.models import ARCHS
from zoo.runtime import Precision, keep_freed_memory, pick_device

BENCHES = ("trial", "reference", "overhead", "packing", "scaling", "allocator", "archs", "gpu", "payload")


def machine() -> dict[str, Any]:
    """Python, torch, CPU threads and cores, platform, GPU name when there is one."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "processor": platform.processor()}
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """Right-aligned text table of ``cols`` of ``rows`` (floats with 2 decimals)."""
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(cols, widths))]
    lines += ["  ".join(fmt(r.get(c, "")).rjust(wd) for c, wd in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


QUICK_VICTIM_EPOCHS = 5


def sizes_of(args: argparse.Namespace) -> Sizes:
    """The workload sizes of ``--quick`` or the issue's; ``--epochs`` replaces the epochs."""
    base = QUICK if args.quick else FULL
    return Sizes(base.n_clean, base.n_test, base.n_triggered, args.epochs or base.epochs)


def victim_epochs_of(args: argparse.Namespace) -> int | None:
    """``--victim-epochs``, else a short victim run under ``--quick``, else the recipe's."""
    return args.victim_epochs or (QUICK_VICTIM_EPOCHS if args.quick else None)


def bench_trial(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.trial import precisions, run_ours

    sizes = sizes_of(args)
    w = make_workload(args.arch, device=device, seed=args.seed, sizes=sizes,
                      victim_epochs=victim_epochs_of(args))
    rows = [run_ours(w, args.arch, device, precision=p, epochs=sizes.epochs, seed=args.seed)
            for p in (precisions(device) if args.precision == "both" else [args.precision])]
    if args.compile:
        from bench.trial import run_compiled

        p: Precision = "auto" if args.precision == "both" else args.precision  # argparse's choices
        rows += run_compiled(w, args.arch, device, precision=p, epochs=sizes.epochs, seed=args.seed)
    print(table(rows, ["arch", "device", "precision", "run", "epochs", "seconds",
                       "train_images_per_s", "eval_images_per_s", "acc", "asr"]))
    return {"bench": "trial", "sizes": vars(sizes), "runs": rows}


def bench_reference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.reference import compare, over_seeds

    cpu = torch.device("cpu")
    sizes = sizes_of(args)
    per_seed = []
    for seed in range(args.seed, args.seed + max(1, args.seeds)):
        w = make_workload(args.arch, device=cpu, seed=seed, sizes=sizes,
                          victim_epochs=victim_epochs_of(args))
        r = compare(w, args.arch, epochs=sizes.epochs, workers=args.workers, seed=seed)
        per_seed.append({**r, "seed": seed})
    out = over_seeds(per_seed)
    print(table(out["runs"], ["seed", "loop", "arch", "epochs", "seconds", "acc", "asr"]))
    print(f"over {len(per_seed)} seed(s): reference / ours = {out['ratio']:.1f}x; mean ACC "
          f"reference {out['reference']['acc']:.2f}, ours {out['ours']['acc']:.2f} "
          f"(|dACC| {out['acc_gap']:.2f}); mean ASR reference {out['reference']['asr']:.2f}, "
          f"ours {out['ours']['asr']:.2f} (|dASR| {out['asr_gap']:.2f}) points")
    return {"bench": "reference", "sizes": vars(sizes), **out}


def bench_overhead(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.overhead import run_overhead

    kw: dict[str, Any] = {"defense": args.defense, "num_samples": args.num_samples,
                          "scheduler": args.scheduler, "seed": args.seed, "zoo_dir": args.zoo_dir}
    if args.quick:
        kw.update(num_samples=min(args.num_samples, 4), attacks=("badnets",), max_epochs=1,
                  final_seeds=1, smoke_test=True)
    out = run_overhead(**kw)
    print(table(out["runs"], ["victims", "trials", "slots", "wall_seconds", "victims_seconds",
                              "search_wall_seconds", "final_seconds", "ray_wait_seconds",
                              "trial_seconds_sum", "overhead_share"]))
    for r in out["runs"]:
        print(f"Ray overhead, victims {r['victims']}: {100 * r['overhead_share']:.1f}% of the "
              "search's wall time; target <= 10%")
    return {"bench": "overhead", **out}


def bench_packing(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.overhead import run_packing

    if device.type != "cuda":
        why = "no GPU here" if not torch.cuda.is_available() else f"--device {device}"
        print(f"packing needs CUDA: {why}, nothing measured")
        return {"bench": "packing", "skipped": "no CUDA"}
    kw: dict[str, Any] = {"defense": args.defense, "scheduler": args.scheduler, "seed": args.seed,
                          "zoo_dir": args.zoo_dir, "arch": args.arch, "device": device,
                          "victim_epochs": args.victim_epochs}
    if args.quick:  # not --smoke-test: that would replace the victims' recipe
        kw.update(attacks=("badnets",), max_epochs=1, n_train=2_000, n_test=1_000)
    out = run_packing(num_samples=4 if args.quick else args.num_samples, **kw)
    print(table(out["runs"], ["trials_per_gpu", "trials", "search_wall_seconds",
                              "trials_per_hour", "overhead_share"]))
    return {"bench": "packing", **out}


def bench_scaling(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.scaling import run_scaling

    kw: dict[str, Any] = {"seed": args.seed, "victim_epochs": args.victim_epochs,
                          "zoo_dir": args.zoo_dir, "epochs": args.epochs}
    if args.quick:
        kw.update(epochs=args.epochs or 1, victim_epochs=victim_epochs_of(args),
                  counts=(1, 2), ratios=(0.01, 0.05))
    out = run_scaling(args.defense, device=device, **kw)
    print(table(out["clean_size"], ["clean_ratio", "clean_images", "epochs", "seconds",
                                    "ms_per_clean_image"]))
    print(table(out["attacks"], ["attacks", "epochs", "seconds", "seconds_per_attack"]))
    return {"bench": "scaling", **out}


def bench_allocator(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.allocator import run_allocator

    out = run_allocator()
    print(table(out["runs"], ["malloc", "applied", "faults", "seconds"]))
    return {"bench": "allocator", **out}


def bench_archs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.archs import DEFAULT_ARCHS, N_CLEAN, run_archs

    archs = tuple(a.strip() for a in args.archs.split(",")) if args.archs else DEFAULT_ARCHS
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"--archs {','.join(unknown)}: expected names from {', '.join(ARCHS)}")
    n_clean = QUICK.n_clean if args.quick else N_CLEAN
    rows = run_archs(archs, n_clean=n_clean, seed=args.seed, steps=args.steps,
                     batch_size=args.batch_size)
    print(table(rows, ["arch", "params_M", "precision", "seconds", "images_per_s", "batch_size",
                       "steps_timed", "load_1min", "cpu_share"]))
    return {"bench": "archs", "device": "cpu", "n_clean": n_clean, "epochs": 1, "runs": rows}


def bench_gpu(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.gpu import ARCH, QUICK_GPU, GpuSizes, run_gpu

    if device.type != "cuda":
        why = "no CUDA GPU on this machine" if not torch.cuda.is_available() else f"--device {device}"
        print(f"gpu: needs a CUDA GPU ({why}); nothing measured")
        return {"bench": "gpu", "skipped": f"no CUDA: {why}"}
    out = run_gpu(device, sizes=QUICK_GPU if args.quick else GpuSizes(), seed=args.seed,
                  victim_epochs=args.victim_epochs, arch=ARCH)
    print(table([r for r in out["trial"] if "seconds" in r],
                ["precision", "victims", "epochs", "seconds", "train_images_per_s",
                 "eval_images_per_s", "syncs_per_epoch"]))
    print(table([r for r in out.get("packing", []) if "wall_seconds" in r],
                ["trials", "wall_seconds", "images_per_s", "throughput_ratio",
                 "peak_memory_gb_per_trial"]))
    agreement = out["agreement"]
    if "runs" in agreement:
        print(table(agreement["runs"], ["device", "precision", "acc", "asr", "within_noise"]))
    print(f"gpu: {out['wall_seconds']:.0f} s in all")
    return {"bench": "gpu", **out}


def bench_payload(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from bench.payload import run_payload

    kw: dict[str, Any] = {"seed": args.seed, "arch": args.arch}
    if args.quick:
        kw.update(victims=2, n_train=500, n_test=200)
    out = run_payload(**kw)
    print(table([out], ["victims", "arch", "train_images", "before_bytes", "after_bytes",
                        "weights_bytes_per_victim", "saved_share"]))
    return {"bench": "payload", **out}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=BENCHES)
    p.add_argument("--arch", default="cnn", choices=("cnn", "preact-resnet18"),
                   help="trial / reference / packing: the victim's architecture")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes: check the plumbing")
    p.add_argument("--device", default="auto", help="trial / scaling / packing: cpu, cuda[:N] or auto")
    p.add_argument("--epochs", type=int, default=None,
                   help="defense epochs (trial/reference: 10, --quick 2; scaling: the defense's)")
    p.add_argument("--victim-epochs", type=int, default=None,
                   help="victim training epochs (default: the benchmark's recipe); a short "
                        "run makes preact-resnet18 affordable on CPU")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--defense", default="ngf", help="overhead / packing / scaling: the defense")
    p.add_argument("--num-samples", type=int, default=16, help="overhead / packing: trials")
    p.add_argument("--scheduler", default="asha", choices=("asha", "fifo"),
                   help="overhead / packing: the search's scheduler (default asha, as the tuner)")
    p.add_argument("--zoo-dir", default=None, help="where digits victims are stored")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--precision", default="both", choices=("both", "auto", "fp32", "bf16"),
                   help="trial: the precisions to time (default both fp32 and bf16)")
    p.add_argument("--compile", action="store_true",
                   help="trial: also run it with torch.compile (first run compiles, second "
                        "reuses the cache)")
    p.add_argument("--archs", default=None,
                   help="archs: comma-separated architectures to time (default: every model)")
    p.add_argument("--steps", type=int, default=0,
                   help="archs: time this many steps and scale to the epoch (0: all)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="archs: FST's batch size (0: the paper's 128; smaller bounds memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3,
                   help="reference: seeds --seed, --seed+1, ... (default 3); times summed, "
                        "ACC and ASR averaged, per-seed runs listed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()  # as the tool's commands and trials do (zoo.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    run = {"trial": bench_trial, "reference": bench_reference, "overhead": bench_overhead,
           "packing": bench_packing, "scaling": bench_scaling,
           "allocator": bench_allocator, "archs": bench_archs, "gpu": bench_gpu,
           "payload": bench_payload}[args.name]
    out = run(args, device)
    out["quick"] = bool(args.quick)
    out["machine"] = machine()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
