"""One session per physical machine, across processes (the CLI and the control server alike).

A machine is identified by the set of its setpoint PVs, not by its name or the path of
its machine file: two files naming the same supplies are the same machine. The lock
is an exclusive ``flock`` on a file in the data directory, so it is released by the
kernel when its holder dies (even by SIGKILL): a dead holder never blocks the machine.
The file records who holds it (pid, host, session, since when) for the refusal message.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from .paths import data_dir


class MachineBusy(RuntimeError):
    """Another live session holds the machine."""


def machine_key(setpoints: list[str]) -> str:
    """The identity of a machine: a digest of its sorted setpoint PV names."""
    return hashlib.sha256("\n".join(sorted(setpoints)).encode()).hexdigest()[:24]


def holder_id() -> str:
    """This process, as recorded with the sessions it runs: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_alive(holder: str | None) -> bool | None:
    """True/False for a holder on this host; None when it cannot be told (another host, unknown)."""
    if not holder or ":" not in holder:
        return None
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MachineLock:
    """Held while a session (or a restore) writes to a machine; ``with`` or acquire/release."""

    def __init__(self, setpoints: list[str], machine: str):
        self.key, self.machine = machine_key(setpoints), machine
        folder = data_dir() / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{self.key}.lock"
        self._fd: int | None = None

    def acquire(self, session: int | None = None, purpose: str = "session") -> "MachineLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MachineBusy(f"machine {self.machine} is in use: {self.holder_text()}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"holder": holder_id(), "session": session, "purpose": purpose, "machine": self.machine,
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())
        self._fd = fd
        return self

    def note_session(self, session: int) -> None:
        """Record the session id once it exists (the lock is taken before the session row)."""
        if self._fd is not None:
            info = self.holder_info() or {}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({**info, "session": session}).encode(), 0)

    def holder_info(self) -> dict | None:
        try:
            return json.loads(Path(self.path).read_text() or "null")
        except (OSError, ValueError):
            return None

    def holder_text(self) -> str:
        info = self.holder_info()
        if not info:
            return "held by another process"
        host, _, pid = str(info.get("holder", "?:?")).rpartition(":")
        what = f"session {info['session']}" if info.get("session") else info.get("purpose", "a session")
        return f"{what} (pid {pid} on {host}, since {info.get('since', '?')})"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "MachineLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
