"""Recording sessions and training runs into the store as they happen."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from pathlib import Path

import yaml

from core.plant import Plant
from safety.guard import SafetyEvent

from .policy import Policy, file_sha256
from .session import SessionResult, StepRecord, policy_task
from .store import Store

log = logging.getLogger(__name__)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def register_policy(store: Store, policy: Policy) -> int:
    return store.add_policy(policy.path, file_sha256(policy.path), policy.metadata).id


def finite_or_none(value):
    """JSON (and PostgreSQL) has no NaN or infinity: store null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def session_layout(plant: Plant, policy: Policy, panels: list[dict] | None = None, interlocks: list[str] | None = None,
                   engineering: list[dict] | None = None) -> dict:
    """Names and units of the knobs, readings and metrics a session's steps are keyed by,
    with what a console needs to draw the session without its machine (limits, panels,
    the machine file's engineering unit and scale of each knob)."""
    knobs = [{"name": k.name, "unit": k.unit, "lower": k.lower, "upper": k.upper} for k in plant.knobs]
    for knob, wired in zip(knobs, engineering or []):
        knob["engineering"] = wired
    return {"knobs": knobs,
            "readings": [{"name": r.name, "unit": r.unit} for r in plant.readings],
            "metrics": [dataclasses.asdict(m) for m in policy_task(plant, policy).metrics],
            "panels": panels or [], "interlocks": interlocks or []}


class SessionRecorder:
    """Creates the session row, then commits every step and event as it happens."""

    def __init__(self, store: Store, machine: dict, policy: Policy, operator: str, mode: str, snapshot: str | None, plant: Plant,
                 panels: list[dict] | None = None, interlocks: list[str] | None = None, engineering: list[dict] | None = None):
        self.store = store
        machine_row = store.add_machine(machine["name"], machine["kind"], machine["content"], machine.get("path"))
        self.machine_id = machine_row.id
        self.policy_id = register_policy(store, policy)
        self.layout = session_layout(plant, policy, panels, interlocks, engineering)
        self.knob_names = [k["name"] for k in self.layout["knobs"]]
        self.reading_names = [r["name"] for r in self.layout["readings"]]
        row = store.start_session(self.machine_id, self.policy_id, operator, mode, snapshot, policy.metadata.get("task_config", {}),
                                  task=policy.task, layout=self.layout)
        self.session_id = row.id

    def on_step(self, record: StepRecord) -> None:
        def keyed(values, names):
            return {n: finite_or_none(float(v)) for n, v in zip(names, values)}

        knobs = {c: keyed(getattr(record, c), self.knob_names) for c in ("action", "proposed", "safe", "readbacks")}
        self.store.add_step(
            self.session_id, step=record.step, observation=[finite_or_none(v) for v in record.observation], **knobs,
            readings=keyed(record.readings, self.reading_names),
            interlocks={k: finite_or_none(v) for k, v in record.interlocks.items()}, reward=record.reward,
            metrics={k: finite_or_none(v) for k, v in record.metrics.items()}, by=record.by,
            latency_s=record.latency_s, time=_utc(record.time),
        )

    def on_event(self, event: SafetyEvent) -> None:
        self.store.add_event(self.session_id, _utc(event.time), event.kind, event.reason, event.data)

    def operator_event(self, kind: str, reason: str, **data) -> None:
        self.store.add_event(self.session_id, dt.datetime.now(dt.timezone.utc), kind, reason, data)

    def finish(self, result: SessionResult) -> None:
        self.store.end_session(self.session_id, result.status, {k: finite_or_none(v) for k, v in result.summary().items()})


def machine_record_from_file(machine, path: Path) -> dict:
    return {"name": machine.name, "kind": "epics", "content": Path(path).read_text(), "path": str(Path(path).resolve())}


def machine_record_simulated(lattice_name: str, errors: str, seed: int) -> dict:
    spec = {"lattice": lattice_name, "errors": errors, "seed": seed}
    return {"name": f"sim-{lattice_name}", "kind": "simulated", "content": yaml.safe_dump(spec), "path": None}
