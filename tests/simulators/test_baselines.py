"""Baselines run on the same environment, seeds and step limit as the agent."""

import numpy as np
import pytest

from simulators.beamline.baselines import DoNothing, SvdMeasured, SvdModel
from simulators.beamline.evaluation import evaluate_orbit, rms_trace, run_episode
from simulators.beamline.errors import load_error_model
from simulators.beamline.lattice import load_lattice
from simulators.beamline.task import OrbitEnv


@pytest.mark.parametrize("name", ["cafe2-cm1", "cafe2-cm2"])
def test_svd_model_corrects_test_machines(name):
    lattice = load_lattice(name)
    env = OrbitEnv(lattice, load_error_model("test"))
    eps = [run_episode(env, SvdModel(lattice), 100 + i) for i in range(10)]
    assert all(e.info["success"] for e in eps)
    assert all(e.initial["rms_mm"] > 0.5 for e in eps)
    assert np.median([e.steps for e in eps]) <= 5


def test_svd_measured_counts_its_probe_steps():
    lattice = load_lattice("cafe2-cm1")
    env = OrbitEnv(lattice, load_error_model("test"))
    controller = SvdMeasured(lattice)
    ep = run_episode(env, controller, 7)
    assert ep.info["success"]
    assert ep.steps > lattice.n_correctors  # one probe per corrector, then corrections
    # The measured matrix is close to the machine's true response (noise 0.05 mm).
    np.testing.assert_allclose(controller.response_matrix, env.plant.response.r[0], atol=0.25)


def test_do_nothing_leaves_the_orbit():
    lattice = load_lattice("cafe2-cm1")
    env = OrbitEnv(lattice, load_error_model("test"))
    ep = run_episode(env, DoNothing(lattice.n_correctors), 7)
    assert not ep.info["success"] and ep.steps == 50
    assert abs(ep.final["rms_mm"] - rms_trace(ep)[0]) < 0.2


def test_every_method_sees_the_same_machines():
    lattice = load_lattice("cafe2-cm1")
    summary, runs = evaluate_orbit(lattice, load_error_model("test"), None, 5, 300)
    initial = {name: [e.initial["rms_mm"] for e in eps] for name, eps in runs.items()}
    assert initial["svd_model"] == initial["svd_measured"] == initial["nothing"]
    assert set(summary["results"]) == {"svd_model", "svd_measured", "nothing"}
