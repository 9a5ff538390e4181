"""Sessions running in the background of the control server, one per machine."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError
from core.plant import Plant, PlantFault
from safety.guard import MODES, GuardedPlant, read_snapshot, restore_snapshot

from .locks import MachineBusy, MachineLock, holder_alive
from .machines import SIM_PREFIX, Machine, open_machine
from .paths import unique_snapshot_path
from .policy import Policy
from .recording import SessionRecorder
from .session import run_session
from .store import SessionRow, Store

log = logging.getLogger(__name__)



class Conflict(RuntimeError):
    """The request conflicts with the current state (HTTP 409)."""


class NotFound(LookupError):
    """No such session or machine (HTTP 404)."""


@dataclass
class ActiveSession:
    session_id: int
    machine: str
    mode: str
    recorder: SessionRecorder
    plant: Plant
    thread: threading.Thread | None = None
    guard: GuardedPlant | None = None
    running: threading.Event = field(default_factory=threading.Event)  # cleared while paused
    decided: threading.Event = field(default_factory=threading.Event)
    decision: bool = False
    pending: dict | None = None
    proposals: int = 0
    lock: MachineLock | None = None  # the machine's cross-process lock, held until the session ends
    decision_lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)


class SessionManager:
    """Starts sessions in background threads and relays operator commands to them."""

    def __init__(self, store: Store, sim_step_interval: float = 0.0):
        self.store = store
        self.sim_step_interval = sim_step_interval
        self.active: dict[int, ActiveSession] = {}
        self.finished_plants: dict[int, Plant] = {}  # simulated machines stay restorable
        self.lock = threading.Lock()

    # -- starting ------------------------------------------------------------------
    def start(self, machine: str, policy: str, mode: str, operator: str, seed: int = 0, errors: str = "test") -> int:
        if mode not in MODES:
            raise ConfigError(f"mode: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        with self.lock:
            if any(a.machine == machine and not a.done.is_set() for a in self.active.values()):
                raise Conflict(f"machine {machine} already has an active session")
            opened = open_machine(machine, seed, errors, connect=False)
            agent = Policy.load(policy, opened.definition, opened.setup)
            lock = opened.lock()
            try:
                if lock:
                    lock.acquire()
            except MachineBusy as exc:
                raise Conflict(str(exc)) from None
            try:
                opened.connect()
                recorder = SessionRecorder(self.store, opened.record, agent, operator, mode, None, opened.plant,
                                           opened.panels(), [r.name for r in opened.interlocks])
            except BaseException:
                if lock:
                    lock.release()
                raise
            if lock:
                lock.note_session(recorder.session_id)
            snapshot = unique_snapshot_path(opened.name, recorder.session_id)
            self.store.set_snapshot(recorder.session_id, str(snapshot))
            active = ActiveSession(recorder.session_id, machine, mode, recorder, opened.plant, lock=lock)
            active.running.set()
            context = {"machine": machine, "machine_file": opened.record.get("path"), "session": recorder.session_id}
            active.thread = threading.Thread(
                target=self._run, args=(active, agent, opened, snapshot, context), name=f"session-{recorder.session_id}",
                daemon=True)
            self.active[active.session_id] = active
        active.thread.start()
        return active.session_id

    def _run(self, active: ActiveSession, agent: Policy, machine: Machine, snapshot: Path, context: dict) -> None:
        def before_step() -> None:
            while not active.running.wait(0.05):
                if active.guard and active.guard.abort_requested.is_set():
                    return  # the guard trips at its next call
            if self.sim_step_interval and active.machine.startswith(SIM_PREFIX):
                time.sleep(self.sim_step_interval)

        def approver(current, proposed, names) -> bool:
            with active.decision_lock:
                active.proposals += 1
                active.decided.clear()
                active.pending = {"id": active.proposals, "names": names, "current": current.tolist(), "proposed": proposed.tolist()}
            while not active.decided.wait(0.05):
                if active.guard.abort_requested.is_set():
                    with active.decision_lock:
                        active.pending = None
                    return False  # never write once an abort was asked for
            return active.decision

        try:
            result = run_session(
                active.plant, agent, mode=active.mode, interlocks=machine.interlocks, snapshot_path=snapshot,
                snapshot_context=context,
                approver=approver if active.mode == "approve" else None,
                on_step=active.recorder.on_step, on_event=active.recorder.on_event,
                guard_ready=lambda g: setattr(active, "guard", g), before_step=before_step,
            )
            active.recorder.finish(result)
        except Exception as exc:  # an internal fault must still end the session record
            log.exception("session %s failed", active.session_id)
            active.recorder.operator_event("error", f"internal error: {exc}")
            self.store.end_session(active.session_id, "faulted", {"error": str(exc)})
        finally:
            if active.machine.startswith(SIM_PREFIX):
                self.finished_plants[active.session_id] = active.plant
            if active.lock:
                active.lock.release()
            active.done.set()

    # -- operator commands ---------------------------------------------------------------
    def _active(self, session_id: int) -> ActiveSession:
        active = self.active.get(session_id)
        if active is None or active.done.is_set():
            if self.store.get(SessionRow, session_id) is None:
                raise NotFound(f"session {session_id} does not exist")
            raise Conflict(f"session {session_id} is not running")
        return active

    def pause(self, session_id: int, operator: str) -> None:
        active = self._active(session_id)
        active.running.clear()
        self.store.set_status(session_id, "paused")
        active.recorder.operator_event("pause", f"paused by {operator}")

    def resume(self, session_id: int, operator: str) -> None:
        active = self._active(session_id)
        self.store.set_status(session_id, "running")
        active.recorder.operator_event("resume", f"resumed by {operator}")
        active.running.set()

    def abort(self, session_id: int, operator: str) -> None:
        active = self._active(session_id)
        active.recorder.operator_event("abort", f"abort requested by {operator}")
        while active.guard is None and not active.done.is_set():
            time.sleep(0.01)
        if active.guard:
            active.guard.abort(f"operator abort by {operator}")
        active.running.set()  # a paused session must wake up to stop

    def decide(self, session_id: int, approve: bool, operator: str, proposal: int | None = None) -> None:
        """Approve or reject the pending step; `proposal` pins which one the operator saw."""
        active = self._active(session_id)
        with active.decision_lock:
            pending = active.pending
            if active.mode != "approve" or pending is None:
                raise Conflict(f"session {session_id} has no step waiting for approval")
            if proposal is not None and proposal != pending["id"]:
                raise Conflict(f"proposal {proposal} is no longer pending (now {pending['id']}): look again")
            active.pending = None  # consumed: a second click cannot approve the next step
            active.decision = approve
            active.recorder.operator_event("approve" if approve else "reject",
                                           f"step {pending['id']} {'approved' if approve else 'rejected'} by {operator}",
                                           proposal=pending["id"], proposed=pending["proposed"])
            active.decided.set()

    def restore(self, session_id: int, operator: str) -> None:
        """Restore the starting settings of a session that is no longer running."""
        if session_id in self.active and not self.active[session_id].done.is_set():
            raise Conflict(f"session {session_id} is running: abort it first (an abort restores)")
        row = self.store.get(SessionRow, session_id)
        if row is None:
            raise NotFound(f"session {session_id} does not exist")
        if row.status in ("running", "paused") and holder_alive(row.holder) is not False:
            raise Conflict(f"session {session_id} is running in another process ({row.holder}): stop it there first")
        if not row.snapshot or not Path(row.snapshot).is_file():
            raise Conflict(f"session {session_id} has no snapshot on disk")
        snap = read_snapshot(Path(row.snapshot))
        plant, lock = self.finished_plants.get(session_id), None
        if plant is None:
            if str(snap.get("machine", "")).startswith(SIM_PREFIX):
                raise Conflict(f"session {session_id} ran on a simulated machine that no longer exists")
            opened = open_machine(snap.get("machine_file") or snap["machine"], connect=False)
            lock = opened.lock()
            try:
                if lock:
                    lock.acquire(purpose=f"restore of session {session_id}")
            except MachineBusy as exc:
                raise Conflict(f"refusing to restore session {session_id} while a session is live: {exc}") from None
            plant = opened.connect().plant
        try:
            restore_snapshot(plant, snap)
        except (PlantFault, ValueError) as exc:
            self.store.add_event(session_id, _now(), "restore_failed", f"restore by {operator} failed: {exc}")
            raise Conflict(f"restore failed: {exc}") from None
        finally:
            if lock:
                lock.release()
        self.store.add_event(session_id, _now(), "restore", f"starting settings restored by {operator} and verified")

    def state(self, session_id: int) -> dict:
        active = self.active.get(session_id)
        if active is None or active.done.is_set():
            return {"live": False, "paused": False, "pending": None}
        return {"live": True, "paused": not active.running.is_set(), "pending": active.pending}

    def shutdown(self) -> None:
        for active in list(self.active.values()):
            if not active.done.is_set() and active.guard:
                active.guard.abort("control server shutting down")
                active.running.set()
        for active in list(self.active.values()):
            if active.thread:
                active.thread.join(timeout=30)


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)
