import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Nothing a test does may touch the user's own store or snapshots.
if not os.environ.get("TBSAC_DATA_DIR"):
    import tempfile

    os.environ["TBSAC_DATA_DIR"] = tempfile.mkdtemp(prefix="tbsac-tests-")
os.environ.pop("TBSAC_DATABASE_URL", None)
# WOFOST crop parameters are not shipped: CI has ../shared/data beside the clone.
if not os.environ.get("TBSAC_CROP_PARAMETERS") and (ROOT.parent / "shared" / "data" / "wofost81").is_dir():
    os.environ["TBSAC_CROP_PARAMETERS"] = str(ROOT.parent / "shared" / "data" / "wofost81")


def for_setup(setup) -> tuple:
    """(task definition, setup) of a shipped setup name or a loaded setup, for Policy.load."""
    from core.registry import task_for_setup

    return task_for_setup(setup if isinstance(setup, str) else setup.name)


def policy_with_recorded_success(tmp_path, rate: float) -> str:
    """The shipped cafe2-cm1 policy, saved as if its own evaluation (50 machines, step 3000)
    had reached the target in `rate` of them."""
    from controller.policy import Policy

    policy = Policy.load("pretrained", *for_setup("cafe2-cm1"))
    policy.metadata = dict(policy.metadata, evaluation={"summary": {"success_rate": rate}, "bar_met": False},
                           training=dict(policy.metadata["training"], checkpoint_step=3000, eval_episodes=50))
    return str(policy.save(tmp_path / f"recorded-{rate}.pt"))


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


# ---------------------------------------------------------------------------
# EPICS: one loopback Channel Access port for the whole test session, chosen before
# anything starts a CA context (libca reads EPICS_CA_* once per process).
# ---------------------------------------------------------------------------
import itertools
import signal

import yaml


def _free_port() -> int:
    from hardware.ioc import free_port

    return free_port()


EPICS_PORT = _free_port()
EPICS_ENV = {
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CA_SERVER_PORT": str(EPICS_PORT),
}
os.environ.update(EPICS_ENV)
_prefixes = itertools.count(1)


class Ioc:
    """A `tbsac ioc` process on the session's loopback port, with its put log."""

    def __init__(self, tmp: Path, lattice: str = "cafe2-cm1", seed: int = 0, errors: str = "test", ramp: float = 0.0,
                 machine: str | None = None, period_s: float | None = None):
        self.lattice, self.seed, self.errors, self.ramp = lattice, seed, errors, ramp
        self.machine, self.period_s = machine or f"virtual-{lattice}", period_s
        self.prefix = f"T{next(_prefixes)}{os.getpid()}:{lattice.split('-')[-1].upper()}"
        self.put_log = tmp / f"puts-{self.prefix.replace(':', '_')}.jsonl"
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> "Ioc":
        from hardware.ioc import start_virtual_ioc

        self.proc = start_virtual_ioc(self.lattice, self.seed, self.errors, EPICS_PORT, self.ramp, self.put_log, self.prefix,
                                      period_s=self.period_s)
        return self

    def machine_file(self, name: str = "machine.yaml", min_step_interval_s: float = 0.0, **corrector_overrides) -> Path:
        """The shipped machine file for this lattice, pointed at this IOC's prefix; server-run
        auto sessions unpaced unless `min_step_interval_s` (the shipped default is 1 s)."""
        from hardware.machine import MACHINE_DIR

        text = (MACHINE_DIR / f"{self.machine}.yaml").read_text()
        default = "V" + self.lattice.upper().replace("-", ":")
        data = yaml.safe_load(text.replace(default + ":", self.prefix + ":"))
        data["min_step_interval_s"] = min_step_interval_s
        for c in data["knobs"]:
            c.update(corrector_overrides)
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def open(self, **machine_overrides):
        """This IOC's machine as `tbsac run` opens it (``controller.machines.open_machine``:
        the shipped machine file pointed at this IOC, top-level fields replaced by `machine_overrides`)."""
        from controller.machines import open_machine

        path = self.machine_file()
        if machine_overrides:
            data = yaml.safe_load(path.read_text())
            data.update(machine_overrides)
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        return open_machine(str(path))

    def puts(self, machine_only: bool = True) -> list[dict]:
        from hardware.ioc import read_put_log

        if not self.put_log.exists():
            return []
        return [p for p in read_put_log(self.put_log) if not (machine_only and ":SIM:" in p["pv"])]

    def pv(self, suffix: str) -> str:
        return f"{self.prefix}:{suffix}"

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def guarded_session(opened, policy, tmp_path: Path):
    """A session of `policy` on an opened machine through the safety layer, with the
    machine's interlocks and the policy's task's safety limits."""
    from controller.session import run_session

    return run_session(opened.plant, policy, interlocks=opened.interlocks, snapshot_path=tmp_path / "snapshot.json")


@pytest.fixture
def start_ioc(tmp_path):
    """Factory starting virtual IOCs; all are stopped after the test."""
    started: list[Ioc] = []

    def start(**kwargs) -> Ioc:
        ioc = Ioc(tmp_path, **kwargs)
        started.append(ioc)
        return ioc

    yield start
    for ioc in started:
        ioc.stop()


# ---------------------------------------------------------------------------
# Session store: SQLite always; PostgreSQL when TBSAC_TEST_POSTGRES_URL points at a
# server (`.ci/run` starts one and sets TBSAC_REQUIRE_POSTGRES=1 so it cannot be
# skipped silently there).
# ---------------------------------------------------------------------------
import uuid


def _postgres_database():
    admin_url = os.environ.get("TBSAC_TEST_POSTGRES_URL")
    if not admin_url:
        if os.environ.get("TBSAC_REQUIRE_POSTGRES"):
            pytest.fail("TBSAC_REQUIRE_POSTGRES is set but TBSAC_TEST_POSTGRES_URL is not")
        pytest.skip("no PostgreSQL server (set TBSAC_TEST_POSTGRES_URL; .ci/run does)")
    import psycopg

    name = f"tbsac_test_{uuid.uuid4().hex[:12]}"
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    return f"{base}/{name}", lambda: _drop_postgres(plain, name)


def _drop_postgres(plain_admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(plain_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.sqlite'}"
        return
    url, drop = _postgres_database()
    yield url
    drop()


@pytest.fixture
def store(store_url):
    from controller.store import Store

    s = Store(store_url)
    yield s
    s.engine.dispose()


# ---------------------------------------------------------------------------
# Control server in this process (uvicorn in a thread), for console tests.
# ---------------------------------------------------------------------------
import contextlib


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Wait until something answers HTTP at `url`."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not come up")


@contextlib.contextmanager
def control_server(store_url: str, token: str):
    """`tbsac serve`'s app on a loopback port over the store at `store_url`; yields its URL."""
    import threading

    import uvicorn

    from controller.store import Store
    from ui.server import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Store(store_url), token), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/api/health")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
