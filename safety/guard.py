"""The safety layer: the only path from a policy to a machine.

:class:`GuardedPlant` wraps any plant. Before a write it enforces hard limits, the
per-step change limit, the total excursion from the starting settings and the write
rate; after a read it rejects NaN/inf, out-of-range, saturated, stale or flagged
readings and applies the interlock rules (e.g. beam-current drop). Session guards
bound the number of steps and the duration and honour an operator abort. On a trip
it stops, restores the snapshot of the starting settings and verifies the restore by
read-back; if the connection is lost it stops writing and leaves the snapshot on disk
for ``tbsac restore``. Every check that blocks or changes an action, and every trip,
is recorded with its reason.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from core.plant import ConnectionLost, Event, InterlockRuleKind, Plant, PlantFault, Readings, knob_bounds, knob_steps, knob_tolerances

log = logging.getLogger(__name__)

Mode = Literal["auto", "approve", "dry-run"]
MODES: tuple[str, ...] = ("auto", "approve", "dry-run")


class CumulativeLimit(BaseModel):
    """A budget on what a knob delivers over a rolling window of writes, e.g. a battery's
    daily discharged energy: sum over the last `window_writes` writes of the knob's value
    in `direction` x `per_write` must stay within `limit`. Counted from the written
    setpoints (the guard cannot know less was delivered), so it errs on the safe side."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    knob: str
    direction: Literal["positive", "negative"] = "positive"
    per_write: PositiveFloat = Field(description="how long one write holds, e.g. 0.25 h per settlement period")
    limit: PositiveFloat
    window_writes: PositiveInt
    unit: str = ""
    label: str = "cumulative budget"


class ReadingGate(BaseModel):
    """A knob held at `value` while a reading is above (or below) a level, e.g. no
    fertiliser after a crop's last development stage: a write asking for anything else is
    cut to `value` (recorded). Judged on the last reading the guard checked, before the write."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    knob: str
    reading: str
    above: float | None = None
    below: float | None = None
    value: float = 0.0
    label: str = "reading gate"

    @model_validator(mode="after")
    def _one_level(self):
        if (self.above is None) == (self.below is None):
            raise ValueError(f"gate {self.label!r}: give exactly one of 'above' and 'below'")
        return self

    def closed(self, level: float) -> bool:
        """The gate holds the knob at this reading (an unreadable reading holds it too)."""
        if not np.isfinite(level):
            return True
        return level > self.above if self.above is not None else level < self.below

    def describe(self, level: float) -> str:
        return (f"{self.reading} {level:.4g} above {self.above:.4g}" if self.above is not None
                else f"{self.reading} {level:.4g} below {self.below:.4g}")


class SafetyConfig(BaseModel):
    """Session limits (all in the plant's knob units, i.e. simulator units)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf would switch a check off

    max_steps: PositiveInt = Field(60, description="writes allowed in one session")
    max_duration_s: PositiveFloat = 600.0
    max_excursion: PositiveFloat = Field(10.0, description="largest distance of any knob from its starting value")
    max_excursion_steps: PositiveFloat | None = Field(
        None, description="if set, replaces max_excursion: the distance in each knob's own largest step "
        "(knobs in different units, e.g. solenoids in T and steerers in mrad)")
    min_write_interval_s: float = Field(0.0, ge=0, description="writes closer than this are delayed")
    saturation_margin: float = Field(1e-6, ge=0, description="|reading| >= range - margin is saturated")
    max_response_mismatch: PositiveFloat = Field(
        0.35, description="largest relative difference between the machine's response to the opening probe and the "
        "policy's model before the session stops (the policy does not know this machine)")
    budgets: list[CumulativeLimit] = Field(default_factory=list)
    gates: list[ReadingGate] = Field(default_factory=list)


@dataclass(frozen=True)
class InterlockRule:
    """Trip when a named interlock reading breaks its rule."""

    name: str
    rule: InterlockRuleKind
    threshold: float

    def violated(self, value: float, start: float | None) -> str:
        if not np.isfinite(value):
            return f"{self.name} unreadable"
        if self.rule == "min_fraction_of_start" and start is not None and value < self.threshold * start:
            return f"{self.name} {value:.4g} fell below {self.threshold:.0%} of its start value {start:.4g} (beam loss)"
        if self.rule == "min" and value < self.threshold:
            return f"{self.name} {value:.4g} below {self.threshold:.4g}"
        if self.rule == "max" and value > self.threshold:
            return f"{self.name} {value:.4g} above {self.threshold:.4g}"
        if self.rule == "equals" and value != self.threshold:
            return f"{self.name} is {value:.4g}, must be {self.threshold:.4g}"
        return ""

    def margin_used(self, value: float, start: float | None, signed: bool = False) -> float:
        """How much of the margin between the start value and the trip level `value` has
        used: 0 at the start value (or better; `signed`: negative, the way away from the
        trip level), 1 at the trip level; NaN-safe (1 if unreadable)."""
        if not np.isfinite(value):
            return 1.0
        if self.rule == "equals":  # all or nothing: no margin to grade (signed: it must not mask another's)
            return (-np.inf if signed else 0.0) if value == self.threshold else 1.0
        if self.rule == "min_fraction_of_start" and (start is None or not np.isfinite(start)):
            return 0.0  # no baseline yet: nothing to compare with
        level = {"min_fraction_of_start": self.threshold * start, "min": self.threshold, "max": self.threshold}[self.rule]
        margin = abs(start - level)
        if margin == 0:
            return 1.0
        moved = (start - value) if self.rule != "max" else (value - start)
        return float(moved / margin if signed else max(0.0, moved / margin))


SafetyEvent = Event  # clamp, delay, proposal, approved, rejected, trip, restore, abort, ...


class SafetyTrip(RuntimeError):
    """The session was stopped by the safety layer."""

    def __init__(self, reason: str, restored: bool, snapshot: Path | None):
        super().__init__(reason)
        self.reason, self.restored, self.snapshot = reason, restored, snapshot


class OperatorRejected(SafetyTrip):
    """The operator rejected a proposed step (approve mode)."""


class OperatorAbort(SafetyTrip):
    """The operator aborted the session."""


Approver = Callable[[np.ndarray, np.ndarray, list[str]], bool]


def write_snapshot(path: Path, plant: Plant, values: np.ndarray, context: dict) -> Path:
    """The starting settings, by knob name (simulator units) and by channel (as the machine knows them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"time": time.time(), "knobs": {k.name: float(v) for k, v in zip(plant.knobs, values)},
            "channels": plant.channels(values), **context}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(blob, indent=2))
    tmp.replace(path)  # atomic: a crash never leaves half a snapshot
    return path


def read_snapshot(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def restore_snapshot(plant: Plant, snapshot: dict, record: Callable[[SafetyEvent], None] | None = None,
                     label: str = "starting settings") -> int:
    """Write the snapshot's knob values back, ramped, and verify every write by read-back.

    The way back is cut into writes no knob moves more than its largest step in (a
    restore must respect the machine like any other write); each write is verified.
    The values must be within the plant's hard limits; raises PlantFault if a read-back
    does not match. Returns the number of writes.
    """
    names = [k.name for k in plant.knobs]
    if "channels" in snapshot:  # as the machine knew them: right whatever scale this plant states
        values = plant.from_channels(snapshot["channels"])
    else:  # snapshots written before channels were kept
        missing = [n for n in names if n not in snapshot["knobs"]]
        if missing:
            raise ValueError(f"snapshot has no value for {', '.join(missing)}")
        values = np.array([snapshot["knobs"][n] for n in names], dtype=float)
    lower, upper = knob_bounds(plant.knobs)
    if not np.all(np.isfinite(values)) or np.any(values < lower) or np.any(values > upper):
        raise ValueError("snapshot values are outside the machine's limits; refusing to write them")
    tol = knob_tolerances(plant.knobs)
    start = plant.read_knobs()
    distance = np.abs(values - start)
    writes = max(1, int(np.ceil(np.max(np.where(distance > tol, distance / knob_steps(plant.knobs), 0.0)) - 1e-9)))
    for k in range(1, writes + 1):
        target = values if k == writes else start + (values - start) * k / writes
        plant.write_knobs(target)
        after = plant.read_knobs()
        bad = [f"{n}: {a:.4g} != {v:.4g}" for n, a, v, t in zip(names, after, target, tol) if abs(a - v) > t]
        if bad:
            raise PlantFault(f"restore not verified at write {k} of {writes}: " + "; ".join(bad))
    if record:
        record(SafetyEvent(time.time(), "restore", f"{label} restored in {writes} write{'s' if writes != 1 else ''} "
                           "(each within the largest step) and verified",
                           {"knobs": {n: float(v) for n, v in zip(names, values)}, "writes": writes,
                            "readings": _readings_after_restore(plant)}))
    return writes


def _readings_after_restore(plant: Plant) -> list[float | None] | None:
    """What the machine reads once restored, so that a console draws the machine as it is
    now rather than as the last step left it; None where a read would wait for a
    settlement period (a clocked machine) or fails (the restore itself was verified)."""
    if getattr(plant, "longest_period_s", None) is not None:
        return None
    try:
        values = np.asarray(plant.read().values, dtype=float)
    except PlantFault:
        return None
    return [float(v) if np.isfinite(v) else None for v in values]


class GuardedPlant(Plant):
    """Wraps a plant; every write and read passes the checks above."""

    def __init__(
        self,
        plant: Plant,
        config: SafetyConfig | None = None,
        interlocks: list[InterlockRule] | None = None,
        mode: Mode = "auto",
        snapshot_path: Path | None = None,
        approver: Approver | None = None,
        on_event: Callable[[SafetyEvent], None] | None = None,
        snapshot_context: dict | None = None,
        safe_settings: Callable[[np.ndarray], np.ndarray] | None = None,
        safe_label: str = "starting settings",
    ):
        """`safe_settings` maps the starting settings to the task's safe state (default: the
        start itself, a beamline's safe state; a battery's is no power): where every trip,
        abort, reject and unconverged end puts the knobs, ramped and verified."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if mode == "approve" and approver is None:
            raise ValueError("approve mode needs an approver")
        self.plant, self.config, self.mode = plant, config or SafetyConfig(), mode
        self.interlocks = interlocks or []
        self.knobs, self.readings = plant.knobs, plant.readings
        self.snapshot_path, self.approver, self.on_event = snapshot_path, approver, on_event
        self.snapshot_context = snapshot_context or {}
        self.safe_settings, self.safe_label = safe_settings, safe_label
        self.events: list[SafetyEvent] = []
        self.abort_requested = threading.Event()
        self._abort_reason = "operator abort"
        self.tripped: SafetyTrip | None = None
        self.writes = 0
        self.lower, self.upper = knob_bounds(plant.knobs)
        self.max_step = knob_steps(plant.knobs)
        self.snapshot: np.ndarray | None = None
        self.last_readings: Readings | None = None
        self.settings: np.ndarray | None = None
        # What a model predicts a proposed step does (recorded with the proposal, shown to the
        # operator before approving): (settings now, proposed settings) -> dict or None.
        self.predict: Callable[[np.ndarray, np.ndarray], dict | None] | None = None
        self._interlock_start: dict[str, float] = {}
        self._written: list[np.ndarray] = []  # every write's settings, for the cumulative budgets
        self._started = 0.0
        self._last_write = 0.0

    # -- bookkeeping ---------------------------------------------------------------
    def _expected(self, safe: np.ndarray) -> dict:
        """``{"expected": prediction}`` of a proposed step where a model predicts it; a
        prediction that fails is left out (it informs the operator, it guards nothing)."""
        if self.predict is None or self.mode == "auto":
            return {}
        try:
            prediction = self.predict(self.settings.copy(), safe.copy())
        except Exception:  # noqa: BLE001 - see above
            log.exception("prediction of a proposed step failed")
            return {}
        return {"expected": prediction} if prediction else {}

    def _record(self, kind: str, reason: str, **data) -> None:
        log.info("safety %s: %s", kind, reason)
        self.on_event_and_store(SafetyEvent(time.time(), kind, reason, data))

    def begin(self) -> np.ndarray:
        """Snapshot the starting settings (on disk first) and the interlock baselines."""
        self._started = time.monotonic()
        try:
            self.snapshot = self.plant.read_knobs()
            first = self.plant.read()
        except ConnectionLost as exc:
            self._trip(f"connection lost before start: {exc}", restore=False)
        self.settings = self.snapshot.copy()
        if self.snapshot_path:
            write_snapshot(self.snapshot_path, self.plant, self.snapshot, self.snapshot_context)
        self._check_readings(first, baseline=True)
        self.last_readings = first
        return self.snapshot

    def abort(self, reason: str = "operator abort") -> None:
        """Ask the session to stop at the next write or read (thread-safe)."""
        self._abort_reason = reason
        self.abort_requested.set()

    def _restore(self) -> bool:
        """Go to the safe state (by default the snapshot), ramped and verified; record and swallow failures."""
        if self.snapshot is None or self.mode == "dry-run":
            return False
        try:
            target = self.snapshot if self.safe_settings is None else np.asarray(self.safe_settings(self.snapshot.copy()), dtype=float)
            restore_snapshot(self.plant, {"channels": self.plant.channels(target)}, self.on_event_and_store, self.safe_label)
            return True
        except ConnectionLost as exc:
            self._record("restore_failed", f"connection lost during restore: {exc}; snapshot kept at {self.snapshot_path}")
        except (PlantFault, ValueError) as exc:
            self._record("restore_failed", f"{exc}; snapshot kept at {self.snapshot_path}")
        return False

    def _trip(self, reason: str, restore: bool = True, kind: type[SafetyTrip] = SafetyTrip):
        self._record("trip", reason)
        restored = self._restore() if restore else False
        self.tripped = kind(reason, restored, self.snapshot_path)
        raise self.tripped

    def stop_and_restore(self, reason: str) -> bool:
        """End the session without a fault (e.g. target not reached) and restore."""
        self._record("stop", reason)
        return self._restore()

    def fault(self, reason: str) -> bool:
        """An internal error ended the session (policy, task code): record it as a trip and
        restore the start, verified (nothing is left where the error found it)."""
        self._record("trip", reason)
        return self._restore()

    def on_event_and_store(self, event: SafetyEvent) -> None:
        self.events.append(event)
        if self.on_event:
            self.on_event(event)

    def _session_guards(self) -> None:
        if self.tripped is not None:
            raise self.tripped
        if self.abort_requested.is_set():
            self._trip(self._abort_reason, kind=OperatorAbort)
        if time.monotonic() - self._started > self.config.max_duration_s:
            self._trip(f"session longer than {self.config.max_duration_s} s")

    # -- plant interface -------------------------------------------------------------
    def read_knobs(self) -> np.ndarray:
        self._session_guards()
        if self.mode == "dry-run":
            return self.settings.copy()
        try:
            return self.plant.read_knobs()
        except ConnectionLost as exc:
            self._trip(f"connection lost: {exc}", restore=False)

    def filter(self, proposed: np.ndarray) -> np.ndarray:
        """Apply hard, step and excursion limits; record every change with its reason."""
        names = [k.name for k in self.knobs]
        current = self.settings
        excursion = (self.config.max_excursion_steps * self.max_step if self.config.max_excursion_steps
                     else self.config.max_excursion)
        if not np.all(np.isfinite(proposed)):
            self._trip("proposed settings contain NaN or inf")
        # Gates and the budget first (they only move a knob towards its safe value), then
        # the step, excursion and hard limits; if those pull it back past a gate or over
        # the budget the session stops.
        safe = self._within_budgets(self._through_gates(proposed.astype(float).copy()))
        for label, lo, hi in (
            ("per-step change limit", current - self.max_step, current + self.max_step),
            ("total excursion limit", self.snapshot - excursion, self.snapshot + excursion),
            ("hard limit", self.lower, self.upper),
        ):
            clipped = np.clip(safe, lo, hi)
            changed = np.flatnonzero(np.abs(clipped - safe) > 1e-12)
            if len(changed):
                self._record("clamp", f"{label}: " + ", ".join(f"{names[i]} {safe[i]:.4g} -> {clipped[i]:.4g}" for i in changed),
                             knobs=[names[i] for i in changed], before=safe[changed].tolist(), after=clipped[changed].tolist())
            safe = clipped
        if not np.array_equal(self._within_budgets(safe, record=False), safe):
            self._trip("the step limit keeps the setting beyond the cumulative budget: "
                       + ", ".join(b.label for b in self.config.budgets))
        if not np.array_equal(self._through_gates(safe, record=False), safe):
            self._trip("the step limit keeps the setting beyond a gate: " + ", ".join(g.label for g in self.config.gates))
        return safe

    def _through_gates(self, safe: np.ndarray, record: bool = True) -> np.ndarray:
        """`safe` with every gated knob held at its gate's value while the gate's reading is above its level."""
        knobs, readings = [k.name for k in self.knobs], [r.name.lower() for r in self.readings]  # as tasks match readings
        for gate in self.config.gates:
            if gate.knob not in knobs or gate.reading.lower() not in readings:
                self._trip(f"safety gate {gate.label!r}: no knob {gate.knob!r} or no reading {gate.reading!r} "
                           f"(knobs: {', '.join(knobs)}; readings: {', '.join(r.name for r in self.readings)})")
            i, level = knobs.index(gate.knob), self.last_readings.values[readings.index(gate.reading.lower())]
            if gate.closed(level) and abs(safe[i] - gate.value) > 1e-12:
                if record:
                    self._record("clamp", f"{gate.label}: {gate.describe(level)}, "
                                 f"{gate.knob} {safe[i]:.4g} -> {gate.value:.4g}", knobs=[gate.knob],
                                 before=[float(safe[i])], after=[gate.value])
                safe = safe.copy()
                safe[i] = gate.value
        return safe

    def budget_used(self, budget: CumulativeLimit, window: int | None = None) -> float:
        """What `budget` counts over the last `window` writes (default: its whole window)."""
        n = budget.window_writes if window is None else window
        i = [k.name for k in self.knobs].index(budget.knob)
        values = np.array([w[i] for w in self._written[-n:]] if n > 0 else [], dtype=float)
        signed = values if budget.direction == "positive" else -values
        return float(np.clip(signed, 0.0, None).sum() * budget.per_write)

    def _within_budgets(self, safe: np.ndarray, record: bool = True) -> np.ndarray:
        """`safe` with every budgeted knob cut to what its budget has left (each cut recorded)."""
        names = [k.name for k in self.knobs]
        for budget in self.config.budgets:
            if budget.knob not in names:
                self._trip(f"safety budget {budget.label!r}: no knob named {budget.knob!r} (knobs: {', '.join(names)})")
            i = names.index(budget.knob)
            used = self.budget_used(budget, budget.window_writes - 1)  # the window this write completes
            room = max(0.0, budget.limit - used) / budget.per_write  # the most this write may deliver
            sign = 1.0 if budget.direction == "positive" else -1.0
            if sign * safe[i] > room + 1e-12:
                clipped = sign * room
                if record:
                    self._record("clamp", f"{budget.label}: {used:.4g} of {budget.limit:.4g} {budget.unit} used, "
                                 f"{budget.knob} {safe[i]:.4g} -> {clipped:.4g}", knobs=[budget.knob],
                                 before=[float(safe[i])], after=[float(clipped)])
                safe = safe.copy()
                safe[i] = clipped
        return safe

    def write_knobs(self, values: np.ndarray) -> None:
        self._session_guards()
        if self.writes >= self.config.max_steps:
            self._trip(f"more than {self.config.max_steps} steps")
        proposed = np.asarray(values, dtype=float)
        safe = self.filter(proposed)
        names = [k.name for k in self.knobs]
        expected = self._expected(safe)
        if self.mode == "dry-run":
            self._record("proposal", "dry-run: not written", proposed=proposed.tolist(), safe=safe.tolist(), **expected)
            self.settings = safe
            self._written.append(safe.copy())
            self.writes += 1
            return
        if self.mode == "approve":
            self._record("proposal", "waiting for operator approval", proposed=proposed.tolist(), safe=safe.tolist(), **expected)
            approved = self.approver(self.settings.copy(), safe.copy(), names)
            self._session_guards()  # an abort may have arrived while waiting
            if not approved:
                self._record("rejected", "operator rejected the step")
                self._trip("operator rejected the proposed step", kind=OperatorRejected)
            self._record("approved", "operator approved the step")
        wait = self.config.min_write_interval_s - (time.monotonic() - self._last_write)
        if wait > 0:
            self._record("delay", f"write rate limit: waited {wait:.3f} s")
            time.sleep(wait)
        try:
            self.plant.write_knobs(safe)
        except ConnectionLost as exc:
            self._trip(f"connection lost while writing: {exc}", restore=False)
        except PlantFault as exc:
            self._trip(f"write not verified: {exc}")
        self._last_write = time.monotonic()
        self.settings = safe
        self._written.append(safe.copy())
        self.writes += 1

    def read(self) -> Readings:
        self._session_guards()
        try:
            readings = self.plant.read()
        except ConnectionLost as exc:
            self._trip(f"connection lost: {exc}", restore=False)
        self._check_readings(readings)
        self.last_readings = readings
        return readings

    def margin_used(self, r: Readings, signed: bool = False) -> float:
        """The largest fraction of any interlock's margin (start value to trip level) used by `r`
        (`signed`: negative when every interlock moved away from its trip level)."""
        use = max((rule.margin_used(r.interlocks.get(rule.name, float("nan")), self._interlock_start.get(rule.name),
                                    signed) for rule in self.interlocks), default=0.0)
        return 0.0 if use == -np.inf else use

    def _check_readings(self, r: Readings, baseline: bool = False) -> None:
        names = [s.name for s in self.readings]
        problems = dict(r.problems)
        for i, spec in enumerate(self.readings):
            v = r.values[i]
            if not r.valid[i] and spec.name not in problems:
                problems[spec.name] = "flagged invalid"
            elif not np.isfinite(v):
                problems[spec.name] = "not a number"
            elif v < spec.lower or v > spec.upper:
                problems[spec.name] = f"{v:.4g} outside [{spec.lower}, {spec.upper}]"
            elif abs(v) >= max(abs(spec.lower), abs(spec.upper)) - self.config.saturation_margin:
                problems[spec.name] = f"saturated at {v:.4g}"
        tripped = []
        for rule in self.interlocks:
            value = r.interlocks.get(rule.name, float("nan"))
            if baseline:
                self._interlock_start[rule.name] = value
            reason = rule.violated(value, self._interlock_start.get(rule.name))
            if reason:
                tripped.append(f"interlock: {reason}")
        if problems:
            # an interlock that fell at the same time names the cause (a reading over EPICS carries no reason)
            tripped.append("bad reading: " + "; ".join(f"{k} {v}" for k, v in problems.items() if k in names or k in r.interlocks))
        if tripped:
            self._trip("; ".join(tripped))
