"""Recording sessions and training runs into the store as they happen."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import yaml

from safety.guard import SafetyEvent

from .policy import Policy, file_sha256
from .session import SessionResult, StepRecord
from .store import Store

log = logging.getLogger(__name__)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def register_policy(store: Store, policy: Policy) -> int:
    return store.add_policy(policy.path, file_sha256(policy.path), policy.metadata).id


class SessionRecorder:
    """Creates the session row, then commits every step and event as it happens."""

    def __init__(self, store: Store, machine: dict, policy: Policy, operator: str, mode: str, snapshot: str | None):
        self.store = store
        machine_row = store.add_machine(machine["name"], machine["kind"], machine["content"], machine.get("path"))
        self.machine_id = machine_row.id
        self.policy_id = register_policy(store, policy)
        row = store.start_session(self.machine_id, self.policy_id, operator, mode, snapshot, policy.metadata.get("task_config", {}))
        self.session_id = row.id

    def on_step(self, record: StepRecord) -> None:
        self.store.add_step(
            self.session_id, step=record.step, observation=record.observation, action=record.action,
            proposed=record.proposed, safe=record.safe, readbacks=record.readbacks, readings=record.readings,
            interlocks=record.interlocks, reward=record.reward,
            rms_mm=record.rms_mm if record.rms_mm == record.rms_mm else None,
            latency_s=record.latency_s, time=_utc(record.time),
        )

    def on_event(self, event: SafetyEvent) -> None:
        self.store.add_event(self.session_id, _utc(event.time), event.kind, event.reason, event.data)

    def operator_event(self, kind: str, reason: str, **data) -> None:
        self.store.add_event(self.session_id, dt.datetime.now(dt.timezone.utc), kind, reason, data)

    def finish(self, result: SessionResult) -> None:
        self.store.end_session(self.session_id, result.status, result.summary())


def machine_record_from_file(machine, path: Path) -> dict:
    return {"name": machine.name, "kind": "epics", "content": Path(path).read_text(), "path": str(Path(path).resolve())}


def machine_record_simulated(lattice_name: str, errors: str, seed: int) -> dict:
    spec = {"lattice": lattice_name, "errors": errors, "seed": seed}
    return {"name": f"sim-{lattice_name}", "kind": "simulated", "content": yaml.safe_dump(spec), "path": None}
