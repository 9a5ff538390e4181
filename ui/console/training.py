"""Training: runs, learning curves, evaluations against SVD, and where policies are deployed."""

import pandas as pd
import streamlit as st

from ui.console.charts import flatten, learning_chart
from ui.console.client import format_time
from ui.console.common import connected_or_stop

st.title("Training")
client = connected_or_stop()
runs = client.training_runs()
if runs:
    st.dataframe(pd.DataFrame([{
        "run": r["id"], "sweep / trial": f"{r['sweep']} / {r['trial']}" if r.get("sweep") else "-", "task": r["task"], "lattice": r["lattice"], "errors": r["errors"], "arch": r["arch"], "steps": r["steps"], "seed": r["seed"],
        "status": r["status"], "best step": (r["evaluation"] or {}).get("best_step"),
        "bar first met at step": (r["evaluation"] or {}).get("first_bar_step"), "started (UTC)": format_time(r["started"]),
    } for r in runs]), hide_index=True, use_container_width=True)
    rid = st.selectbox("Training run", [r["id"] for r in runs], format_func=lambda i: f"run {i}", key="t-run")
    run = next(r for r in runs if r["id"] == rid)
    curves = run["curves"] or []
    quantities = list(flatten(curves[-1])) if curves else []
    shown = st.multiselect("Quantities of the periodic evaluation", quantities, default=quantities[:2], key="t-quantities")
    st.altair_chart(learning_chart(curves, shown))
    best = (run["evaluation"] or {}).get("best")
    if best:
        values = ", ".join(f"{k} {v:g}" for k, v in flatten(best).items())
        st.caption(f"best checkpoint (step {run['evaluation']['best_step']}) on the periodic evaluation: {values}")
else:
    st.info("No training runs recorded yet. Train with `tbsac train TASK ...` (`tbsac info` lists tasks); runs appear here.")

st.subheader("Evaluations: agent against the baselines")
evaluations = client.evaluations()
if evaluations:
    for task in dict.fromkeys(e["task"] for e in evaluations):
        rows = [{"evaluation": e["id"], "lattice": e["lattice"], "errors": e["errors"], "machines": e["episodes"],
                 "method": method, **flatten(r), "when (UTC)": format_time(e["created"])}
                for e in evaluations if e["task"] == task for method, r in e["results"].items()]
        st.markdown(f"**{task}**")
        st.dataframe(pd.DataFrame(rows), hide_index=True, use_container_width=True)
else:
    st.info("No evaluations recorded yet: run `tbsac evaluate TASK --policy pretrained` (`tbsac info` lists tasks).")

st.subheader("Policies and where they are deployed")
policies = client.policies()
st.dataframe(pd.DataFrame([{
    "policy": p["id"], "file": p["path"], "lattice": p["lattice"], "training run": p["training_run_id"],
    "deployed on": ", ".join(p["deployed_on"]) or "-",
} for p in policies["recorded"]] or [{"policy": "-", "file": "", "lattice": "", "training run": "", "deployed on": ""}]),
    hide_index=True, use_container_width=True)
st.caption("Shipped pretrained policies: " + ", ".join(policies["pretrained"]))
