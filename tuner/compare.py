"""The fair, tuned comparison: one search per defense, same victims, splits, seeds and budget.

``python -m tuner compare --defenses ft,ftsam,fst [--budget-trials N | --budget-seconds S]
[search flags]`` runs :func:`tuner.search.run_search` once per defense, each in its own run
folder ``OUTPUT/NAME/<defense>`` (a complete search with its own report), then writes
``compare.md``, ``compare.json`` and ``compare.png`` into ``OUTPUT/NAME``
(:mod:`tuner.report.compare`). Every search shares every setting but the defense, so the
victims are built once (the store) and the val/test split and the seeds are the same.

``--resume`` continues: a defense whose folder holds ``final.json`` is kept as it is, one with
``spec.json`` only is resumed, one without a folder is searched.

>>> CompareSpec(defenses=("ft", "lp"), budget_trials=4).defenses
('ft', 'lp')
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from defenses import REGISTRY
from tuner import flags
from tuner._io import write_json
from tuner.errors import UsageError
from tuner.spec import ExperimentSpec, check_name, check_writable, cpu_trials, victims_default, with_stored_run

__all__ = ["TIME_BUDGET_TRIALS", "CompareSpec", "Comparison", "from_args", "run_compare"]

# With a time budget only, the trial count that the time runs out before (Tune needs a count).
TIME_BUDGET_TRIALS = 1000
SPEC_FILE = "compare_spec.json"


@dataclass(frozen=True)
class CompareSpec:
    """What ``compare`` adds to the search flags: the defenses and the budget of each."""

    defenses: tuple[str, ...] = field(metadata={
        "help": "comma-separated defenses to compare, each searched with the same victims, "
                "splits, seeds and budget", "choices": tuple(REGISTRY)})
    budget_trials: int | None = field(default=None, metadata={
        "help": "trials per defense", "default_text": f"16, or up to {TIME_BUDGET_TRIALS} "
        "within --budget-seconds", "smoke": 2, "metavar": "N"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "defenses", tuple(self.defenses))
        if not self.defenses:
            raise UsageError("--defenses is empty: expected comma-separated defense names")
        for name in self.defenses:
            if name not in REGISTRY:
                raise UsageError(f"--defenses {name!r}: expected one of {', '.join(REGISTRY)}")
        twice = sorted({d for d in self.defenses if self.defenses.count(d) > 1})
        if twice:
            raise UsageError(f"--defenses names {', '.join(twice)} twice: expected each once")
        if self.budget_trials is not None and (isinstance(self.budget_trials, bool) or
                                               not isinstance(self.budget_trials, int) or
                                               self.budget_trials < 1):
            raise UsageError(f"--budget-trials {self.budget_trials!r}: expected a whole number "
                             ">= 1")


def default_compare_name(dataset: str, now: float | None = None) -> str:
    return f"compare-{dataset}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


@dataclass(frozen=True)
class Comparison:
    """The compare run: its folder and one fully checked search spec per defense."""

    root: Path
    compare: CompareSpec
    searches: list[ExperimentSpec]
    done: list[bool]  #: per defense: already complete (kept as is on --resume)


def from_args(args: argparse.Namespace) -> Comparison:
    """Build and check every search spec from the flags, before anything runs or is written."""
    smoke = bool(getattr(args, "smoke_test", False))
    cs = flags.build(CompareSpec, args, smoke=smoke)
    given_seconds = getattr(args, "budget_seconds", None)
    if hasattr(args, "budget_trials") and given_seconds is not None:
        raise UsageError(f"--budget-trials {cs.budget_trials} and --budget-seconds "
                         f"{given_seconds:g}: expected one budget, not both")
    trials = cs.budget_trials or (TIME_BUDGET_TRIALS if given_seconds is not None else 16)
    base = flags.build(ExperimentSpec, args, smoke=smoke, defense=cs.defenses[0],
                       num_samples=trials, name="base", **cpu_trials(args))
    base = dataclasses.replace(base, zoo=victims_default(base.zoo, args))
    if base.space is not None and len(cs.defenses) > 1:
        raise UsageError(f"--space {base.space}: one space file cannot serve "
                         f"{len(cs.defenses)} defenses (expected the defaults, "
                         "search_spaces/<defense>.yaml)")
    output = base.output
    name = getattr(args, "name", None) or default_compare_name(base.zoo.dataset)
    check_name(name)
    check_writable(output)
    root = output / name
    resume = base.resume
    if resume and not (root / SPEC_FILE).is_file():
        raise UsageError(f"--resume: no comparison to continue at {root} (expected the --output "
                         "and --name of an earlier compare)")
    if not resume and root.exists() and any(root.iterdir()):
        raise UsageError(f"compare folder {root} already exists: pass --resume to continue it "
                         "or choose another --name")
    searches, done = [], []
    for d in cs.defenses:
        run = root / d
        spec = dataclasses.replace(base, defense=d, output=root, name=d,
                                   resume=resume and (run / "spec.json").is_file())
        spec.check_world()
        if spec.resume:
            spec = with_stored_run(spec)
        searches.append(spec)
        done.append(resume and (run / "final.json").is_file())
    return Comparison(root, cs, searches, done)


def run_compare(c: Comparison) -> Path:
    """Run every defense's search (skipping finished ones), then write the comparison."""
    from tuner.report.compare import write_compare
    from tuner.search import run_search

    c.root.mkdir(parents=True, exist_ok=True)
    if not (c.root / SPEC_FILE).exists():
        first = c.searches[0]
        write_json(c.root / SPEC_FILE, {
            "defenses": list(c.compare.defenses), "budget_trials": first.num_samples,
            "budget_seconds": first.budget_seconds,
            "search": {k: v for k, v in first.to_dict().items()
                       if k not in ("defense", "name", "output", "resume")}})
    for spec, done in zip(c.searches, c.done, strict=True):
        if done:
            print(f"compare: {spec.defense} already searched ({spec.run_dir}), kept", flush=True)
            continue
        print(f"\ncompare: searching {spec.defense} ({c.searches.index(spec) + 1}/"
              f"{len(c.searches)})", flush=True)
        try:
            run_search(spec)
        except KeyboardInterrupt:
            print(f"compare stopped in {spec.defense}; continue it with the same command and "
                  f"--output {c.root.parent} --name {c.root.name} --resume", file=sys.stderr,
                  flush=True)
            raise
    path = write_compare(c.root)
    print(f"\ncomparison: {path}")
    print((c.root / "compare.md").read_text().split("## Ranking", 1)[-1].split("\n## ")[0])
    return path

