"""Running a trained policy on a machine, step by step, through the safety layer.

The task the policy was trained on (from the registry) turns readings into
observations, through the same episode loop as in training; the only difference from
simulation is the plant: a :class:`GuardedPlant` around an EPICS (or any other) plant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.plant import Event, Plant
from core.registry import get_task
from core.task import StepOutcome, Task, run_episode
from safety.guard import (
    Approver, GuardedPlant, InterlockRule, Mode, OperatorAbort, OperatorRejected, SafetyConfig, SafetyEvent, SafetyTrip,
)

from .knob_map import KnobMap, knob_map_for, mapped
from .policy import Policy, refuse_unfit_for_mode
from .response import ResponseMismatch, check_response

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What happened in one control step."""

    step: int
    observation: list[float]  # what the policy saw before acting
    action: list[float]  # its answer, in [-1, 1]
    proposed: list[float]  # settings it asked for (simulator units)
    safe: list[float]  # settings after the safety layer, as written
    readbacks: list[float]  # settings read back from the machine
    readings: list[float]  # readings after the step, in the plant's reading order
    interlocks: dict[str, float]
    reward: float
    metrics: dict[str, float]  # the task's metrics after the step, by name
    latency_s: float
    time: float
    by: str = "policy"  # who chose the action: the policy, or a task-level behaviour


@dataclass
class SessionResult:
    task: str
    metric: str  # name of the task's primary metric
    initial: float | None  # primary metric as found
    final: float | None
    steps: int
    wall_s: float
    success: bool
    trips: list[str]
    restored: bool
    snapshot: str | None
    status: str = "completed"  # completed, not_converged, tripped, aborted, rejected, dry-run, faulted, mismatch
    step_records: list[StepRecord] = field(default_factory=list)
    events: list[SafetyEvent] = field(default_factory=list)

    def summary(self) -> dict:
        return {"task": self.task, "metric": self.metric, f"initial_{self.metric}": self.initial,
                f"final_{self.metric}": self.final, "steps": self.steps, "wall_s": self.wall_s, "success": self.success,
                "trips": self.trips, "restored": self.restored, "snapshot": self.snapshot, "status": self.status}


def step_limit_warning(plant: Plant, trained_step: np.ndarray) -> SafetyEvent | None:
    """A warning when the machine allows smaller steps than the policy was trained with.

    Safe (the guard clips each step to the machine's limit) but not what the agent
    learned: it tunes more slowly and may not reach its target in the step budget.
    """
    short = [(k.name, k.max_step, t) for k, t in zip(plant.knobs, trained_step) if k.max_step < t * (1 - 1e-6)]
    if not short:
        return None
    listed = ", ".join(f"{name} {limit:.4g} < {trained:.4g}" for name, limit, trained in short)
    return SafetyEvent(time.time(), "warning", f"machine's largest step below the policy's training step ({listed}, "
                       "lattice units): steps will be clipped and tuning will be slower than trained",
                       {"knobs": [s[0] for s in short], "max_step": [s[1] for s in short], "trained_step": [s[2] for s in short]})


def policy_task(plant: Plant, policy: Policy) -> Task:
    """The task `policy` was trained on, on `plant` (its knobs, its readings)."""
    definition = get_task(policy.task)
    return definition.task_for_policy(plant.knobs, plant.readings, policy.metadata)


def session_knob_map(policy: Policy, machine_setup) -> KnobMap | None:
    """The knob map a session of `policy` on a machine of `machine_setup` runs through:
    None when the policy's model is the setup's own (or either has none); ConfigError,
    before anything is written, when no usable map exists."""
    if machine_setup is None:
        return None
    definition = get_task(policy.task)
    expected = definition.expected_response(policy.metadata)
    return knob_map_for(definition.setup_response(machine_setup), None if expected is None else expected["matrix"])


def default_safety(policy: Policy, plant: Plant | None = None) -> SafetyConfig:
    """The session limits the policy's task declares; on a machine that runs in periods
    (a clock), the session may last as long as its steps' periods can (a real battery's
    15-minute periods, not the compressed ones of the virtual IOC)."""
    limits = get_task(policy.task).safety_limits(policy.metadata)
    longest_period = getattr(plant, "longest_period_s", None)
    if longest_period:
        steps = limits.get("max_steps", SafetyConfig.model_fields["max_steps"].default)
        longest_session = (steps + 2) * longest_period  # the opening reads, then one period per step at most
        limits["max_duration_s"] = max(limits.get("max_duration_s", SafetyConfig.model_fields["max_duration_s"].default),
                                       longest_session)
    return SafetyConfig(**limits)


def expected_effect(response: dict | None, task: Task, primary, guard: GuardedPlant):
    """What the policy's model predicts a proposed step does to the readings and to the
    task's headline metric, from the readings before it (None without a model): shown
    with the proposal, so that even the opening probe is not approved blind."""
    if response is None:
        return None
    matrix = np.asarray(response["matrix"], dtype=float)
    names = [r.name for r in guard.readings]
    units = {r.name: r.unit for r in guard.readings}
    unit = "" if primary.unit == "1" else f" {primary.unit}"

    def predict(current: np.ndarray, proposed: np.ndarray) -> dict | None:
        if guard.last_readings is None:
            return None
        now = np.asarray(guard.last_readings.values, dtype=float)
        change = matrix @ (np.asarray(proposed, dtype=float) - np.asarray(current, dtype=float))
        if len(change) > len(now) or not np.all(np.isfinite(now[: len(change)])):
            return None
        after = now.copy()
        after[: len(change)] += change  # the model's readings come first (e.g. BPMs before monitors)
        before, after = task.measure(now)[primary.name], task.measure(after)[primary.name]
        k = int(np.argmax(np.abs(change)))
        return {"source": "the policy's model of its lattice", "metric": primary.name, "before": before, "after": after,
                "reading_change": change.round(6).tolist(),
                "summary": f"{primary.label or primary.name} {before:.3f} → {after:.3f}{unit}; largest reading change "
                           f"{names[k]} {change[k]:+.3f} {units[names[k]]}"}

    return predict


# The mismatch guard's pilot: in an autonomous session the first write (the opening
# probe) is preceded by this fraction of it, and the machine's response compared with the
# policy's model. A machine that answers several times harder than the model (a kick per
# unit 4x ours) loses its beam to the full probe before the guard can look (measured:
# 3 of 20 foreign cryomodules); a quarter of it kept every one of them. One reading is
# noisier than the full probe's, so the pilot stops only a gross mismatch: beyond the
# limit plus twice its noise floor; the full probe is then checked as before.
PILOT_FRACTION = 0.25


class PilotFirstWrite:
    """The plant as the task sees it: the first write goes out first as a pilot of
    ``PILOT_FRACTION`` of the change, judged by `judge(knob_change, reading_change)`
    (which raises :class:`ResponseMismatch`); everything else passes to `guard`."""

    def __init__(self, guard: GuardedPlant, judge: Callable[[np.ndarray, np.ndarray], None]):
        self._guard, self._judge, self._done = guard, judge, False

    def __getattr__(self, name):
        return getattr(self._guard, name)

    def write_knobs(self, values: np.ndarray) -> None:
        if not self._done:
            self._done = True
            start = np.asarray(self._guard.settings, dtype=float)
            # The guard's last reading is of these settings: every session reads before it writes.
            before = np.asarray(self._guard.last_readings.values, dtype=float)
            pilot = start + PILOT_FRACTION * (np.asarray(values, dtype=float) - start)
            self._guard.write_knobs(pilot)
            after = np.asarray(self._guard.read().values, dtype=float)
            self._judge(pilot - start, after - before)
        self._guard.write_knobs(values)


def run_session(
    plant: Plant,
    policy: Policy,
    mode: Mode = "auto",
    safety: SafetyConfig | None = None,
    interlocks: list[InterlockRule] | None = None,
    snapshot_path: Path | None = None,
    snapshot_context: dict | None = None,
    approver: Approver | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
    on_event: Callable[[SafetyEvent], None] | None = None,
    guard_ready: Callable[[GuardedPlant], None] | None = None,
    before_step: Callable[[], None] | None = None,
    measured_response: np.ndarray | None = None,
    knob_map: KnobMap | None = None,
) -> SessionResult:
    """Tune `plant` with `policy` (any registered task, from the policy); never raises on a trip.

    Mismatch guard: if the policy's task has a response model, the machine's response to
    the opening probe is compared with it before the first policy step; beyond
    ``safety.max_response_mismatch`` the session stops and restores (status ``mismatch``).
    A dry-run writes nothing, so it compares `measured_response` (the machine's last
    recorded response measurement) instead, when there is one.

    With a `knob_map` (:func:`session_knob_map`: the machine's calibrated model differs
    from the policy's) the policy's settings reach the guard through it, and the mismatch
    guard checks the machine against the calibrated model instead of the policy's.
    """
    unfit = refuse_unfit_for_mode(policy, mode)  # before anything touches the plant
    start = time.perf_counter()
    task = policy_task(plant, policy)
    primary = task.metrics[0]
    definition = get_task(policy.task)
    guard = GuardedPlant(plant, safety or default_safety(policy, plant), interlocks, mode, snapshot_path, approver, on_event,
                         snapshot_context, lambda start: definition.safe_settings(plant.knobs, start),
                         definition.safe_state_label)
    expected = definition.expected_response(policy.metadata)  # the policy's response model, if its task has one
    if knob_map is not None and expected is not None:
        # The guard sees physical settings: what they should do is the calibrated model's.
        expected = {**expected, "matrix": knob_map.machine_response}
    guard.predict = expected_effect(expected, task, primary, guard)
    if guard_ready:
        guard_ready(guard)
    records: list[StepRecord] = []
    initial = final = None
    success, status = False, "completed"

    def result() -> SessionResult:
        return SessionResult(
            task=policy.task, metric=primary.name, initial=initial, final=final,
            steps=task.steps, wall_s=round(time.perf_counter() - start, 3), success=success,
            trips=[e.reason for e in guard.events if e.kind == "trip"],
            restored=any(e.kind == "restore" for e in guard.events),
            snapshot=str(snapshot_path) if snapshot_path else None, status=status,
            step_records=records, events=guard.events,
        )

    def started(_obs) -> None:
        nonlocal initial, final
        initial = task.measure(task.initial_readings)[primary.name]
        now = task.metric_values()
        final = now[primary.name]
        unit = "" if primary.unit == "1" else f" {primary.unit}"
        guard.on_event_and_store(Event(time.time(), "start", f"starting {primary.label or primary.name} {initial:.3f}{unit}", {
            "readings": np.asarray(task.initial_readings).tolist(), "settings": guard.snapshot.tolist(),
            "readings_after_probe": np.asarray(task.last_readings).tolist(), "metrics": now}))
        check_machine_matches_policy()

    def stop_if_mismatched(check, limit: float, source: str) -> dict:
        """Raise ResponseMismatch (recorded as an event) beyond `limit`; else the check's data."""
        data = {"mismatch": check.mismatch, "cosine": check.cosine, "noise_floor": check.noise_floor, "limit": limit,
                "source": source}
        if check.mismatch > limit:
            message = (f"this machine does not match the policy's lattice ({check.describe()} > {limit:.2f}, "
                       f"from the {source}): run measure-response and calibrate")
            guard.on_event_and_store(Event(time.time(), "mismatch", message, data))
            raise ResponseMismatch(message)
        return data

    def check_pilot(knob_change: np.ndarray, reading_change: np.ndarray) -> None:
        check = check_response(np.asarray(expected["matrix"]), knob_change, reading_change, expected["noise"])
        if check is not None:  # else too small to judge: the full probe is checked
            stop_if_mismatched(check, guard.config.max_response_mismatch + 2 * check.noise_floor,
                               f"pilot of {PILOT_FRACTION:.0%} of the opening probe")

    def check_machine_matches_policy() -> None:
        if expected is None:
            return
        knob_change = np.asarray(guard.settings, dtype=float) - guard.snapshot
        if mode == "dry-run":
            if measured_response is None:
                guard.on_event_and_store(Event(time.time(), "warning", "dry-run writes nothing, so it cannot check that "
                                               "the machine responds as the policy's model predicts (no response "
                                               "measurement of this machine: run tbsac measure-response)"))
                return
            reading_change, source = np.asarray(measured_response) @ knob_change, "recorded response measurement"
        else:
            reading_change, source = np.asarray(task.last_readings) - np.asarray(task.initial_readings), "opening probe"
        check = check_response(np.asarray(expected["matrix"]), knob_change, reading_change, expected["noise"])
        limit = guard.config.max_response_mismatch
        if check is None:
            guard.on_event_and_store(Event(time.time(), "warning", f"{source}: too small to check the machine responds "
                                           "as the policy's model predicts"))
            return
        data = stop_if_mismatched(check, limit, source)
        guard.on_event_and_store(Event(time.time(), "response_check", f"machine matches the policy's model: "
                                       f"{check.describe()} <= {limit:.2f} ({source})", data))

    def stepped(s: StepOutcome) -> None:
        nonlocal final
        metrics = s.metrics
        record = StepRecord(
            step=s.step, observation=np.asarray(s.observation, dtype=float).tolist(), action=s.action.tolist(),
            proposed=s.proposed.tolist(), safe=guard.settings.tolist(), readbacks=np.asarray(task.settings).tolist(),
            readings=np.asarray(task.last_readings, dtype=float).tolist(),
            interlocks=dict(guard.last_readings.interlocks) if guard.last_readings else {},
            reward=s.reward, metrics=metrics, latency_s=s.latency_s, time=time.time(), by=s.by,
        )
        records.append(record)
        final = metrics[primary.name]
        if on_step:
            on_step(record)

    try:
        if unfit:  # approve and dry-run may go on: the operator sees every step
            guard.on_event_and_store(Event(time.time(), "warning", unfit))
        guard.begin()
        warning = step_limit_warning(plant, task.trained_step)
        if warning:
            guard.on_event_and_store(warning)
        found = guard.read()
        if task.untouched(found.values):
            initial = final = task.measure(found.values)[primary.name]
            success = True
            return result()
        if knob_map is not None:
            guard.on_event_and_store(Event(time.time(), "knob_map", "the policy's lattice differs from this machine's "
                                           f"calibrated one: its settings go through a knob map ({knob_map.describe()})",
                                           {"matrix": knob_map.matrix.round(6).tolist(), "residual": knob_map.residual,
                                            "condition": knob_map.condition}))
        # Autonomous: nobody approves the opening probe, so a pilot of it is judged first.
        piloted = PilotFirstWrite(guard, check_pilot) if mode == "auto" and expected is not None else guard
        seen_by_task = mapped(piloted, knob_map, guard.snapshot)  # the policy's knobs, when they are mapped
        episode = run_episode(task, seen_by_task, policy.act, max_steps=1 if mode == "dry-run" else task.max_steps,
                              on_start=started, on_step=stepped, on_event=guard.on_event_and_store, before_step=before_step)
        if mode == "dry-run":
            status = "dry-run"
        else:
            outcome = task.outcome(initial, final, episode.info)
            success, status = outcome.success, outcome.status
            if outcome.restore_reason:
                guard.stop_and_restore(outcome.restore_reason)
            elif outcome.note:
                guard.on_event_and_store(Event(time.time(), "stop", outcome.note))
    except ResponseMismatch as exc:
        status = "mismatch"
        if mode == "dry-run":
            status = "dry-run"  # nothing was written; the mismatch event says what a real run would do
        else:
            guard.stop_and_restore(str(exc))
    except Exception as exc:  # noqa: BLE001 - see stopped_status
        status = stopped_status(guard, exc, "session")
    return result()


def stopped_status(guard: GuardedPlant, exc: Exception, what: str) -> str:
    """The status of a session `exc` stopped (call it in the except block): rejected,
    aborted, tripped, or faulted -- an internal fault of ours still puts the machine in its
    safe state, and one before the start is recorded as a trip."""
    if isinstance(exc, OperatorRejected):
        return "rejected"
    if isinstance(exc, OperatorAbort):
        return "aborted"
    if isinstance(exc, SafetyTrip):
        return "tripped"
    log.exception("%s failed", what)
    if guard.snapshot is not None:
        guard.fault(f"internal error: {type(exc).__name__}: {exc}")
    else:
        guard.on_event_and_store(Event(time.time(), "trip", f"internal error before the start: {type(exc).__name__}: {exc}"))
    return "faulted"


def run_dial_in(
    plant: Plant,
    policy: Policy,
    target: np.ndarray,
    label: str,
    approver: Approver,
    safety: SafetyConfig | None = None,
    interlocks: list[InterlockRule] | None = None,
    snapshot_path: Path | None = None,
    snapshot_context: dict | None = None,
    on_event: Callable[[SafetyEvent], None] | None = None,
    guard_ready: Callable[[GuardedPlant], None] | None = None,
    before_step: Callable[[], None] | None = None,
) -> SessionResult:
    """Walk the knobs to `target` (a recorded setting, simulator units), in approve mode
    through the safety layer: each write within the largest step and approved by the
    operator, the interlocks read after each; the machine is left at the target, verified.
    A reject, an abort or a trip puts it in the task's safe state like any session."""
    start = time.perf_counter()
    task = policy_task(plant, policy)
    primary = task.metrics[0]
    definition = get_task(policy.task)
    guard = GuardedPlant(plant, safety or default_safety(policy, plant), interlocks, "approve", snapshot_path, approver, on_event,
                         snapshot_context, lambda found: definition.safe_settings(plant.knobs, found), definition.safe_state_label)
    guard.predict = expected_effect(definition.expected_response(policy.metadata), task, primary, guard)
    if guard_ready:
        guard_ready(guard)
    target = np.asarray(target, dtype=float)
    tolerance = np.array([k.tolerance for k in plant.knobs])
    initial = final = None
    status, writes = "completed", 0
    try:
        guard.begin()
        initial = final = task.measure(guard.last_readings.values)[primary.name]
        guard.on_event_and_store(Event(time.time(), "start", f"dialling in {label}", {
            "readings": np.asarray(guard.last_readings.values).tolist(), "settings": guard.snapshot.tolist(),
            "target": target.tolist()}))
        while np.any(np.abs(target - guard.settings) > tolerance):
            if before_step:
                before_step()
            # The guard cuts the move to each knob's largest step; one approval per write.
            guard.write_knobs(target)
            readings = guard.read()
            final = task.measure(readings.values)[primary.name]
            writes += 1  # the guard trips (and restores) beyond its max_steps
        guard.on_event_and_store(Event(time.time(), "dial_in", f"{label} dialled in ({writes} approved write"
                                       f"{'s' if writes != 1 else ''}) and verified", {
                                           "knobs": {k.name: float(v) for k, v in zip(plant.knobs, guard.settings)},
                                           "readings": [float(v) if np.isfinite(v) else None for v in guard.last_readings.values],
                                           "writes": writes}))
    except Exception as exc:  # noqa: BLE001 - see stopped_status
        status = stopped_status(guard, exc, "dial-in")
    return SessionResult(task=policy.task, metric=primary.name, initial=initial, final=final, steps=0,
                         wall_s=round(time.perf_counter() - start, 3), success=status == "completed",
                         trips=[e.reason for e in guard.events if e.kind == "trip"],
                         restored=any(e.kind == "restore" for e in guard.events),
                         snapshot=str(snapshot_path) if snapshot_path else None, status=status, events=guard.events)
