"""``python -m bench allocator``: what ``zoo.runtime.keep_freed_memory`` saves.

Two fresh processes each run the same cnn training steps at batch 256 on 32x32 images (32 MiB
of activations a step): one with glibc's default malloc settings, one after
``keep_freed_memory()``. Each reports the page faults (``ru_minflt``) of 5 steps after 3
warm-up steps, and their wall time. By default glibc maps every block above 32 MiB afresh and
unmaps it on free, so each step faults its activations in page by page; kept, it reuses them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_STEPS = """
import json, resource, sys, time
import torch
from torch.nn import functional as F
from zoo.data import DatasetInfo
from zoo.models import build_model
from zoo.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
torch.set_num_threads(1)
info = DatasetInfo("toy", 3, 32, 10, (0.5,) * 3, (0.5,) * 3, hflip=False, pad=4)
model = build_model("cnn", info)
x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
def step():
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
for _ in range(3):
    step()
faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                  - faults, "seconds": time.perf_counter() - t}))
"""


def run_allocator() -> dict[str, Any]:
    rows = []
    for mode in ("plain", "keep"):
        out = subprocess.run([sys.executable, "-c", _STEPS, mode], check=True, text=True,
                             capture_output=True, cwd=ROOT).stdout
        rows.append({"malloc": mode, **json.loads(out.strip().splitlines()[-1])})
    return {"runs": rows}
