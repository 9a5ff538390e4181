"""The virtual field over real Channel Access: a WOFOST season served one day per clock
period, sessions that wait for every day, the crop's rules and its safe state (no
fertiliser). Every test starts its own IOC (one day every 0.1 s) with a unique prefix."""

import epics
import numpy as np
import pytest

from conftest import guarded_session
from controller.session import run_session
from core.registry import get_task
from safety.guard import InterlockRule

DAY_S = 0.1
SEED = 2
MAX_DOSE = 100.0


class DoseOnCalls:
    """Asks for a fixed action on given calls, nothing otherwise (a test policy, not a trained one)."""

    task, path, sha256 = "crop", None, ""

    def __init__(self, doses: dict[int, float], max_steps: int = 60, after=None, first_dvs: float = 0.1):
        self.doses, self.after, self.calls = doses, after, 0
        self.metadata = {"task": "crop", "task_config": {"max_steps": max_steps, "first_application_dvs": first_dvs}}

    def act(self, obs):
        self.calls += 1
        if self.after:
            self.after(self.calls)
        return np.array([self.doses.get(self.calls, -1.0)])


def field_ioc(start_ioc, seed=SEED, day_s=DAY_S):
    return start_ioc(lattice="wheat", machine="virtual-field", seed=seed, period_s=day_s)


def assert_puts_within_limits(ioc, cap=250.0):
    values = [p["value"] for p in ioc.puts()]
    assert values and all(0.0 <= v <= MAX_DOSE for v in values), values
    assert sum(values) <= cap  # each put holds for one day: the season's N is at most their sum


def dose_is_off(ioc) -> bool:
    return epics.caget(ioc.pv("dose:I_SET"), timeout=2) == 0.0


def test_days_over_channel_access_give_the_simulations_doses_and_crop(start_ioc, tmp_path):
    ioc = field_ioc(start_ioc)
    opened = ioc.open()
    # The IOC's season starts at sowing: this policy may spread from the start (its task's
    # first stage is before sowing), so days of doses fit in a short test.
    policy = DoseOnCalls({5: 1.0, 20: 0.5, 40: 0.75}, first_dvs=-1.0)
    result = guarded_session(opened, policy, tmp_path)
    assert result.status == "not_converged" and result.steps == 60 and not result.trips, result.trips
    assert result.restored and dose_is_off(ioc)  # the season is not over: the agent lets go, nothing spread
    assert_puts_within_limits(ioc)
    applied = [r.readings[8] for r in result.step_records]
    assert applied[-1] == pytest.approx(100.0 + 50.0 + 75.0)
    # The same policy on the simulated field: the IOC idled at dose 0 until the session
    # started, then every write ran exactly one day.
    definition = get_task("crop")
    sim = definition.sim_plant(definition.load_setup("wheat"), definition.load_errors("test"))
    sim.reset(SEED)
    for _ in range(int(result.events[0].data["readings"][0])):
        sim.write_knobs([0.0])
    sim_result = run_session(sim, DoseOnCalls({5: 1.0, 20: 0.5, 40: 0.75}, first_dvs=-1.0),
                             interlocks=[InterlockRule(**r) for r in definition.sim_interlocks])
    field = np.array([r.readings for r in result.step_records])
    simulated = np.array([r.readings for r in sim_result.step_records])
    assert field == pytest.approx(simulated, rel=1e-6, abs=1e-4)  # PVs carry 4 decimals' worth, doubles
    assert sim.season.applied == pytest.approx(225.0)


def trip_session(start_ioc, tmp_path, inject, **machine_overrides):
    ioc = field_ioc(start_ioc)
    opened = ioc.open(**machine_overrides)

    def after(calls):
        if calls == 5:
            inject(ioc)

    result = guarded_session(opened, DoseOnCalls({k: 0.5 for k in range(1, 60)}, after=after, first_dvs=-1.0), tmp_path)
    assert result.status == "tripped" and result.restored, result.trips
    assert dose_is_off(ioc)  # safe state: nothing spread, verified
    assert any(e.kind == "restore" and e.reason.startswith("no fertiliser (dose 0)") for e in result.events)
    assert_puts_within_limits(ioc)
    return result


def test_an_applicator_fault_trips_and_the_dose_goes_to_zero(start_ioc, tmp_path):
    result = trip_session(start_ioc, tmp_path, lambda ioc: epics.caput(ioc.pv("SIM:APPLICATOR_FAULT"), 1, wait=True))
    assert "applicator_ok" in result.trips[0]


def test_a_frozen_field_station_trips_and_the_dose_goes_to_zero(start_ioc, tmp_path):
    # The day counter's record stops updating (frozen station): older than stale_after_s is a fault.
    result = trip_session(start_ioc, tmp_path, lambda ioc: epics.caput(ioc.pv("SIM:READING_FAULT"), 4, wait=True),
                          stale_after_s=1.0)
    assert "day" in result.trips[0] and "stale" in result.trips[0]


def test_a_day_clock_that_stops_trips_and_the_dose_goes_to_zero(start_ioc, tmp_path):
    # Days every 3 s, the machine file allows 1 s: the first read waiting for a new day gives up.
    ioc = field_ioc(start_ioc, day_s=3.0)
    opened = ioc.open(clock={"pv": ioc.pv("CLOCK:PERIOD"), "timeout_s": 1.0})
    epics.caput(ioc.pv("dose:I_SET"), 30.0, wait=True)  # found spreading 30 kg N/ha a day
    result = guarded_session(opened, DoseOnCalls({}), tmp_path)
    assert result.status == "tripped" and "no new period within 1.0 s" in result.trips[0]
    assert result.restored and dose_is_off(ioc)
