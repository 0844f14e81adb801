"""``python -m tuner purify``: the defender's command. Fine-tune your own model with a defense
on your clean data and write the purified weights and a model card.

    python -m tuner purify --defense fst --params best_config.json \\
        --weights suspect.safetensors --arch resnet18 \\
        --dataset imagefolder --data-root my_clean_data/ --out purified.safetensors
    python -m tuner purify --from-run runs/fst-digits-20261130-120000 ...

The configuration is the defense's paper defaults overridden by ``--params`` (inline JSON or a
JSON file; a run's ``best_config.json`` also names the defense), or a search's best one
(``--from-run RUN_DIR``, its ``best_config.json``).

Clean data (``--dataset``):

- ``imagefolder``: ``--data-root/<class>/**/*.png`` (or .jpg, .jpeg, .ppm, .bmp), all of it
  the defender's; ``--holdout`` of each class (seeded by ``--seed``) is held out to measure
  clean accuracy, the rest fine-tunes. Classes are the folder names, sorted (torchvision's
  ImageFolder), or the numbers themselves when every folder is named by a class index.
  Images are read as RGB (``--channels 1``: greyscale) and resized to S x S, S the shorter
  side of the first image.
- ``digits``, ``mnist``, ``cifar10``, ``gtsrb``: the dataset's own split, as the search and
  ``evaluate`` use it: fine-tune on its clean share (``--clean-ratio``, class-balanced, from
  ``--seed``), measure on its test split. With the same ``--seed`` (and ``--defense-seed``),
  configuration, device and precision, ``purify`` on a zoo victim's exported weights
  (``python -m tuner zoo --export DIR``) and its triggered test half reproduces ``evaluate``'s
  numbers for that victim.

ASR and RA are measured when a triggered test set is given (``--triggered``: an ``.npz`` with
``x`` uint8 images and ``y`` true labels, or a folder ``<label>/*.png``; ``--target``): the
share of its non-target images predicted as the target, and as their true label. "Before" is
measured as the zoo measures victims (fp32 on a CPU), "after" with ``--precision``, as
``evaluate`` reports them.

Written, only after every input has been checked and the defense has finished: ``--out``
(safetensors; the input file is never modified), and beside it the model card ``OUT.json``
and ``OUT.md`` (defense, configuration and where it came from, data used with counts and a
hash, versions, seeds, wall time, metrics before and after). Bad input (weights that are not
``--arch``, a class-count mismatch, no clean images, an unreadable file, ...) is refused with
one line before training; a defense that diverges writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from defenses import REGISTRY, get_defense, make_config
from tuner import flags
from tuner._io import clip_text, read_json, write_bytes, write_text
from tuner.cmd_evaluate import parse_params
from tuner.errors import UsageError
from tuner.search import provenance
from tuner.spec import check_writable
from zoo.data import DATASETS, DatasetInfo, Split, load_splits
from zoo.external import (
    ExternalError,
    fit_state_dict,
    load_weights,
    read_folder,
    read_regular,
    read_triggered,
    sha256,
    split_sha256,
    with_normalization,
)
from zoo.metrics import evaluate, predict
from zoo.models import ARCHS, build_model
from zoo.runtime import (
    PRECISIONS,
    Precision,
    pick_device,
    prepare_model,
    reproducible_precision,
    use_bf16,
)

__all__ = ["PurifyCommand", "add_arguments", "main"]

MAX_SEED = 2**31 - 1


def _opt(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


@dataclass(frozen=True)
class PurifyCommand:
    """Every purify setting, checked on construction (no file is read here)."""

    weights: Path = field(metadata=_opt(
        "the suspect model: .safetensors, or .pt/.pth read with weights_only=True (a state_dict, "
        "or a checkpoint holding one under 'state_dict' or 'model'); never modified",
        metavar="FILE", group="model"))
    arch: str = field(metadata=_opt("the model's architecture", choices=ARCHS, group="model"))
    out: Path = field(metadata=_opt(
        "the purified weights (.safetensors); the model card goes beside it as OUT.json and "
        "OUT.md", metavar="FILE.safetensors", group="model"))
    mean: str | None = field(default=None, metadata=_opt(
        "the model's input normalization: per-channel mean in [0, 1] units, comma-separated",
        default_text="the dataset's; imagefolder: the clean images' own", group="model"))
    std: str | None = field(default=None, metadata=_opt(
        "the model's input normalization: per-channel std, comma-separated",
        default_text="the dataset's; imagefolder: the clean images' own", group="model"))
    num_classes: int | None = field(default=None, metadata=_opt(
        "the model's class count, when the clean folders (named by class index) miss a class",
        default_text="the clean data's", group="model"))
    defense: str | None = field(default=None, metadata=_opt(
        "defense to run", choices=tuple(REGISTRY), group="defense",
        default_text="the one --params or --from-run names"))
    params: str | None = field(default=None, metadata=_opt(
        "config overrides over the paper defaults: inline JSON or a JSON file (a flat object, "
        "or a run's best_config.json, which names the defense)", metavar="JSON_OR_FILE",
        group="defense"))
    from_run: Path | None = field(default=None, metadata=_opt(
        "a search's run folder: its best configuration and defense (best_config.json)",
        metavar="RUN_DIR", group="defense"))
    defense_seed: int | None = field(default=None, metadata=_opt(
        "seed of the defense's own randomness (batch order, head init)", default_text="--seed",
        group="defense"))
    dataset: str = field(default="imagefolder", metadata=_opt(
        "the clean data: imagefolder reads --data-root/<class>/ images (all yours, --holdout "
        "held out); digits, mnist, cifar10, gtsrb use the dataset's own split as the search "
        "and evaluate do (fine-tune on its clean share, measure on its test split)",
        choices=DATASETS, group="clean data"))
    data_root: Path | None = field(default=None, metadata=_opt(
        "folder of the clean data (imagefolder: one folder per class)", group="clean data"))
    channels: int = field(default=3, metadata=_opt(
        "imagefolder: the channels the model takes, 3 (images read as RGB) or 1 (greyscale)",
        group="clean data"))
    holdout: float = field(default=0.2, metadata=_opt(
        "imagefolder: share of each class held out to measure clean accuracy, in (0, 1)",
        group="clean data"))
    clean_ratio: float | None = field(default=None, metadata=_opt(
        "digits, mnist, cifar10, gtsrb: the defender's share of the training set, in (0, 1]",
        default_text="the dataset's, as in the search", group="clean data"))
    seed: int = field(default=0, metadata=_opt(
        f"seed of the data split (and of the defense unless --defense-seed), 0..{MAX_SEED}",
        group="clean data"))
    triggered: Path | None = field(default=None, metadata=_opt(
        "triggered test images to measure ASR and RA on: an .npz (x: uint8 images, y: true "
        "labels) or a folder <label>/*.png", metavar="NPZ_OR_DIR", group="clean data"))
    target: int | None = field(default=None, metadata=_opt(
        "the backdoor's target class (with --triggered)", group="clean data"))
    device: str = field(default="auto", metadata=_opt("auto (CUDA if present), cpu or cuda[:N]"))
    precision: Precision = field(default="auto", metadata=_opt(
        "auto: bf16 autocast where the hardware has native bf16, fp32 elsewhere; fp32 or bf16 "
        "to force one"))

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("weights", "out", "from_run", "data_root", "triggered"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, Path(value).expanduser().absolute())
        if self.out.suffix != ".safetensors":
            raise UsageError(f"--out {str(self.out)!r}: expected a .safetensors file name")
        if self.out == self.weights or self.out.with_suffix(".json") == self.weights:
            raise UsageError(f"--out {str(self.out)!r} would overwrite --weights: expected "
                             "another file (the input model is never modified)")
        if self.arch not in ARCHS:
            raise UsageError(f"--arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.dataset not in DATASETS:
            raise UsageError(f"--dataset {self.dataset!r}: expected one of {', '.join(DATASETS)}")
        if self.dataset != "digits" and self.data_root is None:
            raise UsageError(f"--data-root is required for --dataset {self.dataset} (the clean "
                             "images; only digits is bundled)")
        if self.params is not None and self.from_run is not None:
            raise UsageError("--params and --from-run both given: expected one source of the "
                             "configuration")
        if self.channels not in (1, 3):
            raise UsageError(f"--channels {self.channels}: expected 1 or 3")
        if not 0.0 < self.holdout < 1.0:
            raise UsageError(f"--holdout {self.holdout}: expected a number in (0, 1)")
        if self.clean_ratio is not None and not 0.0 < self.clean_ratio <= 1.0:
            raise UsageError(f"--clean-ratio {self.clean_ratio}: expected a number in (0, 1]")
        for flag, value in (("--seed", self.seed), ("--defense-seed", self.defense_seed)):
            if value is not None and not 0 <= value <= MAX_SEED:
                raise UsageError(f"{flag} {value}: expected a whole number in 0..{MAX_SEED}")
        if (self.triggered is None) != (self.target is None):
            raise UsageError("--triggered and --target go together: expected both (to measure "
                             "ASR and RA) or neither")
        if self.num_classes is not None and self.num_classes < 2:
            raise UsageError(f"--num-classes {self.num_classes}: expected at least 2")
        if (self.mean is None) != (self.std is None):
            raise UsageError("--mean and --std go together: expected both or neither")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: expected one of "
                             f"{', '.join(PRECISIONS)}")
        try:
            set_(self, "device", str(pick_device(self.device)))
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"--device {self.device!r}: {exc}") from None

    @property
    def card_paths(self) -> tuple[Path, Path]:
        return self.out.with_suffix(".json"), self.out.with_suffix(".md")

    @property
    def first_seed(self) -> int:
        return self.seed if self.defense_seed is None else self.defense_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, PurifyCommand)


# ---------------------------------------------------------------------------------------------
# The configuration and where it came from
# ---------------------------------------------------------------------------------------------


def _run_source(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """What a best_config.json says about its run (kept in the card)."""
    report = path.parent / "report.md"
    keep = ("run", "trial", "objective", "val_score", "test_score", "git_commit", "dataset",
            "arch")
    return {"kind": "run", "best_config": str(path), "run_dir": str(path.parent),
            "report": str(report) if report.is_file() else None,
            **{k: data.get(k) for k in keep}}


def resolve_config(cmd: PurifyCommand) -> tuple[str, dict[str, Any], Any, dict[str, Any]]:
    """(defense, params, config, source of the params); UsageError or ConfigError."""
    source: dict[str, Any]
    if cmd.from_run is not None:
        path = cmd.from_run / "best_config.json"
        if not path.is_file():
            raise UsageError(f"--from-run {cmd.from_run}: no best_config.json: expected a "
                             "finished search's run folder ('python -m tuner report RUN_DIR' "
                             "writes it)")
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise UsageError(f"{path}: expected an object with 'params' (a run's best config)")
        params, named = parse_params(json.dumps({"defense": data.get("defense"),
                                                 "params": data["params"]}))
        source = _run_source(path, data)
    else:
        params, named = parse_params(cmd.params)
        source = {"kind": "defaults" if cmd.params is None else "inline"}
        candidate = Path(cmd.params).expanduser() if cmd.params is not None else None
        if candidate is not None and candidate.is_file():
            data = read_json(candidate)
            source = (_run_source(candidate.absolute(), data)
                      if isinstance(data, dict) and "run" in data else
                      {"kind": "file", "path": str(candidate.absolute())})
    if cmd.defense is not None and named is not None and named != cmd.defense:
        raise UsageError(f"--defense {cmd.defense} but the configuration is a {named} one: "
                         "expected the same defense (or leave --defense out)")
    defense = cmd.defense or named
    if defense is None:
        raise UsageError("--defense is required unless --params or --from-run names one "
                         "(a run's best_config.json)")
    return defense, params, make_config(defense, params, dataset=cmd.dataset), source


# ---------------------------------------------------------------------------------------------
# Data and model, every check before training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    info: DatasetInfo
    finetune: Split
    heldout: Split
    triggered: Split | None
    state: dict[str, torch.Tensor]
    data: dict[str, Any]
    weights: dict[str, Any]


def _holdout(split: Split, share: float, seed: int) -> tuple[Split, Split]:
    """(fine-tune, held out): ``share`` of each class held out (rounded down), seeded."""
    rng = np.random.default_rng(seed)
    y = split.y.numpy()
    keep, out = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(len(idx) * share)
        out.append(idx[:k])
        keep.append(idx[k:])
    pick = [torch.from_numpy(np.sort(np.concatenate(p))).long() for p in (keep, out)]
    return split.subset(pick[0]), split.subset(pick[1])


def _folder_data(cmd: PurifyCommand) -> tuple[DatasetInfo, Split, Split, list[str]]:
    assert cmd.data_root is not None
    images, classes = read_folder(cmd.data_root, channels=cmd.channels, size=None,
                                  what="--data-root")
    if set(classes) in ({"train", "test"}, {"train", "val"}):
        raise UsageError(f"--data-root {cmd.data_root}: holds {'/'.join(sorted(classes))}/ "
                         "folders: expected one folder per class (e.g. --data-root "
                         f"{cmd.data_root / 'train'})")
    k = max(int(images.y.max()) + 1, len(classes))
    if cmd.num_classes is not None:
        if cmd.num_classes < k:
            raise UsageError(f"--num-classes {cmd.num_classes}: the clean data has labels up "
                             f"to {k - 1}: expected at least {k}")
        k = cmd.num_classes
    finetune, heldout = _holdout(images, cmd.holdout, cmd.seed)
    x = finetune.x.double() / 255.0 if len(finetune) else images.x.double() / 255.0
    size = int(images.x.shape[-1])
    info = DatasetInfo("imagefolder", cmd.channels, size, k,
                       tuple(float(v) for v in x.mean(dim=(0, 2, 3))),
                       tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3))),
                       hflip=False, pad=max(1, size // 8))
    return info, finetune, heldout, classes


def _data(cmd: PurifyCommand) -> tuple[DatasetInfo, Split, Split, dict[str, Any], list[str]]:
    """(info, fine-tune images, held-out images, what the card says, class names)."""
    if cmd.dataset == "imagefolder":
        info, finetune, heldout, classes = _folder_data(cmd)
        how = (f"{cmd.data_root}/<class>/ images: {cmd.holdout:g} of each class held out "
               f"(seed {cmd.seed}), the rest fine-tunes")
    else:
        splits = load_splits(cmd.dataset, data_root=cmd.data_root, seed=cmd.seed,
                             clean_ratio=cmd.clean_ratio)
        info, finetune, heldout = splits.info, splits.clean, splits.test
        classes = [str(i) for i in range(info.num_classes)]
        how = (f"the {cmd.dataset} dataset's own split (seed {cmd.seed}): fine-tune on its "
               "clean share, measure on its test split, as 'python -m tuner evaluate'")
    if cmd.num_classes is not None and cmd.num_classes != info.num_classes:
        raise UsageError(f"--num-classes {cmd.num_classes}: {cmd.dataset} has "
                         f"{info.num_classes} classes: expected the same")
    for what, split in (("to fine-tune on", finetune), ("held out to measure", heldout)):
        if len(split) == 0:
            raise UsageError(f"no clean images {what} in {cmd.dataset} ({cmd.data_root}): "
                             "expected more images per class or another --holdout")
    desc: dict[str, Any] = {
        "dataset": cmd.dataset, "data_root": None if cmd.data_root is None else str(cmd.data_root),
        "how": how, "seed": cmd.seed, "classes": info.num_classes,
        "finetune_images": len(finetune), "heldout_images": len(heldout),
        "sha256": split_sha256(finetune, heldout)}
    if cmd.dataset == "imagefolder":
        desc["holdout"] = cmd.holdout
    else:
        desc["clean_ratio"] = cmd.clean_ratio
    return info, finetune, heldout, desc, classes


def _normalization(cmd: PurifyCommand, info: DatasetInfo) -> DatasetInfo:
    if cmd.mean is None or cmd.std is None:
        return info
    try:
        mean = [float(v) for v in flags.parse_list(cmd.mean)]
        std = [float(v) for v in flags.parse_list(cmd.std)]
    except ValueError:
        raise UsageError(f"--mean {cmd.mean!r} --std {cmd.std!r}: expected comma-separated "
                         "numbers") from None
    return with_normalization(info, mean, std, where="--mean/--std")


def check_inputs(cmd: PurifyCommand) -> Inputs:
    """Read and check everything purify needs; nothing is written."""
    for path in (cmd.out, *cmd.card_paths):
        if path.is_symlink():
            raise UsageError(f"{path}: is a symbolic link: refusing to write through it")
        if path.exists() and not path.is_file():
            raise UsageError(f"{path}: exists and is not a file: expected a file name to write")
    check_writable(cmd.out.parent)
    info, finetune, heldout, data, classes = _data(cmd)
    info = _normalization(cmd, info)
    raw = load_weights(cmd.weights, what="--weights")
    state, renamed = fit_state_dict(raw, cmd.arch, info, where=f"--weights {cmd.weights}")
    triggered = None
    if cmd.triggered is not None and cmd.target is not None:
        if not 0 <= cmd.target < info.num_classes:
            raise UsageError(f"--target {cmd.target}: expected 0..{info.num_classes - 1}")
        triggered = read_triggered(cmd.triggered, channels=info.channels, size=info.size,
                                   num_classes=info.num_classes, what="--triggered",
                                   target=cmd.target,
                                   classes=classes if cmd.dataset == "imagefolder" else None)
    weights = {"path": str(cmd.weights), "sha256": sha256(read_regular(cmd.weights,
                                                                       what="--weights")),
               "arch": cmd.arch, "num_classes": info.num_classes,
               "renamed_by_position": renamed}
    data["normalization"] = {"mean": list(info.mean), "std": list(info.std)}
    return Inputs(info, finetune, heldout, triggered, state, data, weights)


# ---------------------------------------------------------------------------------------------
# Fine-tuning and measuring
# ---------------------------------------------------------------------------------------------


def measure(model: torch.nn.Module, inputs: Inputs, target: int | None, device: torch.device,
            precision: Precision) -> dict[str, float]:
    """ACC on the held-out clean images; ASR and RA on the triggered ones when given (the
    same ``zoo.metrics.evaluate`` as the search and ``evaluate``)."""
    if inputs.triggered is not None and target is not None:
        return evaluate(model, inputs.heldout, inputs.triggered, target, inputs.info,
                        device=device, precision=precision).as_dict()
    pred = predict(model, inputs.heldout.x, inputs.info, device=device, precision=precision)
    acc = (pred == inputs.heldout.y.to(device)).float().mean() * 100.0
    return {"acc": float(acc)}


def purify(cmd: PurifyCommand, defense: str, cfg: Any, inputs: Inputs
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a copy of the model in place; progress on stderr. UsageError on divergence."""
    device = torch.device(cmd.device)
    fresh = build_model(cmd.arch, inputs.info)
    fresh.load_state_dict(inputs.state)
    model = prepare_model(fresh, device)
    before_precision = reproducible_precision(device, cmd.precision)
    before = measure(model, inputs, cmd.target, device, before_precision)
    print(f"purify: {defense} on {cmd.arch}, {len(inputs.finetune)} clean images to fine-tune, "
          f"{len(inputs.heldout)} held out; before: {_line(before)}", file=sys.stderr, flush=True)
    start, epochs = time.perf_counter(), 0
    run = get_defense(defense).run(model, inputs.finetune, inputs.info, cfg, seed=cmd.first_seed,
                                   device=device, precision=cmd.precision)
    for result in run:
        epochs = int(result.epoch)
        if result.diverged:
            raise UsageError(f"{defense} diverged at epoch {epochs} (non-finite loss or "
                             "weights): nothing written; expected a smaller lr")
        print(f"purify: epoch {epochs}/{cfg.epochs}: loss {result.loss:.4f}, lr "
              f"{result.lr:.3g}, {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
    seconds = time.perf_counter() - start
    after = measure(model, inputs, cmd.target, device, cmd.precision)
    def name(precision: Precision) -> str:
        return "bf16" if use_bf16(device, precision) else "fp32"

    return model, {"before": before, "after": after, "epochs": epochs,
                   "defense_seconds": seconds, "before_precision": name(before_precision),
                   "after_precision": name(cmd.precision)}


def _line(m: dict[str, float]) -> str:
    return ", ".join(f"{k.upper()} {v:.2f}" for k, v in m.items())


# ---------------------------------------------------------------------------------------------
# Writing: weights, then the card
# ---------------------------------------------------------------------------------------------


def command_line(args: argparse.Namespace) -> str:
    """The purify command as the user gave it (flags in their dataclass order)."""
    parts = ["python", "-m", "tuner", "purify"]
    for f in dataclasses.fields(PurifyCommand):
        if f.name in flags.given(args, PurifyCommand):
            value = getattr(args, f.name)
            parts += [flags.flag_name(f)] if value is True else [flags.flag_name(f), str(value)]
    return shlex.join(parts)


def card(cmd: PurifyCommand, defense: str, cfg: Any, source: dict[str, Any], inputs: Inputs,
         result: dict[str, Any], out_sha: str, wall: float, command: str) -> dict[str, Any]:
    """``OUT.json``: everything needed to know what was done and to do it again."""
    prov = provenance({})
    triggered = None
    if inputs.triggered is not None:
        triggered = {"path": str(cmd.triggered), "images": len(inputs.triggered),
                     "target": cmd.target, "sha256": split_sha256(inputs.triggered)}
    return {
        "tool": "backdoor-ft-tuner purify",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "output": {"path": str(cmd.out), "sha256": out_sha},
        "input": inputs.weights,
        "defense": defense, "config": dataclasses.asdict(cfg), "config_source": source,
        "data": inputs.data, "triggered": triggered,
        "metrics": {"before": result["before"], "after": result["after"],
                    "before_precision": result["before_precision"],
                    "after_precision": result["after_precision"]},
        "epochs_run": result["epochs"],
        "seeds": {"split": cmd.seed, "defense": cmd.first_seed},
        "device": cmd.device, "precision": cmd.precision,
        "wall_seconds": wall, "defense_seconds": result["defense_seconds"],
        "versions": prov["versions"], "git_commit": prov["git_commit"],
        "git_dirty": prov["git_dirty"], "machine": prov["machine"],
        "command": command,
    }


def card_markdown(c: dict[str, Any]) -> str:
    """``OUT.md``: the card for people."""
    b, a = c["metrics"]["before"], c["metrics"]["after"]
    d, src = c["data"], c["config_source"]
    rows = [f"| clean ACC ({d['heldout_images']} held-out images) | {b['acc']:.2f} | "
            f"{a['acc']:.2f} |"]
    if c["triggered"]:
        t = c["triggered"]
        rows += [f"| ASR ({t['images']} triggered images, target {t['target']}) | "
                 f"{b['asr']:.2f} | {a['asr']:.2f} |",
                 f"| RA (true label on the same images) | {b['ra']:.2f} | {a['ra']:.2f} |"]
    origin = {"run": f"the best configuration of run `{src.get('run')}` (trial "
                     f"{src.get('trial')}, {src.get('best_config')}"
                     + (f"; report {src['report']}" if src.get("report") else "") + ")",
              "file": f"the file {src.get('path')}", "inline": "given inline",
              "defaults": "the paper defaults"}[src["kind"]]
    cfg = json.dumps(c["config"], sort_keys=True)
    return "\n".join([
        f"# Purified model: `{Path(c['output']['path']).name}`", "",
        "| metric (percent) | before | after |", "|---|---:|---:|", *rows, "",
        f"- **Defense**: {c['defense']}, {c['epochs_run']} epoch(s), configuration {origin}:",
        f"  `{cfg}`",
        f"- **Input**: {c['input']['path']} ({c['input']['arch']}, {c['input']['num_classes']} "
        f"classes, sha256 {c['input']['sha256'][:16]}...); it was not modified",
        f"- **Output**: {c['output']['path']} (sha256 {c['output']['sha256'][:16]}...)",
        f"- **Clean data**: {d['how']}; {d['finetune_images']} images fine-tuned on, "
        f"{d['heldout_images']} held out, {d['classes']} classes, sha256 {d['sha256'][:16]}...",
        f"- **Seeds**: split {c['seeds']['split']}, defense {c['seeds']['defense']}; device "
        f"{c['device']}; before measured in {c['metrics']['before_precision']}, after in "
        f"{c['metrics']['after_precision']}",
        f"- **Time**: {c['wall_seconds']:.1f} s in all, {c['defense_seconds']:.1f} s fine-tuning",
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in c["versions"].items())
        + f"; backdoor-ft-tuner {c['git_commit'] or 'unknown commit'}"
        + (" (uncommitted changes)" if c["git_dirty"] else ""),
        f"- **Command**: `{c['command']}`", ""])


def _out_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cmd = flags.build(PurifyCommand, args)
    defense, params, cfg, source = resolve_config(cmd)
    try:
        inputs = check_inputs(cmd)
    except ExternalError as exc:
        raise UsageError(clip_text(exc, 400)) from None
    for key in ("dataset", "arch"):
        ran = source.get(key)
        mine = cmd.dataset if key == "dataset" else cmd.arch
        if ran is not None and ran != mine:
            print(f"note: the configuration was tuned with {key} {ran}; this run uses "
                  f"{key} {mine}", file=sys.stderr)
    model, result = purify(cmd, defense, cfg, inputs)
    state = _out_state(model)
    if not all(math.isfinite(float(v.float().abs().max())) for v in state.values() if v.numel()):
        raise UsageError(f"{defense} left non-finite weights: nothing written")
    data = save_safetensors(state, metadata={"arch": cmd.arch, "defense": defense,
                                             "source_sha256": inputs.weights["sha256"]})
    cmd.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(cmd.out, data)
    info = card(cmd, defense, cfg, source, inputs, result, sha256(data),
                time.perf_counter() - t0, command_line(args))
    json_path, md_path = cmd.card_paths
    write_text(json_path, json.dumps(info, indent=2) + "\n")
    write_text(md_path, card_markdown(info))
    b, a = result["before"], result["after"]
    print(f"purified with {defense} in {result['defense_seconds']:.1f} s "
          f"({result['epochs']} epochs): {cmd.out}")
    print(f"  held-out clean ACC {b['acc']:.2f} -> {a['acc']:.2f} "
          f"({len(inputs.heldout)} images)"
          + (f"; ASR {b['asr']:.2f} -> {a['asr']:.2f}, RA {b['ra']:.2f} -> {a['ra']:.2f} "
             f"({len(inputs.triggered)} triggered images)" if inputs.triggered is not None
             else ""))
    print(f"  model card: {json_path}, {md_path}")
    return 0
