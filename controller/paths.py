"""Where tbsac keeps its files: ``$TBSAC_DATA_DIR`` or ``~/.local/share/tbsac``."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    base = os.environ.get("TBSAC_DATA_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "tbsac"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def snapshot_dir() -> Path:
    path = data_dir() / "snapshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def unique_snapshot_path(machine: str, session_id: int | str) -> Path:
    """Where a session keeps its starting settings: one file per session, never shared.

    `machine` is a validated machine name (letters, digits, '.', '_', '-'), so the path
    stays inside the snapshot directory.
    """
    return snapshot_dir() / f"{machine}-session{session_id}.json"
