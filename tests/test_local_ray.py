"""A search's own local Ray (issue 19): it listens on loopback only, as the operating system's
socket table shows. Linux: the tests read /proc (``tests/_procs.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _procs
import pytest

from tuner._ray_compat import LOOPBACK_ENV

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--defense", "ft", "--smoke-test", "--num-samples", "30", "--max-concurrent", "1"]
# The search with Ray as it was before issue 19 (its choice of address, all interfaces here).
EXPOSED = (f"import os, sys\nos.environ.pop({LOOPBACK_ENV!r}, None)\n"
           "from tuner import _ray_compat\n"
           "_ray_compat.keep_local_ray_on_loopback = lambda: None\n"
           "from tuner.cli import main\nsys.exit(main())\n")


# -- the checks themselves, on sockets and processes made here (no Ray) -------------------------
def test_listener_check_tells_all_interfaces_from_loopback() -> None:
    code = ("import socket, time\n"
            "def listen(family, host):\n"
            "    try:\n"
            "        s = socket.socket(family)\n"
            "        s.bind((host, 0))\n"
            "        s.listen()\n"
            "        return s\n"
            "    except OSError:\n"
            "        return None\n"
            "socks = [listen(socket.AF_INET, '0.0.0.0'), listen(socket.AF_INET, '127.0.0.1'),\n"
            "         listen(socket.AF_INET6, '::'), listen(socket.AF_INET6, '::1')]\n"
            "print(*[s.getsockname()[1] if s else -1 for s in socks], flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ports = [int(p) for p in proc.stdout.readline().split()]
        found = {port: address for _, address, port in _procs.listeners([proc.pid])}
    finally:
        proc.kill()
        proc.wait()
    expected = dict(zip(ports, ["0.0.0.0", "127.0.0.1", "::", "::1"]))
    assert found == {p: a for p, a in expected.items() if p > 0}
    assert {a: _procs.is_loopback(a) for a in found.values()} == {
        a: a in ("127.0.0.1", "::1") for a in found.values()}
    assert _procs.is_loopback("::ffff:127.0.0.1") and not _procs.is_loopback("::ffff:192.0.2.2")


# -- a real search ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One zoo for the searches below: the smoke victims are trained once."""
    return tmp_path_factory.mktemp("zoo")


def _search(tmp_path: Path, zoo: Path, log: Path, *, exposed: bool = False) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    head = [sys.executable, "-c", EXPOSED] if exposed else [sys.executable, "-m", "tuner"]
    with log.open("w") as fh:
        return subprocess.Popen([*head, *SMOKE, "--output", str(tmp_path / "runs"), "--name", "t",
                                 "--zoo-dir", str(zoo)], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_trials(proc: subprocess.Popen, log: Path, done: int) -> None:
    deadline = time.monotonic() + 240
    while f"done ({done:>3}/" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Ctrl-C: the search stops its Ray
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("exposed", [False, True], ids=["loopback", "all-interfaces-on-purpose"])
def test_local_search_listens_on_loopback_only(tmp_path: Path, smoke_zoo: Path,
                                               exposed: bool) -> None:
    """Every listening socket of the search's processes (driver, GCS, raylet, workers, runtime
    env agent), mid-search, from /proc/net/tcp{,6}; with Ray left to choose (on purpose) some
    listen beyond loopback, which the check sees, and the search says so."""
    log = tmp_path / "log.txt"
    proc = _search(tmp_path, smoke_zoo, log, exposed=exposed)
    try:
        _wait_for_trials(proc, log, 2)
        procs = _procs.tree(proc.pid)
        found = _procs.listeners([pid for pid, _ in procs])
        names = {pid: _procs.cmdline(pid) for pid, _ in procs}
    finally:
        _stop(proc)
    listed = "\n".join(f"{addr}:{port} {names[pid][:60]}" for pid, addr, port in found)
    outside = [(pid, addr) for pid, addr, _ in found if not _procs.is_loopback(addr)]
    if exposed:
        assert outside, listed
        assert "warning: the local Ray listens on all interfaces" in log.read_text()
        return
    kinds = {"driver": proc.pid, "gcs": "gcs_server", "raylet": "/raylet ",
             "runtime env agent": "ray::RuntimeEnvAgent", "trial": "ray::ImplicitFunc"}
    listening = {k: any(pid == w if isinstance(w, int) else w in names[pid] for pid, *_ in found)
                 for k, w in kinds.items()}
    assert all(listening.values()), (listening, listed)
    assert outside == [], listed
    assert "listens on all interfaces" not in log.read_text()
