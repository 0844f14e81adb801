"""``python -m tuner report RUN_DIR``: re-render a run's report from its raw files (no Ray),
optionally with other verdict thresholds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from tuner import flags
from tuner.report import write_report
from tuner.spec import ExperimentSpec

_SPEC = {f.name: f for f in ExperimentSpec.__dataclass_fields__.values()}


def _same_help(name: str) -> dict[str, object]:
    """The search flag's own help, so the two commands say the same thing."""
    return {**_SPEC[name].metadata, "default_text": "the run's own"}


@dataclass(frozen=True)
class ReportCommand:
    run_dir: Path = field(metadata={"help": "a run directory written by 'python -m tuner' "
                                            "(holds spec.json, trials.json, final.json)",
                                    "positional": True, "metavar": "RUN_DIR"})
    verdict_asr: float | None = field(default=None, metadata=_same_help("verdict_asr"))
    verdict_acc_drop: float | None = field(default=None,
                                           metadata=_same_help("verdict_acc_drop"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ReportCommand)


def main(args: argparse.Namespace) -> int:
    cmd = flags.build(ReportCommand, args)
    print(write_report(cmd.run_dir, verdict_asr=cmd.verdict_asr,
                       verdict_acc_drop=cmd.verdict_acc_drop))
    return 0
