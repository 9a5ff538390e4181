"""The battery over real Channel Access: a virtual battery IOC with its own period clock,
sessions that wait for every settlement period, and the battery's safe state (no power).

Every test starts its own IOC (one 15-minute period every 0.1 s) with a unique prefix.
"""

import epics
import numpy as np
import pytest

from conftest import guarded_session
from controller.session import run_session
from core.registry import get_task
from safety.guard import InterlockRule

PERIOD_S = 0.1
RATED_KW = 1000.0


class Constant:
    """Always asks for the same fraction of rated power (a test policy, not a trained one)."""

    task, path, sha256 = "battery", None, ""

    def __init__(self, fraction: float, after=None):
        self.fraction, self.after, self.calls = fraction, after, 0
        self.metadata = {"task": "battery", "task_config": {}}

    def act(self, obs):
        self.calls += 1
        if self.after:
            self.after(self.calls)
        return np.array([self.fraction])


def battery_ioc(start_ioc, seed=3, period_s=PERIOD_S):
    return start_ioc(lattice="bess-1mw-2mwh", machine="virtual-bess", seed=seed, period_s=period_s)


def assert_puts_within_limits(ioc):
    values = [p["value"] for p in ioc.puts()]
    assert values and all(abs(v) <= RATED_KW + 1e-9 for v in values), values
    steps = np.abs(np.diff([0.0, *values]))
    assert np.all(steps <= RATED_KW + 1e-9)  # the ramp limit (from the 0 kW the IOC starts at)


def test_a_day_over_channel_access_earns_what_the_simulation_earns_on_the_same_prices(start_ioc, tmp_path):
    ioc = battery_ioc(start_ioc)
    opened = ioc.open()
    result = guarded_session(opened, Constant(0.3), tmp_path)
    assert result.status == "completed" and result.success and result.steps == 96, result.trips
    assert result.restored and epics.caget(ioc.pv("power:I_SET"), timeout=2) == 0.0  # the agent let go: no power
    assert len(result.step_records) == 96
    assert_puts_within_limits(ioc)
    # The same policy on the simulated battery with the same prices: the IOC idled at 0 kW
    # until the session started, then every write ran exactly one period.
    definition = get_task("battery")
    setup = definition.load_setup("bess-1mw-2mwh")
    sim = definition.sim_plant(setup, definition.load_errors("test"))
    sim.reset(3)
    start_period = (int(result.events[0].data["readings"][3]) + 1) % 96
    for _ in range(start_period):
        sim.write_knobs([0.0])
    sim_result = run_session(sim, Constant(0.3), interlocks=[InterlockRule(**r) for r in definition.sim_interlocks])
    assert sim_result.final == pytest.approx(result.final, rel=1e-9, abs=1e-6)
    prices = [r.readings[0] for r in result.step_records]
    assert prices == pytest.approx([r.readings[0] for r in sim_result.step_records])


def trip_session(start_ioc, tmp_path, inject, **machine_overrides):
    ioc = battery_ioc(start_ioc)
    opened = ioc.open(**machine_overrides)
    epics.caput(ioc.pv("power:I_SET"), 0.0, wait=True)

    def after(calls):
        if calls == 5:
            inject(ioc)

    result = guarded_session(opened, Constant(-0.4, after), tmp_path)
    assert result.status == "tripped" and result.restored, result.trips
    assert epics.caget(ioc.pv("power:I_SET"), timeout=2) == 0.0  # safe state: no power, verified
    assert any(e.kind == "restore" and e.reason.startswith("no power") for e in result.events)
    assert_puts_within_limits(ioc)
    return result


def test_inverter_fault_trips_and_stops_injecting(start_ioc, tmp_path):
    result = trip_session(start_ioc, tmp_path, lambda ioc: epics.caput(ioc.pv("SIM:INVERTER_FAULT"), 1, wait=True))
    assert "inverter_ok" in result.trips[0]


def test_soc_outside_its_limits_trips_and_stops_injecting(start_ioc, tmp_path):
    result = trip_session(start_ioc, tmp_path, lambda ioc: epics.caput(ioc.pv("SIM:SOC_FAULT"), 3, wait=True))
    assert "soc_low" in result.trips[0] and "below 4" in result.trips[0]


def test_stale_price_feed_trips_and_stops_injecting(start_ioc, tmp_path):
    # The price record stops updating (frozen feed): older than stale_after_s is a fault.
    result = trip_session(start_ioc, tmp_path, lambda ioc: epics.caput(ioc.pv("SIM:READING_FAULT"), 4, wait=True),
                          stale_after_s=1.0)
    assert "price" in result.trips[0] and "stale" in result.trips[0]


def test_a_period_clock_that_stops_trips_and_stops_injecting(start_ioc, tmp_path):
    # Periods every 3 s, the machine file allows 1 s: the first read waiting for a new period gives up.
    ioc = battery_ioc(start_ioc, period_s=3.0)
    opened = ioc.open(clock={"pv": ioc.pv("CLOCK:PERIOD"), "timeout_s": 1.0})
    epics.caput(ioc.pv("power:I_SET"), 200.0, wait=True)  # found discharging at 200 kW
    result = guarded_session(opened, Constant(0.0), tmp_path)
    assert result.status == "tripped" and "no new period within 1.0 s" in result.trips[0]
    assert result.restored and epics.caget(ioc.pv("power:I_SET"), timeout=2) == 0.0


def test_tbsac_run_trades_a_day_with_the_shipped_policy_then_stops_injecting(start_ioc, run_cli):
    import json

    ioc = battery_ioc(start_ioc, seed=11)
    proc = run_cli("run", "--machine", str(ioc.machine_file()), "--policy", "pretrained", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "battery" and out["success"] and out["steps"] == 96 and out["trips"] == []
    assert out["restored"] and epics.caget(ioc.pv("power:I_SET"), timeout=2) == 0.0
    assert_puts_within_limits(ioc)
    # The guard's budget held: the setpoints never discharge more than 2 cycles (4 MWh) in the day.
    assert sum(max(p["value"], 0.0) for p in ioc.puts()) / 1000.0 * 0.25 <= 4.0 + 1e-9
