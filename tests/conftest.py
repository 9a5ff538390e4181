import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tbsac_cmd() -> list[str]:
    exe = shutil.which("tbsac")
    return [exe] if exe else [sys.executable, "-m", "ui.cli"]


@pytest.fixture
def run_cli():
    """Run the installed `tbsac` command; returns the CompletedProcess."""

    def run(*args: str, timeout: float = 300, cwd: Path | None = None, env: dict | None = None):
        return subprocess.run(
            [*tbsac_cmd(), *args], capture_output=True, text=True, timeout=timeout,
            cwd=cwd, env={**os.environ, **(env or {})},
        )

    return run
