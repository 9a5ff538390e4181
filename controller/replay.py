"""Replaying and exporting recorded sessions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from core.config import ConfigError
from core.outcome import decided_by, machine_left
from core.task import walk_action

from .policy import Policy, file_sha256
from .store import MachineRow, PolicyRow, SessionRow, Store, row_dict

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


def _walk(store: Store, session_id: int) -> tuple[str, dict] | None:
    """A task-level walk to a target setting the session made (e.g. an RFQ session's
    return to its best measured setting): (event kind, its data), if any."""
    return next(((e.kind, e.data) for e in store.events(session_id)
                 if {"from_step", "target", "step_size"} <= set(e.data or {})), None)


def _ordered(values: dict | list | None, names: list[str]) -> list:
    """Step values in layout order (steps are keyed by name)."""
    if isinstance(values, dict):
        return [values.get(n) for n in names]
    return list(values or [])


def replay(store: Store, session_id: int) -> dict:
    """Re-run the recorded policy on every recorded observation: an audit.

    Steps of a task-level walk to a target setting were not the policy's: they are
    recomputed from the recorded target and the settings read back before each step.
    """
    session = load_session(store, session_id)
    policy = session_policy(store, session)
    layout = session.layout or {}
    knobs = [k["name"] for k in layout.get("knobs", [])]
    metric = (layout.get("metrics") or [{"name": None}])[0]["name"]
    steps = store.steps(session_id)
    walk = _walk(store, session_id)
    table, mismatches = [], []
    previous = None
    for s in steps:
        by = walk[0].replace("_", " ") if walk and s.step >= walk[1]["from_step"] else "policy"
        action = np.asarray(_ordered(s.action, knobs), dtype=float)
        if by == "policy":
            again = policy.act(np.asarray(s.observation, dtype=np.float32))
        elif previous is None:
            raise ConfigError(f"session {session_id}: the walk back starts at step {s.step} with no step before it")
        else:
            again = walk_action(np.asarray(walk[1]["target"]), previous, np.asarray(walk[1]["step_size"]))
        readbacks = np.asarray(_ordered(s.readbacks, knobs), dtype=float)
        safe = np.asarray(_ordered(s.safe, knobs), dtype=float)
        proposed = np.asarray(_ordered(s.proposed, knobs), dtype=float)
        previous = readbacks if len(readbacks) else None
        diff = float(np.max(np.abs(again - action))) if len(action) else 0.0
        same = diff <= ACTION_TOLERANCE
        if not same:
            mismatches.append({"step": s.step, "max_abs_difference": diff})
        table.append({
            "step": s.step, "metrics": s.metrics or {}, "reward": s.reward, "reproduced": same, "by": by,
            "max_change": float(np.max(np.abs(safe - readbacks))) if len(safe) else 0.0,
            "clamped": bool(np.any(np.abs(proposed - safe) > 1e-9)),
        })
    reproduced = sum(r["reproduced"] for r in table)
    return {
        "session": session.id,
        "status": session.status,
        "task": session.task,
        "metric": metric,
        "policy": policy.path.name if policy.path else None,
        "steps": len(table),
        "reproduced": reproduced,
        "reproduced_fraction": reproduced / len(table) if table else 1.0,
        "mismatches": mismatches,
        "metric_trace": [r["metrics"].get(metric) for r in table],
        "table": table,
        "result": session.result,
    }


def step_rows(store: Store, session_id: int) -> list[dict]:
    """One flat row per step (``record`` = step), then one per event (``record`` = event),
    in time order. Columns are named with their units: knob values in the simulator's
    units and, where the machine file states one, in its engineering unit (e.g. A); a
    step names who approved it; an event row its kind and reason."""
    session = load_session(store, session_id)
    layout = session.layout or {}
    knobs = layout.get("knobs", [])
    names = [k["name"] for k in knobs]
    readings = layout.get("readings", [])
    events = [row_dict(e) for e in store.events(session_id)]
    rows, previous = [], ""
    for s in store.steps(session_id):
        d = row_dict(s)
        approvals = [e for e in events if e["kind"] == "approve" and previous < e["time"] <= d["time"]]
        previous = d["time"]
        row = {"record": "step", "session": session_id, "step": s.step, "time": d["time"], "reward": s.reward,
               "latency_s": s.latency_s, "by": s.by, "approved by": ", ".join(decided_by(approvals)["approved"]) or None}
        for m in layout.get("metrics", []):
            row[f"{m['name']} ({m['unit']})"] = (s.metrics or {}).get(m["name"])
        for label in ("action", "proposed", "safe", "readbacks"):
            for knob, v in zip(knobs, _ordered(getattr(s, label), names)):
                row[f"{label}:{knob['name']} ({knob.get('unit', '')})"] = v
        for knob, v in zip(knobs, _ordered(s.readbacks, names)):
            wired = knob.get("engineering")
            if wired:  # the value as the machine knows it
                row[f"readbacks:{knob['name']} ({wired['unit']})"] = None if v is None else v * wired["scale"]
        for r, v in zip(readings, _ordered(s.readings, [r["name"] for r in readings])):
            row[f"reading:{r['name']} ({r['unit']})"] = v
        for name, v in (s.interlocks or {}).items():
            row[f"interlock:{name}"] = v
        rows.append(row)
    columns = list(rows[0]) if rows else ["record", "session", "step", "time"]
    for e in events:
        rows.append({"record": "event", "session": session_id, "time": e["time"], "event": e["kind"], "reason": e["reason"]})
    rows.sort(key=lambda r: r["time"])
    order = columns[:4] + ["event", "reason"] + columns[4:]  # every row has every column, in one order
    return [{c: r.get(c) for c in order} for r in rows]


def export(store: Store, session_id: int, fmt: str, out: Path) -> Path:
    """A session's steps as CSV or Parquet (one row per step), or its logbook report (md)."""
    if fmt == "md":
        Path(out).write_text(session_report(store, session_id))
        return out
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
        raise ConfigError(f"--format: unknown format {fmt!r}; expected csv, parquet or md")
    return out


def _named(values, names: list[str]) -> dict:
    """Knob values keyed by name (events record them as lists in layout order)."""
    if isinstance(values, dict):
        return dict(values)
    return dict(zip(names, values or []))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def session_report(store: Store, session_id: int) -> str:
    """A session as Markdown for the logbook: who, what, on which machine with which policy,
    the headline result, what the machine was left at, approvals, every step (metrics,
    reward, who chose it, the largest knob change in the machine's units) and every event."""
    session = load_session(store, session_id)
    machine = store.get(MachineRow, session.machine_id)
    policy = store.get(PolicyRow, session.policy_id)
    events = [row_dict(e) for e in store.events(session_id)]
    layout = session.layout or {}
    metrics = layout.get("metrics", [])
    knobs = layout.get("knobs", [])
    result = session.result or {}
    started, ended = row_dict(session)["started"], row_dict(session)["ended"]
    lines = [f"# Session {session.id}: {session.status} on {machine.name if machine else session.machine_id}", "",
             "| | |", "|---|---|",
             f"| task | {_cell(session.task)} |",
             f"| machine | {_cell(machine.name if machine else None)} ({_cell(machine.kind if machine else None)}) |",
             f"| policy | {_cell(policy.path if policy else None)} (sha256 {policy.sha256[:12] if policy else '-'}) |",
             f"| operator, mode | {_cell(session.operator)}, {_cell(session.mode)} |",
             f"| started, ended (UTC) | {_cell(started)}, {_cell(ended)} |"]
    for m in metrics[:1]:
        before, after = result.get(f"initial_{m['name']}"), result.get(f"final_{m['name']}")
        lines.append(f"| {m.get('label') or m['name']} ({m['unit']}) | {_cell(before)} → {_cell(after)} in "
                     f"{_cell(result.get('steps'))} steps |")
    lines.append(f"| {machine_left(session.status, events) or 'machine left: session still running'} | |")
    decisions = decided_by(events)
    lines.append(f"| approved by, rejected by | {', '.join(decisions['approved']) or '-'}, "
                 f"{', '.join(decisions['rejected']) or '-'} |")
    trips = [e["reason"] for e in events if e["kind"] == "trip"]
    lines += [f"| trips | {_cell('; '.join(trips)) if trips else 'none'} |", ""]

    unit = {k["name"]: (k.get("engineering") or {}).get("unit") or k.get("unit", "") for k in knobs}
    scale = {k["name"]: (k.get("engineering") or {}).get("scale", 1.0) for k in knobs}
    metric_columns = [f"{m.get('label') or m['name']} ({m['unit']})" for m in metrics]
    lines += ["## Steps", "", "| step | time (UTC) | " + " | ".join(metric_columns + ["reward", "by", "largest change"]) + " |",
              "|" + "---|" * (len(metric_columns) + 5)]
    start = next((e for e in events if e["kind"] == "start"), None)
    before = _named((start or {}).get("data", {}).get("settings"), [k["name"] for k in knobs])
    for s in store.steps(session_id):
        safe = s.safe or {}
        changes = {n: (safe[n] - before[n]) * scale.get(n, 1.0) for n in safe if n in before}
        before = dict(s.readbacks or {})
        largest = max(changes, key=lambda n: abs(changes[n]), default=None)
        change = f"{largest} {changes[largest]:+.4g} {unit.get(largest, '')}".strip() if largest else "-"
        values = [_cell((s.metrics or {}).get(m["name"])) for m in metrics]
        lines.append(f"| {s.step} | {row_dict(s)['time']} | " + " | ".join(values + [_cell(s.reward), _cell(s.by), change]) + " |")
    lines += ["", "## Events", ""]
    lines += [f"- {e['time']} **{e['kind']}**: {_cell(e['reason'])}" for e in events] or ["- none"]
    return "\n".join(lines) + "\n"
