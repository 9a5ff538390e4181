"""What every console page shares: the server connection and its failure states."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import streamlit as st
import streamlit.components.v1 as components

from ui.console.client import ApiError, ConsoleClient, ServerUnreachable


def client() -> ConsoleClient:
    s = st.session_state
    return ConsoleClient(s.get("server_url") or None, s.get("token"))


def operator() -> str:
    return st.session_state.get("operator") or os.environ.get("USER", "operator")


def connected_or_stop() -> ConsoleClient:
    """The client, or a clear 'server unreachable' state with what to do next."""
    c = client()
    try:
        c.health()
    except ServerUnreachable:
        st.error(f"**Control server unreachable** at {c.base_url}.")
        st.markdown(
            "What to do: start it with `tbsac serve --port 8765` on the control-room host, "
            "or correct the server address in the sidebar, then reload this page.")
        st.stop()
    return c


def call(fn, *args, **kwargs):
    """Run an API call; show a refusal as a readable error instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except ApiError as exc:
        hint = {401: "enter the operator token in the sidebar", 403: "the operator token is wrong",
                409: "the machine or session is busy in another state", 404: "it no longer exists"}.get(exc.status, "")
        st.error(f"The server refused: {exc.detail}" + (f" ({hint})" if hint else ""))
    except ServerUnreachable as exc:
        st.error(f"Control server unreachable: {exc}. Start it with `tbsac serve`.")
    return None


def event_log(events: list[dict]) -> None:
    """The session's events as a table whose reason column gets the room (operators read it)."""
    import pandas as pd

    from ui.console.client import format_time

    rows = [{"time (UTC)": format_time(e["time"]), "kind": e["kind"], "reason": e["reason"]} for e in events]
    st.dataframe(pd.DataFrame(rows or {"time (UTC)": [], "kind": [], "reason": []}), hide_index=True, use_container_width=True,
                 column_config={"time (UTC)": st.column_config.TextColumn(width="medium"),
                                "kind": st.column_config.TextColumn(width="small"),
                                "reason": st.column_config.TextColumn(width="large")})


def policy_facts(entry: dict | None) -> list[str]:
    """What the Run page says of a policy: its training's key numbers, whether they met the
    task's bar (marked when not), and how many machines evaluated it."""
    if entry is None:
        return []
    numbers = ", ".join(f"{k} {v:.3g}" for k, v in (entry.get("training_summary") or {}).items() if isinstance(v, (int, float)))
    facts = [numbers] if numbers else []
    if entry.get("bar_met") is False:
        facts.append("✗ FAILED its bar")
    elif entry.get("bar_met"):
        facts.append("bar met")
    evaluation = entry.get("evaluation")
    if evaluation:
        facts.append(f"evaluated on {evaluation['episodes']} machines ({evaluation['errors']})")
    return facts


def policy_label(entry: dict | None, title: str) -> str:
    """A policy as the Run page offers it: its name, then its facts."""
    return " · ".join([title, *policy_facts(entry)])


_push = components.declare_component("tbsac_push", path=str(Path(__file__).parent / "push"))


def push_updates(server_url: str, session_id: int) -> None:
    """Rerun the calling fragment at once on each of the session's server events (its
    event stream, read by the browser); the fragment's own poll remains the fallback."""
    if os.environ.get("TBSAC_CONSOLE_PUSH") == "0":
        return
    _push(url=f"{server_url}/api/sessions/{session_id}/stream?tail=true", key=f"push-{session_id}", default=None)


def machine_now(steps: list[dict], events: list[dict]) -> dict:
    """The machine's readings and knob settings as last recorded, and a note saying when:
    after a verified restore (or dial-in) that came after the last step, what it wrote and
    read; else the last step; else the start (after its opening probe)."""
    start = next((e for e in events if e["kind"] == "start"), None)
    landings = [e for e in events if e["kind"] in ("restore", "dial_in") and (e.get("data") or {}).get("knobs")]
    last_step_time = dt.datetime.fromisoformat(steps[-1]["time"]) if steps else None
    if landings and (last_step_time is None or dt.datetime.fromisoformat(landings[-1]["time"]) >= last_step_time):
        from ui.console.client import format_time

        landing = landings[-1]
        data = landing["data"]
        what = "restore" if landing["kind"] == "restore" else "dial-in"
        return {"readings": data.get("readings") or (steps[-1]["readings"] if steps else None), "settings": data["knobs"],
                "note": f"the machine after the {what} at {format_time(landing['time'])}: knobs as written and verified"
                        + (", readings as read then" if data.get("readings") else
                           " (no readings recorded with it: the charts show the last step)")}
    if steps:
        return {"readings": steps[-1]["readings"], "settings": steps[-1]["readbacks"], "note": ""}
    if start:
        return {"readings": start["data"].get("readings_after_probe") or start["data"].get("readings"),
                "settings": start["data"].get("settings"), "note": ""}
    return {"readings": None, "settings": None, "note": ""}
