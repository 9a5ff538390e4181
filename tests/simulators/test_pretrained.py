"""The shipped policies meet the acceptance bar on a few unseen machines."""

import pytest

from simulators.beamline.evaluation import evaluate_orbit
from controller.policy import Policy
from simulators.beamline.errors import load_error_model
from simulators.beamline.lattice import load_lattice
from simulators.beamline.task import OrbitTaskConfig
from conftest import for_setup


@pytest.mark.parametrize("name", ["cafe2-cm1", pytest.param("cafe2-cm2", marks=pytest.mark.slow),
                                  pytest.param("cafe2-cm3", marks=pytest.mark.slow)])
def test_shipped_policy_meets_the_bar(name):
    lattice = load_lattice(name)
    agent = Policy.load("pretrained", *for_setup(lattice))
    assert agent.metadata["lattice"]["name"] == name
    summary, _ = evaluate_orbit(lattice, load_error_model("test"), agent, 20, 1000,
                                OrbitTaskConfig(**agent.metadata["task_config"]))
    result = summary["results"]["agent"]
    assert result["success_rate"] >= 0.99
    assert result["final_rms_mm"]["p95"] <= 0.5
    assert result["steps"]["median"] <= 6
