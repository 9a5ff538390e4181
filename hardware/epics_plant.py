"""A plant reached over EPICS Channel Access with pyepics.

Network settings come from the standard ``EPICS_CA_*`` environment variables. Every
value is treated with suspicion (see ARCHITECTURE.md): a disconnected channel, a stale
timestamp, an INVALID alarm severity or a NaN is a fault, never data; every write is a
put with completion followed by a read-back of setpoint and readback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from simulators.config import ConfigError
from simulators.plant import ConnectionLost, KnobSpec, Plant, PlantFault, ReadingSpec, Readings

from .machine import MachineFile

log = logging.getLogger(__name__)

INVALID_SEVERITY = 3


class WriteNotVerified(PlantFault):
    """A setpoint or readback does not match what was written."""


def _epics():
    import epics  # imported lazily: libca reads EPICS_CA_* when its context starts

    return epics


@contextlib.contextmanager
def _no_repeater_complaint():
    """Silence libca's complaint about the missing caRepeater.

    pyepics ships libca but no caRepeater for Linux; when the first channel is created
    libca forks a child to start one, and the child prints four lines to stderr. The
    repeater only serves beacon-anomaly detection (irrelevant on loopback and
    harmless elsewhere), so the child inherits /dev/null as its stderr.
    """
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


class EpicsPlant(Plant):
    """Correctors and BPMs of a machine file, in simulator units and mm."""

    def __init__(self, machine: MachineFile, path: Path | str = "machine file"):
        self.machine = machine
        self.path = str(path)
        self.correctors = machine.correctors
        self.scale = np.array([c.scale for c in machine.correctors])
        self.knobs = []
        for c in machine.correctors:
            lo, hi = sorted((c.lower / c.scale, c.upper / c.scale))
            self.knobs.append(KnobSpec(c.name, "unit", lo, hi, c.max_step / abs(c.scale), c.tolerance / abs(c.scale)))
        self.readings = [
            ReadingSpec(f"{b.name}:{p}", "mm", -b.range_mm, b.range_mm) for b in machine.bpms for p in ("x", "y")
        ]
        self._pvs: dict[str, object] = {}
        self.last_write_s = 0.0

    # -- connection ---------------------------------------------------------------
    def connect(self) -> "EpicsPlant":
        """Connect every PV (explicit timeout); name all that did not connect."""
        epics = _epics()
        names = self.machine.all_pvs()
        with _no_repeater_complaint():
            for name in names:
                if name not in self._pvs:
                    self._pvs[name] = epics.PV(name, auto_monitor=False, connection_timeout=self.machine.connection_timeout_s)
            epics.ca.poll(0.01)
        deadline = time.monotonic() + self.machine.connection_timeout_s
        while time.monotonic() < deadline and not all(pv.connected for pv in self._pvs.values()):
            epics.ca.poll(0.01)
        missing = [n for n in names if not self._pvs[n].connected]
        if missing:
            raise ConfigError(
                f"{self.path}: {len(missing)} PV(s) did not connect within {self.machine.connection_timeout_s} s: "
                + ", ".join(missing)
            )
        self._check_drive_limits()
        return self

    def _check_drive_limits(self) -> None:
        """Refuse limits wider than the IOC's DRVL/DRVH (the IOC would clamp silently)."""
        epics = _epics()
        for i, c in enumerate(self.correctors):
            drvl = epics.caget(c.setpoint + ".DRVL", timeout=self.machine.read_timeout_s)
            drvh = epics.caget(c.setpoint + ".DRVH", timeout=self.machine.read_timeout_s)
            if drvl is None or drvh is None or not drvl < drvh:
                continue  # the IOC publishes no drive limits
            for field, value, ok in (("lower", c.lower, c.lower >= drvl), ("upper", c.upper, c.upper <= drvh)):
                if not ok:
                    raise ConfigError(
                        f"{self.path}: field 'correctors[{i}]({c.name}).{field}': {value} {c.unit} is beyond the "
                        f"IOC's drive limits [{drvl}, {drvh}] of {c.setpoint}"
                    )

    def _get(self, name: str) -> dict:
        pv = self._pvs[name]
        if not pv.connected:
            raise ConnectionLost(f"{name}: disconnected")
        data = pv.get_with_metadata(timeout=self.machine.read_timeout_s, form="time", use_monitor=False)
        if data is None or data.get("value") is None:
            raise ConnectionLost(f"{name}: no answer within {self.machine.read_timeout_s} s")
        return data

    # -- knobs --------------------------------------------------------------------
    def read_engineering(self) -> tuple[np.ndarray, np.ndarray]:
        """(setpoints, readbacks) in engineering units."""
        sp = np.array([float(self._get(c.setpoint)["value"]) for c in self.correctors])
        rb = np.array([float(self._get(c.readback)["value"]) for c in self.correctors])
        return sp, rb

    def read_knobs(self) -> np.ndarray:
        _, rb = self.read_engineering()
        return rb / self.scale

    def write_knobs(self, values: np.ndarray) -> None:
        """Put all setpoints with completion, then verify setpoints and readbacks.

        Equivalent to ``caput_many(..., wait='all')``, but a channel that disconnects
        while its put is in flight ends the wait at once instead of after the settle
        timeout, so a dead IOC is detected quickly.
        """
        epics = _epics()
        target = np.asarray(values, dtype=float) * self.scale
        timeout = max(c.settle_timeout_s for c in self.correctors)
        pvs = [self._pvs[c.setpoint] for c in self.correctors]
        for pv in pvs:
            if not pv.connected:
                raise ConnectionLost(f"{pv.pvname}: disconnected, nothing written")
        for pv, value in zip(pvs, target):
            pv.put(float(value), wait=False, use_complete=True)
        self.last_write_s = time.time()
        deadline = time.monotonic() + timeout
        while not all(pv.put_complete for pv in pvs):
            lost = [pv.pvname for pv in pvs if not pv.connected]
            if lost:
                raise ConnectionLost(f"disconnected during put: {', '.join(lost)}")
            if time.monotonic() > deadline:
                pending = [pv.pvname for pv in pvs if not pv.put_complete]
                raise ConnectionLost(f"put did not complete within {timeout} s: {', '.join(pending)}")
            epics.ca.poll(0.001)
        self.verify(target)

    def verify(self, target: np.ndarray) -> None:
        """Setpoint and readback of every corrector must match `target` (engineering units)."""
        sp, rb = self.read_engineering()
        tol = np.array([c.tolerance for c in self.correctors])
        bad = [
            f"{c.name}: wrote {t:.4g} {c.unit}, setpoint {s:.4g}, readback {r:.4g}"
            for c, t, s, r, tl in zip(self.correctors, target, sp, rb, tol)
            if not (abs(s - t) <= tl and abs(r - t) <= tl)
        ]
        if bad:
            raise WriteNotVerified("read-back mismatch: " + "; ".join(bad))

    # -- readings -----------------------------------------------------------------
    def _sample(self, name: str, now: float, check_age: bool = True) -> tuple[float, float, bool, str]:
        data = self._get(name)
        value = float(np.asarray(data["value"], dtype=float).ravel()[0])
        stamp = float(data.get("timestamp") or 0.0)
        reason = ""
        if data.get("severity", 0) >= INVALID_SEVERITY:
            reason = "INVALID severity"
        elif not math.isfinite(value):
            reason = "not a number"
        elif check_age and now - stamp > self.machine.stale_after_s:
            reason = f"stale ({now - stamp:.1f} s old)"
        return value, stamp, not reason, reason

    def read(self) -> Readings:
        n = self.machine.samples_per_reading
        values, stamps, valid, problems = [], [], [], {}
        for b in self.machine.bpms:
            status_bad = False
            if b.status:
                status_bad = float(self._get(b.status)["value"]) != 0
            for plane, pv in (("x", b.x), ("y", b.y)):
                samples = [self._sample(pv, time.time()) for _ in range(n)]
                ok = all(s[2] for s in samples) and not status_bad
                if not ok:
                    problems[f"{b.name}:{plane}"] = next((s[3] for s in samples if s[3]), "status PV not OK")
                values.append(float(np.mean([s[0] for s in samples])))
                stamps.append(max(s[1] for s in samples))
                valid.append(ok)
        interlocks = {}
        for il in self.machine.interlocks:
            # Interlock PVs change only on events, so an old timestamp is normal for them.
            value, _, ok, reason = self._sample(il.pv, time.time(), check_age=False)
            interlocks[il.name] = value if ok else float("nan")
            if not ok:
                problems[il.name] = reason
        return Readings(np.array(values), np.array(stamps), np.array(valid), interlocks, problems)

    def close(self) -> None:
        for pv in self._pvs.values():
            pv.disconnect()
        self._pvs.clear()
