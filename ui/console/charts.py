"""Altair charts of the console, drawn from a machine's generic layout; every axis carries its unit.

A machine (``/api/machines``) declares its knobs, readings and metrics with units and
the panels its task wants (``profile``: readings against a position, per group, e.g.
beam positions per plane; ``bars``: readings at the start and now; ``series``: chosen
readings against the session's steps, e.g. a battery's price, state of charge and
power, one chart each or, with ``overlay``, on one chart (a position and its target);
``settings``: the knobs' read-backs against the steps). Nothing here knows a task.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

WHEN = alt.Scale(domain=["start", "current"], range=["#999999", "#1f77b4"])


def ordered(values, names: list[str]) -> list | None:
    """Recorded values in layout order: steps are keyed by name, start events are lists."""
    if values is None:
        return None
    if isinstance(values, dict):
        return [values.get(n) for n in names]
    return list(values)


def reading_names(machine: dict) -> list[str]:
    return [r["name"] for r in machine["readings"]]


def primary_metric(machine: dict | None, session: dict | None = None) -> dict:
    """The task's primary metric (name, unit, label, target): from the session's layout, else the machine's."""
    for source in ((session or {}).get("layout"), machine):
        if source and source.get("metrics"):
            return source["metrics"][0]
    return {"name": "metric", "unit": "1", "label": "metric", "target": None, "higher_is_better": True}


def metric_title(metric: dict) -> str:
    return f"{metric.get('label') or metric['name']} ({metric['unit']})"


def headline(metric: dict, steps: list[dict]) -> str:
    """The task's headline number now (its primary metric after the last step), for a header."""
    value = (steps[-1].get("metrics") or {}).get(metric["name"]) if steps else None
    if not isinstance(value, (int, float)):
        return ""
    unit = "" if metric["unit"] == "1" else f" {metric['unit']}"
    return f"{metric.get('label') or metric['name']} {value:.4g}{unit} after step {steps[-1]['step']}"


def profile_chart(panel: dict, machine: dict, start, current, band: float | None, band_unit: str = "") -> alt.Chart:
    """Readings against their position, one facet per group (e.g. x and y), start vs now, target band."""
    names = reading_names(machine)
    rows = []
    for label, values in (("start", ordered(start, names)), ("current", ordered(current, names))):
        if values is None:
            continue
        for name, pos, group, v in zip(names, panel["positions"], panel["groups"], values):
            rows.append({"position": pos, "reading": name, "group": group, "when": label, "value": v})
    data = pd.DataFrame(rows or [{"position": 0.0, "reading": "", "group": panel["groups"][0], "when": "start", "value": 0.0}])
    lines = alt.Chart().mark_line(point=True).encode(
        x=alt.X("position:Q", title=panel["position_title"]),
        y=alt.Y("value:Q", title=panel["value_title"]),
        color=alt.Color("when:N", scale=WHEN),
        strokeDash=alt.StrokeDash("when:N", scale=alt.Scale(domain=["start", "current"], range=[[4, 3], [1, 0]])),
        tooltip=["reading", "group", "when", alt.Tooltip("value:Q", format=".3f")],
    )
    layers = [lines]
    if band:
        # Facets need every layer to share the top-level data; the band uses datum values,
        # one rectangle per facet (aggregate), not one per data row stacked up.
        layers.insert(0, alt.Chart().transform_aggregate(n="count()", groupby=["group"]).mark_rect().encode(
            y=alt.datum(-band), y2=alt.datum(band), color=alt.value("green"), opacity=alt.value(0.15)))
    caption = panel.get("caption", "") + (f" ±{band} {band_unit}".rstrip() if band else "")
    return alt.layer(*layers, data=data).properties(width=300, height=220).facet(
        column=alt.Column("group:N", title=caption))


def bars_chart(panel: dict, machine: dict, start, current) -> alt.Chart:
    """Chosen readings (default all) at the start and now."""
    names = reading_names(machine)
    shown = panel.get("readings") or names
    rows = [{"reading": n, "when": label, "value": v}
            for label, values in (("start", ordered(start, names)), ("current", ordered(current, names))) if values
            for n, v in zip(names, values) if n in shown]
    data = pd.DataFrame(rows or [{"reading": shown[0], "when": "start", "value": 0.0}])
    return alt.Chart(data).mark_bar().encode(
        x=alt.X("when:N", sort=["start", "current"], title=None), y=alt.Y("value:Q", title=panel.get("value_title", "reading")),
        color=alt.Color("when:N", scale=WHEN),
        column=alt.Column("reading:N", title=panel.get("caption", "")),
        tooltip=["reading", "when", alt.Tooltip("value:Q", format=".4g")],
    ).properties(width=120, height=200)


def series_chart(panel: dict, machine: dict, start, steps: list[dict], upto: int | None = None) -> alt.Chart:
    """Chosen readings against step (0 = as found), one chart per reading, each with its unit."""
    names = reading_names(machine)
    units = {r["name"]: r.get("unit", "") for r in machine["readings"]}
    shown = panel.get("readings") or names
    history = [(0, ordered(start, names))] + [(s["step"], ordered(s["readings"], names)) for s in steps[:upto]]
    rows = [{"step": k, "reading": n, "value": v} for k, values in history if values
            for n, v in zip(names, values) if n in shown and v is not None]
    if panel.get("overlay"):  # readings of one unit on one chart (e.g. a position and its target)
        data = pd.DataFrame(rows or [{"step": 0, "reading": shown[0], "value": None}])
        unit = units.get(shown[0], "")
        lines = alt.Chart(data).mark_line(point=True, interpolate=panel.get("interpolate", "linear")).encode(
            x=alt.X("step:Q", title=panel.get("step_title", "step"), axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=f"{panel.get('value_title', ', '.join(shown))} ({unit})", scale=alt.Scale(zero=False)),
            color=alt.Color("reading:N", sort=shown),
            tooltip=["step", "reading", alt.Tooltip("value:Q", format=".4g")],
        )
        limit = panel.get("limit")  # a level the readings are held against (e.g. a seasonal cap)
        if limit:
            rule = alt.Chart().mark_rule(color="firebrick", strokeDash=[6, 3]).encode(
                y=alt.datum(limit["value"]), tooltip=alt.value(f"{limit.get('label', 'limit')}: {limit['value']:g}"))
            lines = alt.layer(lines, rule)
        return lines.properties(width=560, height=220, title=panel.get("caption", ""))
    charts = []
    for name in shown:
        data = pd.DataFrame([r for r in rows if r["reading"] == name] or [{"step": 0, "reading": name, "value": None}])
        charts.append(alt.Chart(data).mark_line(point=True, interpolate=panel.get("interpolate", "linear")).encode(
            x=alt.X("step:Q", title=panel.get("step_title", "step"), axis=alt.Axis(tickMinStep=1)),
            y=alt.Y("value:Q", title=f"{name} ({units.get(name, '')})"),
            tooltip=["step", alt.Tooltip("value:Q", format=".4g")],
        ).properties(width=260, height=180))
    return alt.hconcat(*charts).properties(title=panel.get("caption", ""))


def settings_chart(panel: dict, machine: dict, start_settings, steps: list[dict], upto: int | None = None) -> alt.Chart:
    """Knob settings (read back) against step, 0 = as found; one chart per unit."""
    knobs = machine["knobs"]
    names = [k["name"] for k in knobs]
    history = [(0, ordered(start_settings, names))] + [(s["step"], ordered(s.get("readbacks"), names)) for s in steps[:upto]]
    rows = [{"step": k, "knob": knob["name"], "setting": float(v), "unit": knob.get("unit", "")}
            for k, values in history if values for knob, v in zip(knobs, values) if v is not None]
    data = pd.DataFrame(rows or [{"step": 0, "knob": knobs[0]["name"], "setting": None, "unit": knobs[0].get("unit", "")}])
    return alt.Chart(data).mark_line(point=True, interpolate="step-after").encode(
        x=alt.X("step:Q", title=panel.get("step_title", "step"), axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("setting:Q", title="setting"),
        color=alt.Color("knob:N"),
        column=alt.Column("unit:N", title=panel.get("caption", "")),
        tooltip=["step", "knob", alt.Tooltip("setting:Q", format=".4g"), "unit"],
    ).properties(width=520, height=180)


def panel_charts(machine: dict, start, current, session: dict | None = None, steps: list[dict] | None = None,
                 upto: int | None = None, start_settings=None) -> list[tuple[str, alt.Chart]]:
    """(title, chart) of every panel the machine's task declares (``series`` panels draw
    `steps`, up to step `upto` if given; ``settings`` panels the knobs from `start_settings`)."""
    out = []
    for panel in machine.get("panels", []):
        if panel["kind"] == "profile":
            metric = primary_metric(machine, session)
            band = (session or {}).get("task_config", {}).get(panel.get("band_config", ""), None)
            if band is None:
                band = metric.get("target")
            out.append((panel["title"], profile_chart(panel, machine, start, current, band, metric["unit"])))
        elif panel["kind"] == "bars":
            out.append((panel["title"], bars_chart(panel, machine, start, current)))
        elif panel["kind"] == "series":
            out.append((panel["title"], series_chart(panel, machine, start, steps or [], upto)))
        elif panel["kind"] == "settings":
            out.append((panel["title"], settings_chart(panel, machine, start_settings, steps or [], upto)))
    return out


def engineering(knob: dict, simulator_units: bool = False) -> tuple[str, float]:
    """(unit, signed scale per simulator unit) a knob is shown in: the machine file's
    engineering unit (e.g. A), or the simulator's unit on request."""
    wired = knob.get("engineering")
    if simulator_units or not wired:
        return knob.get("unit", "units"), 1.0
    return wired["unit"], float(wired["scale"])


def knob_limits(knob: dict, simulator_units: bool = False) -> tuple[float, float]:
    _, scale = engineering(knob, simulator_units)
    return tuple(sorted((knob["lower"] * scale, knob["upper"] * scale)))


NEAR_LIMIT = 0.05  # a setting within 5 % of its range from a limit is flagged


def proposal_table(machine: dict, pending: dict, simulator_units: bool = False) -> pd.DataFrame:
    """A proposed step in the units an operator reads: per knob now, proposed, change and
    the change's share of the knob's range, largest changes first; knobs the proposal
    puts at or near a limit are flagged."""
    by_name = {k["name"]: k for k in machine["knobs"]}
    rows = []
    for name, now, proposed in zip(pending["names"], pending["current"], pending["proposed"]):
        knob = by_name.get(name, {"name": name, "lower": -np.inf, "upper": np.inf})
        unit, scale = engineering(knob, simulator_units)
        lower, upper = knob_limits(knob, simulator_units)
        span = upper - lower
        value = proposed * scale
        near = np.isfinite(span) and min(value - lower, upper - value) <= NEAR_LIMIT * span
        rows.append({"knob": name, "unit": unit, "now": now * scale, "proposed": value, "change": (proposed - now) * scale,
                     "of range": abs(proposed - now) * abs(scale) / span if np.isfinite(span) and span > 0 else None,
                     "limit": "AT/NEAR LIMIT" if near else ""})
    table = pd.DataFrame(rows)
    return table.sort_values("of range", ascending=False, key=lambda c: c.fillna(0), kind="stable").reset_index(drop=True)


def knob_chart(machine: dict, settings, simulator_units: bool = False) -> alt.Chart:
    """Knob settings against their limits, in engineering units (the simulator's on request);
    one panel per unit (knobs in T and mrad don't share an axis)."""
    names = [k["name"] for k in machine["knobs"]]
    values = ordered(settings, names)
    rows = []
    for i, k in enumerate(machine["knobs"]):
        unit, scale = engineering(k, simulator_units)
        lower, upper = knob_limits(k, simulator_units)
        setting = values[i] * scale if values and values[i] is not None else 0.0
        near = min(setting - lower, upper - setting) <= NEAR_LIMIT * (upper - lower)
        rows.append({"knob": k["name"], "setting": setting, "unit": unit, "lower": lower, "upper": upper,
                     "limit": "at/near limit" if near else "within range"})
    data = pd.DataFrame(rows)
    units = list(dict.fromkeys(data["unit"]))
    y_title = units[0] if len(units) == 1 else None
    x = alt.X("knob:N", sort=None, title="knob")
    # A knob at or near a limit is drawn red: the next step may be clipped there.
    bars = alt.Chart().mark_bar().encode(
        x=x, y=alt.Y("setting:Q", title=f"setting ({y_title})" if y_title else "setting"),
        color=alt.Color("limit:N", scale=alt.Scale(domain=["within range", "at/near limit"], range=["#1f77b4", "#c62828"]),
                        legend=alt.Legend(title=None, orient="bottom")),
        tooltip=["knob", alt.Tooltip("setting:Q", format=".4f"), "unit", "lower", "upper", "limit"],
    )
    lo = alt.Chart().mark_tick(color="red", thickness=2).encode(x=x, y="lower:Q")
    hi = alt.Chart().mark_tick(color="red", thickness=2).encode(x=x, y="upper:Q")
    if len(units) == 1:
        return alt.layer(bars, lo, hi, data=data).properties(height=220)
    return (alt.layer(bars, lo, hi, data=data).properties(height=200, width=90)
            .facet(column=alt.Column("unit:N", sort=units, title=None))
            .resolve_scale(x="independent", y="independent"))


def metric_value(step: dict, metric: dict) -> float | None:
    return (step.get("metrics") or {}).get(metric["name"])


def trend_chart(steps: list[dict], metric: dict, marker_step: int | None = None) -> alt.Chart:
    """The task's primary metric and the reward against step."""
    data = pd.DataFrame([{"step": s["step"], "metric": metric_value(s, metric), "reward": s["reward"]} for s in steps]
                        or [{"step": 0, "metric": None, "reward": None}])
    step = alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1))  # steps are whole numbers
    value = alt.Chart(data).mark_line(point=True).encode(x=step, y=alt.Y("metric:Q", title=metric_title(metric)))
    # A symmetric-log axis: a success bonus (+10) would otherwise flatten every other step's reward.
    reward = alt.Chart(data).mark_line(point=True, color="orange").encode(
        x=step, y=alt.Y("reward:Q", title="reward (1, symmetric log scale)", scale=alt.Scale(type="symlog")))
    if marker_step is not None:
        rule = alt.Chart(pd.DataFrame({"step": [marker_step]})).mark_rule(color="red").encode(x="step:Q")
        value, reward = value + rule, reward + rule
    return alt.hconcat(value.properties(width=300, height=200), reward.properties(width=300, height=200))


def compare_chart(series: dict[str, list[dict]], metric: dict) -> alt.Chart:
    rows = [{"session": name, "step": s["step"], "metric": metric_value(s, metric)} for name, steps in series.items() for s in steps]
    data = pd.DataFrame(rows or [{"session": "", "step": 0, "metric": None}])
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1)), y=alt.Y("metric:Q", title=metric_title(metric)),
        color="session:N").properties(height=260)


def flatten(summary: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) evaluation summary: {"steps.median": 5.0, ...}."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "wall_s"):
            out[name] = float(value)
    return out


def learning_chart(curves: list[dict], keys: list[str]) -> alt.Chart:
    """Chosen values of the periodic evaluation against training step (whatever the task reports)."""
    rows = [{"training step": c["step"], "value": flatten(c).get(k), "quantity": k} for c in curves for k in keys]
    data = pd.DataFrame(rows or [{"training step": 0, "value": None, "quantity": ""}])
    return alt.Chart(data).mark_line(point=True).encode(
        x=alt.X("training step:Q", title="training step"), y=alt.Y("value:Q", title="value (as in the summary)"),
        tooltip=["quantity", "training step", "value"]).properties(width=280, height=200).facet(
        column=alt.Column("quantity:N", title="periodic evaluation")).resolve_scale(y="independent")
