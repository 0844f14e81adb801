"""``python -m tuner report RUN_DIR``: re-render a run's report from its raw files (no Ray)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from tuner import flags
from tuner.report import write_report


@dataclass(frozen=True)
class ReportCommand:
    run_dir: Path = field(metadata={"help": "a run directory written by 'python -m tuner' "
                                            "(holds spec.json, trials.json, final.json)",
                                    "positional": True, "metavar": "RUN_DIR"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ReportCommand)


def main(args: argparse.Namespace) -> int:
    cmd = flags.build(ReportCommand, args)
    print(write_report(cmd.run_dir))
    return 0
