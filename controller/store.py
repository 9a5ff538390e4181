"""The session store: every training run, policy, machine, session, step and event.

SQLAlchemy 2 with SQLite by default (``tbsac.sqlite`` in the data directory) or any
URL in ``TBSAC_DATABASE_URL`` (PostgreSQL is tested). The schema is managed by Alembic
(``controller/migrations``); :func:`open_store` upgrades a database to the current
schema. Steps and events are committed as they happen, so a crash loses at most the
step in flight.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, create_engine, event, func, select, text, update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from .locks import holder_alive, holder_id
from .paths import data_dir


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class MachineRow(Base):
    __tablename__ = "machines"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # epics or simulated
    path: Mapped[str | None] = mapped_column(Text)
    content: Mapped[str] = mapped_column(Text)  # the machine file (or simulator spec) as used
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(50))
    lattice: Mapped[str] = mapped_column(String(200))
    errors: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(20))
    steps: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    out_dir: Mapped[str] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    evaluation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    curves: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(20), default="running")
    started: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    sweep: Mapped[str | None] = mapped_column(String(200), index=True)  # `tbsac sweep`: the sweep's name
    trial: Mapped[str | None] = mapped_column(String(200))  # ... and the trial's


class PolicyRow(Base):
    __tablename__ = "policies"
    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    lattice: Mapped[str] = mapped_column(String(200))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The file's bytes, for policies trained by this tool (a sweep's trial may write its
    # file on another host); deferred so listing policies does not load them.
    content: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)


class EvaluationRow(Base):
    """An evaluation of a policy against the baselines (``tbsac evaluate``)."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    lattice: Mapped[str] = mapped_column(String(200))
    errors: Mapped[str] = mapped_column(String(200))
    episodes: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    results: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id"), index=True)
    policy_id: Mapped[int] = mapped_column(ForeignKey("policies.id"))
    operator: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)  # running, completed, ...
    started: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    snapshot: Mapped[str | None] = mapped_column(Text)
    task: Mapped[str | None] = mapped_column(String(50))
    holder: Mapped[str | None] = mapped_column(String(300))  # host:pid of the process running it
    # knob, reading and metric names and units, as the steps are keyed
    layout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    task_config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)


class StepRow(Base):
    __tablename__ = "steps"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    # Knob values, readings and metrics are keyed by the names in the session's layout.
    observation: Mapped[list[Any]] = mapped_column()  # what the policy saw
    action: Mapped[dict[str, Any]] = mapped_column(JSON)  # what it answered, in [-1, 1]
    proposed: Mapped[dict[str, Any]] = mapped_column(JSON)  # settings it asked for
    safe: Mapped[dict[str, Any]] = mapped_column(JSON)  # settings after the safety layer (written)
    readbacks: Mapped[dict[str, Any]] = mapped_column(JSON)
    readings: Mapped[dict[str, Any]] = mapped_column(JSON)  # readings after the step
    interlocks: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reward: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the task's metrics after the step
    by: Mapped[str | None] = mapped_column(String(40))  # who chose the action
    latency_s: Mapped[float] = mapped_column(Float)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[int | None] = mapped_column(ForeignKey("sessions.id"), index=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class MeasurementRow(Base):
    """A measurement taken on a machine outside a tuning session (e.g. its response matrix)."""

    __tablename__ = "measurements"
    id: Mapped[int] = mapped_column(primary_key=True)
    machine_id: Mapped[int] = mapped_column(ForeignKey("machines.id"), index=True)
    task: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(40))  # response
    operator: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # completed, tripped, faulted
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)  # matrix, noise, probes, writes, ... keyed by names


def default_url() -> str:
    return os.environ.get("TBSAC_DATABASE_URL") or f"sqlite:///{data_dir() / 'tbsac.sqlite'}"


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # noqa: ANN001
        cursor = dbapi_connection.cursor()
        # WAL lets readers (the console) read while the control loop commits steps.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


MIGRATION_LOCK = 74_616_301  # PostgreSQL advisory lock key: one schema upgrade at a time


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the current schema with Alembic.

    On PostgreSQL under an advisory lock: several processes (two engineers' sweeps, their
    trials, control servers) may open a fresh shared database at the same moment."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if not url.startswith("postgresql"):
        command.upgrade(cfg, "head")
        return
    engine = create_engine(url)
    try:
        with engine.connect() as lock:
            lock.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            try:
                command.upgrade(cfg, "head")
            finally:
                lock.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
    finally:
        engine.dispose()


class Store:
    """Access to the session store; one instance per process is enough (thread-safe)."""

    def __init__(self, url: str | None = None, upgrade: bool = True):
        self.url = url or default_url()
        if upgrade:
            migrate(self.url)
        self.engine = create_engine(self.url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def display_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    # -- catalogue -----------------------------------------------------------------
    def add_machine(self, name: str, kind: str, content: str, path: str | None = None) -> MachineRow:
        digest = hashlib.sha256(f"{kind}\n{name}\n{content}".encode()).hexdigest()
        with self.Session.begin() as s:
            row = s.scalar(select(MachineRow).where(MachineRow.sha256 == digest))
            if row is None:
                row = MachineRow(name=name, kind=kind, content=content, path=path, sha256=digest)
                s.add(row)
                s.flush()
            return row

    def add_policy(self, path: Path, sha256: str, metadata: dict, training_run_id: int | None = None,
                   content: bytes | None = None) -> PolicyRow:
        with self.Session.begin() as s:
            row = s.scalar(select(PolicyRow).where(PolicyRow.sha256 == sha256))
            if row is None:
                row = PolicyRow(sha256=sha256, path=str(Path(path).resolve()), lattice=metadata.get("lattice", {}).get("name", ""),
                                meta=metadata, training_run_id=training_run_id, content=content)
                s.add(row)
                s.flush()
            else:
                if training_run_id and row.training_run_id is None:
                    row.training_run_id = training_run_id
                if content is not None and row.content is None:
                    row.content = content
            return row

    def policy_content(self, policy_id: int) -> bytes | None:
        """The bytes of a recorded policy file (None if only its path was recorded)."""
        with self.Session() as s:
            return s.scalar(select(PolicyRow.content).where(PolicyRow.id == policy_id))

    def start_training_run(self, **fields) -> TrainingRunRow:
        with self.Session.begin() as s:
            row = TrainingRunRow(**fields)
            s.add(row)
            s.flush()
            return row

    def finish_training_run(self, run_id: int, status: str, evaluation: dict, curves: list) -> None:
        with self.Session.begin() as s:
            s.execute(update(TrainingRunRow).where(TrainingRunRow.id == run_id).values(
                status=status, evaluation=evaluation, curves=curves, finished=utcnow()))

    def add_evaluation(self, policy_id: int | None, summary: dict) -> EvaluationRow:
        with self.Session.begin() as s:
            row = EvaluationRow(policy_id=policy_id, task=summary["task"], lattice=summary["lattice"], errors=summary["errors"],
                                episodes=summary["episodes"], seed=summary["seed"], results=summary["results"])
            s.add(row)
            s.flush()
            return row

    def add_measurement(self, machine_id: int, task: str, kind: str, operator: str, status: str, data: dict) -> MeasurementRow:
        with self.Session.begin() as s:
            row = MeasurementRow(machine_id=machine_id, task=task, kind=kind, operator=operator, status=status, data=data)
            s.add(row)
            s.flush()
            return row

    # -- sessions ------------------------------------------------------------------
    def start_session(self, machine_id: int, policy_id: int, operator: str, mode: str, snapshot: str | None, task_config: dict,
                      task: str | None = None, layout: dict | None = None) -> SessionRow:
        with self.Session.begin() as s:
            row = SessionRow(machine_id=machine_id, policy_id=policy_id, operator=operator, mode=mode,
                             status="running", snapshot=snapshot, task_config=task_config, task=task, layout=layout,
                             holder=holder_id())
            s.add(row)
            s.flush()
            return row

    def add_step(self, session_id: int, **fields) -> None:
        with self.Session.begin() as s:
            s.add(StepRow(session_id=session_id, **fields))

    def add_event(self, session_id: int | None, time: dt.datetime, kind: str, reason: str, data: dict | None = None) -> None:
        with self.Session.begin() as s:
            s.add(EventRow(session_id=session_id, time=time, kind=kind, reason=reason, data=data or {}))

    def end_session(self, session_id: int, status: str, result: dict) -> None:
        with self.Session.begin() as s:
            s.execute(update(SessionRow).where(SessionRow.id == session_id).values(status=status, result=result, ended=utcnow()))

    def set_snapshot(self, session_id: int, snapshot: str) -> None:
        with self.Session.begin() as s:
            s.execute(update(SessionRow).where(SessionRow.id == session_id).values(snapshot=snapshot))

    def set_status(self, session_id: int, status: str) -> None:
        with self.Session.begin() as s:
            s.execute(update(SessionRow).where(SessionRow.id == session_id).values(status=status))

    def mark_interrupted(self) -> list[int]:
        """Sessions left 'running' by a process that died: mark them 'interrupted'.

        A session whose holder is alive (this host) or cannot be checked (another host)
        is left alone: it may be a live `tbsac run` beside this server.
        """
        with self.Session.begin() as s:
            rows = s.execute(select(SessionRow.id, SessionRow.holder).where(SessionRow.status.in_(("running", "paused")))).all()
            ids = [i for i, holder in rows if holder_alive(holder) is False or holder is None]
            if ids:
                s.execute(update(SessionRow).where(SessionRow.id.in_(ids)).values(status="interrupted", ended=utcnow()))
            return ids

    # -- queries -------------------------------------------------------------------
    def get(self, model, row_id: int):
        with self.Session() as s:
            return s.get(model, row_id)

    def list(self, model, *where, order=None, limit: int | None = None, offset: int = 0) -> list:
        with self.Session() as s:
            q = select(model).where(*where).order_by(order if order is not None else model.id).offset(offset)
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q))

    def steps(self, session_id: int, after: int = 0) -> list[StepRow]:
        return self.list(StepRow, StepRow.session_id == session_id, StepRow.step > after, order=StepRow.step)

    def events(self, session_id: int, after_id: int = 0) -> list[EventRow]:
        return self.list(EventRow, EventRow.session_id == session_id, EventRow.id > after_id)

    def machine_names(self) -> dict[int, str]:
        with self.Session() as s:
            return dict(s.execute(select(MachineRow.id, MachineRow.name)).all())

    def count_steps(self, session_id: int) -> int:
        with self.Session() as s:
            return s.scalar(select(func.count()).select_from(StepRow).where(StepRow.session_id == session_id))


def row_dict(row) -> dict:
    """A row's columns as a JSON-friendly dict."""
    out = {}
    for column in row.__table__.columns:
        if isinstance(column.type, LargeBinary):  # file bytes (deferred): not for listings
            continue
        value = getattr(row, column.key if hasattr(row, column.key) else column.name, None)
        if column.name == "metadata":
            value = row.meta
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:  # SQLite returns naive datetimes; they are UTC
                value = value.replace(tzinfo=dt.timezone.utc)
            value = value.isoformat()
        out[column.name] = value
    return out
