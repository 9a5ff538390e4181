"""The safety layer around a simulated plant: every check and trip path runs."""

import time

import numpy as np
import pytest

from safety.guard import (
    GuardedPlant, InterlockRule, OperatorRejected, SafetyConfig, SafetyTrip, read_snapshot, restore_snapshot,
)
from simulators.beamline.errors import load_error_model
from simulators.beamline.lattice import load_lattice
from simulators.beamline.plant import OrbitSimPlant
from core.plant import ConnectionLost, Readings


@pytest.fixture
def plant():
    p = OrbitSimPlant(load_lattice("cafe2-cm1"), load_error_model("test"))
    p.reset(1)
    p.write_knobs(np.full(10, 0.5))  # a machine that does not start at zero
    return p


def guarded(plant, tmp_path, **config):
    g = GuardedPlant(plant, SafetyConfig(**config), [InterlockRule("beam_current", "min_fraction_of_start", 0.8)],
                     snapshot_path=tmp_path / "snap.json")
    g.begin()
    return g


def test_snapshot_is_on_disk_before_any_write(plant, tmp_path):
    g = guarded(plant, tmp_path)
    snap = read_snapshot(tmp_path / "snap.json")
    assert list(snap["knobs"].values()) == [0.5] * 10
    assert g.writes == 0


def test_out_of_range_reading_trips(plant, tmp_path):
    from core.plant import ReadingSpec

    plant.readings = [ReadingSpec(r.name, r.unit, -0.1, 0.1) for r in plant.readings]
    g = GuardedPlant(plant, snapshot_path=tmp_path / "snap.json")
    with pytest.raises(SafetyTrip, match="outside") as info:
        g.begin()
    assert info.value.restored  # the snapshot (the starting settings) is written back and verified
    np.testing.assert_array_equal(plant.read_knobs(), 0.5)


def test_max_steps_trips_and_restores(plant, tmp_path):
    g = guarded(plant, tmp_path, max_steps=2)
    g.write_knobs(np.full(10, 0.7))
    g.write_knobs(np.full(10, 0.9))
    with pytest.raises(SafetyTrip, match="more than 2 steps") as info:
        g.write_knobs(np.full(10, 1.1))
    assert info.value.restored
    np.testing.assert_array_equal(plant.read_knobs(), 0.5)
    assert [e.kind for e in g.events][-2:] == ["trip", "restore"]


def test_duration_limit_trips(plant, tmp_path):
    g = guarded(plant, tmp_path, max_duration_s=0.05)
    time.sleep(0.06)
    with pytest.raises(SafetyTrip, match="longer than"):
        g.read()
    np.testing.assert_array_equal(plant.read_knobs(), 0.5)


def test_nan_proposal_trips(plant, tmp_path):
    g = guarded(plant, tmp_path)
    with pytest.raises(SafetyTrip, match="NaN"):
        g.write_knobs(np.array([np.nan] + [0.5] * 9))


def test_write_rate_is_limited(plant, tmp_path):
    g = guarded(plant, tmp_path, min_write_interval_s=0.1)
    g.write_knobs(np.full(10, 0.6))
    t = time.monotonic()
    g.write_knobs(np.full(10, 0.7))
    assert time.monotonic() - t >= 0.09
    assert any(e.kind == "delay" for e in g.events)


def test_beam_loss_trips(plant, tmp_path):
    g = guarded(plant, tmp_path, max_excursion=40)
    # Steer hard into the aperture one allowed step at a time until the current falls.
    with pytest.raises(SafetyTrip, match="beam loss|bad reading") as info:
        for k in range(1, 40):
            g.write_knobs(np.full(10, 0.5 + 3.0 * k))
            g.read()
    assert info.value.restored
    np.testing.assert_array_equal(plant.read_knobs(), 0.5)


def test_abort_from_another_thread_stops_at_next_call(plant, tmp_path):
    g = guarded(plant, tmp_path)
    g.abort("operator abort (API)")
    with pytest.raises(SafetyTrip, match="operator abort"):
        g.write_knobs(np.full(10, 0.7))
    assert plant.read_knobs().tolist() == [0.5] * 10


def test_tripped_guard_refuses_everything_after(plant, tmp_path):
    g = guarded(plant, tmp_path, max_steps=1)
    g.write_knobs(np.full(10, 0.6))
    with pytest.raises(SafetyTrip):
        g.write_knobs(np.full(10, 0.7))
    with pytest.raises(SafetyTrip):
        g.read()


def test_reject_in_approve_mode(plant, tmp_path):
    g = GuardedPlant(plant, mode="approve", approver=lambda *a: False, snapshot_path=tmp_path / "s.json")
    g.begin()
    with pytest.raises(OperatorRejected):
        g.write_knobs(np.full(10, 0.7))
    np.testing.assert_array_equal(plant.read_knobs(), 0.5)


class Disconnecting(OrbitSimPlant):
    """A simulated plant whose link drops after `n` reads (a real fault path, not a mock of ours)."""

    reads_left = 2

    def read(self) -> Readings:
        self.reads_left -= 1
        if self.reads_left < 0:
            raise ConnectionLost("BPM1:X: no answer within 1.0 s")
        return super().read()


def test_connection_lost_keeps_snapshot_and_does_not_write(tmp_path):
    p = Disconnecting(load_lattice("cafe2-cm1"), load_error_model("test"))
    p.reset(1)
    g = GuardedPlant(p, snapshot_path=tmp_path / "snap.json")
    g.begin()
    g.read()
    g.write_knobs(np.full(10, 0.4))
    with pytest.raises(SafetyTrip, match="connection lost") as info:
        g.read()
    assert not info.value.restored
    np.testing.assert_array_equal(p.read_knobs(), 0.4)  # nothing written after the loss
    # Later, with the link back, the snapshot on disk restores the machine.
    restore_snapshot(p, read_snapshot(tmp_path / "snap.json"))
    np.testing.assert_array_equal(p.read_knobs(), 0.0)


def test_restore_refuses_values_outside_limits(plant):
    snap = {"knobs": {k.name: 99.0 for k in plant.knobs}}
    with pytest.raises(ValueError, match="outside"):
        restore_snapshot(plant, snap)
