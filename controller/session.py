"""Running a trained policy on a machine, step by step, through the safety layer.

The same task as in training (:class:`OrbitTask`, :class:`TransmissionTask`) turns
readings into observations; the only difference from simulation is the plant: a
:class:`GuardedPlant` around an EPICS (or any other) plant.
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
from simulators.injector.task import TransmissionTask, TransmissionTaskConfig
from simulators.plant import KnobSpec, Plant

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
    readings: list[float]  # readings after the step (BPMs in mm, or ACCT and cup in mA)
    interlocks: dict[str, float]
    reward: float
    rms_mm: float  # orbit task; NaN for the RFQ task
    latency_s: float
    time: float
    transmission: float | None = None  # RFQ task


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
    task: str = "orbit"
    initial_transmission: float | None = None  # RFQ task
    final_transmission: float | None = None

    def summary(self) -> dict:
        metric = ("initial_transmission", "final_transmission") if self.task == "rfq" else ("initial_rms_mm", "final_rms_mm")
        keys = metric + ("steps", "wall_s", "success", "trips", "restored", "snapshot")
        out = {k: getattr(self, k) for k in keys}
        out["status"] = self.status
        return out


RFQ_MAX_EXCURSION_STEPS = 15.0


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


class _OrbitDriver:
    """Orbit correction: stops at the target RMS; not reaching it restores the start."""

    task_name = "orbit"

    def __init__(self, plant: Plant, policy: Policy):
        self.config = OrbitTaskConfig(**policy.metadata.get("task_config", {}))
        self.task = OrbitTask(
            n_readings=len(plant.readings),
            knob_lower=np.array([k.lower for k in plant.knobs]),
            knob_upper=np.array([k.upper for k in plant.knobs]),
            config=self.config,
        )
        self.max_steps = self.config.max_steps
        self.default_safety = SafetyConfig()
        self.trained_step = np.full(len(plant.knobs), self.config.action_scale)

    def nothing_to_do(self, readings) -> float | None:
        # Do not touch a machine that is already within target.
        value = float(rms(readings.values))
        return value if value < self.config.target_rms_mm else None

    def start(self, guard: GuardedPlant) -> tuple[np.ndarray, float, float, SafetyEvent]:
        """(observation, metric as found, metric now, start event): the reset probe moves the machine."""
        obs = self.task.start(guard)
        initial = float(rms(self.task.initial_readings))
        event = SafetyEvent(time.time(), "start", f"starting orbit RMS {initial:.3f} mm", {
            "readings": self.task.initial_readings.tolist(), "settings": guard.snapshot.tolist(),
            "readings_after_probe": self.task.readings.tolist()})
        return obs, initial, float(rms(self.task.readings)), event

    def readings(self) -> list[float]:
        return self.task.readings.tolist()

    def next_action(self, policy: Policy, obs: np.ndarray) -> tuple[np.ndarray, SafetyEvent | None]:
        return policy.act(obs), None

    def ended(self) -> bool:
        return False

    def step_fields(self, info: dict) -> dict:
        return {"rms_mm": info["rms_mm"]}

    def metric(self, info: dict) -> float:
        return info["rms_mm"]

    def finish(self, guard: GuardedPlant, info: dict | None, initial: float, final: float) -> tuple[bool, str]:
        success = bool(info and info.get("success"))
        if success:
            return True, "completed"
        guard.stop_and_restore(f"target RMS not reached in {self.task.steps} steps")
        return False, "not_converged"


class _TransmissionDriver:
    """RFQ transmission: the step budget is used (the optimum is not known), ending on the
    best measured setting when the agent has moved away from it (``return_action``).

    Success is ending at or above the target transmission (85 %). Below it, the new
    settings are kept if they transmit more than the starting ones (an operator keeps
    an improvement) and the start is restored otherwise.
    """

    task_name = "rfq"

    def __init__(self, plant: Plant, policy: Policy):
        meta = policy.metadata
        self.config = TransmissionTaskConfig(**meta.get("task_config", {}))
        steps = meta["action"]["step"]
        if len(steps) != len(plant.knobs):
            raise ValueError(f"policy drives {len(steps)} knobs, the machine has {len(plant.knobs)}")
        # Action scaling as in training; the machine file's limits still apply.
        knobs = [KnobSpec(k.name, k.unit, k.lower, k.upper, step, k.tolerance) for k, step in zip(plant.knobs, steps)]
        self.trained_step = np.asarray(steps, dtype=float)
        self.task = TransmissionTask(knobs, meta["observation"]["nominal_current_ma"], self.config)
        self.max_steps = self.config.max_steps
        # Knobs in T and mrad: the excursion limit is counted in each knob's own steps.
        self.default_safety = SafetyConfig(max_excursion_steps=RFQ_MAX_EXCURSION_STEPS)

    def nothing_to_do(self, readings) -> float | None:
        return None

    def start(self, guard: GuardedPlant) -> tuple[np.ndarray, float, float, SafetyEvent]:
        obs = self.task.start(guard)
        t = self.task.transmission
        event = SafetyEvent(time.time(), "start", f"starting transmission {t:.3f}", {
            "readings": guard.last_readings.values.tolist(), "settings": guard.snapshot.tolist()})
        return obs, t, t, event

    def readings(self) -> list[float]:
        return self.task.last_readings.tolist()

    def next_action(self, policy: Policy, obs: np.ndarray) -> tuple[np.ndarray, SafetyEvent | None]:
        """The policy's action, or the walk back to the best measured setting (announced once)."""
        started = self.task.return_target is not None
        back = self.task.return_action()
        if back is None:
            return policy.act(obs), None
        if started:
            return back, None
        best_t, target = self.task.best_measured
        needed = self.task.steps_to(target)
        return back, SafetyEvent(
            time.time(), "return_to_best",
            f"returning to the best measured setting (transmission {best_t:.3f} at step {self.task.best_step}, "
            f"now {self.task.transmission:.3f}): {needed} step{'s' if needed != 1 else ''}",
            {"from_step": self.task.steps + 1, "target": target.tolist(), "best_transmission": best_t,
             "best_step": self.task.best_step, "step_size": self.task.step_size.tolist()})

    def ended(self) -> bool:
        return self.task.returned

    def step_fields(self, info: dict) -> dict:
        return {"rms_mm": float("nan"), "transmission": info["transmission"]}

    def metric(self, info: dict) -> float:
        return info["transmission"]

    def finish(self, guard: GuardedPlant, info: dict | None, initial: float, final: float) -> tuple[bool, str]:
        if final >= self.config.target_transmission:
            return True, "completed"
        if final <= initial:
            guard.stop_and_restore(f"transmission {final:.3f} not above the start {initial:.3f}")
        else:
            guard.on_event_and_store(SafetyEvent(time.time(), "stop", f"transmission {initial:.3f} -> {final:.3f}, below "
                                                 f"{self.config.target_transmission:.2f}: improved settings kept"))
        return False, "not_converged"


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
) -> SessionResult:
    """Tune `plant` with `policy` (orbit or RFQ task, from the policy); never raises on a trip."""
    start = time.perf_counter()
    driver = _TransmissionDriver(plant, policy) if policy.metadata.get("task") == "rfq" else _OrbitDriver(plant, policy)
    guard = GuardedPlant(plant, safety or driver.default_safety, interlocks, mode, snapshot_path, approver, on_event, snapshot_context)
    if guard_ready:
        guard_ready(guard)
    task = driver.task
    records: list[StepRecord] = []
    initial = final = None
    success, status = False, "completed"

    def result() -> SessionResult:
        rfq = driver.task_name == "rfq"
        return SessionResult(
            initial_rms_mm=None if rfq else initial, final_rms_mm=None if rfq else final,
            initial_transmission=initial if rfq else None, final_transmission=final if rfq else None,
            steps=task.steps, wall_s=round(time.perf_counter() - start, 3), success=success,
            trips=[e.reason for e in guard.events if e.kind == "trip"],
            restored=any(e.kind == "restore" for e in guard.events),
            snapshot=str(snapshot_path) if snapshot_path else None, status=status,
            step_records=records, events=guard.events, task=driver.task_name,
        )

    try:
        guard.begin()
        warning = step_limit_warning(plant, driver.trained_step)
        if warning:
            guard.on_event_and_store(warning)
        already = driver.nothing_to_do(guard.read())
        if already is not None:
            initial = final = already
            success = True
            return result()
        obs, initial, final, event = driver.start(guard)
        guard.on_event_and_store(event)
        info = None
        n_steps = 1 if mode == "dry-run" else driver.max_steps
        for _ in range(n_steps):
            if before_step:
                before_step()  # e.g. wait while an operator has paused the session
            t0 = time.perf_counter()
            seen = obs
            action, announcement = driver.next_action(policy, seen)
            if announcement:
                guard.on_event_and_store(announcement)
            proposed = task.proposed_settings(action)
            obs, reward, terminated, truncated, info = task.step(guard, action)
            record = StepRecord(
                step=task.steps, observation=seen.tolist(), action=np.asarray(action, dtype=float).tolist(),
                proposed=proposed.tolist(), safe=guard.settings.tolist(), readbacks=task.settings.tolist(),
                readings=driver.readings(), interlocks=dict(guard.last_readings.interlocks) if guard.last_readings else {},
                reward=float(reward), latency_s=time.perf_counter() - t0, time=time.time(), **driver.step_fields(info),
            )
            records.append(record)
            if on_step:
                on_step(record)
            final = driver.metric(info)
            if terminated or truncated or driver.ended():
                break
        if mode == "dry-run":
            status = "dry-run"
        else:
            success, status = driver.finish(guard, info, initial, final)
    except OperatorRejected:
        status = "rejected"
    except OperatorAbort:
        status = "aborted"
    except SafetyTrip:
        status = "tripped"
    return result()
