"""``python -m bench payload``: bytes each search trial unpickles, before and after
``tuner.evaluation.trial_payload``, for 10 CIFAR-shaped PreAct-ResNet18 victims.

The payload is what ``tune.with_parameters`` puts in Ray's object store and every trial
unpickles: the victims and the splits. Here: CIFAR-10's sizes (50,000 training images, 10,000
test images split into val and test, the defender's 5%), written by
``bench._setup.write_cifar_shaped`` and read as cifar10, and 10 victims with PreAct-ResNet18
weights (untrained: the size does not depend on the values) and BadNets-triggered val and test
sets. Sizes are counted by pickling into a counter, as Ray's serializer would write them.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

from bench._setup import CIFAR_TRAIN, write_cifar_shaped
from tuner.evaluation import trial_payload
from zoo.attacks import make_attack
from zoo.data import load_splits
from zoo.metrics import Metrics
from zoo.models import build_model
from zoo.victims import Victim

ARCH = "preact-resnet18"


class _Count:
    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)


def pickled_bytes(obj: Any) -> int:
    """Bytes of ``obj`` pickled at the highest protocol (tensors' storage included)."""
    sink = _Count()
    pickle.dump(obj, sink, protocol=pickle.HIGHEST_PROTOCOL)
    return sink.n


def run_payload(*, victims: int = 10, n_train: int = CIFAR_TRAIN, n_test: int = 10_000,
                arch: str = ARCH, seed: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        splits = load_splits("cifar10", data_root=write_cifar_shaped(
            Path(tmp), n_train=n_train, n_test=n_test, seed=seed), seed=seed)
    attack = make_attack("badnets", splits.info, seed=seed)
    state = build_model(arch, splits.info).state_dict()
    m = Metrics(90.0, 95.0, 3.0)
    # Each victim its own weights (a shared dict would be pickled once: pickle's memo).
    vs = [Victim(f"badnets#{i}", "cifar10", arch, splits.info, attack.target,
                 {k: t.clone() for k, t in state.items()}, attack,
                 attack.triggered(splits.val), attack.triggered(splits.test),
                 {"val": m, "test": m}, key=f"k{i}", seconds=0.0, built=True, poison_rate=0.1)
          for i in range(victims)]
    before = pickled_bytes((vs, splits))
    slim_v, slim_s = trial_payload(vs, splits)
    after = pickled_bytes((slim_v, slim_s))
    weights = pickled_bytes(state)
    return {"victims": victims, "arch": arch, "train_images": len(splits.train),
            "clean_images": len(splits.clean), "val_images": len(splits.val),
            "test_images": len(splits.test), "before_bytes": before, "after_bytes": after,
            "weights_bytes_per_victim": weights, "saved_share": 1.0 - after / before}
