"""Run page: choose machine, policy and mode; start, watch, approve, abort, restore."""

import os
import time

import streamlit as st

from core.outcome import machine_left
from ui.console.charts import (headline, knob_chart, metric_title, panel_charts, primary_metric,
                               proposal_table, trend_chart)
from ui.console.client import ApiError, ServerUnreachable, format_time
from ui.console.common import (call, client as make_client, event_log, machine_now, operator, policy_facts,
                               policy_label, push_updates)

NEXT_STEP = {
    "tripped": "The safety layer stopped the session. Read the reason in the event log; "
               "if the starting settings were not restored, press **Restore**.",
    "aborted": "The session was aborted; the starting settings were restored (see the event log).",
    "rejected": "A proposed step was rejected; the starting settings were restored.",
    "not_converged": "The target was not reached within the step limit. The event log says whether the starting "
                     "settings were restored or improved settings kept; check the machine, then start again or hand "
                     "over to the method you use today.",
    "interrupted": "The control server stopped during this session. Its steps are kept; press **Restore** "
                   "to put the machine back to its starting settings.",
    "faulted": "An internal error stopped the session. Press **Restore**, then report the event log.",
}
COMMANDS = (("pause", "Pause", "hold before the next step"), ("resume", "Resume", "continue after a pause"),
            ("abort", "Stop", "abort the session and restore the starting settings (verified)"),
            ("restore", "Restore", "write the starting settings of the last session back"))

# Status, the proposal, Approve/Reject and Stop must fit above the fold of a 1600x900
# control-room screen: a small title, the choices on one row, Approve/Reject above the
# proposal table, and a table of a few rows (largest changes first) that scrolls.
# Stop is the abort command (the session ends, its starting settings written back and
# verified by the safety layer): red, so that it is found without reading. Stale parts
# (the server or the machine not answering) are drawn grey.
st.markdown("<style>.st-key-cmd-abort button {background-color: #c62828; border-color: #c62828; color: white;}"
            ".st-key-cmd-abort button:hover {background-color: #8e0000; color: white;}"
            ".st-key-cmd-start button {background-color: #2e7d32; border-color: #2e7d32; color: white;}"
            ".st-key-cmd-start button:hover {background-color: #1b5e20; color: white;}"
            "[class*='st-key-approve-'] button {background-color: #2e7d32; border-color: #2e7d32; color: white;}"
            "[class*='st-key-approve-'] button:hover {background-color: #1b5e20; color: white;}"
            ".st-key-stale-view, .st-key-stale-charts {filter: grayscale(1); opacity: 0.5;}</style>",
            unsafe_allow_html=True)
st.markdown("#### Run tuning")
# Streamlit forgets a widget's value in a run that does not draw it (while the server is
# unreachable the choices are not drawn); set by the page itself, a value is kept.
for key in ("machine", "mode", "sim-units"):
    if key in st.session_state:
        st.session_state[key] = st.session_state[key]


def interlock_panel(machine: dict, steps: list[dict], events: list[dict], live: dict | None) -> None:
    """Each interlock: live from the machine where the server watches it (EPICS), else
    as the last step read it; a trip names its reason."""
    trips = [e["reason"] for e in events if e["kind"] == "trip"]
    channels = {c["name"]: c for c in (live or {}).get("channels", [])} if (live or {}).get("watched") else {}
    last = steps[-1]["interlocks"] if steps else {}
    for il in machine.get("interlocks", []):
        reason = next((t for t in trips if il in t), None)
        channel = channels.get(il)
        value = channel["value"] if channel else last.get(il)
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        if channel and channel["problem"]:
            st.error(f"**{il}** {shown} — NO GOOD NOW: {channel['problem']}" + (f" · trip: {reason}" if reason else ""))
        else:
            (st.error if reason else st.success)(f"**{il}** {shown}" + (f" — {reason}" if reason else " — OK"))
    for t in (t for t in trips if not any(il in t for il in machine.get("interlocks", []))):
        st.error(f"**trip** — {t}")
    if channels:
        st.caption(f"live from the machine (Channel Access monitors), as of {format_time_s(live['time'])}")
    elif steps:
        st.caption(f"as read at step {steps[-1]['step']} ({format_time(steps[-1]['time'])})")


def send_command(session_id: int, command: str, proposal: int | None = None) -> None:
    """An operator command, sent from a button's callback (before the page redraws)."""
    if call(make_client().command, session_id, command, operator(), proposal) and command not in ("approve", "reject"):
        st.toast(f"{command} sent for session {session_id}")


def format_time_s(epoch: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def draw(view: dict, sim_units: bool, stale: bool = False) -> None:
    """The session as `view` holds it (machine, session, steps, events, live channels)."""
    machine, session, steps, events, live = view["machine"], view["session"], view["steps"], view["events"], view.get("live")
    session_id, status = session["id"], session["status"]
    header = (f"Session {session_id} · {status} · operator {session['operator']} · mode {session['mode']} · "
              f"started {format_time(session['started'])}")
    left = machine_left(status, events)
    if status in ("running", "paused"):
        now = headline(primary_metric(machine, session), steps)
        (st.info if status == "running" else st.warning)(header + (f" · **{now}**" if now else ""))
    elif status in ("completed", "dry-run"):
        result = session.get("result") or {}
        metric = primary_metric(machine, session)
        before, after = result.get(f"initial_{metric['name']}"), result.get(f"final_{metric['name']}")
        unit = "" if metric["unit"] == "1" else f" {metric['unit']}"
        change = f"{metric.get('label') or metric['name']} {before or 0:.3f} → {after or 0:.3f}{unit}"
        st.success(f"{header} · {change} in {result.get('steps')} steps · {left}")
    else:
        st.error(f"{header} · {left}\n\n{NEXT_STEP.get(status, '')}")
    machine_down = bool(live and live.get("watched") and not live.get("ok")
                        and not any(c["connected"] for c in live["channels"]))
    if machine_down:
        st.error("**The machine does not answer** (no Channel Access connection to its interlock channels): what is "
                 "drawn below is its last recorded state. A step approved now trips and cannot be written; restore "
                 "when the IOC is back.")

    pending = session.get("pending")
    if pending:
        proposals = [e for e in events if e["kind"] == "proposal"]
        shown = proposals[pending["id"] - 1] if len(proposals) >= pending["id"] else None
        start = next((e for e in events if e["kind"] == "start"), None)
        # A proposal before the session's start event is part of its opening (the probe of
        # the machine's response); a dial-in starts first and proposes after.
        probe = shown is not None and (start is None or shown["time"] < start["time"])
        # Buttons left of the title: the table's toolbar, shown on hover at its top right,
        # must never cover them.
        a, r, title = st.columns([1, 1, 6], vertical_alignment="center")
        title.markdown(f"**Proposed step {pending['id']} — waiting for your approval**"
                       + (" · the opening probe: a small move of every knob so the policy sees how the machine "
                          "responds (the trend it acts on)" if probe else ""))
        # Sent from the click's callback, which runs before any redraw: a redraw pushed by the
        # server at the same moment must not swallow the decision (seen in CI).
        a.button("Approve", type="primary", key=f"approve-{pending['id']}", use_container_width=True, disabled=stale,
                 on_click=send_command, args=(session_id, "approve", pending["id"]))
        r.button("Reject", key=f"reject-{pending['id']}", use_container_width=True, disabled=stale,
                 on_click=send_command, args=(session_id, "reject", pending["id"]))
        expected = ((shown or {}).get("data") or {}).get("expected")
        if expected:  # above the table, so that it is read before approving
            st.caption(f"Expected effect ({expected['source']}): {expected['summary']}")
        change = proposal_table(machine, pending, simulator_units=sim_units)
        st.dataframe(change, hide_index=True, use_container_width=True, height=min(38 + 35 * len(change), 248),
                     column_config={"of range": st.column_config.ProgressColumn(
                         "of range", help="the change as a share of the knob's range", format="%.2f", min_value=0.0,
                         max_value=1.0)})

    start_event = next((e for e in events if e["kind"] == "start"), None)
    start_readings = start_event["data"]["readings"] if start_event else None
    now = machine_now(steps, events)
    with st.container(key="stale-charts" if machine_down and not stale else "charts"):
        if now["note"]:
            st.caption(now["note"])
        for title, chart in panel_charts(machine, start_readings, now["readings"] or start_readings, session, steps,
                                         start_settings=start_event["data"]["settings"] if start_event else None):
            st.subheader(title)
            st.altair_chart(chart, use_container_width=False)
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Knobs")
        st.altair_chart(knob_chart(machine, now["settings"], simulator_units=sim_units), use_container_width=True)
    with c2:
        st.subheader("Interlocks")
        interlock_panel(machine, steps, events, live)
    metric = primary_metric(machine, session)
    st.subheader(f"{metric_title(metric)} and reward")
    st.altair_chart(trend_chart(steps, metric), use_container_width=False)
    st.subheader("Event log")
    event_log(events)


def offline(server: str) -> None:
    """The server does not answer: say so, keep the last state it sent (grey, commands
    disabled), and come back by itself when it answers again."""
    since = st.session_state.setdefault("offline_since", time.time())
    view = st.session_state.get("last_view")
    st.error(f"**Control server unreachable** at {server} (no answer for {time.time() - since:.0f} s). "
             + (f"Below is the last state it sent, as of {format_time_s(view['fetched'])}, greyed; commands are "
                "disabled until it answers again. " if view else ""))
    st.markdown("What to do: start it with `tbsac serve --port 8765` on the control-room host, or correct the server "
                "address in the sidebar. This page reconnects by itself. A session whose server died stops and "
                "restores its machine on its own.")
    for col, label in zip(st.columns(5), ["Start"] + [c[1] for c in COMMANDS]):
        col.button(label, disabled=True, key=f"offline-{label}")

    @st.fragment(run_every=1.0)
    def wait_for_server() -> None:
        try:
            make_client().health()
        except ServerUnreachable:
            st.caption(f"retrying every second · unreachable for {time.time() - since:.0f} s")
            return
        st.session_state.pop("offline_since", None)
        st.rerun()

    wait_for_server()
    if view:
        with st.container(key="stale-view"):
            draw(view, st.session_state.get("sim-units", False), stale=True)


client = make_client()
try:
    client.health()
    machines = client.machines()
except ServerUnreachable:
    offline(client.base_url)
    st.stop()
st.session_state.pop("offline_since", None)
if not machines:
    st.warning("**No machine connected** to the control server. What to do: add a machine file "
               "(hardware/machines) and restart `tbsac serve`.")
    st.stop()

by_name = {m["name"]: m for m in machines}
left, right, mode_column, units_column = st.columns([5, 5, 3, 2], vertical_alignment="bottom")
with left:
    name = st.selectbox("Machine", list(by_name), key="machine",
                        format_func=lambda n: f"{n} ({by_name[n]['kind']}, {by_name[n]['lattice']})")
machine = by_name[name]
policies = client.policies()
# Offered by name with what their training measured; the shipped one first (its record, if
# it was evaluated here), then the recorded policies of this machine's lattice, newest first.
shipped = next((p for p in policies["recorded"] if p.get("shipped") and p["path"].endswith(f"/{machine['lattice']}.pt")), None)
offered = {"pretrained": shipped} | {p["path"]: p for p in reversed(policies["recorded"])
                                     if p["lattice"] == machine["lattice"] and not p.get("shipped")}
if "policy" in st.session_state:  # kept like the choices above, while it is one of this machine's
    if st.session_state["policy"] in offered:
        st.session_state["policy"] = st.session_state["policy"]
    else:
        del st.session_state["policy"]
with right:
    policy = st.selectbox("Policy", list(offered), key="policy", format_func=lambda k: policy_label(
        offered[k], f"pretrained ({machine['lattice']}.pt, shipped)" if k == "pretrained" else offered[k]["name"]))
chosen = offered.get(policy)
policy_confirmed = True
if chosen and chosen.get("bar_met") is False:
    st.warning(f"**{chosen['name']} did not meet the {chosen.get('task')} bar in its training's evaluation** "
               f"({' · '.join(policy_facts(chosen))}). It may do worse than the method you use today.")
    policy_confirmed = st.checkbox("I have checked this policy and want to run it anyway", key=f"confirm-{policy}")
mode = mode_column.radio("Mode", ["auto", "approve", "dry-run"], horizontal=True, key="mode",
                         help="approve: every step waits for your approval; dry-run: proposals only, nothing is written")
sim_units = units_column.toggle("Simulator units", key="sim-units", help="Knob settings in the simulator's units instead "
                                "of the machine file's engineering units (scale and polarity)")
seed = 0
if machine["kind"] == "simulated":
    seed = st.number_input("Simulated machine (seed of its hidden errors)", min_value=0, max_value=2**31 - 1, value=0, step=1)

# The session shown: the machine's active one, else the last one started here, else its latest.
session_id = machine.get("active_session") or st.session_state.get(f"session:{name}")
if session_id is None:
    latest = client.sessions(machine=name, limit=1)
    session_id = latest[0]["id"] if latest else None

buttons = st.columns(5)
if buttons[0].button("Start", type="primary", disabled=bool(machine.get("active_session")) or not policy_confirmed,
                     key="cmd-start"):
    sid = call(client.start, machine=name, policy=policy, mode=mode, operator=operator(), seed=int(seed))
    if sid:
        st.session_state[f"session:{name}"] = sid
        st.rerun()
for col, (command, label, hint) in zip(buttons[1:], COMMANDS):
    col.button(label, disabled=session_id is None, key=f"cmd-{command}", help=hint, on_click=send_command,
               args=(session_id, command))


# The fallback poll (pushed server events redraw at once); TBSAC_CONSOLE_POLL_S sets it,
# e.g. to measure the push channel alone.
POLL_S = float(os.environ.get("TBSAC_CONSOLE_POLL_S", "1.0"))


@st.fragment(run_every=POLL_S)
def live(session_id: int | None) -> None:
    """The session, redrawn every second and at once on every pushed server event."""
    if session_id is None:
        st.info("No session on this machine yet. Choose policy and mode, then press **Start**.")
        return
    try:
        session = client.session(session_id)
        view = {"machine": machine, "session": session, "steps": client.steps(session_id),
                "events": client.events(session_id), "live": client.machine_live(name) if machine["kind"] == "epics" else None,
                "fetched": time.time()}
    except ServerUnreachable:
        st.session_state["offline_since"] = time.time()
        st.rerun()  # the whole page: its offline state
    except ApiError as exc:  # e.g. the session was removed from the store: say so, no traceback
        st.error(f"The server refused to show session {session_id}: {exc.detail}")
        return
    st.session_state["last_view"] = view
    if session["status"] in ("running", "paused"):
        push_updates(client.base_url, session_id)
    elif machine.get("active_session") == session_id and not st.session_state.get(f"ended:{session_id}"):
        # The page's machine list (and its disabled Start) predates the end: redraw the whole page once.
        st.session_state[f"ended:{session_id}"] = True
        st.rerun()
    draw(view, sim_units)


live(session_id)
