"""The control server (FastAPI): owns machine connections while consoles come and go.

Reads need nothing; writes need ``Authorization: Bearer <operator token>``. The schema
is served at ``/openapi.json`` and documented at ``/docs``.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import secrets
from contextlib import asynccontextmanager
from pathlib import Path as PathLib
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from pydantic import BaseModel, ConfigDict, Field

from controller.machines import MACHINE_DIR, MachineWatches, list_machines
from controller.manager import Conflict, NotFound, SessionManager
from controller.policy import POLICY_DIR
from controller.replay import load_session, replay, session_report, step_rows
from controller.store import EvaluationRow, EventRow, PolicyRow, SessionRow, Store, TrainingRunRow, row_dict
from core.outcome import decided_by
from controller.api import ConfigError, policy_catalogue

SessionStatus = Literal["running", "paused", "completed", "not_converged", "tripped", "aborted", "rejected", "dry-run", "interrupted", "faulted", "mismatch"]


READ_THREADS = 4

# Ids beyond 32 bits cannot exist; bounding them keeps the database from overflowing.
MAX_ID = 2**31 - 1
# Names and paths in requests: no NUL character (no file name and no PostgreSQL text holds
# one; a path with one made the path check fail with a server error).
NO_NUL = r"^[^\x00]*$"
SessionId = Annotated[int, Path(ge=1, le=MAX_ID, description="session id")]
After = Annotated[int, Query(ge=0, le=MAX_ID, description="only items after this step / event id")]


class StartRequest(BaseModel):
    """Start a session on a machine."""

    model_config = ConfigDict(extra="forbid")

    machine: str = Field(min_length=1, max_length=200, pattern=NO_NUL, description="machine name from /api/machines")
    policy: str = Field("pretrained", min_length=1, max_length=1000, pattern=NO_NUL,
                        description="'pretrained' or a policy file path")
    mode: Literal["auto", "approve", "dry-run"] = "auto"
    operator: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="simulated machines: which hidden errors")
    errors: Literal["train", "test", "hard"] = "test"


class Started(BaseModel):
    session: int


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    operator: str = Field("operator", min_length=1, max_length=200, pattern=NO_NUL)
    proposal: int | None = Field(None, ge=1, le=2**31 - 1, description="approve/reject: the proposal id the operator saw")


class DialInRequest(BaseModel):
    """Dial in the knob settings recorded at one step of a finished session."""

    model_config = ConfigDict(extra="forbid")
    operator: str = Field(min_length=1, max_length=200, pattern=NO_NUL)
    step: int = Field(ge=1, le=2**31 - 1, description="the recorded step whose read-back settings to go to")


class AllowedFiles:
    """Which machine and policy files a request may name: shipped machine names (and the
    simulated ones), files inside the configured folders, shipped and recorded policies."""

    def __init__(self, store: Store, machine_dirs: list, policy_dirs: list):
        self.store = store
        self.machine_dirs = [PathLib(str(MACHINE_DIR)).resolve(), *(PathLib(d).resolve() for d in machine_dirs)]
        self.policy_dirs = [PathLib(str(POLICY_DIR)).resolve(), *(PathLib(d).resolve() for d in policy_dirs)]

    @staticmethod
    def _inside(path: str, folders: list) -> bool:
        resolved = PathLib(path).resolve()
        return any(resolved.is_relative_to(f) for f in folders)

    def check(self, machine: str, policy: str) -> None:
        if machine not in {m["name"] for m in list_machines()} and not self._inside(machine, self.machine_dirs):
            raise HTTPException(403, f"machine {machine!r}: not a listed machine and not a file in the allowed machine folders")
        recorded = {r.path for r in self.store.list(PolicyRow)}
        if policy != "pretrained" and not self._inside(policy, self.policy_dirs) and str(PathLib(policy).resolve()) not in recorded:
            raise HTTPException(403, f"policy {policy!r}: not a shipped or recorded policy and not in the allowed policy folders")


def create_app(store: Store, token: str, sim_step_interval: float = 0.0, allowed_hosts: list[str] | None = None,
               machine_dirs: list | None = None, policy_dirs: list | None = None,
               console_origins: list[str] | None = None) -> FastAPI:
    """The API over `store`; writes need `token`. Requests must name an allowed host (DNS
    rebinding); machine and policy files are opened only from the allowed folders."""
    manager = SessionManager(store, sim_step_interval)
    watches = MachineWatches()
    files = AllowedFiles(store, machine_dirs or [], policy_dirs or [])
    interrupted = store.mark_interrupted()  # sessions of a server that died

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        import anyio.to_thread

        # Few request threads: every runnable thread competes with the control loops
        # for the GIL, and reads can wait a little where a control step cannot.
        anyio.to_thread.current_default_thread_limiter().total_tokens = READ_THREADS
        # Build the machine list (every task's layout) before the first console asks for it.
        await anyio.to_thread.run_sync(list_machines)
        yield
        manager.shutdown()
        watches.close()

    app = FastAPI(title="tbsac control server", version="1", lifespan=lifespan)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "::1"])
    # A console page in the browser reads the event stream directly (pushed updates): reads
    # only, from consoles on this host unless `console_origins` names others.
    app.add_middleware(CORSMiddleware, allow_origins=console_origins or [], allow_methods=["GET"],
                       allow_origin_regex=r"https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?")
    app.state.manager, app.state.store, app.state.interrupted = manager, store, interrupted
    bearer = HTTPBearer(auto_error=False)

    def operator_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None:
            raise HTTPException(401, "write requests need 'Authorization: Bearer <operator token>'")
        if not secrets.compare_digest(credentials.credentials, token):
            raise HTTPException(403, "operator token is not valid")

    @app.exception_handler(ConfigError)
    async def _config_error(_request: Request, exc: ConfigError):
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(Conflict)
    async def _conflict(_request: Request, exc: Conflict):
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(NotFound)
    async def _not_found(_request: Request, exc: NotFound):
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    def session_or_404(session_id: SessionId) -> SessionRow:
        row = store.get(SessionRow, session_id)
        if row is None:
            raise HTTPException(404, f"session {session_id} does not exist")
        return row

    # -- reads ---------------------------------------------------------------------
    @app.get("/api/health")
    def health() -> dict:
        # The database kind only: the URL would reveal paths (SQLite) or hosts and users.
        return {"ok": True, "store": store.engine.dialect.name, "interrupted_at_start": interrupted}

    @app.get("/api/machines")
    def machines() -> list[dict]:
        busy = {a.machine: sid for sid, a in manager.active.items() if not a.done.is_set()}
        return [dict(m, active_session=busy.get(m["name"])) for m in list_machines()]

    @app.get("/api/machines/{name}/live")
    def machine_live(name: str = Path(max_length=200)) -> dict:
        """What the machine's interlock channels read now (EPICS machines; watched by
        monitors): whether the IOC answers, independent of any session."""
        try:
            return watches.live(name)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.get("/api/policies")
    def policies() -> dict:
        shipped = sorted(p.name[:-3] for p in POLICY_DIR.iterdir() if p.name.endswith(".pt"))
        recorded = policy_catalogue(store)
        names = store.machine_names()
        deployed: dict[int, list[str]] = {}
        for s in store.list(SessionRow, SessionRow.status == "completed"):
            machines_of_policy = deployed.setdefault(s.policy_id, [])
            if names.get(s.machine_id) not in machines_of_policy:
                machines_of_policy.append(names.get(s.machine_id))
        shipped_dir = PathLib(str(POLICY_DIR)).resolve()
        for r in recorded:
            r["deployed_on"] = deployed.get(r["id"], [])
            r["shipped"] = PathLib(r["path"]).resolve().parent == shipped_dir  # a 'pretrained' file, as recorded
        return {"pretrained": shipped, "recorded": recorded}

    @app.get("/api/training-runs")
    def training_runs() -> list[dict]:
        return [row_dict(r) for r in store.list(TrainingRunRow)]

    @app.get("/api/evaluations")
    def evaluations(policy_id: int | None = Query(None, ge=1, le=MAX_ID)) -> list[dict]:
        where = [EvaluationRow.policy_id == policy_id] if policy_id else []
        return [row_dict(r) for r in store.list(EvaluationRow, *where, order=EvaluationRow.id.desc())]

    @app.get("/api/sessions")
    def sessions(
        status: SessionStatus | None = None,
        machine: str | None = Query(None, max_length=200, pattern=NO_NUL),
        operator: str | None = Query(None, max_length=200, pattern=NO_NUL),
        task: str | None = Query(None, max_length=50, pattern=NO_NUL),
        started_from: dt.date | None = Query(None, description="first day (UTC) a listed session started on"),
        started_to: dt.date | None = Query(None, description="last day (UTC) a listed session started on"),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=MAX_ID),
    ) -> list[dict]:
        if started_from and started_to and started_to < started_from:
            raise HTTPException(422, f"started_to {started_to} is before started_from {started_from}")
        machines_by_id = store.machine_names()
        # every filter in the query, so limit and offset page through the matching sessions
        where = []
        if status:
            where.append(SessionRow.status == status)
        if machine is not None:
            where.append(SessionRow.machine_id.in_([i for i, name in machines_by_id.items() if name == machine]))
        if operator is not None:
            where.append(SessionRow.operator == operator)
        if task is not None:
            where.append(SessionRow.task == task)
        if started_from:
            where.append(SessionRow.started >= dt.datetime.combine(started_from, dt.time(), dt.timezone.utc))
        if started_to:
            where.append(SessionRow.started < dt.datetime.combine(started_to + dt.timedelta(days=1), dt.time(), dt.timezone.utc))
        rows = store.list(SessionRow, *where, order=SessionRow.id.desc(), limit=limit, offset=offset)
        decisions: dict[int, list[dict]] = {}
        for e in store.list(EventRow, EventRow.session_id.in_([r.id for r in rows]), EventRow.kind.in_(("approve", "reject"))):
            decisions.setdefault(e.session_id, []).append(row_dict(e))
        return [dict(row_dict(r), machine=machines_by_id.get(r.machine_id), decided_by=decided_by(decisions.get(r.id, [])))
                for r in rows]

    @app.get("/api/sessions/{session_id}")
    def session(session_id: SessionId) -> dict:
        row = session_or_404(session_id)
        return dict(row_dict(row), machine=store.machine_names().get(row.machine_id),
                    steps=store.count_steps(session_id), **manager.state(session_id))

    @app.get("/api/sessions/{session_id}/steps")
    def steps(session_id: SessionId, after: After = 0) -> list[dict]:
        session_or_404(session_id)
        return [row_dict(s) for s in store.steps(session_id, after)]

    @app.get("/api/sessions/{session_id}/events")
    def events(session_id: SessionId, after: After = 0) -> list[dict]:
        session_or_404(session_id)
        return [row_dict(e) for e in store.events(session_id, after)]

    @app.get("/api/sessions/{session_id}/replay")
    def replay_session(session_id: SessionId) -> dict:
        session_or_404(session_id)
        return replay(store, session_id)

    @app.get("/api/sessions/{session_id}/export", response_class=PlainTextResponse)
    def export_csv(session_id: SessionId) -> PlainTextResponse:
        load_session(store, session_id)
        rows = step_rows(store, session_id)
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return PlainTextResponse(buf.getvalue(), media_type="text/csv",
                                 headers={"Content-Disposition": f"attachment; filename=session-{session_id}.csv"})

    @app.get("/api/sessions/{session_id}/report", response_class=PlainTextResponse)
    def report(session_id: SessionId) -> PlainTextResponse:
        """The session as Markdown for the logbook (``tbsac export N --format md``)."""
        session_or_404(session_id)
        return PlainTextResponse(session_report(store, session_id), media_type="text/markdown",
                                 headers={"Content-Disposition": f"attachment; filename=session-{session_id}.md"})

    @app.get("/api/sessions/{session_id}/stream")
    async def stream(session_id: SessionId, tail: bool = Query(False, description="only what happens from now on")) -> StreamingResponse:
        """Server-sent events: every new step and event, and every change of the live state
        (a proposal waiting for approval, paused), until the session ends."""
        session_or_404(session_id)

        async def generate():
            last_step = last_event = 0
            if tail:
                last_step = (await asyncio.to_thread(store.count_steps, session_id))
                known = await asyncio.to_thread(store.events, session_id, 0)
                last_event = known[-1].id if known else 0
            state = None
            while True:
                new_steps = await asyncio.to_thread(store.steps, session_id, last_step)
                new_events = await asyncio.to_thread(store.events, session_id, last_event)
                for s in new_steps:
                    last_step = s.step
                    yield f"event: step\ndata: {json.dumps(row_dict(s))}\n\n"
                for e in new_events:
                    last_event = e.id
                    yield f"event: event\ndata: {json.dumps(row_dict(e))}\n\n"
                now = manager.state(session_id)
                if now != state:
                    state = now
                    yield f"event: state\ndata: {json.dumps(now)}\n\n"
                row = await asyncio.to_thread(store.get, SessionRow, session_id)
                if row.status not in ("running", "paused") and not now["live"] and not new_steps and not new_events:
                    yield f"event: end\ndata: {json.dumps({'status': row.status})}\n\n"
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(generate(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- writes (operator token) -------------------------------------------------------
    @app.post("/api/sessions", status_code=201, dependencies=[Depends(operator_token)])
    def start(request: StartRequest) -> Started:
        files.check(request.machine, request.policy)
        sid = manager.start(request.machine, request.policy, request.mode, request.operator, request.seed, request.errors)
        return Started(session=sid)

    @app.post("/api/sessions/{session_id}/dial-in", status_code=201, dependencies=[Depends(operator_token)])
    def dial_in(session_id: SessionId, request: DialInRequest) -> Started:
        """A new approve-mode session walking the machine to the settings recorded at a step
        of a finished session (each write approved, through the safety layer)."""
        return Started(session=manager.dial_in(session_id, request.step, request.operator))

    @app.post("/api/sessions/{session_id}/{command}", dependencies=[Depends(operator_token)])
    def command(session_id: SessionId, command: Literal["pause", "resume", "abort", "approve", "reject", "restore"],
                body: CommandRequest | None = None) -> dict:
        who = body.operator if body else "operator"
        proposal = body.proposal if body else None
        if command == "pause":
            manager.pause(session_id, who)
        elif command == "resume":
            manager.resume(session_id, who)
        elif command == "abort":
            manager.abort(session_id, who)
        elif command in ("approve", "reject"):
            manager.decide(session_id, command == "approve", who, proposal)
        else:
            manager.restore(session_id, who)
        return {"session": session_id, "command": command, "ok": True}

    return app
