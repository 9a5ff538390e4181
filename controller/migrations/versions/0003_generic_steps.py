"""generic step records: knobs, readings and metrics keyed by the task's spec names

Steps stored knob settings and readings as bare lists and the orbit RMS in a column of
its own (``rms_mm``); an RFQ session's transmission was recomputed from its readings
wherever it was shown. From here on every step stores dicts keyed by the names of the
plant's knobs and readings and the task's metrics, and every session its task and
layout (names and units). Existing rows are converted with the names recorded in their
policy's metadata; this migration keeps its own copy of the two metric formulas
because a migration must not change when the live code does.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""
import math

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

sessions = sa.table("sessions", sa.column("id", sa.Integer), sa.column("policy_id", sa.Integer),
                    sa.column("task", sa.String), sa.column("layout", sa.JSON))
policies = sa.table("policies", sa.column("id", sa.Integer), sa.column("metadata", sa.JSON))
steps = sa.table("steps", sa.column("id", sa.Integer), sa.column("session_id", sa.Integer), sa.column("action", sa.JSON),
                 sa.column("proposed", sa.JSON), sa.column("safe", sa.JSON), sa.column("readbacks", sa.JSON),
                 sa.column("readings", sa.JSON), sa.column("rms_mm", sa.Float), sa.column("metrics", sa.JSON),
                 sa.column("by", sa.String))

KNOB_COLUMNS = ("action", "proposed", "safe", "readbacks")


def _transmission_task(meta: dict) -> bool:
    """Sessions before this migration were orbit correction or RFQ transmission; the
    policy's task configuration tells which (its target is an RMS or a transmission)."""
    return "target_transmission" in meta.get("task_config", {})


def _layout(meta: dict) -> dict:
    """The layout of a session recorded before this migration, from its policy's metadata."""
    lattice = meta.get("lattice", {})
    knobs = lattice.get("corrector_names") or lattice.get("knob_names") or []
    units = meta.get("action", {}).get("unit")
    knob_units = units if isinstance(units, list) else ["unit"] * len(knobs)
    readings = meta.get("observation", {}).get("readings", [])
    if _transmission_task(meta):
        metric = {"name": "transmission", "unit": "1", "higher_is_better": True,
                  "target": meta.get("task_config", {}).get("target_transmission", 0.85), "label": "transmission"}
        reading_unit = "mA"
    else:
        metric = {"name": "rms_mm", "unit": "mm", "higher_is_better": False,
                  "target": meta.get("task_config", {}).get("target_rms_mm", 0.5), "label": "orbit RMS"}
        reading_unit = "mm"
    return {"knobs": [{"name": n, "unit": u} for n, u in zip(knobs, knob_units)],
            "readings": [{"name": n, "unit": reading_unit} for n in readings], "metrics": [metric]}


def _keyed(values, names: list[str]) -> dict:
    return {(names[i] if i < len(names) else str(i)): v for i, v in enumerate(values or [])}


def upgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        batch.add_column(sa.Column("metrics", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("by", sa.String(40), nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("task", sa.String(50), nullable=True))
        batch.add_column(sa.Column("layout", sa.JSON(), nullable=True))
    conn = op.get_bind()
    metas = dict(conn.execute(sa.select(policies.c.id, policies.c.metadata)).all())
    for session_id, policy_id in conn.execute(sa.select(sessions.c.id, sessions.c.policy_id)).all():
        meta = metas.get(policy_id) or {}
        layout = _layout(meta)
        conn.execute(sessions.update().where(sessions.c.id == session_id).values(task=meta.get("task"), layout=layout))
        knob_names = [k["name"] for k in layout["knobs"]]
        reading_names = [r["name"] for r in layout["readings"]]
        for row in conn.execute(sa.select(steps).where(steps.c.session_id == session_id)).mappings().all():
            readings = row["readings"] or []
            if _transmission_task(meta):
                t = readings[1] / readings[0] if len(readings) >= 2 and readings[0] > 0 else 0.0
                metrics = {"transmission": t}
            else:
                rms = row["rms_mm"]
                metrics = {"rms_mm": rms if rms is not None and math.isfinite(rms) else None}  # JSON has no NaN
            values = {c: _keyed(row[c], knob_names) for c in KNOB_COLUMNS}
            conn.execute(steps.update().where(steps.c.id == row["id"]).values(
                **values, readings=_keyed(readings, reading_names), metrics=metrics, by="policy"))
    with op.batch_alter_table("steps") as batch:
        batch.drop_column("rms_mm")


def downgrade() -> None:
    with op.batch_alter_table("steps") as batch:
        batch.add_column(sa.Column("rms_mm", sa.Float(), nullable=True))
    conn = op.get_bind()
    for row in conn.execute(sa.select(steps)).mappings().all():
        rms = (row["metrics"] or {}).get("rms_mm")
        values = {c: list((row[c] or {}).values()) for c in KNOB_COLUMNS + ("readings",)}
        conn.execute(steps.update().where(steps.c.id == row["id"]).values(
            **values, rms_mm=rms if rms is not None and math.isfinite(rms) else None))
    with op.batch_alter_table("steps") as batch:
        batch.drop_column("metrics")
        batch.drop_column("by")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("task")
        batch.drop_column("layout")
