"""Running a trained policy on a machine, step by step, through the safety layer.

The same :class:`OrbitTask` as in training turns readings into observations; the only
difference from simulation is the plant: a :class:`GuardedPlant` around an EPICS (or
any other) plant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from safety.guard import (
    Approver, GuardedPlant, InterlockRule, Mode, OperatorAbort, OperatorRejected, SafetyConfig, SafetyEvent, SafetyTrip,
)
from simulators.beamline.task import OrbitTask, OrbitTaskConfig, rms
from simulators.plant import Plant

from .policy import Policy

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
    readings: list[float]  # BPM readings after the step, mm
    interlocks: dict[str, float]
    reward: float
    rms_mm: float
    latency_s: float
    time: float


@dataclass
class SessionResult:
    initial_rms_mm: float | None
    final_rms_mm: float | None
    steps: int
    wall_s: float
    success: bool
    trips: list[str]
    restored: bool
    snapshot: str | None
    status: str = "completed"  # completed, not_converged, tripped, aborted, rejected, dry-run
    step_records: list[StepRecord] = field(default_factory=list)
    events: list[SafetyEvent] = field(default_factory=list)

    def summary(self) -> dict:
        keys = ("initial_rms_mm", "final_rms_mm", "steps", "wall_s", "success", "trips", "restored", "snapshot")
        out = {k: getattr(self, k) for k in keys}
        out["status"] = self.status
        return out


def run_orbit_session(
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
) -> SessionResult:
    """Correct the orbit of `plant` with `policy`; never raises on a trip (see result)."""
    start = time.perf_counter()
    config = OrbitTaskConfig(**policy.metadata.get("task_config", {}))
    guard = GuardedPlant(plant, safety, interlocks, mode, snapshot_path, approver, on_event, snapshot_context)
    if guard_ready:
        guard_ready(guard)
    task = OrbitTask(
        n_readings=len(plant.readings),
        knob_lower=np.array([k.lower for k in plant.knobs]),
        knob_upper=np.array([k.upper for k in plant.knobs]),
        config=config,
    )
    records: list[StepRecord] = []
    initial = final = None
    success, status = False, "completed"
    try:
        guard.begin()
        already = float(rms(guard.read().values))
        if already < config.target_rms_mm:
            # Nothing to do: do not touch a machine that is already within target.
            return SessionResult(already, already, 0, round(time.perf_counter() - start, 3), True, [], False,
                                 str(snapshot_path) if snapshot_path else None, "completed", [], guard.events)
        obs = task.start(guard)
        initial = float(rms(task.initial_readings))
        guard.on_event_and_store(SafetyEvent(time.time(), "start", f"starting orbit RMS {initial:.3f} mm", {
            "readings": task.initial_readings.tolist(), "settings": guard.snapshot.tolist(),
            "readings_after_probe": task.readings.tolist()}))
        final = float(rms(task.readings))
        n_steps = 1 if mode == "dry-run" else config.max_steps
        for _ in range(n_steps):
            if before_step:
                before_step()  # e.g. wait while an operator has paused the session
            t0 = time.perf_counter()
            seen = obs
            action = policy.act(seen)
            proposed = task.proposed_settings(action)
            obs, reward, terminated, truncated, info = task.step(guard, action)
            record = StepRecord(
                step=task.steps, observation=seen.tolist(), action=np.asarray(action, dtype=float).tolist(),
                proposed=proposed.tolist(), safe=guard.settings.tolist(), readbacks=task.settings.tolist(),
                readings=task.readings.tolist(), interlocks=dict(guard.last_readings.interlocks) if guard.last_readings else {},
                reward=float(reward), rms_mm=info["rms_mm"], latency_s=time.perf_counter() - t0, time=time.time(),
            )
            records.append(record)
            if on_step:
                on_step(record)
            final = info["rms_mm"]
            if terminated or truncated:
                success = bool(info["success"])
                break
        if mode == "dry-run":
            status = "dry-run"
        elif not success:
            status = "not_converged"
            guard.stop_and_restore(f"target RMS not reached in {task.steps} steps")
    except OperatorRejected:
        status = "rejected"
    except OperatorAbort:
        status = "aborted"
    except SafetyTrip:
        status = "tripped"
    trips = [e.reason for e in guard.events if e.kind == "trip"]
    restored = any(e.kind == "restore" for e in guard.events)
    return SessionResult(
        initial_rms_mm=initial, final_rms_mm=final, steps=task.steps, wall_s=round(time.perf_counter() - start, 3),
        success=success, trips=trips, restored=restored,
        snapshot=str(snapshot_path) if snapshot_path else None, status=status,
        step_records=records, events=guard.events,
    )
