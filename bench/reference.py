"""``python -m bench reference``: the same FST run through a loop built the way published code is.

The reference follows BackdoorBench / the FST repository's structure: a ``torch.utils.data``
Dataset of PIL images whose ``__getitem__`` applies RandomCrop(32, padding=4) and ToTensor +
Normalize to each image (PIL and numpy, as torchvision's transforms do; torchvision itself does
not import next to the CPU build of torch), a DataLoader with worker processes, fp32, and an
evaluation of both test sets (10,000 clean, 9,000 triggered) after *every* epoch. The FST update
itself (CE + alpha <W, W_ori>, head-norm projection, SGD momentum 0.9, cosine per epoch) is the
same as ours, written out again here so the comparison does not share our code path.
Both runs start from the same victim and seed; their final ACC/ASR must agree within noise for
the speed-up to be an honest one.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from bench._setup import Workload
from bench.trial import run_ours
from zoo.data import DatasetInfo, Split
from zoo.models import build_model


class PILDataset(Dataset):
    """Images kept as PIL objects; per-sample transforms, as in published defense code."""

    def __init__(self, split: Split, info: DatasetInfo, train: bool) -> None:
        self.images = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in split.x]
        self.labels = split.y.tolist()
        self.train, self.pad, self.flip = train, info.pad, info.hflip
        self.mean = np.array(info.mean, dtype=np.float32)[:, None, None]
        self.std = np.array(info.std, dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def _random_crop(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        padded = Image.new(img.mode, (w + 2 * self.pad, h + 2 * self.pad))
        padded.paste(img, (self.pad, self.pad))
        i, j = random.randint(0, 2 * self.pad), random.randint(0, 2 * self.pad)
        return padded.crop((j, i, j + w, i + h))

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        img = self.images[k]
        if self.train:
            img = self._random_crop(img)
            if self.flip and random.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self.mean) / self.std), self.labels[k]


def _evaluate(model: torch.nn.Module, loader: DataLoader, target: int | None) -> float:
    model.eval()
    hit = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(1)
            hit += int((pred == (target if target is not None else y)).sum())
            total += len(y)
    model.train()
    return 100.0 * hit / total


def run_reference(w: Workload, arch: str, *, epochs: int = 10, batch_size: int = 128,
                  lr: float = 0.01, alpha: float = 0.2, workers: int = 2, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    random.seed(seed)
    model = build_model(arch, w.info)
    model.load_state_dict(w.victim)
    head = model.head
    w_ori = head.weight.detach().clone()
    c = w_ori.norm()
    bound = 1.0 / math.sqrt(head.in_features)
    torch.nn.init.uniform_(head.weight, -bound, bound)
    torch.nn.init.uniform_(head.bias, -bound, bound)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": workers > 0}
    train = DataLoader(PILDataset(w.clean, w.info, True), batch_size=batch_size, shuffle=True,
                       drop_last=True, **kw)
    test = DataLoader(PILDataset(w.test, w.info, False), batch_size=256, **kw)
    bd = DataLoader(PILDataset(w.triggered, w.info, False), batch_size=256, **kw)
    t0 = time.perf_counter()
    model.train()
    acc = asr = float("nan")
    for _ in range(epochs):
        for x, y in train:
            loss = F.cross_entropy(model(x), y) + alpha * (head.weight * w_ori).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                head.weight.mul_(c / head.weight.norm())
        sched.step()
        acc = _evaluate(model, test, None)
        asr = _evaluate(model, bd, w.target)
    return {"arch": arch, "seconds": time.perf_counter() - t0, "acc": acc, "asr": asr,
            "epochs": epochs, "workers": workers}


def compare(w: Workload, arch: str, *, epochs: int = 10, workers: int = 2,
            seed: int = 0) -> dict[str, Any]:
    """The reference loop (fp32) and ours (the product's default precision, ``auto``: bf16 on a
    CPU with native bf16) on the same victim, clean set and test sets, on CPU.

    Returns ``ours_seconds``, ``reference_seconds``, ``ratio`` (reference / ours), ``ours`` and
    ``reference`` (each ``{"acc", "asr"}``), the absolute ACC and ASR gaps and both runs.
    """
    cpu = torch.device("cpu")
    ref = run_reference(w, arch, epochs=epochs, workers=workers, seed=seed)
    ours = run_ours(w, arch, cpu, precision="auto", epochs=epochs, seed=seed)
    return _summary(ours["seconds"], ref["seconds"], ours, ref,
                    [dict(ref, loop="reference"), dict(ours, loop="ours")])


def _summary(ours_s: float, ref_s: float, ours: dict[str, Any], ref: dict[str, Any],
             runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON shape of ``compare`` and ``over_seeds``: times, ratio, ACC/ASR and their gaps."""
    ours, ref = {k: ours[k] for k in ("acc", "asr")}, {k: ref[k] for k in ("acc", "asr")}
    return {
        "ours_seconds": ours_s, "reference_seconds": ref_s, "ratio": ref_s / ours_s,
        "ours": ours, "reference": ref,
        "acc_gap": abs(ours["acc"] - ref["acc"]), "asr_gap": abs(ours["asr"] - ref["asr"]),
        "runs": runs,
    }


def over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``compare`` results of several seeds as one: seconds summed (``ratio`` is total
    reference time over total ours), ACC and ASR averaged per loop, the gaps between the means,
    and each seed's result under ``seeds``.

    One FST run's ACC moves by about a point from seed to seed, and the two loops draw their
    batches differently, so a single seed cannot tell "the same results" from noise; the means
    over a few seeds can.
    """
    def mean(loop: str, key: str) -> float:
        return sum(r[loop][key] for r in per_seed) / len(per_seed)

    out = _summary(sum(r["ours_seconds"] for r in per_seed),
                   sum(r["reference_seconds"] for r in per_seed),
                   {"acc": mean("ours", "acc"), "asr": mean("ours", "asr")},
                   {"acc": mean("reference", "acc"), "asr": mean("reference", "asr")},
                   [dict(run, seed=r["seed"]) for r in per_seed for run in r["runs"]])
    return {**out, "seeds": per_seed}
