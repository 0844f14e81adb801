"""Flags shared by several subcommands, declared once, and their validation.

Each ``add_*`` function adds a group of flags; ``check_common`` validates their values before
anything is built, trained or started, raising :class:`tuner.errors.UsageError`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tuner.errors import UsageError

DEFAULT_SEARCH_ATTACKS = "badnets,blended,wanet,sig"


def add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and victims")
    g.add_argument("--dataset", default="digits",
                   help="digits (bundled, default), mnist, cifar10, gtsrb or imagefolder")
    g.add_argument("--data-root", type=Path, default=None,
                   help="folder holding the dataset files (not needed for digits)")
    g.add_argument("--download", action="store_true",
                   help="mnist, cifar10, gtsrb: fetch the files into --data-root with "
                        "torchvision's downloaders when they are not there (needs the "
                        "torchvision extra and a network)")
    g.add_argument("--arch", default="cnn", help="victim model: cnn (default) or preact-resnet18")
    g.add_argument("--poison-rate", type=float, default=None,
                   help="share of the training set the attacker poisons, in (0, 1), for every "
                        "attack (default 0.1, or an attack's documented default on the dataset: "
                        "sig and lc use 0.08 on digits, see the README)")
    g.add_argument("--clean-ratio", type=float, default=None,
                   help="defender's clean share of the training set (default: per dataset, "
                        "0.1 for digits, 0.05 elsewhere)")
    g.add_argument("--seed", type=int, default=0, help="seed for splits, victims and search (default 0)")
    g.add_argument("--zoo-dir", type=Path, default=None,
                   help="victim store (default: $XDG_CACHE_HOME/backdoor-ft-tuner/zoo)")
    g.add_argument("--blend-image", type=Path, default=None,
                   help="image file for the Blended trigger (default: a seeded noise pattern)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto (default): bf16 autocast where the hardware has native bf16 (CUDA, "
                        "or a CPU with AMX/AVX512-BF16), fp32 elsewhere; fp32 or bf16 to force one")


def zoo_spec(args: argparse.Namespace) -> Any:
    """The ``zoo.victims.ZooSpec`` that the shared flags describe."""
    from zoo.victims import ZooSpec

    return ZooSpec(dataset=args.dataset, arch=args.arch, poison_rate=args.poison_rate, seed=args.seed,
                   data_root=args.data_root, zoo_dir=args.zoo_dir, blend_image=args.blend_image,
                   precision=args.precision)


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def check_common(args: argparse.Namespace, attack_lists: tuple[str, ...] = ("attacks",)) -> None:
    """Validate the shared flags; raises UsageError naming the value and what was expected."""
    from zoo.attacks import ATTACKS
    from zoo.data import DATASETS
    from zoo.models import ARCHS

    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    if args.arch not in ARCHS:
        raise UsageError(f"unknown model {args.arch!r}: expected one of {', '.join(ARCHS)}")
    if args.poison_rate is not None and not 0.0 < args.poison_rate < 1.0:
        raise UsageError(f"--poison-rate {args.poison_rate}: expected a number in (0, 1)")
    if args.clean_ratio is not None and not 0.0 < args.clean_ratio <= 1.0:
        raise UsageError(f"--clean-ratio {args.clean_ratio}: expected a number in (0, 1]")
    if args.dataset != "digits" and args.data_root is None:
        raise UsageError(f"--data-root is required for dataset {args.dataset!r} (only digits is bundled)")
    if args.blend_image is not None and not args.blend_image.is_file():
        raise UsageError(f"--blend-image {str(args.blend_image)!r} is not a file")
    for attr in attack_lists:
        names = getattr(args, attr)
        if isinstance(names, str):
            names = parse_list(names)
            setattr(args, attr, names)
        for name in names:
            if name not in ATTACKS:
                raise UsageError(f"unknown attack {name!r} in --{attr.replace('_', '-')}: "
                                 f"expected any of {', '.join(ATTACKS)}")
    try:
        from zoo.runtime import pick_device
        args.device = pick_device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
