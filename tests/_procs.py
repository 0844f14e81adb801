"""The operating system's view of a run, read from /proc (Linux), for the tests of issue 19: a
process tree, who is still alive, who holds a file in a folder, and which TCP sockets listen on
which address. Written apart from ``tuner/_reaper.py`` so the tests do not grade the reaper
with its own definitions."""

from __future__ import annotations

import ipaddress
import os
import socket
import time

Proc = tuple[int, int]  # (pid, start time): a reused pid is another process


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # [state, ppid, ..., starttime at 19]


def alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[0] not in ("Z", "X") and int(st[19]) == proc[1]


def tree(root: int) -> list[Proc]:
    """``root`` and every process below it, now."""
    kids: dict[int, list[Proc]] = {}
    for d in os.listdir("/proc"):
        st = _stat(int(d)) if d.isdigit() else None
        if st is not None and st[0] not in ("Z", "X"):
            kids.setdefault(int(st[1]), []).append((int(d), int(st[19])))
    st = _stat(root)
    out, todo = [], [(root, int(st[19]))] if st else []
    while todo:
        proc = todo.pop()
        out.append(proc)
        todo.extend(kids.get(proc[0], []))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def find(*texts: str) -> list[Proc]:
    """Live processes whose command line holds every one of ``texts``."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        st = _stat(int(d))
        line = cmdline(int(d))
        if st and st[0] not in ("Z", "X") and all(t in line for t in texts):
            out.append((int(d), int(st[19])))
    return out


def holding(folder: str) -> list[int]:
    """Live processes with a file open under ``folder`` (this user's: others' are unreadable)."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = [os.readlink(f"/proc/{d}/fd/{fd}") for fd in os.listdir(f"/proc/{d}/fd")]
        except OSError:
            continue
        st = _stat(int(d))
        if st and st[0] not in ("Z", "X") and any(x.startswith(folder + os.sep) for x in links):
            out.append(int(d))
    return out


def _sockets(pid: int) -> set[int]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.add(int(link[8:-1]))
    except OSError:
        pass
    return out


def _listening() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{name}") as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[int(f[9])] = (socket.inet_ntop(family, raw), int(hexport, 16))
    return out


def listeners(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of each TCP socket these processes listen on."""
    table = _listening()
    return sorted((pid, *table[ino]) for pid in pids for ino in _sockets(pid) if ino in table)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv6 socket's IPv4 loopback
    return (mapped or ip).is_loopback


def wait_until(condition, timeout: float, step: float = 0.2) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(step)
    return None
