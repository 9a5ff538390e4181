"""What a recorded session left the machine at, read from its events (shared by the
console's header and the session report)."""

from __future__ import annotations


def machine_left(status: str, events: list[dict]) -> str:
    """What the session left the machine at, from its events (not from what was intended)."""
    restores = [e for e in events if e["kind"] in ("restore", "restore_failed", "dial_in")]
    if restores and restores[-1]["kind"] == "dial_in":
        return f"machine left: at {restores[-1]['reason'].split(' dialled in')[0]} (dialled in, verified by read-back)"
    if restores and restores[-1]["kind"] == "restore":
        what = restores[-1]["reason"].split(" in ")[0].replace(" and verified", "")
        return f"machine left: {what} (verified by read-back)"
    if restores:
        return "machine left: RESTORE FAILED (" + restores[-1]["reason"] + ") — press Restore"
    if status == "dry-run":
        return "machine left: untouched (dry-run)"
    if status in ("running", "paused"):
        return ""
    if status == "completed":
        return "machine left: at the session's final settings"
    return "machine left: NOT restored — press Restore"


def decided_by(events: list[dict]) -> dict[str, list[str]]:
    """Who approved and who rejected proposed steps: ``{"approved": [...], "rejected": [...]}``,
    each name once, in order (the event's ``operator``, else the name its reason ends with)."""
    out: dict[str, list[str]] = {"approved": [], "rejected": []}
    for e in events:
        if e["kind"] not in ("approve", "reject"):
            continue
        name = (e.get("data") or {}).get("operator") or e["reason"].rsplit(" by ", 1)[-1]
        names = out["approved" if e["kind"] == "approve" else "rejected"]
        if name not in names:
            names.append(name)
    return out
