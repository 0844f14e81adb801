"""``python -m tuner --defense NAME``: the search (the default command).

Builds or loads the victims, runs the Ray Tune + Optuna search on the validation split,
re-evaluates the best and the paper-default configurations on the test split, and writes the
report into ``OUTPUT/NAME``. ``--resume`` with the same ``--output`` and ``--name`` continues
an interrupted run. Every flag comes from :class:`tuner.spec.ExperimentSpec`.
"""

from __future__ import annotations

import argparse

from tuner import flags
from tuner.search import run_search
from tuner.spec import ExperimentSpec, from_args

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_flags(p, ExperimentSpec)


def main(args: argparse.Namespace) -> int:
    run_search(from_args(args))
    return 0
