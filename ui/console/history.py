"""History and replay: find a session, step through it, audit it, compare, download."""

import pandas as pd
import streamlit as st

from ui.console.charts import compare_chart, knob_chart, metric_value, panel_charts, primary_metric, trend_chart
from ui.console.client import format_time
from ui.console.common import call, connected_or_stop, event_log, operator

STATUSES = ["running", "paused", "completed", "not_converged", "tripped", "aborted", "rejected", "dry-run", "interrupted", "faulted"]

def final_metric(session: dict) -> dict:
    """The session's primary metric at its start and end, named with its unit."""
    metric = primary_metric(None, session)
    result = session.get("result") or {}
    return {"metric": f"{metric.get('label') or metric['name']} ({metric['unit']})",
            "start": result.get(f"initial_{metric['name']}"), "end": result.get(f"final_{metric['name']}")}


st.title("History and replay")
client = connected_or_stop()
machines = {m["name"]: m for m in client.machines()}
f1, f2, f3 = st.columns(3)
status = f1.selectbox("Status", ["all"] + STATUSES, key="h-status")
machine_filter = f2.selectbox("Machine", ["all"] + list(machines), key="h-machine")
tasks = list(dict.fromkeys(m["task"] for m in machines.values()))
task_filter = f3.selectbox("Task", ["all"] + tasks, key="h-task")
g1, g2 = st.columns([1, 2])
operator_filter = g1.text_input("Operator", key="h-operator", placeholder="any").strip()
days = g2.date_input("Started between (UTC days)", value=(), key="h-days", format="YYYY-MM-DD")
days = tuple(days) if isinstance(days, (list, tuple)) else (days,)
sessions = client.sessions(status=None if status == "all" else status, machine=None if machine_filter == "all" else machine_filter,
                           task=None if task_filter == "all" else task_filter, operator=operator_filter or None,
                           started_from=days[0] if days else None, started_to=days[-1] if days else None)
if not sessions:
    st.info("No recorded sessions match. Sessions appear here once one is started from the Run page or with `tbsac run`.")
    st.stop()

table = pd.DataFrame([{
    "session": s["id"], "machine": s["machine"], "operator": s["operator"], "mode": s["mode"], "status": s["status"],
    "started (UTC)": format_time(s["started"]), "steps": (s.get("result") or {}).get("steps"),
    "task": s.get("task"), **final_metric(s),
    "approved by": ", ".join((s.get("decided_by") or {}).get("approved", [])) or "-",
    "rejected by": ", ".join((s.get("decided_by") or {}).get("rejected", [])) or "-",
} for s in sessions])
st.dataframe(table, hide_index=True, use_container_width=True)

ids = [s["id"] for s in sessions]
sid = st.selectbox("Session", ids, key="h-session", format_func=lambda i: f"session {i}")
session = client.session(sid)
steps = client.steps(sid)
events = client.events(sid)
# A machine this server does not list (a machine file given by path, one since removed)
# is drawn from the layout recorded with the session.
machine = machines.get(session["machine"]) or (session.get("layout") if (session.get("layout") or {}).get("panels") else None)
start_event = next((e for e in events if e["kind"] == "start"), None)

st.subheader(f"Session {sid}: {session['status']} on {session['machine']}, started {format_time(session['started'])}")
k = st.slider("Step", min_value=0, max_value=max(len(steps), 1), value=len(steps), key="h-step",
              help="0 is the machine as found; every plot redraws at the chosen step") if steps else 0
readings = steps[k - 1]["readings"] if k > 0 else (start_event["data"]["readings"] if start_event else None)
settings = steps[k - 1]["readbacks"] if k > 0 else (start_event["data"]["settings"] if start_event else None)
metric = primary_metric(machine, session)
if machine:
    start_readings = start_event["data"]["readings"] if start_event else None
    for title, chart in panel_charts(machine, start_readings, readings, session, steps, k,
                                     start_event["data"]["settings"] if start_event else None):
        st.markdown(f"**{title}**")
        st.altair_chart(chart)
    st.altair_chart(knob_chart(machine, settings), use_container_width=True)
else:
    st.warning(f"Machine {session['machine']} is not known to this server any more; its plots are unavailable.")
st.altair_chart(trend_chart(steps, metric, marker_step=k))
if k > 0:
    step = steps[k - 1]
    value = metric_value(step, metric)
    metric_text = f"{metric.get('label') or metric['name']} {value:.3f} {metric['unit']}" if value is not None else f"{metric['name']} -"
    st.caption(f"step {k} at {format_time(step['time'])}: {metric_text}, reward {step['reward']:.3f}, "
               f"step time {step['latency_s'] * 1e3:.1f} ms (includes any wait for approval)")
upto = steps[k - 1]["time"] if k > 0 else (start_event["time"] if start_event else None)
shown = [e for e in events if upto is None or e["time"] <= upto] if k < len(steps) else events
event_log(shown)

a, b, c, d = st.columns(4)
if k > 0 and session["status"] not in ("running", "paused") and d.button(
        f"Dial in step {k}", key="h-dial-in", help="Start an approve-mode session on this machine that goes to the knob "
        "settings read back at this step: every write within the largest step, approved by you, through the safety layer"):
    new_session = call(client.dial_in, sid, k, operator())
    if new_session:
        st.session_state["machine"] = session["machine"]
        st.session_state[f"session:{session['machine']}"] = new_session
        st.switch_page("run.py")
if a.button("Replay audit", key="h-replay"):
    report = call(client.replay, sid)
    if report:
        (st.success if report["reproduced"] == report["steps"] else st.error)(
            f"{report['reproduced']} of {report['steps']} recorded actions reproduced by policy {report['policy']}")
b.download_button("Download CSV", data=client.export_csv(sid), file_name=f"session-{sid}.csv", mime="text/csv", key="h-csv")
c.download_button("Logbook report (Markdown)", data=client.report(sid), file_name=f"session-{sid}.md", mime="text/markdown",
                  key="h-report", help="who, what, the result, what the machine was left at, approvals, every step and event")

st.subheader("Compare sessions")
pair = st.multiselect("Sessions to compare", ids, default=ids[:2], max_selections=2, key="h-compare",
                      format_func=lambda i: f"session {i}")
if pair:
    st.altair_chart(compare_chart({f"session {i}": client.steps(i) for i in pair}, metric), use_container_width=True)
