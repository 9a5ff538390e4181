"""Replaying and exporting recorded sessions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from simulators.config import ConfigError

from .policy import Policy, file_sha256
from .store import PolicyRow, SessionRow, Store, row_dict

ACTION_TOLERANCE = 1e-5


def load_session(store: Store, session_id: int) -> SessionRow:
    row = store.get(SessionRow, session_id)
    if row is None:
        raise ConfigError(f"session {session_id}: no such session in {store.display_url}")
    return row


def session_policy(store: Store, session: SessionRow) -> Policy:
    """The exact policy file the session used (checked by hash)."""
    row = store.get(PolicyRow, session.policy_id)
    path = Path(row.path)
    if not path.is_file():
        raise ConfigError(f"session {session.id}: policy file {path} is missing")
    if file_sha256(path) != row.sha256:
        raise ConfigError(f"session {session.id}: policy file {path} changed since the session (sha256 differs)")
    return Policy.load(path)


def _transmission(readings: list[float] | None) -> float | None:
    """Cup over ACCT, as the RFQ task reads it."""
    return readings[1] / readings[0] if readings and readings[0] > 0 else None


def _walk_back(store: Store, session_id: int) -> dict | None:
    """The RFQ session's return to its best measured setting, if it made one."""
    return next((e.data for e in store.events(session_id) if e.kind == "return_to_best"), None)


def replay(store: Store, session_id: int) -> dict:
    """Re-run the recorded policy on every recorded observation: an audit.

    Steps of an RFQ session's walk back to its best measured setting were not the
    policy's: they are recomputed from the recorded target and settings instead.
    """
    session = load_session(store, session_id)
    policy = session_policy(store, session)
    steps = store.steps(session_id)
    walk = _walk_back(store, session_id)
    rfq = policy.metadata.get("task") == "rfq"
    table, mismatches = [], []
    previous = None
    for s in steps:
        by = "return to best" if walk and s.step >= walk["from_step"] else "policy"
        if by == "policy":
            again = policy.act(np.asarray(s.observation, dtype=np.float32))
        elif previous is None:
            raise ConfigError(f"session {session_id}: the walk back starts at step {s.step} with no step before it")
        else:
            again = np.clip((np.asarray(walk["target"]) - previous) / np.asarray(walk["step_size"]), -1.0, 1.0)
        previous = np.asarray(s.readbacks, dtype=float) if s.readbacks else None
        diff = float(np.max(np.abs(again - np.asarray(s.action)))) if s.action else 0.0
        same = diff <= ACTION_TOLERANCE
        if not same:
            mismatches.append({"step": s.step, "max_abs_difference": diff})
        table.append({
            "step": s.step, "rms_mm": s.rms_mm, "transmission": _transmission(s.readings) if rfq else None,
            "reward": s.reward, "reproduced": same, "by": by,
            "max_change": float(np.max(np.abs(np.subtract(s.safe, s.readbacks)))) if s.safe else 0.0,
            "clamped": bool(np.any(np.abs(np.subtract(s.proposed, s.safe)) > 1e-9)),
        })
    reproduced = sum(r["reproduced"] for r in table)
    return {
        "session": session.id,
        "status": session.status,
        "policy": policy.path.name if policy.path else None,
        "steps": len(table),
        "reproduced": reproduced,
        "reproduced_fraction": reproduced / len(table) if table else 1.0,
        "mismatches": mismatches,
        "rms_mm": [r["rms_mm"] for r in table],
        "table": table,
        "result": session.result,
    }


def step_rows(store: Store, session_id: int) -> list[dict]:
    """One flat row per step, columns named after correctors and readings."""
    session = load_session(store, session_id)
    meta = store.get(PolicyRow, session.policy_id).meta
    lattice = meta.get("lattice", {})
    knobs = lattice.get("corrector_names") or lattice.get("knob_names", [])
    readings = meta.get("observation", {}).get("readings", [])
    reading_label = "reading_mA" if meta.get("task") == "rfq" else "reading_mm"
    rows = []
    for s in store.steps(session_id):
        d = row_dict(s)
        row = {"session": session_id, "step": s.step, "time": d["time"], "reward": s.reward, "rms_mm": s.rms_mm, "latency_s": s.latency_s}
        for label, values, names in (("action", s.action, knobs), ("proposed", s.proposed, knobs), ("safe", s.safe, knobs),
                                     ("readback", s.readbacks, knobs), (reading_label, s.readings, readings)):
            for i, v in enumerate(values):
                row[f"{label}:{names[i] if i < len(names) else i}"] = v
        for name, v in (s.interlocks or {}).items():
            row[f"interlock:{name}"] = v
        rows.append(row)
    return rows


def export(store: Store, session_id: int, fmt: str, out: Path) -> Path:
    rows = step_rows(store, session_id)
    columns = list(rows[0]) if rows else ["session", "step"]
    if fmt == "csv":
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in columns}), out)
    else:
        raise ConfigError(f"--format: unknown format {fmt!r}; expected csv or parquet")
    return out
