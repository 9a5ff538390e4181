"""What every console page shares: the server connection and its failure states."""

from __future__ import annotations

import os

import streamlit as st

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
