"""Virtual accelerator: a real EPICS IOC (softioc) serving a simulated cryomodule.

The machine behind the PVs has hidden errors drawn from an error model (misalignments,
solenoid and corrector-scale errors, BPM noise), and its correctors are wired with the
per-magnet polarity of :func:`corrector_polarity` and 1.85 A per simulator unit, like
the machine in the TBSAC paper; a machine file must state that polarity and scale to
drive it. Every put the IOC receives is appended to a JSON-lines log.

PV names (``P`` = prefix, e.g. ``VCAFE2:CM1``)::

    P:<corrector>:I_SET   setpoint, A (DRVL/DRVH set; put completes when the ramp ends)
    P:<corrector>:I_RB    readback, A
    P:<bpm>:X, P:<bpm>:Y  orbit, mm, refreshed at 10 Hz with noise
    P:BEAM:I              beam current after the cryomodule, uA
    P:MPS:OK              1 while the machine protection system permits beam
    P:SIM:BPM_FAULT       fault injection on the first BPM's X: 0 none, 1 NaN,
                          2 saturated, 3 INVALID severity, 4 frozen (stale timestamp)
    P:SIM:BEAM_LOSS       fault injection: 1 scrapes 80 % of the beam
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

AMPS_PER_UNIT = 1.85
NOMINAL_CURRENT_UA = 10.0
BPM_RANGE_MM = 20.0
BPM_RATE_HZ = 10.0


def corrector_polarity(index: int) -> int:
    """Wiring polarity of corrector `index` on the virtual machines (as 'measured')."""
    return -1 if index % 3 == 1 else 1


def default_prefix(lattice_name: str) -> str:
    """``cafe2-cm1`` -> ``VCAFE2:CM1``."""
    return "V" + lattice_name.upper().replace("-", ":")


def loopback_environment(port: int) -> dict[str, str]:
    """EPICS_CA_* settings a client needs to reach an IOC on loopback `port`."""
    return {
        "EPICS_CA_ADDR_LIST": "127.0.0.1",
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
        "EPICS_CA_SERVER_PORT": str(port),
    }


def free_port() -> int:
    """A loopback port free for both TCP and UDP (Channel Access uses both)."""
    import socket

    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def start_virtual_ioc(lattice: str, seed: int, errors: str, port: int, ramp_s: float = 0.2,
                      put_log: Path | None = None, prefix: str | None = None, env: dict | None = None,
                      timeout_s: float = 60.0):
    """`tbsac ioc` as a background process; returns the Popen once it printed READY."""
    import subprocess

    cmd = [sys.executable, "-m", "ui.cli", "ioc", "--lattice", lattice, "--seed", str(seed), "--errors", errors,
           "--port", str(port), "--ramp", str(ramp_s)]
    if put_log:
        cmd += ["--put-log", str(put_log)]
    if prefix:
        cmd += ["--prefix", prefix]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"virtual IOC for {lattice} did not start (exit code {proc.poll()})")


def _server_environment(port: int) -> None:
    os.environ.update(
        EPICS_CAS_INTF_ADDR_LIST="127.0.0.1",
        EPICS_CAS_SERVER_PORT=str(port),
        EPICS_CAS_BEACON_ADDR_LIST="127.0.0.1",
        EPICS_CAS_AUTO_BEACON_ADDR_LIST="NO",
        **loopback_environment(port),
    )


class PutLog:
    """Append-only JSON-lines record of every put the IOC receives."""

    def __init__(self, path: Path | None):
        self._file = open(path, "a", buffering=1) if path else None
        self._lock = threading.Lock()

    def record(self, pv: str, value: float) -> None:
        if self._file:
            with self._lock:
                self._file.write(json.dumps({"time": time.time(), "pv": pv, "value": value}) + "\n")


def read_put_log(path: Path) -> list[dict]:
    """The puts recorded by an IOC (skips a partially written last line)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def serve(lattice_name: str, seed: int, errors: str, port: int, ramp_s: float, put_log: Path | None, prefix: str | None = None) -> None:
    """Run the virtual IOC until SIGTERM/SIGINT."""
    _server_environment(port)
    from softioc import alarm, asyncio_dispatcher, builder, softioc

    from simulators.beamline.errors import load_error_model
    from simulators.beamline.lattice import load_lattice
    from simulators.beamline.plant import OrbitSimPlant

    lattice = load_lattice(lattice_name)
    plant = OrbitSimPlant(lattice, load_error_model(errors))
    plant.reset(seed)
    prefix = prefix or default_prefix(lattice.name)
    log = PutLog(put_log)
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    builder.SetDeviceName(prefix)
    amps = np.array([AMPS_PER_UNIT * corrector_polarity(i) for i in range(lattice.n_correctors)])
    drive = lattice.corrector_limit * AMPS_PER_UNIT
    fault = {"bpm": 0, "beam_loss": 0}
    settings = np.zeros(lattice.n_correctors)
    bpm_records, readbacks = [], []
    rng = np.random.default_rng(seed + 1)

    def publish() -> None:
        plant.write_knobs(settings)
        orbit = plant.true_orbit()
        current = plant.beam_current() * (0.2 if fault["beam_loss"] else 1.0)
        noise = rng.normal(0.0, plant.errors.bpm_noise_mm, orbit.shape)
        for i, rec in enumerate(bpm_records):
            if i == 0 and fault["bpm"] == 4:
                continue  # frozen electronics: the record keeps its old value and timestamp
            value, severity = float(orbit[i] + noise[i]), alarm.NO_ALARM
            if current < 0.05:  # no beam: the BPM electronics flag the reading
                value, severity = float("nan"), alarm.INVALID_ALARM
            if i == 0 and fault["bpm"] == 1:
                value = float("nan")
            elif i == 0 and fault["bpm"] == 2:
                value = BPM_RANGE_MM
            elif i == 0 and fault["bpm"] == 3:
                severity = alarm.INVALID_ALARM
            value = float(np.clip(value, -BPM_RANGE_MM, BPM_RANGE_MM)) if math.isfinite(value) else value
            rec.set(value, severity=severity, alarm=alarm.READ_ALARM if severity else alarm.NO_ALARM)
        beam.set(NOMINAL_CURRENT_UA * current * (1 + rng.normal(0, 0.002)))

    def corrector_update(index: int, pv: str):
        async def on_update(value: float) -> None:
            log.record(pv, value)
            start = readbacks[index].get()
            n = max(1, int(ramp_s / 0.02))
            for k in range(1, n + 1):
                if ramp_s > 0:
                    await asyncio.sleep(ramp_s / n)
                readbacks[index].set(start + (value - start) * k / n)
            settings[index] = value / amps[index]
            publish()

        return on_update

    for i, name in enumerate(lattice.corrector_names):
        builder.aOut(
            f"{name}:I_SET", initial_value=0.0, on_update=corrector_update(i, f"{prefix}:{name}:I_SET"),
            always_update=True, blocking=True, DRVL=-drive, DRVH=drive, EGU="A", PREC=4,
        )
        readbacks.append(builder.aIn(f"{name}:I_RB", initial_value=0.0, EGU="A", PREC=4))
    for name in lattice.bpm_names:
        for plane in ("X", "Y"):
            bpm_records.append(builder.aIn(f"{name}:{plane}", initial_value=0.0, EGU="mm", PREC=4))
    beam = builder.aIn("BEAM:I", initial_value=NOMINAL_CURRENT_UA, EGU="uA", PREC=4)
    builder.boolIn("MPS:OK", initial_value=1)

    def sim_control(key: str, pv: str):
        def on_update(value) -> None:
            log.record(pv, value)
            fault[key] = int(value)
            publish()

        return on_update

    builder.longOut("SIM:BPM_FAULT", initial_value=0, on_update=sim_control("bpm", f"{prefix}:SIM:BPM_FAULT"))
    builder.longOut("SIM:BEAM_LOSS", initial_value=0, on_update=sim_control("beam_loss", f"{prefix}:SIM:BEAM_LOSS"))
    builder.LoadDatabase()
    softioc.iocInit(dispatcher, enable_pva=False)

    async def refresh() -> None:
        while True:
            publish()
            await asyncio.sleep(1.0 / BPM_RATE_HZ)

    asyncio.run_coroutine_threadsafe(refresh(), dispatcher.loop)
    env = " ".join(f"{k}={v}" for k, v in loopback_environment(port).items())
    print(f"READY {prefix} {env}", flush=True)
    sys.stdout.flush()
    softioc.non_interactive_ioc()
