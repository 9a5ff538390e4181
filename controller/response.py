"""Measuring a machine's response: every knob probed in turn, through the safety layer.

Control rooms measure response matrices (e.g. of a beam position at every monitor) before they trust a model
(and LOCO-style fits start from one). Each knob is moved up and down by a probe, one at
a time, averaging several readings at each point; the column is the central difference.
The probe is bounded by the knob's largest step and grown from a small "feeler" step in
each direction, separately: every step is extrapolated to the amount at which the
interlock closest to tripping would use a set fraction of its margin
(:func:`allowed_by_margin`), or a reading would move by a set fraction of its range
(linearly), whichever comes first. The reading limit is what keeps a beam off an
aperture: a beam current gives no warning until the beam scrapes (measured: one unit of
a corrector on a machine with 4x our kick lost the whole beam while the current had not
moved at a quarter unit). The two directions are grown separately because a machine
that starts near a limit is not symmetric. Every write goes through
:class:`GuardedPlant` (snapshot first, limits, interlocks, verified restore at the end
or on any trip). Task-agnostic: knobs and readings come from the plant.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.plant import Plant, Readings
from safety.guard import GuardedPlant, InterlockRule, SafetyConfig, SafetyEvent, SafetyTrip

FEELER_FRACTION = 1 / 64  # the first step, as a fraction of the probe limit (a scraping beam tolerates little)
GROWTH = 4.0  # a step is at most this many times the previous one (the extrapolation stays local)


@dataclass
class ResponseSettings:
    """How to probe: amounts relative to each knob's largest step, averaging, margins."""

    probe_fraction: float = 0.5  # full probe as a fraction of the knob's largest step (at most 1)
    samples: int = 4  # readings averaged at every point
    sample_interval_s: float = 0.0  # wait between readings (an IOC refreshing at 10 Hz wants 0.1 s or more)
    settle_s: float = 0.0  # wait after each write before reading
    max_margin_use: float = 0.3  # largest fraction of any interlock margin a probe may use
    max_reading_change: float = 0.1  # largest change of any reading, as a fraction of its range (upper - lower)

    def __post_init__(self) -> None:
        if not 0 < self.probe_fraction <= 1:
            raise ValueError("probe_fraction must be in (0, 1]: a probe never exceeds a knob's largest step")
        if self.samples < 2:
            raise ValueError("samples must be at least 2 (the noise estimate needs repeats)")
        if not 0 < self.max_reading_change <= 1:
            raise ValueError("max_reading_change must be in (0, 1] of a reading's range")


@dataclass
class ResponseMeasurement:
    """A measured response matrix: readings change per knob unit, with its noise."""

    knobs: list[str]
    readings: list[str]
    knob_units: list[str]
    reading_units: list[str]
    matrix: list[list[float]]  # (n_readings, n_knobs): d reading / d knob
    sigma: list[list[float]]  # standard error of every element
    noise: list[float]  # standard deviation of one reading, per reading channel
    probes: list[float]  # probe amplitude used per knob (knob units; the mean of the two directions)
    margin_used: list[float]  # largest interlock margin fraction used while probing each knob
    baseline: list[float]  # mean readings at the starting settings
    settings: list[float]  # the starting settings (restored at the end)
    writes: int
    wall_s: float
    status: str = "completed"  # completed, tripped, faulted
    message: str = ""
    events: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ResponseMeasurement":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def matrix_array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=float)

    @property
    def sigma_array(self) -> np.ndarray:
        return np.asarray(self.sigma, dtype=float)


def _average(guard: GuardedPlant, settings: ResponseSettings) -> tuple[np.ndarray, np.ndarray, Readings]:
    """Mean and samples of `settings.samples` reads (each checked by the guard)."""
    samples, last = [], None
    for k in range(settings.samples):
        if k and settings.sample_interval_s:
            time.sleep(settings.sample_interval_s)
        last = guard.read()
        samples.append(np.asarray(last.values, dtype=float))
    stack = np.array(samples)
    return stack.mean(axis=0), stack, last


def measure_response(
    plant: Plant,
    interlocks: list[InterlockRule],
    snapshot_path: Path | None = None,
    snapshot_context: dict | None = None,
    settings: ResponseSettings | None = None,
    on_event: Callable[[SafetyEvent], None] | None = None,
    max_duration_s: float = 1800.0,
) -> ResponseMeasurement:
    """Probe every knob of `plant` up and down in turn; restore the start, verified.

    Never raises on a trip: the result says ``tripped`` and the safety layer restored
    the starting settings. Per knob and direction the probe grows from a feeler (at
    most ``GROWTH`` x per write: 4 writes at full size) within the knob's largest step, then goes
    back to the start; the column is the secant between the two probes.
    """
    settings = settings or ResponseSettings()
    unbounded = [k.name for k in plant.knobs if not np.isfinite(k.max_step)]
    if unbounded:
        raise ValueError(f"knobs without a largest step cannot be probed safely: {', '.join(unbounded)}")
    started = time.perf_counter()
    n_knobs = len(plant.knobs)
    # No knob may leave its start by more than one largest step (the probes never do).
    steps_per_direction = 2 + int(np.ceil(np.log2(1 / FEELER_FRACTION)))  # growth at least 2x per write
    limits = SafetyConfig(max_steps=2 * steps_per_direction * n_knobs + 10, max_duration_s=max_duration_s,
                          max_excursion_steps=1.0 + 1e-9)
    guard = GuardedPlant(plant, limits, interlocks, "auto", snapshot_path, None, on_event, snapshot_context)
    names = [k.name for k in plant.knobs]
    n_readings = len(plant.readings)
    # How far each reading may move while probing (readings without a finite range: no limit).
    spans = np.array([r.upper - r.lower for r in plant.readings], dtype=float)
    allowed_change = np.where(np.isfinite(spans), settings.max_reading_change * spans, np.inf)
    matrix = np.full((n_readings, n_knobs), np.nan)
    probes, used = np.zeros(n_knobs), np.zeros(n_knobs)
    base_groups: list[np.ndarray] = []
    status, message = "completed", ""
    start = baseline = None
    try:
        start = guard.begin()
        baseline, group, _ = _average(guard, settings)
        base_groups.append(group)

        def move(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
            """Write, read; (mean readings, samples, signed margin use of the last reading)."""
            guard.write_knobs(values)
            if settings.settle_s:
                time.sleep(settings.settle_s)
            mean, group, last = _average(guard, settings)
            return mean, group, guard.margin_used(last, signed=True)

        def probe(unit: np.ndarray, limit: float) -> tuple[float, np.ndarray, float]:
            """Grow a probe along `unit` up to the allowance; (amount, mean readings, margin used)."""
            amount, seen = FEELER_FRACTION * limit, [(0.0, 0.0)]
            while True:
                mean, _, use = move(start + amount * unit)
                seen.append((amount, use))
                change = float(np.max(np.abs(mean - baseline) / allowed_change))  # readings are linear in a knob
                allowed = min(limit, GROWTH * amount, amount / change if change > 0 else np.inf,
                              allowed_by_margin(seen[-3:], settings.max_margin_use))
                if amount >= limit or allowed < 2 * amount:
                    return amount, mean, max(0.0, use)
                amount = allowed

        for j, knob in enumerate(plant.knobs):
            limit = settings.probe_fraction * knob.max_step
            unit = np.zeros(n_knobs)
            unit[j] = 1.0
            up, plus, use_plus = probe(unit, limit)
            _, group, _ = move(start)
            base_groups.append(group)
            down, minus, use_minus = probe(-unit, limit)
            _, group, _ = move(start)
            base_groups.append(group)
            matrix[:, j] = (plus - minus) / (up + down)
            probes[j], used[j] = (up + down) / 2, max(use_plus, use_minus)
        guard.stop_and_restore("response measured")
    except SafetyTrip as trip:
        status, message = "tripped", trip.reason
    except Exception as exc:  # noqa: BLE001 - whatever failed, the machine goes back to its start
        status, message = "faulted", f"{type(exc).__name__}: {exc}"
        if guard.snapshot is not None:
            guard.fault(f"internal error: {message}")
    # Noise from the repeated readings at the starting settings (pooled within groups).
    if base_groups:
        deviations = np.concatenate([g - g.mean(axis=0) for g in base_groups])
        dof = max(1, sum(len(g) - 1 for g in base_groups))
        noise = np.sqrt((deviations ** 2).sum(axis=0) / dof)
    else:
        noise = np.full(n_readings, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = noise[:, None] * np.sqrt(2.0 / settings.samples) / (2 * np.where(probes > 0, probes, np.nan))[None, :]
    return ResponseMeasurement(
        knobs=names, readings=[r.name for r in plant.readings],
        knob_units=[k.unit for k in plant.knobs], reading_units=[r.unit for r in plant.readings],
        matrix=_json_floats(matrix), sigma=_json_floats(sigma), noise=_json_floats(noise), probes=probes.tolist(),
        margin_used=used.tolist(), baseline=_json_floats(baseline if baseline is not None else np.full(n_readings, np.nan)),
        settings=_json_floats(start if start is not None else np.full(n_knobs, np.nan)),
        writes=guard.writes, wall_s=round(time.perf_counter() - started, 2), status=status, message=message,
        events=[{"time": e.time, "kind": e.kind, "reason": e.reason} for e in guard.events],
    )


def allowed_by_margin(seen: list[tuple[float, float]], target: float) -> float:
    """The probe amount at which the interlock margin use reaches `target`, extrapolated
    from the last points (amount, signed use) seen, (0, 0) included.

    Through the last three a quadratic: a beam current that first rises as the orbit
    leaves one aperture and then falls towards another (a machine that starts scraping)
    bends back, which a straight line from the last point alone misses (measured: a
    foreign cryomodule's current 0.28 -> 0.286 -> 0.14 between 1/8 and 5/6 of a unit)."""
    (a0, u0), (a1, u1), (a2, u2) = ([(0.0, 0.0)] * 3 + seen)[-3:]
    if a1 > a0 and a2 > a1:  # divided differences: u = u2 + s (a - a2) + c (a - a2)(a - a1)
        s = (u2 - u1) / (a2 - a1)
        c = (s - (u1 - u0) / (a1 - a0)) / (a2 - a0)
        if c > 0:  # bending towards the trip level: solve c x^2 + (s + c (a2 - a1)) x + u2 - target = 0, x = a - a2
            b = s + c * (a2 - a1)
            disc = b * b - 4 * c * (u2 - target)
            if disc >= 0 and b + np.sqrt(disc) > 0:  # the root in the form without cancellation (c may be tiny)
                return a2 + 2 * (target - u2) / (b + np.sqrt(disc))
    return a2 * target / u2 if a2 > 0 and u2 > 0 else np.inf  # a straight line through (0, 0)


def _json_floats(a: np.ndarray) -> list:
    """Nested lists with NaN as None (JSON has no NaN)."""
    return np.where(np.isfinite(a), a, None).tolist() if np.ndim(a) else a


@dataclass
class ResponseCheck:
    """How far a measured change of the readings is from what a model predicts."""

    mismatch: float  # |measured - predicted| / |predicted| (0: identical)
    cosine: float  # cosine similarity of measured and predicted changes
    noise_floor: float  # the mismatch reading noise alone would give
    predicted_norm: float

    def describe(self) -> str:
        return (f"response mismatch {self.mismatch:.2f} (cosine similarity {self.cosine:.2f}; "
                f"reading noise alone would give about {self.noise_floor:.2f})")


def check_response(expected: np.ndarray, knob_change: np.ndarray, reading_change: np.ndarray,
                   noise: float | np.ndarray = 0.0) -> ResponseCheck | None:
    """Compare a measured reading change with the model's prediction ``expected @ knob_change``.

    `noise` is the standard deviation of one reading (a change of two readings has sqrt(2)
    times it). None if the knob change predicts nothing measurable.
    """
    expected = np.asarray(expected, dtype=float)
    predicted = expected @ np.asarray(knob_change, dtype=float)
    measured = np.asarray(reading_change, dtype=float)[: len(predicted)]
    norm = float(np.linalg.norm(predicted))
    noise_norm = float(np.linalg.norm(np.broadcast_to(np.asarray(noise, dtype=float) * np.sqrt(2), predicted.shape)))
    if norm == 0 or norm < 2 * noise_norm or not np.all(np.isfinite(measured)):
        return None
    cosine = float(predicted @ measured / (norm * max(np.linalg.norm(measured), 1e-12)))
    return ResponseCheck(float(np.linalg.norm(measured - predicted) / norm), cosine, noise_norm / norm, norm)


class ResponseMismatch(RuntimeError):
    """The machine does not respond as the policy's model predicts."""


def latest_response(store, machine: str, knobs: list[str], readings: list[str]) -> np.ndarray | None:
    """The newest completed response measurement of `machine` with these knobs and readings."""
    from sqlalchemy import select

    from .store import MachineRow, MeasurementRow

    with store.Session() as s:
        rows = s.scalars(select(MeasurementRow).join(MachineRow, MachineRow.id == MeasurementRow.machine_id)
                         .where(MachineRow.name == machine, MeasurementRow.kind == "response",
                                MeasurementRow.status == "completed").order_by(MeasurementRow.id.desc()).limit(5)).all()
    for row in rows:
        if row.data.get("knobs") == knobs and row.data.get("readings") == readings:
            return ResponseMeasurement.from_dict(row.data).matrix_array
    return None


def recorded_response(store, opened) -> np.ndarray | None:
    """The newest completed response measurement of an opened machine (None if there is none)."""
    return latest_response(store, opened.name, [k.name for k in opened.plant.knobs], [r.name for r in opened.plant.readings])
