"""``python -m tuner report RUN_DIR``: re-render a run's report from its raw files (no Ray)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run directory written by 'python -m tuner' (holds spec.json, "
                             "trials.json, final.json)")


def main(args: argparse.Namespace) -> int:
    from tuner.report import write_report

    path = write_report(args.run_dir)
    print(path)
    return 0
