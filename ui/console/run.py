"""Run page: choose machine, policy and mode; start, watch, approve, abort, restore."""

import streamlit as st

from core.outcome import machine_left
from ui.console.charts import (headline, knob_chart, metric_title, panel_charts, primary_metric,
                               proposal_table, trend_chart)
from ui.console.client import format_time
from ui.console.common import call, connected_or_stop, event_log, operator, policy_facts, policy_label

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

# Status, the proposal, Approve/Reject and Stop must fit above the fold of a 1600x900
# control-room screen: a small title, the choices on one row, Approve/Reject above the
# proposal table, and a table of a few rows (largest changes first) that scrolls.
st.markdown("#### Run tuning")
client = connected_or_stop()
machines = client.machines()
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
# Stop is the abort command (the session ends, its starting settings written back and
# verified by the safety layer); red, so that it is found without reading.
st.markdown("<style>.st-key-cmd-abort button {background-color: #c62828; border-color: #c62828; color: white;}"
            ".st-key-cmd-abort button:hover {background-color: #8e0000; color: white;}"
            ".st-key-cmd-start button {background-color: #2e7d32; border-color: #2e7d32; color: white;}"
            ".st-key-cmd-start button:hover {background-color: #1b5e20; color: white;}"
            "[class*='st-key-approve-'] button {background-color: #2e7d32; border-color: #2e7d32; color: white;}"
            "[class*='st-key-approve-'] button:hover {background-color: #1b5e20; color: white;}</style>",
            unsafe_allow_html=True)
for col, (command, label, hint) in zip(buttons[1:], (
        ("pause", "Pause", "hold before the next step"), ("resume", "Resume", "continue after a pause"),
        ("abort", "Stop", "abort the session and restore the starting settings (verified)"),
        ("restore", "Restore", "write the starting settings of the last session back"))):
    if col.button(label, disabled=session_id is None, key=f"cmd-{command}", help=hint):
        if call(client.command, session_id, command, operator()):
            st.toast(f"{label.lower()} sent for session {session_id}")


@st.fragment(run_every=1.0)
def live(session_id: int | None) -> None:
    if session_id is None:
        st.info("No session on this machine yet. Choose policy and mode, then press **Start**.")
        return
    session = call(client.session, session_id)
    if session is None:
        return
    steps = client.steps(session_id)
    events = client.events(session_id)
    status = session["status"]
    if status not in ("running", "paused") and machine.get("active_session") == session_id \
            and not st.session_state.get(f"ended:{session_id}"):
        # The page's machine list (and its disabled Start) predates the end: redraw the whole page once.
        st.session_state[f"ended:{session_id}"] = True
        st.rerun()
    header = f"Session {session_id} · {status} · operator {session['operator']} · mode {session['mode']} · started {format_time(session['started'])}"
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

    pending = session.get("pending")
    if pending:
        title, a, r = st.columns([6, 1, 1], vertical_alignment="center")
        title.markdown(f"**Proposed step {pending['id']} — waiting for your approval**")
        if a.button("Approve", type="primary", key=f"approve-{pending['id']}", use_container_width=True):
            call(client.command, session_id, "approve", operator(), pending["id"])
            st.rerun(scope="fragment")
        if r.button("Reject", key=f"reject-{pending['id']}", use_container_width=True):
            call(client.command, session_id, "reject", operator(), pending["id"])
            st.rerun(scope="fragment")
        change = proposal_table(machine, pending, simulator_units=sim_units)
        st.dataframe(change, hide_index=True, use_container_width=True, height=min(38 + 35 * len(change), 248),
                     column_config={"of range": st.column_config.ProgressColumn(
                         "of range", help="the change as a share of the knob's range", format="%.2f", min_value=0.0,
                         max_value=1.0)})

    start_event = next((e for e in events if e["kind"] == "start"), None)
    start_readings = start_event["data"]["readings"] if start_event else None
    current = steps[-1]["readings"] if steps else (start_event["data"].get("readings_after_probe") if start_event else None)
    for title, chart in panel_charts(machine, start_readings, current or start_readings, session, steps,
                                     start_settings=start_event["data"]["settings"] if start_event else None):
        st.subheader(title)
        st.altair_chart(chart, use_container_width=False)
    c1, c2 = st.columns(2)
    with c1:
        st.subheader("Knobs")
        settings = steps[-1]["readbacks"] if steps else (start_event["data"]["settings"] if start_event else None)
        st.altair_chart(knob_chart(machine, settings, simulator_units=sim_units), use_container_width=True)
    with c2:
        st.subheader("Interlocks")
        trips = [e["reason"] for e in events if e["kind"] == "trip"]
        last = steps[-1]["interlocks"] if steps else {}
        for il in machine.get("interlocks", []):
            reason = next((t for t in trips if il in t), None)
            value = last.get(il)
            shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
            (st.error if reason else st.success)(f"**{il}** {shown}" + (f" — {reason}" if reason else " — OK"))
        other = [t for t in trips if not any(il in t for il in machine.get("interlocks", []))]
        for t in other:
            st.error(f"**trip** — {t}")
    metric = primary_metric(machine, session)
    st.subheader(f"{metric_title(metric)} and reward")
    st.altair_chart(trend_chart(steps, metric), use_container_width=False)
    st.subheader("Event log")
    event_log(events)


live(session_id)
