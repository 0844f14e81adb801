"""``python -m tuner --defense NAME``: the search (the default command).

Builds or loads the victims, runs the Ray Tune + Optuna search on the validation split,
re-evaluates the best and the paper-default configurations on the test split, and writes the
report into ``OUTPUT/NAME``. ``--resume`` with the same ``--output`` and ``--name`` continues
an interrupted run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tuner._flags import add_data_flags

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Flags whose default depends on --smoke-test use SUPPRESS: their help states both values.
    from defenses import REGISTRY

    S = argparse.SUPPRESS
    p.add_argument("--defense", required=True, default=S,
                   help=f"defense to tune: {', '.join(REGISTRY)} (see defenses/)")
    add_data_flags(p)
    g = p.add_argument_group("attacks")
    g.add_argument("--attacks", default=S,
                   help="comma-separated attacks the search optimizes over "
                        "(default badnets,blended,wanet,sig; badnets with --smoke-test)")
    g.add_argument("--holdout-attacks", default=S,
                   help="comma-separated attacks never seen by the search, only in the final "
                        "test evaluation (default: none)")
    g = p.add_argument_group("search")
    g.add_argument("--objective", default="mean", choices=("mean", "worst", "der", "pareto"),
                   help="mean: mean over attacks of ACC-ASR; worst: its minimum; der: mean DER; "
                        "pareto: two objectives, ACC up and ASR down (default mean)")
    g.add_argument("--num-samples", type=int, default=S,
                   help="number of configurations to try, the paper default first "
                        "(default 16; 2 with --smoke-test)")
    g.add_argument("--max-concurrent", type=int, default=S,
                   help="most trials at once (default: as many as the CPUs/GPUs fit)")
    g.add_argument("--scheduler", default="asha", choices=("asha", "fifo"),
                   help="asha stops poor trials early (reported to Optuna as pruned); "
                        "fifo runs every trial to the end (default asha)")
    g.add_argument("--max-epochs", type=int, default=S,
                   help="cap on each trial's fine-tuning epochs (default: the defense's "
                        "configured epochs; 1 with --smoke-test)")
    g.add_argument("--val-subsample", type=int, default=S, metavar="N",
                   help="score epochs before a trial's last on a fixed, seeded subset of N clean "
                        "and N triggered val images per attack (cheaper early ASHA rungs); the "
                        "last epoch always uses all of val (default: all of val every epoch)")
    g.add_argument("--space", type=Path, default=S,
                   help="search-space YAML file (default: search_spaces/<defense>.yaml)")
    g.add_argument("--final-seeds", type=int, default=S,
                   help="seeds for the final test evaluation of the best and default "
                        "configurations: seed..seed+N-1 (default 3; 1 with --smoke-test)")
    g = p.add_argument_group("resources and cluster")
    g.add_argument("--gpus-per-trial", type=float, default=S,
                   help="GPU share per trial; 0.25 packs four trials per GPU, whole numbers "
                        "for several GPUs (default 0.25 with a local GPU, else 0: CPU trials)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0,
                   help="CPU cores per trial; also its torch thread count (default 1)")
    g.add_argument("--address", default=S,
                   help="join a running Ray cluster: 'auto' or HOST:PORT (default: start a "
                        "local Ray that stops with the run)")
    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, default=Path("runs"),
                   help="parent folder of run folders (default runs)")
    g.add_argument("--name", default=S,
                   help="run folder name (default <defense>-<dataset>-<YYYYmmdd-HHMMSS>)")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run OUTPUT/NAME (needs --name); finished "
                        "trials are kept, the total stays --num-samples")
    g.add_argument("--smoke-test", action="store_true",
                   help="tiny, fast run for CI: 2 trials of 1 epoch, badnets only, 1 final seed, "
                        "victims trained for 5 epochs (stored apart from the real ones)")


def main(args: argparse.Namespace) -> int:
    from tuner.search import run_search
    from tuner.spec import from_args

    spec = from_args(args)
    run_search(spec)
    return 0
