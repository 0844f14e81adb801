"""Plumbing shared by the attacks whose trigger is built before training (LF, LC, TrojanNN, SSBA,
Input-aware): the "prepared" state protocol, network weights in ``state()``, progress lines,
and small image helpers. No algorithm lives here.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from zoo.attacks.base import Attack
from zoo.data import DatasetInfo
from zoo.loader import channel_stats
from zoo.progress import Progress

__all__ = ["PreparedAttack", "building_progress", "digest", "gaussian_kernel", "load_module", "module_state",
           "to_model_input"]


def digest(*tensors: torch.Tensor) -> str:
    """Short sha256 of the tensors' bytes (a trigger fingerprint for ``params()``/logs)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def to_model_input(x01: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Images in [0, 1] -> the classifier's normalized input (differentiable)."""
    mean, std = channel_stats(info.mean, info.std, x01.device, x01.dtype)
    return (x01 - mean) / std


def gaussian_kernel(sigma: float, taps: int) -> torch.Tensor:
    """A normalized 1-D Gaussian of ``taps`` taps, float32."""
    r = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return (k / k.sum()).float()


def module_state(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state_dict as flat CPU tensors named ``prefix.<name>``."""
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load the ``prefix.*`` tensors of ``state`` into ``module`` (strict); returns it in eval mode."""
    part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{prefix} weights do not fit ({first}): expected a state from the same params") from None
    return module.eval()


def building_progress(label: str, total: int, enabled: bool, unit: str = "step") -> Progress:
    """A stderr progress line for building a trigger (``building LABEL: step i/N loss L``)."""
    return Progress(label, total, enabled, verb="building", unit=unit)


class PreparedAttack(Attack):
    """An attack whose trigger tensors come from ``prepare`` (or from a stored ``state()``).

    Before ``prepare`` the attack holds a seeded *placeholder* trigger (documented per attack), so
    ``apply``/``state``/``restore`` work on any instance, but ``training_set`` (and Input-aware's
    ``fit_victim``) refuse to run: a victim is never trained on a placeholder. Shapes of the state
    may depend on the data (LC), so a restored state is checked by name only.
    """

    needs_preparation = True

    def __init__(self, info: DatasetInfo, *, target: int = 0, seed: int = 0) -> None:
        super().__init__(info, target=target, seed=seed)
        self.prepared = False

    def _require(self) -> None:
        if not self.prepared:
            raise ValueError(
                f"{self.name} trigger is not built: expected prepare() first (get_victims does it) or restore()"
            )

    def training_set(self, train: Any, *, poison_rate: float, epoch: int, seed: int) -> Any:
        self._require()
        return super().training_set(train, poison_rate=poison_rate, epoch=epoch, seed=seed)

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._state_names) - set(state)
        if missing:
            raise ValueError(f"{self.name} state lacks {sorted(missing)}: expected {list(self._state_names)}")
        for k in self._state_names:
            setattr(self, k, state[k].detach().cpu().clone())
        self.prepared = True

    def _mark_prepared(self) -> None:
        self.prepared = True

    def describe(self) -> dict[str, Any]:
        """Extra facts about the built trigger (hashes, strengths) for logs and tests."""
        return {"trigger_sha256": digest(*(getattr(self, k) for k in self._state_names))}
