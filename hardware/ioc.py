"""Virtual machine: a real EPICS IOC (softioc) serving any registered task's simulated plant.

The machine behind the PVs has hidden errors drawn from the task's error model, and
its knobs are wired with the task's per-knob signed scale to engineering units
(``TaskDefinition.wiring``; the cryomodules: 1.85 A per simulator unit with measured
polarities, like the machine in the TBSAC paper); a machine file must state that
polarity and scale to drive it. Every put the IOC receives is appended to a JSON-lines
log. Start it with ``tbsac ioc`` or ``python -m hardware.ioc``.

PV names (``P`` = prefix, default ``V`` + the setup name, e.g. ``VCAFE2:CM1``)::

    P:<knob>:I_SET        setpoint, engineering units (DRVL/DRVH set; put completes when the ramp ends)
    P:<knob>:I_RB         readback
    P:<READING>           every reading (name upper-cased, e.g. P:BPM1:X), refreshed at 10 Hz;
                          a reading the plant flags invalid is NaN with INVALID severity
    P:<INTERLOCK>         every interlock value the plant reports (e.g. P:BEAM_CURRENT)
    P:MPS:OK              1 while the machine protection system permits beam
    P:SIM:READING_FAULT   fault injection on the first reading: 0 none, 1 NaN,
                          2 saturated, 3 INVALID severity, 4 frozen (stale timestamp)
    P:SIM:<FAULT>         the plant's own faults (``SimulatedPlant.faults``), e.g. SIM:BEAM_LOSS
    P:CLOCK:PERIOD        plants that run in settlement periods (a battery) only: the count of
                          periods run; every ``--period-s`` seconds the IOC runs one period at the
                          setpoint it holds and publishes the readings (only then)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from core.config import ConfigError

RATE_HZ = 10.0


def default_prefix(setup_name: str) -> str:
    """``cafe2-cm1`` -> ``VCAFE2:CM1``."""
    return "V" + setup_name.upper().replace("-", ":")


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
                      timeout_s: float = 60.0, task: str | None = None, period_s: float | None = None):
    """The virtual IOC as a background process; returns the Popen once it printed READY.

    ``errors="foreign"`` serves a machine of the task's foreign family (seed = `seed`)."""
    import subprocess

    cmd = [sys.executable, "-m", "hardware.ioc", "--lattice", lattice, "--seed", str(seed), "--errors", errors,
           "--port", str(port), "--ramp", str(ramp_s)]
    for flag, value in (("--put-log", put_log), ("--prefix", prefix), ("--task", task), ("--period-s", period_s)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout_s
    output = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc
        output.append(line)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    last = next((line.strip() for line in reversed(output) if line.strip()), "")
    raise RuntimeError(f"virtual IOC for {lattice} did not start (exit code {proc.poll()}): {last}")


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


def reading_pv(name: str) -> str:
    """PV suffix of a reading or interlock: its name upper-cased (``BPM1:x`` -> ``BPM1:X``)."""
    return name.upper()


FOREIGN = "foreign"  # --errors value asking for the task's foreign family


def resolve(lattice: str, errors: str, task: str | None = None, period_s: float | None = None):
    """(definition, setup, error model) for a setup name or file; ConfigError if unknown,
    or if `period_s` is given for a plant that does not run in periods.

    ``errors="foreign"`` is the task's family of machines whose physics differs from the
    setup file (``TaskDefinition.foreign_errors``)."""
    from core.registry import task_for_setup

    definition, setup = task_for_setup(lattice, task)
    if errors == FOREIGN:
        if not definition.foreign_errors:
            raise ConfigError(f"--foreign: task {definition.name} has no family of foreign machines")
        errors = definition.foreign_errors
    error_model = definition.load_errors(errors)
    if period_s is not None:
        if not (math.isfinite(period_s) and period_s > 0):
            raise ConfigError(f"--period-s: must be a positive number of seconds, got {period_s}")
        if definition.sim_plant(setup, error_model).period_s is None:
            raise ConfigError(f"--period-s: the {definition.name} plant ({setup.name}) follows its settings at once; "
                              "it does not run in periods")
    return definition, setup, error_model


def serve(lattice: str, seed: int, errors: str, port: int, ramp_s: float, put_log: Path | None,
          prefix: str | None = None, task: str | None = None, period_s: float | None = None) -> None:
    """Run the virtual IOC of `lattice` (any registered task) until SIGTERM/SIGINT.

    A plant that runs in periods (``SimulatedPlant.period_s``) gets a clock: one period
    every `period_s` seconds (default the plant's), at the setpoint held when it starts."""
    from softioc import alarm, asyncio_dispatcher, builder, softioc

    definition, setup, error_model = resolve(lattice, errors, task)
    _server_environment(port)
    plant = definition.sim_plant(setup, error_model)
    plant.warm_up()
    plant.reset(seed)
    log = PutLog(put_log)
    prefix = prefix or default_prefix(setup.name)
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    builder.SetDeviceName(prefix)
    scale, unit = definition.wiring(setup, plant.knobs)
    settings = plant.read_knobs()
    reading_fault = {"value": 0}
    first = plant.read()
    interlock_records = {}
    clocked = plant.period_s is not None
    period_s = period_s or plant.period_s

    def publish() -> None:
        if not clocked:  # a continuous plant follows its settings at once; a clocked one at the next period
            plant.write_knobs(settings)
        r = plant.read()
        for i, (spec, rec) in enumerate(zip(plant.readings, reading_records)):
            fault = reading_fault["value"] if i == 0 else 0
            if fault == 4:
                continue  # frozen electronics: the record keeps its old value and timestamp
            value, severity = float(r.values[i]), alarm.NO_ALARM
            if not r.valid[i]:
                value, severity = float("nan"), alarm.INVALID_ALARM
            if fault == 1:
                value = float("nan")
            elif fault == 2:
                value = spec.upper
            elif fault == 3:
                severity = alarm.INVALID_ALARM
            value = float(np.clip(value, spec.lower, spec.upper)) if math.isfinite(value) else value
            rec.set(value, severity=severity, alarm=alarm.READ_ALARM if severity else alarm.NO_ALARM)
        for name, value in r.interlocks.items():
            interlock_records[name].set(float(value))

    readbacks = []
    for i, knob in enumerate(plant.knobs):
        pv = f"{prefix}:{knob.name}:I_SET"

        async def on_update(value: float, i=i, pv=pv) -> None:
            log.record(pv, value)
            start = readbacks[i].get()
            n = max(1, int(ramp_s / 0.02))
            for k in range(1, n + 1):
                if ramp_s > 0:
                    await asyncio.sleep(ramp_s / n)
                readbacks[i].set(start + (value - start) * k / n)
            settings[i] = value / scale[i]
            if not clocked:
                publish()

        drive = sorted((knob.lower * scale[i], knob.upper * scale[i]))
        initial = float(settings[i] * scale[i])
        builder.aOut(f"{knob.name}:I_SET", initial_value=initial, on_update=on_update, always_update=True, blocking=True,
                     DRVL=drive[0], DRVH=drive[1], EGU=unit, PREC=4)
        readbacks.append(builder.aIn(f"{knob.name}:I_RB", initial_value=initial, EGU=unit, PREC=4))
    reading_records = [builder.aIn(reading_pv(spec.name), initial_value=0.0, EGU=spec.unit, PREC=4) for spec in plant.readings]
    for name, value in first.interlocks.items():
        interlock_records[name] = builder.aIn(reading_pv(name), initial_value=float(value), PREC=4)
    builder.boolIn("MPS:OK", initial_value=1)
    clock = builder.longIn("CLOCK:PERIOD", initial_value=0) if clocked else None

    def fault_control(name: str, apply) -> None:
        pv = f"{prefix}:SIM:{name}"

        def on_update(value) -> None:
            log.record(pv, value)
            apply(int(value))
            publish()

        builder.longOut(f"SIM:{name}", initial_value=0, on_update=on_update)

    fault_control("READING_FAULT", lambda v: reading_fault.__setitem__("value", v))
    for name in plant.faults:
        fault_control(name, lambda v, name=name: plant.set_fault(name, v))

    builder.LoadDatabase()
    softioc.iocInit(dispatcher, enable_pva=False)

    async def refresh() -> None:
        while True:
            publish()
            await asyncio.sleep(1.0 / RATE_HZ)

    async def run_periods() -> None:
        loop = asyncio.get_running_loop()
        next_tick, count = loop.time() + period_s, 0
        while True:
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            next_tick += period_s  # on a fixed grid: a slow period does not shift the ones after it
            plant.write_knobs(settings)
            count += 1
            publish()
            clock.set(count)  # last: a client that sees the new count finds the new readings

    if clocked:
        publish()
        asyncio.run_coroutine_threadsafe(run_periods(), dispatcher.loop)
    else:
        asyncio.run_coroutine_threadsafe(refresh(), dispatcher.loop)
    env = " ".join(f"{k}={v}" for k, v in loopback_environment(port).items())
    print(f"READY {prefix} {env}", flush=True)
    sys.stdout.flush()
    softioc.non_interactive_ioc()


def main(argv: list[str] | None = None) -> None:
    """``python -m hardware.ioc``: bad input exits with code 2 and one line."""
    parser = argparse.ArgumentParser(prog="python -m hardware.ioc", description=__doc__.splitlines()[0])
    parser.add_argument("--lattice", required=True, help="setup (lattice) name or file of any registered task")
    parser.add_argument("--task", default=None, help="registered task (default: the one the lattice belongs to)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--errors", default="test")
    parser.add_argument("--foreign", type=int, default=None, metavar="SEED",
                        help="a machine whose physics differs from the lattice file (hidden, drawn from SEED)")
    parser.add_argument("--port", type=int, default=5064)
    parser.add_argument("--ramp", type=float, default=0.2)
    parser.add_argument("--put-log", type=Path, default=None)
    parser.add_argument("--period-s", "--day-s", dest="period_s", type=float, default=None,
                        help="plants that run in periods (battery: settlement periods; bubble: control intervals; crop: days): "
                             "seconds per period")
    parser.add_argument("--prefix", default=None)
    args = parser.parse_args(argv)
    if args.foreign is not None:
        args.errors, args.seed = FOREIGN, args.foreign
    try:
        resolve(args.lattice, args.errors, args.task, args.period_s)  # fail with a clear message before starting EPICS
        serve(args.lattice, args.seed, args.errors, args.port, args.ramp, args.put_log, args.prefix, args.task, args.period_s)
    except ConfigError as exc:
        print(f"tbsac ioc: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
