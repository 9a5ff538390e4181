"""Sessions of the control server: each runs in a process of its own, one per machine.

The control loop must not share a process (and its GIL) with the readers of the API:
measured with 20 readers flat out on one process, the step p95 went from 15 to 89 ms.
So the server only relays operator commands; a session process opens the machine,
takes its lock, runs the session through the safety layer and records every step in
the store, which the server reads. Messages over a pipe, parent -> session:
``pause``, ``resume``, ``abort``, ``decide``; session -> parent: ``started``, ``error``,
``pending`` (a step waiting for approval), ``done``. If the server dies, the pipe
closes and the session aborts itself, restoring the machine (no unsupervised session).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.config import ConfigError
from core.plant import PlantFault
from core.registry import task_modules
from safety.guard import MODES, read_snapshot, restore_snapshot

from .locks import MachineBusy, holder_alive
from .machines import MACHINE_DIR, SIM_PREFIX, open_machine
from .paths import unique_snapshot_path
from .store import SessionRow, Store

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a session process imports torch and connects its PVs before it answers


class Conflict(RuntimeError):
    """The request conflicts with the current state (HTTP 409)."""


class NotFound(LookupError):
    """No such session or machine (HTTP 404)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class ActiveSession:
    """The server's view of a session process."""

    session_id: int
    machine: str
    mode: str
    process: multiprocessing.process.BaseProcess
    conn: object  # the parent's end of the pipe
    paused: bool = False
    pending: dict | None = None
    done: threading.Event = field(default_factory=threading.Event)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    decision_lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, *message) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                pass  # the session process has ended


class _Controls:
    """A session process's side of the operator's commands: pause, resume, abort, approve."""

    def __init__(self, conn, min_step_interval: float):
        self.conn, self.min_step_interval = conn, min_step_interval
        self.last_step: float | None = None
        self.running, self.decided, self.finished = threading.Event(), threading.Event(), threading.Event()
        self.running.set()
        self.guard = None
        self.decision = False
        self.proposals = 0

    def listen(self) -> None:
        """Commands from the server until it goes; a closed pipe means the server died: abort."""
        while True:
            try:
                kind, *args = self.conn.recv()
            except (EOFError, OSError):
                kind, args = "abort", ["control server lost: the session stops and restores", "final"]
            if kind == "pause":
                self.running.clear()
            elif kind == "resume":
                self.running.set()
            elif kind == "decide":
                self.decision = args[0]
                self.decided.set()
            elif kind == "abort":
                while self.guard is None and not self.finished.is_set():
                    time.sleep(0.01)
                if self.guard:
                    self.guard.abort(args[0])
                self.running.set()  # a paused session must wake up to stop
                if len(args) > 1:  # the server is gone or going: nothing more will come
                    return

    def before_step(self) -> None:
        while not self.running.wait(0.05):
            if self.guard and self.guard.abort_requested.is_set():
                return  # the guard trips at its next call
        if self.min_step_interval and self.last_step is not None:
            # Paced, so that an operator sees each step and can stop between two: the pause
            # counts from the end of the last step (as recorded); an abort ends it at once.
            deadline = self.last_step + self.min_step_interval
            while (left := deadline - time.monotonic()) > 0:
                if self.guard and self.guard.abort_requested.is_set():
                    break
                time.sleep(min(0.05, left))

    def stepped(self) -> None:
        """A step has ended (and was recorded): the next one waits for the interval."""
        self.last_step = time.monotonic()

    def _tell(self, message) -> None:
        """Tell the server; a server that is gone cannot be told (its loss aborts the
        session through `listen`), which must not turn into a fault of the session."""
        try:
            self.conn.send(message)
        except (OSError, EOFError):
            pass

    def approver(self, current, proposed, names) -> bool:
        self.proposals += 1
        self.decided.clear()
        self._tell(("pending", {"id": self.proposals, "names": names, "current": current.tolist(),
                                "proposed": proposed.tolist()}))
        while not self.decided.wait(0.05):
            if self.guard.abort_requested.is_set():
                self._tell(("pending", None))
                return False  # never write once an abort was asked for
        self._tell(("pending", None))
        return self.decision


def _open_session(conn, store: Store, request: dict):
    """Open the machine, load the policy, take the machine's lock, record the session.

    Returns (machine, policy, lock, recorder, knob map) or None after telling the parent why not.
    """
    from .policy import Policy, refuse_unfit_for_mode
    from .recording import SessionRecorder
    from .session import session_knob_map

    lock = None
    try:
        opened = open_machine(request["machine"], request["seed"], request["errors"], connect=False)
        agent = Policy.load(request["policy"], opened.definition, opened.setup)
        refuse_unfit_for_mode(agent, request["mode"])
        knob_map = session_knob_map(agent, opened.setup)
        lock = opened.lock()
        if lock:
            lock.acquire()
        opened.connect()
        recorder = SessionRecorder(store, opened.record, agent, request["operator"], request["mode"], None, opened.plant,
                                   opened.panels(), [r.name for r in opened.interlocks], opened.engineering())
    except MachineBusy as exc:
        conn.send(("error", "conflict", str(exc)))
        return None
    except ConfigError as exc:
        if lock:
            lock.release()
        conn.send(("error", "config", str(exc)))
        return None
    if lock:
        lock.note_session(recorder.session_id)
    return opened, agent, lock, recorder, knob_map


# What a session process needs of the server's process: its environment (data directory,
# store, EPICS network, registered tasks) and import path, as they are when the session
# starts (the fork server holding the preloaded modules was started earlier).
ENVIRONMENT_PREFIXES = ("TBSAC_", "EPICS_", "PYTHONPATH")


def _server_context() -> dict:
    return {"env": {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIXES)}, "sys_path": list(sys.path)}


def step_interval(opened, mode: str, sim_step_interval: float) -> float:
    """The least time between two steps of a server-run session: the machine file's
    ``min_step_interval_s`` in auto mode (approve mode waits for the operator anyway, a
    dry run writes nothing); the server's ``--sim-step-interval`` on simulated machines."""
    if opened.machine_file is None:
        return sim_step_interval
    return opened.machine_file.min_step_interval_s if mode == "auto" else 0.0


def session_process(conn, store_url: str, request: dict, sim_step_interval: float) -> None:
    """The body of a session process: open, lock, run, record; then tell the parent."""
    os.environ.update(request["context"]["env"])
    sys.path[:] = request["context"]["sys_path"]
    import torch

    from .response import recorded_response
    from .session import run_dial_in, run_session

    torch.set_num_threads(1)
    store = Store(store_url, upgrade=False)
    opening = _open_session(conn, store, request)
    if opening is None:
        return
    opened, agent, lock, recorder, knob_map = opening
    sid = recorder.session_id
    snapshot = unique_snapshot_path(opened.name, sid)
    store.set_snapshot(sid, str(snapshot))
    controls = _Controls(conn, step_interval(opened, request["mode"], sim_step_interval))
    threading.Thread(target=controls.listen, daemon=True, name="commands").start()
    conn.send(("started", sid))
    try:
        context = {"machine": request["machine"], "machine_file": opened.record.get("path"), "session": sid}
        if request.get("dial_in"):
            asked = request["dial_in"]
            names = [k.name for k in opened.plant.knobs]
            missing = [n for n in names if n not in asked["target"]]
            if missing:
                raise ConfigError(f"step {asked['step']} of session {asked['session']} has no setting for {', '.join(missing)}")
            result = run_dial_in(
                opened.plant, agent, [asked["target"][n] for n in names], f"step {asked['step']} of session {asked['session']}",
                controls.approver, interlocks=opened.interlocks, snapshot_path=snapshot, snapshot_context=context,
                on_event=recorder.on_event, guard_ready=lambda g: setattr(controls, "guard", g))
        else:
            result = run_session(
                opened.plant, agent, mode=request["mode"], interlocks=opened.interlocks, snapshot_path=snapshot,
                snapshot_context=context, approver=controls.approver if request["mode"] == "approve" else None,
                on_step=lambda record: (recorder.on_step(record), controls.stepped()), on_event=recorder.on_event,
                guard_ready=lambda g: setattr(controls, "guard", g), before_step=controls.before_step,
                measured_response=recorded_response(store, opened) if request["mode"] == "dry-run" else None,
                knob_map=knob_map,
            )
        recorder.finish(result)
        status = result.status
    except Exception as exc:  # noqa: BLE001 - an internal fault must still end the session record
        log.exception("session %s failed", sid)
        recorder.operator_event("error", f"internal error: {exc}")
        store.end_session(sid, "faulted", {"error": str(exc)})
        status = "faulted"
    finally:
        controls.finished.set()
        if lock:
            lock.release()
    try:
        conn.send(("done", status))
    except (OSError, EOFError):
        pass


def _nothing() -> None:
    """A process that only makes the fork server start."""


class SessionManager:
    """Starts each session in a process of its own and relays operator commands to it."""

    def __init__(self, store: Store, sim_step_interval: float = 0.0):
        self.store = store
        self.sim_step_interval = sim_step_interval
        self.active: dict[int, ActiveSession] = {}
        self.lock = threading.Lock()
        # Not a plain fork: the server has threads (and possibly a CA context) a fork would copy
        # mid-state. A fork server is a clean single-threaded process that has imported torch
        # and the session code once, so a session starts in a fraction of a second.
        self.context = multiprocessing.get_context("forkserver")
        # The task definitions too: a session opening the first machine of a task would
        # otherwise import its simulator (Cheetah, numba) before it can answer.
        # So is what loading a policy imports lazily (torch's optimisers pull in torch._dynamo:
        # 1.5 s), and pyepics (imported only: each session starts its own CA context).
        self.context.set_forkserver_preload(["controller.session", "controller.recording", "controller.machines",
                                             "controller.policy", "stable_baselines3", "torch.optim", "torch._dynamo",
                                             "hardware.epics_plant", "epics", *task_modules()])
        # Start the fork server now, not when an operator presses Start (it imports all that: ~7 s).
        threading.Thread(target=self._warm_up, daemon=True, name="forkserver-warm-up").start()

    def _warm_up(self) -> None:
        try:
            process = self.context.Process(target=_nothing, name="tbsac-warm-up", daemon=True)
            process.start()
            process.join(120)
        except Exception:  # noqa: BLE001 - a cold fork server only makes the first session slower
            log.warning("fork server warm-up failed", exc_info=True)

    # -- starting ------------------------------------------------------------------
    def start(self, machine: str, policy: str, mode: str, operator: str, seed: int = 0, errors: str = "test") -> int:
        if mode not in MODES:
            raise ConfigError(f"mode: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        return self._spawn({"machine": machine, "policy": policy, "mode": mode, "operator": operator, "seed": seed,
                            "errors": errors})

    def dial_in(self, session_id: int, step: int, operator: str) -> int:
        """Start an approve-mode session that walks the machine of finished session
        `session_id` to the knob settings recorded at its `step` (read back then)."""
        row = self.store.get(SessionRow, session_id)
        if row is None:
            raise NotFound(f"session {session_id} does not exist")
        if row.status in ("running", "paused") and holder_alive(row.holder) is not False:
            raise Conflict(f"session {session_id} is still running: dial in a step of a finished session")
        steps = self.store.steps(session_id)
        if not 1 <= step <= len(steps):
            raise ConfigError(f"step {step}: session {session_id} recorded steps 1 to {len(steps)}" if steps
                              else f"session {session_id} recorded no steps to dial in")
        from .store import MachineRow, PolicyRow

        machine_row = self.store.get(MachineRow, row.machine_id)
        if machine_row.kind == "simulated":
            spec = yaml.safe_load(machine_row.content)
            machine, seed, errors = machine_row.name, int(spec.get("seed", 0)), spec.get("errors", "test")
        else:
            # A shipped machine file by its name, as consoles know it (its active session is
            # then shown and its Start disabled); any other file by its path.
            shipped = machine_row.path and Path(machine_row.path).resolve().parent == Path(str(MACHINE_DIR)).resolve()
            machine, seed, errors = machine_row.name if shipped else (machine_row.path or machine_row.name), 0, "test"
        policy = self.store.get(PolicyRow, row.policy_id).path
        return self._spawn({"machine": machine, "policy": policy, "mode": "approve", "operator": operator, "seed": seed,
                            "errors": errors, "dial_in": {"session": session_id, "step": step,
                                                          "target": dict(steps[step - 1].readbacks)}})

    def _spawn(self, request: dict) -> int:
        """A session process for `request`; its session id once it has started."""
        machine, mode = request["machine"], request["mode"]
        with self.lock:
            if any(a.machine == machine and not a.done.is_set() for a in self.active.values()):
                raise Conflict(f"machine {machine} already has an active session")
            parent, child = self.context.Pipe()
            request = dict(request, context=_server_context())
            process = self.context.Process(target=session_process, args=(child, self.store.url, request, self.sim_step_interval),
                                           name=f"tbsac-session-{machine}", daemon=True)
            process.start()
            child.close()
            if not parent.poll(START_TIMEOUT_S):
                process.kill()
                raise Conflict(f"the session process for {machine} did not start within {START_TIMEOUT_S:.0f} s")
            try:
                message = parent.recv()
            except EOFError:
                process.join(5)
                raise Conflict(f"the session process for {machine} ended before starting (exit code {process.exitcode})") from None
            if message[0] == "error":
                process.join(10)
                raise (Conflict if message[1] == "conflict" else ConfigError)(message[2])
            active = ActiveSession(message[1], machine, mode, process, parent)
            self.active[active.session_id] = active
        threading.Thread(target=self._listen, args=(active,), daemon=True, name=f"session-{active.session_id}").start()
        return active.session_id

    def _listen(self, active: ActiveSession) -> None:
        """Follow the session process's messages until it ends."""
        while True:
            try:
                message = active.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "pending":
                with active.decision_lock:
                    active.pending = message[1]
            elif message[0] == "done":
                break
        active.process.join(30)
        with active.decision_lock:
            active.pending = None
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
        active.send("pause")
        active.paused = True
        self.store.set_status(session_id, "paused")
        self.store.add_event(session_id, _now(), "pause", f"paused by {operator}")

    def resume(self, session_id: int, operator: str) -> None:
        active = self._active(session_id)
        self.store.set_status(session_id, "running")
        self.store.add_event(session_id, _now(), "resume", f"resumed by {operator}")
        active.paused = False
        active.send("resume")

    def abort(self, session_id: int, operator: str) -> None:
        active = self._active(session_id)
        self.store.add_event(session_id, _now(), "abort", f"abort requested by {operator}")
        active.send("abort", f"operator abort by {operator}")

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
            self.store.add_event(session_id, _now(), "approve" if approve else "reject",
                                 f"step {pending['id']} {'approved' if approve else 'rejected'} by {operator}",
                                 {"proposal": pending["id"], "proposed": pending["proposed"], "operator": operator})
            active.send("decide", approve)

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
        opened, lock = self._machine_of(session_id, snap), None
        lock = opened.lock()
        try:
            if lock:
                lock.acquire(purpose=f"restore of session {session_id}")
        except MachineBusy as exc:
            raise Conflict(f"refusing to restore session {session_id} while a session is live: {exc}") from None
        done: list = []  # the restore's event: what was written and what the machine reads after it
        try:
            restore_snapshot(opened.connect().plant, snap, done.append)
        except (PlantFault, ValueError) as exc:
            self.store.add_event(session_id, _now(), "restore_failed", f"restore by {operator} failed: {exc}")
            raise Conflict(f"restore failed: {exc}") from None
        finally:
            if lock:
                lock.release()
        self.store.add_event(session_id, _now(), "restore", f"starting settings restored by {operator} and verified",
                             done[-1].data if done else None)

    def _machine_of(self, session_id: int, snap: dict):
        """The machine a session ran on. A simulated machine is rebuilt from its recorded
        seed and errors, at the settings the session left it at."""
        name = str(snap.get("machine", ""))
        if not name.startswith(SIM_PREFIX):
            return open_machine(snap.get("machine_file") or name, connect=False)
        from .store import MachineRow

        spec = yaml.safe_load(self.store.get(MachineRow, self.store.get(SessionRow, session_id).machine_id).content)
        opened = open_machine(name, spec["seed"], spec["errors"])
        steps = self.store.steps(session_id)
        restored = any(e.kind == "restore" for e in self.store.events(session_id))
        if steps and not restored:
            names = [k.name for k in opened.plant.knobs]
            opened.plant.write_knobs([steps[-1].readbacks[n] for n in names])
        return opened

    def state(self, session_id: int) -> dict:
        active = self.active.get(session_id)
        if active is None or active.done.is_set():
            return {"live": False, "paused": False, "pending": None}
        return {"live": True, "paused": active.paused, "pending": active.pending}

    def shutdown(self) -> None:
        for active in list(self.active.values()):
            if not active.done.is_set():
                active.send("abort", "control server shutting down", "final")
        for active in list(self.active.values()):
            active.done.wait(30)
            active.process.join(5)
