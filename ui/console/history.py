"""History and replay: find a session, step through it, audit it, compare, download."""

import pandas as pd
import streamlit as st

from ui.console.charts import compare_chart, corrector_chart, currents_chart, orbit_chart, transmission, trend_chart
from ui.console.client import format_time
from ui.console.common import call, connected_or_stop, event_log

STATUSES = ["running", "paused", "completed", "not_converged", "tripped", "aborted", "rejected", "dry-run", "interrupted", "faulted"]

st.title("History and replay")
client = connected_or_stop()
machines = {m["name"]: m for m in client.machines()}
f1, f2 = st.columns(2)
status = f1.selectbox("Status", ["all"] + STATUSES, key="h-status")
machine_filter = f2.selectbox("Machine", ["all"] + list(machines), key="h-machine")
sessions = client.sessions(status=None if status == "all" else status, machine=None if machine_filter == "all" else machine_filter)
if not sessions:
    st.info("No recorded sessions match. Sessions appear here once one is started from the Run page or with `tbsac run`.")
    st.stop()

table = pd.DataFrame([{
    "session": s["id"], "machine": s["machine"], "operator": s["operator"], "mode": s["mode"], "status": s["status"],
    "started (UTC)": format_time(s["started"]), "steps": (s.get("result") or {}).get("steps"),
    "final RMS (mm)": (s.get("result") or {}).get("final_rms_mm"),
    "final transmission": (s.get("result") or {}).get("final_transmission"),
} for s in sessions])
st.dataframe(table, hide_index=True, use_container_width=True)

ids = [s["id"] for s in sessions]
sid = st.selectbox("Session", ids, key="h-session", format_func=lambda i: f"session {i}")
session = client.session(sid)
steps = client.steps(sid)
events = client.events(sid)
machine = machines.get(session["machine"])
start_event = next((e for e in events if e["kind"] == "start"), None)

st.subheader(f"Session {sid}: {session['status']} on {session['machine']}, started {format_time(session['started'])}")
k = st.slider("Step", min_value=0, max_value=max(len(steps), 1), value=len(steps), key="h-step",
              help="0 is the machine as found; every plot redraws at the chosen step") if steps else 0
orbit = steps[k - 1]["readings"] if k > 0 else (start_event["data"]["readings"] if start_event else None)
settings = steps[k - 1]["readbacks"] if k > 0 else (start_event["data"]["settings"] if start_event else None)
task = machine.get("task", "orbit") if machine else "orbit"
if machine:
    start_readings = start_event["data"]["readings"] if start_event else None
    if task == "rfq":
        st.altair_chart(currents_chart(start_readings, orbit))
    else:
        target = (session.get("task_config") or {}).get("target_rms_mm", 0.5)
        st.altair_chart(orbit_chart(machine, start_readings, orbit, target))
    st.altair_chart(corrector_chart(machine, settings), use_container_width=True)
else:
    st.warning(f"Machine {session['machine']} is not known to this server any more; orbit plots are unavailable.")
st.altair_chart(trend_chart(steps, marker_step=k, task=task))
if k > 0:
    step = steps[k - 1]
    if task == "rfq":
        t = transmission(step["readings"])
        metric_text = f"transmission {t:.3f}" if t is not None else "transmission -"
    else:
        metric_text = f"RMS {step['rms_mm']:.3f} mm" if step["rms_mm"] is not None else "RMS -"
    st.caption(f"step {k} at {format_time(step['time'])}: {metric_text}, reward {step['reward']:.3f}, "
               f"step time {step['latency_s'] * 1e3:.1f} ms (includes any wait for approval)")
upto = steps[k - 1]["time"] if k > 0 else (start_event["time"] if start_event else None)
shown = [e for e in events if upto is None or e["time"] <= upto] if k < len(steps) else events
event_log(shown)

a, b = st.columns(2)
if a.button("Replay audit", key="h-replay"):
    report = call(client.replay, sid)
    if report:
        (st.success if report["reproduced"] == report["steps"] else st.error)(
            f"{report['reproduced']} of {report['steps']} recorded actions reproduced by policy {report['policy']}")
b.download_button("Download CSV", data=client.export_csv(sid), file_name=f"session-{sid}.csv", mime="text/csv", key="h-csv")

st.subheader("Compare sessions")
pair = st.multiselect("Sessions to compare", ids, default=ids[:2], max_selections=2, key="h-compare",
                      format_func=lambda i: f"session {i}")
if pair:
    st.altair_chart(compare_chart({f"session {i}": client.steps(i) for i in pair}, task=task), use_container_width=True)
