"""Command line: ``python -m tuner [search flags]`` (the search) and the subcommands
``compare``, ``zoo``, ``evaluate``, ``report``, ``import-backdoorbench`` and ``purify``.

Every subcommand lives in its own module exposing ``add_arguments(parser)`` and
``main(args) -> int``. Bad input raises :class:`UsageError` (or a library error carrying the
same meaning); it is printed as one line on stderr with exit status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from typing import NoReturn

from defenses import ConfigError
from tuner.errors import UsageError
from zoo.data import DataError
from zoo.runtime import keep_freed_memory

COMMANDS = {
    "search": ("tuner.cmd_search", "run a hyperparameter search (the default command)"),
    "compare": ("tuner.cmd_compare", "search several defenses with the same victims, seeds and "
                "budget, then compare them"),
    "zoo": ("tuner.cmd_zoo", "build or load the backdoored victims and print their metrics"),
    "evaluate": ("tuner.cmd_evaluate", "run one defense configuration on every victim"),
    "report": ("tuner.cmd_report", "re-render the report of a finished run, without Ray"),
    "import-backdoorbench": ("tuner.cmd_import_backdoorbench",
                             "keep a BackdoorBench attack record as victim bb:NAME"),
    "purify": ("tuner.cmd_purify", "fine-tune your model with a defense and write the "
               "purified weights and a model card"),
}


# Bad input, printed as one line and exit status 2.
USER_ERRORS = (UsageError, DataError, ConfigError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m tuner",
        description="Hyperparameter search for fine-tuning backdoor defenses. Without a "
        "subcommand, runs the search: python -m tuner --defense ngf",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        epilog = None
        if name == "search":
            epilog = "other commands: " + "; ".join(
                f"python -m tuner {n} --help ({h})" for n, (_, h) in COMMANDS.items() if n != "search")
        # Help texts state their defaults in words; no formatter appends them a second time.
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        importlib.import_module(module).add_arguments(p)
    return parser


def _sigterm(signum: int, frame: object) -> None:
    signal.raise_signal(signal.SIGINT)  # whatever Ctrl-C does now (Tune's graceful stop, or
    # KeyboardInterrupt): the run stops cleanly and prints how to resume


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (what schedulers and ``kill`` send) is handled as Ctrl-C. Called by ``main`` and
    again by the search once Ray is up, since ``ray.init`` installs its own fatal-signal dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The search is the default command, so `python -m tuner --help` shows its flags.
    if not argv or argv[0] not in COMMANDS:
        argv = ["search", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    keep_freed_memory()  # victims, final evaluations: reuse freed activations (zoo.runtime)
    sigterm_as_ctrl_c()
    try:
        return int(module.main(args) or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
