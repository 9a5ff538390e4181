"""Response measurement and the mismatch check on a small linear plant (no beamline)."""

import numpy as np
import pytest

from core.plant import KnobSpec, Plant, ReadingSpec, Readings
from controller.response import ResponseSettings, check_response, measure_response
from safety.guard import InterlockRule

TRUE_R = np.array([[2.0, -1.0, 0.0], [0.5, 1.0, 3.0]])


class LinearPlant(Plant):
    """readings = R @ knobs + noise; a 'current' interlock that drops as |knob 2| grows."""

    def __init__(self, noise: float = 0.01, loss_per_unit: float = 0.0, scraping_from: float = 0.0):
        self.knobs = [KnobSpec(f"k{i}", "A", -10, 10, 2.0, 1e-9) for i in range(3)]
        self.readings = [ReadingSpec(f"r{i}", "mm", -100, 100) for i in range(2)]
        self.values = np.array([0.5, -0.5, 1.0])
        self.noise, self.loss, self.rng, self.writes = noise, loss_per_unit, np.random.default_rng(0), []
        self.scraping_from = scraping_from

    def read_knobs(self):
        return self.values.copy()

    def write_knobs(self, values):
        self.writes.append(np.array(values, dtype=float))
        self.values = np.array(values, dtype=float)

    def read(self):
        values = TRUE_R @ self.values + self.rng.normal(0, self.noise, 2)
        current = 1.0 - self.loss * max(0.0, abs(self.values[2] - 1.0) - self.scraping_from)
        return Readings(values, np.zeros(2), np.ones(2, bool), {"current": current})


def test_measurement_recovers_the_matrix_restores_and_stays_within_the_largest_step(tmp_path):
    plant = LinearPlant()
    start = plant.values.copy()
    result = measure_response(plant, [InterlockRule("current", "min_fraction_of_start", 0.8)], tmp_path / "snap.json",
                              settings=ResponseSettings(samples=4))
    assert result.status == "completed"
    np.testing.assert_allclose(result.matrix, TRUE_R, atol=0.05)
    assert np.all(np.abs(result.matrix_array - TRUE_R) < 5 * result.sigma_array + 1e-9)
    assert 0.005 < np.median(result.noise) < 0.02
    np.testing.assert_array_equal(plant.values, start)
    previous = start
    for w in plant.writes:
        assert np.max(np.abs(w - previous)) <= 2.0 + 1e-12
        previous = w
    assert result.probes == [1.0, 1.0, 1.0]  # half the largest step: no interlock margin used


def test_probe_shrinks_to_the_interlock_margin_and_a_trip_restores(tmp_path):
    plant = LinearPlant(loss_per_unit=0.1)  # knob 2 eats 10 % of the beam per unit: margin 20 %
    result = measure_response(plant, [InterlockRule("current", "min_fraction_of_start", 0.8)], tmp_path / "snap.json")
    assert result.status == "completed"
    assert result.probes[:2] == [1.0, 1.0] and result.probes[2] < 1.0
    assert result.margin_used[2] <= 0.3 + 1e-9  # as chosen: at most 30 % of the margin
    # An aperture the feeler does not reach: the full probe scrapes and trips.
    plant = LinearPlant(loss_per_unit=0.5, scraping_from=0.3)
    start = plant.values.copy()
    result = measure_response(plant, [InterlockRule("current", "min_fraction_of_start", 0.8)], tmp_path / "snap2.json")
    assert result.status == "tripped" and "current" in result.message
    np.testing.assert_array_equal(plant.values, start)  # restored
    assert any(e["kind"] == "restore" for e in result.events)


class ApertureCliffPlant(LinearPlant):
    """A beam current that gives no warning: full until reading 0 passes 3 mm, then none
    (a beam off an aperture); readings of +-5 mm, so 10 % of their range is 1 mm."""

    def __init__(self):
        super().__init__(noise=0.005)
        self.readings = [ReadingSpec(f"r{i}", "mm", -5, 5) for i in range(2)]

    def read(self):
        r = super().read()
        lost = abs(TRUE_R[0] @ self.values) > 3.0
        return Readings(r.values, r.timestamps, r.valid, {"current": 0.0 if lost else 1.0})


def test_the_reading_limit_keeps_a_beam_off_an_aperture_its_current_does_not_announce(tmp_path):
    rules = [InterlockRule("current", "min_fraction_of_start", 0.8)]
    result = measure_response(ApertureCliffPlant(), rules, tmp_path / "a.json")  # reading 0 starts at 1.5 mm
    assert result.status == "completed", result.message
    np.testing.assert_allclose(result.matrix, TRUE_R, atol=0.05)
    # Without it (a reading may move over its whole range) the probe of knob 0 loses the beam.
    plant = ApertureCliffPlant()
    start = plant.values.copy()
    result = measure_response(plant, rules, tmp_path / "b.json", settings=ResponseSettings(max_reading_change=1.0))
    assert result.status == "tripped" and "current" in result.message
    np.testing.assert_array_equal(plant.values, start)


class OneSidedPlant(LinearPlant):
    """Starts scraping on one side: the current falls 2 per unit as knob 0 goes below its start."""

    def read(self):
        r = super().read()
        return Readings(r.values, r.timestamps, r.valid, {"current": 1.0 - 2.0 * max(0.0, 0.5 - self.values[0])})


def test_each_direction_is_grown_on_its_own_so_a_machine_near_a_limit_is_measured(tmp_path):
    plant = OneSidedPlant(noise=0.002)
    result = measure_response(plant, [InterlockRule("current", "min_fraction_of_start", 0.8)], tmp_path / "s.json")
    assert result.status == "completed", result.message
    np.testing.assert_allclose(result.matrix, TRUE_R, atol=0.02)  # the secant of two unequal probes
    downs = [w[0] - 0.5 for w in plant.writes if w[0] < 0.5]
    assert downs and min(downs) > -0.1  # knob 0 never went down as far as the trip level (0.1)
    assert max(w[0] for w in plant.writes) == pytest.approx(1.5)  # upwards the full probe
    assert result.margin_used[0] <= 0.5


class BendingPlant(LinearPlant):
    """A scraping start: as knob 0 goes down the current first rises (the orbit leaves one
    aperture), then falls (it nears another), reaching the trip level 0.8 at 0.5 units down."""

    def read(self):
        r = super().read()
        d = max(0.0, 0.5 - self.values[0])
        return Readings(r.values, r.timestamps, r.valid, {"current": 1.0 + 0.4 * d - 1.6 * d * d, "mps_ok": 1.0})


def test_a_current_that_rises_before_it_falls_is_not_extrapolated_as_a_straight_line(tmp_path):
    plant = BendingPlant(noise=0.002)
    # With an all-or-nothing interlock beside it, as machine files have (it must not hide the current's rise).
    rules = [InterlockRule("current", "min_fraction_of_start", 0.8), InterlockRule("mps_ok", "equals", 1.0)]
    result = measure_response(plant, rules, tmp_path / "s.json")
    assert result.status == "completed", result.message
    assert min(w[0] for w in plant.writes) > 0.0  # knob 0 starts at 0.5: 0.5 down is the trip level
    assert result.margin_used[0] <= 0.5
    np.testing.assert_allclose(result.matrix, TRUE_R, atol=0.02)


def test_a_knob_without_a_largest_step_is_refused(tmp_path):
    plant = LinearPlant()
    plant.knobs[1] = KnobSpec("k1", "A", -10, 10, np.inf)
    with pytest.raises(ValueError, match="k1"):
        measure_response(plant, [], tmp_path / "snap.json")
    assert plant.writes == []


def test_check_response():
    dk = np.array([0.3, 0.3, 0.3])
    same = check_response(TRUE_R, dk, TRUE_R @ dk)
    assert same.mismatch == pytest.approx(0.0) and same.cosine == pytest.approx(1.0)
    assert check_response(TRUE_R, dk, 2 * TRUE_R @ dk).mismatch == pytest.approx(1.0)
    assert check_response(TRUE_R, dk, -TRUE_R @ dk).cosine == pytest.approx(-1.0)
    assert check_response(TRUE_R, 1e-6 * dk, TRUE_R @ dk, noise=0.05) is None  # nothing measurable predicted


def test_every_proposal_carries_what_the_model_expects_of_it_and_the_model_is_close():
    """Approve and dry-run proposals say what the policy's model predicts (the opening probe
    included); on a machine drawn from the trained error model the prediction is near the
    measured result, so an operator is not approving blind."""
    from controller.machines import open_machine
    from controller.policy import Policy
    from controller.session import run_session

    machine = open_machine("sim-cafe2-cm1", seed=3)
    policy = Policy.load("pretrained", machine.definition, machine.setup)
    result = run_session(machine.plant, policy, mode="approve", interlocks=machine.interlocks, approver=lambda *_: True)
    proposals = [e.data["expected"] for e in result.events if e.kind == "proposal"]
    measured = [result.initial] + [r.metrics["rms_mm"] for r in result.step_records]
    after_probe = next(e for e in result.events if e.kind == "start").data["metrics"]["rms_mm"]
    assert len(proposals) == result.steps + 1 and result.status == "completed"
    assert proposals[0]["before"] == pytest.approx(result.initial)
    assert proposals[0]["after"] == pytest.approx(after_probe, abs=0.3) and "orbit RMS" in proposals[0]["summary"]
    for expected, after in zip(proposals[1:], measured[1:]):
        assert expected["after"] == pytest.approx(after, abs=0.3)
    auto = run_session(open_machine("sim-cafe2-cm1", seed=3).plant, policy, interlocks=machine.interlocks)
    assert not any("expected" in e.data for e in auto.events)  # nobody approves in auto mode: nothing predicted
