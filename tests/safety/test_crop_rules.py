"""The crop's rules in the safety layer, on a simulated field, with a writer that ignores
them (the task never asks for more; the guard must not rely on that): the seasonal N cap
(a cumulative budget), no N after the last development stage (a reading gate), a gate
naming a reading the machine does not have, and the crop's safe state on a trip."""

import numpy as np
import pytest

from core.registry import get_task
from safety.guard import GuardedPlant, InterlockRule, SafetyConfig, SafetyTrip


@pytest.fixture
def field():
    definition = get_task("crop")
    setup = definition.load_setup("wheat")
    plant = definition.sim_plant(setup, definition.load_errors("test"))
    plant.reset(2)
    metadata = {"task_config": definition.task_config(setup).model_dump()}
    return definition, plant, SafetyConfig(**definition.safety_limits(metadata))


def guarded(definition, plant, config, tmp_path, **kw):
    guard = GuardedPlant(plant, config, [InterlockRule(**r) for r in definition.sim_interlocks],
                         snapshot_path=tmp_path / "snap.json", safe_settings=lambda s: definition.safe_settings(plant.knobs, s),
                         safe_label=definition.safe_state_label, **kw)
    guard.begin()
    return guard


def test_the_seasonal_cap_and_the_last_stage_gate_hold_against_a_writer_asking_for_the_most(field, tmp_path):
    definition, plant, config = field
    guard = guarded(definition, plant, config, tmp_path)
    dvs = [r.name for r in plant.readings].index("dvs")
    while not plant.season.done:
        guard.write_knobs(np.array([60.0]))
        guard.read()
    cap = config.budgets[0].limit
    assert plant.season.applied == pytest.approx(cap)  # 60 a day from spring growth until the cap: then nothing
    clamps = [e.reason for e in guard.events if e.kind == "clamp"]
    assert any(r.startswith("seasonal N cap: 240 of 250") and r.endswith("dose 60 -> 10") for r in clamps), clamps[:5]
    # after the cap, the gate also holds: every write past the last stage was cut to zero
    gate = config.gates[0]
    late = [i for i, s in enumerate(plant.trace[:-1]) if s["dvs"] > gate.above]
    assert late and all(plant.doses[i] == 0.0 for i in late)
    assert any(r.startswith("no N after the last development stage: dvs") for r in clamps)
    assert plant.read().values[dvs] >= 2.0  # harvested


def test_the_gate_alone_cuts_a_late_dose(field, tmp_path):
    definition, plant, config = field
    config = config.model_copy(update={"budgets": []})
    while plant.season.state()["dvs"] <= config.gates[0].above:
        plant.write_knobs(np.zeros(1))
    guard = guarded(definition, plant, config, tmp_path)
    guard.write_knobs(np.array([40.0]))
    assert plant.doses[-1] == 0.0 and guard.settings[0] == 0.0
    assert [e.kind for e in guard.events] == ["clamp"]


def test_a_gate_on_a_reading_the_machine_lacks_trips_before_writing(field, tmp_path):
    definition, plant, config = field
    bad = config.model_copy(update={"gates": [config.gates[0].model_copy(update={"reading": "growth_stage"})]})
    guard = guarded(definition, plant, bad, tmp_path)
    days = plant.season.days
    with pytest.raises(SafetyTrip, match="no knob 'dose' or no reading 'growth_stage'"):
        guard.write_knobs(np.array([30.0]))
    assert plant.season.applied == 0.0 and plant.doses[days:] == [0.0]  # only the restore wrote: the safe state


def test_an_applicator_fault_trips_and_the_dose_goes_to_zero(field, tmp_path):
    definition, plant, config = field
    guard = guarded(definition, plant, config, tmp_path)
    guard.write_knobs(np.array([30.0]))
    guard.read()
    plant.set_fault("APPLICATOR_FAULT", 1)
    guard.write_knobs(np.array([30.0]))
    with pytest.raises(SafetyTrip, match="applicator_ok is 0"):
        guard.read()
    assert guard.tripped.restored and plant.read_knobs()[0] == 0.0
    assert any(e.kind == "restore" and e.reason.startswith("no fertiliser (dose 0) restored") for e in guard.events)


def test_winter_doses_are_held_at_zero_by_the_first_stage_gate(field, tmp_path):
    definition, plant, config = field
    guard = guarded(definition, plant, config, tmp_path)
    for _ in range(10):  # autumn, just after sowing
        guard.write_knobs(np.array([50.0]))
        guard.read()
    assert plant.season.applied == 0.0
    clamps = [e.reason for e in guard.events if e.kind == "clamp"]
    assert len(clamps) == 10 and all(c.startswith("no N before the first development stage: dvs") for c in clamps)


def test_a_gate_needs_exactly_one_level():
    from pydantic import ValidationError

    from safety.guard import ReadingGate

    with pytest.raises(ValidationError, match="exactly one of 'above' and 'below'"):
        ReadingGate(knob="dose", reading="dvs", above=1.0, below=0.1)
    assert ReadingGate(knob="dose", reading="dvs", below=0.1).closed(float("nan"))  # unreadable: held
