"""``python -m bench NAME [--arch cnn|preact-resnet18] [--json FILE]``.

Benchmarks: ``trial`` (our trial loop; fp32 and bf16 on CPU, bf16+channels_last and fp32 on
CUDA), ``reference`` (the published-code-style loop against ours, same work, ratio and ACC/ASR
of both).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from bench._setup import make_workload
from bench.reference import run_reference
from bench.trial import precisions, run_ours
from zoo.runtime import pick_device

BENCHES = ("trial", "reference")


def _machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(cols, widths))]
    lines += ["  ".join(fmt(r.get(c, "")).rjust(wd) for c, wd in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def bench_trial(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    w = make_workload(args.arch, device=device, seed=args.seed)
    rows = [run_ours(w, args.arch, device, precision=p, epochs=args.epochs) for p in precisions(device)]
    print(_table(rows, ["arch", "device", "precision", "seconds", "train_images_per_s",
                        "eval_images_per_s", "acc", "asr"]))
    return {"bench": "trial", "runs": rows}


def bench_reference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    w = make_workload(args.arch, device=torch.device("cpu"), seed=args.seed)
    ref = run_reference(w, args.arch, epochs=args.epochs, workers=args.workers, seed=args.seed)
    ours = run_ours(w, args.arch, torch.device("cpu"), precision="fp32", epochs=args.epochs,
                    seed=args.seed)
    ratio = ref["seconds"] / ours["seconds"]
    rows = [dict(ref, loop="reference"), dict(ours, loop="ours")]
    print(_table(rows, ["loop", "arch", "seconds", "acc", "asr"]))
    print(f"reference / ours = {ratio:.1f}x")
    return {"bench": "reference", "ours_seconds": ours["seconds"], "reference_seconds": ref["seconds"],
            "ratio": ratio, "ours": {"acc": ours["acc"], "asr": ours["asr"]},
            "reference": {"acc": ref["acc"], "asr": ref["asr"]}, "runs": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=BENCHES)
    p.add_argument("--arch", default="cnn", choices=("cnn", "preact-resnet18"))
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    out = {"bench_trial": bench_trial, "bench_reference": bench_reference}[f"bench_{args.name}"](args, device)
    out["machine"] = _machine()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"figures written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
