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
import threading
import time
from pathlib import Path

import numpy as np

from core.config import ConfigError
from core.plant import ConnectionLost, KnobSpec, Plant, PlantFault, ReadingSpec, Readings

from .machine import MachineFile

log = logging.getLogger(__name__)

INVALID_SEVERITY = 3


class WriteNotVerified(PlantFault):
    """A setpoint or readback does not match what was written."""


def _epics():
    import epics  # imported lazily: libca reads EPICS_CA_* when its context starts

    # Sessions run in worker threads (the control server): libca needs each thread
    # attached to the process's CA context before low-level calls.
    epics.ca.use_initial_context()
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
    """Knobs (in simulator units), BPMs (mm) and scalar monitors of a machine file.

    `knob_units` names the simulator unit of every knob (the setup's; default "unit").
    """

    def __init__(self, machine: MachineFile, path: Path | str = "machine file", knob_units: list[str] | None = None):
        self.machine = machine
        self.path = str(path)
        self.correctors = machine.knobs
        self.scale = np.array([c.scale for c in machine.knobs])
        self.knobs = []
        units = knob_units or ["unit"] * len(machine.knobs)
        for c, unit in zip(machine.knobs, units):
            lo, hi = sorted((c.lower / c.scale, c.upper / c.scale))
            self.knobs.append(KnobSpec(c.name, unit, lo, hi, c.max_step / abs(c.scale), c.tolerance / abs(c.scale)))
        self.readings = [
            ReadingSpec(f"{b.name}:{p}", "mm", -b.range_mm, b.range_mm) for b in machine.bpms for p in ("x", "y")
        ] + [ReadingSpec(m.name, m.unit, m.lower, m.upper) for m in machine.monitors]
        self._pvs: dict[str, object] = {}
        self._period_read: float | None = None  # clocked machines: the period count of the last read

    def channels(self, values: np.ndarray) -> dict[str, float]:
        """Setpoint PV -> engineering value (the scale and polarity of this machine file)."""
        return {c.setpoint: float(v * c.scale) for c, v in zip(self.correctors, values)}

    def from_channels(self, channels: dict[str, float]) -> np.ndarray:
        missing = [c.setpoint for c in self.correctors if c.setpoint not in channels]
        if missing:
            raise ValueError(f"snapshot has no value for {', '.join(missing)}")
        return np.array([channels[c.setpoint] / c.scale for c in self.correctors])

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
                        f"{self.path}: field 'knobs[{i}]({c.name}).{field}': {value} {c.unit} is beyond the "
                        f"IOC's drive limits [{drvl}, {drvh}] of {c.setpoint}"
                    )

    def _get_many(self, names: list[str]) -> list[dict]:
        """Fresh values with timestamp and severity, all requests in flight at once.

        One network round trip for the whole batch instead of one per channel: this
        is what keeps a control step of ~40 reads well under 20 ms.
        """
        ca = _epics().ca
        pvs = [self._pvs[n] for n in names]
        for pv in pvs:
            if not pv.connected:
                raise ConnectionLost(f"{pv.pvname}: disconnected")
        types = [ca.promote_type(pv.chid, use_time=True) for pv in pvs]
        for pv, ftype in zip(pvs, types):
            ca.get_with_metadata(pv.chid, ftype=ftype, wait=False)
        out = []
        for pv, ftype in zip(pvs, types):
            data = ca.get_complete_with_metadata(pv.chid, ftype=ftype, timeout=self.machine.read_timeout_s)
            if data is None or data.get("value") is None:
                raise ConnectionLost(f"{pv.pvname}: no answer within {self.machine.read_timeout_s} s")
            out.append(data)
        return out

    # -- knobs --------------------------------------------------------------------
    def read_engineering(self) -> tuple[np.ndarray, np.ndarray]:
        """(setpoints, readbacks) in engineering units."""
        n = len(self.correctors)
        data = self._get_many([c.setpoint for c in self.correctors] + [c.readback for c in self.correctors])
        values = np.array([float(d["value"]) for d in data])
        return values[:n], values[n:]

    def read_knobs(self) -> np.ndarray:
        data = self._get_many([c.readback for c in self.correctors])
        return np.array([float(d["value"]) for d in data]) / self.scale

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

    # -- settlement periods -------------------------------------------------------------
    @property
    def longest_period_s(self) -> float | None:
        """A clocked machine's longest wait for a new period (its clock timeout); None without a clock."""
        return self.machine.clock.timeout_s if self.machine.clock is not None else None

    def _period_count(self) -> float:
        return float(self._get_many([self.machine.clock.pv])[0]["value"])

    def _wait_for_period(self) -> str:
        """Every read is of a period not read before (after a write: the period run at it;
        in a dry-run, which writes nothing: the next one); '' or why not."""
        if self.machine.clock is None:
            return ""
        count = self._period_count()
        if self._period_read is not None:
            ca = _epics().ca
            deadline = time.monotonic() + self.machine.clock.timeout_s
            while count <= self._period_read:
                if time.monotonic() > deadline:
                    return f"no new period within {self.machine.clock.timeout_s} s (clock {self.machine.clock.pv} stopped)"
                ca.poll(0.005)
                count = self._period_count()
        self._period_read = count
        return ""

    # -- readings -----------------------------------------------------------------
    def _judge(self, data: dict, now: float, check_age: bool) -> tuple[float, float, bool, str]:
        """(value, timestamp, valid, why not) of one channel read."""
        value = float(np.asarray(data["value"], dtype=float).ravel()[0])
        stamp = float(data.get("timestamp") or 0.0)
        reason = ""
        if (data.get("severity") or 0) >= INVALID_SEVERITY:
            reason = "INVALID severity"
        elif not math.isfinite(value):
            reason = "not a number"
        elif check_age and now - stamp > self.machine.stale_after_s:
            reason = f"stale ({now - stamp:.1f} s old)"
        return value, stamp, not reason, reason

    def read(self) -> Readings:
        clock_problem = self._wait_for_period()
        reading_pvs = [pv for b in self.machine.bpms for pv in (b.x, b.y)] + [m.pv for m in self.machine.monitors]
        status_pvs = [b.status for b in self.machine.bpms if b.status]
        interlock_pvs = [i.pv for i in self.machine.interlocks]
        samples = []
        for _ in range(self.machine.samples_per_reading):
            data = self._get_many(reading_pvs + status_pvs + interlock_pvs)
            samples.append((data, time.time()))
        n_read = len(reading_pvs)
        status_bad = {}
        for data, _ in samples:
            for b, d in zip([b for b in self.machine.bpms if b.status], data[n_read : n_read + len(status_pvs)]):
                status_bad[b.name] = status_bad.get(b.name, False) or float(d["value"]) != 0
        values, stamps, valid, problems = [], [], [], {}
        names = [s.name for s in self.readings]
        for i, name in enumerate(names):
            judged = [self._judge(data[i], now, True) for data, now in samples]
            reason = next((j[3] for j in judged if j[3]), "")
            if not reason and status_bad.get(name.split(":")[0]):
                reason = "status PV not OK"
            if reason:
                problems[name] = reason
            values.append(float(np.mean([j[0] for j in judged])))
            stamps.append(max(j[1] for j in judged))
            valid.append(not reason)
        interlocks = {}
        data, now = samples[-1]
        for il, d in zip(self.machine.interlocks, data[n_read + len(status_pvs):]):
            # Interlock PVs change only on events, so an old timestamp is normal for them.
            value, _, ok, reason = self._judge(d, now, check_age=False)
            interlocks[il.name] = value if ok else float("nan")
            if not ok:
                problems[il.name] = reason
        if clock_problem:  # every reading is of an old period: none is valid
            problems.update({name: clock_problem for name in names})
            valid = [False] * len(valid)
        return Readings(np.array(values), np.array(stamps), np.array(valid), interlocks, problems)

    def close(self) -> None:
        for pv in self._pvs.values():
            pv.disconnect()
        self._pvs.clear()


class ChannelWatch:
    """The connection and latest value of a machine file's interlock channels (its monitors
    if it has none), kept by Channel Access monitors so that asking costs no network trip.

    A console asks every second whether the machine is still there: an IOC that dies closes
    its TCP circuit and libca reports the disconnection at once, while a session waiting
    for an operator's approval reads nothing and would not notice.
    """

    def __init__(self, machine: MachineFile):
        self.machine = machine
        self._lock = threading.Lock()
        watched = [(i.name, i.pv) for i in machine.interlocks] or [(m.name, m.pv) for m in machine.monitors]
        now = time.time()
        self._state = {name: {"name": name, "pv": pv, "connected": False, "value": None, "severity": None,
                              "changed": now, "updated": None} for name, pv in watched}
        epics = _epics()
        self._pvs = []
        with _no_repeater_complaint():
            for name, pv in watched:
                self._pvs.append(epics.PV(pv, auto_monitor=True, form="time",
                                          callback=lambda value=None, severity=None, n=name, **_: self._value(n, value, severity),
                                          connection_callback=lambda conn=False, n=name, **_: self._connection(n, conn)))
        # Answer the first question with the machine's state, not with 'not connected yet'.
        deadline = time.monotonic() + machine.connection_timeout_s
        while time.monotonic() < deadline and not all(s["connected"] and s["updated"] for s in self._state.values()):
            epics.ca.poll(0.01)

    def _value(self, name: str, value, severity) -> None:
        with self._lock:
            state = self._state[name]
            state["value"] = float(np.asarray(value, dtype=float).ravel()[0]) if value is not None else None
            state["severity"], state["updated"] = severity, time.time()

    def _connection(self, name: str, connected: bool) -> None:
        with self._lock:
            state = self._state[name]
            if state["connected"] != bool(connected):
                state["connected"], state["changed"] = bool(connected), time.time()
            if not connected:
                state["value"] = None  # a value from a dead circuit is not the machine's

    def snapshot(self) -> list[dict]:
        """Every watched channel: connected, value (None when unknown), severity, and
        seconds since the connection last changed (how long it has been down, or up)."""
        now = time.time()
        with self._lock:
            return [dict(s, changed_s_ago=round(now - s["changed"], 3)) for s in self._state.values()]

    def close(self) -> None:
        for pv in self._pvs:
            pv.clear_callbacks()
            pv.disconnect()
