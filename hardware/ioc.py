"""Virtual accelerator: a real EPICS IOC (softioc) serving a simulated cryomodule or injector.

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

The injector (``tbsac ioc --lattice lpi``) is described in :func:`_serve_injector`.
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


def is_injector_lattice(name_or_path: str) -> bool:
    """True for a shipped injector lattice name or an injector lattice file (it has a species)."""
    from simulators.config import read_yaml
    from simulators.injector.model import LATTICE_DIR

    if (LATTICE_DIR / f"{name_or_path}.yaml").is_file():
        return True
    path = Path(name_or_path)
    if path.is_file():
        data = read_yaml(path)
        return isinstance(data, dict) and "species" in data
    return False


def serve(lattice_name: str, seed: int, errors: str, port: int, ramp_s: float, put_log: Path | None, prefix: str | None = None) -> None:
    """Run the virtual IOC (cryomodule or injector, by lattice) until SIGTERM/SIGINT."""
    _server_environment(port)
    if is_injector_lattice(lattice_name):
        _serve_injector(lattice_name, seed, errors, ramp_s, PutLog(put_log), prefix, port)
    else:
        _serve_cryomodule(lattice_name, seed, errors, ramp_s, PutLog(put_log), prefix, port)


class _Supplies:
    """Ramped magnet power supplies: setpoint PVs whose puts complete when the ramp ends."""

    def __init__(self, builder, prefix: str, ramp_s: float, log: PutLog, on_settled):
        self.builder, self.prefix, self.ramp_s, self.log, self.on_settled = builder, prefix, ramp_s, log, on_settled
        self.readbacks = []

    def add(self, name: str, initial: float, drive: tuple[float, float], set_knob) -> None:
        index = len(self.readbacks)
        pv = f"{self.prefix}:{name}:I_SET"

        async def on_update(value: float) -> None:
            self.log.record(pv, value)
            start = self.readbacks[index].get()
            n = max(1, int(self.ramp_s / 0.02))
            for k in range(1, n + 1):
                if self.ramp_s > 0:
                    await asyncio.sleep(self.ramp_s / n)
                self.readbacks[index].set(start + (value - start) * k / n)
            set_knob(value)
            self.on_settled()

        self.builder.aOut(f"{name}:I_SET", initial_value=initial, on_update=on_update, always_update=True, blocking=True,
                          DRVL=drive[0], DRVH=drive[1], EGU="A", PREC=4)
        self.readbacks.append(self.builder.aIn(f"{name}:I_RB", initial_value=initial, EGU="A", PREC=4))


def _sim_control(builder, prefix: str, name: str, faults: dict, key: str, log: PutLog, publish) -> None:
    """A fault-injection PV (``P:SIM:<name>``) that sets ``faults[key]``."""
    pv = f"{prefix}:SIM:{name}"

    def on_update(value) -> None:
        log.record(pv, value)
        faults[key] = int(value)
        publish()

    builder.longOut(f"SIM:{name}", initial_value=0, on_update=on_update)


def _run(dispatcher, prefix: str, port: int, publish, rate_hz: float) -> None:
    """Start the IOC, refresh the readings at `rate_hz`, announce READY, serve forever."""
    from softioc import builder, softioc

    builder.LoadDatabase()
    softioc.iocInit(dispatcher, enable_pva=False)

    async def refresh() -> None:
        while True:
            publish()
            await asyncio.sleep(1.0 / rate_hz)

    asyncio.run_coroutine_threadsafe(refresh(), dispatcher.loop)
    env = " ".join(f"{k}={v}" for k, v in loopback_environment(port).items())
    print(f"READY {prefix} {env}", flush=True)
    sys.stdout.flush()
    softioc.non_interactive_ioc()


def _serve_cryomodule(lattice_name: str, seed: int, errors: str, ramp_s: float, log: PutLog, prefix: str | None, port: int) -> None:
    from softioc import alarm, asyncio_dispatcher, builder

    from simulators.beamline.errors import load_error_model
    from simulators.beamline.lattice import load_lattice
    from simulators.beamline.plant import OrbitSimPlant

    lattice = load_lattice(lattice_name)
    plant = OrbitSimPlant(lattice, load_error_model(errors))
    plant.reset(seed)
    prefix = prefix or default_prefix(lattice.name)
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    builder.SetDeviceName(prefix)
    amps = np.array([AMPS_PER_UNIT * corrector_polarity(i) for i in range(lattice.n_correctors)])
    drive = lattice.corrector_limit * AMPS_PER_UNIT
    fault = {"bpm": 0, "beam_loss": 0}
    settings = np.zeros(lattice.n_correctors)
    bpm_records = []
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

    supplies = _Supplies(builder, prefix, ramp_s, log, publish)
    for i, name in enumerate(lattice.corrector_names):
        supplies.add(name, 0.0, (-drive, drive), lambda value, i=i: settings.__setitem__(i, value / amps[i]))
    for name in lattice.bpm_names:
        for plane in ("X", "Y"):
            bpm_records.append(builder.aIn(f"{name}:{plane}", initial_value=0.0, EGU="mm", PREC=4))
    beam = builder.aIn("BEAM:I", initial_value=NOMINAL_CURRENT_UA, EGU="uA", PREC=4)
    builder.boolIn("MPS:OK", initial_value=1)
    _sim_control(builder, prefix, "BPM_FAULT", fault, "bpm", log, publish)
    _sim_control(builder, prefix, "BEAM_LOSS", fault, "beam_loss", log, publish)
    _run(dispatcher, prefix, port, publish, BPM_RATE_HZ)


# Injector supplies: amperes per knob unit (T for solenoids, mrad for steerers). The
# vertical steerer of the second pair is wired with negative polarity, as 'measured'.
SOLENOID_AMPS_PER_T = 400.0
STEERER_AMPS_PER_MRAD = 0.5
MONITOR_FULL_SCALE_MA = 20.0


def injector_knob_scale(name: str) -> float:
    """Amperes per knob unit of the virtual injector's supply `name` (sign = polarity)."""
    if ":" not in name:
        return SOLENOID_AMPS_PER_T
    return -STEERER_AMPS_PER_MRAD if name == "ST2:V" else STEERER_AMPS_PER_MRAD


def _serve_injector(lattice_name: str, seed: int, errors: str, ramp_s: float, log: PutLog, prefix: str | None, port: int) -> None:
    """The injector: LEBT supplies, ACCT and Faraday cup (mA), the transmission, MPS.

    PVs (``P`` = prefix, default ``VLPI``)::

        P:<knob>:I_SET / I_RB   supplies SOL1, ST1:H, ST1:V, SOL2, ST2:H, ST2:V (A)
        P:ACCT:I, P:FC:I        current before and after the RFQ, mA, 10 Hz with noise
        P:RFQ:TRANS             FC / ACCT
        P:MPS:OK                1 while beam is permitted
        P:SIM:BEAM_LOSS         fault injection: 1 loses 80 % of the beam inside the RFQ
    """
    from softioc import asyncio_dispatcher, builder

    from simulators.injector.model import load_injector
    from simulators.injector.task import InjectorSimPlant, load_injector_errors

    lattice = load_injector(lattice_name)
    plant = InjectorSimPlant(lattice, load_injector_errors(errors))
    plant.reset(seed)
    prefix = prefix or default_prefix(lattice.name)
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    builder.SetDeviceName(prefix)
    fault = {"beam_loss": 0}
    settings = plant.initial_settings()

    def publish() -> None:
        plant.write_knobs(settings)
        acct, cup = plant.read().values
        cup *= 0.2 if fault["beam_loss"] else 1.0
        acct_rec.set(float(min(acct, MONITOR_FULL_SCALE_MA)))
        fc_rec.set(float(min(cup, MONITOR_FULL_SCALE_MA)))
        trans_rec.set(float(cup / acct) if acct > 0 else 0.0)

    supplies = _Supplies(builder, prefix, ramp_s, log, publish)
    for i, (name, (lo, hi)) in enumerate(zip(lattice.knob_names, lattice.knob_limits)):
        scale = injector_knob_scale(name)
        drive = tuple(sorted((lo * scale, hi * scale)))
        supplies.add(name, settings[i] * scale, drive, lambda value, i=i, scale=scale: settings.__setitem__(i, value / scale))
    acct_rec = builder.aIn("ACCT:I", initial_value=0.0, EGU="mA", PREC=4)
    fc_rec = builder.aIn("FC:I", initial_value=0.0, EGU="mA", PREC=4)
    trans_rec = builder.aIn("RFQ:TRANS", initial_value=0.0, PREC=4)
    builder.boolIn("MPS:OK", initial_value=1)
    _sim_control(builder, prefix, "BEAM_LOSS", fault, "beam_loss", log, publish)
    _run(dispatcher, prefix, port, publish, BPM_RATE_HZ)
