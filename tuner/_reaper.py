"""The local Ray's reaper: a small process that ``tuner.trainable.start_ray`` starts beside the
local Ray of a search, to stop what is left of that Ray when the driver dies without stopping it
(``kill -9``, the OOM killer).

Why it is needed (Ray 2.60): Ray ties its GCS, raylet and monitors to the driver (they get
SIGKILL when it dies), and the workers exit within seconds once their raylet is gone, but the
raylet's two agents (dashboard agent, runtime env agent) first report the raylet's death to the
GCS, which died too, and wait out that call's fixed 60 s deadline
(``ray/_private/process_watcher.py`` ``report_raylet_error_logs`` ->
``ray/_private/utils.py`` ``publish_error_to_driver``, ``gcs_client.publish_error(..., 60)``); no
setting shortens it.

Which processes it stops, and only those: the driver's children whose command line names the
run's Ray session folder (what ``ray.init`` started: GCS, raylet, monitors), recorded when the
reaper starts, and the Ray processes that hold a file in that folder (each keeps its logs open
there): those with a ``ray::`` process title (agents, workers) or whose environment names the
raylet (``RAY_RAYLET_PID``, which the raylet gives its agents and workers and they pass on to
their children; the agents' titles overwrite part of their environment, hence both). Never the
driver, its other children, another search's Ray or a shell reading the session's logs.

When: it checks every ``POLL_S`` whether the driver is gone. When the raylet exits
first, Ray is being stopped: it waits ``GRACE_S`` for the driver to go too (a killed driver takes
its raylet with it) and otherwise exits without stopping anything (``ray.shutdown`` stops its
own processes). It stops processes with SIGTERM, then SIGKILL for those still there after
``GRACE_S``.

Standard library only, run as a script (``python -I -S _reaper.py DRIVER_PID SESSION_DIR``): it
never imports ray, torch or the project. Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.25  # how often it looks at the driver and the raylet
GRACE_S = 2.0  # from SIGTERM to SIGKILL; also how long a gone raylet waits for its driver

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot): a pid reused is not it


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) from /proc, None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # after the command name, which may hold spaces
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _read(pid: int, name: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:  # gone, or another user's
        return []


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[0] not in ("Z", "X") and st[2] == proc[1]


def ray_children(driver: int, session: str) -> tuple[list[Proc], Proc | None]:
    """The driver's children that belong to the session, and which of them is the raylet."""
    procs, raylet = [], None
    for pid in _pids():
        st = _stat(pid)
        if st is None or st[1] != driver or pid == os.getpid():
            continue
        argv = _read(pid, "cmdline")
        if any(session.encode() in a for a in argv):
            procs.append((pid, st[2]))
            if os.path.basename(argv[0]) == b"raylet":
                raylet = (pid, st[2])
    return procs, raylet


def _holds_file_in(pid: int, folder: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder):
                return True
        except OSError:
            pass
    return False


def session_processes(recorded: list[Proc], raylet: Proc | None, session: str) -> set[Proc]:
    """What is left of the session: the recorded children still alive, and the Ray processes
    (a ``ray::`` process title, or ``RAY_RAYLET_PID`` naming the raylet in the environment)
    that hold a file in the session folder (every Ray process keeps its logs open there)."""
    left = {p for p in recorded if alive(p)}
    mark = b"RAY_RAYLET_PID=%d" % raylet[0] if raylet is not None else None
    for pid in _pids():
        st = _stat(pid)
        if pid == os.getpid() or st is None or st[0] in ("Z", "X"):
            continue
        title = (_read(pid, "cmdline") or [b""])[0]
        if ((title.startswith(b"ray::") or (mark is not None and mark in _read(pid, "environ")))
                and _holds_file_in(pid, session + os.sep)):
            left.add((pid, st[2]))
    return left


def sweep(recorded: list[Proc], raylet: Proc | None, session: str) -> None:
    """SIGTERM what is left of the session, SIGKILL what is still there ``GRACE_S`` later;
    once more for any process started meanwhile."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        procs = session_processes(recorded, raylet, session)
        if not procs:
            return
        for proc in procs:
            if alive(proc):
                try:
                    os.kill(proc[0], sig)
                except OSError:
                    pass
        deadline = time.monotonic() + GRACE_S
        while any(alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


def _wait_while(proc: Proc, seconds: float) -> bool:
    """Whether ``proc`` is still there after waiting up to ``seconds`` for it to go."""
    deadline = time.monotonic() + seconds
    while alive(proc) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return alive(proc)


def watch(driver: Proc, recorded: list[Proc], raylet: Proc | None, session: str) -> None:
    """Until the driver is gone (then sweep) or Ray stopped with the driver still there."""
    while alive(driver):
        if raylet is not None and not alive(raylet):  # Ray stopped, or is going with its driver
            if _wait_while(driver, GRACE_S):
                return  # ray.shutdown: Ray stops its own processes
            break
        time.sleep(POLL_S)
    sweep(recorded, raylet, session)


def main(argv: list[str]) -> int:
    """``_reaper.py DRIVER_PID SESSION_DIR``, started by the driver: takes note of the session's
    processes, then leaves a detached copy of itself watching them and exits at once (so the
    driver has no child to reap; it waits for this one)."""
    driver_pid, session = int(argv[1]), argv[2]
    st = _stat(driver_pid)
    if st is None:
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, a scheduler's SIGTERM
        signal.signal(sig, signal.SIG_IGN)  # or a closed terminal reach the driver; this waits
    recorded, raylet = ray_children(driver_pid, session)
    if os.fork() > 0:
        return 0
    watch((driver_pid, st[2]), recorded, raylet, session)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
