"""Altair charts of the console; every axis carries its unit."""

from __future__ import annotations

import altair as alt
import pandas as pd


def orbit_chart(machine: dict, start: list[float] | None, current: list[float] | None, target_mm: float) -> alt.Chart:
    """BPM x and y against position: starting orbit, current orbit, target band."""
    rows = []
    for label, values in (("start", start), ("current", current)):
        if values is None:
            continue
        for i, bpm in enumerate(machine["bpms"]):
            for j, plane in enumerate(("x", "y")):
                rows.append({"s (m)": bpm["s_m"], "BPM": bpm["name"], "plane": plane, "orbit": label, "offset (mm)": values[2 * i + j]})
    data = pd.DataFrame(rows or [{"s (m)": 0.0, "BPM": "", "plane": "x", "orbit": "start", "offset (mm)": 0.0}])
    # Facets need every layer to share the top-level data; the band uses datum values.
    # One rectangle per facet (aggregate), not one per data row stacked up.
    band = alt.Chart().transform_aggregate(n="count()", groupby=["plane"]).mark_rect().encode(
        y=alt.datum(-target_mm), y2=alt.datum(target_mm), color=alt.value("green"), opacity=alt.value(0.15))
    lines = alt.Chart().mark_line(point=True).encode(
        x=alt.X("s (m):Q", title="position s (m)"),
        y=alt.Y("offset (mm):Q", title="beam offset (mm)"),
        color=alt.Color("orbit:N", scale=alt.Scale(domain=["start", "current"], range=["#999999", "#1f77b4"])),
        strokeDash=alt.StrokeDash("orbit:N", scale=alt.Scale(domain=["start", "current"], range=[[4, 3], [1, 0]])),
        tooltip=["BPM", "plane", "orbit", alt.Tooltip("offset (mm):Q", format=".3f")],
    )
    return alt.layer(band, lines, data=data).properties(width=300, height=220).facet(
        column=alt.Column("plane:N", title=f"orbit per plane; green band: target ±{target_mm} mm"))


def currents_chart(start: list[float] | None, current: list[float] | None) -> alt.Chart:
    """RFQ task: ACCT (before the RFQ) and Faraday cup (after it), mA, at the start and now."""
    rows = [{"monitor": name, "when": label, "current (mA)": values[i]}
            for label, values in (("start", start), ("current", current)) if values
            for i, name in enumerate(("ACCT", "FC"))]
    data = pd.DataFrame(rows or [{"monitor": "ACCT", "when": "start", "current (mA)": 0.0}])
    return alt.Chart(data).mark_bar().encode(
        x=alt.X("when:N", sort=["start", "current"], title=None), y=alt.Y("current (mA):Q", title="beam current (mA)"),
        color=alt.Color("when:N", scale=alt.Scale(domain=["start", "current"], range=["#999999", "#1f77b4"])),
        column=alt.Column("monitor:N", title="transmission = FC / ACCT"),
        tooltip=["monitor", "when", alt.Tooltip("current (mA):Q", format=".3f")],
    ).properties(width=120, height=200)


def corrector_chart(machine: dict, settings: list[float] | None) -> alt.Chart:
    """Knob settings against their limits; one panel per unit (an injector's T and mrad don't share an axis)."""
    rows = [{"corrector": c["name"], "setting": (settings[i] if settings else 0.0), "unit": c.get("unit", "simulator units"),
             "lower": c["lower"], "upper": c["upper"]} for i, c in enumerate(machine["correctors"])]
    data = pd.DataFrame(rows)
    units = list(dict.fromkeys(data["unit"]))
    y_title = units[0] if len(units) == 1 else None
    x = alt.X("corrector:N", sort=None, title="knob")
    bars = alt.Chart().mark_bar().encode(
        x=x, y=alt.Y("setting:Q", title=f"setting ({y_title})" if y_title else "setting"),
        tooltip=["corrector", alt.Tooltip("setting:Q", format=".4f"), "unit", "lower", "upper"],
    )
    lo = alt.Chart().mark_tick(color="red", thickness=2).encode(x=x, y="lower:Q")
    hi = alt.Chart().mark_tick(color="red", thickness=2).encode(x=x, y="upper:Q")
    if len(units) == 1:
        return alt.layer(bars, lo, hi, data=data).properties(height=220)
    return (alt.layer(bars, lo, hi, data=data).properties(height=200, width=90)
            .facet(column=alt.Column("unit:N", sort=units, title=None))
            .resolve_scale(x="independent", y="independent"))


def transmission(readings: list[float] | None) -> float | None:
    """FC / ACCT of a recorded RFQ reading."""
    return readings[1] / readings[0] if readings and len(readings) == 2 and readings[0] else None


def _metric(step: dict, task: str) -> float | None:
    return transmission(step["readings"]) if task == "rfq" else step["rms_mm"]


def metric_title(task: str) -> str:
    return "transmission (1)" if task == "rfq" else "orbit RMS (mm)"


def trend_chart(steps: list[dict], marker_step: int | None = None, task: str = "orbit") -> alt.Chart:
    """Orbit RMS (mm) or RFQ transmission, and reward, against step."""
    data = pd.DataFrame([{"step": s["step"], "metric": _metric(s, task), "reward": s["reward"]} for s in steps]
                        or [{"step": 0, "metric": None, "reward": None}])
    rms = alt.Chart(data).mark_line(point=True).encode(x=alt.X("step:Q", title="step"), y=alt.Y("metric:Q", title=metric_title(task)))
    reward = alt.Chart(data).mark_line(point=True, color="orange").encode(x=alt.X("step:Q", title="step"), y=alt.Y("reward:Q", title="reward (1)"))
    if marker_step is not None:
        rule = alt.Chart(pd.DataFrame({"step": [marker_step]})).mark_rule(color="red").encode(x="step:Q")
        rms, reward = rms + rule, reward + rule
    return alt.hconcat(rms.properties(width=300, height=200), reward.properties(width=300, height=200))


def compare_chart(series: dict[str, list[dict]], task: str = "orbit") -> alt.Chart:
    rows = [{"session": name, "step": s["step"], "metric": _metric(s, task)} for name, steps in series.items() for s in steps]
    data = pd.DataFrame(rows or [{"session": "", "step": 0, "metric": None}])
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("metric:Q", title=metric_title(task)), color="session:N").properties(height=260)


def learning_chart(curves: list[dict]) -> alt.Chart:
    data = pd.DataFrame([{"training step": c["step"], "success rate (1)": c["success_rate"], "median steps": c["steps"]["median"]}
                         for c in curves] or [{"training step": 0, "success rate (1)": None, "median steps": None}])
    success = alt.Chart(data).mark_line(point=True).encode(x=alt.X("training step:Q", title="training step"),
                                                            y=alt.Y("success rate (1):Q", title="success rate (1)", scale=alt.Scale(domain=[0, 1])))
    steps = alt.Chart(data).mark_line(point=True, color="orange").encode(x=alt.X("training step:Q", title="training step"),
                                                                         y=alt.Y("median steps:Q", title="median steps to target (steps)"))
    return alt.hconcat(success.properties(width=300, height=200), steps.properties(width=300, height=200))
