"""``python -m tuner compare --defenses ft,ftsam,...``: one search per defense with the same
victims, splits, seeds and budget, then ``compare.md``, ``compare.json`` and ``compare.png``
(:mod:`tuner.compare`). Every search flag applies to every defense; ``--budget-trials``
replaces ``--num-samples``; ``--output``/``--name``/``--resume`` name the comparison's folder.
"""

from __future__ import annotations

import argparse

from tuner import flags
from tuner.compare import CompareSpec, from_args, run_compare
from tuner.spec import ExperimentSpec

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_flags(p, CompareSpec, title="comparison")
    flags.add_flags(p, ExperimentSpec, exclude=("defense", "num_samples"))


def main(args: argparse.Namespace) -> int:
    run_compare(from_args(args))
    return 0
