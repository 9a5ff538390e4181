"""The measured orbit numbers of the README and the closing notes, recomputed (slow: run with -m slow).

The simulator, the noise and the policies are deterministic per seed, so these are
exact: a refactor that changes any of them changed behaviour.
"""

import pytest

from core.registry import get_task
from controller.policy import Policy

pytestmark = pytest.mark.slow

# tbsac evaluate orbit --lattice cafe2-cmK --policy pretrained --episodes 100 --seed 1000 --errors test
# (success rate, final RMS median and p95 in mm as published to 3 digits, median steps)
AGENT = {"cafe2-cm1": (1.0, 0.434, 0.489, 5.0), "cafe2-cm2": (1.0, 0.386, 0.482, 5.5), "cafe2-cm3": (1.0, 0.430, 0.489, 6.0)}


@pytest.mark.parametrize("lattice", list(AGENT))
def test_orbit_agent_numbers(lattice):
    orbit = get_task("orbit")
    setup = orbit.load_setup(lattice)
    agent = Policy.load("pretrained", orbit, setup)
    summary, _ = orbit.evaluate(setup, orbit.load_errors("test"), agent, 100, 1000, ())
    r = summary["results"]["agent"]
    success, median, p95, steps = AGENT[lattice]
    assert r["success_rate"] == success and r["steps"]["median"] == steps
    assert r["final_rms_mm"]["median"] == pytest.approx(median, abs=6e-4)
    assert r["final_rms_mm"]["p95"] == pytest.approx(p95, abs=6e-4)
