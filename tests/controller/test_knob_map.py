"""The knob map: the shipped policy on a machine whose calibrated response differs from its model.

Real Cheetah tracking of foreign cryomodules (hidden optics from the wide family); the
map comes from the machine's true response (what a perfect calibration gives).
"""

import numpy as np
import pytest

from conftest import for_setup
from controller.knob_map import KnobMap, MappedKnobs, knob_map_for
from controller.policy import Policy
from controller.session import run_session
from core.config import ConfigError
from core.plant import KnobSpec, Plant, ReadingSpec, Readings
from hardware.ioc import resolve
from safety.guard import GuardedPlant, InterlockRule, SafetyConfig

BEAM = [InterlockRule("beam_current", "min_fraction_of_start", 0.8)]


@pytest.fixture(scope="module")
def foreign():
    definition, setup, errors = resolve("cafe2-cm1", "foreign")
    policy = Policy.load("pretrained", definition, setup)
    plant = definition.sim_plant(setup, errors)
    plant.warm_up()
    return definition, policy, plant


def policy_response(definition, policy) -> np.ndarray:
    return np.array(definition.expected_response(policy.metadata)["matrix"])


def test_the_shipped_policy_corrects_a_foreign_machine_through_the_knob_map(foreign):
    """Foreign seed 5 (solenoids about 1.6x ours): the fine-tune from the shipped policy
    failed its own evaluation there; the same policy through the map corrects it."""
    definition, policy, plant = foreign
    plant.reset(5)
    plain = run_session(plant, policy, interlocks=BEAM)
    assert plain.status == "mismatch" and plain.restored and not plain.trips
    plant.reset(5)
    mapping = knob_map_for(plant.response.r[0], policy_response(definition, policy))
    assert mapping is not None and mapping.problem() is None
    result = run_session(plant, policy, interlocks=BEAM, knob_map=mapping)
    assert result.status == "completed" and result.success and not result.trips, (result.status, result.final)
    assert result.final < 0.5 < result.initial
    assert any(e.kind == "knob_map" for e in result.events)
    # The mismatch guard checked the machine against its own (calibrated) model and passed.
    check = next(e for e in result.events if e.kind == "response_check")
    assert check.data["mismatch"] < check.data["limit"]


def test_a_map_from_another_machine_is_stopped_by_the_mismatch_guard_and_restored(foreign):
    """The map is only as good as the calibration: a machine that does not answer as its
    calibrated model says is stopped before the first policy step, as without a map."""
    definition, policy, plant = foreign
    plant.reset(0)
    wrong = plant.response.r[0]
    plant.reset(5)
    start = plant.read_knobs()
    result = run_session(plant, policy, interlocks=BEAM, knob_map=knob_map_for(wrong, policy_response(definition, policy)))
    assert result.status == "mismatch" and result.restored and not result.trips
    assert result.step_records == []
    np.testing.assert_allclose(plant.read_knobs(), start, atol=1e-12)


def test_no_map_when_the_models_agree_and_a_clear_refusal_when_none_fits():
    r_p = np.array([[1.0, 0.2], [0.1, 1.0], [0.3, 0.3]])
    assert knob_map_for(r_p, r_p) is None and knob_map_for(None, r_p) is None and knob_map_for(r_p, None) is None
    same = knob_map_for(2 * r_p, r_p)  # every knob twice as strong: half the setting
    np.testing.assert_allclose(same.matrix, 0.5 * np.eye(2), atol=1e-12)
    with pytest.raises(ConfigError, match="condition number"):  # one knob does nothing on the machine
        knob_map_for(np.array([[1.0, 1e-9], [0.1, 0.0], [0.3, 0.0]]), r_p)
    with pytest.raises(ConfigError, match="residual"):  # the machine cannot make the policy's responses
        knob_map_for(np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    with pytest.raises(ConfigError, match="shape"):
        KnobMap.fit(np.ones((3, 2)), np.ones((2, 2)))


class Knobs(Plant):
    """Two knobs and their own values as readings."""

    def __init__(self):
        self.knobs = [KnobSpec(f"k{i}", "A", -10, 10, 1.0, 1e-9) for i in range(2)]
        self.readings = [ReadingSpec(f"r{i}", "A", -100, 100) for i in range(2)]
        self.values, self.writes = np.array([1.0, -1.0]), []

    def read_knobs(self):
        return self.values.copy()

    def write_knobs(self, values):
        self.writes.append(np.array(values, dtype=float))
        self.values = np.array(values, dtype=float)

    def read(self):
        return Readings(self.values.copy(), np.zeros(2), np.ones(2, bool), {})


def test_a_mapped_step_beyond_the_largest_step_is_scaled_as_a_whole_and_read_back_through_the_map(tmp_path):
    plant = Knobs()
    guard = GuardedPlant(plant, SafetyConfig(max_steps=10), [], "auto", tmp_path / "s.json")
    guard.begin()
    start = guard.snapshot.copy()
    mapping = KnobMap(np.array([[3.0, 1.0], [0.0, 1.0]]), 0.0, 3.0, np.eye(2))
    seen = MappedKnobs(guard, mapping, start)
    seen.write_knobs(start + np.array([1.0, 1.0]))  # the machine would move by (4, 1): four largest steps
    step = plant.writes[-1] - start
    np.testing.assert_allclose(step, [1.0, 0.25])  # the direction kept, within the largest step
    assert not any(e.kind == "clamp" for e in guard.events)  # nothing for the guard to clip
    np.testing.assert_allclose(seen.to_machine(seen.read_knobs()), plant.values, atol=1e-12)
    seen.write_knobs(start)  # back: the map is anchored at the start
    assert np.abs(plant.writes[-1] - plant.writes[-2]).max() <= 1.0 + 1e-12
