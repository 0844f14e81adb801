"""``python -m tuner import-backdoorbench RECORD_DIR``: keep a BackdoorBench attack record in the
victim store as victim ``bb:NAME``.

    python -m tuner import-backdoorbench record/badnet_0_1 --name badnet
    python -m tuner --defense fst --attacks bb:badnet --dataset cifar10 --data-root data/

The record's weights, its triggered test images (with their true labels) and target, and the
dataset it was trained on are stored (format and safety rules: zoo/backdoorbench.py); the clean
data still comes from ``--dataset``/``--data-root`` when the victim is used. Importing the same
NAME again points it at the new record. A record that is not plain data is refused with one
line before any of it runs; nothing is written then.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuner import flags
from zoo.backdoorbench import RECORD_FILE, default_name, import_record
from zoo.external import check_name
from zoo.store import Store

__all__ = ["ImportCommand", "add_arguments", "main"]


@dataclass(frozen=True)
class ImportCommand:
    record_dir: Path = field(metadata={
        "help": f"a BackdoorBench record folder ({RECORD_FILE} and bd_test_dataset/)",
        "positional": True, "metavar": "RECORD_DIR"})
    name: str | None = field(default=None, metadata={
        "help": "the victim's name: it is used as --attacks bb:NAME (letters, digits, '_', '.', "
                "'-')", "default_text": "the record folder's name"})
    zoo_dir: Path | None = field(default=None, metadata={
        "help": "victim store", "default_text": "$XDG_CACHE_HOME/backdoor-ft-tuner/zoo"})

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "record_dir", Path(self.record_dir).expanduser().absolute())
        if self.zoo_dir is not None:
            set_(self, "zoo_dir", Path(self.zoo_dir).expanduser().absolute())
        check_name(default_name(self.record_dir) if self.name is None else self.name, "--name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, ImportCommand)


def main(args: argparse.Namespace) -> int:
    cmd = flags.build(ImportCommand, args)
    start = time.perf_counter()
    store = Store(cmd.zoo_dir if cmd.zoo_dir is not None else Store.default_root())
    label, entry, record = import_record(cmd.record_dir, store, cmd.name)
    n = len(record.triggered)
    h, w, c = record.img_size
    dropped = sum(record.skipped.values())
    print(f"imported {label}: {record.model_name} as {record.arch}, {record.clean_data} "
          f"({h}x{w}x{c}, {record.num_classes} classes) as dataset {record.dataset}, target "
          f"{record.target}, {n} triggered test images"
          + (f" ({dropped} left out: clean or target-class)" if dropped else "")
          + f"; store {store.root}, key {entry.key} ({time.perf_counter() - start:.1f} s)")
    root = "" if record.dataset == "digits" else " --data-root DATA"
    zoo = "" if cmd.zoo_dir is None else f" --zoo-dir {cmd.zoo_dir}"
    print(f"use it: python -m tuner --defense fst --attacks {label} --dataset "
          f"{record.dataset}{root}{zoo}")
    return 0
