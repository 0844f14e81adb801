import os

import pytest
import torch

from tuner._ray_compat import keep_local_ray_on_loopback

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Before any test module imports ray (Ray reads it then): the local Rays of the tests listen on
# loopback only, as a search's does (tuner._ray_compat).
keep_local_ray_on_loopback()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test writes to the user's cache: the default zoo store lives in a temp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tiny models: one thread avoids OpenMP spin-waiting on a shared, loaded machine."""
    torch.set_num_threads(1)
