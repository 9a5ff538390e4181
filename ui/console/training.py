"""Training: runs, learning curves, evaluations against SVD, and where policies are deployed."""

import pandas as pd
import streamlit as st

from ui.console.charts import learning_chart
from ui.console.client import format_time
from ui.console.common import connected_or_stop

st.title("Training")
client = connected_or_stop()
runs = client.training_runs()
if runs:
    st.dataframe(pd.DataFrame([{
        "run": r["id"], "lattice": r["lattice"], "errors": r["errors"], "arch": r["arch"], "steps": r["steps"], "seed": r["seed"],
        "status": r["status"], "best step": (r["evaluation"] or {}).get("best_step"),
        "bar first met at step": (r["evaluation"] or {}).get("first_bar_step"), "started (UTC)": format_time(r["started"]),
    } for r in runs]), hide_index=True, use_container_width=True)
    rid = st.selectbox("Training run", [r["id"] for r in runs], format_func=lambda i: f"run {i}", key="t-run")
    run = next(r for r in runs if r["id"] == rid)
    st.altair_chart(learning_chart(run["curves"] or []))
    best = (run["evaluation"] or {}).get("best")
    if best:
        st.caption(f"best checkpoint (step {run['evaluation']['best_step']}) on the periodic evaluation: success "
                   f"{best['success_rate']:.0%}, final RMS p95 {best['final_rms_mm']['p95']} mm, median steps {best['steps']['median']}")
else:
    st.info("No training runs recorded yet. Train with `tbsac train orbit ...`; runs appear here.")

st.subheader("Evaluations: agent against SVD")
evaluations = client.evaluations()
if evaluations:
    rows = []
    for e in evaluations:
        for method, r in e["results"].items():
            rows.append({"evaluation": e["id"], "lattice": e["lattice"], "errors": e["errors"], "machines": e["episodes"],
                         "method": method, "success": r["success_rate"], "final RMS p95 (mm)": r["final_rms_mm"]["p95"],
                         "median steps": r["steps"]["median"], "when (UTC)": format_time(e["created"])})
    st.dataframe(pd.DataFrame(rows), hide_index=True, use_container_width=True)
else:
    st.info("No evaluations recorded yet: run `tbsac evaluate orbit --lattice cafe2-cm1 --policy pretrained`.")

st.subheader("Policies and where they are deployed")
policies = client.policies()
st.dataframe(pd.DataFrame([{
    "policy": p["id"], "file": p["path"], "lattice": p["lattice"], "training run": p["training_run_id"],
    "deployed on": ", ".join(p["deployed_on"]) or "-",
} for p in policies["recorded"]] or [{"policy": "-", "file": "", "lattice": "", "training run": "", "deployed on": ""}]),
    hide_index=True, use_container_width=True)
st.caption("Shipped pretrained policies: " + ", ".join(policies["pretrained"]))
